"""Batch throughput: sessions per minute of the sequential engine against batched decoding.

One model is loaded once. The sequential side is the plain `Engine.generate` loop (which reuses
the KV cache of the prompt prefix shared by consecutive sessions); each concurrent side runs
`generate_concurrent` with up to N sessions in flight in one llama.cpp context. All sides see
the same sessions, prompts and grammars and decode greedily, so their bundles should agree;
the table says how often they do. Timings are wall clock for the whole run. The sides run one
after the other, so on a loaded machine use --rounds: each round runs every side, in an order
rotated by one each round, and a side's time is its median over the rounds.

    python scripts/bench_concurrent.py [--sessions FILE --split test] [--limit 24] [--concurrency 1,2,4]
        [--threads N] [--rounds N] [--json OUT]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

from bundlekd_edge.data import load_sessions, sample_sessions_path
from bundlekd_edge.files import write_json
from bundlekd_edge.runtime import Generation
from bundlekd_edge.runtime.concurrent import generate_concurrent
from bundlekd_edge.student import resolve_student
from bundlekd_edge.tables import table


def side(name: str, gens: list[Generation], walls: list[float], reference: list[Generation]) -> dict:
    tokens = sum(g.timing.completion_tokens for g in gens)
    wall = statistics.median(walls)
    return {
        "run": name,
        "sessions": len(gens),
        "wall_s": wall,
        "wall_s_rounds": walls,
        "sessions_per_min": 60 * len(gens) / wall if wall else 0.0,
        "answer_tokens_per_s": tokens / wall if wall else 0.0,
        "latency_p50_s": statistics.median(g.timing.total_s for g in gens),
        "valid": sum(g.valid for g in gens),
        # Identical bundles (items and intents) to the sequential engine's, session by session.
        "same_as_sequential": sum(a.bundles == b.bundles for a, b in zip(gens, reference)),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sessions", type=Path, default=None, help="sessions JSONL (default: built-in sample)")
    ap.add_argument("--split", default=None, help="default: test when --sessions is given")
    ap.add_argument("--limit", type=int, default=24)
    ap.add_argument("--concurrency", default="1,2,4", help="comma-separated levels")
    ap.add_argument("--threads", type=int, default=0, help="llama.cpp threads (0: every core)")
    ap.add_argument("--rounds", type=int, default=1, help="run every side this many times (median)")
    ap.add_argument("--model", default="default")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args()

    levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
    path = args.sessions or sample_sessions_path()
    split = args.split or ("test" if args.sessions else None)
    sessions = load_sessions(path, split=split)[: args.limit]
    engine = resolve_student(args.model, pack="none").load_engine(threads=args.threads)
    engine.generate(sessions[0])  # warm-up: page the weights in, as every side then finds them

    sides = [0, *levels]  # 0: the sequential engine loop
    walls: dict[int, list[float]] = {n: [] for n in sides}
    gens: dict[int, list[Generation]] = {}
    for r in range(args.rounds):
        for n in sides[r % len(sides) :] + sides[: r % len(sides)]:
            if n == 0:
                t0 = time.perf_counter()
                gens[n] = [engine.generate(s) for s in sessions]
                walls[n].append(time.perf_counter() - t0)
            else:
                run = generate_concurrent(engine, sessions, n)
                gens[n] = run.generations
                walls[n].append(run.wall_s)
            label = f"concurrency {n}" if n else "sequential"
            print(f"round {r + 1}, {label}: {60 * len(sessions) / walls[n][-1]:.1f} sessions/min", file=sys.stderr)
    rows = [
        side(f"concurrent, {n} in flight" if n else "sequential engine.generate", gens[n], walls[n], gens[0])
        for n in sides
    ]
    base = rows[0]["sessions_per_min"]
    for r in rows:
        r["speedup"] = r["sessions_per_min"] / base if base else 0.0

    load = os.getloadavg()[0]
    print(f"{len(sessions)} sessions from {path}" + (f" (split {split})" if split else ""))
    print(
        f"{engine.threads} llama.cpp threads, {args.rounds} round(s); "
        f"1-minute load average {load:.2f} on {os.cpu_count()} cores"
    )
    cols = [
        ("run", "run", ""),
        ("sessions_per_min", "sessions/min", ".1f"),
        ("speedup", "vs sequential", ".2f"),
        ("answer_tokens_per_s", "answer tokens/s", ".1f"),
        ("latency_p50_s", "latency p50 (s)", ".2f"),
        ("wall_s", "wall (s)", ".1f"),
        ("valid", "valid", "d"),
        ("same_as_sequential", "same bundles", "d"),
    ]
    print(table(rows, cols))
    if args.json:
        write_json(
            args.json,
            {"sessions_file": str(path), "split": split, "load_average": load, "rows": rows, "run": engine.describe()},
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
