"""Quantise a GGUF f16 file with llama.cpp and describe what came out.

SmolLM2's width 576 is not a multiple of 256 (the k-quant block), so llama.cpp falls back to
a legacy type for most matrices of a k-quant target (e.g. Q4_K -> Q5_0): we read the result
back and report its real tensor types, fallbacks and effective bits per weight.
"""

from __future__ import annotations

import collections
import contextlib
import os
import sys
import time
from pathlib import Path

from .. import BkdError

DEFAULT_QUANTS = ("Q8_0", "Q4_K_M")


def known_quants() -> list[str]:
    from ..runtime.llamacpp import quant_types

    return quant_types()


def check_quants(quants) -> list[str]:
    """Upper-cased, de-duplicated quant names; an unknown one is an error before any work is done."""
    known = known_quants()
    out = []
    for q in quants:
        q = q.strip().upper()
        if q not in known:
            raise BkdError(f"unknown quant type {q!r} (known: {', '.join(known)})")
        if q not in out:
            out.append(q)
    return out


@contextlib.contextmanager
def _stderr_to(path: Path):
    """Redirect the C library's stderr (fd 2) to a file for the duration of the block."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(path, "wb") as f:
            os.dup2(f.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def quantize(src: str | Path, dst: str | Path, quant: str, threads: int = 0) -> float:
    from ..runtime.llamacpp import quantize_file

    t0 = time.perf_counter()
    with _stderr_to(Path(dst).with_suffix(".log")):  # one fallback warning per tensor: counted, not shown
        rc = quantize_file(src, dst, quant, threads)
    Path(dst).with_suffix(".log").unlink(missing_ok=True)
    if rc != 0 or not Path(dst).is_file():
        raise BkdError(f"{dst}: llama.cpp quantisation to {quant} failed (status {rc})")
    return time.perf_counter() - t0


def describe_gguf(path: str | Path, quant: str = "") -> dict:
    """File size, effective bits per weight, tensor types and k-quant fallbacks of a GGUF file."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    types = collections.Counter(t.tensor_type.name for t in reader.tensors)
    n_elements = sum(int(t.n_elements) for t in reader.tensors)
    n_bytes = sum(int(t.n_bytes) for t in reader.tensors)
    fallbacks = collections.Counter()
    if "_K" in quant:  # a k-quant target: matrices stored in a non-k type fell back
        for t in reader.tensors:
            if len(t.shape) >= 2 and not t.tensor_type.name.endswith("_K") and t.tensor_type.name not in ("F32", "F16"):
                fallbacks[t.tensor_type.name] += 1
    arch = reader.fields.get("general.architecture")
    return {
        "arch": arch.contents() if arch is not None else None,
        "bytes": Path(path).stat().st_size,
        "bits_per_weight": round(8 * n_bytes / n_elements, 3),
        "tensor_types": dict(sorted(types.items())),
        "fallbacks": sum(fallbacks.values()),
        "fallback_types": dict(fallbacks),
        "matrices": sum(1 for t in reader.tensors if len(t.shape) >= 2),
    }
