"""Distillation of picked sessions into knowledge records, one format after another.

    patterns   frequent product-type patterns mined from the sessions' bundles (no teacher)
    rules      the teacher reflects on batches of sessions and writes rules for finding bundles
    thoughts   the teacher explains each session's bundles (rationales)

`bkd-edge distill` is this plus sampling, the teacher client, the store and its manifest.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

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
