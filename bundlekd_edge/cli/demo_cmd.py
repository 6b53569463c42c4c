"""`bkd-edge demo`: generate, print and score bundles with the default student, end to end."""

from __future__ import annotations

from pathlib import Path

import click

from ..data import load_sessions, sample_sessions_path
from ..files import write_json
from ..metrics import evaluate
from ..prompts import item_title
from ..tables import quality_table, table
from .generate_cmd import engine_options, gpu_layers_option


@click.command()
@engine_options
@gpu_layers_option
@click.option(
    "--sessions",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Sessions JSONL (default: the built-in 20-session sample).",
)
@click.option("--split", type=str, help="Split to run (default: 'test' when --sessions has one, else all).")
@click.option("--limit", type=click.IntRange(min=0), help="Only the first N sessions.")
@click.option("--show", default=5, show_default=True, help="How many sessions to print in full.")
@click.option(
    "--out",
    default="demo-out",
    show_default=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder for predictions.jsonl, scores.json and summary.json.",
)
def demo(model, pack, adapters, n_ctx, threads, seed, gpu_layers, sessions, split, limit, show, out):
    """Generate bundles offline, print some, then the quality table and the latency/memory table."""
    from ..files import RecordLog, claim_output
    from ..runtime.batch import latency_rows, latency_summary, run_sessions

    click.get_current_context().with_resource(claim_output(out, [sessions], exists_ok=True))
    from ..student import Student

    if sessions is None:
        sessions = sample_sessions_path()
        click.echo(
            f"Data: the built-in SAMPLE ({sessions.name}: 20 sessions written by bundlekd-edge, "
            "not a real data set). Use --sessions FILE for real data."
        )
    elif split is None and any(s.split == "test" for s in load_sessions(sessions)):
        split = "test"
    rows = load_sessions(sessions, split=split)[:limit]
    click.echo(f"Sessions: {len(rows)} from {sessions}" + (f" (split {split})" if split else ""))

    student = Student.load(model, adapters, pack, n_ctx, threads, seed, sessions=rows, gpu_layers=gpu_layers)
    engine = student.engine
    extra = "".join(f" + adapter {Path(a['file']).name}" for a in engine.adapters)
    extra += f" + pack {student.pack.folder.name}" if student.pack else ""
    click.echo(
        f"Student: {student.name} = {engine.model_path.name} ({engine.model_size / 2**20:.0f} MiB){extra}, "
        f"{student.form}, {engine.threads} threads"
        + ("" if model != "default" else "  (the untuned model: --model base)")
    )
    log = RecordLog(out / "predictions.jsonl", {"demo": True}, force=True)  # the demo's own folder, remade each run
    gens = run_sessions(engine, rows, log, pack=student.pack)
    log.close(complete=True)

    for session, g in list(zip(rows, gens))[:show]:
        titles = {it.id: item_title(it.title, 48) for it in session.items}
        number = {iid: i for i, iid in enumerate(session.item_ids(), 1)}
        click.echo(f"\n== {session.session_id}: {len(session.items)} items, {g.timing.total_s:.2f} s")
        for iid in session.item_ids():
            click.echo(f"   {number[iid]:>2}. {titles[iid]}")
        for label, bundles in (("predicted", g.bundles), ("truth", [vars(b) for b in session.bundles])):
            for b in bundles or [{"items": [], "intent": "(none)"}]:
                nums = ", ".join(str(number[x]) for x in b["items"])
                click.echo(f"   {label:>9}: [{nums}] {b['intent']}")

    scores = evaluate(rows, {g.session_id: g.to_prediction() for g in gens})
    summary = latency_summary(gens, engine)
    write_json(out / "scores.json", scores)
    record = {"run": engine.describe(), "student": student.describe(), "sessions_file": str(sessions)}
    write_json(out / "summary.json", {**record, **summary})
    click.echo("\nQuality\n" + quality_table(scores))
    click.echo(
        "\nLatency and memory\n" + table(latency_rows(summary), [("measure", "measure", ""), ("value", "value", "")])
    )
    click.echo(f"\nWritten: {out}/predictions.jsonl, {out}/scores.json, {out}/summary.json")
