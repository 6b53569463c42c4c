"""`bkd-edge train RECIPE`: LoRA SFT of the student into a run folder (imports torch only here)."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import click


def _exit_on_sigterm() -> None:
    """A killed command (SIGTERM) unwinds like Ctrl-C: temp files and folders are removed."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


@click.command()
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), help="Run folder (default: runs/<name>).")
@click.option("--resume", is_flag=True, help="Continue an interrupted run from its last checkpoint.")
@click.option("--sessions", help="Override the recipe's sessions file.")
@click.option("--base", help="Override the recipe's base model ('default', a .gguf file or an HF folder).")
@click.option("--max-steps", type=int, help="Override the recipe's max_steps.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def train(recipe, out, resume, sessions, base, max_steps, quiet):
    """Fine-tune the student with LoRA on the train split; evaluate strict F1 on val; keep the best.

    \b
    The recipe is a TOML or JSON file (see train/*.toml); every key has a working default.
    The run folder holds the adapter, checkpoints, metrics.jsonl and run.json; an interrupted
    run continues with --resume. Several processes (GPUs, or CPU processes over gloo):
      accelerate launch --multi_gpu --num_processes N -m bundlekd_edge.cli train RECIPE --out RUN
    """
    from ..files import claim_output
    from ..train.recipe import load_recipe

    r = load_recipe(recipe, {"sessions": sessions, "base": base, "max_steps": max_steps})
    out = out or Path("runs") / r.name
    if os.environ.get("RANK", "0") == "0":  # one process of a multi-process run holds the lock
        click.get_current_context().with_resource(claim_output(out, [recipe, r.sessions], exists_ok=True))
    from ..train.trainer import train as run_training  # torch loads only for this command

    _exit_on_sigterm()
    result = run_training(r, out, resume=resume, progress=not quiet)
    if result:
        f1 = result["best_val_strict_f1"]
        click.echo(
            f"{out}: {result['steps']} steps, {result['s_per_step']:.2f} s/step, {result['tokens_per_s']:.0f} tok/s; "
            + (f"best val strict F1 {f1:.3f} at step {result['best_step']}" if f1 is not None else "no val split")
        )
