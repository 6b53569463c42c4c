"""SFT examples for the three ways of using knowledge, tokenized exactly like the runtime.

    sft        session -> bundles (the knowledge is only in the weights)
    knowledge  the pack's static knowledge and nearest examples in the prompt -> bundles
    thoughts   session -> rationale, then the bundles

Prompts come from `prompts.build_messages` and targets from `prompts.render_answer`, rendered
through the GGUF's chat template and tokenized by llama.cpp itself, exactly as
`runtime/engine.py` does, so training tokens equal inference tokens. The answer is tokenized on
its own after the prompt (as the model generates it) and ends with the end-of-turn token the
runtime stops on. Loss is on the answer tokens only.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, replace
from pathlib import Path

from .. import BkdError
from ..data import Bundle, Session, iter_jsonl
from ..metrics import session_strict_f1
from ..prompts import PromptConfig, build_messages, render_answer

IGNORE = -100  # label of tokens without loss (prompt, padding)


def gguf_chat_tokenizer(gguf_path: str | Path):
    """The runtime's tokenization: the GGUF's chat template and llama.cpp's tokenizer (vocab only)."""
    from ..runtime.chat import ChatTokenizer
    from ..runtime.llamacpp import load_vocab

    return ChatTokenizer(load_vocab(gguf_path), gguf_path)


class HFChatTokenizer:
    """For a base given as an HF folder: its tokenizer and chat template."""

    def __init__(self, folder: str | Path):
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(str(folder))
        if not self.tok.chat_template:
            raise BkdError(f"{folder}: the tokenizer has no chat template")
        self.eos_id = self.tok.eos_token_id
        self.source = str(folder)

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        from ..runtime.chat import chat_pieces

        def render(marked: list[dict]) -> str:
            return self.tok.apply_chat_template(marked, add_generation_prompt=True, tokenize=False)

        ids: list[int] = []
        for text, is_message in chat_pieces(render, messages, self.source):
            ids += self.tok(text, add_special_tokens=False, split_special_tokens=is_message)["input_ids"]
        return ids

    def text_ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)


@dataclass
class Example:
    session_id: str
    prompt_ids: list[int]
    answer_ids: list[int]  # the target, ending with the end-of-turn token

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.answer_ids)


def load_thoughts(path: str | Path) -> dict[str, str]:
    """Thoughts by session id, from what `distill --formats thoughts` writes: its knowledge folder
    (the manifest verified) or a thoughts.jsonl of store records (each names its source sessions);
    a hand-written JSONL of {"session_id": ..., "thought": ...} is read too."""
    from ..knowledge.store import read_knowledge, record_from_dict

    path = Path(path)
    if path.is_dir():
        return read_knowledge(path, ["thoughts"])[1]
    thoughts = {}
    for n, obj in iter_jsonl(path):
        where = f"{path}:{n}"
        if isinstance(obj, dict) and "kind" in obj:
            record = record_from_dict(obj, where)
            for sid in record.source_session_ids if record.kind == "thought" else ():
                thoughts[sid] = record.text.strip()
        elif isinstance(obj, dict) and isinstance(obj.get("thought"), str) and "session_id" in obj:
            thoughts[str(obj["session_id"])] = obj["thought"].strip()
        else:
            expected = '{"session_id": ..., "thought": ...}'
            raise BkdError(f"{where}: expected a knowledge record (distill output) or {expected}")
    return thoughts


def target_text(session: Session, mode: str, thought: str = "", config: PromptConfig = PromptConfig()) -> str:
    answer = render_answer(session, config)
    if mode == "thoughts" and thought:
        return " ".join(thought.split()) + "\n" + answer  # one line of rationale, then the contract's answer
    return answer


def answer_part(text: str, config: PromptConfig = PromptConfig()) -> str:
    """The answer part of a generated text (after a rationale, in mode 'thoughts')."""
    if config.answer_format == "compact":
        lines = text.strip().split("\n")
        return "\n".join(lines[-2:]) if len(lines) > 2 else text  # the answer is the last two lines
    at = text.rfind('{"bundles"')
    return text[at:] if at >= 0 else text


class PromptMaker:
    """Messages for a session in a mode; holds the pack for mode 'knowledge'."""

    def __init__(self, mode: str, config: PromptConfig = PromptConfig(), pack=None):
        if mode == "knowledge" and pack is None:
            raise BkdError("mode 'knowledge' needs a prompt pack")
        self.mode, self.config, self.pack = mode, config, pack

    def messages(self, session: Session, fits=None) -> list[dict]:
        if self.mode != "knowledge":
            return build_messages(session, self.config)
        knowledge, examples = self.pack.prompt_parts(session, fits or (lambda k, e: True))
        return build_messages(session, self.config, knowledge, examples)


