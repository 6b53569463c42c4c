"""Choosing a compact answer's partition among candidates, by expected strict F1 (minimum Bayes risk).

The engine scores each candidate first line (e.g. the pack's similar-items groups at each cut, and
the whole session) by the student's log-probability; this module turns those scores into one choice.
How much the student's probabilities count is a pack's calibration (`ChoiceRule`, chosen by
cross-validation on that catalogue's train split: `bundlekd_edge.calibration`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..metrics import session_strict_f1
from ..prompts import PromptConfig, candidate_lines

# Candidate probabilities are taken to the power 1/T before the expected F1. Chosen on Electronic val
# (90 sessions, shipped student): T 0.5 / 1 / 2 / 3 -> strict F1 0.615 / 0.638 / 0.669 / 0.664.
# The rule of a pack without calibration.
CHOICE_TEMPERATURE = 2.0
RULES = ("cluster", "category", "choice", "student", "learned", "learned+student")
# What the learned rule sees of each candidate line (`candidate_features`), in this order.
FEATURES = (
    "expected_f1",  # the `choice` rule's own objective: expected strict F1 under the cut counts
    "agreement",  # the share of the candidates that gave this line (views that agree)
    "whole",  # 1 for the whole session as one bundle
    "groups",  # bundles / items
    "covered",  # share of the items in some bundle
    "size",  # mean bundle size / items
    "category_purity",  # share of same-bundle item pairs with the same top category (of pairs with both known)
    "category_known",  # share of same-bundle item pairs where both items have categories
    "student",  # the student's log-probability minus the best candidate's, / 10 (0 without the student)
)


@dataclass(frozen=True)
class ChoiceRule:
    """How a pack's candidate partitions become the answer's partition.

    cluster   the `cluster` baseline's partition at its tuned cut: the pack offers that one candidate
    category  the `category` baseline's partition (path, depth, fallback tuned): that one candidate
    choice    expected strict F1 over the hint's candidates, weighed by cut counts alone (no model)
    student   the same, with the student's probabilities taken to the power 1/temperature
    """

    name: str = "student"
    temperature: float = CHOICE_TEMPERATURE
    weights: tuple[float, ...] = ()  # learned rules: one per FEATURES (fitted by `fit_weights`)

    def __post_init__(self):
        if self.name not in RULES:
            raise ValueError(f"choice rule {self.name!r}: not one of {', '.join(RULES)}")
        if not (math.isfinite(self.temperature) and 0.1 <= self.temperature <= 100):
            raise ValueError(f"choice rule temperature {self.temperature!r}: not in [0.1, 100]")
        learned = self.name.startswith("learned")
        if learned and not (len(self.weights) == len(FEATURES) and all(math.isfinite(w) for w in self.weights)):
            raise ValueError(f"choice rule {self.name}: needs {len(FEATURES)} finite weights, got {self.weights!r}")
        if not learned and self.weights:
            raise ValueError(f"choice rule {self.name}: takes no weights")

    @property
    def uses_student(self) -> bool:
        return self.name in ("student", "learned+student")

    @property
    def label(self) -> str:
        return f"student T={self.temperature:g}" if self.name == "student" else self.name

    def pick(self, lines: list[str], logprobs: list[float] | None, counts: list[int], session=None) -> str:
        """The line this rule chooses among a session's candidate `lines` (`cluster`: the pack
        offers the one line). A learned rule reads the items' categories from `session`."""
        if self.name.startswith("learned"):
            x = candidate_features(lines, counts, logprobs if self.uses_student else None, session)
            return lines[int(np.argmax(x @ np.asarray(self.weights)))]
        return choose_partition(lines, logprobs if self.uses_student else None, counts, self.temperature)


def choose_partition(
    lines: list[str],
    logprobs: list[float] | None,
    counts: list[int] | None = None,
    temperature: float = CHOICE_TEMPERATURE,
) -> str:
    """The candidate with the highest expected strict F1 when the truth is drawn from the
    candidates with the model's probabilities, renormalised over them (minimum Bayes risk).
    `counts` weighs each line by how many candidates gave it: a partition two cuts of the hint
    agree on is twice as likely a priori (val strict F1 0.669 with, 0.658 without). Without
    `logprobs` every line is equally likely before the counts (the `choice` rule).

    Greedy decoding and the single most probable line both favour one coarse bundle: its one
    line is short, so likely. Expected F1 instead rewards a line that shares bundles with most
    of the probability mass (a fine cut whose groups also appear in the other candidates). The
    probabilities are flattened (`temperature`), for the same reason.
    """
    logprobs = np.zeros(len(lines)) if logprobs is None else np.asarray(logprobs, dtype=np.float64)
    groups = [[frozenset(g.split()) for g in line.split(" | ")] for line in lines]
    p = np.exp((logprobs - logprobs.max()) / temperature) * np.asarray(counts or [1] * len(lines))
    p /= p.sum()
    gain = [sum(pj * session_strict_f1(gi, gj) for pj, gj in zip(p, groups)) for gi in groups]
    return lines[int(np.argmax(gain))]


