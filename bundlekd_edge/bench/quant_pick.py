"""The right quant for *this* machine: measure every quant of an export here, keep the fastest
whose val strict F1 is within `tolerance` of F16's.

Which quant is fastest depends on the CPU (SmolLM2's 576-wide rows force most k-quant matrices
to fall back; Q4_0 has fast kernels where Q4_1 has none), so it is measured, not assumed. Each
quant is one `bkd-edge bench` row (its own process, so peak RSS is its own) over the same val
sessions, spread evenly over the split. The table and the choice go into the export's manifest,
and `generate --model EXPORT` then runs the chosen quant (the manifest's `default_quant`).

    bkd-edge quant-pick EXPORT [--spread 30] [--tolerance 0.01]
    bkd-edge export RUN --out EXPORT --quant auto      # quantise to every candidate, then pick
"""

from __future__ import annotations

import time
from pathlib import Path

from .. import BkdError
from ..artifacts import amend_manifest
from ..data import load_sessions, spread, write_sessions
from ..export.build import model_card
from ..export.folder import read_manifest, verify_export
from ..files import atomic_write
from .engines import BenchOptions, parse_engine
from .runner import reproducibility, run_bench


def pick_quant(
    export_dir: str | Path,
    sessions: str | Path | None = None,
    n_sessions: int = 30,
    tolerance: float = 0.01,
    threads: int = 0,
    work: str | Path | None = None,
) -> dict:
    """Measure each quant of the export on `n_sessions` val sessions (the training data's by
    default), choose, and record the result in the manifest; returns it."""
    folder = Path(export_dir)
    manifest = read_manifest(folder)
    problems = verify_export(folder, manifest)
    if problems:
        raise BkdError(f"{folder}: refusing a damaged export: " + "; ".join(problems))
    models = manifest.get("models", {})
    if "F16" not in models:
        raise BkdError(f"{folder}: no F16 model to compare the quants with "
                       "(export with --keep-f16, or with --quant auto)")  # fmt: skip
    sessions = Path(sessions or manifest["recipe"]["sessions"])
    val = load_sessions(sessions, split="val", empty_split_ok=True) or load_sessions(sessions, split="test")
    work = Path(work or folder.parent / f".{folder.name}.quant-pick")
    work.mkdir(parents=True, exist_ok=True)
    picked = work / "sessions.jsonl"
    n_picked = write_sessions(picked, spread(val, n_sessions))
    split = val[0].split if val else "val"

    specs = [parse_engine(f"{q}={folder}:{q}") for q in models]
    opt = BenchOptions(sessions=str(picked), split=split, warmup=1, cold=0, throughput_sessions=0, threads=threads)
    report = run_bench(specs, opt, work / "bench")
    failed = [r["name"] for r in report["rows"] if r["status"] != "ok"]
    if failed:
        raise BkdError(f"{folder}: could not measure {', '.join(failed)} (logs in {work / 'bench' / 'rows'})")

    parity = {s["stage"]: s for s in manifest.get("parity", {}).get("stages", [])}
    table = [_measure(r, parity.get(r["name"], {})) for r in report["rows"]]
    reference = next(t["val_strict_f1"] for t in table if t["quant"] == "F16")
    eligible = [t for t in table if t["val_strict_f1"] >= reference - tolerance]
    choice = min(eligible, key=lambda t: t["latency_p50_s"])["quant"]
    result = {
        "choice": choice,
        "rule": f"fastest per-session latency p50 with val strict F1 >= F16's - {tolerance}",
        "sessions": n_picked,
        "split": split,
        "measured": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {k: v for k, v in reproducibility(opt, report["rows"]).items() if k in ("cpu", "threads")},
        "table": table,
    }
    result["machine"]["cpu"] = {k: v for k, v in result["machine"]["cpu"].items() if k != "flags"}
    fields = {"default_quant": choice, "quant_pick": result}
    with atomic_write(folder / "README.md") as f:  # the model card shows the table and the choice too
        f.write(model_card({**manifest, **fields}))
    amend_manifest(folder, manifest, fields, changed=("README.md",))
    return result


def _measure(row: dict, parity: dict) -> dict:
    lat, mem, quality = row["latency"], row["memory"], row["quality"]
    return {
        "quant": row["name"],
        "latency_p50_s": lat["latency_p50_s"],
        "decode_tps": lat["decode_tps"],
        "prefill_tps": lat["prefill_tps"],
        "peak_rss": mem.get("peak_rss"),
        "model_file_bytes": mem.get("model_file_bytes"),
        "parity_top1": parity.get("top1_agreement"),
        "parity_bundles": parity.get("identical_bundles"),
        "val_strict_f1": quality["strict_f1"],
        "val_exact_match": quality["exact_match"],
    }


def quant_table(result: dict) -> str:
    """The measurements as a text table, the choice marked."""
    from ..tables import table

    rows = [{**t, "quant": t["quant"] + (" *" if t["quant"] == result["choice"] else ""),
             "peak_rss": (t["peak_rss"] or 0) / 2**20, "model_file_bytes": (t["model_file_bytes"] or 0) / 2**20}
            for t in result["table"]]  # fmt: skip
    cols = [("quant", "quant", ""), ("latency_p50_s", "p50 s", ".3f"), ("decode_tps", "decode tok/s", ".1f"),
            ("prefill_tps", "prefill tok/s", ".1f"), ("peak_rss", "peak RSS MiB", ".0f"),
            ("model_file_bytes", "file MiB", ".1f"), ("parity_top1", "parity top-1", ".3f"),
            ("val_strict_f1", "val strict F1", ".3f"), ("val_exact_match", "val exact", ".3f")]  # fmt: skip
    return table(rows, cols) + f"\n* chosen: {result['rule']}"
