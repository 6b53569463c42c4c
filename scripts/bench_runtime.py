"""Runtime overhead benchmark: `bkd-edge generate`'s engine against a raw llama-cpp-python loop.

Both sides load the same GGUF with the same settings (each its own Llama object, so each has its
own KV cache and sees the same sequence of prompts), get the same chat messages and the same
grammar, and decode greedily. Sessions alternate which side goes first, so neither always runs
on a warmer machine. Both are timed the same way, from outside, by wall clock:

  decode tokens/s = (generated tokens - 1) / (time of last token - time of first token)

The raw loop is the shortest thing a user would write: `Llama.create_chat_completion(stream=True)`.
Target: ours / raw >= 0.95 on decode tokens/s.

`--model` names a student as `generate` does (default: the shipped one, its adapter loaded on both
sides). No pack: both sides decode the whole answer greedily under the student's own grammar.

    python scripts/bench_runtime.py [--sessions FILE --split test] [--limit 40] [--out bench-out/runtime.json]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from llama_cpp import Llama, LlamaGrammar
from tqdm import tqdm

from bundlekd_edge.data import load_sessions, sample_sessions_path
from bundlekd_edge.files import write_json
from bundlekd_edge.prompts import build_messages, max_answer_tokens, output_grammar
from bundlekd_edge.runtime import Engine
from bundlekd_edge.runtime.engine import default_threads
from bundlekd_edge.student import resolve_student
from bundlekd_edge.tables import table


def grammar_for(session, config) -> LlamaGrammar:
    return LlamaGrammar.from_string(output_grammar(len(session.items), config.prompt), verbose=False)


def raw_loop(llm: Llama, session, grammar, config) -> dict:
    t0 = time.perf_counter()
    stamps, text = [], []
    for chunk in llm.create_chat_completion(
        build_messages(session, config.prompt),
        max_tokens=max_answer_tokens(len(session.items), config.prompt),
        temperature=0.0,
        grammar=grammar,
        stream=True,
    ):
        piece = chunk["choices"][0]["delta"].get("content")
        if piece:
            stamps.append(time.perf_counter())
            text.append(piece)
    return {"t0": t0, "stamps": stamps, "text": "".join(text), "end": time.perf_counter()}


def ours(engine: Engine, session) -> dict:
    t0 = time.perf_counter()
    g = engine.generate(session)
    t = g.timing  # the engine's stopwatch: the raw loop's, taken inside (first to last token)
    return {"text": g.raw, "tokens": t.completion_tokens, "decode_tps": t.decode_tps, "ttft_s": t.ttft_s,
            "total_s": time.perf_counter() - t0}  # fmt: skip


def rates(run: dict) -> dict:
    s = run["stamps"]
    return {
        "tokens": len(s),
        "decode_tps": (len(s) - 1) / (s[-1] - s[0]) if len(s) > 1 and s[-1] > s[0] else 0.0,
        "ttft_s": s[0] - run["t0"] if s else 0.0,
        "total_s": run["end"] - run["t0"],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sessions", type=Path, default=None, help="sessions JSONL (default: built-in sample)")
    ap.add_argument("--split", default=None)
    ap.add_argument("--limit", type=int, default=40)
    ap.add_argument("--model", default="default", help="a student, as `bkd-edge generate --model` takes")
    ap.add_argument("--out", type=Path, default=Path("bench-out/runtime.json"))
    ap.add_argument("--jump-forward", action="store_true", help="ours evaluates grammar-forced text in batches")
    args = ap.parse_args()

    path = args.sessions or sample_sessions_path()
    split = args.split or ("test" if args.sessions else None)
    sessions = load_sessions(path, split=split)[: args.limit]
    student = resolve_student(args.model, pack="none")
    if len(student.adapters) > 1:
        sys.exit("bench_runtime: llama-cpp-python's Llama takes one adapter; this student has several")
    engine = student.load_engine(threads=default_threads(), jump_forward=args.jump_forward)
    config = engine.config
    lora = {"lora_path": str(a.path), "lora_scale": a.scale} if (a := next(iter(student.adapters), None)) else {}
    llm = Llama(
        model_path=str(engine.model_path),
        **lora,
        n_ctx=config.n_ctx,
        n_batch=config.n_batch,
        n_threads=engine.threads,
        n_threads_batch=engine.threads,
        seed=config.seed,
        verbose=False,
    )
    engine.generate(sessions[0])  # warm-up both sides
    raw_loop(llm, sessions[0], grammar_for(sessions[0], config), config)

    rows, same = [], 0
    for i, s in enumerate(tqdm(sessions, desc="bench", unit="session", file=sys.stderr)):
        grammar = grammar_for(s, config)
        if i % 2 == 0:
            a, b = ours(engine, s), raw_loop(llm, s, grammar, config)
        else:
            b, a = raw_loop(llm, s, grammar, config), ours(engine, s)
        same += a.pop("text") == b["text"]
        rows.append({"session_id": s.session_id, "ours": a, "raw": rates(b)})

    def med(side, key):
        return statistics.median(r[side][key] for r in rows)

    def total(side, key):
        return sum(r[side][key] for r in rows)

    # Pooled decode rate: all tokens after the first over all decode time, per side.
    def pooled(side):
        toks = sum(max(r[side]["tokens"] - 1, 0) for r in rows)
        secs = sum((r[side]["tokens"] - 1) / r[side]["decode_tps"] for r in rows if r[side]["decode_tps"])
        return toks / secs

    summary = {
        "sessions": len(rows),
        "sessions_file": str(path),
        "split": split,
        "identical_outputs": same,
        "decode_tps": {"ours": pooled("ours"), "raw": pooled("raw")},
        "decode_tps_median": {"ours": med("ours", "decode_tps"), "raw": med("raw", "decode_tps")},
        "latency_median_s": {"ours": med("ours", "total_s"), "raw": med("raw", "total_s")},
        "latency_total_s": {"ours": total("ours", "total_s"), "raw": total("raw", "total_s")},
        "run": engine.describe(),
    }
    summary["decode_ratio"] = summary["decode_tps"]["ours"] / summary["decode_tps"]["raw"]
    summary["latency_ratio"] = summary["latency_total_s"]["ours"] / summary["latency_total_s"]["raw"]
    write_json(args.out, {**summary, "per_session": rows})

    cols = [("measure", "measure", ""), ("ours", "bkd-edge", ".3f"), ("raw", "raw llama-cpp-python", ".3f"),
            ("ratio", "ours / raw", ".3f")]  # fmt: skip
    table_rows = [
        {"measure": "decode tokens/s (pooled)", **summary["decode_tps"], "ratio": summary["decode_ratio"]},
        {"measure": "decode tokens/s (median)", **summary["decode_tps_median"],
         "ratio": summary["decode_tps_median"]["ours"] / summary["decode_tps_median"]["raw"]},
        {"measure": "per-session latency, median (s)", **summary["latency_median_s"],
         "ratio": summary["latency_median_s"]["ours"] / summary["latency_median_s"]["raw"]},
        {"measure": "all sessions, total (s)", **summary["latency_total_s"], "ratio": summary["latency_ratio"]},
    ]  # fmt: skip
    print(f"{len(rows)} sessions from {path}" + (f" (split {split})" if split else ""))
    print(f"identical outputs: {same}/{len(rows)}")
    print(table(table_rows, cols))
    verdict = "PASS" if summary["decode_ratio"] >= 0.95 else "FAIL"
    print(f"decode ratio {summary['decode_ratio']:.3f} (target >= 0.95): {verdict}  -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
