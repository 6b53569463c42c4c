"""Merge a peft LoRA adapter into an HF model folder, one safetensors shard at a time.

W + alpha/r * B @ A (alpha/sqrt(r) with rsLoRA), what peft's `merge_and_unload` computes, done on
the files rather than on a loaded model: each shard is read, its adapted matrices merged in float32
and cast back to the shard's dtype, and written under the same name; the index, config and tokenizer
files are copied. Memory holds one shard (<= 5 GB in hub checkpoints), whatever the model's size.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from .. import BkdError
from .model_folder import PICKLE_SUFFIXES, lora_pairs, lora_scaling, read_adapter_config, read_model_config


def merge_hf(base_dir: str | Path, adapter_dir: str | Path, out_dir: str | Path, log=None) -> dict:
    """Write `out_dir`: the HF model `base_dir` with the peft adapter `adapter_dir` merged in."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    base_dir, adapter_dir, out_dir = Path(base_dir), Path(adapter_dir), Path(out_dir)
    read_model_config(base_dir)
    config = read_adapter_config(adapter_dir)
    if config.get("fan_in_fan_out"):
        raise BkdError(f"{adapter_dir}: fan_in_fan_out adapters (GPT-2 style Conv1D) are not supported")
    pairs, scaling = lora_pairs(adapter_dir), lora_scaling(config)
    out_dir.mkdir(parents=True)
    merged = 0
    for path in sorted(base_dir.iterdir()):
        if path.suffix == ".safetensors":
            tensors = {}
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    w = f.get_tensor(name)
                    ab = pairs.pop(name, None)
                    if ab is not None:
                        delta = torch.from_numpy(ab["b"]) @ torch.from_numpy(ab["a"])
                        if delta.shape != w.shape:
                            raise BkdError(f"{adapter_dir}: the LoRA pair of {name} gives {tuple(delta.shape)}, the "
                                           f"base's weight is {tuple(w.shape)} (made for another base?)")  # fmt: skip
                        w = (w.float() + scaling * delta).to(w.dtype)
                        merged += 1
                    tensors[name] = w.contiguous()
            save_file(tensors, str(out_dir / path.name), metadata={"format": "pt"})
            if log:
                log(f"merged {path.name}")
        elif path.is_file() and path.suffix not in PICKLE_SUFFIXES and path.suffix != ".py":
            shutil.copy2(path, out_dir / path.name)
    if pairs:
        made_for = config.get("base_model_name_or_path") or "another base"
        raise BkdError(f"{adapter_dir}: adapter modules with no weight in {base_dir}: {sorted(pairs)[:3]} "
                       f"(made for {made_for}?)")  # fmt: skip
    return {"merged_tensors": merged, "rank": config["r"], "scaling": scaling}