def with_shuffled_copies(sessions: list[Session], copies: int, seed: int = 0) -> list[Session]:
    """The sessions plus `copies` more of each with the items in a new order.

    Bundles are sets and barely follow the item order in the Electronic data (40% of bundles are
    contiguous runs, 36% after a shuffle), so a reordered session is a new, equally true example:
    the item numbers in prompt and target change, which keeps a small model from learning positions.
    """
    rng = random.Random(seed)
    out = list(sessions)
    for _ in range(copies):
        for s in sessions:
            items = list(s.items)
            rng.shuffle(items)
            out.append(replace(s, items=items))  # same id: its thought and provenance still apply
    return out


def recombined_sessions(sessions: list[Session], n: int, seed: int = 0, max_items: int = 10) -> list[Session]:
    """`n` new sessions with known partitions, made only from `sessions` (train): each joins as
    many bundles, drawn from different sessions, as a real session has (its bundle count drawn from
    theirs), and as many unbundled items of yet other sessions as a real session has besides its
    bundles; items shuffled, at most `max_items`. The truth of a made session is its bundles, so
    every one is a new ranking example for the hint's candidates: more than 623 sessions give.
    """
    if n <= 0:
        return []
    rng = random.Random(seed)
    bundles = [(s, b) for s in sessions for b in s.bundles if len(b.items) >= 2]
    loose = [(s, it) for s in sessions for it in s.items if not any(it.id in b.items for b in s.bundles)]
    shapes = [(len(s.bundles), len(s.items) - len({x for b in s.bundles for x in b.items})) for s in sessions]
    if not bundles:
        raise BkdError("recombined sessions need training sessions with bundles")
    out: list[Session] = []
    while len(out) < n:
        n_bundles, n_loose = rng.choice(shapes)
        items, kept, sources = {}, [], set()
        for s, b in rng.sample(bundles, min(len(bundles), 4 * n_bundles)):
            by_id = {it.id: it for it in s.items}
            if len(kept) == n_bundles or s.session_id in sources or len(items) + len(b.items) > max_items:
                continue
            if any(x in items for x in b.items):
                continue  # an item in two drawn bundles: the truth would be ambiguous
            items.update((x, by_id[x]) for x in b.items)
            kept.append(b)
            sources.add(s.session_id)
        for s, it in rng.sample(loose, min(len(loose), 4 * n_loose)):
            if n_loose <= 0 or len(items) >= max_items:
                break
            if s.session_id not in sources and it.id not in items:
                items[it.id] = it
                n_loose -= 1
        if not kept or len(items) < 2:
            continue
        order = list(items.values())
        rng.shuffle(order)
        out.append(Session(f"recombined-{seed}-{len(out)}", order, kept, "train", {"recombined": True}))
    return out


@dataclass
class RankExample:
    """A session's prompt and the hint's candidate first lines (tokenized as the runtime scores
    them), how many cuts gave each, and which one is closest to the truth (strict F1)."""

    session_id: str
    prompt_ids: list[int]
    lines_ids: list[list[int]]
    counts: list[int]
    best: int


def build_rank_examples(
    sessions: list[Session], tok, maker: PromptMaker, max_len: int
) -> tuple[list[RankExample], dict]:
    """Ranking examples for the sessions whose candidates differ in strict F1 (a tie teaches
    nothing about the choice); those longer than max_len are dropped."""
    from ..prompts import candidate_lines

    out, ties, dropped = [], 0, 0
    for s in sessions:
        lines, counts = candidate_lines(maker.pack.candidates(s))
        scores = candidate_f1s(s, [[[int(n) for n in g.split()] for g in line.split(" | ")] for line in lines])
        if len(set(scores)) < 2:
            ties += 1
            continue
        prompt = tok.prompt_ids(maker.messages(s))
        lines_ids = [tok.text_ids(line + "\n") for line in lines]
        if len(prompt) + max(map(len, lines_ids)) > max_len:
            dropped += 1
            continue
        out.append(RankExample(s.session_id, prompt, lines_ids, counts, scores.index(max(scores))))
    return out, {"rank_examples": len(out), "rank_ties": ties, "rank_dropped_too_long": dropped}


def candidate_f1s(session: Session, candidates: list[list[list[int]]]) -> list[float]:
    """Each candidate partition's (item numbers) strict F1 against the session's true bundles."""
    ids = session.item_ids()
    gold = [frozenset(b.items) for b in session.bundles]
    return [session_strict_f1([frozenset(ids[n - 1] for n in g) for g in c if len(g) >= 2], gold) for c in candidates]


