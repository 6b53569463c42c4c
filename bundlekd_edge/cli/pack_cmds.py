"""`bkd-edge pack ...`: build, verify and inspect prompt packs."""

from __future__ import annotations

import json
import random
from functools import partial
from pathlib import Path

import click

from .. import BkdError
from ..categories import CategoryView
from ..data import load_sessions
from ..knowledge.store import read_knowledge
from ..packs import Pack, PackConfig, build_pack, verify_pack
from .generate_cmd import MODEL_HELP


def vocab_counter(model: str):
    """count_tokens(text) under the student's tokenizer (llama.cpp, vocabulary only: fast)."""
    from ..runtime.llamacpp import load_vocab
    from ..runtime.model_file import check_gguf_magic, resolve_model
    from ..student import resolve_student

    llm = load_vocab(check_gguf_magic(resolve_model(resolve_student(model, pack="none").model)))
    return lambda text: len(llm.tokenize(text.encode("utf-8"), add_bos=False, special=False))  # text stays text


@click.group()
def pack():
    """Build, verify and inspect prompt packs (knowledge for in-context learning)."""


@pack.command("build")
@click.argument("knowledge", required=False, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--sessions",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Sessions JSONL: its train split becomes the retrieval examples.",
)
@click.option("--split", default="train", show_default=True, help="Which split gives the examples.")
@click.option(
    "--model", default="default", show_default=True, help="Student whose tokenizer counts tokens. " + MODEL_HELP
)
@click.option("--k", default=PackConfig.k, show_default=True, help="Nearest examples put in each prompt.")
@click.option(
    "--static-budget",
    default=PackConfig.static_budget,
    show_default=True,
    help="Tokens of static knowledge (rules, patterns) kept, whole lines only.",
)
@click.option("--no-thoughts", is_flag=True, help="Leave the teacher's thoughts out of the examples.")
@click.option("--formats", help="Only these knowledge formats of KNOWLEDGE, e.g. patterns,rules [default: all].")
@click.option(
    "--similar-items",
    is_flag=True,
    help="Also tell the model, per session, which of its items have similar titles (MiniLM groups). One "
    "cut: the cluster baseline's, tuned on the split. Three (--similar-spread): centred where the "
    "runtime's choice among them scores best on the split.",
)
@click.option(
    "--similar-spread",
    default=0.12,
    show_default=True,
    type=click.FloatRange(0.0, 0.5),
    help="With --similar-items: also give the groups at the tuned cut minus and plus this cosine distance "
    "(close / medium / loose), as the shipped student was trained; 0 gives one line.",
)
@click.option(
    "--categories/--no-categories",
    default=True,
    show_default=True,
    help="With the three-cut hint: also offer the answer's choice the session's items grouped by their "
    "catalogue category (which path, which depths: chosen by 5-fold cross-validation on the split; none "
    "where it does not help, or the catalogue has no categories). The prompt's text does not change.",
)
@click.option(
    "--calibrate/--no-calibrate",
    default=True,
    show_default=True,
    help="With the three-cut hint: run the --model student over the split once and keep, by 5-fold "
    "cross-validation there, the best way to choose the answer's partition: the cluster baseline's, the "
    "hint's cut counts alone, or with the student's probabilities (ties to the simpler). Takes ~0.5 s a "
    "session on 2 cores for the shipped student.",
)
@click.option(
    "--calibrate-limit",
    default=0,
    type=click.IntRange(min=0),
    help="Calibrate on this many sessions of the split (a fixed random sample), not all [default: all].",
)
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="New pack folder.")
def build_cmd(
    knowledge, sessions, split, model, k, static_budget, no_thoughts, formats, similar_items, similar_spread,
    categories, calibrate, calibrate_limit, out,
):  # fmt: skip
    """Build a pack from a KNOWLEDGE folder (from `bkd-edge distill`) and a sessions file.

    Without KNOWLEDGE the pack holds retrieval examples only.
    """
    from ..embeddings import default_encoder_dir
    from ..files import claim_output

    click.get_current_context().with_resource(claim_output(out, [knowledge, sessions], exists_ok=True))
    count_tokens = vocab_counter(model)  # first: a wrong --model fails before any work
    picked = [f.strip() for f in formats.split(",") if f.strip()] if formats else None
    lines, thoughts = read_knowledge(knowledge, picked)
    examples = load_sessions(sessions, split=split)
    encoder = default_encoder_dir()
    cut, tuned, view, view_report = 0.0, "", CategoryView(), None
    if similar_items:
        from ..baselines import TitleClusters, tune_hint_categories, tune_hint_centre

        clusters = TitleClusters().fit(examples)
        cut = cluster_cut = clusters.params["threshold"]
        if similar_spread:
            cut, f1 = tune_hint_centre(clusters, examples, similar_spread)
            tuned = f" (tuned for the choice among its cuts, {split} strict F1 {f1:.3f}; cluster cut {cluster_cut})"
            if categories:
                view, view_report = tune_hint_categories(clusters, examples, cut, similar_spread)
    config = PackConfig(
        k=k,
        static_budget=static_budget,
        with_thoughts=not no_thoughts,
        similar_items=cut,
        similar_spread=similar_spread if cut else 0.0,
        categories=view,
        categories_report=view_report,
    )
    recipe = {"knowledge": str(knowledge) if knowledge else None, "formats": picked, "sessions": str(sessions),
              "split": split}  # fmt: skip
    calibrator = None
    if calibrate and config.similar_spread:
        from ..calibration import calibrate_folder

        sample = examples
        if 0 < calibrate_limit < len(examples):
            sample = [examples[i] for i in sorted(random.Random(0).sample(range(len(examples)), calibrate_limit))]
        category = None
        if categories and any(it.categories for s in examples for it in s.items):
            from ..baselines import CategoryGroups

            category = CategoryGroups().fit(examples).params
        calibrator = partial(calibrate_folder, model=model, sessions=sample, cluster=clusters.params, category=category)
    manifest = build_pack(out, lines, examples, thoughts, count_tokens, encoder, config, recipe, calibrator)
    c, t = manifest["counts"], manifest["tokens"]
    click.echo(
        f"{out}: {c['static_lines']} static lines ({t['static']} tokens, {c['static_lines_dropped']} dropped "
        f"by the budget), {c['examples']} examples (~{t['example_mean']:.0f} tokens each, k={k}), "
        f"{c['thoughts']} with thoughts" + (f"; similar-items hint at cosine distance {cut}{tuned}" if cut else "")
    )
    if view_report:
        click.echo(categories_text(view_report, split))
    if "calibration" in manifest:
        click.echo(calibration_text(manifest["calibration"], split))


