"""The edge engine: one llama.cpp model, greedy schema-constrained bundle generation, timings, memory.

Imports neither torch nor transformers: this is what runs on a laptop.

Prompts are rendered with the chat template stored in the GGUF and tokenized here, so we know
the exact token count before generating (a session that does not fit is an error, never a
silently cut prompt). The static part of the prompt comes first and the engine never resets
the model between sessions: it reuses the KV cache of the longest token prefix a prompt shares
with the one before, so a shared prefix is evaluated once. Answers are decoded greedily under
the output grammar, the cheap way round (`llamacpp.GrammarGreedy`).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import BkdError
from ..data import Item, Session
from ..files import sha256_file
from ..prompts import (
    PromptConfig,
    build_messages,
    intents_grammar,
    max_answer_tokens,
    output_grammar,
)
from . import llamacpp
from .adapters import AdapterSpec, check_adapter
from .chat import ChatTokenizer
from .choice import ChoiceRule, choose_first_line
from .generation import Generation, Timing, answer_generation, skipped_generation
from .llamacpp import GrammarGreedy
from .memory import memory_snapshot
from .model_file import check_gguf_magic, inspect_gguf, resolve_model


@dataclass(frozen=True)
class EngineConfig:
    n_ctx: int = 2048
    n_threads: int = 0  # 0: every core the process may use
    n_batch: int = 512
    seed: int = 0
    n_gpu_layers: int = 0  # layers offloaded to a GPU (-1: all); 0, or a CPU-only llama.cpp: none
    prompt: PromptConfig = field(default_factory=PromptConfig)
    adapters: tuple[AdapterSpec, ...] = ()  # LoRA adapters applied over the model, in order
    # Evaluate the text the grammar forces in batches (`Engine._decode`). Off by default: the tokens
    # are greedy's, but a batch's CPU kernels round differently from one token at a time, which
    # changed 3 of 24 untuned JSON answers (none with one token at a time), so answers would no
    # longer match a llama.cpp server or `create_completion` byte for byte. Several sessions decoded
    # at once (runtime/concurrent.py) step one token each, without it.
    jump_forward: bool = False


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max()
    return shifted - np.log(np.exp(shifted).sum())


def default_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class Engine:
    """A loaded model that turns sessions into bundles."""

    def __init__(self, model: str | Path = "default", config: EngineConfig = EngineConfig()):
        self.config = config
        self.model_path = check_gguf_magic(resolve_model(model))
        threads = config.n_threads or default_threads()
        t0 = time.perf_counter()
        try:
            self.llm = llamacpp.load_model(self.model_path, config.n_ctx, config.n_batch, threads, config.seed,
                                           config.n_gpu_layers)  # fmt: skip
        except (ValueError, RuntimeError) as e:
            inspect_gguf(self.model_path)  # raises a precise error for a damaged or truncated file
            raise BkdError(f"{self.model_path}: llama.cpp could not load this model ({e})") from None
        self._sha256: str | None = None
        self.adapters = self._apply_adapters(config.adapters)
        self.load_s = time.perf_counter() - t0
        self.threads = threads
        self.model_size = self.model_path.stat().st_size
        self.chat = ChatTokenizer(self.llm, self.model_path)

    def _apply_adapters(self, specs: tuple[AdapterSpec, ...]) -> list[dict]:
        """Check each adapter against this model, load it with llama.cpp's adapter API and set them
        all on the context. llama.cpp frees the adapters with the model."""
        self.adapter_handles: tuple = ((), ())  # (handles, scales), for other contexts (runtime/concurrent.py)
        if not specs:
            return []
        loaded, handles = [], []
        arch = self.llm.metadata.get("general.architecture")
        for spec in specs:
            info = check_adapter(spec.path, self.model_path, self.model_sha256(), arch, shapes=False)
            handle = llamacpp.load_adapter(self.llm, spec.path)
            if not handle:  # llama.cpp refused a tensor name or shape: say which one
                check_adapter(spec.path, self.model_path, self.model_sha256())
                raise BkdError(f"{spec.path}: llama.cpp could not load this adapter")
            handles.append(handle)
            loaded.append({**info, "scale": spec.scale})
        self.adapter_handles = (handles, [s.scale for s in specs])
        if not llamacpp.set_adapters(self.llm, *self.adapter_handles):
            raise BkdError("llama.cpp could not set the LoRA adapters on the context")
        return loaded

    # -- prompt -------------------------------------------------------------------------

    def prompt_tokens(self, session: Session, knowledge: str = "", examples: str = "") -> list[int]:
        """The exact tokens the model sees for this session; raises if they do not fit the context."""
        messages = build_messages(session, self.config.prompt, knowledge, examples)
        tokens = self._tokenize_chat(messages)
        need = len(tokens) + max_answer_tokens(len(session.items), self.config.prompt)
        if need > self.config.n_ctx:
            raise BkdError(
                f"session {session.session_id!r} does not fit the context window: {len(tokens)} prompt tokens "
                f"+ up to {need - len(tokens)} answer tokens > n_ctx {self.config.n_ctx} "
                "(raise --n-ctx or use a smaller pack)"
            )
        return tokens

    def check_prompt(self, session: Session, knowledge: str = "", examples: str = "") -> None:
        """Raises, saying why, if this session's prompt does not fit the context."""
        self.prompt_tokens(session, knowledge, examples)

    def fits(self, session: Session, knowledge: str = "", examples: str = "") -> bool:
        try:
            self.prompt_tokens(session, knowledge, examples)
            return True
        except BkdError:
            return False

    def _tokenize_chat(self, messages: list[dict]) -> list[int]:
        return self.chat.prompt_ids(messages)

    def prefix_tokens(self, knowledge: str = "") -> list[int]:
        """The tokens every session's prompt starts with, for this knowledge.

        Found as the common token prefix of two different sessions' prompts, so it is exactly
        what llama.cpp will match (no guessing where the tokenizer splits the boundary).
        """
        a, b = (Session(s, [Item(s, s)]) for s in ("a", "b"))
        ta = self._tokenize_chat(build_messages(a, self.config.prompt, knowledge))
        tb = self._tokenize_chat(build_messages(b, self.config.prompt, knowledge))
        n = next((i for i, (x, y) in enumerate(zip(ta, tb)) if x != y), min(len(ta), len(tb)))
        return ta[:n]

    def warm_prefix(self, knowledge: str = "", state_dir: str | Path | None = None) -> dict:
        """Put the static prefix into the KV cache: from a persisted state when one matches, else
        by evaluating it (and persisting it when `state_dir` is given)."""
        from .prefix_cache import load_prefix_state, save_prefix_state

        tokens = self.prefix_tokens(knowledge)
        if len(tokens) >= self.config.n_ctx:
            raise BkdError(f"the static prompt prefix is {len(tokens)} tokens, the context window {self.config.n_ctx}")
        t0 = time.perf_counter()
        status = load_prefix_state(self, tokens, state_dir) if state_dir else "not persisted"
        if status != "loaded":
            self.forget()
            self.llm.eval(tokens)
            if state_dir:
                try:
                    save_prefix_state(self, tokens, state_dir)
                except OSError:  # a read-only install (a shipped student's pack): the state is only a speed-up
                    status = f"{status}; not persisted ({state_dir} is not writable)"
        return {"tokens": len(tokens), "status": status, "seconds": time.perf_counter() - t0}

    def forget(self) -> None:
        """Empty the KV cache: the next prompt is evaluated whole (what a cold start pays)."""
        llamacpp.forget(self.llm)

    def model_sha256(self) -> str:
        if self._sha256 is None:
            self._sha256 = sha256_file(self.model_path)
        return self._sha256

    # -- generation ---------------------------------------------------------------------

    def generate(
        self,
        session: Session,
        knowledge: str = "",
        examples: str = "",
        candidates: list[list[list[int]]] | None = None,
        choice: ChoiceRule | None = None,
    ) -> Generation:
        """Bundles for one session, decoded greedily under the output grammar.

        With `candidates` (partitions of item numbers, e.g. a pack's hint at several cuts) and the
        compact answer format, the answer's first line is not decoded but chosen: the candidate
        with the highest expected strict F1 (`choose_partition`), under the student's own
        probabilities of the candidates when the pack's `choice` rule uses them (the default).
        Only the intents are then decoded.
        A session of fewer than 2 items holds no bundle: it is skipped, the model is not asked.
        """
        choice = choice or ChoiceRule()
        if len(session.items) < 2:
            return skipped_generation(session)
        tokens = self.prompt_tokens(session, knowledge, examples)
        n_items, prompt = len(session.items), self.config.prompt
        max_tokens = max_answer_tokens(n_items, prompt)
        t0 = time.perf_counter()
        n_prefill = self._eval_prompt(tokens)
        prefilled = time.perf_counter()
        chosen: list[int] = []  # answer tokens chosen, not decoded: the compact answer's first line
        chosen_by = ""
        gbnf = output_grammar(n_items, prompt)
        line = choose_first_line(candidates, choice, prompt, self.partition_logprobs, session)
        if line is not None:
            chosen_by = choice.label
            chosen = self.llm.tokenize((line + "\n").encode("utf-8"), add_bos=False, special=False)
            self.llm.eval(chosen)
            gbnf = intents_grammar(line.count("|") + 1, prompt)
        chose = time.perf_counter()
        sampler = GrammarGreedy(self.llm, gbnf)  # < 1 ms
        try:
            answer, finish, n_forced, first, last = self._decode(sampler, max_tokens - len(chosen))
        finally:
            sampler.free()
        total = time.perf_counter() - t0
        answer = chosen + answer
        timing = Timing(
            prompt_tokens=len(tokens),
            prefill_tokens=n_prefill,
            completion_tokens=len(answer),
            ttft_s=first - t0,
            prefill_s=prefilled - t0,
            decode_s=last - first,
            total_s=total,
            chosen_tokens=len(chosen),
            forced_tokens=n_forced,
            choose_s=chose - prefilled,
        )
        raw = self.llm.detokenize(answer).decode("utf-8", errors="replace")
        return answer_generation(session, raw, finish, timing, prompt, chosen_by)

    def _decode(self, sampler: GrammarGreedy, max_tokens: int) -> tuple[list[int], str, int, float, float]:
        """Greedy decoding under the sampler's grammar, after the prompt now in the cache:
        (answer tokens, finish reason, how many the grammar forced, time of the first and last).

        Jump-forward: text the grammar forces (JSON keys, brackets) is drafted and evaluated in
        one batch with the token before it, then kept as far as greedy would have chosen it
        (`GrammarGreedy.take_draft`): the same tokens as one decode step per token, in fewer steps.
        """
        llm, answer, n_forced, first = self.llm, [], 0, 0.0
        logits, rows, before = llamacpp.last_logits(llm).copy(), [], []  # `before`: the last token, not evaluated yet
        while True:
            draft = sampler.draft() if self.config.jump_forward else []
            draft = draft if len(answer) + len(draft) < max_tokens else []  # the context holds max_tokens
            if before or draft:
                rows = llamacpp.eval_rows(llm, before + draft)  # the logits after each of them
                if before:
                    logits, rows = rows[0], rows[1:]
            kept, token = sampler.take_draft(logits, draft, rows)
            if kept < len(draft):  # greedy left the draft: drop the cells of the draft tokens it did not take
                llamacpp.drop_last(llm, len(draft) - kept)
            answer += draft[:kept]
            n_forced += kept
            last = time.perf_counter()
            first = first or last
            if llamacpp.is_end(llm, token):  # the end token is neither text nor counted
                return answer, "stop", n_forced, first, last
            answer.append(token)
            if len(answer) >= max_tokens:
                return answer, "length", n_forced, first, last
            before = [token]

    def complete(self, prompt: list[int], **params) -> dict:
        """An OpenAI-style completion of these prompt tokens with llama-cpp-python's own sampling
        (a local teacher: `self.chat.prompt_ids` gives its tokens, special tokens off for the text)."""
        return llamacpp.completion(self.llm, prompt, **params)

    def map(self, jobs: list[tuple[Session, dict]], on_done) -> None:
        """`generate(session, **inputs)` for every job, one after another, `on_done` after each."""
        for session, inputs in jobs:
            on_done(self.generate(session, **inputs))

    def partition_logprobs(self, lines: list[str]) -> list[float]:
        """log P(line + newline | the prompt now in the KV cache) for each compact first line.

        Each line is evaluated in one batch after the prompt (all its positions' logits), then its
        KV cells are dropped again, so the prompt's cache is what the next line and the answer see.
        """
        llm, start = self.llm, self.llm.n_tokens
        after_prompt = _log_softmax(llamacpp.last_logits(llm).astype(np.float64))  # a copy: decodes overwrite it
        out = []
        for line in lines:
            ids = llm.tokenize((line + "\n").encode("utf-8"), add_bos=False, special=False)
            logprob = after_prompt[ids[0]]
            if len(ids) > 1:
                if start + len(ids) > self.config.n_ctx or len(ids) > self.config.n_batch:
                    raise BkdError(f"a candidate answer of {len(ids)} tokens does not fit the context")
                rows = llamacpp.logits_of(llm, ids[:-1], start)
                logprob += sum(_log_softmax(row)[t] for row, t in zip(rows, ids[1:]))
            out.append(float(logprob))
        llamacpp.drop_cells_from(llm, start)
        return out

    def candidate_logprobs(
        self, session: Session, lines: list[str], knowledge: str = "", examples: str = ""
    ) -> list[float]:
        """log P(line | this session's prompt) for each candidate first line, nothing decoded
        (what a pack's calibration ranks the choice rules by)."""
        self._eval_prompt(self.prompt_tokens(session, knowledge, examples))
        return self.partition_logprobs(lines)

    def _eval_prompt(self, tokens: list[int]) -> int:
        """Evaluate the prompt after the longest prefix it shares with the tokens already in the KV
        cache (the static prefix, after the first session); return how many were evaluated."""
        return llamacpp.eval_after_cached(self.llm, tokens)

    def identity(self) -> dict:
        """What must not change between an interrupted run and its --resume."""
        return {
            "model_sha256": self.model_sha256(),
            "adapters": [[a["sha256"], a["scale"]] for a in self.adapters],
            "n_ctx": self.config.n_ctx,
            "jump_forward": self.config.jump_forward,
        }

    def memory(self) -> dict:
        return {**memory_snapshot(), "model_file_bytes": self.model_size}

    def offload(self) -> dict:
        """Layers offloaded to a GPU (-1: all) and the device llama.cpp runs them on ("CPU": none)."""
        return {"gpu_layers": self.config.n_gpu_layers, "device": llamacpp.offload_device(self.config.n_gpu_layers)}

    def describe(self) -> dict:
        """What produced a result: enough to reproduce it."""
        return {
            "model": str(self.model_path),
            "model_file_bytes": self.model_size,
            "adapters": [{k: a[k] for k in ("file", "sha256", "scale", "bytes")} for a in self.adapters],
            "n_ctx": self.config.n_ctx,
            "threads": self.threads,
            "seed": self.config.seed,
            "jump_forward": self.config.jump_forward,
            **self.offload(),
            "load_s": round(self.load_s, 3),
            **llamacpp.build_info(),
        }
