"""Several sessions at once on one loaded model: llama.cpp batched decoding.

`Engine.generate` decodes one session at a time, so each decode step is a matrix-vector
product that leaves most of the CPU's arithmetic idle while the weights stream through
cache. Here up to `concurrency` sessions are in flight, each in its own KV sequence of one
llama.cpp context, and every step feeds the next token of every active sequence to a single
`llama_decode`: the weights are read once for all of them. A session that finishes frees its
sequence and the next one is admitted at once (continuous batching), so a long answer never
holds up the queue. A newly admitted session's prompt is evaluated in calls of its own (see
`_prefill` for why it does not ride along in the decode batch).

The token prefix every prompt shares (the system message: ~40% of a prompt) is evaluated once
and kept as a sequence state (its KV cells, a few MiB); an admitted session's sequence starts as
a copy of it. This is what the sequential engine gets from llama-cpp-python's prefix cache;
without it every session would pay its full prompt again.

Why not a unified KV cache, where `llama_memory_seq_cp` shares the prefix cells for free? There
the cells of the sequences interleave in one buffer and attention sums each row over all of
them (masked), so the sums may group differently; a first version with it changed 2 of 4 sample
answers at 2 in flight (though prompts then also rode in the decode batch, see `_prefill`, so
the cause was not isolated). With a stream per sequence, each sequence's cells lie exactly as in
the engine's own context.

Decoding is the engine's: the same prompt tokens, greedy, constrained by the same per-session
GBNF grammar, stopped at an end-of-generation token or `max_answer_tokens`. With the same
chunking of every prompt, outputs equal `Engine.generate`'s: on this CPU build, decoding one
token or several in a step gave bit-identical logits (12 of 12 sample answers identical at 1, 2,
4 and 8 in flight). Other builds or kernels may differ in the last bits for batched steps.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from .. import BkdError
from ..data import Session
from ..prompts import PromptConfig, max_answer_tokens, output_grammar, parse_answer
from .engine import Engine, Generation, Timing, skipped_generation
from .llamacpp import GrammarGreedy, SequenceContext


@dataclass
class ConcurrentRun:
    generations: list[Generation]  # one per session, in input order
    wall_s: float  # first admission to last answer, wall clock
    concurrency: int

    @property
    def sessions_per_min(self) -> float:
        return 60 * len(self.generations) / self.wall_s if self.wall_s else 0.0


@dataclass
class _Slot:
    """One session in flight: its sequence in the KV cache and its own grammar-constrained sampler."""

    index: int  # position in the input list
    seq_id: int
    prompt: list[int]
    max_tokens: int
    sampler: GrammarGreedy
    started: float
    prefix_len: int  # prompt tokens shared with every other session, evaluated once for all
    n_past: int = 0  # tokens of this sequence already put in a batch (or copied from the prefix)
    next_token: int | None = None  # sampled, not yet decoded
    answer: list[int] = field(default_factory=list)
    text: bytearray = field(default_factory=bytearray)
    first_at: float | None = None


def generate_concurrent(
    engine: Engine,
    sessions: list[Session],
    concurrency: int,
    parts: dict[str, dict] | None = None,
) -> ConcurrentRun:
    """Generate bundles for `sessions` with up to `concurrency` of them decoded together.

    `parts` maps a session id to its `batch.session_inputs` (knowledge, examples); missing ids get
    none. Returns the same `Generation` objects as `engine.generate`, in input order. This is the
    throughput path: a compact-answer student decodes its first line here, candidates are not ranked.
    """
    if concurrency < 1:
        raise BkdError(f"concurrency must be at least 1, got {concurrency}")
    parts = parts or {}
    # Tokenize everything first: a session that does not fit fails the run before any time is spent.
    inputs = [parts.get(s.session_id, {}) for s in sessions]
    prompts = [engine.prompt_tokens(s, p.get("knowledge", ""), p.get("examples", "")) for s, p in zip(sessions, inputs)]
    if not sessions:
        return ConcurrentRun([], 0.0, concurrency)

    n_seq = min(concurrency, len(sessions))  # no KV cache for sequences that could never be used
    run = _Scheduler(engine, sessions, prompts, n_seq)
    try:
        wall = run.until_done()
    finally:
        run.free()
    return ConcurrentRun([g for g in run.generations if g is not None], wall, concurrency)


class _Scheduler:
    """Sessions admitted into free KV sequences as others finish; one llama_decode per step for
    every session in flight."""

    def __init__(self, engine: Engine, sessions: list[Session], prompts: list[list[int]], n_seq: int):
        self.engine, self.sessions, self.prompts = engine, sessions, prompts
        self.n_batch = max(engine.config.n_batch, n_seq)  # every active sequence's next token must fit one batch
        self.prefix = _common_prefix(prompts)
        self.generations: list[Generation | None] = [None] * len(sessions)
        self.slots: dict[int, _Slot] = {}  # seq_id -> the session decoding in it
        self.free_seqs = list(range(n_seq - 1, -1, -1))  # a stack: pop() hands out 0, 1, ...
        # Not a unified KV cache: each sequence's cells lie exactly as in the engine's own context
        # (`Engine.prompt_tokens` checks that every prompt and its longest answer fit n_ctx).
        self.ctx = SequenceContext(engine.llm, engine.config.n_ctx, n_seq, self.n_batch, engine.adapter_handles)

    def until_done(self) -> float:
        """Run every session to its end; the wall time from the first admission."""
        queue = deque(i for i, s in enumerate(self.sessions) if len(s.items) >= 2)
        for i in set(range(len(self.sessions))) - set(queue):  # no bundle possible: the model is not asked
            self.generations[i] = skipped_generation(self.sessions[i])
        t0 = time.perf_counter()
        self.prefix_state = _prefix_state(self.ctx, self.prefix, self.n_batch)
        while queue or self.slots:
            while queue and self.free_seqs:
                self.admit(queue.popleft(), self.free_seqs.pop())
            # One decode step: the next token of every session in flight, one llama_decode for all.
            active = list(self.slots.values())
            if not active:  # every admitted session ended on its first token
                continue
            self.ctx.decode([(s.seq_id, s.n_past, s.next_token, True) for s in active])
            for pos, slot in enumerate(active):
                slot.n_past += 1
                self.take(slot, pos)
        return time.perf_counter() - t0

    def admit(self, i: int, seq: int) -> None:
        """Start session `i` in sequence `seq`: the shared prefix copied in, its own tokens prefilled."""
        prompt = self.engine.config.prompt
        n_items = len(self.sessions[i].items)
        self.slots[seq] = slot = _Slot(
            index=i,
            seq_id=seq,
            prompt=self.prompts[i],
            max_tokens=max_answer_tokens(n_items, prompt),
            sampler=GrammarGreedy(self.engine.llm, output_grammar(n_items, prompt)),
            started=time.perf_counter(),
            prefix_len=len(self.prefix),
            n_past=len(self.prefix),
        )
        if self.prefix and not self.ctx.restore(self.prefix_state, seq):
            raise BkdError(f"llama.cpp could not restore the shared prompt prefix into sequence {seq}")
        self.take(slot, _prefill(self.ctx, slot, self.n_batch))

    def take(self, slot: _Slot, pos: int) -> None:
        """Sample the slot's next token from the logits at batch position `pos`; finish the session if done."""
        token = slot.sampler.sample(self.ctx.logits(pos))
        now = time.perf_counter()
        slot.first_at = slot.first_at or now
        finish = None
        if self.ctx.is_end(token):
            finish = "stop"  # like create_completion: the end token is neither text nor counted
        else:
            slot.answer.append(token)
            slot.text += self.ctx.piece(token)
            slot.next_token = token
            if len(slot.answer) >= slot.max_tokens:
                finish = "length"
        if finish:
            session = self.sessions[slot.index]
            self.generations[slot.index] = _generation(session, slot, finish, now, self.engine.config.prompt)
            # Free the sequence's KV cells and its sampler, then hand the sequence id to the next session.
            self.ctx.remove(slot.seq_id)
            slot.sampler.free()
            del self.slots[slot.seq_id]
            self.free_seqs.append(slot.seq_id)

    def free(self) -> None:
        for slot in self.slots.values():  # only left when an error stopped the run
            slot.sampler.free()
        self.ctx.free()