def categories_text(report: dict, split: str) -> str:
    """The category views' table `pack build` prints: each view's CV strict F1 (the choice rule
    without the student), the winner."""
    if not report.get("views"):
        return f"category view: none ({report.get('note', '')})"
    rows = "\n".join(
        f"  {v['view']:<24} {v['cv_strict_f1']:.4f} (sd {v['fold_sd']:.3f})"
        + ("  <- chosen" if v["view"] == report["winner"] else "")
        for v in report["views"]
    )
    return (
        f"category view, {report['folds']}-fold CV strict F1 on {report['sessions']} {split} sessions (the "
        f"choice rule without the student; ties within {report['tie']} go to the simpler view):\n{rows}\n"
        f"  choosing the view, cross-validated (picked on the other folds): {report['chosen_cv_strict_f1']:.4f}"
    )


def calibration_text(report: dict, split: str) -> str:
    """The calibration table `pack build` prints: each rule's CV strict F1, the winner."""
    rows = "\n".join(
        f"  {r['rule']:<14} {r['cv_strict_f1']:.4f} (sd {r['fold_sd']:.3f})"
        + ("  <- chosen" if r["rule"] == report["winner"] else "")
        for r in report["rules"]
    )
    note = ""
    if report.get("student_trained_on_these_sessions"):
        note = f"\n  note: {report['student']} was trained on these sessions: its probabilities here are optimistic"
    return (
        f"partition choice, {report['folds']}-fold CV strict F1 on {report['sessions']} {split} sessions "
        f"(student {report['student']}, {report['student_s_per_100_sessions']} s per 100 sessions; "
        f"ties within {report['tie']} go to the simpler rule):\n{rows}\n"
        f"  calibrating, cross-validated (picked on the other folds): {report['calibrated_cv_strict_f1']:.4f}{note}"
    )


@pack.command("verify")
@click.argument("folder", type=click.Path(path_type=Path))
def verify_cmd(folder):
    """Check every file of a pack against its manifest; name what changed or is missing."""
    problems = verify_pack(folder)
    if problems:
        raise BkdError(f"{folder}: pack is damaged:\n  " + "\n  ".join(problems))
    click.echo(f"{folder}: ok")


@pack.command("show")
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
def show_cmd(folder, as_json):
    """Print what a pack holds: recipe, counts, tokens, the static text."""
    p = Pack(folder)
    if as_json:
        click.echo(json.dumps(p.manifest, indent=2))
        return
    m = p.manifest
    click.echo(f"pack {folder} ({m['format']}, made {m.get('created')} by bkd-edge {m.get('bkd_edge')})")
    click.echo(f"recipe: {json.dumps(m.get('recipe'))}")  # what the manifest says, whatever it holds
    click.echo(f"counts: {json.dumps(m.get('counts'))}")
    click.echo(f"tokens: {json.dumps(m.get('tokens'))}, k={p.k}")
    if m.get("categories"):
        click.echo(categories_text(m["categories"], (m.get("recipe") or {}).get("split", "train")))
    if m.get("calibration"):
        click.echo(calibration_text(m["calibration"], (m.get("recipe") or {}).get("split", "train")))
    click.echo("static knowledge:\n" + (p.static or "(none)"))
