"""Merge a LoRA adapter into its base GGUF and write the result as a GGUF f16 twin of the base.

Every metadata field (tokenizer, chat template, rope settings ...) is copied from the base GGUF,
so llama.cpp sees the same model with new weights. `permute` is the q/k layout change between HF
(rotate-half) and llama.cpp (interleaved rotary pairs), used by `lora_gguf` for the adapter's B.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from .. import BkdError

SUPPORTED_ARCHS = ("llama",)
FTYPE_F16 = 1  # llama_ftype LLAMA_FTYPE_MOSTLY_F16


def _field(reader, key: str):
    f = reader.fields.get(key)
    return None if f is None else f.contents()


def check_base(path: str | Path):
    """The base GGUF's reader, or a clear error when the writer cannot handle its architecture.
    Read once per file version: parsing a GGUF's metadata (a 49k-token vocabulary) takes seconds,
    and an export reads its base in four steps."""
    path = Path(path).resolve()
    stat = path.stat()
    return _check_base(path, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=4)
def _check_base(path: Path, mtime_ns: int, size: int):
    from gguf import GGUFReader

    reader = GGUFReader(path)
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise BkdError(
            f"{path}: architecture {arch!r} is not supported by the GGUF writer (supported: "
            f"{', '.join(SUPPORTED_ARCHS)}); convert the merged model with llama.cpp's convert_hf_to_gguf.py"
        )
    return reader


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotate-half layout -> llama.cpp interleaved (what convert_hf_to_gguf.py does)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def merged_tensors(base_path: str | Path, adapter_path: str | Path, scale: float = 1.0) -> dict[str, np.ndarray]:
    """The base GGUF's tensors, dequantised as the trainer saw them, with the LoRA adapter GGUF
    (`lora_gguf.write_lora_gguf`) merged in: W + scale * alpha/r * B @ A, in the base's (llama.cpp)
    layout (`scale` as llama.cpp applies it at run time, `--adapter FILE:SCALE`).

    No transformers and no torch: the dequantisation is gguf-py's, the one transformers uses when
    it loads a GGUF for training, and the adapter's tensors are already in llama.cpp's q/k layout.
    Matrices come out f16, 1-D tensors (norms) f32, as convert_hf_to_gguf.py writes them.
    """
    from gguf import GGUFReader
    from gguf.quants import dequantize

    base, lora = check_base(base_path), GGUFReader(adapter_path)
    alpha, rank = float(_field(lora, "adapter.lora.alpha")), int(_field(lora, "bkd.lora.rank"))
    pairs = {t.name: np.asarray(t.data, dtype=np.float32) for t in lora.tensors}
    out = {}
    for t in base.tensors:
        data = dequantize(t.data, t.tensor_type).reshape([int(x) for x in reversed(t.shape)]).astype(np.float32)
        a, b = pairs.pop(t.name + ".lora_a", None), pairs.pop(t.name + ".lora_b", None)
        if a is not None and b is not None:
            data += (scale * alpha / rank) * (b @ a)
        out[t.name] = data.astype(np.float32 if data.ndim == 1 else np.float16)
    if pairs:
        raise BkdError(f"{adapter_path}: LoRA tensors with no base tensor: {sorted(pairs)[:5]}")
    return out


def write_gguf_f16(base_path: str | Path, tensors: dict[str, np.ndarray], out_path: str | Path) -> dict:
    """Write `tensors` (GGUF names, the base's tensors) with the base's metadata; returns a small summary."""
    import gguf

    reader = check_base(base_path)
    arch = _field(reader, "general.architecture")
    if set(tensors) != {t.name for t in reader.tensors}:
        raise BkdError(f"{out_path}: the merged tensors differ from the base's {base_path}")
    writer = gguf.GGUFWriter(str(out_path), arch)
    try:
        for field in reader.fields.values():
            if field.name.startswith("GGUF.") or field.name == "general.architecture":
                continue  # written by GGUFWriter itself
            vtype = field.types[0]
            if field.name == "general.file_type":
                writer.add_uint32(field.name, FTYPE_F16)
                continue
            sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(field.name, field.contents(), vtype, sub_type=sub)
        if "general.file_type" not in reader.fields:
            writer.add_uint32("general.file_type", FTYPE_F16)
        for t in reader.tensors:  # the base's order
            writer.add_tensor(t.name, tensors[t.name])
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    return {"tensors": len(tensors), "kv_fields": len(reader.fields), "arch": arch}
