"""Several sessions at once on one loaded model: llama.cpp batched decoding.

`Engine.generate` decodes one session at a time, so each decode step is a matrix-vector
product that leaves most of the CPU's arithmetic idle while the weights stream through
cache. Here up to `n_seq` sessions are in flight, each in its own KV sequence of one llama.cpp
context, and every step feeds the next token of every active sequence to a single
`llama_decode`: the weights are read once for all of them. A session that finishes frees its
sequence and the next one is admitted at once (continuous batching), so a long answer never
holds up the queue. A newly admitted session's prompt is evaluated in calls of its own (see
`_prefill` for why it does not ride along in the decode batch).

`Batched` is a long-lived scheduler: sessions are submitted at any time (from any thread) and
each gets a future; one worker thread owns the llama.cpp context. `bkd-edge serve` and
`Student.generate_many` run on it; `generate_concurrent` runs a fixed list through it.

The token prefix every prompt shares (the system message and a pack's static knowledge: ~40% of
a prompt) is evaluated once and kept as a sequence state (its KV cells, a few MiB); an admitted
session's sequence starts as a copy of it, cut where its prompt leaves the prefix. A finished
session leaves its prompt's cells in its sequence, and the next session there keeps as many of
them as its prompt shares (the template after the pack's knowledge, ~8% of a prompt), as the
sequential engine keeps llama-cpp-python's cache from one session to the next; sequences are
handed out most recently freed first, so one session at a time always reuses the last one's.

Why not a unified KV cache, where `llama_memory_seq_cp` shares the prefix cells for free? There
the cells of the sequences interleave in one buffer and attention sums each row over all of
them (masked), so the sums may group differently; a first version with it changed 2 of 4 sample
answers at 2 in flight (though prompts then also rode in the decode batch, see `_prefill`, so
the cause was not isolated). With a stream per sequence, each sequence's cells lie exactly as in
the engine's own context.

Decoding is the engine's: the same prompt tokens, greedy, constrained by the same per-session
GBNF grammar, stopped at an end-of-generation token or `max_answer_tokens`; a compact student's
first line is chosen among the pack's candidates by the same rule (`choice.choose_first_line`),
the candidates scored in the session's own sequence as the engine scores them. With the same
chunking of every prompt, outputs equal `Engine.generate`'s: on this CPU build, decoding one
token or several in a step gave bit-identical logits (12 of 12 sample answers identical at 1, 2,
4 and 8 in flight). Other builds or kernels may differ in the last bits for batched steps.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import CancelledError, Future
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import BkdError
from ..data import Session
from ..prompts import intents_grammar, max_answer_tokens, output_grammar
from .choice import ChoiceRule, choose_first_line
from .engine import Engine, _log_softmax
from .generation import Generation, Timing, answer_generation, skipped_generation
from .llamacpp import GrammarGreedy, SequenceContext


class QueueFull(BkdError):
    """The scheduler's queue holds as many sessions as it may: try again later."""


class Closed(BkdError):
    """The scheduler takes no more sessions (it is draining or closed)."""


@dataclass
class _Job:
    session: Session
    prompt: list[int]
    candidates: list | None
    choice: ChoiceRule
    future: Future
    abandoned: bool = False  # the caller gave up (timeout, disconnect): free its sequence at the next step


@dataclass
class _Slot:
    """One session in flight: its sequence in the KV cache and its own grammar-constrained sampler."""

    job: _Job
    seq_id: int
    max_tokens: int
    sampler: GrammarGreedy
    started: float
    prefix_len: int  # prompt tokens restored from the shared prefix, evaluated once for all
    n_past: int = 0  # tokens of this sequence already put in a batch (or restored from the prefix)
    next_token: int | None = None  # sampled, not yet decoded
    answer: list[int] = field(default_factory=list)
    text: bytearray = field(default_factory=bytearray)
    first_at: float | None = None
    chosen_tokens: int = 0
    chosen_by: str = ""
    choose_s: float = 0.0


