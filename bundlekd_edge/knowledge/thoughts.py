"""Deep thoughts (the paper's third knowledge format): per training session, the teacher explains
why each ground-truth bundle is a bundle. One record per session; the pack shows it under the
session's bundles as "Why: ...".
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from ..data import Session
from ..prompts import item_title
from .ask import ask_checked
from .rules import is_prose
from .store import Record
from .teachers import Teacher


@dataclass(frozen=True)
class ThoughtConfig:
    why_chars: int = 240  # per bundle: one or two sentences
    attempts: int = 3
    title_chars: int = 100


THOUGHT_SYSTEM = "You are an expert in shopping sessions. You explain why products are bought together."


def thought_messages(session: Session, config: ThoughtConfig) -> list[dict]:
    index = {iid: i for i, iid in enumerate(session.item_ids(), 1)}
    items = "\n".join(f"{i}. {item_title(it.title, config.title_chars)}" for i, it in enumerate(session.items, 1))
    bundles = "\n".join(
        f"Bundle {k} ({b.intent or 'no intent given'}): items {', '.join(str(index[x]) for x in b.items)}"
        for k, b in enumerate(session.bundles, 1)
    )
    user = (
        f"Session items:\n{items}\n\nThe shopper's bundles:\n{bundles}\n\n"
        "For each bundle, explain in one or two sentences why these items belong together: what need they "
        "serve together, and why the other items of the session are not part of it. "
        'Answer with JSON only: {"thoughts": [{"bundle": 1, "why": "..."}]}'
    )
    return [{"role": "system", "content": THOUGHT_SYSTEM}, {"role": "user", "content": user}]


def thought_schema(n_bundles: int, config: ThoughtConfig) -> dict:
    entry = {
        "type": "object",
        "properties": {
            "bundle": {"type": "integer", "enum": list(range(1, n_bundles + 1))},
            "why": {"type": "string", "minLength": 10, "maxLength": config.why_chars},
        },
        "required": ["bundle", "why"],
        "additionalProperties": False,
    }
    return {
        "type": "object",
        "properties": {"thoughts": {"type": "array", "items": entry, "minItems": n_bundles, "maxItems": n_bundles}},
        "required": ["thoughts"],
        "additionalProperties": False,
    }


def check_thoughts(session: Session, text: str):
    """({bundle number: why}, "") when every bundle is explained exactly once, else (None, why not)."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        return None, f"not valid JSON: {e.msg} at column {e.colno}"
    if not isinstance(obj, dict) or not isinstance(obj.get("thoughts"), list):
        return None, 'expected an object with a "thoughts" list'
    n = len(session.bundles)
    out = {}
    for t in obj["thoughts"]:
        if not isinstance(t, dict) or not isinstance(t.get("why"), str):
            return None, 'each thought needs a "bundle" number and a "why" text'
        if not is_prose(t["why"]):
            return None, f"the explanation {t['why'][:40]!r} is not a sentence (needs at least 3 words)"
        k = t.get("bundle")
        if not isinstance(k, int) or not 1 <= k <= n:
            return None, f"names bundle {k!r}; the session has bundles 1..{n}"
        if k in out:
            return None, f"explains bundle {k} twice"
        out[k] = " ".join(t["why"].split())
    if len(out) != n:
        return None, f"explains {len(out)} of {n} bundles"
    return out, ""


def distill_thoughts(
    teacher: Teacher, sessions: list[Session], config: ThoughtConfig = ThoughtConfig(), progress=None
) -> tuple[list[Record], list[dict]]:
    requests = [
        {
            "messages": thought_messages(s, config),
            "schema": thought_schema(len(s.bundles), config),
            "max_tokens": 40 + len(s.bundles) * (config.why_chars + 20),
        }
        for s in sessions
    ]
    outcomes = ask_checked(
        teacher, requests, lambda i, text: check_thoughts(sessions[i], text), config.attempts, on_done=progress
    )
    records, failures = [], []
    for s, out in zip(sessions, outcomes):
        if not out.ok:
            failures.append({"stage": "thoughts", "session_ids": [s.session_id], "errors": out.errors})
            continue
        parts = [f"{s.bundles[k - 1].intent or f'Bundle {k}'}: {why}" for k, why in sorted(out.value.items())]
        whys = [out.value[k] for k in sorted(out.value)]
        records.append(Record("thought", "; ".join(parts), [s.session_id], "thoughts", teacher.model, out.keys,
                              {"bundle_thoughts": whys}))  # fmt: skip
    return records, failures
