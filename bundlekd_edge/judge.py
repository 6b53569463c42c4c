"""An LLM judge of bundle names: how well each predicted intent names what its true bundle is for.

The pairs are those `metrics.intent_pairs` gives (the strict matching's predicted/true bundles).
Each distinct pair is one call to a teacher (`knowledge.teachers`: any OpenAI-compatible endpoint, or
a GGUF in this process) with the stated RUBRIC and a JSON schema for the answer, so calls are
cached and counted as distillation calls are. A missing predicted intent scores 0 without a call.
"""

from __future__ import annotations

import hashlib
import json

from .knowledge.teachers import Teacher

RUBRIC = (
    "You grade names of product bundles. A shopper bought the products of a bundle together; the "
    "reference name says what the bundle is for. Score the candidate name against the reference:\n"
    "2 = the same purpose (other wording and synonyms are fine)\n"
    "1 = related: broader, narrower or partly the same purpose\n"
    "0 = another purpose, or no meaningful name\n"
    'Answer with JSON only: {"score": 0, 1 or 2}.'
)
SCHEMA = {
    "type": "object",
    "properties": {"score": {"type": "integer", "enum": [0, 1, 2]}},
    "required": ["score"],
}


def judge_messages(predicted: str, true: str) -> list[dict]:
    return [
        {"role": "system", "content": RUBRIC},
        {"role": "user", "content": f"Reference: {json.dumps(true)}\nCandidate: {json.dumps(predicted)}"},
    ]


def parse_score(text: str) -> int | None:
    try:
        score = json.loads(text).get("score")
    except (json.JSONDecodeError, AttributeError):
        return None
    return score if score in (0, 1, 2) and not isinstance(score, bool) else None


def judge_intents(pairs: list[tuple[str, str]], teacher: Teacher, progress=None) -> dict:
    """Mean judge score over the pairs, scaled to 0..1 (2 = the same purpose); an answer that is not
    a score counts 0 and is reported as unparsed."""
    if not pairs:
        return {"intent_judge": 0.0, "intent_judge_pairs": 0}
    norm = [(" ".join(p.split()), " ".join(t.split())) for p, t in pairs]
    asked = sorted({pair for pair in norm if pair[0]})
    replies = teacher.map(
        [{"messages": judge_messages(p, t), "schema": SCHEMA, "max_tokens": 16} for p, t in asked], on_done=progress
    )
    scores = {pair: parse_score(r.text) for pair, r in zip(asked, replies)}
    total = sum(scores.get(pair) or 0 for pair in norm)
    return {
        "intent_judge": total / (2 * len(norm)),
        "intent_judge_pairs": len(norm),
        "intent_judge_unparsed": sum(v is None for v in scores.values()),
        "intent_judge_model": teacher.model,
        "intent_judge_rubric_sha256": hashlib.sha256(RUBRIC.encode()).hexdigest(),
        "intent_judge_calls": {"made": teacher.stats.made, "cached": teacher.stats.cached},
    }
