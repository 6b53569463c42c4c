"""`bkd-edge bench`: the student against the teacher and baselines, quality next to latency and memory."""

from __future__ import annotations

import json
from pathlib import Path

import click

from .. import BkdError
from ..data import SPLITS, check_split
from .generate_cmd import gpu_layers_option


def _levels(text: str) -> list[int]:
    try:
        levels = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise BkdError(f"--concurrency {text!r}: expected numbers like 1,2,4") from None
    if any(c < 1 for c in levels):
        raise BkdError(f"--concurrency {text!r}: every level must be at least 1")
    return levels


@click.command()
@click.option("--sessions", required=True, type=click.Path(exists=True, dir_okay=False), help="Sessions JSONL.")
@click.option("--split", default="test", show_default=True, help=f"Split to score ({', '.join(SPLITS)}).")
@click.option(
    "--limit",
    default=0,
    type=click.IntRange(min=0),
    show_default=True,
    help="Only the first N sessions of the split (0: all).",
)
@click.option("--engine", "engines", multiple=True, required=True,
              metavar="NAME=MODEL[,pack=P][,adapter=FILE[:S]][,label=T]",
              help="An engine row (repeat). MODEL: 'default' (the shipped student), 'base', a .gguf, "
              "EXPORT_DIR[:QUANT], an OpenAI-compatible URL, or "
              "baseline:whole|pairs|apriori|cluster|category|choice|learned.")  # fmt: skip
@click.option("--teacher", help="Name of the engine the ratios are taken against.")
@click.option("--compare", multiple=True, metavar="A:B", help="Also give the ratios of engine A against engine B.")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Report folder.")
@click.option("--n-ctx", default=2048, show_default=True, help="Context window of every LLM engine.")
@click.option("--threads", default=0, show_default=True, help="CPU threads; 0 = all available.")
@click.option("--seed", default=0, show_default=True)
@click.option("--warmup", default=1, show_default=True, help="Sessions generated and discarded after loading.")
@click.option("--cold", default=3, show_default=True, help="Sessions timed with an empty KV cache (uncached TTFT).")
@click.option("--concurrency", default="1,2,4", show_default=True, help="Batch throughput levels.")
@click.option("--throughput-sessions", default=12, show_default=True, help="Sessions per level (0: skip).")
@click.option("--timeout", default=3600, show_default=True, help="Seconds one engine may run before it is stopped.")
@click.option("--fresh", is_flag=True, help="Measure every row again (default: reuse rows measured the same way).")
@click.option("--json", "as_json", is_flag=True, help="Print the whole report as JSON.")
@gpu_layers_option
def bench(sessions, split, limit, engines, teacher, compare, out, n_ctx, threads, seed, warmup, cold, concurrency,
          throughput_sessions, timeout, fresh, as_json, gpu_layers):  # fmt: skip
    """Benchmark engines side by side: one row each, every engine alone in a fresh process.

    \b
    Each row: paper and strict quality, JSON-valid / hallucinated / empty rates; TTFT with the
    prompt prefix cached and uncached, prefill and decode tokens/s, per-session latency,
    sessions/min; peak RSS split file-backed / anonymous, model file, KV cache bytes; and
    sessions/min with 1, 2, 4 sessions decoded at once. Writes OUT/report.json (with a
    reproducibility record), OUT/report.md, OUT/quality_latency.png and OUT/memory.png.
    An engine that fails is reported in its row; the others still run. A rerun reuses rows
    already measured with the same spec and options, so an interrupted bench resumes.

    \b
    Example:
      bkd-edge bench --sessions sessions.jsonl --out bench/ \\
        --engine teacher=teacher.gguf,label="teacher stand-in" --teacher teacher \\
        --engine student=default --engine tuned=runs/export:Q4_K_M,pack=packs/all \\
        --engine whole=baseline:whole --engine apriori=baseline:apriori
    """
    from ..bench import BenchOptions, parse_engine, run_bench
    from ..files import claim_output

    check_split(split)
    click.get_current_context().with_resource(claim_output(out, [sessions], exists_ok=True))
    specs = [parse_engine(e) for e in engines]
    pairs = []
    for c in compare:
        a, sep, b = c.partition(":")
        if not sep:
            raise BkdError(f"--compare {c!r}: expected A:B")
        pairs.append((a, b))
    opt = BenchOptions(
        sessions=str(sessions), split=split, limit=limit, n_ctx=n_ctx, threads=threads, seed=seed, warmup=warmup,
        cold=cold, concurrency=_levels(concurrency), throughput_sessions=throughput_sessions, timeout_s=timeout,
        gpu_layers=gpu_layers,
    )  # fmt: skip

    def on_row(row):
        if row["status"] != "ok":
            click.echo(f"{row['name']}: FAILED: {row['error']}", err=True)
            return
        q, lat = row["quality"], row["latency"]
        again = " (reused)" if row.get("reused") else ""
        click.echo(
            f"{row['name']}{again}: strict F1 {q['strict_f1']:.3f}, exact {q['exact_match']:.3f}, "
            f"latency p50 {lat['latency_p50_s']:.3f} s",
            err=True,
        )

    report = run_bench(specs, opt, out, teacher, pairs, resume=not fresh, on_row=on_row)
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        click.echo((out / "report.md").read_text())
    if any(r["status"] != "ok" for r in report["rows"]):
        raise SystemExit(1)
