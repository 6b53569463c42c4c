"""Generation on inference servers that already exist, through their OpenAI-compatible
/chat/completions: llama.cpp's server (`python -m llama_cpp.server`, `llama-server`), vLLM, Ollama,
a hosted API. Several servers share one run, each with its own concurrency limit.

Each request carries the prompt the in-process engine would build and the same output constraint,
sent the way the server takes it (CONSTRAINTS); decoding is greedy. A server renders the chat
template and owns the KV cache, so nothing here tokenizes. A request that fails is retried with
backoff (`openai_client`); a server that fails for good is dropped and its sessions go to the
others, and when none is left the run stops with the first error, keeping what it finished.

A compact student's candidate partitions are scored by the server's log-probabilities and chosen
as in-process; the scores agree to ~0.1 nat (batched vs one-token evaluation), so a near tie may
choose differently.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .. import BkdError
from ..data import Item, Session
from ..openai_client import BadAnswer, EndpointError, OpenAIClient, PromptTooLong, RetryPolicy, redact_url
from ..prompts import (
    PromptConfig,
    build_messages,
    candidate_lines,
    chosen_line_grammar,
    max_answer_tokens,
    output_grammar,
    output_schema,
)
from .choice import ChoiceRule
from .generation import Generation, Timing, answer_generation, skipped_generation
from .memory import memory_snapshot

# How the output constraint is sent:
#   gbnf         "grammar": GBNF text (llama-cpp-python's server, llama.cpp's llama-server)
#   vllm         "structured_outputs": {"grammar": GBNF} (vLLM >= 0.10)
#   json-schema  "response_format": {"type": "json_schema", ...} (OpenAI, Ollama, vLLM; JSON answers only)
CONSTRAINTS = ("gbnf", "vllm", "json-schema")


@dataclass(frozen=True)
class Server:
    url: str
    concurrency: int = 1  # requests in flight at once on this server


def parse_server(text: str) -> Server:
    """`URL[,concurrency=N]`."""
    url, *opts = text.strip().split(",")
    concurrency = 1
    for opt in opts:
        key, sep, value = opt.partition("=")
        if key.strip() != "concurrency" or not sep:
            raise BkdError(f"server {redact_url(text)!r}: unknown option {opt!r} (known: concurrency=N)")
        value = value.strip()
        concurrency = int(value) if value.isascii() and value.isdigit() and len(value) < 4 else 0
        if not 1 <= concurrency <= 256:
            raise BkdError(f"server {redact_url(text)!r}: concurrency must be a whole number from 1 to 256")
    return Server(url, concurrency)


@dataclass(frozen=True)
class RemoteConfig:
    servers: tuple[Server, ...]
    prompt: PromptConfig = field(default_factory=PromptConfig)
    constraint: str = "gbnf"
    api_key_env: str = ""  # the NAME of the variable holding the key; empty: no auth header
    seed: int = 0
    retry: RetryPolicy = field(default_factory=lambda: RetryPolicy(timeout_s=300.0))

    def __post_init__(self):
        if not self.servers:
            raise BkdError("no server given")
        if self.constraint not in CONSTRAINTS:
            raise BkdError(f"constraint {self.constraint!r}: choose from {', '.join(CONSTRAINTS)}")
        if self.constraint == "json-schema" and self.prompt.answer_format != "json":
            raise BkdError(
                f"constraint json-schema: this student answers in the {self.prompt.answer_format!r} format, which "
                "a JSON schema cannot describe; use gbnf (llama.cpp servers) or vllm"
            )


# A token of an answer under the output grammar is at most this many characters on average (JSON
# punctuation runs, numbers, intent words): a longer answer broke max_tokens or the grammar.
CHARS_PER_TOKEN = 16
OUTSIDE = "(item {} is not in the session)"  # the id an out-of-range item number is recorded under


def server_answer(
    session: Session, raw: str, finish: str, timing: Timing, prompt: PromptConfig, chosen_by: str = ""
) -> Generation:
    """A server's answer as a record. The answer is data: the grammar that pins item numbers to
    1..N and bounds the text is only a request to the server. An answer longer than max_tokens
    allows is refused; item numbers outside the session are kept under ids naming them (so `eval`
    counts them hallucinated) and make the record invalid; intents are cut to the prompt's limit;
    anything the parser cannot read is the record's error."""
    n, sid = len(session.items), session.session_id
    limit = CHARS_PER_TOKEN * max_answer_tokens(n, prompt)
    if len(raw) > limit:
        error = f"answer of {len(raw):,} characters, more than max_tokens allows ({limit:,}); refused"
        return Generation(sid, [], False, error, raw[:limit], timing, chosen_by=chosen_by)
    outside = [x for x in _item_numbers(raw, prompt) if not 1 <= _number(x) <= n]
    if outside:  # ids for the numbers just past the session's items, so the parser keeps them
        last = min(max(map(_number, outside)), n + 64)
        session = Session(sid, session.items + [Item(OUTSIDE.format(k)) for k in range(n + 1, last + 1)])
    try:
        g = answer_generation(session, raw, finish, timing, prompt, chosen_by)
    except Exception as e:  # an answer is untrusted text: a parser failure is this session's error
        return Generation(sid, [], False, f"unreadable answer ({type(e).__name__})", raw, timing, chosen_by=chosen_by)
    for b in g.bundles:
        b["intent"] = b["intent"][: prompt.intent_chars]
    if outside:
        named = ", ".join(repr(x[:12]) for x in outside[:5]) + (" ..." if len(outside) > 5 else "")
        g.valid, g.error = False, f"answer names item numbers outside the session's 1..{n}: {named}"
    return g


