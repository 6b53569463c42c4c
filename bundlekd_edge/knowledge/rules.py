"""Formalised rules by self-reflection (the paper's second knowledge format).

  1. the teacher generates bundles for sampled training sessions with the runtime's own prompt
     and bounded schema (what the student will be asked);
  2. each answer is scored against the ground truth with the strict metrics;
  3. per batch of sessions, the teacher sees its bundles next to the correct ones and writes
     explicit, general rules as JSON;
  4. rules from all batches are merged and deduplicated (normalised text, then near-duplicates
     by word overlap), keeping every source session and every call behind a rule.

Answers that are not valid JSON or name items outside the session are retried a bounded number
of times and then recorded as failures (see ask.py); no rule or bundle is ever made up.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from ..data import Session
from ..metrics import score_session
from ..prompts import TASK, PromptConfig, build_messages, item_title, max_answer_tokens, output_schema, parse_answer
from .ask import Outcome, ask_checked
from .store import Record
from .teachers import Teacher


@dataclass(frozen=True)
class RuleConfig:
    batch_size: int = 5  # sessions the teacher reflects on at once
    rules_per_batch: int = 5
    # One sentence: a longer rule is dropped. The answer's grammar allows twice this, room to end the
    # sentence; cut at the limit itself, a teacher went on in the next string ("...should be in ", "it is").
    rule_chars: int = 200
    attempts: int = 3  # per answer, then a failure
    reflect_max_tokens: int = 700
    title_chars: int = 80
    near_duplicate: float = 0.8  # word-set Jaccard at which two rules are the same rule


REFLECT_SYSTEM = (
    "You are an expert in shopping sessions and product bundles. You study where a bundle generator "
    "went wrong and write short, general rules that would have avoided the mistakes."
)


def check_bundles(session: Session, text: str):
    """(bundles, "") for a valid answer naming only this session's items, else (None, why)."""
    parsed = parse_answer(text, session)
    if not parsed.valid:
        return None, parsed.error
    n = len(session.items)
    numbers = [x for b in json.loads(text)["bundles"] for x in b["items"]]
    unknown = [x for x in numbers if not (isinstance(x, int) and 1 <= x <= n)]
    if unknown:  # a repeated item is only dropped by the parser; an item that does not exist is a wrong answer
        return None, f"names item(s) {', '.join(map(str, unknown[:5]))} not in the session (1..{n})"
    return parsed.bundles, ""


def _bundle_line(session: Session, bundles) -> str:
    index = {iid: i for i, iid in enumerate(session.item_ids(), 1)}
    parts = []
    for b in bundles:
        items, intent = (b["items"], b.get("intent", "")) if isinstance(b, dict) else (b.items, b.intent)
        parts.append(f"{sorted(index[x] for x in items)} {json.dumps(intent or '')}")
    return "; ".join(parts) or "(none)"


def reflection_messages(batch: list[tuple[Session, list[dict], dict]], config: RuleConfig) -> list[dict]:
    blocks = []
    for k, (s, predicted, scores) in enumerate(batch, 1):
        items = "\n".join(f"{i}. {item_title(it.title, config.title_chars)}" for i, it in enumerate(s.items, 1))
        sp, sr = scores["strict_precision"], scores["strict_recall"]
        f1 = 2 * sp * sr / (sp + sr) if sp + sr else 0.0
        blocks.append(
            f"Session {k}:\n{items}\nYour bundles: {_bundle_line(s, predicted)}\n"
            f"Correct bundles: {_bundle_line(s, s.bundles)}\nScore (strict F1): {f1:.2f}"
        )
    user = (
        f"The task: {TASK}\n\nFor each session below you see your bundles and the correct bundles "
        "(item numbers, then the intent).\n\n" + "\n\n".join(blocks) + "\n\n"
        f"Write at most {config.rules_per_batch} general rules, one sentence each, about which kinds of products "
        "belong in one bundle and which do not, that would turn your bundles into the correct ones. Speak of "
        'product types, never of item numbers or these particular sessions. Answer with JSON only: {"rules": ["..."]}'
    )
    return [{"role": "system", "content": REFLECT_SYSTEM}, {"role": "user", "content": user}]


def rules_schema(config: RuleConfig) -> dict:
    return {
        "type": "object",
        "properties": {
            "rules": {
                "type": "array",
                "items": {"type": "string", "minLength": 10, "maxLength": 2 * config.rule_chars},
                "minItems": 1,
                "maxItems": config.rules_per_batch,
            }
        },
        "required": ["rules"],
        "additionalProperties": False,
    }


def check_rules(text: str, max_chars: int = RuleConfig.rule_chars):
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        return None, f"not valid JSON: {e.msg} at column {e.colno}"
    if not isinstance(obj, dict) or not isinstance(obj.get("rules"), list):
        return None, 'expected an object with a "rules" list'
    rules = [" ".join(r.split()) for r in obj["rules"] if isinstance(r, str) and is_prose(r)]
    rules = [r for r in rules if len(r) <= max_chars]
    return (rules, "") if rules else (None, f"no rule in the answer (a rule is 3 words to {max_chars} characters)")


