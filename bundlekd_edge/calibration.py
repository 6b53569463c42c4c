"""Calibrating how a pack chooses the answer's partition, on that catalogue's own train split.

A compact-answer student answers with a partition chosen among the pack's candidates (the hint's
groups at three cuts and the whole session) by expected strict F1 (`runtime/choice.py`). How much
the student's probabilities should count there differs by catalogue: on Electronic, the catalogue
it was tuned on, they help a little; on two held-out catalogues they pulled the choice below the
`cluster` baseline (strict F1 0.701 vs 0.748, 0.659 vs 0.685). So `pack build` measures, by k-fold
cross-validation on the pack's split, each rule it could use:

    cluster            the baseline's partition at its tuned cut (the student only names the bundles)
    category           the `category` baseline's partition (a catalogue with categories only)
    choice             expected F1 over the candidates with the cut counts alone (no model)
    student T=5 .. 1   the same with the student's probabilities to the power 1/T
    learned            a linear score of each candidate's features (`runtime.choice.FEATURES`: the
                       choice rule's expected F1, how many views agree, bundle sizes, category
                       purity), fitted on the folds it is not scored on (`fit_weights`)
    learned+student    the same with the student's log-probability as one more feature

and keeps the best, ties (within `TIE` strict F1) to the simpler, in that order. The student is run
once over the split (a prefill and one batch per distinct candidate, nothing decoded); the rules
are then compared offline. Every rule's CV score, the winner and an honest estimate of the whole
procedure (the rule picked on the other folds, scored on each held-out fold) go in the manifest.
"""

from __future__ import annotations

import random
import sys
import time
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from .data import Session
from .metrics import Prediction, evaluate, session_strict_f1
from .prompts import candidate_lines
from .runtime.choice import FEATURES, ChoiceRule, candidate_features, fit_weights

TEMPERATURES = (5.0, 3.0, 2.0, 1.0)  # the student's weight 1/T, smallest (simplest) first
LEARNED = ("learned", "learned+student")  # fitted on the other folds, by name (their weights come from the data)
RULES = (
    (ChoiceRule("cluster"), ChoiceRule("category"), ChoiceRule("choice"))
    + tuple(ChoiceRule("student", t) for t in TEMPERATURES)
    + tuple(ChoiceRule(name, weights=(1.0,) + (0.0,) * (len(FEATURES) - 1)) for name in LEARNED)
)
TIE = 0.005  # strict F1: a rule must beat a simpler one by more than this (val moves +-0.02 with item order)
FOLDS = 5


@dataclass
class Evidence:
    """What the rules choose from, for one session: its candidate first lines, how many cuts gave
    each, the student's log-probability of each, the `cluster` baseline's line and the `category`
    baseline's ("" for a catalogue without categories)."""

    session: Session
    lines: list[str]
    counts: list[int]
    logprobs: list[float]
    cluster: str
    category: str = ""

    def features(self, student: bool) -> np.ndarray:
        return candidate_features(self.lines, self.counts, self.logprobs if student else None, self.session)

    def line_f1(self) -> np.ndarray:
        """Each candidate line's strict F1 against the session's truth (what a learned rule is fitted to)."""
        number = {x: str(i) for i, x in enumerate(self.session.item_ids(), 1)}
        gold = [frozenset(number[x] for x in b.items) for b in self.session.bundles]
        return np.array([session_strict_f1([frozenset(g.split()) for g in x.split(" | ")], gold) for x in self.lines])


def gather_evidence(engine, pack, sessions: list[Session], progress: bool = True) -> list[Evidence]:
    """Run the student over `sessions` with `pack` (uncalibrated: the hint's candidates) and score
    every candidate line; ~0.3-0.6 s a session for SmolLM2-135M on 2 cores."""
    from .runtime.batch import session_inputs

    sessions = [s for s in sessions if len(s.items) >= 2]  # no partition to choose
    engine.warm_prefix(pack.static)  # not persisted: the pack is still being built
    out = []
    for s in tqdm(
        sessions, desc="calibrate", unit="session", disable=not progress, file=sys.stderr, dynamic_ncols=True
    ):
        parts = session_inputs(engine, s, pack)
        lines, counts = candidate_lines(parts["candidates"] or [])
        if not lines:
            continue
        logprobs = (
            engine.candidate_logprobs(s, lines, parts["knowledge"], parts["examples"]) if len(lines) > 1 else [0.0]
        )
        (cluster,), _ = candidate_lines([pack.cluster_candidate(s)])
        (category,), _ = candidate_lines([pack.category_candidate(s)]) if pack.category_params else ([""], [])
        out.append(Evidence(s, lines, counts, logprobs, cluster, category))
    return out


def chosen_line(rule: ChoiceRule, e: Evidence) -> str:
    if rule.name == "cluster":
        return e.cluster
    if rule.name == "category":
        return e.category
    return rule.pick(e.lines, e.logprobs, e.counts, e.session)


def fitted(rule: ChoiceRule, evidence: list[Evidence]) -> ChoiceRule:
    """`rule` ready to score: a learned rule with its weights fitted on `evidence`, any other as it is."""
    if rule.name not in LEARNED:
        return rule
    student = rule.uses_student
    return ChoiceRule(rule.name, weights=fit_weights([(e.features(student), e.line_f1()) for e in evidence], student))


def _prediction(e: Evidence, line: str) -> Prediction:
    ids = e.session.item_ids()
    return Prediction(e.session.session_id, [[ids[int(n) - 1] for n in g.split()] for g in line.split(" | ")])