class Batched:
    """Up to `n_seq` sessions decoded together on `engine`'s model, the others queued (at most
    `max_queue`, then `submit` raises QueueFull). Implements the `Generator` interface; every
    llama.cpp call happens in its one worker thread."""

    def __init__(self, engine: Engine, n_seq: int, prefix: list[int] | None = None, max_queue: int = 1 << 30):
        if n_seq < 1:
            raise BkdError(f"concurrency must be at least 1, got {n_seq}")
        self.engine, self.n_seq, self.max_queue = engine, n_seq, max_queue
        self.config = engine.config
        self.n_batch = max(engine.config.n_batch, n_seq)  # every active sequence's next token must fit one batch
        self.prefix = list(prefix) if prefix is not None else engine.prefix_tokens()
        # Not a unified KV cache: each sequence's cells lie exactly as in the engine's own context
        # (`Engine.prompt_tokens` checks that every prompt and its longest answer fit n_ctx).
        self.ctx = SequenceContext(engine.llm, engine.config.n_ctx, n_seq, self.n_batch, engine.adapter_handles)
        self.queue: deque[_Job] = deque()
        self.slots: dict[int, _Slot] = {}  # seq_id -> the session decoding in it
        self.free_seqs = list(range(n_seq - 1, -1, -1))  # a stack: pop() hands out 0, 1, ...
        self.kept: dict[int, list[int]] = {}  # a free sequence -> the prompt whose cells it still holds
        self._cv = threading.Condition()
        self._closing = False
        self._admitting = 0
        self.prefix_state = None
        self._worker = threading.Thread(target=self._run, name="bkd-batched", daemon=True)
        self._worker.start()

    # -- the Generator interface ----------------------------------------------------------

    def submit(self, session: Session, knowledge: str = "", examples: str = "", candidates=None, choice=None) -> Future:
        """Queue one session; its future gives the `Generation`. Raises at once if the prompt does
        not fit the context, the queue is full (QueueFull) or the scheduler is closing (Closed)."""
        future: Future = Future()
        if len(session.items) < 2:  # no bundle possible: the model is not asked
            future.set_result(skipped_generation(session))
            return future
        prompt = self.engine.prompt_tokens(session, knowledge, examples)  # raises if it does not fit
        job = _Job(session, prompt, candidates, choice or ChoiceRule(), future)
        with self._cv:
            if self._closing:
                raise Closed("the scheduler is shutting down and takes no more sessions")
            if len(self.queue) >= self.max_queue:
                raise QueueFull(f"{len(self.queue)} sessions are already waiting")
            self.queue.append(job)
            self._cv.notify()
        return future

    def generate(self, session: Session, knowledge: str = "", examples: str = "", candidates=None, choice=None):
        return self.submit(session, knowledge, examples, candidates, choice).result()

    def map(self, jobs: list[tuple[Session, dict]], on_done: Callable[[Generation], None]) -> None:
        """Every job submitted at once, `on_done` as each finishes (completion order, this thread)."""
        from concurrent.futures import as_completed

        futures = [self.submit(s, **inputs) for s, inputs in jobs]
        for f in as_completed(futures):
            on_done(f.result())

    def cancel(self, future: Future) -> None:
        """Give up on a submitted session: dropped from the queue, or its sequence freed at the next step."""
        if future.cancel():
            return
        with self._cv:
            for job in [*self.queue, *(s.job for s in self.slots.values())]:
                if job.future is future:
                    job.abandoned = True

    def check_prompt(self, session: Session, knowledge: str = "", examples: str = "") -> None:
        self.engine.check_prompt(session, knowledge, examples)

    def fits(self, session: Session, knowledge: str = "", examples: str = "") -> bool:
        return self.engine.fits(session, knowledge, examples)

    def warm_prefix(self, knowledge: str = "", state_dir: str | Path | None = None) -> dict:
        return {"tokens": len(self.prefix), "status": "evaluated once for every sequence", "seconds": 0.0}

    def identity(self) -> dict:
        return self.engine.identity()

    def memory(self) -> dict:
        return self.engine.memory()

    def describe(self) -> dict:
        return {**self.engine.describe(), "concurrency": self.n_seq}

    @property
    def queued(self) -> int:
        return len(self.queue)

    @property
    def in_flight(self) -> int:
        """Sessions decoding or being admitted (their prompts prefilled)."""
        return len(self.slots) + self._admitting

    def close(self, drain: bool = True) -> None:
        """Take no more sessions; finish those accepted (`drain`) or cancel them; free the context."""
        with self._cv:
            self._closing = True
            if not drain:
                for job in [*self.queue, *(s.job for s in self.slots.values())]:
                    job.abandoned = True
            self._cv.notify()
        self._worker.join()
        self.ctx.free()

    def __enter__(self) -> Batched:
        return self

    def __exit__(self, *exc) -> None:
        self.close(drain=exc[0] is None)

    # -- the worker -------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self.prefix_state = _prefix_state(self.ctx, self.prefix, self.n_batch) if self.prefix else None
        except BaseException as e:  # every session submitted gets the error, and so will later ones
            with self._cv:
                self._closing = True
            self._fail_all(e)
            return
        while True:
            with self._cv:
                while not self.queue and not self.slots and not self._closing:
                    self._cv.wait()
                if self._closing and not self.queue and not self.slots:
                    return
                admit = []
                while self.queue and self.free_seqs:
                    admit.append((self.queue.popleft(), self.free_seqs.pop()))
            try:
                self._admitting = len(admit)
                for job, seq in admit:
                    self._admit(job, seq)
                    self._admitting -= 1
                self._drop_abandoned()
                self._step()
            except BaseException as e:  # llama.cpp failed: no session in flight can go on
                for job, seq in admit:
                    if seq not in self.slots and seq not in self.free_seqs:
                        self.ctx.remove(seq)
                        self.free_seqs.append(seq)
                    if not job.future.done():
                        job.future.set_exception(e)
                self._fail_all(e)
            finally:
                self._admitting = 0

    def _admit(self, job: _Job, seq: int) -> None:
        """Start a session in sequence `seq`: the shared prefix restored (cut where its prompt leaves
        it), its own tokens prefilled, a compact student's first line chosen."""
        if job.abandoned or not job.future.set_running_or_notify_cancel():
            self.free_seqs.append(seq)
            if job.abandoned:
                job.future.set_exception(CancelledError())
            return
        prompt, session, config = job.prompt, job.session, self.config.prompt
        n_items = len(session.items)
        shared, kept = _shared_len(self.prefix, prompt), _shared_len(self.kept.pop(seq, []), prompt)
        if kept >= shared:  # the last prompt in this sequence shares at least the prefix: keep its cells
            shared = kept
        elif shared:
            self.ctx.remove(seq)
            if not self.ctx.restore(self.prefix_state, seq):
                raise BkdError(f"llama.cpp could not restore the shared prompt prefix into sequence {seq}")
        self.ctx.remove(seq, shared)  # the cells past where this prompt leaves what is kept
        started = time.perf_counter()
        try:
            slot = _Slot(job, seq, max_answer_tokens(n_items, config), None, started, shared, n_past=shared)
            pos = _prefill(self.ctx, seq, prompt, shared, self.n_batch)
            slot.n_past, prefilled = len(prompt), time.perf_counter()
            line = choose_first_line(
                job.candidates, job.choice, config, lambda lines: self._score(slot, pos, lines), job.session
            )
            gbnf = output_grammar(n_items, config)
            if line is not None:
                chosen = self.engine.llm.tokenize((line + "\n").encode("utf-8"), add_bos=False, special=False)
                self.ctx.decode([(seq, slot.n_past + k, t, k == len(chosen) - 1) for k, t in enumerate(chosen)])
                slot.n_past += len(chosen)
                slot.answer, slot.text = list(chosen), bytearray((line + "\n").encode("utf-8"))
                slot.chosen_tokens, slot.chosen_by = len(chosen), job.choice.label
                slot.choose_s = time.perf_counter() - prefilled
                pos = len(chosen) - 1
                gbnf = intents_grammar(line.count("|") + 1, config)
            slot.sampler = GrammarGreedy(self.engine.llm, gbnf)
        except BkdError as e:  # this session only (e.g. a candidate too long for the context)
            self.ctx.remove(seq)
            self.free_seqs.append(seq)
            job.future.set_exception(e)
            return
        self.slots[seq] = slot
        self._take(slot, pos)

    def _score(self, slot: _Slot, pos: int, lines: list[str]) -> list[float]:
        """log P(line + newline | the prompt) for each candidate line, as `Engine.partition_logprobs`
        scores them: each line's tokens evaluated in one batch after the prompt, then dropped again."""
        llm, seq, start = self.engine.llm, slot.seq_id, slot.n_past
        after_prompt = _log_softmax(self.ctx.logits(pos).astype(np.float64))
        out = []
        for line in lines:
            ids = llm.tokenize((line + "\n").encode("utf-8"), add_bos=False, special=False)
            logprob = after_prompt[ids[0]]
            if len(ids) > 1:
                if start + len(ids) > self.config.n_ctx or len(ids) > self.n_batch:
                    raise BkdError(f"a candidate answer of {len(ids)} tokens does not fit the context")
                self.ctx.decode([(seq, start + k, t, True) for k, t in enumerate(ids[:-1])])
                rows = [self.ctx.logits(k).astype(np.float64) for k in range(len(ids) - 1)]
                logprob += sum(_log_softmax(row)[t] for row, t in zip(rows, ids[1:]))
                self.ctx.remove(seq, start)
            out.append(float(logprob))
        return out

    def _step(self) -> None:
        """One decode step: the next token of every session in flight, one llama_decode for all."""
        active = list(self.slots.values())
        if not active:  # every admitted session ended on its first token
            return
        self.ctx.decode([(s.seq_id, s.n_past, s.next_token, True) for s in active])
        for pos, slot in enumerate(active):
            slot.n_past += 1
            self._take(slot, pos)

    def _take(self, slot: _Slot, pos: int) -> None:
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
            self._free(slot)
            slot.job.future.set_result(_generation(slot, finish, now, self.config.prompt))

    def _free(self, slot: _Slot) -> None:
        """Free the sequence's answer cells and its sampler, and hand the sequence id to the next
        session; the prompt's cells stay for it to keep what its prompt shares."""
        prompt = slot.job.prompt
        self.ctx.remove(slot.seq_id, len(prompt))
        self.kept[slot.seq_id] = prompt
        slot.sampler.free()
        del self.slots[slot.seq_id]
        self.free_seqs.append(slot.seq_id)

    def _drop_abandoned(self) -> None:
        for slot in [s for s in self.slots.values() if s.job.abandoned]:
            self._free(slot)
            slot.job.future.set_exception(CancelledError())

    def _fail_all(self, error: BaseException) -> None:
        with self._cv:
            jobs = [*self.queue, *(s.job for s in self.slots.values())]
            self.queue.clear()
            for slot in list(self.slots.values()):
                self._free(slot)
        for job in jobs:
            if not job.future.done():
                job.future.set_exception(error)


