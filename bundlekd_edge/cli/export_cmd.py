"""`bkd-edge export RUN_DIR`: merge, GGUF, quantise, parity gate, one deployable folder."""

from __future__ import annotations

import json
import signal
import sys
from dataclasses import replace
from pathlib import Path

import click


def _exit_on_sigterm() -> None:
    """A killed command (SIGTERM) unwinds like Ctrl-C: temp files and folders are removed."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


@click.command()
@click.argument("run_dir", required=False, type=click.Path(file_okay=False, path_type=Path))
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Export folder to create.")
@click.option("--base", help="Instead of RUN_DIR: the base model, an HF model folder or a .gguf file ('default': "
              "SmolLM2-135M-Instruct).")  # fmt: skip
@click.option("--adapter", type=click.Path(file_okay=False, path_type=Path),
              help="With --base: a peft LoRA folder (adapter_config.json + adapter_model.safetensors, as peft, "
              "Unsloth and LLaMA-Factory write it) or a run folder.")  # fmt: skip
@click.option("--sessions", type=click.Path(dir_okay=False, path_type=Path),
              help="With --base: sessions whose val (else test) split is the parity check's golden set "
              "[the built-in sample].")  # fmt: skip
@click.option(
    "--recipe",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Export recipe TOML (quants, golden sessions, parity gate) [default: export/default.toml's values].",
)
@click.option(
    "--quant",
    "quants",
    help="Comma-separated quant types [recipe: Q8_0,Q4_K_M]; 'auto': all of Q4_0,Q4_K_S,Q4_K_M,Q5_K_M,Q8_0,F16, "
    "each measured on this machine, the fastest within 0.01 val strict F1 of F16 made the default (quant-pick).",
)
@click.option("--golden", type=click.IntRange(min=1), help="Val sessions in the parity check [recipe: 8].")
@click.option("--gen-max-tokens", type=click.IntRange(min=0), help="Cap on generated tokens per golden session.")
@click.option("--min-top1", type=float, help="Parity gate: min top-1 agreement of quants below 8 bits [recipe: 0.8].")
@click.option("--min-bundles", type=float, help="Parity gate: min identical-bundle rate below 8 bits [recipe: 0.5].")
@click.option("--keep-f16", is_flag=True, help="Also ship the GGUF f16 file.")
@click.option("--no-ollama", is_flag=True, help="No Ollama Modelfile.")
@click.option("--threads", default=0, help="CPU threads for quantisation and parity; 0 = all.")
@click.option(
    "--promote",
    metavar="NAME",
    help="Also install the adapter, its slim pack and a card as the shipped student bundlekd_edge/students/NAME "
    "(then `generate --model NAME`).",
)
@click.option(
    "--data-licence",
    default="",
    help="With --promote: the training data's origin and licence, for the card.",
)
def export(
    run_dir, out, base, adapter, sessions, recipe, quants, golden, gen_max_tokens, min_top1, min_bundles, keep_f16,
    no_ollama, threads, promote, data_licence,
):  # fmt: skip
    """Merge the run's LoRA into its base, write GGUF f16, quantise, check parity, package.

    \b
      bkd-edge export RUN_DIR --out OUT                       a run of `bkd-edge train`
      bkd-edge export --base BASE --adapter DIR --out OUT     any peft adapter over its base
    BASE is an HF model folder (merged shard by shard, converted by llama.cpp's own converter,
    judged against the merged model in torch) or a GGUF file of any architecture gguf-py knows
    (merged tensor by tensor, judged against the adapter over it in llama.cpp).
    \b
    The result is one folder: model-<QUANT>.gguf files, manifest.json (sha256 of every file,
    base, adapter, recipe, parity), adapter.gguf (the LoRA alone, over the base GGUF), a model card
    README.md and Ollama Modelfiles. Run it with
      bkd-edge generate --model OUT [--sessions ...]       (Q4_K_M; OUT:Q8_0 for another quant)
    The export fails, leaving nothing behind, when a stage diverges from the merged model.
    """
    from ..files import claim_output

    if (run_dir is None) == (base is None) or (base is None) != (adapter is None) or (sessions and not base):
        raise click.UsageError("give RUN_DIR, or --base with --adapter (and optionally --sessions)")
    if promote and run_dir is None:
        raise click.UsageError("--promote installs a student trained by `bkd-edge train`: give its RUN_DIR")
    click.get_current_context().with_resource(claim_output(out, [run_dir or adapter, recipe], exists_ok=True))
    from ..export.build import export_adapter, export_run
    from ..export.recipe import ExportRecipe, load_export_recipe, with_auto_quants

    defaults = load_export_recipe(recipe) if recipe else ExportRecipe()
    auto = quants is not None and quants.strip().lower() == "auto"
    if auto:
        defaults, quants = with_auto_quants(defaults), None
    gate = replace(defaults.gate, **{k: v for k, v in (("quant_top1", min_top1), ("quant_bundles", min_bundles))
                                 if v is not None})  # fmt: skip
    given = {
        "quants": [q for q in quants.split(",") if q.strip()] if quants is not None else None,
        "golden": golden,
        "gen_max_tokens": gen_max_tokens,
        "keep_f16": True if keep_f16 else None,  # flags turn a recipe's setting on, never off
        "ollama": False if no_ollama else None,
    }
    recipe = replace(defaults, gate=gate, **{k: v for k, v in given.items() if v is not None})  # validated again
    _exit_on_sigterm()
    if run_dir is not None:
        manifest = export_run(run_dir, out, recipe, threads=threads, log=click.echo)
    else:
        manifest = export_adapter(base, adapter, out, sessions, recipe, threads=threads, log=click.echo)
    sizes = ", ".join(f"{q} {m['bytes'] / 2**20:.0f} MiB" for q, m in manifest["models"].items())
    click.echo(f"{out}: {sizes}; parity passed; {manifest['timings']['total_s']:.0f} s")
    if auto:
        _pick(out, threads=threads)
    if promote:
        from ..export.promote import promote as install

        trained = manifest["recipe"]
        data = {"sessions": Path(trained["sessions"]).name, "split": "train", "licence": data_licence or "not given"}
        data["sessions_sha256"] = (manifest.get("data") or {}).get("sessions_sha256")
        folder = install(out, promote, data)
        click.echo(f"promoted: {folder} (run it with --model {promote})")


@click.command("quant-pick")
@click.argument("export_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--sessions", type=click.Path(dir_okay=False, path_type=Path),
              help="Sessions JSONL whose val split is measured [the export's training data].")  # fmt: skip
@click.option("--spread", default=30, show_default=True, type=click.IntRange(min=1),
              help="Val sessions measured, spread evenly over the split.")  # fmt: skip
@click.option("--tolerance", default=0.01, show_default=True, type=click.FloatRange(0, 1),
              help="Largest val strict F1 a quant may lose against F16.")  # fmt: skip
@click.option("--threads", default=0, help="CPU threads; 0 = all.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def quant_pick(export_dir, sessions, spread, tolerance, threads, as_json):
    """Measure every quant of EXPORT_DIR on this machine and make the fastest good one its default.

    \b
    Each quant (the export needs its F16 as reference: export with --keep-f16 or --quant auto)
    generates the same val sessions in its own process: per-session latency, decode and prefill
    tokens/s, peak RSS, and val strict F1. The fastest whose F1 is within --tolerance of F16's
    becomes the manifest's default_quant, so `generate --model EXPORT_DIR` runs it; the table
    goes into the manifest (quant_pick).
    """
    _pick(export_dir, sessions, spread, tolerance, threads, as_json)


def _pick(export_dir, sessions=None, spread=30, tolerance=0.01, threads=0, as_json=False) -> None:
    from ..bench.quant_pick import pick_quant, quant_table

    result = pick_quant(export_dir, sessions, spread, tolerance, threads)
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        click.echo(quant_table(result))
        click.echo(f"{export_dir}: default quant is now {result['choice']}")
