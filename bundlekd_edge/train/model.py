"""Loading a base (GGUF dequantised through transformers, or an HF folder) and greedy generation."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import BkdError
from ..data import Session
from ..metrics import Prediction, evaluate
from ..prompts import max_answer_tokens, parse_answer
from .sft import HFChatTokenizer, PromptMaker, answer_part, gguf_chat_tokenizer


@dataclass(frozen=True)
class Base:
    kind: str  # "gguf" or "hf"
    path: Path  # the .gguf file or the HF folder


def resolve_base(base: str) -> Base:
    if base == "default":
        from ..runtime.model_file import default_model_path

        return Base("gguf", default_model_path())
    from ..runtime.teacher_file import TEACHERS, teacher_path

    if base in TEACHERS:  # a pinned local model (qwen0.5b, qwen1.5b), assembled from PyPI once
        return Base("gguf", teacher_path(base))
    path = Path(base)
    if path.is_file():
        from ..runtime.model_file import check_gguf_magic

        return Base("gguf", check_gguf_magic(path))
    if path.is_dir():
        from ..export.model_folder import read_model_config

        read_model_config(path)  # untrusted: safetensors only, no custom code, sizes bounded
        return Base("hf", path)
    raise BkdError(f"{base}: no such base model ('default', a .gguf file or an HF model folder)")


def tokenizer_for(base: Base):
    return gguf_chat_tokenizer(base.path) if base.kind == "gguf" else HFChatTokenizer(base.path)


def pick_device(want: str = "auto") -> str:
    import torch

    if want == "cuda" and not torch.cuda.is_available():
        raise BkdError("device 'cuda' asked for, but torch sees no CUDA device")
    return "cuda" if want == "auto" and torch.cuda.is_available() else ("cpu" if want == "auto" else want)


def clear_gguf_quantizer(model) -> None:
    """A model loaded from GGUF carries a GGUF 'quantizer' although its weights are plain floats;
    saving or merging it then fails, so drop it."""
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def load_base_model(base: Base, dtype, device: str = "cpu", qlora: bool = False, compute_dtype=None):
    """The base as a float HF model (GGUF weights dequantised), or for QLoRA with its linear layers
    in 4-bit NF4 (bitsandbytes, on CUDA or on its CPU backend) computing in `compute_dtype`."""
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own progress bar is the one that matters
    if not qlora:
        model = _from_pretrained(base, base.path, dtype=dtype)
        if base.kind == "gguf":
            clear_gguf_quantizer(model)
        return model.to(device)
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise BkdError('QLoRA (qlora = true) needs bitsandbytes: pip install -e ".[train,qlora]"') from None
    from transformers import BitsAndBytesConfig

    quant = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype or torch.bfloat16
    )
    kwargs = {"dtype": dtype, "quantization_config": quant, "device_map": {"": 0 if device == "cuda" else device}}
    if base.kind == "hf":
        return _from_pretrained(base, base.path, **kwargs)
    # transformers quantises no GGUF file: the dequantised base goes through an HF folder first
    with tempfile.TemporaryDirectory(prefix="bkd-qlora-") as tmp:
        load_base_model(base, dtype).save_pretrained(tmp)
        return _from_pretrained(Base("hf", Path(tmp)), base.path, **kwargs)


def _from_pretrained(base: Base, name: Path, **kwargs):
    """transformers' model for the base; `name` is the base as the user gave it (for errors)."""
    from transformers import AutoModelForCausalLM

    gguf = {"gguf_file": base.path.name} if base.kind == "gguf" else {"use_safetensors": True}
    folder = base.path.parent if base.kind == "gguf" else base.path
    try:
        return AutoModelForCausalLM.from_pretrained(str(folder), **gguf, **kwargs)
    except (ValueError, OSError, KeyError, RuntimeError) as e:
        raise BkdError(f"{name}: transformers could not load this base ({type(e).__name__}: {e})") from None


