"""Write a peft LoRA adapter as a llama.cpp GGUF adapter over its base GGUF, any architecture.

llama.cpp applies the adapter at run time (`runtime/adapters.py`) to exactly the base weights the
trainer dequantised, so nothing is quantised twice and a shipped student is a few MB. The file:

    general.type = adapter, adapter.type = lora, adapter.lora.alpha   (what llama.cpp reads)
    bkd.base.name, bkd.base.sha256                                     (what our loader checks)
    blk.N.<tensor>.weight.lora_a  (r, in)    blk.N.<tensor>.weight.lora_b  (out, r)

HF module names become the base's tensor names through gguf-py's map for the base's architecture.
Where llama.cpp's converter permutes q/k rows (`gguf_write.PERMUTED_QK`), B of q/k is permuted the
same way: W + s*B*A, rows permuted, is permute(W) + s*permute(B)*A. rsLoRA's alpha/sqrt(r) is
written as the alpha llama.cpp divides by r. Works for an adapter from our `train` or any peft
trainer (Unsloth, LLaMA-Factory), with no torch.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from .. import BkdError
from ..files import cache_dir, sha256_file
from .gguf_write import PERMUTED_QK, arch_shape, check_base, model_arch, permute
from .model_folder import ADAPTER_CONFIG, ADAPTER_WEIGHTS, lora_pairs, lora_scaling, read_adapter_config

# Keys of the adapter file (llama.cpp's own, then ours).
KEY_TYPE = "general.type"
KEY_ADAPTER_TYPE = "adapter.type"
KEY_ALPHA = "adapter.lora.alpha"
KEY_BASE_NAME = "bkd.base.name"
KEY_BASE_SHA256 = "bkd.base.sha256"
KEY_RANK = "bkd.lora.rank"
TENSOR_TYPES = ("f16", "f32")


def gguf_names(arch: str, n_blocks: int):
    """gguf-py's map from HF module names to this architecture's GGUF tensor names."""
    import gguf

    return gguf.get_tensor_name_map(model_arch(arch, arch), n_blocks)


def gguf_name(names, hf_weight: str) -> str | None:
    """`model.layers.0.self_attn.q_proj.weight` -> `blk.0.attn_q.weight` (None when the arch has no such tensor)."""
    name = names.get_name(hf_weight, try_suffixes=(".weight",))
    return None if name is None else name if name.endswith(".weight") else name + ".weight"


def write_lora_gguf(base_path: str | Path, adapter_dir: str | Path, out_path: str | Path, dtype: str = "f16",
                    pin_base: bool = True) -> dict:  # fmt: skip
    """`adapter_dir` (peft: adapter_config.json + adapter_model.safetensors) -> GGUF adapter file over
    the GGUF `base_path`; refused with the reason when the adapter was made for another base.
    `pin_base`: record the base's sha256, which the runtime then insists on; off when `base_path`
    only stands for the base's layout (an HF base's merged conversion: same names and shapes)."""
    import gguf

    if dtype not in TENSOR_TYPES:
        raise BkdError(f"adapter tensor type {dtype!r} is not one of {', '.join(TENSOR_TYPES)}")
    base_path, adapter_dir = Path(base_path), Path(adapter_dir)
    base = arch_shape(check_base(base_path), base_path)
    config = read_adapter_config(adapter_dir)
    arch, shapes = base["arch"], base["shapes"]
    names = gguf_names(arch, base["n_blocks"])
    rank = int(config["r"])
    np_type = np.float16 if dtype == "f16" else np.float32
    made_for = config.get("base_model_name_or_path") or "another base"
    tensors, pairs = [], lora_pairs(adapter_dir)
    for hf_name, ab in sorted(pairs.items()):
        name = gguf_name(names, hf_name)
        if name is None or name not in shapes:
            raise BkdError(f"{adapter_dir}: adapter module {hf_name!r} has no tensor in the {arch} base "
                           f"{base_path.name} (made for {made_for}?)")  # fmt: skip
        a, b = ab["a"], ab["b"]
        out_dim, in_dim = shapes[name]
        if a.shape != (rank, in_dim) or b.shape != (out_dim, rank):
            raise BkdError(f"{adapter_dir}: LoRA pair of {hf_name} (A {a.shape}, B {b.shape}, rank {rank}) does not "
                           f"fit {name} {(out_dim, in_dim)} of {base_path.name} (made for {made_for}?)")  # fmt: skip
        if arch in PERMUTED_QK and name.endswith("attn_q.weight"):
            b = permute(b, base["n_head"])
        elif arch in PERMUTED_QK and name.endswith("attn_k.weight"):
            b = permute(b, base["n_kv"])
        tensors += [(name + ".lora_a", a.astype(np_type)), (name + ".lora_b", b.astype(np_type))]
    if not tensors:
        raise BkdError(f"{adapter_dir}: the adapter holds no LoRA tensors")
    alpha = lora_scaling(config) * rank  # llama.cpp scales B @ A by alpha / r

    base_sha256 = sha256_file(base_path) if pin_base else None
    out_path = Path(out_path)
    tmp = out_path.with_name(f".{out_path.name}.tmp")
    writer = gguf.GGUFWriter(str(tmp), arch)
    try:
        writer.add_string(KEY_TYPE, "adapter")
        writer.add_string(KEY_ADAPTER_TYPE, "lora")
        writer.add_float32(KEY_ALPHA, float(alpha))
        writer.add_uint32(KEY_RANK, rank)
        if pin_base:
            writer.add_string(KEY_BASE_NAME, base_path.name)
            writer.add_string(KEY_BASE_SHA256, base_sha256)
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
        "alpha": float(alpha),
        "tensors": len(tensors),
        "tensor_type": dtype,
        "target_modules": sorted({hf_name.rsplit(".", 2)[-2] for hf_name in pairs}),  # q_proj, ...
        "base": base_path.name,
        "base_sha256": base_sha256,
        "arch": arch,
    }


def cached_gguf_adapter(adapter_dir: str | Path, base_path: str | Path) -> Path:
    """`generate --adapter PEFT_DIR`: the peft folder as a GGUF adapter over `base_path`, converted
    once and cached under the sha256 of the adapter's two files and the base file's identity (path,
    size, modification time: a multi-GB base is not hashed at every start; the adapter pins its
    sha256, which the runtime checks as it loads)."""
    adapter_dir, base_path = Path(adapter_dir), Path(base_path).resolve()
    read_adapter_config(adapter_dir)  # refuse a hostile folder before hashing anything
    key = hashlib.sha256()
    for part in (adapter_dir / ADAPTER_CONFIG, adapter_dir / ADAPTER_WEIGHTS):
        key.update(sha256_file(part).encode())
    stat = base_path.stat()
    key.update(f"{base_path}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    out = cache_dir() / "adapters" / f"{key.hexdigest()[:24]}.gguf"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        write_lora_gguf(base_path, adapter_dir, out)
    return out
