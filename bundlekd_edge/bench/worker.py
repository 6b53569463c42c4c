"""One bench row, measured in a process of its own so no engine can distort another's numbers.

    python -m bundlekd_edge.bench.worker SPEC.json ROW.json

SPEC.json holds {"spec": EngineSpec, "options": BenchOptions}. The row (quality, latency, memory,
batch throughput) is written atomically to ROW.json, the predictions beside it as ROW.pred.jsonl.
Any failure exits non-zero with the reason on stderr; the runner puts it in the row.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from .. import BkdError, __version__
from ..data import Session, load_sessions
from ..files import atomic_write, sha256_file, write_json
from ..metrics import evaluate, load_predictions
from ..openai_client import redact_url
from ..runtime.memory import memory_snapshot
from .engines import WORKER_MODEL, BenchOptions, EngineSpec


def _pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def _timed(totals: list[float], **extra) -> dict:
    """Latency of rows timed per session from outside (HTTP requests, baselines)."""
    return {
        "sessions": len(totals),
        "latency_p50_s": _pct(totals, 50),
        "latency_p95_s": _pct(totals, 95),
        "sessions_per_min": 60 * len(totals) / sum(totals) if sum(totals) else None,
        **extra,
    }


def _score(sessions: list[Session], records: list[dict], path: Path) -> dict:
    """Write the predictions (one record a session, as `generate` writes them) and score them as `eval` does."""
    with atomic_write(path) as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return evaluate(sessions, load_predictions(path))


def kv_cache_bytes(metadata: dict, n_ctx: int) -> int | None:
    """Bytes of an f16 K and V cache (llama.cpp's default type) for every layer at n_ctx tokens.

    An upper bound for models with sliding-window layers (llama.cpp keeps less for those)."""
    arch = metadata.get("general.architecture")
    try:
        n_layer = int(metadata[f"{arch}.block_count"])
        n_head = int(metadata[f"{arch}.attention.head_count"])
        n_kv = int(metadata.get(f"{arch}.attention.head_count_kv", n_head))
        embd = int(metadata[f"{arch}.embedding_length"])
    except (KeyError, ValueError):
        return None
    k = int(metadata.get(f"{arch}.attention.key_length", embd // n_head))
    v = int(metadata.get(f"{arch}.attention.value_length", embd // n_head))
    return n_ctx * n_layer * n_kv * (k + v) * 2


# ---------------------------------------------------------------- LLM through llama.cpp


def llama_row(spec: EngineSpec, opt: BenchOptions, sessions: list[Session], pred_path: Path) -> dict:
    from ..runtime.batch import latency_summary, run_sessions, session_inputs
    from ..student import Student

    t0 = time.perf_counter()
    student = Student.load(spec.model, spec.adapters, spec.pack or None, opt.n_ctx, opt.threads, opt.seed,
                           spec.jump_forward, gpu_layers=opt.gpu_layers)  # fmt: skip
    engine = student.engine
    pack = student.pack
    load_s = time.perf_counter() - t0

    def parts(s: Session) -> dict:
        return session_inputs(engine, s, pack)

    # Warm-up: page in the weights and build the grammar caches on sessions we do not score.
    warm = (
        load_sessions(opt.sessions, split="val", require_bundles=False, empty_split_ok=True)[: opt.warmup]
        if opt.warmup
        else []
    )
    for s in warm or sessions[: opt.warmup]:
        engine.generate(s, **parts(s))

    # Uncached prefix: the KV cache emptied before each session, so the whole prompt is evaluated.
    cold = []
    for s in sessions[: opt.cold]:
        engine.forget()  # the whole prompt is evaluated again
        cold.append(engine.generate(s, **parts(s)).timing)

    # The scored run: the static prefix evaluated (or loaded from the pack's state) once, then reused.
    t_run = time.perf_counter()
    gens = run_sessions(engine, sessions, pack=pack, progress=sys.stderr.isatty())
    run_s = time.perf_counter() - t_run
    latency = latency_summary(gens, engine)
    memory = {k: latency.pop(k) for k in list(latency) if k in ("peak_rss", "rss", "rss_anon", "rss_file")}
    memory["model_file_bytes"] = latency.pop("model_file_bytes")
    memory["kv_cache_bytes"] = kv_cache_bytes(engine.llm.metadata, opt.n_ctx)
    latency.update(
        ttft_cached_p50_s=latency.pop("ttft_p50_s"),
        ttft_cached_p95_s=latency.pop("ttft_p95_s"),
        ttft_uncached_p50_s=_pct([t.ttft_s for t in cold], 50),
        ttft_uncached_p95_s=_pct([t.ttft_s for t in cold], 95),
        uncached_prompt_tokens_mean=float(np.mean([t.prompt_tokens for t in cold])) if cold else None,
        run_s=run_s,
    )
    quality = _score(sessions, [g.to_record() for g in gens], pred_path)
    # Batch throughput last: its extra contexts must not count in the single-stream memory above.
    throughput = []
    if opt.throughput_sessions:
        from ..runtime.concurrent import generate_concurrent

        subset = sessions[: opt.throughput_sessions]
        chosen = {s.session_id: parts(s) for s in subset}
        for c in opt.concurrency:
            run = generate_concurrent(engine, subset, c, chosen)
            throughput.append({"concurrency": c, "sessions": len(subset), "sessions_per_min": run.sessions_per_min})
    return {
        "quality": quality,
        "latency": latency,
        "memory": memory,
        "throughput": throughput,
        "load_s": load_s,
        "model_sha256": engine.model_sha256(),
        "engine": engine.describe(),
        "student": student.describe(),
        "pack_sha256": sha256_file(pack.folder / "manifest.json") if pack else None,
    }


# ---------------------------------------------------------------- LLM behind an OpenAI-compatible URL


def http_row(spec: EngineSpec, opt: BenchOptions, sessions: list[Session], pred_path: Path) -> dict:
    """Quality and end-to-end latency through `generate`'s remote engine; the server's memory is not ours."""
    from ..openai_client import RetryPolicy
    from ..packs import Pack
    from ..prompts import PromptConfig
    from ..runtime.batch import latency_summary, run_sessions
    from ..runtime.remote import RemoteConfig, RemoteEngine, parse_server

    config = RemoteConfig(
        (parse_server(spec.model),), PromptConfig(), spec.constraint, spec.api_key_env, opt.seed, RetryPolicy(retries=2)
    )
    engine = RemoteEngine(config)
    pack = Pack(spec.pack) if spec.pack not in ("", "none") else None
    run_sessions(engine, sessions[: opt.warmup], pack=pack, progress=False)
    t_run = time.perf_counter()
    gens = run_sessions(engine, sessions, pack=pack, progress=sys.stderr.isatty())
    latency = latency_summary(gens, engine, wall_s=time.perf_counter() - t_run)
    for key in ("ttft_p50_s", "ttft_p95_s", "prefill_tps", "decode_tps", "peak_rss", "rss", "rss_anon", "rss_file"):
        latency.pop(key, None)
    return {
        "quality": _score(sessions, [g.to_record() for g in gens], pred_path),
        "latency": {**latency, "note": "over HTTP: wall clock per request, no streaming, so no TTFT or prefill/decode"},
        "memory": {"note": "the server's process is not measured"},
        "throughput": [],
        "engine": engine.describe(),
    }


# ---------------------------------------------------------------- non-LLM baselines


def baseline_row(spec: EngineSpec, opt: BenchOptions, sessions: list[Session], pred_path: Path) -> dict:
    from ..baselines import make_baseline

    baseline = make_baseline(spec.model)
    t0 = time.perf_counter()
    baseline.fit(load_sessions(opt.sessions, split="train"))
    fit_s = time.perf_counter() - t0
    records, totals = [], []
    for s in sessions:
        t0 = time.perf_counter()
        bundles = baseline.predict(s)
        totals.append(time.perf_counter() - t0)
        records.append({"session_id": s.session_id, "bundles": bundles, "valid": True})
    return {
        "quality": _score(sessions, records, pred_path),
        "latency": _timed(totals, fit_s=fit_s),
        "memory": {**memory_snapshot(), "model_file_bytes": baseline.model_bytes},
        "throughput": [],
        "engine": baseline.describe(),
    }


ROWS = {"llama": llama_row, "http": http_row, "baseline": baseline_row}


def run_row(spec: EngineSpec, opt: BenchOptions, row_path: Path) -> dict:
    sessions = load_sessions(opt.sessions, split=opt.split)[: opt.limit or None]
    if not sessions:
        raise BkdError(f"{opt.sessions}: no sessions in split {opt.split!r}")
    t0 = time.perf_counter()
    row = ROWS[spec.kind](spec, opt, sessions, row_path.with_suffix(".pred.jsonl"))
    return {
        **asdict(spec),
        "model": redact_url(spec.model),  # a URL row's credentials stay out of the report
        "status": "ok",
        **row,
        "wall_s": time.perf_counter() - t0,
        "python": platform.python_version(),
        "bkd_edge_version": __version__,
    }


def main(argv: list[str]) -> int:
    spec_path, row_path = Path(argv[0]), Path(argv[1])
    blob = json.loads(spec_path.read_text())
    spec, opt = EngineSpec(**blob["spec"]), BenchOptions(**blob["options"])
    if redact_url(os.environ.get(WORKER_MODEL, "")) == spec.model:  # the model with its credentials
        spec = replace(spec, model=os.environ[WORKER_MODEL])
    try:
        row = run_row(spec, opt, row_path)
    except BkdError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    write_json(row_path, {**row, "key": blob["key"]})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
