"""A student's adapter merged into its base once per machine: the form `--model default` runs.

llama.cpp applies a LoRA adapter as extra matrix products in every layer, so the shipped form (base
Q4_1 + adapter) prefills at ~230 tok/s where the same student merged runs 2.4x faster at the same
quality (bundlekd_edge/students/smollm2-bundles/README.md). The first run of a student with an adapter (or
`make setup`) therefore makes the merged form, with the export's own code:

    merge     the base dequantised plus scale * alpha/r * B @ A (`gguf_write.merged_tensors`, numpy), f16 GGUF
    quantise  to each `export --quant auto` candidate (`recipe.AUTO_QUANTS`) with llama.cpp
    time      each candidate on a few sample sessions through the engine (what `quant-pick` measures on val)
    parity    the fastest first, against the adapter over its base (`parity`, the export's gate at
              Q8_0's thresholds); the first that passes is kept. When none passes, the base +
              adapter form runs, with a note.

Cached under ~/.cache/bundlekd-edge/merged/ ($BKD_CACHE), one folder per key: the base's sha256,
each adapter's sha256 and scale, the candidates and the llama.cpp build. The folder is built aside
and renamed into place under a lock (concurrent first runs wait for one build), and its manifest's
sha256 of every file is checked before each use: a changed file is rebuilt, never run.
No torch: numpy, gguf-py and llama.cpp, the runtime's own dependencies.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from ..artifacts import building, verify_folder, write_manifest
from ..files import cache_dir, sha256_file
from .parity import Gate
from .recipe import AUTO_QUANTS

MERGED_FORMAT = "bkd-merged/1"
GOLDEN = 4  # sample sessions in the parity check (the export checks 8 val sessions; a first run waits)
TIMED = 2  # sample sessions each candidate is timed on: the first warms up, the second is timed
# The export's gate, every quant held to Q8_0's thresholds: the default must answer as the adapter
# does (merged at Q4_1 the shipped student lost 0.054 test strict F1, at Q4_K_M 0.02; at Q8_0 none).
GATE = Gate(quant_top1=Gate.q8_top1, quant_bundles=Gate.q8_bundles)


def cache_root() -> Path:
    return cache_dir() / "merged"


def merge_key(student, quants) -> dict:
    """Everything the merged file depends on. A card's sha256 were checked when the student was read."""
    from ..runtime.llamacpp import build_info

    card_adapters = student.card.get("adapters") or [{}] * len(student.adapters)
    return {
        "format": MERGED_FORMAT,
        "base_sha256": student.card.get("base", {}).get("sha256") or sha256_file(student.model),
        "adapters": [
            [a.get("sha256") or sha256_file(spec.path), float(spec.scale)]
            for a, spec in zip(card_adapters, student.adapters)
        ],
        "quants": list(quants),
        "gate": asdict(GATE),
        "llama_cpp": build_info(),
    }


def merged_model(student, quants=AUTO_QUANTS, root: str | Path | None = None, golden: int = GOLDEN,
                 log=None, check_base=None) -> dict:  # fmt: skip
    """The student's merged form on this machine: the cached record ({"file", "quant", ...} with
    `path`, or {"refused": reason}), made now when there is none or its files changed
    (`check_base` is called first: it raises when the base is not the card's)."""
    log = log or (lambda text: print(text, file=sys.stderr))
    if len(student.adapters) != 1:
        return {"refused": f"{len(student.adapters)} adapters (merging takes one)"}
    folder, key = cache_folder(student, quants, root)
    record, problem = _cached(folder)
    if record is None:
        with _lock(folder):
            record, problem = _cached(folder)  # another process may have made it while this one waited
            if record is None:
                if problem:
                    log(f"{folder}: {problem}; merging again")
                if check_base:
                    check_base()
                record = _make(student, key, folder, quants, golden, log)
    if "file" in record:
        record["path"] = str(folder / record["file"])
    return record


def cache_folder(student, quants=AUTO_QUANTS, root: str | Path | None = None) -> tuple[Path, dict]:
    """(the cache folder of this student's merged form, its key)."""
    key = merge_key(student, quants)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(root or cache_root()) / f"{student.name}-{digest}", key


def _cached(folder: Path) -> tuple[dict | None, str]:
    """(the folder's record, '') when it is complete and every file matches its sha256, else (None, why)."""
    if not folder.exists():
        return None, ""
    problems = verify_folder(folder, MERGED_FORMAT, "merged model")
    if problems:
        return None, problems[0]
    return json.loads((folder / "manifest.json").read_text(encoding="utf-8")), ""


