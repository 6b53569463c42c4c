"""`bkd-edge experiment`: the paper's grid (format x quantity x utilisation), resumable."""

from __future__ import annotations

import json
from pathlib import Path

import click


@click.command()
@click.argument("grid", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Experiment folder.")
@click.option("--sft-model", help="Reuse this fine-tuned student (EXPORT_DIR[:QUANT] or .gguf) for the SFT cells.")
@click.option(
    "--spread",
    type=click.IntRange(min=0),
    help="Override the grid's sessions scored per cell, spread evenly over the split (0: all).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def experiment(grid, out, sft_model, spread, as_json):
    """Run the knowledge format / quantity / utilisation grid of GRID (a small TOML file).

    \b
    Each table sweeps one factor around the grid's base cell: knowledge format (none, retrieved
    examples, patterns, rules, thoughts, combinations), quantity (sampling strategy x ratio) and
    utilisation (ICL, SFT, SFT+ICL). Distillation (teacher calls cached), packs, the SFT export
    and every cell are kept in OUT and reused: rerun the same command to resume.
    Writes OUT/results.md, OUT/results.json and OUT/experiment.png. See experiments/cpu-grid.toml.
    """
    from dataclasses import replace

    from ..experiment import Experiment, load_grid
    from ..files import claim_output

    click.get_current_context().with_resource(claim_output(out, [grid], exists_ok=True))
    g = load_grid(grid)
    g = replace(g, sft_model=sft_model or g.sft_model, spread=g.spread if spread is None else spread)
    report = Experiment(g, out, say=lambda m: click.echo(f"[experiment] {m}", err=True)).run()
    click.echo(json.dumps(report, indent=2) if as_json else (out / "results.md").read_text())
