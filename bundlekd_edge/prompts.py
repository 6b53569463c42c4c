"""The generation prompt, the bounded output schema, and the parser of the model's answer.

The model sees the session's items numbered 1..N and answers with item *numbers*, never ids:
numbers are a few tokens each and the schema can pin them to 1..N, so the runtime cannot
hallucinate an item. The same builder serves training (issue: SFT data) and inference, so
training tokens equal inference tokens.

Two answer formats, both parsed to the same records:

    json      {"bundles": [{"items": [1, 4, 9], "intent": "Camera kit"}, {"items": [2, 6], ...}]}
    compact   1 4 9 | 2 6
              Camera kit | Phone charging

The compact one is ~2.5x fewer tokens, and its first line is the whole partition: the runtime
can score candidate partitions by their likelihood before it writes any intent (runtime/engine.py).
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass

from . import BkdError
from .data import Session

ANSWER_FORMATS = ("json", "compact")

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

COMPACT_CONTRACT = (
    "Answer with two lines only. First line: the bundles, each as its item numbers separated by spaces, "
    'bundles separated by " | ". Second line: the intent of each bundle in 3-5 words, in the same order, '
    'separated by " | ".'
)
CONTRACTS = {"json": CONTRACT, "compact": COMPACT_CONTRACT}


@dataclass(frozen=True)
class PromptConfig:
    """How a session becomes a prompt and how the answer is bounded."""

    max_bundles: int = 5  # the Electronic data has at most 5 bundles in a session
    intent_chars: int = 40  # 3-5 words; a bound keeps small models from rambling
    title_chars: int = 160  # long titles are trimmed at a word boundary: the product is in the first words
    min_bundles: int = 1  # every session of the data sets holds at least one bundle
    instructions: bool = True  # the task and answer contract in the system message; a student trained
    # without them has them in its weights (and the grammar holds the contract): ~80 fewer tokens a prompt
    answer_format: str = "json"  # json | compact (see the module docstring); a student answers in its own

    def __post_init__(self):
        if self.answer_format not in ANSWER_FORMATS:
            raise BkdError(f"answer_format {self.answer_format!r} is not one of {', '.join(ANSWER_FORMATS)}")
        if self.max_bundles < 1 or self.intent_chars < 1 or self.min_bundles < 0:
            raise BkdError("max_bundles and intent_chars must be >= 1, min_bundles >= 0")


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
    contract = CONTRACTS[config.answer_format]
    task, contract = ("\n\n" + TASK, "\n\n" + contract) if config.instructions else ("", "")
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
    """A GBNF grammar admitting exactly the canonical answers of `render_answer`, nothing else.

    Stricter than the JSON schema: item numbers are strictly ascending (so never repeated,
    which JSON schema cannot say to llama.cpp), the layout is fixed (no whitespace tokens to
    waste), and every bound of the schema holds. Rule `after_i` continues a bundle whose last
    item is i; it has O(N^2) alternatives, a few thousand at most for real sessions.
    """
    n, k = n_items, max_bundles_for(n_items, config)
    if config.answer_format == "compact":
        # One alternative per bundle count, so the intents line has exactly one intent per bundle.
        alts = [' " | " '.join(["group"] * b) + ' "\\n" ' + ' " | " '.join(["intent"] * b) for b in range(1, k + 1)]
        lines = [
            "root ::= " + " | ".join(f"({a})" for a in alts),
            "group ::= " + _items_rules(n, " ")[0],
            _compact_intent_rule(config),
        ]
        return "\n".join(lines + _items_rules(n, " ")[1:]) + "\n"
    lines = [
        'root ::= "{\\"bundles\\": [" bundle' + f' (", " bundle){{0,{k - 1}}}' + ' "]}"',
        'bundle ::= "{\\"items\\": [" first "], \\"intent\\": \\"" intent "\\"}"',
        r'intent ::= [^"\\\x00-\x1f]{1,' + str(config.intent_chars) + "}",
        "first ::= " + _items_rules(n, ", ")[0],
    ]
    return "\n".join(lines + _items_rules(n, ", ")[1:]) + "\n"


def _items_rules(n: int, sep: str) -> list[str]:
    """[the alternatives of a bundle's first item, then the rules `after_i`]: 2+ ascending numbers."""
    first = " | ".join(f'"{i}{sep}" after{i}' for i in range(1, n))
    rules = [first]
    for i in range(1, n):
        alts = [f'"{j}"' + (f' | "{j}{sep}" after{j}' if j < n else "") for j in range(i + 1, n + 1)]
        rules.append(f"after{i} ::= " + " | ".join(alts))
    return rules


def _compact_intent_rule(config: PromptConfig) -> str:
    # No "|" (the separator) and no control characters; it starts with a visible character.
    return r"intent ::= [^|\x00-\x20] [^|\x00-\x1f]{0," + str(config.intent_chars - 1) + "}"


def intents_grammar(n_bundles: int, config: PromptConfig = PromptConfig()) -> str:
    """The compact answer's second line alone, for a partition already chosen: one intent per bundle."""
    return "root ::= " + ' " | " '.join(["intent"] * n_bundles) + "\n" + _compact_intent_rule(config) + "\n"


def chosen_line_grammar(line: str, config: PromptConfig = PromptConfig()) -> str:
    """A compact answer whose first line is `line` (a chosen candidate partition), then its intents:
    what a server decodes after the candidates were scored (in-process, the line is evaluated and
    `intents_grammar` decodes the rest)."""
    intents = ' " | " '.join(["intent"] * (line.count("|") + 1))
    return f"root ::= {json.dumps(line + chr(10))} {intents}\n{_compact_intent_rule(config)}\n"


def max_answer_tokens(n_items: int, config: PromptConfig = PromptConfig()) -> int:
    """An upper bound on the answer's tokens under the schema (numbers <= 2 tokens, 1 per intent char)."""
    if config.answer_format == "compact":
        return 4 + 3 * n_items + max_bundles_for(n_items, config) * (4 + config.intent_chars)
    per_bundle = 12 + 3 * n_items + config.intent_chars
    return 16 + max_bundles_for(n_items, config) * per_bundle


def partition_text(groups: list[list[int]]) -> str:
    """The compact answer's first line: "1 4 9 | 2 6" (canonical: ascending inside, by first item)."""
    return " | ".join(" ".join(str(n) for n in g) for g in sorted(sorted(g) for g in groups))


def candidate_lines(candidates: list[list[list[int]]]) -> tuple[list[str], list[int]]:
    """Distinct first lines of candidate partitions, and how many candidates gave each (a
    partition that several cuts of the hint agree on counts that many times)."""
    counts: dict[str, int] = {}
    for c in candidates:
        if c:
            line = partition_text(c)
            counts[line] = counts.get(line, 0) + 1
    return list(counts), list(counts.values())


def render_answer(session: Session, config: PromptConfig = PromptConfig()) -> str:
    """The ground truth in the output contract: the training target for this session."""
    index = {iid: i for i, iid in enumerate(session.item_ids(), 1)}
    bundles = [{"items": sorted(index[x] for x in b.items), "intent": b.intent} for b in session.bundles]
    if config.answer_format == "compact":
        bundles.sort(key=lambda b: b["items"])
        intents = (" ".join(b["intent"].replace("|", "/").split()) or "bundle" for b in bundles)
        return partition_text([b["items"] for b in bundles]) + "\n" + " | ".join(intents)
    return json.dumps({"bundles": bundles}, ensure_ascii=False)


@dataclass
class ParsedAnswer:
    bundles: list[dict]  # [{"items": [item ids], "intent": str}]
    valid: bool  # the raw text was JSON of the expected shape
    error: str = ""
    dropped_items: int = 0  # out-of-range or repeated numbers the parser removed


def parse_answer(text: str, session: Session, config: PromptConfig = PromptConfig()) -> ParsedAnswer:
    """Map item numbers back to ids; drop out-of-range and repeated items, then too-small bundles."""
    if config.answer_format == "compact":
        lines = text.strip().split("\n")
        groups = [g.split() for g in lines[0].split("|")] if lines[0].strip() else []
        if not groups or any(not g or not all(x.isdigit() for x in g) for g in groups):
            return ParsedAnswer([], False, 'expected a first line of item numbers, bundles separated by " | "')
        intents = lines[1].split("|") if len(lines) > 1 else []
        raw_bundles = [{"items": g, "intent": intents[i] if i < len(intents) else ""} for i, g in enumerate(groups)]
        return _bundles_from_numbers(raw_bundles, session)
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        return ParsedAnswer([], False, f"not valid JSON: {e.msg} at column {e.colno}")
    if not isinstance(obj, dict) or not isinstance(obj.get("bundles"), list):
        return ParsedAnswer([], False, 'expected an object with a "bundles" list')
    if any(not isinstance(raw, dict) or not isinstance(raw.get("items"), list) for raw in obj["bundles"]):
        return ParsedAnswer([], False, 'each bundle must be an object with an "items" list')
    return _bundles_from_numbers(obj["bundles"], session)


def _bundles_from_numbers(raw_bundles: list[dict], session: Session) -> ParsedAnswer:
    ids = session.item_ids()
    bundles, seen_sets, dropped = [], set(), 0
    for raw in raw_bundles:
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
