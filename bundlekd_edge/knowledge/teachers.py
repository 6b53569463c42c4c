"""Teacher clients: any OpenAI-compatible chat-completions endpoint, or a local GGUF through llama.cpp.

    make_teacher("http://127.0.0.1:8080/v1", config)     hosted model, vLLM, llama.cpp's server, Ollama ...
    make_teacher("gguf:path/to/teacher.gguf", config)     in-process llama.cpp (gguf:default = the default model)

Both answer `complete(messages, schema=..., max_tokens=..., temperature=...)` with a `Reply`, go
through the same disk cache (keyed by model, messages and parameters) and count calls made,
served from cache and failed, and tokens used. HTTP calls are retried with exponential backoff on
429, 5xx, timeouts and connection errors; anything else is reported at once. Every error names
the endpoint. The API key is read from an environment variable whose *name* is configured; the
key itself is only ever put in a request header, never in a file, a cache key or a message.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from .. import BkdError
from .cache import CallCache, CallStats, call_key

SCHEMA_MODES = ("auto", "json_schema", "json_object", "off")


class TeacherError(BkdError):
    """A teacher call failed for good (after any retries); the message names the endpoint."""


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


class _Retryable(Exception):
    def __init__(self, reason: str, retry_after: float | None = None):
        super().__init__(reason)
        self.reason, self.retry_after = reason, retry_after


class _SchemaRejected(Exception):
    pass


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


def normalise_base_url(url: str) -> str:
    """`http://host:8080` -> `http://host:8080/v1`; a trailing /chat/completions is dropped."""
    parts = urllib.parse.urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise BkdError(f"teacher {url!r}: expected http(s)://HOST[:PORT][/PATH]")
    path = parts.path.rstrip("/")
    if path.endswith("/chat/completions"):
        path = path[: -len("/chat/completions")]
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path or "/v1", "", ""))


def _excerpt(body: bytes, limit: int = 300) -> str:
    text = " ".join(body.decode("utf-8", errors="replace").split())
    return text[:limit] + (" ..." if len(text) > limit else "")


def _retry_after(headers) -> float | None:
    try:
        return float(headers.get("Retry-After")) if headers and headers.get("Retry-After") else None
    except ValueError:
        return None  # an HTTP date: fall back to our own backoff


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect is an error: urllib would resend the API key to whatever host it names and turn
    a POST into a GET whose answer would be cached as the teacher's."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None  # urllib then raises the 3xx as an HTTPError


class HttpTeacher(Teacher):
    def __init__(self, url: str, config: TeacherConfig = TeacherConfig()):
        super().__init__(config)
        self.base = normalise_base_url(url)
        self.name = self.base
        # A local server is never reached through a proxy from the environment (http_proxy would
        # otherwise send 127.0.0.1 to the proxy too).
        local = urllib.parse.urlsplit(self.base).hostname in ("127.0.0.1", "localhost", "::1")
        handlers = [_NoRedirects()] + ([urllib.request.ProxyHandler({})] if local else [])
        self._opener = urllib.request.build_opener(*handlers)
        self.max_workers = config.concurrency
        self._mode = "json_schema" if config.schema_mode == "auto" else config.schema_mode
        self.model = config.model or self._discover_model()

    def _headers(self) -> dict:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        key = os.environ.get(self.config.api_key_env, "") if self.config.api_key_env else ""
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def _once(self, url: str, body: dict | None) -> dict:
        data = None if body is None else json.dumps(body).encode("utf-8")
        req = urllib.request.Request(url, data=data, headers=self._headers(), method="GET" if data is None else "POST")
        try:
            with self._opener.open(req, timeout=self.config.timeout_s) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            text = e.read() or b""
            if body and body.get("response_format") and e.code in (400, 422, 500) and b"response_format" in text:
                raise _SchemaRejected(_excerpt(text)) from None
            if e.code == 429 or e.code >= 500:
                raise _Retryable(f"HTTP {e.code}: {_excerpt(text)}", _retry_after(e.headers)) from None
            if 300 <= e.code < 400:
                where = e.headers.get("Location", "?") if e.headers else "?"
                raise TeacherError(
                    f"teacher {url}: HTTP {e.code} redirect to {where} refused (the API key is never sent "
                    "on to another URL): give the final URL as the teacher"
                ) from None
            hint = " (check the API key variable)" if e.code in (401, 403) else ""
            raise TeacherError(f"teacher {url}: HTTP {e.code}{hint}: {_excerpt(text)}") from None
        except urllib.error.URLError as e:
            reason = e.reason
            if isinstance(reason, (TimeoutError, socket.timeout)):
                raise _Retryable(f"timed out after {self.config.timeout_s:g} s") from None
            if isinstance(reason, ConnectionRefusedError):
                raise _Retryable("connection refused (is the server running?)") from None
            raise _Retryable(f"cannot connect ({reason})") from None
        except TimeoutError:
            raise _Retryable(f"timed out after {self.config.timeout_s:g} s") from None
        except (ConnectionError, http.client.HTTPException) as e:
            raise _Retryable(f"connection lost ({type(e).__name__}: {e})") from None
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise _Retryable(f"answer is not JSON: {_excerpt(raw)}") from None

    def _request(self, path: str, body: dict | None = None) -> dict:
        """One request with retries; raises TeacherError naming the URL when it fails for good."""
        url = self.base + path
        for attempt in range(self.config.retries + 1):
            try:
                return self._once(url, body)
            except _Retryable as e:
                if attempt == self.config.retries:
                    tries = f"{attempt + 1} attempt{'s' if attempt else ''}"
                    raise TeacherError(f"teacher {url}: {e.reason} ({tries})") from None
                wait = min(self.config.max_backoff_s, self.config.backoff_s * 2**attempt)
                if e.retry_after is not None:
                    wait = min(self.config.max_backoff_s, max(wait, e.retry_after))
                self.stats.add(retries=1)
                time.sleep(wait)
        raise AssertionError("unreachable")

    def _discover_model(self) -> str:
        listing = self._request("/models")
        models = [m.get("id") for m in listing.get("data") or [] if isinstance(m, dict) and m.get("id")]
        if not models:
            raise TeacherError(f"teacher {self.base}/models: lists no model; give the model name (--teacher-model)")
        return str(models[0])

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
            answer = self._request("/chat/completions", self._body(messages, params, sent))
        except _SchemaRejected as e:
            if self.config.schema_mode != "auto" or sent != "json_schema":
                raise TeacherError(f"teacher {self.base}/chat/completions: rejected the response format: {e}") from None
            self._mode = "json_object"  # llama-cpp-python's server: {"type": "json_object", "schema": ...}
            return self._call(messages, params)
        try:
            choice = answer["choices"][0]
            text = choice["message"].get("content") or ""
        except (KeyError, IndexError, TypeError, AttributeError):
            shape = _excerpt(json.dumps(answer).encode())
            raise TeacherError(f"teacher {self.base}/chat/completions: unexpected answer shape: {shape}") from None
        return text, answer.get("usage") or {}, choice.get("finish_reason") or ""

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

        self.engine = Engine(path, EngineConfig(n_ctx=config.n_ctx, n_threads=config.n_threads))
        self.path = self.engine.model_path
        self.name = f"gguf:{self.path}"
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

    def _call(self, messages: list[dict], params: dict) -> tuple[str, dict, str]:
        with self._lock:
            try:
                answer = self.engine.llm.create_chat_completion(
                    messages=messages,
                    max_tokens=params["max_tokens"],
                    temperature=params["temperature"],
                    seed=params["seed"],
                    grammar=self._grammar(params.get("schema")),
                )
            except (ValueError, RuntimeError) as e:  # e.g. the prompt does not fit n_ctx
                raise TeacherError(f"teacher {self.name}: {e}") from None
        choice = answer["choices"][0]
        return choice["message"].get("content") or "", answer.get("usage") or {}, choice.get("finish_reason") or ""

    def describe(self) -> dict:
        return {"teacher": self.name, "model": self.model, "n_ctx": self.config.n_ctx}


def make_teacher(spec: str, config: TeacherConfig = TeacherConfig()) -> Teacher:
    """`http(s)://...` (OpenAI-compatible) or `gguf:PATH` (`gguf:default` = the default model)."""
    spec = spec.strip()
    if spec.startswith(("http://", "https://")):
        return HttpTeacher(spec, config)
    if spec.startswith("gguf:"):
        path = spec[len("gguf:") :]
        if not path:
            raise BkdError("teacher 'gguf:': give a path, e.g. gguf:models/teacher.gguf")
        return GgufTeacher(path, config)
    raise BkdError(f"teacher {spec!r}: expected an http(s):// endpoint URL or gguf:PATH")
