"""Which training sessions knowledge is distilled from (the paper's "quantity" axis).

Only `random` exists so far; length, diversity and difficulty are the paper's other strategies.
"""

from __future__ import annotations

import random

from .. import BkdError
from ..data import Session

STRATEGIES = ("random",)


def sample_sessions(
    sessions: list[Session], strategy: str = "random", ratio: float = 1.0, seed: int = 0
) -> list[Session]:
    """A seeded sample of round(ratio * n) sessions (at least one), kept in file order."""
    if strategy not in STRATEGIES:
        raise BkdError(f"sampling strategy {strategy!r}: only {', '.join(STRATEGIES)} is implemented so far")
    if not 0 < ratio <= 1:
        raise BkdError(f"sampling ratio {ratio}: must be in (0, 1]")
    k = max(1, round(ratio * len(sessions)))
    picked = set(random.Random(seed).sample(range(len(sessions)), k))
    return [s for i, s in enumerate(sessions) if i in picked]
