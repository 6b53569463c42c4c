"""LoRA adapters at run time: `--adapter FILE[:SCALE]`, checked before llama.cpp sees them.

A shipped student is the base GGUF from PyPI plus a small GGUF adapter (export/lora_gguf.py). An
adapter made for another base (architecture, tensor names or shapes, or the base sha256 it
records) or a cut file is refused here with the reason, before any generation: llama.cpp alone
would answer some of these with a bare failure or, for a same-shaped other base, not at all.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import BkdError
from ..files import sha256_file
from .model_file import check_gguf_magic, gguf_field

MAX_SCALE = 4.0  # past this a LoRA delta swamps the base: almost surely a typo
MAX_ALPHA = 4096.0  # LoRA alpha is the rank or a small multiple of it (8..512 in practice)


@dataclass(frozen=True)
class AdapterSpec:
    path: Path
    scale: float = 1.0

    def __post_init__(self):
        if not math.isfinite(self.scale) or not 0.0 < self.scale <= MAX_SCALE:
            raise BkdError(f"{self.path}: adapter scale {self.scale} is out of range (0, {MAX_SCALE:g}]")

    def __str__(self) -> str:
        return f"{self.path}:{self.scale:g}"


def parse_adapter(spec: str) -> AdapterSpec:
    """'FILE' or 'FILE:SCALE' (an existing file whose name holds ':' is taken whole)."""
    path, sep, scale = str(spec).rpartition(":")
    if not sep or "/" in scale or Path(spec).exists():
        return AdapterSpec(Path(spec), 1.0)
    try:
        value = float(scale)
    except ValueError:
        raise BkdError(f"--adapter {spec!r}: scale {scale!r} is not a number") from None
    return AdapterSpec(Path(path), value)


def check_adapter(
    path: str | Path, model_path: str | Path, model_sha256: str | None = None, model_arch: str | None = None,
    shapes: bool = True,
) -> dict:  # fmt: skip
    """The adapter's metadata when it fits this model file; a BkdError saying why it does not.

    `shapes=False` (with `model_arch` given) skips matching every tensor against the base, which
    means parsing the base GGUF's header (~2 s for a 49k vocab): the engine lets llama.cpp check
    the shapes as it loads, and asks for the full check only to name what a refused adapter got wrong.
    """
    from gguf import GGUFReader

    path, model_path = check_gguf_magic(path), Path(model_path)
    try:
        reader = GGUFReader(path)
    except Exception as e:  # gguf-py raises ValueError/IndexError/struct errors on cut files
        raise BkdError(f"{path}: adapter header is damaged or the file is truncated ({type(e).__name__})") from None
    size = path.stat().st_size
    end = max((t.data_offset + int(t.n_bytes) for t in reader.tensors), default=0)
    if end > size:
        raise BkdError(f"{path}: truncated adapter: tensors need {end:,} bytes, the file has {size:,}")
    if gguf_field(reader, "general.type") != "adapter" or gguf_field(reader, "adapter.type") != "lora":
        raise BkdError(f"{path}: not a LoRA adapter (general.type = adapter, adapter.type = lora expected)")
    if not reader.tensors:
        raise BkdError(f"{path}: the adapter holds no tensors")
    alpha = _alpha(path, reader)
    _check_finite(path, reader)

    model = GGUFReader(model_path) if shapes or model_arch is None else None
    arch, model_arch = (
        gguf_field(reader, "general.architecture"),
        model_arch or gguf_field(model, "general.architecture"),
    )
    if arch != model_arch:
        raise BkdError(f"{path}: adapter for architecture {arch!r}, the model {model_path.name} is {model_arch!r}")
    if shapes:
        _check_shapes(path, reader, model, model_path.name)
    wanted = gguf_field(reader, "bkd.base.sha256")
    if wanted and wanted != (model_sha256 or sha256_file(model_path)):
        name = gguf_field(reader, "bkd.base.name") or "another file"
        raise BkdError(f"{path}: adapter made for base {name} (sha256 {wanted[:12]}…), not {model_path.name}")
    return {
        "file": str(path),
        "sha256": sha256_file(path),
        "alpha": alpha,
        "tensors": len(reader.tensors),
        "bytes": size,
    }


def _alpha(path: Path, reader) -> float:
    """adapter.lora.alpha when it is a finite number in (0, MAX_ALPHA]; 0 when absent (llama.cpp then
    applies the delta unscaled). A NaN or an absurd alpha multiplies every delta: NaN logits, or
    logits so large that decoding stalls."""
    value = gguf_field(reader, "adapter.lora.alpha")
    if value is None:
        return 0.0
    try:
        alpha = float(value)
    except (TypeError, ValueError):
        raise BkdError(f"{path}: adapter.lora.alpha {value!r} is not a number") from None
    if not (math.isfinite(alpha) and 0.0 < alpha <= MAX_ALPHA):
        raise BkdError(f"{path}: adapter.lora.alpha {alpha:g} is out of range (0, {MAX_ALPHA:g}]")
    return alpha


def _check_finite(path: Path, reader) -> None:
    """Every tensor's values finite (an adapter is a few MB: each is read once). Quantised tensors are
    left to llama.cpp: their values are block scales and codes, not numbers to test one by one."""
    from gguf import GGMLQuantizationType

    for t in reader.tensors:
        data = np.asarray(t.data)
        if t.tensor_type == GGMLQuantizationType.BF16:
            data = (data.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        elif t.tensor_type not in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
            continue
        if not np.isfinite(data).all():
            bad = int(np.size(data) - np.count_nonzero(np.isfinite(data)))
            raise BkdError(f"{path}: tensor {t.name} holds {bad:,} non-finite value(s) (NaN or infinity)")


def _check_shapes(path: Path, reader, model, model_name: str) -> None:
    shapes = {t.name: tuple(int(x) for x in t.shape) for t in model.tensors}  # ggml order: (in, out)
    for t in reader.tensors:
        base, _, side = t.name.rpartition(".lora_")
        if side not in ("a", "b") or base not in shapes:
            raise BkdError(f"{path}: tensor {t.name!r} has no tensor in {model_name} (made for another base?)")
        n_in, n_out = shapes[base][0], shapes[base][-1]
        dim = int(t.shape[0]) if side == "a" else int(t.shape[1])  # a: (in, r), b: (r, out) in ggml order
        if dim != (n_in if side == "a" else n_out):
            raise BkdError(
                f"{path}: tensor {t.name} has shape {tuple(int(x) for x in t.shape)}, "
                f"which does not fit {base} {shapes[base]} of {model_name} (made for another base?)"
            )
