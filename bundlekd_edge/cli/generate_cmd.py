"""`bkd-edge generate`: bundles for a sessions file (or one session on stdin), offline."""

from __future__ import annotations

import contextlib
import json
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path

import click

from .. import BkdError
from ..data import SPLITS, check_split, in_shard, load_sessions, parse_shard, session_from_dict
from ..files import OutputLock, RecordLog, WriteError, refuse_overwrite
from ..openai_client import EndpointError

MODEL_HELP = (
    "'default' (the shipped student: SmolLM2-135M-Instruct + its LoRA adapter and pack, bundlekd_edge/students/), "
    "'base' (the untuned SmolLM2), a shipped student's name or folder, an export folder[:QUANT], or a .gguf file."
)


def engine_options(f=None, *, servers: bool = False):
    """Options shared by every command that loads a model; `servers=True` (generate) also takes
    inference servers: --model URL (repeatable), --student, --constraint, --api-key-env."""
    if f is None:
        return lambda g: engine_options(g, servers=servers)
    if servers:
        f = click.option("--retries", default=4, show_default=True, type=click.IntRange(0, 20),
                         help="With --model URL: further attempts of a failed request (backoff 1, 2, 4 ... s); "
                         "a server still failing is dropped and the others take its sessions.")(f)  # fmt: skip
        f = click.option("--timeout", default=120.0, show_default=True, type=click.FloatRange(0.1, 86400),
                         help="With --model URL: seconds one request may take, answer included.")(f)  # fmt: skip
        f = click.option("--api-key-env", default="", metavar="NAME",
                         help="With --model URL: send the key held in this environment variable.")(f)  # fmt: skip
        f = click.option(
            "--constraint",
            default="gbnf",
            show_default=True,
            help="With --model URL: how the output grammar is sent: gbnf (llama.cpp's servers), vllm "
            "(structured_outputs), json-schema (Ollama, hosted APIs; JSON-answer students only).",
        )(f)
        f = click.option(
            "--student",
            "student_name",
            default="default",
            show_default=True,
            help="With --model URL: the student the servers run (its prompt format and pack; "
            "start the server with its base and adapter).",
        )(f)
    f = click.option("--seed", default=0, show_default=True, help="Sampling seed (decoding is greedy).")(f)
    f = click.option("--threads", default=0, show_default=True, help="CPU threads; 0 = all available.")(f)
    f = click.option("--n-ctx", default=0, show_default=True,
                     help="Context window in tokens; 0 = 2048, or what a prompt pack needs.")(f)  # fmt: skip
    f = click.option(
        "--adapter",
        "adapters",
        multiple=True,
        metavar="PATH[:SCALE]",
        help="A LoRA adapter over the model, scale in (0, 4], default 1; repeatable: a llama.cpp GGUF adapter, or "
        "a peft folder (adapter_config.json + adapter_model.safetensors, from `train` or any peft trainer), "
        "converted once over the model and cached.",
    )(f)
    f = click.option(
        "--pack",
        type=click.Path(path_type=Path),
        help="Prompt pack: knowledge, nearest examples and hints. A student trained with a pack uses it "
        "by default; 'none' runs without.",
    )(f)
    if servers:
        help = MODEL_HELP + " Or an OpenAI-compatible server, http(s)://HOST:PORT/v1[,concurrency=N], repeatable."
        f = click.option("--model", multiple=True, default=["default"], show_default=True, help=help)(f)
    else:
        f = click.option("--model", default="default", show_default=True, help=MODEL_HELP)(f)
    return f


def gpu_layers_option(f):
    """--gpu-layers N|all: the model's layers llama.cpp puts on a GPU (generate, demo, bench, serve)."""

    def parse(ctx, param, value):
        from ..student import parse_gpu_layers  # not at import: `bkd-edge --help` loads no student code

        try:
            return None if value is None else parse_gpu_layers(value)
        except BkdError as e:
            raise click.BadParameter(str(e).split(": ", 1)[1]) from None

    return click.option("--gpu-layers", metavar="N|all", callback=parse,
                        help="Layers to offload to a GPU (llama.cpp built with GPU=vulkan|cuda|metal; "
                        "a CPU build keeps them on the CPU); default: the student card's, else 0.")(f)  # fmt: skip


def load_student(model, adapters=(), pack=None):
    from ..student import resolve_student  # reads cards and manifests only: no torch

    return resolve_student(model, adapters, pack)


