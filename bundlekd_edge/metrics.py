"""Bundle-generation metrics: the paper's precision / recall / coverage and the strict matched scores.

The paper's metrics have no one-to-one matching (a predicted bundle "hits" when it is a subset of
some ground-truth bundle), so they are easy to game; the strict scores match predicted to
ground-truth bundles one-to-one by maximal summed Jaccard. Report both, always side by side.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import BkdError
from .data import Session, iter_jsonl

METRIC_KEYS = (
    "precision", "recall", "coverage",
    "strict_precision", "strict_recall", "strict_f1", "exact_match",
    "valid_rate", "hallucination_rate", "empty_rate",
)  # fmt: skip


@dataclass
class Prediction:
    session_id: str
    bundles: list[list[str]]  # item ids, as predicted (may name items outside the session)
    valid: bool = True  # False when the model's raw output was not valid JSON
    skipped: str = ""  # why no answer was asked for (a session of fewer than 2 items: no bundle possible)
    intents: list[str] = field(default_factory=list)  # one per bundle ("" when none was given)


def load_predictions(path: str | Path) -> dict[str, Prediction]:
    """Read a predictions JSONL: {"session_id": ..., "bundles": [{"items": [...], ...}], ...} a line."""
    preds: dict[str, Prediction] = {}
    for n, obj in iter_jsonl(path):
        where = f"{path}:{n}"
        if not isinstance(obj, dict):
            raise BkdError(f"{where}: expected a JSON object")
        sid = obj.get("session_id")
        if not isinstance(sid, (str, int)) or isinstance(sid, bool):
            raise BkdError(f"{where}: field 'session_id' must be a string or an integer, got {sid!r}")
        sid = str(sid)
        if sid in preds:
            raise BkdError(f"{where}: duplicate prediction for session {sid!r}")
        raw = obj.get("bundles")
        if not isinstance(raw, list):
            raise BkdError(f"{where}: field 'bundles' must be a list")
        bundles, intents = [], []
        for j, b in enumerate(raw):
            if not isinstance(b, dict) or not isinstance(b.get("items"), list):
                raise BkdError(f"{where}: bundles[{j}]: expected an object with an 'items' list")
            if not all(isinstance(x, (str, int)) and not isinstance(x, bool) for x in b["items"]):
                raise BkdError(f"{where}: bundles[{j}].items: item ids must be strings or integers")
            bundles.append([str(x) for x in b["items"]])
            intent = b.get("intent", "")
            if not isinstance(intent, str):
                raise BkdError(f"{where}: bundles[{j}].intent must be a string, got {intent!r}")
            intents.append(intent)
        valid, skipped = obj.get("valid", True), obj.get("skipped", "")
        if not isinstance(valid, bool):
            raise BkdError(f"{where}: field 'valid' must be true or false, got {valid!r}")
        if not isinstance(skipped, str):
            raise BkdError(f"{where}: field 'skipped' must be a string (the reason), got {skipped!r}")
        preds[sid] = Prediction(sid, bundles, valid, skipped, intents)
    return preds


def load_prediction_files(paths: list[str | Path]) -> dict[str, Prediction]:
    """Several predictions files (e.g. the shards of one run) as one; a session predicted in two
    files is an error, since the union would depend on which file came first."""
    preds: dict[str, Prediction] = {}
    origin: dict[str, str] = {}
    for path in paths:
        for sid, pred in load_predictions(path).items():
            if sid in preds:
                raise BkdError(f"{path}: session {sid!r} is also predicted in {origin[sid]} (overlapping files)")
            preds[sid], origin[sid] = pred, str(path)
    return preds


def _jaccard(a: frozenset, b: frozenset) -> float:
    return len(a & b) / len(a | b)


# Matchings tried one by one up to this many (7 bundles against 7): the runtime's choice scores every
# pair of candidate partitions and `demo` scores a few sessions, all tiny, and importing scipy would
# cost the edge runtime 0.4 s, more than a session.
_ENUMERATE = 5040


def _match(predicted: list[frozenset], gold: list[frozenset]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The strict one-to-one matching: (Jaccard matrix, predicted rows, gold columns) of maximal sum."""
    sim = np.array([[_jaccard(p, g) for g in gold] for p in predicted]).reshape(len(predicted), len(gold))
    if math.perm(max(sim.shape), min(sim.shape)) <= _ENUMERATE:
        return (sim, *_best_matching(sim))
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(sim, maximize=True)
    return sim, rows, cols


