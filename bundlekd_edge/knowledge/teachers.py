"""Teacher clients: any OpenAI-compatible chat-completions endpoint, or a local GGUF through llama.cpp.

    make_teacher("http://127.0.0.1:8080/v1", config)     hosted model, vLLM, llama.cpp's server, Ollama ...
    make_teacher("gguf:path/to/teacher.gguf", config)     in-process llama.cpp (gguf:default = the default model)
    make_teacher("gguf:qwen1.5b", config)                 a pinned local teacher (`runtime/teacher_file.py`)

Both answer `complete(messages, schema=..., max_tokens=..., temperature=...)` with a `Reply`, go
through the same disk cache (keyed by model, messages and parameters) and count calls made,
served from cache and failed, and tokens used. HTTP calls go through `openai_client` (retries with backoff,
errors naming the endpoint, the API key read from a named environment variable).
"""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from .. import BkdError
from ..openai_client import EndpointError, FormatRejected, OpenAIClient, RetryPolicy
from .cache import CallCache, CallStats, call_key

SCHEMA_MODES = ("auto", "json_schema", "json_object", "off")


TeacherError = EndpointError  # a teacher call failed for good (after any retries); names the endpoint


@dataclass
class TeacherConfig:
    model: str = ""  # HTTP: model name; empty = the first model the endpoint's /models lists
    api_key_env: str = "OPENAI_API_KEY"  # the NAME of the variable holding the key; unset = no auth header
    timeout_s: float = 120.0  # per HTTP request
    retries: int = 4  # further attempts after the first on 429 / 5xx / timeout / connection error
    backoff_s: float = 1.0  # first wait; doubles each retry (a server's Retry-After is honoured)
    max_backoff_s: float = 30.0
    concurrency: int = 4  # HTTP calls in flight at once (a GGUF teacher runs one at a time)
    # How a JSON schema is sent: "json_schema" is OpenAI's response_format (vLLM, Ollama, hosted);
    # "json_object" + "schema" is llama-cpp-python's server; "auto" starts with the first and
    # switches once when the server rejects it; "off" sends no schema (the prompt must ask for JSON).
    schema_mode: str = "auto"
    cache_dir: str | Path | None = None  # None: no cache
    n_ctx: int = 4096  # GGUF teacher: context window
    n_threads: int = 0  # GGUF teacher: 0 = all cores


@dataclass
class Reply:
    text: str
    usage: dict  # {"prompt_tokens": ..., "completion_tokens": ...} as the teacher reported them
    cached: bool
    key: str  # the call's cache key (sha256), recorded as provenance
    finish_reason: str = ""


class _Skipped(Exception):
    """A queued call not started because an earlier call of the batch failed for good."""


class Teacher:
    """The cache, the counts and the thread pool; subclasses implement `_call`."""

    name = "teacher"  # what error messages call it: the endpoint URL or gguf:PATH
    model = ""  # the model identity that goes into cache keys and provenance
    max_workers = 1

    def __init__(self, config: TeacherConfig):
        if config.schema_mode not in SCHEMA_MODES:
            raise BkdError(f"schema mode {config.schema_mode!r}: choose from {', '.join(SCHEMA_MODES)}")
        self.config = config
        self.stats = CallStats()
        self.cache = CallCache(config.cache_dir) if config.cache_dir else None

    def _call(self, messages: list[dict], params: dict) -> tuple[str, dict, str]:
        raise NotImplementedError

    def complete(
        self,
        messages: list[dict],
        schema: dict | None = None,
        max_tokens: int = 512,
        temperature: float = 0.0,
        seed: int = 0,
    ) -> Reply:
        params = {"max_tokens": max_tokens, "temperature": temperature, "seed": seed, "schema": schema}
        key = call_key(self.model, messages, params)
        if self.cache is not None and (hit := self.cache.get(key)) is not None:
            self.stats.add(cached=1)
            return Reply(hit["text"], hit.get("usage") or {}, True, key, hit.get("finish_reason", ""))
        try:
            text, usage, finish = self._call(messages, params)
        except BkdError:
            self.stats.add(failed=1)
            raise
        usage = {k: int(usage.get(k) or 0) for k in ("prompt_tokens", "completion_tokens")}
        self.stats.add(made=1, **usage)
        if self.cache is not None:
            self.cache.put(key, self.model, messages, params, text, usage, finish)
        return Reply(text, usage, False, key, finish)

    def map(self, requests: list[dict], on_done=None) -> list[Reply]:
        """`complete(**request)` for each request, `max_workers` at a time; replies in request order.

        The first call that fails for good stops the batch: calls not yet started are skipped,
        calls in flight finish (and are cached), then that first error is raised. `on_done(index,
        reply)` runs in the caller's thread as each call finishes (progress bars, fault injection).
        """
        stop = threading.Event()

        def one(request: dict) -> Reply:
            if stop.is_set():
                raise _Skipped()
            try:
                return self.complete(**request)
            except BaseException:
                stop.set()  # here, in the worker, so no queued call starts after a failure
                raise

        replies: list[Reply | None] = [None] * len(requests)
        first_error: BaseException | None = None
        with ThreadPoolExecutor(max_workers=max(1, self.max_workers), thread_name_prefix="teacher") as pool:
            futures = {pool.submit(one, req): i for i, req in enumerate(requests)}
            for fut in as_completed(futures):
                i = futures[fut]
                try:
                    replies[i] = fut.result()
                except _Skipped:
                    continue
                except BaseException as e:
                    first_error = first_error or e
                    continue
                if on_done:
                    on_done(i, replies[i])
        if first_error is not None:
            raise first_error
        return replies  # type: ignore[return-value]

    def describe(self) -> dict:
        """What goes into a manifest: never the key, only the variable's name."""
        return {"teacher": self.name, "model": self.model}