def _expected_f1(groups: list[list[frozenset]], p: np.ndarray) -> np.ndarray:
    return np.array([sum(pj * session_strict_f1(gi, gj) for pj, gj in zip(p, groups)) for gi in groups])


def candidate_features(
    lines: list[str], counts: list[int], logprobs: list[float] | None = None, session=None
) -> np.ndarray:
    """One row of FEATURES per candidate line (numpy, a few hundred microseconds a session).
    The category columns are 0 without `session` or categories, the student's without `logprobs`."""
    groups = [[frozenset(g.split()) for g in line.split(" | ")] for line in lines]
    n = max(int(x) for g in groups for b in g for x in b)
    w = np.asarray(counts, dtype=np.float64)
    top = [None] * (n + 1)  # item number -> its top category (first path, first level below the root)
    for i, it in enumerate(getattr(session, "items", ())[:n], 1):
        path = next((p for p in it.categories if p), ())
        top[i] = tuple(c.strip().lower() for c in path[:2]) or None
    x = np.zeros((len(lines), len(FEATURES)))
    x[:, 0] = _expected_f1(groups, w / w.sum())
    x[:, 1] = w / w.sum()
    for r, g in enumerate(groups):
        sizes = [len(b) for b in g]
        pairs = [(top[int(a)], top[int(b)]) for bundle in g for a in bundle for b in bundle if a < b]
        known = [a == b for a, b in pairs if a is not None and b is not None]
        x[r, 2:8] = (len(g) == 1 and sizes[0] == n, len(g) / n, sum(sizes) / n, np.mean(sizes) / n,
                     np.mean(known) if known else 0.0, len(known) / len(pairs) if pairs else 0.0)  # fmt: skip
    if logprobs is not None:
        lp = np.asarray(logprobs, dtype=np.float64)
        x[:, 8] = (lp - lp.max()) / 10
    return x


def fit_weights(
    rows: list[tuple[np.ndarray, np.ndarray]], student: bool = False, l2: float = 1e-3, steps: int = 400
) -> tuple[float, ...]:
    """Weights for the learned rule from (features, strict F1 of each candidate against the truth)
    per session: gradient ascent on the mean over sessions of the expected strict F1 when a line is
    picked with probability softmax(features @ weights) (listwise), an L2 penalty, Adam steps.
    Starts from the `choice` rule (all weight on expected_f1), so it can only learn away from it
    where the data says so. Without `student` the student's column stays 0."""
    rows = [(x, f) for x, f in rows if len(x) > 1]  # one candidate: nothing to learn from
    w = np.zeros(len(FEATURES))
    w[0] = 20.0
    if not rows:
        return tuple(float(v) for v in w)
    width = max(len(x) for x, _ in rows)  # sessions padded to the most candidates, padding masked out
    X = np.zeros((len(rows), width, len(FEATURES)))
    F = np.zeros((len(rows), width))
    pad = np.ones((len(rows), width), dtype=bool)
    for i, (x, f) in enumerate(rows):
        X[i, : len(x)], F[i, : len(f)], pad[i, : len(x)] = x, f, False
    mask = np.ones(len(FEATURES))
    mask[FEATURES.index("student")] = 1.0 if student else 0.0
    decay = l2 * (np.arange(len(w)) > 0)  # the expected F1 weight is the rule's scale: not shrunk
    m, v = np.zeros_like(w), np.zeros_like(w)
    for t in range(1, steps + 1):
        z = np.where(pad, -np.inf, X @ w)
        p = np.exp(z - z.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        gain = (p * F).sum(axis=1, keepdims=True)
        grad = (np.einsum("sc,scf->f", p * (F - gain), X) / len(rows) - decay * w) * mask  # d/dw mean sum_c p_c f_c
        m = 0.9 * m + 0.1 * grad
        v = 0.999 * v + 0.001 * grad * grad
        w += 0.5 * (m / (1 - 0.9**t)) / (np.sqrt(v / (1 - 0.999**t)) + 1e-8)
    return tuple(round(float(x), 4) for x in w)


def choose_first_line(
    candidates: list[list[list[int]]] | None,
    choice: ChoiceRule,
    prompt: PromptConfig,
    score: Callable[[list[str]], list[float]],
    session=None,
) -> str | None:
    """A compact answer's first line chosen among `candidates` by the pack's `choice` rule, with
    `score(lines)` the student's log-probabilities of the lines after the prompt (asked for only
    when the rule uses them); None when there is nothing to choose (a JSON answer, no candidates).
    A learned rule reads the items' categories from `session`."""
    if not candidates or prompt.answer_format != "compact":
        return None
    texts, counts = candidate_lines(candidates)
    if not texts:
        return None
    scores = score(texts) if choice.uses_student and len(texts) > 1 else None
    return choice.pick(texts, scores, counts, session)
