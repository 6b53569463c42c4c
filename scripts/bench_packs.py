"""Prompt-pack prefix benchmark: what the cached and the persisted static prefix buy, side by side.

For each pack (its static knowledge is the prefix; retrieval examples are left out here so the
prefix effect is measured alone, `--k` puts them back):

  reuse   time to first token per session, prefix reused from the KV cache (how `generate`
          runs) vs the whole prompt evaluated for every session;           target <= 0.1x
          floor: the session's own share of the prompt's tokens, which reuse cannot skip
  cold    first session in a fresh process: prefix state loaded from the pack vs the prefix
          evaluated (model load excluded, state load included);            target <= 0.15x
  p50     per-session latency with the reused prefix                        target <= 1.0 s (1,500-token pack)

Each cold measurement runs in its own subprocess, alternating the two sides. Sessions are spread
evenly over the split. The context is sized per pack as `generate` sizes it (`Pack.n_ctx`), so
every session of the data fits beside the whole prefix; any that does not is left out and counted.

    python scripts/bench_packs.py PACK [PACK ...] [--model base] [--sessions FILE --split test] [--limit 20] [--n-ctx N]
                                  [--jump-forward] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bundlekd_edge.data import load_sessions, sample_sessions_path, spread
from bundlekd_edge.files import write_json
from bundlekd_edge.packs import Pack
from bundlekd_edge.student import resolve_student
from bundlekd_edge.tables import table


def reuse_run(model: str, pack: Pack, sessions, k: int, n_ctx: int, jump_forward: bool = False) -> dict:
    engine = resolve_student(model).load_engine(n_ctx=n_ctx, jump_forward=jump_forward)
    parts = {s.session_id: pack.prompt_parts(s, lambda kn, ex, s=s: engine.fits(s, kn, ex)) for s in sessions}
    examples = {sid: (ex if k else "") for sid, (_, ex) in parts.items()}
    engine.warm_prefix(pack.static)
    reused = [engine.generate(s, pack.static, examples[s.session_id]).timing for s in sessions]
    cold = []
    for s in sessions:
        engine.forget()  # the whole prompt is evaluated again
        cold.append(engine.generate(s, pack.static, examples[s.session_id]).timing)
    # Reuse skips the prefix only: the session's own tokens are still evaluated, so the ratio cannot
    # fall below their share of the prompt (the floor, were prefill time linear in tokens).
    n_prefix = len(engine.prefix_tokens(pack.static))
    total = [len(engine.prompt_tokens(s, pack.static, examples[s.session_id])) for s in sessions]
    return {
        "prefix_tokens": n_prefix,
        "suffix_tokens_p50": statistics.median(n - n_prefix for n in total),
        "reuse_floor": statistics.median((n - n_prefix) / n for n in total),
        "ttft_reused_p50_s": statistics.median(t.ttft_s for t in reused),
        "ttft_full_p50_s": statistics.median(t.ttft_s for t in cold),
        "latency_reused_p50_s": statistics.median(t.total_s for t in reused),
        "latency_full_p50_s": statistics.median(t.total_s for t in cold),
    }


COLD = """
import json, sys, time
from bundlekd_edge.data import load_sessions
from bundlekd_edge.packs import Pack
from bundlekd_edge.student import resolve_student
model, pack, state, sessions, split, sid, n_ctx = sys.argv[1:8]
p = Pack(pack)
s = next(x for x in load_sessions(sessions, split=split or None) if x.session_id == sid)
e = resolve_student(model).load_engine(n_ctx=int(n_ctx))
e.model_sha256()  # hashing the GGUF is a one-time cost of the key, not of the prefix
t0 = time.perf_counter()
warm = e.warm_prefix(p.static, state) if state else {"status": "evaluated"}
g = e.generate(s, p.static)
first = time.perf_counter() - t0 - g.timing.total_s + g.timing.ttft_s
print(json.dumps({"status": warm["status"], "first_token_s": first}))
"""


def cold_run(
    model: str, pack_dir: Path, sessions_path: Path, split: str | None, session_ids: list[str], n_ctx: int
) -> dict:
    state = Path(tempfile.mkdtemp(prefix="bkd-state-"))
    try:
        # Persist the state once (what the first `generate --pack` run on a laptop leaves behind).
        e = resolve_student(model).load_engine(n_ctx=n_ctx)
        e.warm_prefix(Pack(pack_dir).static, state)
        del e
        loaded, evaluated = [], []
        for i, sid in enumerate(session_ids):
            order = [(loaded, str(state)), (evaluated, "")]
            for bucket, st in order if i % 2 == 0 else order[::-1]:
                args = [sys.executable, "-c", COLD, model, str(pack_dir), st, str(sessions_path), split or "", sid,
                        str(n_ctx)]  # fmt: skip
                out = json.loads(subprocess.run(args, capture_output=True, text=True, check=True).stdout)
                if st and out["status"] != "loaded":
                    raise SystemExit(f"persisted state was not used: {out['status']}")
                bucket.append(out["first_token_s"])
        return {"cold_loaded_p50_s": statistics.median(loaded), "cold_evaluated_p50_s": statistics.median(evaluated)}
    finally:
        shutil.rmtree(state, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("packs", nargs="+", type=Path)
    ap.add_argument("--model", default="base", help="what `generate --model` takes (default: the untuned base)")
    ap.add_argument("--sessions", type=Path, default=None)
    ap.add_argument("--split", default=None)
    ap.add_argument("--limit", type=int, default=20)
    ap.add_argument("--cold", type=int, default=3, help="fresh-process runs per side")
    ap.add_argument("--k", type=int, default=0, help="retrieved examples per prompt (0: the prefix alone)")
    ap.add_argument("--n-ctx", type=int, default=0, help="context window (0: the pack's own, as generate sizes it)")
    ap.add_argument("--out", type=Path, default=Path("bench-out/packs.json"))
    ap.add_argument("--jump-forward", action="store_true", help="evaluate grammar-forced text in batches (reuse run)")
    args = ap.parse_args()
    path = args.sessions or sample_sessions_path()
    split = args.split or ("test" if args.sessions else None)
    every = load_sessions(path, split=split)

    rows = []
    for pack_dir in args.packs:
        pack = Pack(pack_dir)
        n_ctx = args.n_ctx or pack.n_ctx()
        # Only sessions whose prompt fits with the whole static prefix share it; a longer one gets a
        # trimmed prefix (packs.py) and pays its prefill, so it says nothing about prefix reuse.
        fits = resolve_student(args.model).load_engine(n_ctx=n_ctx).fits
        fit = [s for s in every if fits(s, pack.static, "")]
        sessions = spread(fit, args.limit)
        row = {"pack": str(pack_dir), "n_ctx": n_ctx, "sessions": len(sessions), "too_long": len(every) - len(fit),
               **reuse_run(args.model, pack, sessions, args.k, n_ctx, args.jump_forward)}  # fmt: skip
        row.update(cold_run(args.model, pack_dir, path, split, [s.session_id for s in sessions[: args.cold]], n_ctx))
        row["reuse_ratio"] = row["ttft_reused_p50_s"] / row["ttft_full_p50_s"]
        row["cold_ratio"] = row["cold_loaded_p50_s"] / row["cold_evaluated_p50_s"]
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
    settings = {"model": args.model, "sessions_file": str(path), "split": split, "k": args.k,
                "jump_forward": args.jump_forward}  # fmt: skip
    write_json(args.out, {**settings, "rows": rows})
    cols = [
        ("pack", "pack", ""),
        ("prefix_tokens", "prefix tokens", ""),
        ("n_ctx", "n_ctx", ""),
        ("sessions", "sessions", ""),
        ("too_long", "too long (left out)", ""),
        ("ttft_reused_p50_s", "TTFT reused", ".3f"),
        ("ttft_full_p50_s", "TTFT full", ".3f"),
        ("suffix_tokens_p50", "session tokens p50", ".0f"),
        ("reuse_ratio", "ratio (<=0.1)", ".3f"),
        ("reuse_floor", "floor", ".3f"),
        ("cold_loaded_p50_s", "cold, state loaded", ".3f"),
        ("cold_evaluated_p50_s", "cold, evaluated", ".3f"),
        ("cold_ratio", "ratio (<=0.15)", ".3f"),
        ("latency_reused_p50_s", "latency p50 (s)", ".3f"),
    ]
    print(f"model {args.model}, sessions spread over {path}" + (f" (split {split})" if split else "") + f", k={args.k}")
    print(table(rows, cols))
    return 0


if __name__ == "__main__":
    sys.exit(main())
