"""Merge a LoRA adapter into its base GGUF and write the result as a GGUF f16 twin of the base.

Every metadata field (tokenizer, chat template, rope settings ...) is copied from the base GGUF,
so llama.cpp sees the same model with new weights. Any architecture gguf-py names works: the
adapter's tensors carry the base's own tensor names (`lora_gguf`), so the merge never needs to
know what a tensor is. Tensors are dequantised, merged and written one at a time (the header
first, from the base's shapes), so memory holds one tensor, not the model: what lets a 7B merge
on a 24 GB machine.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .. import BkdError

FTYPE_F16 = 1  # llama_ftype LLAMA_FTYPE_MOSTLY_F16
# GGUF architectures whose q/k rows llama.cpp's converter permutes from HF's rotate-half layout into
# interleaved rotary pairs (`LlamaModel.permute` and the classes that reuse it, llama.cpp 0.3.36;
# Mistral converts to 'llama'). transformers un-permutes exactly these when it loads a GGUF for
# training, so a LoRA's B rows of q/k are permuted again on the way back (`lora_gguf`).
PERMUTED_QK = frozenset({"llama", "arcee", "smollm3", "granite", "granitemoe", "granitehybrid", "deci", "arctic",
                         "deepseek", "chameleon", "bailingmoe"})  # fmt: skip


def field_value(reader, key: str):
    f = reader.fields.get(key)
    return None if f is None else f.contents()


def check_base(path: str | Path):
    """The base GGUF's reader, or a clear error when gguf-py does not know its architecture.
    Read once per file version: parsing a GGUF's metadata (a 49k-token vocabulary) takes seconds,
    and an export reads its base in four steps."""
    path = Path(path).resolve()
    stat = path.stat()
    return _check_base(path, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=4)
def _check_base(path: Path, mtime_ns: int, size: int):
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
    except Exception as e:  # gguf-py raises ValueError/IndexError/struct errors on damaged files
        raise BkdError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
    arch = field_value(reader, "general.architecture")
    model_arch(arch, path)
    return reader


def model_arch(arch, where) -> object:
    """gguf-py's MODEL_ARCH for an architecture name, or a clear error."""
    import gguf

    by_name = {name: value for value, name in gguf.MODEL_ARCH_NAMES.items()}
    if arch not in by_name:
        raise BkdError(f"{where}: architecture {arch!r} is unknown to gguf-py; it cannot be merged or given an adapter")
    return by_name[arch]


def arch_shape(reader, where) -> dict:
    """What an adapter writer needs of a GGUF base: architecture, block and head counts, tensor shapes."""
    arch = field_value(reader, "general.architecture")
    model_arch(arch, where)
    n_head = int(field_value(reader, f"{arch}.attention.head_count") or 0)
    return {
        "arch": arch,
        "n_blocks": int(field_value(reader, f"{arch}.block_count")),
        "n_head": n_head,
        "n_kv": int(field_value(reader, f"{arch}.attention.head_count_kv") or n_head),
        "shapes": {t.name: tuple(int(x) for x in reversed(t.shape)) for t in reader.tensors},  # numpy order
    }


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotate-half layout -> llama.cpp interleaved (what convert_hf_to_gguf.py does)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def iter_merged(
    base_path: str | Path, adapter_path: str | Path, scale: float = 1.0
) -> Iterator[tuple[str, np.ndarray]]:
    """The base GGUF's tensors in its order, dequantised as the trainer saw them, each with the LoRA
    adapter GGUF (`lora_gguf.write_lora_gguf`) merged in: W + scale * alpha/r * B @ A, in the base's
    (llama.cpp) layout (`scale` as llama.cpp applies it at run time, `--adapter FILE:SCALE`).

    No transformers and no torch: the dequantisation is gguf-py's, the one transformers uses when
    it loads a GGUF for training, and the adapter's tensors are already in the base's layout.
    Matrices come out f16, 1-D tensors (norms) f32, as convert_hf_to_gguf.py writes them.
    """
    from gguf import GGUFReader
    from gguf.quants import dequantize

    base, lora = check_base(base_path), GGUFReader(adapter_path)
    alpha = float(field_value(lora, "adapter.lora.alpha"))
    pairs = {t.name: t for t in lora.tensors}
    names = {t.name for t in base.tensors}
    orphans = sorted(n.rsplit(".lora_", 1)[0] for n in pairs if n.rsplit(".lora_", 1)[0] not in names)
    if orphans:
        raise BkdError(f"{adapter_path}: LoRA tensors with no base tensor: {orphans[:5]}")
    for t in base.tensors:
        data = dequantize(t.data, t.tensor_type).reshape([int(x) for x in reversed(t.shape)]).astype(np.float32)
        a, b = pairs.get(t.name + ".lora_a"), pairs.get(t.name + ".lora_b")
        if a is not None and b is not None:
            a, b = np.asarray(a.data, np.float32), np.asarray(b.data, np.float32)
            data += (scale * alpha / a.shape[0]) * (b @ a)  # llama.cpp's alpha / r, r = A's rows
        yield t.name, data.astype(np.float32 if data.ndim == 1 else np.float16)


def merged_tensors(base_path: str | Path, adapter_path: str | Path, scale: float = 1.0) -> dict[str, np.ndarray]:
    """`iter_merged` held in memory (small models, tests)."""
    return dict(iter_merged(base_path, adapter_path, scale))


def write_gguf_f16(base_path: str | Path, tensors, out_path: str | Path) -> dict:
    """Write `tensors` ((GGUF name, array) pairs or a dict, the base's tensors in its order) with the
    base's metadata, one tensor at a time; returns a small summary."""
    import gguf

    reader = check_base(base_path)
    arch = field_value(reader, "general.architecture")
    items = iter(tensors.items() if isinstance(tensors, dict) else tensors)
    writer = gguf.GGUFWriter(str(out_path), arch)
    written = 0
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
        for t in reader.tensors:  # the header is the base's shapes: matrices f16, 1-D f32
            shape = [int(x) for x in reversed(t.shape)]
            dtype = np.dtype(np.float32 if len(shape) == 1 else np.float16)
            writer.add_tensor_info(t.name, shape, dtype, int(np.prod(shape)) * dtype.itemsize)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t in reader.tensors:
            name, data = next(items, (None, None))
            shape = tuple(int(x) for x in reversed(t.shape))
            if name != t.name or data.shape != shape:
                raise BkdError(f"{out_path}: the merged tensors differ from the base's {base_path} (at {t.name})")
            writer.write_tensor_data(np.ascontiguousarray(data, np.float32 if data.ndim == 1 else np.float16))
            written += 1
        if next(items, None) is not None:
            raise BkdError(f"{out_path}: the merged tensors differ from the base's {base_path} (extra tensors)")
    finally:
        writer.close()
    return {"tensors": written, "kv_fields": len(reader.fields), "arch": arch}