def with_closest_candidate(session: Session, candidates: list[list[list[int]]]) -> Session:
    """The session with its bundles replaced by the candidate partition (item numbers, as
    `Pack.candidates` gives them) of the highest strict F1 against its true bundles, each candidate
    bundle named by the true bundle it shares most items with. Unchanged when no candidate shares
    anything with the truth. Ties go to the earlier candidate (the hint's finer cut).

    A student that ranks candidates (runtime/choice.py) never writes a partition outside them, so
    learning which candidate is closest teaches the choice itself; the truth often lies outside
    every candidate (val: best candidate strict F1 0.76), and then it only blurs the ranking.
    """
    ids = session.item_ids()
    parts = [[frozenset(ids[n - 1] for n in group) for group in c] for c in candidates]
    scores = candidate_f1s(session, candidates)
    if not scores or max(scores) == 0:
        return session
    best = parts[scores.index(max(scores))]

    def intent(group: frozenset) -> str:
        return max(session.bundles, key=lambda b: len(group & set(b.items))).intent

    bundles = [Bundle(tuple(x for x in ids if x in g), intent(g)) for g in best if len(g) >= 2]
    return replace(session, bundles=bundles)


def build_examples(
    sessions: list[Session], tok, maker: PromptMaker, max_len: int, thoughts: dict[str, str] | None = None
) -> tuple[list[Example], dict]:
    """Tokenized examples; those longer than max_len are dropped whole (a cut answer teaches nothing)."""
    thoughts = thoughts or {}
    examples, dropped, without_thought = [], 0, 0
    for s in sessions:
        thought = thoughts.get(s.session_id) or str(s.extra.get("thought") or "")
        if maker.mode == "thoughts" and not thought:
            without_thought += 1
        answer = tok.text_ids(target_text(s, maker.mode, thought, maker.config)) + [tok.eos_id]

        def fits(knowledge, ex, s=s, n=len(answer)):
            from ..prompts import build_messages as bm

            return len(tok.prompt_ids(bm(s, maker.config, knowledge, ex))) + n <= max_len

        prompt = tok.prompt_ids(maker.messages(s, fits))
        if len(prompt) + len(answer) > max_len:
            dropped += 1
            continue
        examples.append(Example(s.session_id, prompt, answer))
    if maker.mode == "thoughts" and without_thought == len(sessions):
        raise BkdError("mode 'thoughts': no session has a thought (give `thoughts` = a JSONL of session_id, thought)")
    stats = {
        "examples": len(examples),
        "dropped_too_long": dropped,
        "without_thought": without_thought,
        "tokens": sum(len(e) for e in examples),
        "answer_tokens": sum(len(e.answer_ids) for e in examples),
    }
    return examples, stats


@dataclass
class Row:
    """One training sequence: one example, or several packed back to back."""

    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]  # restart at 0 for each example: attention stays within an example


def make_rows(examples: list[Example], max_len: int, packing: bool, seed: int = 0) -> list[Row]:
    """One row per example, or (packing) first-fit: each example goes to the first row it fits."""
    order = list(examples)
    random.Random(seed).shuffle(order)  # pack a fixed, seeded mix (rows are reshuffled every epoch)
    rows: list[Row] = []
    for ex in order:
        row = next((r for r in rows if len(r.input_ids) + len(ex) <= max_len), None) if packing else None
        if row is None:
            row = Row([], [], [])
            rows.append(row)
        row.input_ids += ex.prompt_ids + ex.answer_ids
        row.labels += [IGNORE] * len(ex.prompt_ids) + ex.answer_ids
        row.position_ids += list(range(len(ex)))
    return rows


def collate(rows: list[Row], pad_id: int) -> dict:
    """Pad to the longest row; the padding is its own segment (positions from 0) with no loss."""
    import torch

    width = max(len(r.input_ids) for r in rows)
    ids, labels, pos = [], [], []
    for r in rows:
        pad = width - len(r.input_ids)
        ids.append(r.input_ids + [pad_id] * pad)
        labels.append(r.labels + [IGNORE] * pad)
        pos.append(r.position_ids + list(range(pad)))
    return {
        "input_ids": torch.tensor(ids),
        "labels": torch.tensor(labels),
        "position_ids": torch.tensor(pos),
    }


def dump_examples(path: str | Path, examples: list[Example], tok, limit: int = 3) -> None:
    """A few decoded examples beside the run, to see what the model is trained on."""
    from ..files import atomic_write

    with atomic_write(path) as f:
        for e in examples[:limit]:
            f.write(
                json.dumps(
                    {
                        "session_id": e.session_id,
                        "prompt": tok.decode(e.prompt_ids),
                        "answer": tok.decode(e.answer_ids),
                    },
                    ensure_ascii=False,
                )
                + "\n"
            )