def strict_f1(rule: ChoiceRule, evidence: list[Evidence]) -> float:
    preds = {e.session.session_id: _prediction(e, chosen_line(rule, e)) for e in evidence}
    return evaluate([e.session for e in evidence], preds)["strict_f1"]


def pick(scores: list[float]) -> int:
    """The simplest rule within `TIE` of the best score (rules are in order of simplicity)."""
    best = max(scores)
    return next(i for i, s in enumerate(scores) if s >= best - TIE)


def _rest(parts: list[list[Evidence]], f: int) -> list[Evidence]:
    return [e for g, p in enumerate(parts) if g != f for e in p]


def _inner_score(rule: ChoiceRule, rest: list[Evidence], folds: int) -> float:
    """A rule's score on `rest` to pick by: a fixed rule's strict F1 there; a learned rule's mean over
    an inner cross-validation of `rest` (fitted and scored on the same sessions it would look better
    than it is)."""
    if rule.name not in LEARNED:
        return strict_f1(rule, rest)
    inner = [rest[f::folds] for f in range(folds) if rest[f::folds]]
    return float(np.mean([strict_f1(fitted(rule, _rest(inner, f)), held) for f, held in enumerate(inner)]))


def cross_validate(evidence: list[Evidence], rules=RULES, folds: int = FOLDS, seed: int = 0) -> dict:
    """Each rule's strict F1 on each of `folds` held-out folds (a learned rule fitted on the other
    folds), the winner, and the CV estimate of calibrating (pick on the other folds, score on the
    held-out one). The winner of a learned kind is refitted on all of `evidence`: its weights are
    in the report."""
    rules = tuple(r for r in rules if r.name != "category" or all(e.category for e in evidence))  # has categories
    order = list(range(len(evidence)))
    random.Random(seed).shuffle(order)
    parts = [[evidence[i] for i in order[f::folds]] for f in range(folds)]
    parts = [p for p in parts if p]
    per_fold = [[strict_f1(fitted(r, _rest(parts, f)), p) for f, p in enumerate(parts)] for r in rules]
    mean = [float(np.mean(f)) for f in per_fold]
    honest = []
    for f, held in enumerate(parts):
        rest = _rest(parts, f)
        best = rules[pick([_inner_score(r, rest, folds - 1) for r in rules])]
        honest.append(strict_f1(fitted(best, rest), held))
    winner = pick(mean)
    chosen = fitted(rules[winner], evidence)
    return {
        "folds": len(parts),
        "sessions": len(evidence),
        "tie": TIE,
        "rules": [
            {"rule": r.label, "cv_strict_f1": round(m, 4), "fold_sd": round(float(np.std(f)), 4)}
            for r, m, f in zip(rules, mean, per_fold)
        ],
        "winner": rules[winner].label,
        "weights": dict(zip(FEATURES, chosen.weights)) if chosen.weights else None,
        "calibrated_cv_strict_f1": round(float(np.mean(honest)), 4),
    }


def calibrate(
    engine, pack, sessions: list[Session], cluster: dict, progress: bool = True, category: dict | None = None
) -> dict:
    """The stage: gather the student's evidence on `sessions` and cross-validate the rules.
    Returns {"config": what the pack's manifest config.choice holds, "report": the CV table}.
    `cluster` is the `cluster` baseline's fitted parameters (threshold, fallback); `category` the
    `category` baseline's (path, depth, fallback), None for a catalogue without categories (then the
    `category` rule is not among the rules)."""
    pack.cluster_params = dict(cluster)
    pack.category_params = dict(category) if category else {}
    t0 = time.perf_counter()
    evidence = gather_evidence(engine, pack, sessions, progress)
    seconds = time.perf_counter() - t0
    report = cross_validate(evidence)
    rule = next(r for r in RULES if r.label == report["winner"])
    report["student_s_per_100_sessions"] = round(100 * seconds / max(len(evidence), 1), 1)
    config = {"rule": rule.name, "temperature": rule.temperature, "cluster": dict(cluster)}
    if category:
        config["category"] = dict(category)
    if report["weights"]:
        config["weights"] = list(report["weights"].values())
    return {"config": config, "report": report}


def calibrate_folder(
    folder, model: str, sessions: list[Session], cluster: dict, progress: bool = True, category: dict | None = None
) -> dict:
    """`calibrate` for the pack being built in `folder`, with the student `model` names (anything
    `--model` takes). The report names the student, and says when it was trained on these very
    sessions (its probabilities there are optimistic: it has seen the answers)."""
    from . import BkdError
    from .files import sha256_file
    from .packs import Pack
    from .student import resolve_student

    student = resolve_student(model, pack="none")
    if student.prompt.answer_format != "compact":
        raise BkdError(
            f"--model {model}: calibration ranks a compact-answer student's candidates; this one answers JSON"
        )
    pack = Pack(folder)
    engine = student.load_engine(n_ctx=pack.n_ctx())
    result = calibrate(engine, pack, sessions, cluster, progress, category)
    result["report"]["student"] = student.name
    data = student.card.get("data") or {}
    sessions_file = (pack.manifest.get("recipe") or {}).get("sessions")
    if data.get("sessions_sha256") and sessions_file and data.get("split") == pack.manifest["recipe"].get("split"):
        seen = sha256_file(sessions_file) == data["sessions_sha256"]
        result["report"]["student_trained_on_these_sessions"] = seen
    return result
