"""`bkd-edge`: a thin click layer over the library, one small module of commands per stage."""

from __future__ import annotations

import click

from .. import BkdError, __version__


class Group(click.Group):
    """Turns a BkdError anywhere below into a one-line 'Error: ...' and exit status 1."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except BkdError as e:
            raise click.ClickException(str(e)) from None


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="bkd-edge")
def main():
    """Distilled bundle generation on the edge.

    Generate product bundles offline with a small llama.cpp student, score them, and
    measure latency and memory next to quality.
    """


def _register():
    from . import (
        bench_cmd,
        data_cmds,
        demo_cmd,
        distill_cmd,
        doctor_cmd,
        eval_cmd,
        experiment_cmd,
        export_cmd,
        generate_cmd,
        pack_cmds,
        serve_cmd,
        train_cmd,
    )

    main.add_command(data_cmds.data)
    main.add_command(generate_cmd.generate)
    main.add_command(eval_cmd.eval_)
    main.add_command(demo_cmd.demo)
    main.add_command(pack_cmds.pack)
    main.add_command(distill_cmd.distill)
    main.add_command(train_cmd.train)
    main.add_command(export_cmd.export)
    main.add_command(export_cmd.quant_pick)
    main.add_command(bench_cmd.bench)
    main.add_command(experiment_cmd.experiment)
    main.add_command(serve_cmd.serve)
    main.add_command(doctor_cmd.doctor)
    main.add_command(doctor_cmd.setup)


_register()