@dataclass
class ConcurrentRun:
    generations: list[Generation]  # one per session, in input order
    wall_s: float  # first admission to last answer, wall clock
    concurrency: int

    @property
    def sessions_per_min(self) -> float:
        return 60 * len(self.generations) / self.wall_s if self.wall_s else 0.0


def generate_concurrent(
    engine: Engine,
    sessions: list[Session],
    concurrency: int,
    parts: dict[str, dict] | None = None,
) -> ConcurrentRun:
    """Generate bundles for `sessions` with up to `concurrency` of them decoded together.

    `parts` maps a session id to its `batch.session_inputs` (knowledge, examples, candidates,
    choice); missing ids get none. Returns the same `Generation`s as `engine.generate`, in input order.
    """
    if concurrency < 1:
        raise BkdError(f"concurrency must be at least 1, got {concurrency}")
    parts = parts or {}
    inputs = [parts.get(s.session_id, {}) for s in sessions]
    # Tokenize everything first: a session that does not fit fails the run before any time is spent.
    prompts = [engine.prompt_tokens(s, p.get("knowledge", ""), p.get("examples", "")) for s, p in zip(sessions, inputs)]
    if not sessions:
        return ConcurrentRun([], 0.0, concurrency)
    n_seq = min(concurrency, len(sessions))  # no KV cache for sequences that could never be used
    with Batched(engine, n_seq, _common_prefix(prompts)) as run:
        t0 = time.perf_counter()
        futures = [run.submit(s, **p) for s, p in zip(sessions, inputs)]
        gens = [f.result() for f in futures]
        wall = time.perf_counter() - t0
    return ConcurrentRun(gens, wall, concurrency)


