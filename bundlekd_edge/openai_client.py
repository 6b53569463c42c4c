"""One OpenAI-compatible endpoint (vLLM, llama.cpp's server, Ollama, a hosted API): requests with
retries, backoff and clear errors. Teachers (`knowledge.teachers`) and remote generation
(`runtime.remote`) both talk to servers through it.

Calls are retried with exponential backoff on 429, 5xx, timeouts and connection errors (a
server's Retry-After is honoured); anything else is reported at once. Every error names the URL.
The API key is read from an environment variable whose *name* is configured; the key itself is
only ever put in a request header, never in a file, a cache key or a message, and never follows
a redirect.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
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


class FormatRejected(Exception):
    """The server refused the request's `response_format` (the caller may send another form)."""


class _Retryable(Exception):
    def __init__(self, reason: str, retry_after: float | None = None):
        super().__init__(reason)
        self.reason, self.retry_after = reason, retry_after


@dataclass
class RetryPolicy:
    timeout_s: float = 120.0  # per HTTP request
    retries: int = 4  # further attempts after the first on 429 / 5xx / timeout / connection error
    backoff_s: float = 1.0  # first wait; doubles each retry
    max_backoff_s: float = 30.0


@dataclass
class ChatReply:
    text: str
    usage: dict  # {"prompt_tokens": ..., "completion_tokens": ...} as the server reported them
    finish_reason: str
    logprobs: list[float]  # per answer token, when asked for ("logprobs": true) and given


def normalise_base_url(url: str, role: str = "teacher") -> str:
    """`http://host:8080` -> `http://host:8080/v1`; a trailing /chat/completions is dropped."""
    parts = urllib.parse.urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise BkdError(f"{role} {url!r}: expected http(s)://HOST[:PORT][/PATH]")
    path = parts.path.rstrip("/")
    if path.endswith("/chat/completions"):
        path = path[: -len("/chat/completions")]
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path or "/v1", "", ""))


def excerpt(body: bytes, limit: int = 300) -> str:
    text = " ".join(body.decode("utf-8", errors="replace").split())
    return text[:limit] + (" ..." if len(text) > limit else "")


def _retry_after(headers) -> float | None:
    try:
        return float(headers.get("Retry-After")) if headers and headers.get("Retry-After") else None
    except ValueError:
        return None  # an HTTP date: fall back to our own backoff


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect is an error: urllib would resend the API key to whatever host it names and turn
    a POST into a GET whose answer would be taken as the server's."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None  # urllib then raises the 3xx as an HTTPError


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
        self.base = normalise_base_url(url, role)
        self.policy, self.api_key_env, self.role, self.on_retry = policy, api_key_env, role, on_retry
        # A local server is never reached through a proxy from the environment (http_proxy would
        # otherwise send 127.0.0.1 to the proxy too).
        local = urllib.parse.urlsplit(self.base).hostname in ("127.0.0.1", "localhost", "::1")
        handlers = [_NoRedirects()] + ([urllib.request.ProxyHandler({})] if local else [])
        self._opener = urllib.request.build_opener(*handlers)

    def _headers(self) -> dict:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        key = os.environ.get(self.api_key_env, "") if self.api_key_env else ""
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def _once(self, url: str, body: dict | None) -> dict:
        data = None if body is None else json.dumps(body).encode("utf-8")
        req = urllib.request.Request(url, data=data, headers=self._headers(), method="GET" if data is None else "POST")
        timeout = self.policy.timeout_s
        try:
            with self._opener.open(req, timeout=timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            text = e.read() or b""
            if body and body.get("response_format") and e.code in (400, 422, 500) and b"response_format" in text:
                raise FormatRejected(excerpt(text)) from None
            if e.code == 429 or e.code >= 500:
                raise _Retryable(f"HTTP {e.code}: {excerpt(text)}", _retry_after(e.headers)) from None
            if 300 <= e.code < 400:
                where = e.headers.get("Location", "?") if e.headers else "?"
                raise EndpointError(
                    f"{self.role} {url}: HTTP {e.code} redirect to {where} refused (the API key is never sent "
                    f"on to another URL): give the final URL"
                ) from None
            if e.code in (400, 413, 422) and any(m in text.lower() for m in _TOO_LONG):
                raise PromptTooLong(f"{self.role} {url}: HTTP {e.code}: {excerpt(text)}") from None
            hint = " (check the API key variable)" if e.code in (401, 403) else ""
            raise EndpointError(f"{self.role} {url}: HTTP {e.code}{hint}: {excerpt(text)}") from None
        except urllib.error.URLError as e:
            reason = e.reason
            if isinstance(reason, (TimeoutError, socket.timeout)):
                raise _Retryable(f"timed out after {timeout:g} s") from None
            if isinstance(reason, ConnectionRefusedError):
                raise _Retryable("connection refused (is the server running?)") from None
            raise _Retryable(f"cannot connect ({reason})") from None
        except TimeoutError:
            raise _Retryable(f"timed out after {timeout:g} s") from None
        except (ConnectionError, http.client.HTTPException) as e:
            raise _Retryable(f"connection lost ({type(e).__name__}: {e})") from None
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise _Retryable(f"answer is not JSON: {excerpt(raw)}") from None

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
        models = [m.get("id") for m in listing.get("data") or [] if isinstance(m, dict) and m.get("id")]
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
        except (KeyError, IndexError, TypeError, AttributeError, ValueError):
            shape = excerpt(json.dumps(answer).encode())
            raise EndpointError(f"{self.role} {self.base}/chat/completions: unexpected answer shape: {shape}") from None
        usage = answer.get("usage") if isinstance(answer.get("usage"), dict) else {}
        return ChatReply(text, usage, choice.get("finish_reason") or "", logprobs)
