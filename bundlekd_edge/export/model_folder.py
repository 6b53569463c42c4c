"""HF model folders and peft adapter folders from elsewhere, read as untrusted data.

What another trainer (peft, Unsloth, LLaMA-Factory) or a model hub leaves behind:

    model folder     config.json, model.safetensors (or shards + model.safetensors.index.json),
                     tokenizer files (tokenizer.json / tokenizer.model, tokenizer_config.json)
    adapter folder   adapter_config.json, adapter_model.safetensors

Both are refused, with the reason, when they would make us run something rather than read it:
pickle weights (`*.bin`, `*.pt`: unpickling runs code; we read safetensors only), custom code
(`auto_map`, `*.py`: transformers would import it with trust_remote_code), a file that is a link
leaving the folder, or config values out of any real model's range. Reading them needs neither
torch nor transformers: the safetensors header is JSON, the data raw little-endian arrays.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from .. import BkdError

MODEL_CONFIG, ADAPTER_CONFIG = "config.json", "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
# Bounds no real causal LM exceeds (the largest open models: hidden 16k-25k, 128-200 layers, 256k vocab).
CONFIG_BOUNDS = {
    "hidden_size": 65536, "num_hidden_layers": 1024, "num_attention_heads": 1024, "num_key_value_heads": 1024,
    "intermediate_size": 1 << 20, "vocab_size": 1 << 21, "head_dim": 4096, "max_position_embeddings": 1 << 24,
}  # fmt: skip
MAX_RANK = 1024
MAX_HEADER = 100 << 20  # a safetensors header is JSON: a few MB for the largest models
DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}  # BF16 read as its bits, widened below


def _files(folder: Path, what: str) -> list[Path]:
    """The folder's files, refusing links that leave it and pickle weights."""
    if not folder.is_dir():
        raise BkdError(f"{folder}: no such {what} folder")
    root, files = folder.resolve(), []
    for path in sorted(folder.rglob("*")):
        if path.is_symlink() and not path.resolve().is_relative_to(root):
            raise BkdError(f"{path}: a link leaving the {what} folder; refused")
        if path.is_file():
            files.append(path)
    return files


def read_json(path: Path, missing_ok: bool = False) -> dict:
    """A JSON object from a folder from elsewhere ({} for a missing file when `missing_ok`)."""
    if missing_ok and not path.is_file():
        return {}
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BkdError(f"{path}: not readable JSON ({type(e).__name__})") from None
    if not isinstance(obj, dict):
        raise BkdError(f"{path}: expected a JSON object")
    return obj


def _no_code(folder: Path, files: list[Path], configs: list[dict], what: str) -> None:
    if any(p.suffix == ".py" for p in files) or any("auto_map" in c for c in configs):
        raise BkdError(f"{folder}: this {what} brings its own code (auto_map / *.py); custom code is never run here "
                       "(no trust_remote_code): use a model of an architecture transformers ships")  # fmt: skip


def read_model_config(folder: str | Path) -> dict:
    """config.json of an HF causal-LM folder, checked: safetensors weights, no custom code, sizes bounded."""
    folder = Path(folder)
    files = _files(folder, "model")
    if not (folder / MODEL_CONFIG).is_file():
        raise BkdError(f"{folder}: not an HF model folder (no {MODEL_CONFIG})")
    config = read_json(folder / MODEL_CONFIG)
    tok_config = folder / "tokenizer_config.json"
    _no_code(folder, files, [config, read_json(tok_config, missing_ok=True)], "model")
    if not any(p.suffix == ".safetensors" for p in files):
        pickled = [p.name for p in files if p.suffix in PICKLE_SUFFIXES]
        why = f": {pickled[0]} is a pickle file, refused and never loaded (save with safetensors)" if pickled else ""
        raise BkdError(f"{folder}: no safetensors weights{why}")
    archs = config.get("architectures")
    if not (isinstance(archs, list) and len(archs) == 1 and isinstance(archs[0], str)):
        raise BkdError(f"{folder / MODEL_CONFIG}: 'architectures' must name one model class (e.g. Qwen2ForCausalLM)")
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    for key, bound in CONFIG_BOUNDS.items():
        for where, value in ((key, config.get(key)), (f"text_config.{key}", text.get(key))):
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= bound:
                raise BkdError(f"{folder / MODEL_CONFIG}: {where} = {value!r} is out of range (1..{bound})")
    return config


