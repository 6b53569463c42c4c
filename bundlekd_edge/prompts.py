"""The generation prompt, the bounded output schema, and the parser of the model's answer.

The model sees the session's items numbered 1..N and answers with item *numbers*, never ids:
numbers are a few tokens each and the schema can pin them to 1..N, so the runtime cannot
hallucinate an item. The same builder serves training (issue: SFT data) and inference, so
training tokens equal inference tokens.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass

from .data import Session

SYSTEM = "You are a shopping assistant. You find product bundles in a shopper's session."

TASK = (
    "A bundle is a set of 2 or more items from this session that a shopper would buy together "
    "for one purpose: complementary products or alternatives for the same need. "
    "Items that fit no bundle are left out."
)

CONTRACT = (
    'Answer with JSON only: {"bundles": [{"items": [...], "intent": "..."}]} where "items" lists '
    'the item numbers of one bundle and "intent" names its purpose in 3-5 words.'
)


@dataclass(frozen=True)
class PromptConfig:
    """How a session becomes a prompt and how the answer is bounded."""

    max_bundles: int = 5  # the Electronic data has at most 5 bundles in a session
    intent_chars: int = 40  # 3-5 words; a bound keeps small models from rambling
    title_chars: int = 160  # long titles are trimmed at a word boundary: the product is in the first words
    min_bundles: int = 1  # every session of the data sets holds at least one bundle
    instructions: bool = True  # the task and answer contract in the system message; a student trained
    # without them has them in its weights (and the grammar holds the contract): ~80 fewer tokens a prompt


def item_title(title: str, limit: int) -> str:
    text = " ".join(html.unescape(title).split()) or "(no title)"
    if limit and len(text) > limit:
        text = text[:limit].rsplit(" ", 1)[0] + " ..."
    return text


def session_text(session: Session, config: PromptConfig = PromptConfig()) -> str:
    lines = [f"{i}. {item_title(it.title, config.title_chars)}" for i, it in enumerate(session.items, 1)]
    return "Session items:\n" + "\n".join(lines)


def build_messages(
    session: Session, config: PromptConfig = PromptConfig(), knowledge: str = "", examples: str = ""
) -> list[dict]:
    """Chat messages for one session.

    `knowledge` is static (the same for every session: rules, patterns) and goes into the
    system message, first, so its KV state is computed once and reused. `examples` depend on
    the session (retrieved neighbours) and go into the user message, just before the session.
    """
    user = (examples + "\n\n" if examples else "") + session_text(session, config)
    return [{"role": "system", "content": system_text(config, knowledge)}, {"role": "user", "content": user}]


def system_text(config: PromptConfig = PromptConfig(), knowledge: str = "") -> str:
    """The system message: who the model is, the task and contract (unless trained away), the knowledge."""
    task, contract = ("\n\n" + TASK, "\n\n" + CONTRACT) if config.instructions else ("", "")
    return SYSTEM + task + ("\n\n" + knowledge if knowledge else "") + contract


def max_bundles_for(n_items: int, config: PromptConfig = PromptConfig()) -> int:
    return max(1, min(config.max_bundles, n_items - 1))


def output_schema(n_items: int, config: PromptConfig = PromptConfig()) -> dict:
    """A JSON schema bounded everywhere, so a small model cannot loop until max_tokens."""
    bundle = {
        "type": "object",
        "properties": {
            "items": {
                "type": "array",
                "items": {"type": "integer", "enum": list(range(1, n_items + 1))},
                "minItems": 2,
                "maxItems": n_items,
            },
            "intent": {"type": "string", "maxLength": config.intent_chars},
        },
        "required": ["items", "intent"],
        "additionalProperties": False,
    }
    return {
        "type": "object",
        "properties": {
            "bundles": {
                "type": "array",
                "items": bundle,
                "minItems": min(config.min_bundles, max_bundles_for(n_items, config)),
                "maxItems": max_bundles_for(n_items, config),
            }
        },
        "required": ["bundles"],
        "additionalProperties": False,
    }


def output_grammar(n_items: int, config: PromptConfig = PromptConfig()) -> str:
    """A GBNF grammar admitting exactly the canonical JSON of `render_answer`, nothing else.

    Stricter than the JSON schema: item numbers are strictly ascending (so never repeated,
    which JSON schema cannot say to llama.cpp), the layout is fixed (no whitespace tokens to
    waste), and every bound of the schema holds. Rule `after_i` continues a bundle whose last
    item is i; it has O(N^2) alternatives, a few thousand at most for real sessions.
    """
    n, k = n_items, max_bundles_for(n_items, config)
    lines = [
        'root ::= "{\\"bundles\\": [" bundle' + f' (", " bundle){{0,{k - 1}}}' + ' "]}"',
        'bundle ::= "{\\"items\\": [" first "], \\"intent\\": \\"" intent "\\"}"',
        r'intent ::= [^"\\\x00-\x1f]{1,' + str(config.intent_chars) + "}",
        "first ::= " + " | ".join(f'"{i}, " after{i}' for i in range(1, n)),
    ]
    for i in range(1, n):
        alts = []
        for j in range(i + 1, n + 1):
            alts.append(f'"{j}"' + (f' | "{j}, " after{j}' if j < n else ""))
        lines.append(f"after{i} ::= " + " | ".join(alts))
    return "\n".join(lines) + "\n"


def max_answer_tokens(n_items: int, config: PromptConfig = PromptConfig()) -> int:
    """An upper bound on the answer's tokens under the schema (numbers <= 2 tokens, 1 per intent char)."""
    per_bundle = 12 + 3 * n_items + config.intent_chars
    return 16 + max_bundles_for(n_items, config) * per_bundle


def render_answer(session: Session) -> str:
    """The ground truth in the output contract: the training target for this session."""
    index = {iid: i for i, iid in enumerate(session.item_ids(), 1)}
    bundles = [{"items": sorted(index[x] for x in b.items), "intent": b.intent} for b in session.bundles]
    return json.dumps({"bundles": bundles}, ensure_ascii=False)


@dataclass
class ParsedAnswer:
    bundles: list[dict]  # [{"items": [item ids], "intent": str}]
    valid: bool  # the raw text was JSON of the expected shape
    error: str = ""
    dropped_items: int = 0  # out-of-range or repeated numbers the parser removed


def parse_answer(text: str, session: Session) -> ParsedAnswer:
    """Map item numbers back to ids; drop out-of-range and repeated items, then too-small bundles."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        return ParsedAnswer([], False, f"not valid JSON: {e.msg} at column {e.colno}")
    if not isinstance(obj, dict) or not isinstance(obj.get("bundles"), list):
        return ParsedAnswer([], False, 'expected an object with a "bundles" list')

    ids = session.item_ids()
    bundles, seen_sets, dropped = [], set(), 0
    for raw in obj["bundles"]:
        if not isinstance(raw, dict) or not isinstance(raw.get("items"), list):
            return ParsedAnswer([], False, 'each bundle must be an object with an "items" list')
        members = []
        for x in raw["items"]:
            n = int(x) if isinstance(x, int) or (isinstance(x, str) and x.strip().isdigit()) else 0
            if 1 <= n <= len(ids) and ids[n - 1] not in members:
                members.append(ids[n - 1])
            else:
                dropped += 1
        key = frozenset(members)
        if len(members) >= 2 and key not in seen_sets:
            seen_sets.add(key)
            intent = raw.get("intent")
            bundles.append({"items": members, "intent": intent.strip() if isinstance(intent, str) else ""})
    return ParsedAnswer(bundles, True, "", dropped)
