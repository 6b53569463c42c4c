"""A disk cache of teacher calls: one JSON file per call, keyed by sha256 of (model, messages, parameters).

Teacher calls are the expensive, rate-limited part of distillation. Every finished call is written
at once (atomically), so a rerun of the same command costs nothing and an interrupted run resumes
where it stopped. The API key is never part of a key or a record.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from ..files import write_json


def call_key(model: str, messages: list[dict], params: dict) -> str:
    """sha256 of the canonical JSON of what determines a teacher's answer."""
    blob = json.dumps({"model": model, "messages": messages, "params": params}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


@dataclass
class CallStats:
    """Counts over a run. `made` are calls that reached the teacher; `cached` were answered from disk."""

    made: int = 0
    cached: int = 0
    failed: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def __post_init__(self):
        self._lock = threading.Lock()

    def add(self, **counts: int) -> None:
        with self._lock:  # teacher calls run in a thread pool
            for name, n in counts.items():
                setattr(self, name, getattr(self, name) + n)

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def to_dict(self) -> dict:
        return {**asdict(self), "tokens": self.tokens}

    @classmethod
    def from_dict(cls, counts: dict) -> CallStats:
        """The stats `to_dict` wrote (a run's manifest record)."""
        return cls(**{f.name: counts[f.name] for f in fields(cls)})

    def summary(self) -> str:
        return (
            f"teacher calls: {self.made} made, {self.cached} cached, {self.failed} failed, "
            f"{self.retries} retried; {self.tokens:,} tokens ({self.prompt_tokens:,} prompt + "
            f"{self.completion_tokens:,} completion)"
        )


class CallCache:
    """`folder/ab/abcd....json`: the request and the teacher's reply, one file per call."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    def path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict | None:
        path = self.path(key)
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None  # cannot happen with atomic writes; if it does, the call is simply made again
        return record if isinstance(record, dict) and "text" in record else None

    def put(
        self, key: str, model: str, messages: list[dict], params: dict, text: str, usage: dict, finish_reason: str = ""
    ) -> None:
        record = {
            "key": key,
            "model": model,
            "messages": messages,
            "params": params,
            "text": text,
            "usage": usage,
            "finish_reason": finish_reason,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        write_json(self.path(key), record)

    def __len__(self) -> int:
        return sum(1 for _ in self.folder.glob("??/*.json")) if self.folder.exists() else 0
