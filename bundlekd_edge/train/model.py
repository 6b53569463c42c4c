"""Loading a base (GGUF dequantised through transformers, or an HF folder) and greedy generation."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

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
    path = Path(base)
    if path.is_file():
        from ..runtime.model_file import check_gguf_magic

        return Base("gguf", check_gguf_magic(path))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise BkdError(f"{path}: not an HF model folder (no config.json)")
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

    gguf = {"gguf_file": base.path.name} if base.kind == "gguf" else {}
    folder = base.path.parent if base.kind == "gguf" else base.path
    try:
        return AutoModelForCausalLM.from_pretrained(str(folder), **gguf, **kwargs)
    except (ValueError, OSError, KeyError, RuntimeError) as e:
        raise BkdError(f"{name}: transformers could not load this base ({type(e).__name__}: {e})") from None


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
    """log P(line | prompt) for each tokenized line, one batched forward pass (the runtime's
    `Engine.partition_logprobs`, in torch)."""
    import torch

    device = next(model.parameters()).device
    n = len(prompt_ids)
    width = n + max(len(ids) for ids in lines_ids)
    batch = torch.zeros((len(lines_ids), width), dtype=torch.long, device=device)
    mask = torch.zeros_like(batch)
    for i, ids in enumerate(lines_ids):
        batch[i, : n + len(ids)] = torch.tensor(prompt_ids + ids)
        mask[i, : n + len(ids)] = 1
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=batch, attention_mask=mask).logits.float(), dim=-1)
    return [float(sum(logprobs[i, n - 1 + j, t] for j, t in enumerate(ids))) for i, ids in enumerate(lines_ids)]


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
