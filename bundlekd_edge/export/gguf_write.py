"""Write a merged llama-arch HF model as a GGUF f16 file that is a twin of its base GGUF.

Every metadata field (tokenizer, chat template, rope settings ...) is copied from the base GGUF,
so llama.cpp sees the same model with new weights. transformers un-permutes q/k when it reads a
GGUF (llama.cpp stores rotary pairs interleaved, HF as rotate-half), so we permute them back;
k uses the number of kv heads.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .. import BkdError

SUPPORTED_ARCHS = ("llama",)
FTYPE_F16 = 1  # llama_ftype LLAMA_FTYPE_MOSTLY_F16


def _field(reader, key: str):
    f = reader.fields.get(key)
    return None if f is None else f.contents()


def check_base(path: str | Path):
    """The base GGUF's reader, or a clear error when the writer cannot handle its architecture."""
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


def gguf_tensors(reader, state_dict: dict) -> dict[str, np.ndarray]:
    """HF state dict -> {gguf name: array}: f16 matrices, f32 1-D norms, q/k re-permuted."""
    import gguf

    arch = _field(reader, "general.architecture")
    n_blocks = int(_field(reader, f"{arch}.block_count"))
    n_head = int(_field(reader, f"{arch}.attention.head_count"))
    n_kv = int(_field(reader, f"{arch}.attention.head_count_kv") or n_head)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_blocks)
    base_names = {t.name for t in reader.tensors}
    out = {}
    for hf_name, tensor in state_dict.items():
        if "rotary_emb" in hf_name:
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise BkdError(f"merged model tensor {hf_name!r} has no GGUF name for arch {arch!r}")
        if name not in base_names and name == "output.weight":
            continue  # tied embeddings: the base has no output.weight, llama.cpp reuses token_embd
        data = tensor.detach().float().cpu().numpy()
        if name.endswith("attn_q.weight"):
            data = permute(data, n_head)
        elif name.endswith("attn_k.weight"):
            data = permute(data, n_kv)
        out[name] = data.astype(np.float32 if data.ndim == 1 else np.float16)
    missing, extra = base_names - set(out), set(out) - base_names
    if missing or extra:
        raise BkdError(
            f"merged model and base GGUF disagree on tensors: missing {sorted(missing)[:5]}, extra {sorted(extra)[:5]}"
        )
    return out


def write_gguf_f16(base_path: str | Path, state_dict: dict, out_path: str | Path) -> dict:
    """Write the merged weights with the base's metadata; returns a small summary."""
    import gguf

    reader = check_base(base_path)
    arch = _field(reader, "general.architecture")
    tensors = gguf_tensors(reader, state_dict)
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
