"""The edge runtime's footprint next to a raw llama-cpp-python script, in one run (issue 35's four figures):

    peak RSS      one session through `bkd-edge generate --json` against a raw script that loads the
                  same GGUF at the same n_ctx and answers one chat (each its own process, os.wait4)
    import        `python -X importtime -c "import bundlekd_edge.cli"` against `import llama_cpp`
                  (cumulative, median of --repeat alternating runs)
    cold start    wall time of those two processes (model file already cached by the OS)
    p50           per-session latency of `--model default` (merged) against `default:adapter`, one
                  `generate` each over the same sessions

    python scripts/bench_footprint.py [--sessions S --split test --limit 30] [--repeat 3]

Run the default once first (or `make setup`): the one-time merge is not a cold start.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bundlekd_edge.data import load_sessions, sample_sessions_path, write_sessions
from bundlekd_edge.student import resolve_student

CLI = [sys.executable, "-m", "bundlekd_edge.cli"]
RAW = """
import sys
from llama_cpp import Llama
llm = Llama(model_path=sys.argv[1], n_ctx=int(sys.argv[2]), verbose=False)
llm.create_chat_completion([{"role": "user", "content": sys.argv[3]}], max_tokens=48, temperature=0.0)
"""


def measured(cmd: list[str], stdin: bytes = b"") -> tuple[float, int]:
    """(wall seconds, peak RSS bytes) of one process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    proc.stdin.write(stdin)
    proc.stdin.close()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    err = proc.stderr.read().decode(errors="replace")
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        sys.exit(f"{' '.join(cmd[:6])}...: exit {proc.returncode}\n{err[-2000:]}")
    return wall, usage.ru_maxrss * 1024


def import_time(module: str) -> float:
    """Cumulative seconds of importing `module`, as -X importtime reports it."""
    done = subprocess.run([sys.executable, "-X", "importtime", "-c", f"import {module}"], capture_output=True,
                          text=True, check=True)  # fmt: skip
    for line in reversed(done.stderr.splitlines()):
        parts = [p.strip() for p in line.removeprefix("import time:").split("|")]
        if len(parts) == 3 and parts[2] == module:
            return int(parts[1]) / 1e6
    raise RuntimeError(f"no import time line for {module}")


def p50(model: str, sessions: Path, work: Path) -> float:
    summary = work / f"{model.replace(':', '-')}.json"
    subprocess.run([*CLI, "generate", "--model", model, "--sessions", str(sessions), "--out",
                    str(work / f"{summary.stem}.jsonl"), "--summary", str(summary), "--quiet", "--force"],
                   check=True, stdout=subprocess.DEVNULL)  # fmt: skip
    return json.loads(summary.read_text())["latency_p50_s"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sessions", type=Path, default=sample_sessions_path())
    ap.add_argument("--split")
    ap.add_argument("--limit", type=int, default=20)
    ap.add_argument("--repeat", type=int, default=3, help="runs of each process measure (median)")
    args = ap.parse_args()

    student = resolve_student("default")
    model, adapters = student.runnable()  # made now if this machine has no merged form yet
    n_ctx = student.pack.n_ctx() if student.pack else 2048
    rows = [s for s in load_sessions(args.sessions, split=args.split, require_bundles=False) if len(s.items) >= 2]
    one = json.dumps({"session_id": rows[0].session_id, "items": [vars(i) for i in rows[0].items]}).encode()
    chat = "Group these products into bundles:\n" + "\n".join(f"{n}. {i.title}" for n, i in enumerate(rows[0].items, 1))

    ours = [measured([*CLI, "generate", "--json", "--model", "default"], one) for _ in range(args.repeat)]
    raw = [measured([sys.executable, "-c", RAW, str(model), str(n_ctx), chat]) for _ in range(args.repeat)]
    imports = {m: statistics.median(import_time(m) for _ in range(args.repeat)) for m in ("bundlekd_edge.cli",
                                                                                         "llama_cpp")}  # fmt: skip
    with tempfile.TemporaryDirectory() as work:
        sessions = Path(work) / "sessions.jsonl"
        write_sessions(sessions, rows[: args.limit])
        latency = {m: p50(m, sessions, Path(work)) for m in ("default", "default:adapter")}

    def mib(runs):
        return statistics.median(r[1] for r in runs) / 2**20

    def wall(runs):
        return statistics.median(r[0] for r in runs)

    print(f"form: {student.form} ({Path(model).name}), n_ctx {n_ctx}, {args.repeat} runs each (median), "
          f"p50 over {min(args.limit, len(rows))} sessions of {args.sessions.name}")  # fmt: skip
    print("| figure | raw llama-cpp-python | bkd-edge | difference | target |")
    print("|---|---:|---:|---:|---|")
    print(f"| peak RSS, one session (MiB) | {mib(raw):.0f} | {mib(ours):.0f} | {mib(ours) - mib(raw):+.0f} | <= +100 |")
    a, b = imports["llama_cpp"], imports["bundlekd_edge.cli"]
    print(f"| import (s): `llama_cpp` / `bundlekd_edge.cli` | {a:.2f} | {b:.2f} | {b - a:+.2f} | <= +0.25 |")
    w, v = wall(raw), wall(ours)
    print(f"| cold start, one session (s) | {w:.2f} | {v:.2f} | {v - w:+.2f} | <= +0.5 |")
    d, ad = latency["default"], latency["default:adapter"]
    print(f"| p50 (s): `default:adapter` / `default` | {ad:.3f} | {d:.3f} | x{d / ad:.2f} | <= x0.5 |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
