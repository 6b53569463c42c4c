"""What every generator gives back, and the one interface they share.

A generator turns sessions into `Generation`s (a prediction record, as `generate` writes it, and
its timing). Four implement `Generator`: the in-process engine (`engine.Engine`, one session at a
time), the batched scheduler (`concurrent.Batched`, many in flight on one model), the client of
OpenAI-compatible servers (`remote.RemoteEngine`) and the client of `bkd-edge serve`
(`bundlekd_edge.service.client.ServiceClient`). `answer_generation` is the one place an answer
becomes a record.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Protocol

from ..data import Session
from ..prompts import PromptConfig, parse_answer

NO_BUNDLE = "fewer than 2 items: no bundle possible"


@dataclass
class Timing:
    prompt_tokens: int  # tokens in the prompt
    prefill_tokens: int  # of those, evaluated now (the rest came from the reused KV cache)
    completion_tokens: int
    ttft_s: float  # request start to first generated token, wall clock
    prefill_s: float  # evaluating the prompt's new tokens, wall clock
    decode_s: float  # first to last generated token, wall clock: decoded_tokens - 1 steps
    total_s: float
    chosen_tokens: int = 0  # of completion_tokens, placed by the candidate choice (scored, not decoded)
    forced_tokens: int = 0  # of completion_tokens, forced by the grammar: evaluated in batches, not one by one
    choose_s: float = 0.0  # scoring the candidates and evaluating the chosen line, wall clock
    prepare_s: float = 0.0  # its pack inputs before the model (hint vectors, retrieval, candidates): in total_s

    @property
    def decoded_tokens(self) -> int:
        return self.completion_tokens - self.chosen_tokens

    @property
    def prefill_tps(self) -> float:
        return self.prefill_tokens / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tps(self) -> float:
        return (self.decoded_tokens - 1) / self.decode_s if self.decode_s else 0.0


@dataclass
class Generation:
    session_id: str
    bundles: list[dict]  # [{"items": [item ids], "intent": str}]
    valid: bool
    error: str
    raw: str
    timing: Timing
    skipped: str = ""  # why the model was not asked (no bundle is possible)
    chosen_by: str = ""  # the rule that chose the partition among the pack's candidates (ChoiceRule.label)

    def to_record(self) -> dict:
        """One line of a predictions file."""
        return {
            "session_id": self.session_id,
            "bundles": self.bundles,
            "valid": self.valid,
            **({"error": self.error} if self.error else {}),
            **({"skipped": self.skipped} if self.skipped else {}),
            **({"chosen_by": self.chosen_by} if self.chosen_by else {}),
            "raw": self.raw,
            "timing": asdict(self.timing),
        }

    def with_prepare(self, seconds: float) -> Generation:
        """This generation with the time its inputs took before the model counted in (`batch.timed_inputs`)."""
        t = self.timing
        return replace(self, timing=replace(t, prepare_s=t.prepare_s + seconds, total_s=t.total_s + seconds))

    @classmethod
    def from_record(cls, record: dict) -> Generation:
        """A record `to_record` wrote (e.g. a server's answer) as a Generation again."""
        fields = {k: record.get(k, "") for k in ("error", "raw", "skipped", "chosen_by")}
        return cls(
            record["session_id"], record["bundles"], record["valid"], timing=Timing(**record["timing"]), **fields
        )

    def to_prediction(self):
        """What `metrics.evaluate` scores."""
        from ..metrics import Prediction

        return Prediction(self.session_id, [b["items"] for b in self.bundles], self.valid, self.skipped,
                          [b.get("intent", "") for b in self.bundles])  # fmt: skip


def answer_generation(
    session: Session, raw: str, finish: str, timing: Timing, prompt: PromptConfig, chosen_by: str = ""
) -> Generation:
    """The record of a model's answer `raw` for `session`: parsed, checked against the session's
    items, and an answer cut at max_tokens (`finish` "length") that does not parse said to be cut."""
    parsed = parse_answer(raw, session, prompt)
    error = parsed.error
    if finish == "length" and not parsed.valid:
        error = f"answer cut at max_tokens ({error})"
    return Generation(session.session_id, parsed.bundles, parsed.valid, error, raw, timing, chosen_by=chosen_by)


def skipped_generation(session: Session) -> Generation:
    """The record of a session too small for a bundle: the model is not asked."""
    return Generation(session.session_id, [], True, "", "", Timing(0, 0, 0, 0.0, 0.0, 0.0, 0.0), NO_BUNDLE)


class Generator(Protocol):
    """Sessions in, `Generation`s out. `inputs` are what a prompt pack adds to a session
    (`batch.session_inputs`: knowledge, examples, candidates, choice rule); a server with its own pack ignores them."""

    def generate(
        self, session: Session, knowledge: str = "", examples: str = "", candidates=None, choice=None
    ) -> Generation: ...

    def map(self, jobs: list[tuple[Session, dict]], on_done: Callable[[Generation], None]) -> None:
        """`generate(session, **inputs)` for every job; `on_done` in the caller's thread as each finishes."""

    def check_prompt(self, session: Session, knowledge: str = "", examples: str = "") -> None: ...

    def fits(self, session: Session, knowledge: str = "", examples: str = "") -> bool: ...

    def warm_prefix(self, knowledge: str = "", state_dir: str | Path | None = None) -> dict: ...

    def identity(self) -> dict: ...

    def memory(self) -> dict: ...

    def describe(self) -> dict: ...
