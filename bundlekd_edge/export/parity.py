"""Parity gate: does each merged file of the export still behave like the trained student?

The reference is the LoRA adapter over the very base GGUF it was trained on, run by llama.cpp
(what `--adapter` and a shipped student run). On a golden set of val sessions each merged file
(the GGUF f16, each quant) is compared with it two ways:
  top-1 agreement   teacher-forced over the golden answer tokens: the share of positions whose
                    most likely next token is the same, among the positions where the reference
                    itself decides (its best token leads the next by at least `Gate.tie_logits`)
  identical bundles greedy generation (unconstrained on both sides, same token cap), parsed
                    with the output contract: the share of sessions with the same bundle sets
A stage below its thresholds fails the export, naming the stage.

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
    margin over the second (logits) at each answer position, and the greedy answer's text."""

    top1: list[np.ndarray]
    margins: list[np.ndarray]
    texts: list[str]


def gguf_top1_and_generate(path, golden: list[Golden], threads: int = 0, adapter=None, scale: float = 1.0) -> Answers:
    """Teacher-forced top-1 (with its margin) and greedy answers of a GGUF (with a LoRA adapter GGUF
    over it at `scale`, if given).

    Each golden session has its own sequence in one llama.cpp context. Its prompt and golden answer
    are evaluated alone (as the runtime evaluates a prompt, n_batch tokens a call), keeping the
    logits of the answer positions only; the cells past the prompt are then dropped and the greedy
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
            tokens, first = g.prompt_ids + g.answer_ids, len(g.prompt_ids) - 1
            wanted = range(first, first + len(g.answer_ids))
            best, margin = [], []
            for start in range(0, len(tokens), n_batch):
                piece = tokens[start : start + n_batch]
                chunk = [(seq, start + k, t, start + k in wanted) for k, t in enumerate(piece)]
                ctx.decode(chunk)
                for row in (ctx.logits(k) for k, entry in enumerate(chunk) if entry[3]):
                    second, top = np.partition(row, -2)[-2:]
                    best.append(int(row.argmax()))
                    margin.append(float(top - second))
            top1.append(np.asarray(best, dtype=np.int64))
            margins.append(np.asarray(margin))
            ctx.remove(seq, len(g.prompt_ids))  # generation starts after the prompt
        answers = {seq: [] for seq in range(len(golden))}
        # the first answer token is the argmax after the prompt: the first teacher-forced position
        pending = {seq: int(top1[seq][0]) for seq in answers}
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


def bundle_sets(text: str, golden: Golden) -> frozenset:
    parsed = parse_answer(answer_part(text, golden.config), golden.session, golden.config)
    return frozenset(frozenset(b["items"]) for b in parsed.bundles)


def compare(stage: str, golden, ref: Answers, got: Answers, gate: Gate) -> dict:
    """`got` (a merged file) against `ref`: top-1 agreement where the reference decides, and over
    every position (`top1_all`); identical bundle sets and texts of the greedy answers."""
    same = np.concatenate([a == b for a, b in zip(ref.top1, got.top1)]) if ref.top1 else np.zeros(0, bool)
    decides = np.concatenate(ref.margins) >= gate.tie_logits if ref.margins else np.zeros(0, bool)
    counted = same[decides] if decides.any() else same  # nothing decided: every position counts
    result = {
        "stage": stage,
        "top1_agreement": round(float(counted.mean()), 4) if len(counted) else 1.0,
        "positions": int(decides.sum()),
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
                f"(min {r['min_bundles']}) on {r['positions']} answer positions ({r['near_ties']} near-ties set apart)"
            )