# ---------------------------------------------------------------- HTTP (OpenAI-compatible)


class HttpTeacher(Teacher):
    def __init__(self, url: str, config: TeacherConfig = TeacherConfig()):
        super().__init__(config)
        policy = RetryPolicy(config.timeout_s, config.retries, config.backoff_s, config.max_backoff_s)
        self.client = OpenAIClient(url, policy, config.api_key_env, "teacher", lambda: self.stats.add(retries=1))
        self.base = self.name = self.client.base
        self.max_workers = config.concurrency
        self._mode = "json_schema" if config.schema_mode == "auto" else config.schema_mode
        self.model = config.model or self.client.first_model()

    def _body(self, messages: list[dict], params: dict, mode: str) -> dict:
        body = {
            "model": self.model,
            "messages": messages,
            "max_tokens": params["max_tokens"],
            "temperature": params["temperature"],
            "seed": params["seed"],
        }
        schema = params.get("schema")
        if schema and mode == "json_schema":
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "answer", "schema": schema, "strict": True},
            }
        elif schema and mode == "json_object":
            body["response_format"] = {"type": "json_object", "schema": schema}
        return body

    def _call(self, messages: list[dict], params: dict) -> tuple[str, dict, str]:
        sent = self._mode  # several threads may hit the rejection; each retries once in the other form
        try:
            reply = self.client.chat(self._body(messages, params, sent))
            return reply.text, reply.usage, reply.finish_reason
        except FormatRejected as e:
            if self.config.schema_mode != "auto" or sent != "json_schema":
                raise TeacherError(f"teacher {self.base}/chat/completions: rejected the response format: {e}") from None
            self._mode = "json_object"  # llama-cpp-python's server: {"type": "json_object", "schema": ...}
            return self._call(messages, params)

    def describe(self) -> dict:
        return {
            "teacher": self.base,
            "model": self.model,
            "api_key_env": self.config.api_key_env,
            "schema_mode": self._mode,
            "concurrency": self.max_workers,
        }


# ---------------------------------------------------------------- local GGUF (llama.cpp)


class GgufTeacher(Teacher):
    """A GGUF model in this process, through the edge runtime's loader (clear errors for bad files).

    llama.cpp contexts are not thread-safe, so calls run one at a time.
    """

    def __init__(self, path: str | Path, config: TeacherConfig = TeacherConfig()):
        super().__init__(config)
        from ..runtime import Engine, EngineConfig
        from ..runtime.teacher_file import pinned_teacher

        self.engine = Engine(path, EngineConfig(n_ctx=config.n_ctx, n_threads=config.n_threads))
        self.path = self.engine.model_path
        self.name = f"gguf:{self.path}"
        local = pinned_teacher(self.path)  # the file was checked against its pin when loaded
        self.label = local.label if local else ""
        # Identity by content, not path: the same file moved keeps its cache, a changed file does not.
        self.model = config.model or f"gguf:{self.path.name}:{self.engine.model_sha256()[:16]}"
        self._lock = threading.Lock()
        self._grammars: dict[str, object] = {}

    def _grammar(self, schema: dict | None):
        """The schema's llama.cpp grammar, built once per schema (building one costs more than a short answer)."""
        if not schema:
            return None
        from ..runtime.llamacpp import json_schema_grammar

        text = json.dumps(schema, sort_keys=True)
        if text not in self._grammars:
            self._grammars[text] = json_schema_grammar(text)
        return self._grammars[text]

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        """The prompt's tokens: special tokens for the chat template's role markers only, never for the
        messages' text (catalogue titles, intents: `<|im_start|>` in a title stays those characters)."""
        return self.engine.chat.prompt_ids(messages)

    def _call(self, messages: list[dict], params: dict) -> tuple[str, dict, str]:
        with self._lock:
            try:
                answer = self.engine.complete(
                    self.prompt_ids(messages),
                    max_tokens=params["max_tokens"],
                    temperature=params["temperature"],
                    seed=params["seed"],
                    grammar=self._grammar(params.get("schema")),
                )
            except (ValueError, RuntimeError) as e:  # e.g. the prompt does not fit n_ctx
                raise TeacherError(f"teacher {self.name}: {e}") from None
        choice = answer["choices"][0]
        return choice.get("text") or "", answer.get("usage") or {}, choice.get("finish_reason") or ""

    def describe(self) -> dict:
        return {"teacher": self.name, "model": self.model, "n_ctx": self.config.n_ctx,
                **({"label": self.label} if self.label else {})}  # fmt: skip


def make_teacher(spec: str, config: TeacherConfig = TeacherConfig()) -> Teacher:
    """`http(s)://...` (OpenAI-compatible) or `gguf:PATH|NAME` (`gguf:default` = the default model,
    `gguf:qwen1.5b` = the local teacher of the `teacher` extra)."""
    spec = spec.strip()
    if spec.startswith(("http://", "https://")):
        return HttpTeacher(spec, config)
    if spec.startswith("gguf:"):
        path = spec[len("gguf:") :]
        if not path:
            raise BkdError("teacher 'gguf:': give a path or a name, e.g. gguf:models/teacher.gguf or gguf:qwen1.5b")
        return GgufTeacher(path, config)
    raise BkdError(f"teacher {spec!r}: expected an http(s):// endpoint URL, gguf:PATH or gguf:qwen1.5b")