def is_prose(text: str, words: int = 3) -> bool:
    """At least `words` words of letters: keeps "1.1.1.1" and "MENU_1" out of the knowledge."""
    return len(re.findall(r"[A-Za-z]{2,}", text)) >= words


def _norm(text: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9 ]+", " ", text.lower()).split())


def merge_rules(found: list[tuple[str, list[str], list[str]]], near: float = 0.8) -> list[tuple[str, list, list]]:
    """(text, session ids, call keys) merged: equal after normalising, or word sets overlapping >= `near`."""
    merged: list[tuple[str, list, list, set]] = []
    for text, sids, keys in found:
        words = set(_norm(text).split())
        for i, (t, s, k, w) in enumerate(merged):
            if _norm(t) == _norm(text) or (words and len(words & w) / len(words | w) >= near):
                merged[i] = (t, list(dict.fromkeys(s + sids)), list(dict.fromkeys(k + keys)), w)
                break
        else:
            merged.append((text, list(sids), list(keys), words))
    return [(t, s, k) for t, s, k, _ in merged]


def teacher_answers(
    teacher: Teacher, sessions: list[Session], attempts: int = 3, prompt: PromptConfig = PromptConfig(), progress=None
) -> tuple[list[tuple[Session, Outcome, dict]], list[dict]]:
    """The teacher answers each session with the runtime's prompt; each answer is scored.

    Returns (session, outcome, strict scores) for the answered sessions, and the failures. The
    calls are cached, so difficulty sampling and rule distillation share them.
    """
    gen_requests = [
        {
            "messages": build_messages(s, prompt),
            "schema": output_schema(len(s.items), prompt),
            "max_tokens": max_answer_tokens(len(s.items), prompt),
        }
        for s in sessions
    ]
    generated = ask_checked(
        teacher, gen_requests, lambda i, text: check_bundles(sessions[i], text), attempts, on_done=progress
    )
    failures, scored = [], []
    for s, out in zip(sessions, generated):
        if not out.ok:
            failures.append({"stage": "rules/generate", "session_ids": [s.session_id], "errors": out.errors})
            continue
        predicted = [frozenset(b["items"]) for b in out.value]
        scored.append((s, out, score_session(predicted, [frozenset(b.items) for b in s.bundles])))
    return scored, failures


def teacher_errors(teacher: Teacher, sessions: list[Session], attempts: int = 3, progress=None) -> list[float]:
    """Per session, 1 - the strict F1 of the teacher's own answer (1.0 when it gave none)."""
    scored, _ = teacher_answers(teacher, sessions, attempts, progress=progress)
    f1 = {}
    for s, _, sc in scored:
        p, r = sc["strict_precision"], sc["strict_recall"]
        f1[s.session_id] = 2 * p * r / (p + r) if p + r else 0.0
    return [1.0 - f1.get(s.session_id, 0.0) for s in sessions]


def distill_rules(
    teacher: Teacher,
    sessions: list[Session],
    config: RuleConfig = RuleConfig(),
    prompt: PromptConfig = PromptConfig(),
    progress=None,
) -> tuple[list[Record], list[dict], dict]:
    """Rule records, failures ([{"stage", "session_ids", "errors"}]) and scores of the teacher's own bundles."""
    scored, failures = teacher_answers(teacher, sessions, config.attempts, prompt, progress)

    batches = [scored[i : i + config.batch_size] for i in range(0, len(scored), config.batch_size)]
    reflect_requests = [
        {
            "messages": reflection_messages([(s, out.value, sc) for s, out, sc in batch], config),
            "schema": rules_schema(config),
            "max_tokens": config.reflect_max_tokens,
        }
        for batch in batches
    ]
    reflected = ask_checked(
        teacher,
        reflect_requests,
        lambda i, text: check_rules(text, config.rule_chars),
        config.attempts,
        on_done=progress,
    )
    found = []
    for batch, out in zip(batches, reflected):
        sids = [s.session_id for s, _, _ in batch]
        if not out.ok:
            failures.append({"stage": "rules/reflect", "session_ids": sids, "errors": out.errors})
            continue
        keys = [k for _, g, _ in batch for k in g.keys] + out.keys
        found += [(text, sids, keys) for text in out.value]

    records = [
        Record("rule", text, sids, "rules", teacher.model, keys)
        for text, sids, keys in merge_rules(found, config.near_duplicate)
    ]
    n = len(scored)
    teacher_scores = {
        "sessions_scored": n,
        "strict_precision": sum(sc["strict_precision"] for _, _, sc in scored) / n if n else 0.0,
        "strict_recall": sum(sc["strict_recall"] for _, _, sc in scored) / n if n else 0.0,
        "exact_match": sum(sc["exact_match"] for _, _, sc in scored) / n if n else 0.0,
        "rules_before_merge": len(found),
    }
    return records, failures, teacher_scores
