"""One OpenAI-compatible endpoint (vLLM, llama.cpp's server, Ollama, a hosted API): requests with
retries, backoff and clear errors. Teachers (`knowledge.teachers`) and remote generation
(`runtime.remote`) both talk to servers through it.

Calls are retried with exponential backoff on 429, 5xx, timeouts and connection errors (a
server's Retry-After is honoured); anything else is reported at once. Every error names the URL.
The API key is read from an environment variable whose *name* is configured; the key itself is
only ever put in a request header, never in a file, a cache key or a message, and never follows
a redirect. Credentials written into a URL (`user:password@`, an `api_key=` query) are redacted
from every message and record (`redact_url`); `user:password@` is sent as Basic authentication.

An answer is data: each request has one deadline however slowly its bytes arrive (a socket
timeout is per read), and a body larger than `RetryPolicy.max_answer_bytes` is refused unread.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import re
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass

from . import BkdError


class EndpointError(BkdError):
    """A call failed for good (after any retries); the message names the URL."""


class PromptTooLong(EndpointError):
    """The server refused this request as longer than its context window (the request's fault, not the
    server's: another request may pass)."""


# how OpenAI, vLLM, llama.cpp's servers say a prompt does not fit (HTTP 400/413/422)
_TOO_LONG = (b"context_length_exceeded", b"context length", b"context size", b"context window", b"exceed_context")


class BadAnswer(EndpointError):
    """The server answered this request with something unusable (too large, not JSON, not the expected
    shape): that request's error; the server may answer the next one well."""


class FormatRejected(Exception):
    """The server refused the request's `response_format` (the caller may send another form)."""


class _Retryable(Exception):
    def __init__(self, reason: str, retry_after: float | None = None):
        super().__init__(reason)
        self.reason, self.retry_after = reason, retry_after


@dataclass
class RetryPolicy:
    timeout_s: float = 120.0  # per HTTP request: connecting, sending and the whole answer
    retries: int = 4  # further attempts after the first on 429 / 5xx / timeout / connection error
    backoff_s: float = 1.0  # first wait; doubles each retry
    max_backoff_s: float = 30.0
    max_answer_bytes: int = 8 << 20  # no answer of ours is near this; a larger body is refused unread


@dataclass
class ChatReply:
    text: str
    usage: dict  # {"prompt_tokens": ..., "completion_tokens": ...} as the server reported them
    finish_reason: str
    logprobs: list[float]  # per answer token, when asked for ("logprobs": true) and given


_SECRET_QUERY = re.compile(r"([?&;][^=&;#]*(?:key|token|secret|password|auth|sig)[^=&;#]*=)[^&;#]*", re.IGNORECASE)
_USERINFO = re.compile(r"(//)[^/?#@\s]*@")


def redact_url(text: str) -> str:
    """`text` with the credentials of any URL in it replaced by `***`: `user:password@` and query
    parameters named like a key (api_key, key, token, secret, password, auth, sig)."""
    return _SECRET_QUERY.sub(r"\1***", _USERINFO.sub(r"\1***@", str(text)))


def normalise_base_url(url: str, role: str = "teacher") -> str:
    """`http://host:8080` -> `http://host:8080/v1`; a trailing /chat/completions is dropped, and so are
    the credentials (`user:password@`, the query): see `url_credentials`."""
    try:
        parts = urllib.parse.urlsplit(url.strip())
        good = parts.scheme in ("http", "https") and parts.hostname and (parts.port or True)  # port: ValueError
    except ValueError:
        good = False
    if not good:
        raise BkdError(f"{role} {redact_url(url)!r}: expected http(s)://HOST[:PORT][/PATH]")
    path = parts.path.rstrip("/")
    if path.endswith("/chat/completions"):
        path = path[: -len("/chat/completions")]
    netloc = parts.netloc.rpartition("@")[2]
    return urllib.parse.urlunsplit((parts.scheme, netloc, path or "/v1", "", ""))


def url_credentials(url: str) -> str:
    """The Basic authorization header value of a URL's `user:password@`, or ''."""
    parts = urllib.parse.urlsplit(url.strip())
    if parts.username is None:
        return ""
    pair = f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
    return "Basic " + base64.b64encode(pair.encode("utf-8")).decode("ascii")


def excerpt(body: bytes, limit: int = 300) -> str:
    text = " ".join(body.decode("utf-8", errors="replace").split())
    return text[:limit] + (" ..." if len(text) > limit else "")


def _retry_after(headers) -> float | None:
    try:
        return float(headers.get("Retry-After")) if headers and headers.get("Retry-After") else None
    except ValueError:
        return None  # an HTTP date: fall back to our own backoff


def _lost(e: Exception, timeout: float) -> _Retryable:
    """A request that failed before an HTTP status: what to tell about it."""
    reason = e.reason if isinstance(e, urllib.error.URLError) else e
    if isinstance(reason, (TimeoutError, socket.timeout)):
        return _Retryable(f"timed out after {timeout:g} s")
    if isinstance(reason, ConnectionRefusedError):
        return _Retryable("connection refused (is the server running?)")
    if isinstance(e, urllib.error.URLError):
        return _Retryable(f"cannot connect ({reason})")
    return _Retryable(f"connection lost ({type(e).__name__}: {e})")


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect is an error: urllib would resend the API key to whatever host it names and turn
    a POST into a GET whose answer would be taken as the server's."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None  # urllib then raises the 3xx as an HTTPError


class _Deadline:
    """Shuts a request's socket down when its time is up: a socket timeout bounds each read, not the
    request, so a server sending a byte a second would otherwise hold a request for ever."""

    local = threading.local()  # the deadline of the request this thread is making

    def __init__(self, seconds: float):
        self.seconds, self.fired, self.sock = seconds, False, None
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._fire)
        self._timer.daemon = True

    def __enter__(self):
        _Deadline.local.current = self
        self._timer.start()
        return self

    def __exit__(self, *exc):
        self._timer.cancel()
        _Deadline.local.current = None

    def watch(self, sock) -> None:
        with self._lock:
            self.sock = sock
            if self.fired:
                self._shut()

    def _fire(self) -> None:
        with self._lock:
            self.fired = True
            self._shut()

    def _shut(self) -> None:
        if self.sock is not None:
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def _watched(connection):
    """An http.client connection class whose socket the current request's `_Deadline` can shut."""

    class Watched(connection):
        def connect(self):
            super().connect()
            deadline = getattr(_Deadline.local, "current", None)
            if deadline is not None:
                deadline.watch(self.sock)

    return Watched


