"""A client of `bkd-edge serve`, as a `Generator`: what runs on the server is its student with its
own pack, so the pack inputs a caller passes (knowledge, examples, candidates) are not sent."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from .. import BkdError
from ..data import Session
from ..runtime.generation import Generation
from ..runtime.memory import memory_snapshot


def request_body(session: Session) -> dict:
    """A session as `POST /v1/bundles` takes it."""
    return {"session_id": session.session_id, "items": [{"id": it.id, "title": it.title} for it in session.items]}


class ServiceClient:
    def __init__(self, url: str, api_key_env: str = "", concurrency: int = 1, timeout_s: float = 300.0):
        self.url, self.concurrency, self.timeout_s = url.rstrip("/"), concurrency, timeout_s
        self.api_key_env = api_key_env
        key = os.environ.get(api_key_env, "") if api_key_env else ""
        self._headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
        # No proxy: the server is named by its address, usually on this machine.
        self._open = urllib.request.build_opener(urllib.request.ProxyHandler({})).open

    def call(self, method: str, path: str, body: dict | None = None) -> dict:
        data = json.dumps(body).encode("utf-8") if body is not None else None
        req = urllib.request.Request(self.url + path, data, self._headers, method=method)
        try:
            with self._open(req, timeout=self.timeout_s) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            detail = e.read().decode("utf-8", errors="replace")[:300]
            raise BkdError(f"{self.url}{path}: HTTP {e.code}: {detail}") from None
        except OSError as e:
            raise BkdError(f"{self.url}{path}: {e}") from None

    def generate(self, session: Session, knowledge="", examples="", candidates=None, choice=None) -> Generation:
        return Generation.from_record(self.call("POST", "/v1/bundles", request_body(session)))

    def map(self, jobs: list[tuple[Session, dict]], on_done: Callable[[Generation], None]) -> None:
        """Up to `concurrency` requests in flight; `on_done` in this thread as each finishes."""
        with ThreadPoolExecutor(self.concurrency) as pool:
            for f in as_completed([pool.submit(self.generate, s) for s, _ in jobs]):
                on_done(f.result())

    def check_prompt(self, session: Session, knowledge: str = "", examples: str = "") -> None:
        """The server checks its own context window (413 when a session does not fit)."""

    def fits(self, session: Session, knowledge: str = "", examples: str = "") -> bool:
        return True

    def warm_prefix(self, knowledge: str = "", state_dir: str | Path | None = None) -> dict:
        return {"tokens": 0, "status": "kept by the server", "seconds": 0.0}

    def identity(self) -> dict:
        return {"served": self.call("GET", "/v1/models")["data"]}

    def memory(self) -> dict:
        return memory_snapshot()  # this client's; the server reports its own in /metrics

    def describe(self) -> dict:
        return {"url": self.url, "api_key_env": self.api_key_env or None, "concurrency": self.concurrency}