def load_engine(
    models, student_name, adapters, pack, n_ctx, threads, seed, constraint, api_key_env, retries, jump_forward=False,
    timeout=120.0, sessions=(), gpu_layers=None,
):  # fmt: skip
    """(student, engine): in this process (`sessions`' pack hints made before the model loads), or on
    the servers --model names."""
    urls = [m for m in models if m.startswith(("http://", "https://"))]
    if not urls:
        if len(models) > 1:
            raise click.UsageError("--model is repeatable for server URLs only")
        from ..student import Student

        student = Student.load(models[0], adapters, pack, n_ctx, threads, seed, jump_forward, sessions, gpu_layers)
        return student, student.engine
    if len(urls) != len(models):
        raise click.UsageError("--model: give one model, or one or more server URLs")
    if adapters:
        raise click.UsageError("--adapter: a server applies its own adapters (e.g. llama_cpp.server --lora_path FILE)")
    if jump_forward:
        raise click.UsageError("--jump-forward: a server decodes on its own; the option is for a local model")
    if gpu_layers is not None:
        raise click.UsageError("--gpu-layers: a server offloads its own layers (e.g. llama_cpp.server --n_gpu_layers)")
    student = load_student(student_name, (), pack)
    student.engine = student.load_remote(urls, constraint, api_key_env, seed, retries, timeout)
    return student, student.engine


@click.command()
@engine_options(servers=True)
@gpu_layers_option
@click.option("--sessions", type=click.Path(dir_okay=False, path_type=Path), help="Sessions JSONL.")
@click.option("--split", type=str, help=f"Only this split ({', '.join(SPLITS)}).")
@click.option("--limit", type=click.IntRange(min=0), help="Only the first N sessions.")
@click.option(
    "--shard",
    metavar="K/N",
    help="Only shard K of N (0 <= K < N), chosen by a hash of the session id: N processes or machines "
    "each run one shard, and `eval --pred 'OUT-*.jsonl'` scores the union.",
)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="Predictions JSONL to write.")
@click.option("--resume", is_flag=True, help="Continue an interrupted run into --out: generate only what is missing.")
@click.option("--force", is_flag=True, help="Overwrite an existing --out.")
@click.option("--summary", type=click.Path(dir_okay=False, path_type=Path), help="Also write the run summary as JSON.")
@click.option("--json", "json_mode", is_flag=True, help="Read one session as JSON on stdin, write its bundles as JSON.")
@click.option(
    "--jump-forward",
    is_flag=True,
    help="Evaluate the text the grammar forces (JSON keys, brackets) in batches: JSON answers decode ~1.5x "
    "faster. Greedy's tokens, but batched CPU kernels round differently, so a few answers may differ "
    "from plain greedy (and from a llama.cpp server).",
)
@click.option("--quiet", is_flag=True, help="No progress bar.")
def generate(
    model, pack, adapters, n_ctx, threads, seed, student_name, constraint, api_key_env, timeout, retries, sessions,
    split, limit, shard, out, resume, force, summary, json_mode, jump_forward, quiet, gpu_layers,
):  # fmt: skip
    """Generate bundles for each session with a llama.cpp model (greedy, grammar constrained).

    \b
    Predictions are written one JSON object a line, each as soon as it is made:
      {"session_id": ..., "bundles": [{"items": [item ids], "intent": ...}], "valid": ..., "timing": {...}}
    Score them with `bkd-edge eval --gold SESSIONS --pred OUT`. An interrupted run (Ctrl-C, kill,
    a laptop asleep) keeps what it finished: run the same command with --resume to complete it.

    \b
    For scripts: echo '{"session_id": "s1", "items": [{"id": "A", "title": "..."}, ...]}' \\
      | bkd-edge generate --json

    \b
    On inference servers (llama.cpp's, vLLM, Ollama, hosted), same prompts and output grammar:
      python -m llama_cpp.server --model BASE.gguf --lora_path STUDENT/adapter.gguf --port 8001
      bkd-edge generate --model http://127.0.0.1:8001/v1 --model http://host2:8001/v1,concurrency=2 ...
    """
    engine_args = (model, student_name, adapters, pack, n_ctx, threads, seed, constraint, api_key_env, retries,
                   jump_forward, timeout)  # fmt: skip
    if json_mode:
        session = _stdin_session()
        return _generate_stdin(load_engine(*engine_args, sessions=[session], gpu_layers=gpu_layers)[0], session)
    if sessions is None or out is None:
        raise click.UsageError("give --sessions FILE and --out FILE (or --json to read one session on stdin)")
    from ..runtime.batch import latency_summary, run_sessions

    check_split(split)
    shard = parse_shard(shard) if shard is not None else None
    refuse_overwrite(out, [sessions], force, exists_ok=True)  # an existing OUT: RecordLog (--resume or --force)
    refuse_overwrite(summary, [sessions, out], force=force or resume, option="--summary")
    click.get_current_context().with_resource(OutputLock(out))  # held until the command returns
    rows = load_sessions(sessions, split=split, require_bundles=False)[:limit]
    if shard:
        rows = [s for s in rows if in_shard(s.session_id, *shard)]
    student, engine = load_engine(*engine_args, sessions=rows, gpu_layers=gpu_layers)
    for output, option in ((out, "--out"), (summary, "--summary")):
        refuse_overwrite(output, model_files(student, engine), force=True, exists_ok=True, option=option)
    log = RecordLog(out, run_settings(engine, student, sessions, split, limit, shard), resume=resume, force=force)
    if log.done:
        click.echo(f"resuming {out}: {len(log.done)} of {len(rows)} sessions already done", err=True)
    # the hints computed at load (`Pack.prepare`) are part of the run's time, as they are of each latency
    ahead = student.pack.prepared_s if student.pack else {}
    t0 = time.perf_counter() - sum(v for k, v in ahead.items() if k not in log.done)
    try:
        with stop_on_signals():
            gens = run_sessions(engine, rows, log, pack=student.pack, progress=not quiet)
    except (KeyboardInterrupt, BkdError) as e:  # a signal, every server failing for good, a full disk
        log.close(complete=False)
        keeps = f"{out} keeps the sessions finished so far; run the same command with --resume to go on"
        if isinstance(e, BkdError):
            raise BkdError(f"{e}\n{keeps}" if isinstance(e, (EndpointError, WriteError)) else str(e)) from None
        click.echo(f"\nstopped: {keeps}", err=True)
        sys.exit(130)
    log.close(complete=True)
    result = latency_summary(gens, engine, wall_s=time.perf_counter() - t0)
    click.echo(
        f"{result['sessions']} sessions generated now ({len(log.done)} from before) -> {out}: "
        f"{result['valid_rate']:.1%} valid, "
        f"latency p50 {result['latency_p50_s']:.2f} s / p95 {result['latency_p95_s']:.2f} s, "
        f"{result['sessions_per_min']:.1f} sessions/min"
        + (
            f", decode {result['decode_tps']:.0f} tok/s, peak RSS {result['peak_rss'] / 2**20:.0f} MiB"
            if "model_file_bytes" in result  # a model in this process (a server's decode and memory are its own)
            else ""
        )  # fmt: skip
    )
    if summary:
        from ..files import write_json

        record = {
            "run": engine.describe(),
            "sessions_file": str(sessions),
            "split": split,
            "student": student.describe(),
        }
        write_json(summary, {**record, **result})


