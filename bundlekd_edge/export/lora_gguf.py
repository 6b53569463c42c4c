"""Write a peft LoRA adapter as a llama.cpp GGUF adapter over its base GGUF.

llama.cpp applies the adapter at run time (`runtime/adapters.py`) to exactly the base weights the
trainer dequantised, so nothing is quantised twice and a shipped student is a few MB. The file:

    general.type = adapter, adapter.type = lora, adapter.lora.alpha   (what llama.cpp reads)
    bkd.base.name, bkd.base.sha256                                     (what our loader checks)
    blk.N.<tensor>.weight.lora_a  (r, in)    blk.N.<tensor>.weight.lora_b  (out, r)

transformers un-permutes q/k when it reads a GGUF, so B of q/k is permuted back the way the base
rows are (`gguf_write.permute`): W + s*B*A, rows permuted, is permute(W) + s*permute(B)*A.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .. import BkdError
from ..files import sha256_file
from .gguf_write import _field, check_base, permute

# Keys of the adapter file (llama.cpp's own, then ours).
KEY_TYPE = "general.type"
KEY_ADAPTER_TYPE = "adapter.type"
KEY_ALPHA = "adapter.lora.alpha"
KEY_BASE_NAME = "bkd.base.name"
KEY_BASE_SHA256 = "bkd.base.sha256"
KEY_RANK = "bkd.lora.rank"
TENSOR_TYPES = ("f16", "f32")


def _lora_weights(adapter_dir: Path) -> tuple[dict, dict[str, np.ndarray]]:
    config_path, weights_path = adapter_dir / "adapter_config.json", adapter_dir / "adapter_model.safetensors"
    if not config_path.is_file() or not weights_path.is_file():
        raise BkdError(f"{adapter_dir}: not a peft adapter (adapter_config.json / adapter_model.safetensors missing)")
    from safetensors.numpy import load_file

    return json.loads(config_path.read_text()), load_file(str(weights_path))


def write_lora_gguf(base_path: str | Path, adapter_dir: str | Path, out_path: str | Path, dtype: str = "f16") -> dict:
    """`adapter_dir` (peft: adapter_config.json + adapter_model.safetensors) -> GGUF adapter file."""
    import gguf

    if dtype not in TENSOR_TYPES:
        raise BkdError(f"adapter tensor type {dtype!r} is not one of {', '.join(TENSOR_TYPES)}")
    base_path, adapter_dir = Path(base_path), Path(adapter_dir)
    config, weights = _lora_weights(adapter_dir)
    if config.get("use_dora") or config.get("rank_pattern") or config.get("alpha_pattern"):
        raise BkdError(f"{adapter_dir}: DoRA and per-module ranks are not supported by llama.cpp adapters")
    reader = check_base(base_path)
    arch = _field(reader, "general.architecture")
    n_blocks = int(_field(reader, f"{arch}.block_count"))
    n_head = int(_field(reader, f"{arch}.attention.head_count"))
    n_kv = int(_field(reader, f"{arch}.attention.head_count_kv") or n_head)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_blocks)
    base_shapes = {t.name: tuple(int(x) for x in reversed(t.shape)) for t in reader.tensors}  # numpy order

    pairs: dict[str, dict[str, np.ndarray]] = {}
    for key, array in weights.items():
        # base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight -> model.layers.0.self_attn.q_proj
        hf_name, part = key.removeprefix("base_model.model.").rsplit(".lora_", 1)
        side = {"A.weight": "a", "B.weight": "b"}.get(part)
        name = names.get_name(hf_name + ".weight", try_suffixes=(".weight",))
        if side is None or name is None or name not in base_shapes:
            raise BkdError(f"{adapter_dir}: adapter tensor {key!r} has no tensor in the base GGUF {base_path.name}")
        pairs.setdefault(name, {})[side] = array.astype(np.float32)
    rank = int(config["r"])
    np_type = np.float16 if dtype == "f16" else np.float32
    tensors = []
    for name, ab in sorted(pairs.items()):
        a, b = ab.get("a"), ab.get("b")
        out_dim, in_dim = base_shapes[name]
        if a is None or b is None or a.shape != (rank, in_dim) or b.shape != (out_dim, rank):
            raise BkdError(f"{adapter_dir}: LoRA pair for {name} does not fit the base tensor ({out_dim}, {in_dim})")
        if name.endswith("attn_q.weight"):
            b = permute(b, n_head)
        elif name.endswith("attn_k.weight"):
            b = permute(b, n_kv)
        tensors += [(name + ".lora_a", a.astype(np_type)), (name + ".lora_b", b.astype(np_type))]

    out_path = Path(out_path)
    tmp = out_path.with_name(f".{out_path.name}.tmp")
    writer = gguf.GGUFWriter(str(tmp), arch)
    try:
        writer.add_string(KEY_TYPE, "adapter")
        writer.add_string(KEY_ADAPTER_TYPE, "lora")
        writer.add_float32(KEY_ALPHA, float(config["lora_alpha"]))
        writer.add_uint32(KEY_RANK, rank)
        writer.add_string(KEY_BASE_NAME, base_path.name)
        writer.add_string(KEY_BASE_SHA256, sha256_file(base_path))
        for name, data in tensors:
            writer.add_tensor(name, data)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    tmp.replace(out_path)
    return {
        "file": out_path.name,
        "bytes": out_path.stat().st_size,
        "rank": rank,
        "alpha": float(config["lora_alpha"]),
        "tensors": len(tensors),
        "tensor_type": dtype,
        "target_modules": sorted(config.get("target_modules") or []),
        "base": base_path.name,
    }
