"""Study: where should a pack centre its three-cut similar-items hint?

The runtime picks among the hint's cuts and the whole session by expected strict F1, which leans
coarser than any one cut. This measures that, without and with the student:

1. 5-fold cross-validation on the train split (no student; every fold fitted on the other four):
   the `cluster` baseline at its tuned cut, the choice rule centred at that same cut, and the choice
   rule centred where `packs.tune_hint_centre` puts it (what `pack build --similar-items` does).
2. With `--student-centres`: the shipped student on `--split` (val: selection data) with its hint
   centred at each given cut, next to the `cluster` baseline at that cut and the choice rule alone
   ([strict F1, exact] each).

`--titles` rewrites every title first, a stand-in for catalogues with other title habits (only
Electronic can be had here): `short5` keeps the first five words, `nobrand` drops the first word
and lowercases, `nodigits` drops punctuation and every word with a digit (model numbers, sizes).

    python scripts/study_hint_centre.py --sessions S.jsonl [--titles nobrand] [--student-centres 0.7 0.8]

Measured on Electronic (2 cores, ~2 min + ~1.5 min per centre): CV strict F1 cluster 0.602, rule at
the cluster's cut 0.599, rule at the tuned centre 0.632 (the tuned centre is 0.70 in every fold; the
cluster's cut is 0.80 in two). Val, student / cluster at centre 0.6: 0.621 / 0.598, 0.7: 0.669 /
0.624, 0.8: 0.586 / 0.670, 0.9: 0.543 / 0.605. Other title habits, val strict F1 of the student
with its hint at the cluster's cut -> at the tuned centre, against `cluster`: short5 (cut 0.80,
centre 0.75) 0.585 -> 0.618 vs 0.590; nobrand (0.80, 0.70) 0.594 -> 0.658 vs 0.650; nodigits
(0.80, 0.75) 0.613 -> 0.635 vs 0.653.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from dataclasses import replace

from bundlekd_edge.baselines import (
    TitleClusters,
    chosen_by_counts,
    hint_candidates,
    hint_cuts,
    hint_levels,
    to_prediction,
    tune_hint_centre,
)
from bundlekd_edge.data import load_sessions
from bundlekd_edge.metrics import evaluate

SPREAD = 0.12  # as the shipped student was trained
TITLES = {
    "as-is": lambda t: t,
    "short5": lambda t: " ".join(t.split()[:5]),
    "nobrand": lambda t: " ".join(t.split()[1:]).lower() or t,
    "nodigits": lambda t: " ".join(w for w in re.sub(r"[^\w\s]", " ", t).split() if not re.search(r"\d", w))[:80] or t,
}


def with_titles(sessions: list, habit: str) -> list:
    rewrite = TITLES[habit]
    return [replace(s, items=[replace(it, title=rewrite(it.title)) for it in s.items]) for s in sessions]


def rule_at(clusters: TitleClusters, session, centre: float) -> list[dict]:
    levels = hint_levels(clusters, session, hint_cuts(centre, SPREAD))
    return chosen_by_counts(session, hint_candidates(levels, len(session.items)))


def cross_validate(train: list, folds: int = 5) -> dict:
    random.Random(0).shuffle(train)
    preds: dict[str, dict] = {"cluster": {}, "rule at the cluster's cut": {}, "rule at the tuned centre": {}}
    cuts = []
    for f in range(folds):
        held = train[f::folds]
        fit = [s for i, s in enumerate(train) if i % folds != f]
        clusters = TitleClusters().fit(fit)
        cut = clusters.params["threshold"]
        centre, _ = tune_hint_centre(clusters, fit, SPREAD)
        cuts.append({"cluster_cut": cut, "tuned_centre": centre})
        for s in held:
            preds["cluster"][s.session_id] = to_prediction(s.session_id, clusters.predict(s))
            preds["rule at the cluster's cut"][s.session_id] = to_prediction(s.session_id, rule_at(clusters, s, cut))
            preds["rule at the tuned centre"][s.session_id] = to_prediction(s.session_id, rule_at(clusters, s, centre))
    scores = {name: round(evaluate(train, p)["strict_f1"], 4) for name, p in preds.items()}
    return {"folds": cuts, "strict_f1": scores}


def student_at(centres: list[float], sessions: list) -> list[dict]:
    from bundlekd_edge.runtime.batch import run_sessions
    from bundlekd_edge.student import resolve_student

    student = resolve_student("default")
    pack, engine = student.pack, student.load_engine()
    rows = []
    for centre in centres:
        clusters = TitleClusters.at_cut(centre, pack.encode)
        clusters.params["fallback"] = "whole"  # as the fitted baseline chooses on Electronic train
        base = evaluate(sessions, {s.session_id: to_prediction(s.session_id, clusters.predict(s)) for s in sessions})
        pack.similar_items = centre
        gens = run_sessions(engine, sessions, pack=pack, progress=False)
        ours = evaluate(sessions, {g.session_id: to_prediction(g.session_id, g.bundles) for g in gens})
        rule = evaluate(
            sessions, {s.session_id: to_prediction(s.session_id, rule_at(clusters, s, centre)) for s in sessions}
        )
        scores = {"student": ours, "cluster": base, "rule alone": rule}
        rows.append(
            {"centre": centre, **{k: [round(v["strict_f1"], 4), round(v["exact_match"], 4)] for k, v in scores.items()}}
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sessions", required=True)
    ap.add_argument("--split", default="val")
    ap.add_argument("--titles", choices=list(TITLES), default="as-is")
    ap.add_argument("--student-centres", type=float, nargs="*", default=[])
    args = ap.parse_args()
    train = with_titles(load_sessions(args.sessions, "train"), args.titles)
    clusters = TitleClusters().fit(train)
    out = {
        "titles": args.titles,
        "train": {
            "cluster_cut": clusters.params["threshold"],
            "tuned_centre": tune_hint_centre(clusters, train, SPREAD)[0],
        },
        "cross_validation_on_train": cross_validate(train),
    }
    if args.student_centres:
        held_out = with_titles(load_sessions(args.sessions, args.split), args.titles)
        out[f"student_on_{args.split}"] = student_at(args.student_centres, held_out)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
