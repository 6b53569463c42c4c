"""Which training sessions knowledge is distilled from (the paper's "quantity" axis).

Four strategies, each keeping round(ratio * n) sessions (at least one), returned in file order:

  random      a seeded uniform sample
  length      the longest sessions (most items, then most bundles): the most to learn from
  diversity   k-center greedy on the sessions' title embeddings (all-MiniLM-L6-v2): each pick is
              the session farthest from everything picked so far, so the sample covers the space
  difficulty  the sessions the teacher gets most wrong (1 - its strict F1 on the session); a
              session it could not answer at all counts as fully wrong
"""

from __future__ import annotations

import random
from collections.abc import Callable

import numpy as np

from .. import BkdError
from ..data import Session

STRATEGIES = ("random", "length", "diversity", "difficulty")


def sample_size(n: int, ratio: float) -> int:
    if not 0 < ratio <= 1:
        raise BkdError(f"sampling ratio {ratio}: must be in (0, 1]")
    return max(1, round(ratio * n))


def k_center(vectors: np.ndarray, k: int, seed: int = 0) -> list[int]:
    """Greedy k-center (farthest-point) selection on L2-normalised vectors; deterministic per seed."""
    first = random.Random(seed).randrange(len(vectors))
    picked = [first]
    dist = 1.0 - vectors @ vectors[first]
    while len(picked) < k:
        nxt = int(np.argmax(dist))  # the first index wins ties: deterministic
        picked.append(nxt)
        dist = np.minimum(dist, 1.0 - vectors @ vectors[nxt])
    return picked


def sample_sessions(
    sessions: list[Session],
    strategy: str = "random",
    ratio: float = 1.0,
    seed: int = 0,
    embed: Callable[[list[Session]], np.ndarray] | None = None,
    error: Callable[[list[Session]], list[float]] | None = None,
) -> list[Session]:
    """`embed` (diversity) returns one normalised vector per session; `error` (difficulty) one error each."""
    if strategy not in STRATEGIES:
        raise BkdError(f"sampling strategy {strategy!r}: choose from {', '.join(STRATEGIES)}")
    k = sample_size(len(sessions), ratio)
    if k >= len(sessions):
        return list(sessions)
    if strategy == "random":
        picked = random.Random(seed).sample(range(len(sessions)), k)
    elif strategy == "length":
        order = sorted(range(len(sessions)), key=lambda i: (-len(sessions[i].items), -len(sessions[i].bundles), i))
        picked = order[:k]
    elif strategy == "diversity":
        if embed is None:
            raise BkdError("diversity sampling needs the sentence encoder")
        picked = k_center(embed(sessions), k, seed)
    else:
        if error is None:
            raise BkdError("difficulty sampling needs a teacher (its per-session error ranks the sessions)")
        errors = error(sessions)
        picked = sorted(range(len(sessions)), key=lambda i: (-errors[i], i))[:k]
    keep = set(picked)
    return [s for i, s in enumerate(sessions) if i in keep]
