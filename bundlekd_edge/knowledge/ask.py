"""Ask a teacher many questions whose answers must pass a check, with a bounded number of retries.

A teacher answer that is not valid JSON, or names items the session does not have, is asked
again (up to `attempts` times in all, the retries sampled with a new seed at a temperature above
zero: a greedy teacher would repeat itself) and then recorded as a failure. Nothing is invented
to fill the gap. Errors of the endpoint itself (down, unreachable) are not retried here: the
client already retried them, and they stop the run with the endpoint's name (the cache keeps
every finished call, so a rerun resumes).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .teachers import Teacher


@dataclass
class Outcome:
    value: object = None  # what `check` returned for the accepted answer; None after a failure
    keys: list[str] = field(default_factory=list)  # cache keys (sha256) of every call made for it
    errors: list[str] = field(default_factory=list)  # why each rejected answer was rejected

    @property
    def ok(self) -> bool:
        return self.value is not None


def ask_checked(
    teacher: Teacher,
    requests: list[dict],
    check,
    attempts: int = 3,
    retry_temperature: float = 0.7,
    on_done=None,
) -> list[Outcome]:
    """`check(index, text) -> (value, error)`: value None means rejected with `error`."""
    outcomes = [Outcome() for _ in requests]
    pending = list(range(len(requests)))
    for attempt in range(attempts):
        if not pending:
            break
        batch = []
        for i in pending:
            req = dict(requests[i])
            if attempt:
                req.update(seed=attempt, temperature=retry_temperature)
            batch.append(req)
        replies = teacher.map(batch, on_done=on_done)
        still = []
        for i, reply in zip(pending, replies):
            outcomes[i].keys.append(reply.key)
            value, error = check(i, reply.text)
            if value is None:
                cut = " (cut at max_tokens)" if reply.finish_reason == "length" else ""
                outcomes[i].errors.append(f"attempt {attempt + 1}: {error}{cut}")
                still.append(i)
            else:
                outcomes[i].value = value
        pending = still
    return outcomes
