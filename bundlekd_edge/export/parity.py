"""Parity gate: does each merged file of the export still behave like the trained student?

The reference is the LoRA adapter over the very base GGUF it was trained on, run by llama.cpp
(what `--adapter` and a shipped student run). On a golden set of val sessions each merged file
(the GGUF f16, each quant) is compared with it two ways:
  top-1 agreement   teacher-forced over the golden answer tokens: the share of positions whose
                    most likely next token is the same
  identical bundles greedy generation (unconstrained on both sides, same token cap), parsed
                    with the output contract: the share of sessions with the same bundle sets
A stage below its thresholds fails the export, naming the stage.
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


def gguf_top1_and_generate(
    path, golden: list[Golden], threads: int = 0, adapter=None, scale: float = 1.0
) -> tuple[list[np.ndarray], list[str]]:
    """Teacher-forced top-1 and greedy answers of a GGUF (with a LoRA adapter GGUF over it at
    `scale`, if given).

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
        top1 = []
        for seq, g in enumerate(golden):
            tokens, first = g.prompt_ids + g.answer_ids, len(g.prompt_ids) - 1
            wanted = range(first, first + len(g.answer_ids))
            rows = []
            for start in range(0, len(tokens), n_batch):
                piece = tokens[start : start + n_batch]
                chunk = [(seq, start + k, t, start + k in wanted) for k, t in enumerate(piece)]
                ctx.decode(chunk)
                rows += [int(ctx.logits(k).argmax()) for k, entry in enumerate(chunk) if entry[3]]
            top1.append(np.asarray(rows))
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
        return top1, texts
    finally:
        if ctx is not None:
            ctx.free()
        llm.close()


def bundle_sets(text: str, golden: Golden) -> frozenset:
    parsed = parse_answer(answer_part(text, golden.config), golden.session, golden.config)
    return frozenset(frozenset(b["items"]) for b in parsed.bundles)


def compare(stage: str, golden, ref_top1, ref_texts, top1, texts, gate: Gate) -> dict:
    agree = sum(int((a == b).sum()) for a, b in zip(ref_top1, top1))
    total = sum(len(a) for a in ref_top1)
    result = {"stage": stage, "top1_agreement": round(agree / total, 4) if total else 1.0, "positions": total}
    if texts is not None:
        same = sum(bundle_sets(a, g) == bundle_sets(b, g) for g, a, b in zip(golden, ref_texts, texts))
        result["identical_bundles"] = round(same / len(golden), 4)
        result["identical_text"] = round(sum(a == b for a, b in zip(ref_texts, texts)) / len(golden), 4)
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
                f"(min {r['min_bundles']}) on {r['positions']} answer positions"
            )