def _generation(slot: _Slot, finish: str, now: float, config) -> Generation:
    prompt = slot.job.prompt
    timing = Timing(
        prompt_tokens=len(prompt),
        prefill_tokens=len(prompt) - slot.prefix_len,  # the shared prefix is evaluated once, up front
        completion_tokens=len(slot.answer),
        ttft_s=(slot.first_at or now) - slot.started,  # from admission, not from submission
        # One llama_decode call serves many sequences, so llama.cpp's prompt/eval timers cannot be split
        # per session: left at 0 (Timing's rates read 0 for them). ttft_s and total_s are the honest numbers.
        prefill_s=0.0,
        decode_s=0.0,
        total_s=now - slot.started,
        chosen_tokens=slot.chosen_tokens,
        choose_s=slot.choose_s,
    )
    raw = slot.text.decode("utf-8", errors="replace")
    return answer_generation(slot.job.session, raw, finish, timing, config, slot.chosen_by)


def _prefill(ctx: SequenceContext, seq: int, prompt: list[int], start: int, n_batch: int) -> int:
    """Evaluate a session's prompt from `start`; return the batch position of its last token's logits.

    Alone, n_batch tokens a call, as the engine does; not in the decode batch: llama.cpp splits a
    batch of several sequences into ubatches holding the same number of tokens of each, so beside
    1-token decodes a prompt is cut into pieces, and a 1-token piece runs another CPU kernel whose
    rounding moved later logits by up to 0.5 (measured): enough to change greedy answers. Prefill
    is compute-bound, so batching it with the decodes would gain little anyway.
    """
    entries: list[tuple[int, int, int, bool]] = []
    for at in range(start, len(prompt), n_batch):
        chunk = prompt[at : at + n_batch]
        last = at + len(chunk) == len(prompt)
        entries = [(seq, at + k, t, last and k == len(chunk) - 1) for k, t in enumerate(chunk)]
        ctx.decode(entries)
    return len(entries) - 1


def _shared_len(prefix: list[int], prompt: list[int]) -> int:
    """How many of the prompt's first tokens are the prefix's, short of its last token (which must
    be evaluated in the session's own sequence to give the logits of its first answer token)."""
    n = min(len(prefix), len(prompt) - 1)
    return next((i for i in range(n) if prefix[i] != prompt[i]), n)


def _common_prefix(prompts: list[list[int]]) -> list[int]:
    """The longest token prefix of all prompts, found on the tokens themselves (no guessing where
    the tokenizer splits)."""
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


__all__ = ["Batched", "Closed", "ConcurrentRun", "QueueFull", "generate_concurrent"]