def load_adapter(model, path: str | Path, base: Base, alpha: float) -> int:
    """Start a peft model from an adapter: a peft folder, or a GGUF adapter over `base` (what an
    export ships, checked against the base as the runtime checks it, q/k permuted back to HF's
    layout). Its alpha must be the recipe's (the same delta); returns how many tensors were set."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    path, wanted = Path(path), get_peft_model_state_dict(model)
    if path.is_dir():
        from safetensors.torch import load_file

        config = json.loads((path / "adapter_config.json").read_text())
        given, found = float(config["lora_alpha"]), load_file(str(path / "adapter_model.safetensors"))
    else:
        given, found = _gguf_adapter(path, base, list(wanted))
    if given != alpha:
        raise BkdError(f"init_adapter {path}: its alpha is {given:g}, the recipe's lora_alpha {alpha:g}")
    if set(found) != set(wanted) or any(found[k].shape != wanted[k].shape for k in wanted):
        raise BkdError(f"init_adapter {path}: its tensors do not match the recipe's LoRA (rank, target_modules)")
    set_peft_model_state_dict(model, found)
    return len(found)


def _gguf_adapter(path: Path, base: Base, keys: list[str]) -> tuple[float, dict]:
    """(alpha, peft state dict) of a GGUF LoRA adapter over the GGUF `base`."""
    import gguf
    import torch

    from ..export.gguf_write import PERMUTED_QK, arch_shape, check_base
    from ..export.lora_gguf import gguf_name, gguf_names
    from ..runtime.adapters import check_adapter

    if base.kind != "gguf":
        raise BkdError(f"init_adapter {path}: a GGUF adapter needs a GGUF base (the recipe's base is {base.path})")

    meta = arch_shape(check_base(base.path), base.path)  # read once per file (a 49k vocabulary takes seconds)
    arch = meta["arch"]
    alpha = check_adapter(path, base.path, model_arch=arch, shapes=False)["alpha"]
    arrays = {t.name: np.array(t.data, dtype=np.float32) for t in gguf.GGUFReader(path).tensors}
    names = gguf_names(arch, meta["n_blocks"])
    out = {}
    for key in keys:  # base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight
        hf_name, part = key.removeprefix("base_model.model.").rsplit(".lora_", 1)
        name = f"{gguf_name(names, hf_name + '.weight')}.lora_{part[0].lower()}"
        if name not in arrays:
            raise BkdError(f"init_adapter {path}: no tensor {name} for {key}")
        w = arrays[name]
        heads = meta["n_head"] if ".attn_q." in name else meta["n_kv"] if ".attn_k." in name else 0
        if arch in PERMUTED_QK and heads and part[0] == "B":  # llama.cpp's interleaved rotary rows back to HF's
            w = w.reshape(heads, w.shape[0] // heads // 2, 2, -1).swapaxes(1, 2).reshape(w.shape)
        out[key] = torch.from_numpy(np.ascontiguousarray(w))
    return alpha, out


def set_threads(n: int) -> None:
    import torch

    if n:
        torch.set_num_threads(n)
        os.environ.setdefault("OMP_NUM_THREADS", str(n))


def generate_answer(model, tok, prompt_ids: list[int], max_new_tokens: int, synced: bool = False) -> str:
    """Greedy continuation of the prompt, decoded (stops at the end-of-turn token). `synced`: every
    process generates together, each step until all have stopped (sharded weights need them all)."""
    import torch

    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids], device=device)
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=tok.eos_id,
            pad_token_id=tok.eos_id,
            synced_gpus=synced,
        )
    new = out[0, len(prompt_ids) :].tolist()
    if new and new[-1] == tok.eos_id:
        new = new[:-1]
    return tok.decode(new)


def line_logprobs(model, prompt_ids: list[int], lines_ids: list[list[int]]) -> list[float]:
    """log P(line | prompt) for each tokenized line (the runtime's `Engine.partition_logprobs`, in torch)."""
    import torch

    with torch.no_grad():
        return lines_logprob(model, prompt_ids, lines_ids).tolist()


def lines_logprob(model, prompt_ids: list[int], lines_ids: list[list[int]]):
    """log P(line | prompt) for each tokenized line, as a tensor that gradients flow through: the
    prompt is run once and its keys and values shared by every line (a prompt is ~15x a line)."""
    import torch

    device = next(model.parameters()).device
    k, width = len(lines_ids), max(len(ids) for ids in lines_ids)
    out = model(input_ids=torch.tensor([prompt_ids], device=device), use_cache=True)
    cache = out.past_key_values
    cache.batch_repeat_interleave(k)
    lines = torch.zeros((k, width), dtype=torch.long, device=device)
    mask = torch.zeros((k, len(prompt_ids) + width), dtype=torch.long, device=device)
    for i, ids in enumerate(lines_ids):
        lines[i, : len(ids)] = torch.tensor(ids)
        mask[i, : len(prompt_ids) + len(ids)] = 1
    logits = model(input_ids=lines, attention_mask=mask, past_key_values=cache, use_cache=True).logits
    # the prompt's last position predicts each line's first token; line position j predicts token j+1
    logprobs = torch.cat([out.logits[:, -1:].expand(k, 1, -1), logits[:, :-1]], dim=1).float().log_softmax(-1)
    picked = logprobs.gather(-1, lines[..., None])[..., 0]
    return (picked * (mask[:, len(prompt_ids) :] > 0)).sum(-1)


def rank_loss(model, example, temperature: float):
    """The listwise loss of one ranking example: cross-entropy of the candidate closest to the
    truth under the runtime's own weighing (the student's probabilities at `temperature`, times
    how many cuts gave each line: `runtime/choice.py`)."""
    import torch

    scores = lines_logprob(model, example.prompt_ids, example.lines_ids) / temperature
    scores = scores + torch.log(torch.tensor(example.counts, dtype=scores.dtype, device=scores.device))
    return -scores.log_softmax(-1)[example.best]


def score_model(
    model, tok, maker: PromptMaker, sessions: list[Session], max_tokens: int = 0, synced: bool = False
) -> dict:
    """Answer each session as the runtime does and score it (strict F1 ...): greedy under no
    grammar, or, for a compact student with a pack that offers candidate partitions, the candidate
    with the highest expected strict F1 under the model (the bundles only: no intents)."""
    from ..runtime.choice import choose_first_line

    was_training = model.training
    model.eval()
    config = maker.config
    preds, raws = {}, {}
    for s in sessions:
        prompt_ids = tok.prompt_ids(maker.messages(s))
        candidates = maker.pack.candidates(s) if maker.pack and config.answer_format == "compact" else []
        raw = choose_first_line(  # the runtime's choice, by the pack's rule
            candidates, maker.pack.choice if maker.pack else None, config,
            lambda lines, ids=prompt_ids: line_logprobs(model, ids, [tok.text_ids(line + "\n") for line in lines]),
            session=s,  # a learned rule reads the session's items (category purity)
        )  # fmt: skip
        if raw is None:
            cap = max_answer_tokens(len(s.items), config)
            raw = generate_answer(model, tok, prompt_ids, min(cap, max_tokens or cap), synced)
        parsed = parse_answer(answer_part(raw, config), s, config)
        preds[s.session_id] = Prediction(s.session_id, [b["items"] for b in parsed.bundles], parsed.valid)
        raws[s.session_id] = raw
    if was_training:
        model.train()
    return {"scores": evaluate(sessions, preds), "raw": raws}