def _item_numbers(raw: str, prompt: PromptConfig) -> list[str]:
    """The item numbers an answer gives (as text), as far as it can be read; the parser says the rest."""
    if prompt.answer_format == "compact":
        return raw.strip().split("\n")[0].replace("|", " ").split()
    try:
        obj = json.loads(raw)
    except (ValueError, RecursionError):
        return []
    bundles = obj.get("bundles") if isinstance(obj, dict) else None
    items = [b.get("items") for b in bundles if isinstance(b, dict)] if isinstance(bundles, list) else []
    return [str(x) for group in items if isinstance(group, list) for x in group if isinstance(x, (int, float, str))]


def _number(text: str) -> int:
    """An item number as the parser reads it (ASCII digits), or 0."""
    return int(text) if text.isascii() and text.isdigit() and len(text) < 7 else 0


class RemoteEngine:
    """The engine's `generate`/`map` over servers; what a run records about them in `describe`."""

    def __init__(self, config: RemoteConfig):
        self.config = config
        self.adapters: list[dict] = []  # a server applies its own adapters
        self.clients = [OpenAIClient(s.url, config.retry, config.api_key_env, role="server") for s in config.servers]
        self.models = [c.first_model() for c in self.clients]  # also: every server answers before any work

    def identity(self) -> dict:
        """What must not change between an interrupted run and its --resume (the URLs may)."""
        return {"served_models": sorted(set(self.models)), "constraint": self.config.constraint}

    def check_prompt(self, session: Session, knowledge: str = "", examples: str = "") -> None:
        """Nothing to check here: the server knows its context window. A prompt it refuses as too long
        becomes that session's error record (`map`), and the run goes on."""

    def fits(self, session: Session, knowledge: str = "", examples: str = "") -> bool:
        return True

    def warm_prefix(self, knowledge: str = "", state_dir=None) -> dict:
        return {"tokens": 0, "status": "kept by the server", "seconds": 0.0}

    def _grammar(self, gbnf: str) -> dict:
        if self.config.constraint == "vllm":
            return {"structured_outputs": {"grammar": gbnf}}
        return {"grammar": gbnf, "repeat_penalty": 1.0}  # llama-cpp-python's server defaults to 1.1

    def _line_logprob(self, server: int, request: dict, line: str) -> float:
        """log P(line + newline | prompt): the line forced by a grammar, its tokens' log-probabilities
        as the model gave them before the grammar (llama.cpp's server and vLLM report those)."""
        forced = {"max_tokens": len(line) + 2, **self._grammar(f"root ::= {json.dumps(line + chr(10))}")}
        reply = self.clients[server].chat({**request, **forced, "logprobs": True, "top_logprobs": 1})
        if not reply.logprobs:
            raise EndpointError(
                f"server {self.clients[server].base}: gave no logprobs, which this student's candidate choice needs "
                "(llama_cpp.server: --logits_all true, its default)"
            )
        return sum(reply.logprobs)

    def generate(
        self,
        session: Session,
        knowledge: str = "",
        examples: str = "",
        candidates=None,
        choice: ChoiceRule | None = None,
        server: int = 0,
    ) -> Generation:
        """Bundles for one session from server `server` (an index into the config's servers).

        With a compact student's `candidates`, each distinct first line is scored first (one short
        request each; the server reuses the prompt's KV cache) and chosen as in-process
        (`ChoiceRule.pick`); then the answer is decoded with that line forced.
        """
        if len(session.items) < 2:
            return skipped_generation(session)
        prompt, n = self.config.prompt, len(session.items)
        request = {
            "model": self.models[server],
            "messages": build_messages(session, prompt, knowledge, examples),
            "temperature": 0.0,
            "seed": self.config.seed,
        }
        t0 = time.perf_counter()
        lines, counts = candidate_lines(candidates) if candidates and prompt.answer_format == "compact" else ([], [])
        chosen_by = ""
        if self.config.constraint == "json-schema":
            schema = output_schema(n, prompt)
            constraint = {
                "response_format": {"type": "json_schema", "json_schema": {"name": "bundles", "schema": schema}}
            }  # noqa: E501
        elif lines:
            choice = choice or ChoiceRule()
            scored = choice.uses_student and len(lines) > 1
            scores = [self._line_logprob(server, request, x) for x in lines] if scored else None
            line = choice.pick(lines, scores, counts, session)
            chosen_by = choice.label
            constraint = self._grammar(chosen_line_grammar(line, prompt))
        else:
            constraint = self._grammar(output_grammar(n, prompt))
        chose = time.perf_counter()
        reply = self.clients[server].chat({**request, "max_tokens": max_answer_tokens(n, prompt), **constraint})
        total = time.perf_counter() - t0
        tokens = [int(reply.usage.get(k) or 0) for k in ("prompt_tokens", "completion_tokens")]
        # No streaming: whole requests are the only clock (no TTFT or prefill/decode split).
        timing = Timing(tokens[0], 0, tokens[1], total, 0.0, 0.0, total, choose_s=chose - t0)
        return server_answer(session, reply.text, reply.finish_reason, timing, prompt, chosen_by)

    def map(self, jobs: list[tuple[Session, dict]], on_done: Callable[[Generation], None]) -> None:
        """`generate(session, **inputs)` for every job, each server running up to its concurrency at
        once; `on_done` runs in the caller's thread as each finishes (completion order)."""
        todo: queue.SimpleQueue = queue.SimpleQueue()
        for job in jobs:
            todo.put(job)
        done: queue.SimpleQueue = queue.SimpleQueue()
        down: dict[int, EndpointError] = {}

        def worker(server: int) -> None:
            while server not in down:
                try:
                    session, inputs = todo.get_nowait()
                except queue.Empty:
                    return
                t0 = time.perf_counter()
                try:
                    done.put(self.generate(session, **inputs, server=server))
                except (PromptTooLong, BadAnswer) as e:  # this session's error; the server stays
                    seconds = time.perf_counter() - t0
                    timing = Timing(0, 0, 0, seconds, 0.0, 0.0, seconds)
                    what = "prompt refused" if isinstance(e, PromptTooLong) else "answer refused"
                    done.put(Generation(session.session_id, [], False, f"{what}: {e}", "", timing))
                except EndpointError as e:  # retries spent: this server is gone, another takes the session
                    down.setdefault(server, e)
                    todo.put((session, inputs))
                except BaseException as e:  # a bug: stop the run with it
                    done.put(e)
                    return

        threads = [
            threading.Thread(target=worker, args=(i,), daemon=True, name=f"server{i}")
            for i, s in enumerate(self.config.servers)
            for _ in range(s.concurrency)
        ]
        for t in threads:
            t.start()
        for _ in jobs:
            while True:
                try:
                    result = done.get(timeout=0.2)
                    break
                except queue.Empty:
                    if not any(t.is_alive() for t in threads) and done.empty():
                        raise down[min(down)] from None  # every server failed for good
            if isinstance(result, BaseException):
                raise result
            on_done(result)

    def memory(self) -> dict:
        return memory_snapshot()  # this client's; the servers' memory is theirs to report

    def describe(self) -> dict:
        return {
            "servers": [
                {"url": c.base, "model": m, "concurrency": s.concurrency}
                for c, m, s in zip(self.clients, self.models, self.config.servers)
            ],
            "constraint": self.config.constraint,
            "api_key_env": self.config.api_key_env or None,
            "seed": self.config.seed,
        }