class _HTTPHandler(urllib.request.HTTPHandler):
    def http_open(self, req):
        return self.do_open(_watched(http.client.HTTPConnection), req)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def https_open(self, req):
        return self.do_open(_watched(http.client.HTTPSConnection), req, context=self._context)


class OpenAIClient:
    """Requests to one base URL (`.../v1`). Thread-safe: each request opens its own connection."""

    def __init__(
        self,
        url: str,
        policy: RetryPolicy = RetryPolicy(),
        api_key_env: str = "",
        role: str = "teacher",
        on_retry: Callable[[], None] | None = None,
    ):
        self.base = normalise_base_url(url, role)  # without credentials: what every message shows
        self._basic = url_credentials(url)
        self.policy, self.api_key_env, self.role, self.on_retry = policy, api_key_env, role, on_retry
        # A local server is never reached through a proxy from the environment (http_proxy would
        # otherwise send 127.0.0.1 to the proxy too).
        local = urllib.parse.urlsplit(self.base).hostname in ("127.0.0.1", "localhost", "::1")
        handlers = [_NoRedirects(), _HTTPHandler(), _HTTPSHandler()]
        self._opener = urllib.request.build_opener(*handlers, *([urllib.request.ProxyHandler({})] if local else []))

    def _headers(self) -> dict:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        key = os.environ.get(self.api_key_env, "") if self.api_key_env else ""
        if key:
            headers["Authorization"] = f"Bearer {key}"
        elif self._basic:
            headers["Authorization"] = self._basic
        return headers

    def _once(self, url: str, body: dict | None) -> dict:
        data = None if body is None else json.dumps(body).encode("utf-8")
        req = urllib.request.Request(url, data=data, headers=self._headers(), method="GET" if data is None else "POST")
        timeout, limit = self.policy.timeout_s, self.policy.max_answer_bytes
        with _Deadline(timeout) as deadline:
            try:
                with self._opener.open(req, timeout=timeout) as resp:
                    raw = resp.read(limit + 1)
            except urllib.error.HTTPError as e:
                try:
                    text = e.read(64 << 10) or b""
                except (OSError, http.client.HTTPException):
                    text = b""
                if not deadline.fired:
                    self._refused(e, text, url, body)
            except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
                if not deadline.fired:
                    raise _lost(e, timeout) from None
        if deadline.fired:  # it shut the socket: whatever broke after that, the time was up
            raise _Retryable(f"timed out after {timeout:g} s")
        if len(raw) > limit:
            raise BadAnswer(f"{self.role} {url}: answer larger than {limit:,} bytes, refused")
        try:
            return json.loads(raw)
        except (ValueError, RecursionError):  # not JSON, not UTF-8, a number past Python's digit limit
            raise BadAnswer(f"{self.role} {url}: answer is not JSON: {excerpt(raw)}") from None

    def _refused(self, e: urllib.error.HTTPError, text: bytes, url: str, body: dict | None):
        """Raise what an HTTP error status means."""
        if body and body.get("response_format") and e.code in (400, 422, 500) and b"response_format" in text:
            raise FormatRejected(excerpt(text)) from None
        if e.code == 429 or e.code >= 500:
            raise _Retryable(f"HTTP {e.code}: {excerpt(text)}", _retry_after(e.headers)) from None
        if 300 <= e.code < 400:
            where = redact_url(e.headers.get("Location", "?") if e.headers else "?")
            raise EndpointError(
                f"{self.role} {url}: HTTP {e.code} redirect to {where} refused (the API key is never sent "
                f"on to another URL): give the final URL"
            ) from None
        if e.code in (400, 413, 422) and any(m in text.lower() for m in _TOO_LONG):
            raise PromptTooLong(f"{self.role} {url}: HTTP {e.code}: {excerpt(text)}") from None
        hint = " (check the API key variable)" if e.code in (401, 403) else ""
        raise EndpointError(f"{self.role} {url}: HTTP {e.code}{hint}: {excerpt(text)}") from None

    def request(self, path: str, body: dict | None = None) -> dict:
        """GET (no body) or POST `path` with retries; raises EndpointError naming the URL when it fails
        for good, FormatRejected when the server refuses the body's response_format."""
        url = self.base + path
        p = self.policy
        for attempt in range(p.retries + 1):
            try:
                return self._once(url, body)
            except _Retryable as e:
                if attempt == p.retries:
                    tries = f"{attempt + 1} attempt{'s' if attempt else ''}"
                    raise EndpointError(f"{self.role} {url}: {e.reason} ({tries})") from None
                wait = min(p.max_backoff_s, p.backoff_s * 2**attempt)
                if e.retry_after is not None:
                    wait = min(p.max_backoff_s, max(wait, e.retry_after))
                if self.on_retry:
                    self.on_retry()
                time.sleep(wait)
        raise AssertionError("unreachable")

    def first_model(self) -> str:
        """The first model the endpoint's /models lists."""
        listing = self.request("/models")
        data = listing.get("data") if isinstance(listing, dict) else None
        models = [m["id"] for m in data if isinstance(m, dict) and isinstance(m.get("id"), str) and m["id"]] if (
            isinstance(data, list)) else []  # fmt: skip
        if not models:
            raise EndpointError(f"{self.role} {self.base}/models: lists no model; give the model name")
        return str(models[0])

    def chat(self, body: dict) -> ChatReply:
        """POST /chat/completions: the first choice."""
        answer = self.request("/chat/completions", body)
        try:
            choice = answer["choices"][0]
            text = choice["message"].get("content") or ""
            logprobs = [float(t["logprob"]) for t in (choice.get("logprobs") or {}).get("content") or []]
            if not isinstance(text, str):
                raise TypeError
            text.encode("utf-8")  # a lone surrogate ("\\ud800") is no text: it could not even be written
        except (KeyError, IndexError, TypeError, AttributeError, ValueError, OverflowError, UnicodeError):
            shape = excerpt(json.dumps(answer).encode())
            raise BadAnswer(f"{self.role} {self.base}/chat/completions: unexpected answer shape: {shape}") from None
        usage = answer.get("usage") if isinstance(answer.get("usage"), dict) else {}
        usage = {k: v for k, v in usage.items() if isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**31}
        finish = choice.get("finish_reason")
        return ChatReply(text, usage, finish if isinstance(finish, str) else "", logprobs)
