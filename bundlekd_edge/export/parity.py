"""Parity gate: does each merged file of the export still behave like the trained student?

The reference is the LoRA adapter over the very base GGUF it was trained on, run by llama.cpp
(what `--adapter` and a shipped student run). On a golden set of val sessions each merged file
(the GGUF f16, each quant) is compared with it two ways:
  top-1 agreement   teacher-forced over the golden prompt and answer tokens: the share of positions
                    whose most likely next token is the same, among the positions where the reference
                    itself decides (its best token leads the next by at least `Gate.tie_logits`);
                    the answer's positions alone are reported beside it (`answer_top1`)
  identical bundles greedy generation (unconstrained on both sides, same token cap), parsed
                    with the output contract: the share of sessions with the same bundle sets
A stage below its thresholds fails the export, naming the stage.

Why the prompt's positions count too: a golden answer is ~20-50 tokens, so 8 sessions give ~25 decided
positions and one flip decides the gate (a correct one-step QLoRA export failed at 23 of 24). The
prompt's positions run through the same merged weights (a mis-permuted q/k or a wrong LoRA scale moves
them as much), so with them the gate judges hundreds of positions, not the luck of one near-tie.
For an HF base the reference is the merged model in torch (`torch_top1_and_generate`), fed the
converted GGUF's own tokens.

Why near-ties are set apart: the reference runs the adapter beside the quantised base's matmuls
(activations quantised to 8 bits), a merged F16 file runs plain F16 matmuls, so their logits differ
by up to ~0.5-0.9 at every position even when the weights agree exactly. Where the reference's top two
tokens are closer than that, which of them comes first is that rounding, not the export: measured on a
one-step adapter (LoRA and QLoRA alike), the only 2 of 28 positions that differed had reference margins
0.07 and 0.18, and cost 7% of top-1 agreement. Every position still counts in `top1_all`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import BkdError
from ..data import Session
from ..prompts import PromptConfig, max_answer_tokens, parse_answer, render_answer
from ..train.sft import answer_part


@dataclass(frozen=True)
class Gate:
    """Thresholds per stage kind (top-1 agreement, identical-bundle rate)."""

    f16_top1: float = 0.97
    f16_bundles: float = 0.75
    q8_top1: float = 0.93
    q8_bundles: float = 0.6
    quant_top1: float = 0.8  # below 8 bits
    quant_bundles: float = 0.5
    tie_logits: float = 0.25  # a position whose reference margin (top-1 minus top-2 logit) is below this is a near-tie

    def thresholds(self, stage: str) -> tuple[float, float]:
        if stage == "F16":
            return self.f16_top1, self.f16_bundles
        if stage == "Q8_0":
            return self.q8_top1, self.q8_bundles
        return self.quant_top1, self.quant_bundles


@dataclass
class Golden:
    session: Session
    prompt_ids: list[int]
    answer_ids: list[int]  # the golden answer, ending with the end-of-turn token
    max_tokens: int
    config: PromptConfig  # the answer format the student writes


def golden_set(sessions: list[Session], tok, maker, n: int, max_tokens: int = 0) -> list[Golden]:
    out = []
    for s in sessions[:n]:
        cap = max_answer_tokens(len(s.items), maker.config)
        cap = min(cap, max_tokens) if max_tokens else cap
        answer = tok.text_ids(render_answer(s, maker.config)) + [tok.eos_id]
        out.append(Golden(s, tok.prompt_ids(maker.messages(s)), answer, cap, maker.config))
    return out


@dataclass
class Answers:
    """One file's behaviour on the golden set: per session, the teacher-forced top-1 token and its
    margin over the second (logits) at each position of prompt and answer (position k predicts token
    k+1; the answer's start at `len(prompt_ids) - 1`), and the greedy answer's text."""

    top1: list[np.ndarray]
    margins: list[np.ndarray]
    texts: list[str]


def _top2(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Best token and its lead over the second, per row of logits."""
    part = np.partition(rows, -2, axis=-1)[:, -2:]
    return rows.argmax(-1), part[:, 1] - part[:, 0]


def gguf_top1_and_generate(path, golden: list[Golden], threads: int = 0, adapter=None, scale: float = 1.0) -> Answers:
    """Teacher-forced top-1 (with its margin) and greedy answers of a GGUF (with a LoRA adapter GGUF
    over it at `scale`, if given).

    Each golden session has its own sequence in one llama.cpp context. Its prompt and golden answer
    are evaluated alone (as the runtime evaluates a prompt, n_batch tokens a call), keeping the
    logits of every position; the cells past the prompt are then dropped and the greedy
    answers decode together, one token of every unfinished session per llama_decode (decoding is
    bound by reading the weights: 8 sessions a step cost little more than one).
    """
    from ..runtime.engine import default_threads
    from ..runtime.llamacpp import SequenceContext, load_adapter, load_model

    n_ctx = max(len(g.prompt_ids) + max(len(g.answer_ids), g.max_tokens) for g in golden) + 8
    n_batch = 512
    llm = load_model(path, 256, n_batch, threads or default_threads(), seed=0)  # its own context stays unused
    ctx = None
    try:
        handles = ((load_adapter(llm, adapter),), (scale,)) if adapter else ((), ())
        if adapter and not handles[0][0]:
            raise BkdError(f"{adapter}: llama.cpp could not load this adapter over {path}")
        ctx = SequenceContext(llm, n_ctx, len(golden), max(n_batch, len(golden)), handles)
        top1, margins = [], []
        for seq, g in enumerate(golden):
            tokens = g.prompt_ids + g.answer_ids
            best, margin = [], []
            for start in range(0, len(tokens) - 1, n_batch):  # the last token predicts nothing we score
                piece = tokens[start : min(start + n_batch, len(tokens) - 1)]
                ctx.decode([(seq, start + k, t, True) for k, t in enumerate(piece)])
                b, m = _top2(np.stack([ctx.logits(k) for k in range(len(piece))]))
                best.append(b)
                margin.append(m)
            top1.append(np.concatenate(best).astype(np.int64))
            margins.append(np.concatenate(margin).astype(np.float64))
            ctx.remove(seq, len(g.prompt_ids))  # generation starts after the prompt
        answers = {seq: [] for seq in range(len(golden))}
        # the first answer token is the argmax after the prompt: the first answer position
        pending = {seq: int(top1[seq][len(golden[seq].prompt_ids) - 1]) for seq in answers}
        while pending:
            live = []
            for seq, token in pending.items():
                if ctx.is_end(token):
                    continue
                answers[seq].append(token)
                if len(answers[seq]) < golden[seq].max_tokens:
                    live.append(seq)
            if not live:
                break
            ctx.decode([(seq, len(golden[seq].prompt_ids) + len(answers[seq]) - 1, answers[seq][-1], True)
                        for seq in live])  # fmt: skip
            pending = {seq: int(ctx.logits(k).argmax()) for k, seq in enumerate(live)}
        texts = [b"".join(ctx.piece(t) for t in answers[seq]).decode("utf-8", errors="replace") for seq in answers]
        return Answers(top1, margins, texts)
    finally:
        if ctx is not None:
            ctx.free()
        llm.close()


def torch_top1_and_generate(model_dir, golden: list[Golden], tok) -> Answers:
    """The same record of an HF model folder in torch (float32): the reference of an export from an
    HF base. `tok` is the converted GGUF's tokenizer: the golden tokens are the runtime's, and the
    greedy answers are decoded the way the runtime decodes them."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, use_safetensors=True)
    model.eval()
    eos = model.generation_config.eos_token_id
    stops = sorted({tok.eos_id, *([eos] if isinstance(eos, int) else eos or [])})
    top1, margins, texts = [], [], []
    with torch.no_grad():
        for g in golden:
            ids = torch.tensor([g.prompt_ids + g.answer_ids])
            best, margin = _top2(model(input_ids=ids).logits[0, :-1].float().numpy())
            top1.append(best.astype(np.int64))
            margins.append(margin.astype(np.float64))
            prompt = torch.tensor([g.prompt_ids])
            out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=g.max_tokens,
                                 do_sample=False, eos_token_id=stops, pad_token_id=stops[0])  # fmt: skip
            new = [t for t in out[0, len(g.prompt_ids) :].tolist() if t not in stops]
            texts.append(tok.decode(new))
    return Answers(top1, margins, texts)


def check_tokenizer(hf_dir, tok, gguf_path) -> dict:
    """What other exporters lose in conversion and users find as a GGUF that never stops or talks
    nonsense: the chat template, and the end-of-turn token the model was trained to write."""
    from pathlib import Path

    from .model_folder import MODEL_CONFIG, read_json

    hf_dir = Path(hf_dir)
    tok_config = read_json(hf_dir / "tokenizer_config.json", missing_ok=True)
    hf_template = bool(tok_config.get("chat_template")) or (hf_dir / "chat_template.jinja").is_file()
    gguf_template = bool(tok.llm.metadata.get("tokenizer.chat_template"))
    if hf_template and not gguf_template:
        raise BkdError(f"{gguf_path}: the chat template of {hf_dir} was lost in conversion")
    eos = set()
    for config in (read_json(hf_dir / MODEL_CONFIG), read_json(hf_dir / "generation_config.json", missing_ok=True)):
        value = config.get("eos_token_id")
        eos |= set(value) if isinstance(value, list) else {value} if isinstance(value, int) else set()
    if eos and tok.eos_id not in eos:
        raise BkdError(f"{gguf_path}: its end-of-turn token {tok.eos_id} is not the model's ({sorted(eos)}): "
                       "the converted model would not stop where the trained one does")  # fmt: skip
    return {"chat_template": gguf_template, "eos_token_id": tok.eos_id}


def bundle_sets(text: str, golden: Golden) -> frozenset:
    parsed = parse_answer(answer_part(text, golden.config), golden.session, golden.config)
    return frozenset(frozenset(b["items"]) for b in parsed.bundles)


def compare(stage: str, golden, ref: Answers, got: Answers, gate: Gate) -> dict:
    """`got` (a merged file) against `ref`: top-1 agreement where the reference decides, over prompt
    and answer positions (the gate) and over the answer's alone, and over every position
    (`top1_all`); identical bundle sets and texts of the greedy answers."""
    same = np.concatenate([a == b for a, b in zip(ref.top1, got.top1)])
    decides = np.concatenate(ref.margins) >= gate.tie_logits
    answer = np.concatenate([np.arange(len(t)) >= len(g.prompt_ids) - 1 for t, g in zip(ref.top1, golden)])
    counted = same[decides] if decides.any() else same  # nothing decided: every position counts
    in_answer = same[decides & answer] if (decides & answer).any() else same[answer]
    result = {
        "stage": stage,
        "top1_agreement": round(float(counted.mean()), 4) if len(counted) else 1.0,
        "answer_top1": round(float(in_answer.mean()), 4) if len(in_answer) else 1.0,
        "positions": int(decides.sum()),
        "answer_positions": int((decides & answer).sum()),
        "near_ties": int((~decides).sum()),
        "top1_all": round(float(same.mean()), 4) if len(same) else 1.0,
    }
    bundles = sum(bundle_sets(a, g) == bundle_sets(b, g) for g, a, b in zip(golden, ref.texts, got.texts))
    result["identical_bundles"] = round(bundles / len(golden), 4)
    result["identical_text"] = round(sum(a == b for a, b in zip(ref.texts, got.texts)) / len(golden), 4)
    min_top1, min_bundles = gate.thresholds(stage)
    result["min_top1"], result["min_bundles"] = min_top1, min_bundles
    result["passed"] = result["top1_agreement"] >= min_top1 and result.get("identical_bundles", 1.0) >= min_bundles
    return result


def check(results: list[dict]) -> None:
    """Fail loudly at the first stage that diverged."""
    for r in results:
        if not r["passed"]:
            raise BkdError(
                f"parity gate failed at stage {r['stage']}: top-1 agreement {r['top1_agreement']:.3f} "
                f"(min {r['min_top1']}), identical bundles {r.get('identical_bundles', 1.0):.3f} "
                f"(min {r['min_bundles']}) on {r['positions']} positions, {r['answer_positions']} of them in answers "
                f"({r['near_ties']} near-ties set apart)"
            )