def model_files(student, engine) -> list:
    """The files a loaded student reads, which no output may replace: model, adapters, pack."""
    adapters = [a.path for a in student.adapters]
    return [getattr(engine, "model_path", None), *adapters, student.pack.folder if student.pack else None]


def run_settings(engine, student, sessions: Path, split, limit, shard=None) -> dict:
    """What must not change between an interrupted run and its --resume."""
    from ..files import sha256_file

    return {
        **engine.identity(),
        "form": student.form,  # which form of the student ran: 'merged Q8_0', 'base + adapter', ...
        **(engine.offload() if hasattr(engine, "offload") else {}),  # layers on a GPU, and which (local models)
        "pack_manifest_sha256": sha256_file(student.pack.folder / "manifest.json") if student.pack else None,
        "prompt": asdict(engine.config.prompt),
        "seed": engine.config.seed,
        "sessions_sha256": sha256_file(sessions),
        "split": split,
        "limit": limit,
        "shard": list(shard) if shard else None,
    }


@contextlib.contextmanager
def stop_on_signals():
    """SIGTERM (a `kill`, a scheduler) and SIGINT stop cleanly, keeping the finished records. SIGINT
    is set too: a process started in the background by a shell inherits it ignored."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _stdin_session():
    try:
        text = sys.stdin.buffer.read().decode("utf-8")
    except UnicodeDecodeError as e:
        raise BkdError(f"<stdin>: not UTF-8 text (byte {e.start + 1})") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise BkdError(f"<stdin>: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except (ValueError, RecursionError) as e:  # a number past Python's 4,300 digits, nesting past its stack
        raise BkdError(f"<stdin>: not usable JSON ({str(e).split(':')[0] or type(e).__name__})") from None
    if isinstance(obj, dict) and "session_id" not in obj:
        obj = {"session_id": "stdin", **obj}
    return session_from_dict(obj, "<stdin>", require_bundles=False)


def _generate_stdin(student, session):
    record = student.generate(session)
    record.pop("raw")
    click.echo(json.dumps(record, ensure_ascii=False))
