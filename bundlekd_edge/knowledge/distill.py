"""Distillation of picked sessions into knowledge records, one format after another.

    patterns   frequent product-type patterns mined from the sessions' bundles (no teacher)
    rules      the teacher reflects on batches of sessions and writes rules for finding bundles
    thoughts   the teacher explains each session's bundles (rationales)

`distill_folder` is the stage `bkd-edge distill` runs: this plus sampling, the teacher client, the
store and its manifest.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path

from .. import BkdError
from ..data import Session
from .store import FORMATS, Record


@dataclass
class DistillConfig:
    min_support: float = 0.01  # patterns: share of training bundles
    min_confidence: float = 0.3  # patterns: association-rule confidence
    batch_size: int = 5  # rules: sessions per reflection
    rules_per_batch: int = 5  # rules: most rules one reflection may write
    rule_chars: int = 200  # rules: longest rule, in characters
    why_chars: int = 240  # thoughts: longest explanation of one bundle
    attempts: int = 3  # asks per teacher answer before it is a failure


@dataclass
class Distilled:
    records: dict[str, list[Record]] = field(default_factory=dict)  # format -> its records
    failures: list[dict] = field(default_factory=list)  # teacher answers that failed validation
    extra: dict = field(default_factory=dict)  # per-format statistics for the manifest (types, teacher scores)


def _no_progress(stage: str, total: int | None = None):
    return contextlib.nullcontext(None)


def distill(client, sessions: list[Session], formats: list[str], config: DistillConfig = DistillConfig(),
            progress=_no_progress) -> Distilled:  # fmt: skip
    """Records of each format in `formats` from `sessions`; `client` is the teacher (None when
    only patterns are asked). `progress(stage, total)` gives a context manager yielding a per-call
    callback (a progress bar), or None."""
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise ValueError(f"unknown knowledge formats {unknown}")
    out = Distilled()
    for fmt in formats:
        if fmt == "patterns":
            from .patterns import PatternConfig, mine_patterns, type_stats

            found = mine_patterns(sessions, PatternConfig(config.min_support, config.min_confidence))
            records = [
                Record("pattern", p.text(), list(p.session_ids), "patterns",
                       extra={"pattern": p.kind, "lhs": list(p.lhs), "rhs": list(p.rhs), "support": p.support,
                              "confidence": p.confidence, "lift": p.lift})
                for p in found
            ]  # fmt: skip
            out.extra["types"] = type_stats(sessions)
        elif fmt == "rules":
            from .rules import RuleConfig, distill_rules

            rule_config = RuleConfig(config.batch_size, config.rules_per_batch, config.rule_chars, config.attempts)
            with progress("rules") as bar:
                records, failed, scores = distill_rules(client, sessions, rule_config, progress=bar)
            out.failures += failed
            out.extra["teacher_scores"] = scores
        else:
            from .thoughts import ThoughtConfig, distill_thoughts

            with progress("thoughts", len(sessions)) as bar:
                thought_config = ThoughtConfig(why_chars=config.why_chars, attempts=config.attempts)
                records, failed = distill_thoughts(client, sessions, thought_config, progress=bar)
            out.failures += failed
        out.records[fmt] = records
    return out


def distill_folder(
    sessions: list[Path], out: Path, formats: list[str], teacher: str | None = None, teacher_config=None,
    sampling: str = "random", ratio: float = 1.0, seed: int = 0, split: str = "train",
    config: DistillConfig = DistillConfig(), args: dict | None = None, progress=_no_progress,
) -> dict:  # fmt: skip
    """The stage: knowledge of `formats` distilled from the `sampling`/`ratio` share of the `split`
    sessions of `sessions` (several files: several domains, ids unique) into the knowledge folder
    `out`, with the teacher `teacher` (URL, gguf:PATH, gguf:qwen1.5b; `teacher_config`, its calls
    cached). Returns the run's record, also appended to OUT/manifest.json (`args`: how it was asked).
    Records are written only at the end: a run stopped by a dead teacher leaves the folder as it
    was, its finished calls in the cache for the rerun."""
    from ..data import check_split
    from ..files import sha256_file
    from . import store
    from .sampling import sample_sessions

    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise BkdError(f"--formats {','.join(formats)!r}: choose from {', '.join(FORMATS)}")
    needs_teacher = [f for f in formats if f != "patterns"]
    if needs_teacher and not teacher:
        raise BkdError(f"--formats {','.join(needs_teacher)} needs a --teacher (URL, gguf:PATH or gguf:qwen1.5b)")
    check_split(split)
    rows = load_domains(sessions, split)
    t0 = time.perf_counter()
    client = None
    if needs_teacher:
        from .teachers import TeacherConfig, make_teacher

        client = make_teacher(teacher, teacher_config or TeacherConfig(cache_dir=Path(out) / store.CACHE_DIR))
    if sampling == "difficulty" and client is None:
        raise BkdError("--sampling difficulty needs a --teacher: its per-session error ranks the sessions")

    def errors(picked):  # difficulty: the teacher's per-session error ranks the sessions
        from .rules import teacher_errors

        with progress("difficulty", len(picked)) as bar:
            return teacher_errors(client, picked, config.attempts, progress=bar)

    picked = sample_sessions(rows, sampling, ratio, seed, embed=embed_sessions, error=errors)
    made = distill(client, picked, formats, config, progress=progress)
    for fmt, records in made.records.items():
        store.write_records(out, fmt, records)
    stats = client.stats if client else None
    run = {
        "command": "distill",
        "args": args or {},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": round(time.perf_counter() - t0, 3),
        "sessions": {
            "files": [str(p) for p in sessions],
            "sha256": [sha256_file(p) for p in sessions],
            "split": split,
            "available": len(rows),
            "sampled": len(picked),
            "ids": [s.session_id for s in picked],
        },  # fmt: skip
        "teacher": client.describe() if client else None,
        "counts": {fmt: len(records) for fmt, records in made.records.items()},
        "calls": stats.to_dict() if stats else None,
        "failures": made.failures,
        **made.extra,
    }
    store.write_manifest(out, run)
    return run


def load_domains(paths: list[Path], split: str) -> list[Session]:
    """Sessions of several files (domains), one list; a session id may appear only once."""
    from ..data import load_sessions

    rows, seen = [], {}
    for path in paths:
        for s in load_sessions(path, split=split):
            if s.session_id in seen:
                raise BkdError(f"{path}: session {s.session_id!r} is also in {seen[s.session_id]} (ids must be unique)")
            seen[s.session_id] = path
            rows.append(s)
    return rows


def embed_sessions(sessions: list[Session]):
    """The retrieval encoder's vectors of the sessions (diversity sampling)."""
    from ..embeddings import TextEncoder, default_encoder_dir
    from ..packs import query_text

    return TextEncoder(default_encoder_dir()).encode([query_text(s) for s in sessions])
