"""Study: what the catalogue's category paths add to the non-LLM rows, on Electronic and stand-ins.

Held-out catalogues differ in how good their categories are; only Electronic can be had here, so
its categories are degraded into stand-ins (`--standins`):

    as-is      the file's categories
    none       categories dropped (must give exactly the rows without the view)
    level1     every path cut to its root and first level ("Electronics > Computers & Accessories")
    shuffle30  30% of the items get another item's categories (seeded), the rest keep theirs
    nobrand    titles as `study_hint_centre.py --titles nobrand`, categories as-is

Per stand-in, every row is fitted on train as `bench` fits it, and scored on `--splits` (val for
choosing; test once per candidate): `cluster`, `category`, `choice` without the category view
(today's rule) and with it (the view chosen by 5-fold CV on train), `learned` (the same candidates
chosen by the learned rule fitted on train, no student), `apriori`, `whole`. The
category view's CV table goes in the JSON. MiniLM vectors are cached in runs/ (one ~2 min
encode of Electronic's titles; later runs ~1 min per stand-in on 2 cores).

    python scripts/study_categories.py --sessions S.jsonl [--standins as-is none] [--splits val test]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from bundlekd_edge.baselines import (
    AprioriRules,
    CategoryGroups,
    HintChoice,
    LearnedChoice,
    TitleClusters,
    WholeSession,
)
from bundlekd_edge.data import load_sessions
from bundlekd_edge.metrics import evaluate

sys.path.insert(0, str(Path(__file__).parent))
from study_hint_centre import TITLES  # noqa: E402


def cached_encoder(cache: Path):
    """The default MiniLM encoder with its vectors kept in `cache` (an .npz keyed by text hash)."""
    from bundlekd_edge.embeddings import TextEncoder, default_encoder_dir

    folder = default_encoder_dir()
    cache = cache.with_name(f"{cache.stem}-{folder.name}{cache.suffix}")  # one cache per encoder
    store = dict(np.load(cache)) if cache.exists() else {}
    model = None

    def encode(texts: list[str]) -> np.ndarray:
        nonlocal model
        keys = [hashlib.sha256(t.encode()).hexdigest()[:24] for t in texts]
        new = [(k, t) for k, t in dict(zip(keys, texts)).items() if k not in store]
        if new:
            model = model or TextEncoder(folder)
            for (k, _), v in zip(new, model.encode([t for _, t in new])):
                store[k] = v
            cache.parent.mkdir(parents=True, exist_ok=True)
            np.savez(cache, **store)
        return np.stack([store[k] for k in keys]) if keys else np.zeros((0, 384), np.float32)

    return encode


def standin(sessions: list, name: str, seed: int = 0) -> list:
    def items(s, f):
        return replace(s, items=[f(it) for it in s.items])

    if name == "as-is":
        return sessions
    if name == "none":
        return [items(s, lambda it: replace(it, categories=())) for s in sessions]
    if name == "level1":
        return [items(s, lambda it: replace(it, categories=tuple(dict.fromkeys(p[:2] for p in it.categories))))
                for s in sessions]  # fmt: skip
    if name == "shuffle30":
        rng = random.Random(seed)
        pool = [it.categories for s in sessions for it in s.items]
        return [items(s, lambda it: replace(it, categories=rng.choice(pool)) if rng.random() < 0.3 else it)
                for s in sessions]  # fmt: skip
    if name == "nobrand":
        return [items(s, lambda it: replace(it, title=TITLES["nobrand"](it.title))) for s in sessions]
    raise SystemExit(f"unknown stand-in {name!r}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sessions", required=True)
    ap.add_argument("--standins", nargs="+", default=["as-is", "none", "level1", "shuffle30", "nobrand"])
    ap.add_argument("--splits", nargs="+", default=["val"])
    ap.add_argument("--cache", default="runs/study-categories/minilm.npz")
    ap.add_argument("--out", default="runs/study-categories/results.json")
    args = ap.parse_args()
    encode = cached_encoder(Path(args.cache))
    everything = load_sessions(args.sessions)
    results = []
    for name in args.standins:
        sessions = standin(everything, name)
        train = [s for s in sessions if s.split == "train"]
        today = HintChoice(encode)
        today.fit(train)
        today.view = type(today.view)()  # today's rule: the same centre, no category view
        rows = {
            "whole": WholeSession(),
            "apriori": AprioriRules(),
            "cluster": TitleClusters(encode=encode),
            "category": CategoryGroups(),
            "choice (today)": today,
            "choice": HintChoice(encode),
            "learned": LearnedChoice(encode),
        }
        for label, model in rows.items():
            if label != "choice (today)":
                model.fit(train)
            row = {"standin": name, "row": label, "params": model.describe()}
            for split in args.splits:
                held = [s for s in sessions if s.split == split]
                scores = evaluate(held, model.predict_all(held))
                row[split] = [round(scores["strict_f1"], 4), round(scores["exact_match"], 4)]
            if label == "choice":
                row["category_cv"] = model.category_report
            if label == "learned":
                held = [s for s in sessions if s.split == args.splits[-1] and len(s.items) >= 2]
                t0 = time.perf_counter()
                for s in held:
                    model.predict(s)  # vectors cached: the candidates and the rule's pick
                row["ms_per_session"] = round(1000 * (time.perf_counter() - t0) / len(held), 2)
            results.append(row)
            cells = "  ".join(f"{split} {row[split][0]:.3f} / {row[split][1]:.3f}" for split in args.splits)
            print(f"{name:<10} {label:<15} {cells}", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