def read_adapter_config(folder: str | Path) -> dict:
    """adapter_config.json of a peft LoRA folder, checked (what llama.cpp adapters can hold)."""
    folder = Path(folder)
    files = _files(folder, "adapter")
    if not (folder / ADAPTER_CONFIG).is_file() or not (folder / ADAPTER_WEIGHTS).is_file():
        pickled = [p.name for p in files if p.suffix in PICKLE_SUFFIXES]
        hint = f" ({pickled[0]} is a pickle file: refused, never loaded; save with safetensors)" if pickled else ""
        raise BkdError(f"{folder}: not a peft adapter ({ADAPTER_CONFIG} and {ADAPTER_WEIGHTS} expected){hint}")
    config = read_json(folder / ADAPTER_CONFIG)
    _no_code(folder, files, [config], "adapter")
    if config.get("peft_type", "LORA") != "LORA":
        raise BkdError(f"{folder}: a {config.get('peft_type')} adapter; only LoRA adapters can be merged or run")
    if config.get("use_dora") or config.get("rank_pattern") or config.get("alpha_pattern"):
        raise BkdError(f"{folder}: DoRA and per-module ranks or alphas are not supported by llama.cpp adapters")
    if config.get("modules_to_save"):
        raise BkdError(f"{folder}: the adapter replaces whole modules ({config['modules_to_save']}); "
                       "llama.cpp adapters hold LoRA pairs only: merge it with peft first")  # fmt: skip
    r, alpha = config.get("r"), config.get("lora_alpha")
    if isinstance(r, bool) or not isinstance(r, int) or not 0 < r <= MAX_RANK:
        raise BkdError(f"{folder / ADAPTER_CONFIG}: r = {r!r} is not a rank in 1..{MAX_RANK}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha <= 4096:
        raise BkdError(f"{folder / ADAPTER_CONFIG}: lora_alpha = {alpha!r} is out of range (0, 4096]")
    return config


def lora_scaling(config: dict) -> float:
    """peft's multiplier of B @ A: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    r = config["r"]
    return config["lora_alpha"] / (r**0.5 if config.get("use_rslora") else r)


def lora_pairs(folder: str | Path) -> dict[str, dict[str, np.ndarray]]:
    """{HF module weight name: {"a": (r, in), "b": (out, r)}} of a peft adapter, float32.
    `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight` -> `model.layers.0.self_attn.q_proj.weight`."""
    folder = Path(folder)
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for key, array in read_safetensors(folder / ADAPTER_WEIGHTS).items():
        module, sep, part = key.removeprefix("base_model.model.").rpartition(".lora_")
        side = {"A.weight": "a", "B.weight": "b"}.get(part) if sep else None
        if side is None:
            raise BkdError(f"{folder}: tensor {key!r} is not a LoRA A/B weight (only LoRA pairs can be merged or run)")
        pairs.setdefault(module + ".weight", {})[side] = array
    for name, ab in pairs.items():
        a, b = ab.get("a"), ab.get("b")
        if a is None or b is None or a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise BkdError(f"{folder}: the LoRA pair of {name} is incomplete or its ranks differ")
    return pairs


def read_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    """A safetensors file as float32 numpy arrays (F32, F16, BF16), with no torch: bounded header,
    every tensor's bytes inside the file."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise BkdError(f"{path}: cannot read ({e.strerror})") from None
    if len(raw) < 8:
        raise BkdError(f"{path}: not a safetensors file (too short)")
    (n,) = struct.unpack("<Q", raw[:8])
    if n > min(MAX_HEADER, len(raw) - 8):
        raise BkdError(f"{path}: not a safetensors file (header of {n:,} bytes)")
    try:
        header = json.loads(raw[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise BkdError(f"{path}: not a safetensors file (header is not JSON)") from None
    data, out = memoryview(raw)[8 + n :], {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = DTYPES[info["dtype"]], [int(x) for x in info["shape"]], info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise BkdError(f"{path}: tensor {name!r} is not F32, F16 or BF16, or its entry is malformed") from None
        count = int(np.prod(shape))
        if not 0 <= start <= end <= len(data) or end - start != count * np.dtype(dtype).itemsize:
            raise BkdError(f"{path}: tensor {name!r} lies outside the file or has the wrong size (truncated?)")
        array = np.frombuffer(data[start:end], dtype=dtype).reshape(shape)
        if dtype is np.uint16:  # bfloat16: the high half of a float32
            array = (array.astype(np.uint32) << 16).view(np.float32)
        out[name] = array.astype(np.float32)
    return out