def _best_matching(sim: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`linear_sum_assignment(sim, maximize=True)` for a small matrix: every matching of the shorter side."""
    short = sim if sim.shape[0] <= sim.shape[1] else sim.T
    ks = np.arange(short.shape[0])
    picks = np.array(list(itertools.permutations(range(short.shape[1]), short.shape[0])), dtype=np.intp)
    best = picks[int(np.argmax(short[ks, picks].sum(axis=1)))] if len(ks) else np.zeros(0, np.intp)
    if short is sim:
        return ks, best
    order = np.argsort(best)
    return best[order], ks[order]


def bundle_sets(bundles: list[list[str]]) -> list[frozenset]:
    """The predicted bundles that are scored: singletons dropped, a repeat counted once."""
    out: list[frozenset] = []
    for b in bundles:
        if len(set(b)) >= 2 and frozenset(b) not in out:
            out.append(frozenset(b))
    return out


def score_session(predicted: list[frozenset], gold: list[frozenset]) -> dict:
    """Scores of one session. `predicted` holds only bundles of >= 2 items.

    Paper recall counts a ground-truth bundle hit once however many predicted bundles lie inside it
    (six pairs inside one 4-item bundle are one hit, not six), so it stays in [0, 1]."""
    hits, coverage, found = 0, [], set()
    for p in predicted:
        for j, g in enumerate(gold):  # first ground-truth bundle in list order that contains p
            if p <= g:
                hits += 1
                found.add(j)
                coverage.append(len(p) / len(g))
                break
    matched, exact = 0.0, 0
    if predicted:
        sim, rows, cols = _match(predicted, gold)
        matched = float(sim[rows, cols].sum())
        exact = int(sum(predicted[r] == gold[c] for r, c in zip(rows, cols)))
    n_p, n_g = len(predicted), len(gold)
    return {
        "precision": hits / n_p if n_p else 0.0,
        "recall": len(found) / n_g,
        "coverage": coverage,
        "strict_precision": matched / n_p if n_p else 0.0,
        "strict_recall": matched / n_g,
        "exact_match": exact / n_g,
    }


def session_strict_f1(predicted: list[frozenset], gold: list[frozenset]) -> float:
    """One session's strict F1 (the harmonic mean of its strict precision and recall)."""
    scores = score_session(predicted, gold)
    p, r = scores["strict_precision"], scores["strict_recall"]
    return 2 * p * r / (p + r) if p + r else 0.0


def evaluate(gold: list[Session], preds: dict[str, Prediction]) -> dict:
    """Score predictions against the gold sessions (averages over the gold sessions).

    A gold session with no prediction counts as empty (all zero). A prediction for a session
    the gold file does not hold is an error: it means the files do not belong together.
    """
    gold_ids = {s.session_id for s in gold}
    unknown = [sid for sid in preds if sid not in gold_ids]
    if unknown:
        raise BkdError(f"predictions name {len(unknown)} session(s) not in the gold file, e.g. {unknown[0]!r}")

    totals = {k: 0.0 for k in ("precision", "recall", "strict_precision", "strict_recall", "exact_match")}
    coverage: list[float] = []
    valid = empty = missing = mentions = hallucinated = skipped = 0
    for s in gold:
        pred = preds.get(s.session_id)
        if pred is None:
            missing += 1
            pred = Prediction(s.session_id, [], valid=False)
        skipped += bool(pred.skipped)
        members = set(s.item_ids())
        for b in pred.bundles:
            mentions += len(b)
            hallucinated += sum(1 for x in b if x not in members)
        predicted = bundle_sets(pred.bundles)
        valid += pred.valid
        empty += not predicted
        scores = score_session(predicted, [frozenset(b.items) for b in s.bundles])
        coverage.extend(scores.pop("coverage"))
        for k, v in scores.items():
            totals[k] += v

    n = len(gold)
    out = {k: v / n for k, v in totals.items()}
    out["coverage"] = sum(coverage) / len(coverage) if coverage else 0.0
    sp, sr = out["strict_precision"], out["strict_recall"]
    out["strict_f1"] = 2 * sp * sr / (sp + sr) if sp + sr else 0.0
    out["valid_rate"] = valid / n
    out["hallucination_rate"] = hallucinated / mentions if mentions else 0.0
    out["empty_rate"] = empty / n
    out["sessions"] = n
    out["missing_predictions"] = missing
    out["skipped"] = skipped
    out["predicted_bundles"] = sum(len(p.bundles) for p in preds.values() if p.session_id in gold_ids)
    return {k: out[k] for k in (*METRIC_KEYS, "sessions", "missing_predictions", "skipped", "predicted_bundles")}


def strict_by_session(gold: list[Session], preds: dict[str, Prediction]) -> np.ndarray:
    """(n, 2): each gold session's strict precision and recall, as `evaluate` counts them."""
    rows = []
    for s in gold:
        pred = preds.get(s.session_id)
        scores = score_session(bundle_sets(pred.bundles if pred else []), [frozenset(b.items) for b in s.bundles])
        rows.append((scores["strict_precision"], scores["strict_recall"]))
    return np.array(rows, dtype=np.float64).reshape(-1, 2)


def bootstrap_strict_f1(
    rows: np.ndarray, other: np.ndarray | None = None, n: int = 2000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """A percentile bootstrap interval of the corpus strict F1 (F1 of the mean strict precision and
    recall) over sessions drawn with replacement; with `other` (the same sessions, another system),
    of the difference, paired by session: an interval holding 0 is a difference inside the noise."""
    idx = np.random.default_rng(seed).integers(0, len(rows), size=(n, len(rows)))

    def f1(r: np.ndarray) -> np.ndarray:
        m = r[idx].mean(axis=1)
        total = m[:, 0] + m[:, 1]
        return np.where(total > 0, 2 * m[:, 0] * m[:, 1] / np.where(total > 0, total, 1), 0.0)

    stat = f1(rows) - (f1(other) if other is not None else 0.0)
    lo, hi = np.quantile(stat, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def intent_pairs(gold: list[Session], preds: dict[str, Prediction], namer=None) -> list[tuple[str, str]]:
    """(predicted intent, true intent) of every predicted bundle that the strict scores match
    one-to-one to a true bundle sharing items with it (maximal summed Jaccard, as `score_session`).
    `namer(items) -> str` names each predicted bundle from its items instead (a no-model rule,
    scored on the very bundles the prediction's own names are)."""
    pairs = []
    for s in gold:
        pred = preds.get(s.session_id)
        if pred is None or not s.bundles:
            continue
        named: dict[frozenset, str] = {}
        for items, intent in zip(pred.bundles, pred.intents or [""] * len(pred.bundles)):
            if len(set(items)) >= 2:
                named.setdefault(frozenset(items), intent)  # a repeated bundle counts once, as in evaluate
        predicted = list(named)
        if not predicted:
            continue
        sim, rows, cols = _match(predicted, [frozenset(b.items) for b in s.bundles])
        for r, c in zip(rows, cols):
            if sim[r, c] > 0 and s.bundles[c].intent:  # a true bundle without a name says nothing
                given = named[predicted[r]]
                if namer is not None:
                    by_id = {it.id: it for it in s.items}
                    given = namer([by_id[x] for x in sorted(predicted[r]) if x in by_id])
                pairs.append((given, s.bundles[c].intent))
    return pairs


def intent_scores(pairs: list[tuple[str, str]], encode: Callable[[list[str]], np.ndarray]) -> dict:
    """How well matched bundles are named: mean cosine of the sentence embeddings (`encode`: texts
    -> L2-normalised rows) of predicted and true intents, and the share named exactly (case and
    spacing aside). A missing intent scores 0."""
    if not pairs:
        return {"intent_pairs": 0, "intent_cosine": 0.0, "intent_exact": 0.0}
    norm = [(" ".join(p.lower().split()), " ".join(t.lower().split())) for p, t in pairs]
    given = [i for i, (p, _) in enumerate(norm) if p]
    cosine = np.zeros(len(pairs))
    if given:
        a = encode([norm[i][0] for i in given])
        b = encode([norm[i][1] for i in given])
        cosine[given] = (a * b).sum(1)
    return {
        "intent_pairs": len(pairs),
        "intent_cosine": float(cosine.mean()),
        "intent_exact": sum(p == t for p, t in norm) / len(pairs),
    }
