"""Sessions per minute: `bkd-edge generate` in this process against the same student on 1 and on 2
local llama-cpp-python servers (`python -m llama_cpp.server`), on the same sessions, same cores.

Each side is the real command a user runs (a subprocess, wall clock around it, model loading
excluded: servers are started and answering first; the in-process row's load time is subtracted
using the run's own summary). The cores are shared out the same way: in-process `--threads T`,
one server with T threads, two servers with T/2 threads each (at least 1). Answers are compared
with the in-process run: identical raw answers and identical bundles per session.

    python scripts/bench_servers.py [--student default|base] [--sessions FILE --split test] [--limit 30]
                                    [--out bench-out/servers.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from bundlekd_edge.data import sample_sessions_path
from bundlekd_edge.files import write_json
from bundlekd_edge.runtime.engine import default_threads
from bundlekd_edge.runtime.model_file import resolve_model
from bundlekd_edge.student import resolve_student
from bundlekd_edge.tables import table


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(student, threads: int, log) -> tuple[subprocess.Popen, str]:
    """A llama-cpp-python server running the student's base model and adapters, answering."""
    port = free_port()
    n_ctx = student.pack.n_ctx() if student.pack else 2048  # what `generate` sizes in-process
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(resolve_model(student.model)), "--host",
           "127.0.0.1", "--port", str(port), "--n_threads", str(threads), "--n_threads_batch", str(threads),
           "--n_ctx", str(n_ctx),
           # Logits of every prompt token cost prefill time; only a compact student's candidate scoring
           # (log-probabilities of the answer's tokens) needs them.
           "--logits_all", "true" if student.prompt.answer_format == "compact" else "false"]  # fmt: skip
    for adapter in student.adapters:  # llama-cpp-python's server takes one adapter, at scale 1
        cmd += ["--lora_path", str(adapter.path)]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/v1"
    no_proxy = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    for _ in range(600):
        if proc.poll() is not None:
            raise SystemExit(f"llama_cpp.server exited with {proc.returncode}")
        try:
            with no_proxy.open(url + "/models", timeout=2):
                return proc, url
        except OSError:
            time.sleep(0.2)
    raise SystemExit(f"llama_cpp.server did not answer on {url}")


def run_generate(args, models: list[str], out: Path, threads: int) -> dict:
    bkd = shutil.which("bkd-edge") or str(Path(sys.executable).parent / "bkd-edge")
    model_args = [a for m in models for a in ("--model", m)]
    cmd = [bkd, "generate", *model_args, "--sessions", str(args.sessions), "--out", str(out), "--force", "--quiet",
           "--threads", str(threads), "--summary", str(out.with_suffix(".summary.json"))]  # fmt: skip
    if models[0].startswith("http"):
        cmd += ["--student", args.student]
    if args.split:
        cmd += ["--split", args.split]
    if args.limit:
        cmd += ["--limit", str(args.limit)]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode:
        raise SystemExit(f"generate failed: {done.stderr[-2000:]}")
    summary = json.loads(out.with_suffix(".summary.json").read_text())
    load_s = summary["run"].get("load_s", 0.0)  # in-process only: the model's load, not generation
    n = summary["sessions"] - summary["skipped"]
    return {"sessions": n, "wall_s": wall, "generate_s": wall - load_s, "sessions_per_min": 60 * n / (wall - load_s),
            "latency_p50_s": summary["latency_p50_s"], "valid_rate": summary["valid_rate"]}  # fmt: skip


def answers(path: Path) -> dict:
    rows = (json.loads(line) for line in path.read_text().splitlines())
    return {r["session_id"]: (r["raw"], r["bundles"]) for r in rows}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--student", default="default", help="The student (default: the shipped one).")
    ap.add_argument("--sessions", type=Path, default=sample_sessions_path())
    ap.add_argument("--split", default="")
    ap.add_argument("--limit", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="Cores for each side; 0 = all available.")
    ap.add_argument("--out", type=Path, default=Path("bench-out/servers.json"))
    args = ap.parse_args()
    threads = args.threads or default_threads()
    student = resolve_student(args.student)
    work = Path(tempfile.mkdtemp(prefix="bench-servers-"))
    rows, procs = {}, []
    try:
        rows["in-process"] = run_generate(args, [args.student], work / "local.jsonl", threads)
        with open(work / "servers.log", "wb") as log:
            for n_servers in (1, 2):
                per = max(1, threads // n_servers)
                started = [start_server(student, per, log) for _ in range(n_servers)]
                procs += [p for p, _ in started]
                name = f"{n_servers} server{'s' if n_servers > 1 else ''} x {per} thread{'s' if per > 1 else ''}"
                rows[name] = run_generate(args, [u for _, u in started], work / f"servers{n_servers}.jsonl", threads)
                rows[name]["file"] = f"servers{n_servers}.jsonl"
                for p, _ in started:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait()
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    local = answers(work / "local.jsonl")
    for row in rows.values():
        theirs = answers(work / row.pop("file", "local.jsonl"))
        row["identical_answers"] = sum(theirs.get(k, (None,))[0] == v[0] for k, v in local.items())
        row["identical_bundles"] = sum(theirs.get(k, (None, None))[1] == v[1] for k, v in local.items())
    result = {"student": args.student, "sessions_file": str(args.sessions), "split": args.split, "threads": threads,
              "cpu_count": os.cpu_count(), "rows": rows}  # fmt: skip
    write_json(args.out, result)
    listed = [{"run": name, **r} for name, r in rows.items()]
    for r in listed:
        r["answers"] = f"{r['identical_answers']}/{r['sessions']}"
        r["bundles"] = f"{r['identical_bundles']}/{r['sessions']}"
    columns = [("run", "run", ""), ("sessions_per_min", "sessions/min", ".1f"), ("latency_p50_s", "p50 (s)", ".2f"),
               ("answers", "identical answers", ""), ("bundles", "identical bundles", ""),
               ("valid_rate", "valid", ".0%")]  # fmt: skip
    print(table(listed, columns))
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