def _prefill(ctx: SequenceContext, slot: _Slot, n_batch: int) -> int:
    """Evaluate the rest of a session's prompt; return the batch position of its last token's logits.

    Alone, n_batch tokens a call, as the engine does; not in the decode batch: llama.cpp splits a
    batch of several sequences into ubatches holding the same number of tokens of each, so beside
    1-token decodes a prompt is cut into pieces, and a 1-token piece runs another CPU kernel whose
    rounding moved later logits by up to 0.5 (measured): enough to change greedy answers. Prefill
    is compute-bound, so batching it with the decodes would gain little anyway.
    """
    entries: list[tuple[int, int, int, bool]] = []
    for start in range(slot.n_past, len(slot.prompt), n_batch):
        chunk = slot.prompt[start : start + n_batch]
        last = start + len(chunk) == len(slot.prompt)
        entries = [(slot.seq_id, start + k, t, last and k == len(chunk) - 1) for k, t in enumerate(chunk)]
        ctx.decode(entries)
    slot.n_past = len(slot.prompt)
    return len(entries) - 1


def _common_prefix(prompts: list[list[int]]) -> list[int]:
    """The longest token prefix of all prompts, found on the tokens themselves (no guessing where
    the tokenizer splits), short of each prompt's last token: that one must be decoded in the
    session's own sequence to give the logits of its first answer token."""
    n = min(len(p) for p in prompts) - 1
    first = prompts[0]
    for p in prompts[1:]:
        n = next((i for i in range(n) if p[i] != first[i]), n)
    return first[:n]


def _prefix_state(ctx: SequenceContext, prefix: list[int], n_batch: int) -> object:
    """Evaluate the shared prefix (in sequence 0, n_batch tokens a call, no logits) and return
    that sequence's state, to be restored into each session's sequence; sequence 0 is left empty."""
    for start in range(0, len(prefix), n_batch):
        ctx.decode([(0, start + k, t, False) for k, t in enumerate(prefix[start : start + n_batch])])
    state = ctx.state(0)
    ctx.remove(0)
    return state


def _generation(session: Session, slot: _Slot, finish: str, now: float, config: PromptConfig) -> Generation:
    timing = Timing(
        prompt_tokens=len(slot.prompt),
        prefill_tokens=len(slot.prompt) - slot.prefix_len,  # the shared prefix is evaluated once, up front
        completion_tokens=len(slot.answer),
        ttft_s=(slot.first_at or now) - slot.started,  # from admission, not from the start of the run
        # One llama_decode call serves many sequences, so llama.cpp's prompt/eval timers cannot be split
        # per session: left at 0 (Timing's rates read 0 for them). ttft_s and total_s are the honest numbers.
        prefill_s=0.0,
        decode_s=0.0,
        total_s=now - slot.started,
    )
    raw = slot.text.decode("utf-8", errors="replace")
    parsed = parse_answer(raw, session, config)
    error = parsed.error
    if finish == "length" and not parsed.valid:
        error = f"answer cut at max_tokens ({error})"
    return Generation(session.session_id, parsed.bundles, parsed.valid, error, raw, timing)


__all__ = ["ConcurrentRun", "generate_concurrent"]
