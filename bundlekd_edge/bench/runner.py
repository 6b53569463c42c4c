"""Run every engine of a bench in its own process, one at a time, and put the rows together.

OUT/
  rows/NAME.spec.json   what the row measures (engine spec + options + their key)
  rows/NAME.json        the row, written by the worker when it finished (reused by a rerun
                        whose spec and options are the same)
  rows/NAME.pred.jsonl  its predictions
  rows/NAME.log         the worker's stderr
  report.json, report.md, quality_latency.png, memory.png
  manifest.json         format bkd-bench/1 and the sha256 of every file above; written last (and
                        removed when a rerun starts), so its presence means the report is whole
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

from .. import BkdError, __version__
from ..artifacts import MANIFEST, write_manifest
from ..files import sha256_file, write_json
from ..openai_client import redact_url
from .engines import WORKER_MODEL, BenchOptions, EngineSpec
from .report import RATIO_KEYS, write_report

BENCH_FORMAT = "bkd-bench/1"


def _tail(path: Path, lines: int = 6) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(line.strip() for line in text[-lines:] if line.strip() and "it/s]" not in line)


def run_engine(spec: EngineSpec, opt: BenchOptions, rows_dir: Path, resume: bool = True) -> dict:
    """The row of one engine: reused when already measured the same way, else measured now."""
    key = spec.key(opt.measured())
    row_path, log_path = rows_dir / f"{spec.name}.json", rows_dir / f"{spec.name}.log"
    if resume and row_path.is_file():
        row = json.loads(row_path.read_text())
        if row.get("key") == key and row.get("status") == "ok":
            return {**row, "reused": True}
    row_path.unlink(missing_ok=True)
    spec_path = rows_dir / f"{spec.name}.spec.json"
    # A URL's credentials reach the worker through its environment, never a file on disk.
    write_json(spec_path, {"spec": {**asdict(spec), "model": redact_url(spec.model)}, "options": asdict(opt),
                           "key": key})  # fmt: skip
    cmd = [sys.executable, "-m", "bundlekd_edge.bench.worker", str(spec_path), str(row_path)]
    env = {**os.environ, WORKER_MODEL: spec.model}
    t0 = time.perf_counter()
    error = ""
    with open(log_path, "w") as log:
        try:
            proc = subprocess.run(cmd, stdout=log, stderr=log, timeout=opt.timeout_s, env=env)
            if proc.returncode != 0:
                why = f"signal {-proc.returncode}" if proc.returncode < 0 else f"exit status {proc.returncode}"
                error = f"the engine process failed ({why})"
        except subprocess.TimeoutExpired:
            error = f"the engine process ran past {opt.timeout_s:.0f} s and was stopped"
    if not error and row_path.is_file():
        return json.loads(row_path.read_text())
    detail = _tail(log_path)
    return {
        **asdict(spec),
        "model": redact_url(spec.model),  # a URL row's credentials stay out of the report
        "status": "failed",
        "error": f"{error or 'no row written'}: {detail}" if detail else error or "no row written",
        "wall_s": time.perf_counter() - t0,
        "key": key,
    }


def ratios(row: dict, ref: dict) -> dict:
    """row / reference for each RATIO_KEYS measure both rows have."""
    out = {}
    for section, key, _ in RATIO_KEYS:
        a, b = (row.get(section) or {}).get(key), (ref.get(section) or {}).get(key)
        if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b:
            out[key] = a / b
    return out


def _cpu() -> dict:
    info = {"machine": platform.machine(), "cores_usable": len(os.sched_getaffinity(0))}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name" and "model" not in info:
                info["model"] = value.strip()
            elif key == "flags" and "flags" not in info:
                info["flags"] = value.split()
    except OSError:
        info["model"] = platform.processor()
    return info


def reproducibility(opt: BenchOptions, rows: list[dict]) -> dict:
    from ..runtime.llamacpp import build_info

    llama = build_info()
    return {
        "bkd_edge_version": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "llama_cpp_python": llama["llama_cpp_python"],
        "llama_cpp_system_info": llama["system_info"],
        "cpu": _cpu(),
        "threads": opt.threads or len(os.sched_getaffinity(0)),
        "n_ctx": opt.n_ctx,
        "seed": opt.seed,
        "sessions_file": opt.sessions,
        "sessions_sha256": sha256_file(opt.sessions),
        "models": {r["name"]: r.get("model_sha256") for r in rows if r.get("model_sha256")},
        "packs": {r["name"]: r.get("pack_sha256") for r in rows if r.get("pack_sha256")},
        "command": sys.argv,
    }


def run_bench(
    specs: list[EngineSpec],
    opt: BenchOptions,
    out: str | Path,
    teacher: str | None = None,
    compare: list[tuple[str, str]] = (),
    resume: bool = True,
    on_row=None,
) -> dict:
    """Measure every engine (each in a fresh process), then write report.json, report.md and the plots."""
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise BkdError(f"engine names must differ: {', '.join(names)}")
    for a, b in [(teacher, teacher), *compare]:
        for n in (a, b):
            if n is not None and n not in names:
                raise BkdError(f"{n!r} names no engine (engines: {', '.join(names)})")
    out = Path(out)
    rows_dir = out / "rows"
    rows_dir.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # the folder is being worked on
    rows = []
    for spec in specs:
        row = run_engine(spec, opt, rows_dir, resume)
        rows.append(row)
        if on_row:
            on_row(row)
    by_name = {r["name"]: r for r in rows}
    if teacher and by_name[teacher]["status"] == "ok":
        for r in rows:
            if r["status"] == "ok" and r["name"] != teacher:
                r["vs_teacher"] = ratios(r, by_name[teacher])
    report = {
        "format": BENCH_FORMAT,
        "created_unix": int(time.time()),
        "options": asdict(opt),
        "teacher": teacher,
        "rows": rows,
        "comparisons": [
            {"engine": a, "reference": b, "ratios": ratios(by_name[a], by_name[b])}
            for a, b in compare
            if by_name[a]["status"] == "ok" and by_name[b]["status"] == "ok"
        ],
        "reproducibility": reproducibility(opt, rows),
    }
    write_report(report, out)
    write_manifest(out, BENCH_FORMAT, {"engines": names})
    return report