@contextlib.contextmanager
def _lock(folder: Path):
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.with_name(folder.name + ".lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _make(student, key: dict, folder: Path, quants, golden: int, log) -> dict:
    from tqdm import tqdm

    from .gguf_write import merged_tensors, write_gguf_f16
    from .quantize import quantize

    t0 = time.perf_counter()
    quants = list(quants)
    adapter = student.adapters[0]
    log(f"merging {student.name}'s adapter into its base for this machine (once; cached in {folder.parent})")
    steps = 3 + 2 * len(quants) - ("F16" in quants)  # merge, quantise, reference, time, parity (one at least)
    bar = tqdm(total=steps, desc="merge", unit="step", file=sys.stderr, dynamic_ncols=True)
    try:
        with building(folder, replace=True) as tmp:
            f16 = tmp / "model-F16.gguf"
            write_gguf_f16(student.model, merged_tensors(student.model, adapter.path, adapter.scale), f16)
            bar.update()
            files = {}
            for q in quants:
                files[q] = f16 if q == "F16" else tmp / f"model-{q}.gguf"
                if q != "F16":
                    bar.set_postfix_str(f"quantise {q}")
                    quantize(f16, files[q], q)
                    bar.update()
            gold = golden_sessions(student, golden)
            bar.set_postfix_str("reference: base + adapter")
            ref = _answers(student.model, gold, adapter)
            bar.update()
            speed = {}
            for q in quants:
                bar.set_postfix_str(f"time {q}")
                speed[q] = _time_engine(files[q], student) if len(quants) > 1 else 0.0
                bar.update()
            record = _pick(quants, files, speed, gold, ref, bar)
            for q, path in files.items():
                if q != record.get("quant"):
                    path.unlink(missing_ok=True)
            record.update(key=key, student=student.name, timings={"total_s": round(time.perf_counter() - t0, 1)})
            record = write_manifest(tmp, MERGED_FORMAT, record)
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    if "quant" in record:
        log(f"merged {student.name} at {record['quant']} in {seconds:.0f} s -> {folder / record['file']}")
    return record


def _pick(quants, files, speed, gold, ref, bar) -> dict:
    """The fastest candidate that passes the export's parity gate against the adapter form."""
    from . import parity

    stages = []
    for q in sorted(quants, key=lambda q: speed[q]):
        bar.set_postfix_str(f"parity {q}")
        stages.append(stage := parity.compare(q, gold, ref, _answers(files[q], gold), GATE))
        bar.update()
        if stage["passed"]:
            return {"quant": q, "file": files[q].name, "parity": stages, "latency_p50_s": speed}
    return {"refused": f"no quant passed the parity gate ({', '.join(quants)})", "parity": stages,
            "latency_p50_s": speed}  # fmt: skip


def golden_sessions(student, n: int) -> list:
    """The parity check's sessions: the packaged sample (with its bundles), in the student's prompt."""
    from ..data import load_sessions, sample_sessions_path, spread
    from ..train.sft import PromptMaker, gguf_chat_tokenizer
    from . import parity

    sessions = spread([s for s in load_sessions(sample_sessions_path()) if len(s.items) >= 2], n)
    maker = PromptMaker("knowledge" if student.pack else "sft", student.prompt, pack=student.pack)
    return parity.golden_set(sessions, gguf_chat_tokenizer(student.model), maker, n)


def _answers(path, gold, adapter=None):
    from . import parity

    return parity.gguf_top1_and_generate(path, gold, adapter=adapter.path if adapter else None,
                                         scale=adapter.scale if adapter else 1.0)  # fmt: skip


def _time_engine(path: Path, student) -> float:
    """Per-session latency p50 of this file on the sample sessions, through the engine that will run it."""
    from ..data import load_sessions, sample_sessions_path, spread
    from ..runtime import Engine, EngineConfig
    from ..runtime.batch import session_inputs

    sessions = spread([s for s in load_sessions(sample_sessions_path()) if len(s.items) >= 2], TIMED)
    n_ctx = student.pack.n_ctx() if student.pack else EngineConfig.n_ctx
    engine = Engine(path, EngineConfig(n_ctx=n_ctx, prompt=student.prompt))
    try:
        times = [engine.generate(s, **session_inputs(engine, s, student.pack)).timing.total_s for s in sessions]
    finally:
        engine.llm.close()
    return float(np.median(times[1:]))
