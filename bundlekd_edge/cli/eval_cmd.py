"""`bkd-edge eval`: score a predictions file against the gold sessions."""

from __future__ import annotations

import glob
import json
from pathlib import Path

import click

from .. import BkdError
from ..data import SPLITS, check_split, load_sessions
from ..files import OutputLock, refuse_overwrite, write_json
from ..metrics import evaluate, intent_pairs, intent_scores, load_prediction_files
from ..tables import quality_table


@click.command("eval")
@click.option(
    "--gold", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Sessions JSONL with bundles."
)
@click.option(
    "--pred",
    "preds",
    required=True,
    multiple=True,
    help="Predictions JSONL, or a quoted glob ('pred-*.jsonl'); repeatable. Several files (the shards of one "
    "run) are scored as one; a session in two of them is an error.",
)
@click.option("--split", type=str, help=f"Score only this split of the gold file ({', '.join(SPLITS)}).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="Write the scores as one JSON object.")
@click.option("--force", is_flag=True, help="Overwrite an existing --out.")
@click.option(
    "--intents",
    is_flag=True,
    help="Also score the intents of matched bundles: cosine of MiniLM sentence embeddings (the encoder "
    "packs use, no torch) and the exact-name rate; where the gold items carry categories, beside those of a "
    "no-model namer on the same bundles (the deepest category the bundle's items share).",
)
@click.option(
    "--judge",
    metavar="TEACHER",
    help="Also have an LLM judge the intents of matched bundles against the true ones (0-2 by the rubric in "
    "bundlekd_edge/judge.py): http(s)://HOST/v1 (OpenAI-compatible) or gguf:PATH.",
)
@click.option("--judge-model", default="", help="Model name at the judge endpoint [default: the first it lists].")
@click.option(
    "--judge-key-env", default="OPENAI_API_KEY", show_default=True, help="NAME of the judge's API key variable."
)
@click.option("--judge-cache", type=click.Path(file_okay=False, path_type=Path),
              help="Judge call cache [~/.cache/bundlekd-edge/judge-cache].")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def eval_(gold, preds, split, out, force, intents, judge, judge_model, judge_key_env, judge_cache, as_json):
    """Paper metrics (precision, recall, coverage) next to strict one-to-one matched scores.

    \b
    A predicted bundle "hits" when its items are a subset of a ground-truth bundle (paper).
    Strict scores match predicted to ground-truth bundles one-to-one by maximal summed
    Jaccard: strict precision/recall/F1 and the exact-match rate. Gold sessions with no
    prediction count as empty; a prediction for a session not in the gold file is an error.
    """
    check_split(split)
    files = prediction_paths(preds)
    refuse_overwrite(out, [gold, *files], force)
    if out:
        click.get_current_context().with_resource(OutputLock(out))
    sessions, predictions = load_sessions(gold, split=split), load_prediction_files(files)
    scores = evaluate(sessions, predictions)
    if intents or judge:
        from ..embeddings import TextEncoder, default_encoder_dir

        encode = TextEncoder(default_encoder_dir()).encode
        pairs = intent_pairs(sessions, predictions)
        scores |= intent_scores(pairs, encode)
        if any(it.categories for s in sessions for it in s.items):
            from ..categories import category_name

            named = intent_pairs(sessions, predictions, namer=category_name)
            scores |= {f"category_rule_{k}": v for k, v in intent_scores(named, encode).items() if k != "intent_pairs"}
    if judge:
        from ..files import cache_dir
        from ..judge import judge_intents
        from ..knowledge.teachers import TeacherConfig, make_teacher

        config = TeacherConfig(model=judge_model, api_key_env=judge_key_env,
                               cache_dir=judge_cache or cache_dir() / "judge-cache")  # fmt: skip
        scores |= judge_intents(pairs, make_teacher(judge, config))
    if scores["missing_predictions"]:
        n, total = scores["missing_predictions"], scores["sessions"]
        click.echo(
            f"warning: {n} of {total} gold sessions have no prediction in {', '.join(map(str, files))} and score 0"
            + ("" if split else " (score one split with --split)"),
            err=True,
        )
    scores["gold"], scores["split"] = str(gold), split
    scores["pred"] = str(files[0]) if len(files) == 1 else [str(f) for f in files]
    if out:
        write_json(out, scores)
    click.echo(json.dumps(scores, indent=2) if as_json else quality_table(scores))


def prediction_paths(patterns: tuple[str, ...]) -> list[Path]:
    """Each --pred as a file, or the files its glob matches (sorted); a pattern matching nothing is an error."""
    files: list[Path] = []
    for pattern in patterns:
        matched = [pattern] if Path(pattern).exists() or not glob.has_magic(pattern) else sorted(glob.glob(pattern))
        if not matched:
            raise BkdError(f"--pred {pattern!r}: no file matches")
        files.extend(Path(m) for m in matched if not m.endswith((".run.json", ".lock")))
    return list(dict.fromkeys(files))
