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
    path, golden: list[Golden], threads: int = 0, adapter=None
) -> tuple[list[np.ndarray], list[str]]:
    """Teacher-forced top-1 and greedy answers of a GGUF (with a LoRA adapter GGUF over it, if given)."""
    from ..runtime.engine import default_threads
    from ..runtime.llamacpp import load_for_scoring

    n_ctx = max(len(g.prompt_ids) + max(len(g.answer_ids), g.max_tokens) for g in golden) + 8
    llm = load_for_scoring(path, n_ctx, threads or default_threads(), lora_path=adapter)
    try:
        top1, texts = [], []
        for g in golden:
            llm.reset()
            llm.eval(g.prompt_ids + g.answer_ids)
            start = len(g.prompt_ids) - 1
            top1.append(np.asarray(llm.scores[start : start + len(g.answer_ids)]).argmax(-1))
            # no reset: the prompt's KV state is reused (llama-cpp-python matches the longest token prefix)
            done = llm.create_completion(g.prompt_ids, max_tokens=g.max_tokens, temperature=0.0, repeat_penalty=1.0)
            texts.append(done["choices"][0]["text"])
        return top1, texts
    finally:
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
