"""Run an engine over many sessions: predictions file, progress bar, latency and memory summary."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
from tqdm import tqdm

from ..data import Session
from ..files import RecordLog
from .choice import ChoiceRule
from .engine import Engine, Generation

if TYPE_CHECKING:
    from .remote import RemoteEngine


class Pack(Protocol):
    """What a run takes from a prompt pack (`bundlekd_edge.packs.Pack`, above the runtime)."""

    static: str  # the knowledge every prompt starts with
    state_dir: Path  # where the prefix's KV state is persisted

    def prompt_parts(self, session: Session, fits: Callable[[str, str], bool]) -> tuple[str, str]: ...

    def candidates(self, session: Session) -> list[list[list[int]]]: ...

    choice: ChoiceRule  # how its candidates are chosen among (its calibration)
    prepared_s: dict[str, float]  # session id -> seconds its hint took ahead of the run (`prepare`)


def run_sessions(
    engine: Engine | RemoteEngine,
    sessions: list[Session],
    log: RecordLog | None = None,
    pack: Pack | None = None,
    progress: bool = True,
) -> list[Generation]:
    """Generate bundles for every session not yet in `log` (a resumed run's finished records),
    appending each record to the log as it is made, so a kill loses only the session in flight.

    With a pack, its static knowledge is put in the KV cache first (restored from the pack's
    persisted state when one matches) and each session gets its nearest examples. Every prompt
    is checked against the context before any time is spent generating.
    """
    todo = [s for s in sessions if not log or s.session_id not in log.done]
    knowledge = pack.static if pack else ""
    parts, prepare_s = {}, {}
    for s in todo:
        parts[s.session_id], prepare_s[s.session_id] = timed_inputs(engine, s, pack)
        if len(s.items) >= 2:  # raises with the reason if it does not fit
            engine.check_prompt(s, parts[s.session_id]["knowledge"], parts[s.session_id]["examples"])
    if pack and todo:
        engine.warm_prefix(knowledge, pack.state_dir)
    gens: list[Generation] = []
    bar = tqdm(total=len(todo), desc="generate", unit="session", disable=not progress, file=sys.stderr,
               dynamic_ncols=True)  # fmt: skip

    def finished(g: Generation) -> None:
        g = g.with_prepare(prepare_s[g.session_id])
        gens.append(g)
        if log:
            log.append(g.to_record())
        bar.update()
        bar.set_postfix(p50=f"{np.median([x.timing.total_s for x in gens]):.2f}s", refresh=False)

    try:
        engine.map([(s, parts[s.session_id]) for s in todo], finished)
    finally:
        bar.close()
    return gens


def session_inputs(engine: Engine, session: Session, pack: Pack | None) -> dict:
    """What `engine.generate` takes besides the session: the pack's knowledge and examples for it
    (trimmed to fit the context) and, for a compact-answer student, the candidate partitions of
    its hint (a JSON student decodes its answer: no candidates to compute)."""
    if pack is None:
        return {"knowledge": "", "examples": "", "candidates": None}
    knowledge, examples = pack.prompt_parts(session, lambda k, e: engine.fits(session, k, e))
    if engine.config.prompt.answer_format != "compact":
        return {"knowledge": knowledge, "examples": examples, "candidates": None}
    return {"knowledge": knowledge, "examples": examples, "candidates": pack.candidates(session), "choice": pack.choice}


def timed_inputs(engine: Engine, session: Session, pack: Pack | None) -> tuple[dict, float]:
    """`session_inputs` and the seconds this session's inputs took: now, and in the pack's
    `prepare` where its hint was computed ahead (`Generation.with_prepare` counts them in)."""
    t0 = time.perf_counter()
    inputs = session_inputs(engine, session, pack)
    return inputs, time.perf_counter() - t0 + (pack.prepared_s.pop(session.session_id, 0.0) if pack else 0.0)


def _pct(values, q) -> float:
    return float(np.percentile(values, q)) if values else 0.0


def latency_summary(gens: list[Generation], engine: Engine | RemoteEngine, wall_s: float = 0.0) -> dict:
    """Per-session latency percentiles, token rates over the whole run, memory now and at peak
    (sessions skipped without a model call, too small for a bundle, are not timed). Sessions per
    minute are over `wall_s` when given (sessions run concurrently), else over the summed latency."""
    t = [g.timing for g in gens if not g.skipped]
    total = [x.total_s for x in t]
    ttft = [x.ttft_s for x in t]
    prefill_s = sum(x.prefill_s for x in t)
    decode_s = sum(x.decode_s for x in t)
    return {
        "sessions": len(gens),
        "skipped": sum(bool(g.skipped) for g in gens),
        "valid_rate": sum(g.valid for g in gens) / len(gens) if gens else 0.0,
        "latency_p50_s": _pct(total, 50),
        "latency_p95_s": _pct(total, 95),
        "ttft_p50_s": _pct(ttft, 50),
        "ttft_p95_s": _pct(ttft, 95),
        "prompt_tokens_mean": float(np.mean([x.prompt_tokens for x in t])) if t else 0.0,
        "completion_tokens_mean": float(np.mean([x.completion_tokens for x in t])) if t else 0.0,
        "prefill_tps": sum(x.prefill_tokens for x in t) / prefill_s if prefill_s else 0.0,
        "decode_tps": sum(max(x.decoded_tokens - 1, 0) for x in t) / decode_s if decode_s else 0.0,
        "sessions_per_min": 60 * len(t) / (wall_s or sum(total)) if total else 0.0,
        **engine.memory(),
    }


LATENCY_ROWS = [
    ("latency_p50_s", "per-session latency p50 (s)", ".3f"),
    ("latency_p95_s", "per-session latency p95 (s)", ".3f"),
    ("ttft_p50_s", "time to first token p50 (s)", ".3f"),
    ("ttft_p95_s", "time to first token p95 (s)", ".3f"),
    ("prompt_tokens_mean", "prompt tokens (mean)", ".1f"),
    ("completion_tokens_mean", "answer tokens (mean)", ".1f"),
    ("prefill_tps", "prefill tokens/s", ".1f"),
    ("decode_tps", "decode tokens/s", ".1f"),
    ("sessions_per_min", "sessions per minute", ".1f"),
    ("peak_rss", "peak RSS (MiB)", "mib"),
    ("rss_file", "RSS file-backed now (MiB)", "mib"),
    ("rss_anon", "RSS anonymous now (MiB)", "mib"),
    ("model_file_bytes", "model file (MiB)", "mib"),
]


def latency_rows(summary: dict) -> list[dict]:
    rows = []
    for key, label, spec in LATENCY_ROWS:
        value = summary.get(key)
        if value is not None and spec == "mib":
            value, spec = value / 2**20, ".1f"
        rows.append({"measure": label, "value": None if value is None else format(value, spec)})
    return rows
