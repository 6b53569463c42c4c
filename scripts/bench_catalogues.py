"""The default student on catalogues it never saw, run the user's way, beside the non-LLM baselines.

For Electronic and each title-habit stand-in (`study_hint_centre.py --titles`: Electronic with every
title rewritten, since other catalogues cannot be had here), exactly what a user with their own
catalogue runs:

    bkd-edge pack build --sessions S --similar-items --k 0 --out PACK     # calibrated on S's train split
    bkd-edge bench --sessions S --split test --engine default=default,pack=PACK \\
        --engine choice=baseline:choice --engine cluster=baseline:cluster ...

then one table: strict F1 / exact per catalogue and engine, the rule each pack's calibration chose
and its CV table. Every step is skipped when its output exists (a killed run continues).

`--fit-on val` fits the packs and the baselines on Electronic val instead (its 90 sessions
relabelled train, Electronic train left out): the shipped student was trained on Electronic train,
so calibrating on it sees the student at its most confident; val it never trained on, as it never
saw a user's catalogue.

    python scripts/bench_catalogues.py --sessions ../shared/data/bundles/electronic/sessions.jsonl --out runs/catalogues
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from study_hint_centre import TITLES, with_titles  # noqa: E402

from bundlekd_edge.data import load_sessions, write_sessions  # noqa: E402

ENGINES = ("default", "choice", "cluster", "apriori", "whole")


def run(*args) -> None:
    cmd = [sys.executable, "-m", "bundlekd_edge.cli", *map(str, args)]
    print("$ bkd-edge " + " ".join(map(str, args)), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True)


def unseen_split(sessions: list, fit_on: str) -> list:
    """The sessions a pack is fitted on relabelled `train`; the student's own train left out for `val`."""
    if fit_on == "train":
        return sessions
    return [replace(s, split="train") if s.split == "val" else s for s in sessions if s.split != "train"]


def catalogue(sessions: Path, habit: str, out: Path, model: str, limit: int, fit_on: str) -> dict:
    folder = out / (habit if fit_on == "train" else f"{habit}-fit-on-{fit_on}")
    folder.mkdir(parents=True, exist_ok=True)
    data = sessions if habit == "as-is" and fit_on == "train" else folder / "sessions.jsonl"
    if not data.exists():
        write_sessions(data, unseen_split(with_titles(load_sessions(sessions), habit), fit_on))
    pack = folder / "pack"
    if not pack.exists():
        run("pack", "build", "--sessions", data, "--similar-items", "--k", "0", "--model", model,
            "--calibrate-limit", limit, "--out", pack)  # fmt: skip
    bench = folder / "bench"
    if not (bench / "report.json").exists():
        run("bench", "--sessions", data, "--split", "test", "--out", bench, "--throughput-sessions", "0",
            "--cold", "0", "--engine", f"default={model},pack={pack}",
            *[a for name in ENGINES[1:] for a in ("--engine", f"{name}=baseline:{name}")])  # fmt: skip
    report = json.loads((bench / "report.json").read_text())
    manifest = json.loads((pack / "manifest.json").read_text())
    return {"report": report, "calibration": manifest.get("calibration", {})}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sessions", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--titles", nargs="*", default=list(TITLES), choices=list(TITLES))
    ap.add_argument("--model", default="default", help="The student (anything `--model` takes).")
    ap.add_argument("--calibrate-limit", type=int, default=0, help="pack build --calibrate-limit (0: all train).")
    ap.add_argument(
        "--fit-on",
        choices=["train", "val"],
        default="train",
        help="The split the packs and baselines are fitted on (val: sessions the student never saw).",
    )
    args = ap.parse_args()
    results = {h: catalogue(args.sessions, h, args.out, args.model, args.calibrate_limit, args.fit_on)
               for h in args.titles}  # fmt: skip
    (args.out / "catalogues.json").write_text(json.dumps(results, indent=1))
    print("| catalogue (test) | " + " | ".join(ENGINES) + " | rule chosen (CV strict F1 on train) |")
    print("|---" * (len(ENGINES) + 2) + "|")
    for habit, r in results.items():
        q = {row["name"]: row["quality"] for row in r["report"]["rows"] if row["status"] == "ok"}
        cells = [f"{q[e]['strict_f1']:.3f} / {q[e]['exact_match']:.3f}" if e in q else "failed" for e in ENGINES]
        cal = r["calibration"]
        chosen = next((x for x in cal.get("rules", []) if x["rule"] == cal.get("winner")), {})
        rule = f"{cal.get('winner', '-')} ({chosen.get('cv_strict_f1', 0):.3f})"
        print(f"| {habit} | " + " | ".join(cells) + f" | {rule} |")


if __name__ == "__main__":
    main()
