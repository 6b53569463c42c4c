"""The GPU check (scripts/gpu_check.sh runs it): LoRA and QLoRA on the shipped student's recipe for a
fixed number of steps, each in its own process (tokens/s, peak memory), each exported with parity,
then the shipped student through llama.cpp; one JSON. The same code on CPU (`--device cpu`, fewer
steps) and on a GPU: only the device changes.

    python scripts/gpu_check.py --device cpu --steps 2 --out OUT
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "train/cpu-smollm2-compact.toml"  # the shipped student's recipe
PACK = ROOT / "bundlekd_edge/students/smollm2-bundles/pack"  # its slim pack (the hint needs no pack build)


def peak_rss() -> int:
    """This process's peak resident memory since the last `reset_peak_rss` (Linux: VmHWM), bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> None:
    """Forget the peak so far (loading the base), so the peak is the training's."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def train_one(args) -> dict:
    """One mode's run (in its own process, so its peak memory is its own): train, then export."""
    import torch

    from bundlekd_edge.export.build import export_run
    from bundlekd_edge.export.parity import Gate
    from bundlekd_edge.export.recipe import ExportRecipe
    from bundlekd_edge.train.recipe import load_recipe
    from bundlekd_edge.train.trainer import Training, check_run_dir

    qlora = args.mode == "qlora"
    overrides = {
        "name": f"gpu-check-{args.mode}", "sessions": args.sessions, "pack": str(PACK), "qlora": qlora,
        "device": args.device, "precision": args.precision, "max_steps": args.steps, "max_minutes": 0.0,
        "eval_every": args.steps, "save_every": args.steps, "eval_sessions": args.eval_sessions,
        "limit_train": args.limit_train, "shuffled_copies": 0, "warmup_steps": min(10, args.steps // 2),
    }  # fmt: skip
    recipe = load_recipe(RECIPE, overrides)
    out = Path(args.out) / args.mode
    check_run_dir(out / "run", resume=False)
    t0 = time.perf_counter()
    run = Training(recipe, out / "run", progress=False)
    run.load_data()
    run.build_model()
    load_s = time.perf_counter() - t0
    # linear layers bitsandbytes holds in 4 bits (QLoRA), so a silent fallback to float shows
    layers_4bit = sum(type(m).__name__ == "Linear4bit" and type(m).__module__.startswith("bitsandbytes")
                      for m in run.model.modules())  # fmt: skip
    cuda = run.device == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    reset_peak_rss()
    run.start(None)
    run.loop()
    summary = run.finish()
    row = {
        "mode": args.mode,
        "device": run.device,
        "precision": summary["precision"],
        "steps": summary["steps"],
        "rows": summary["rows"],
        "tokens_per_s": summary["tokens_per_s"],
        "s_per_step": summary["s_per_step"],
        "val_strict_f1": summary["best_val_strict_f1"],
        "val_sessions": summary["val_sessions"],
        "load_s": round(load_s, 1),
        "peak_rss_mib": round(peak_rss() / 2**20),
        "peak_gpu_mib": round(torch.cuda.max_memory_allocated() / 2**20) if cuda else None,
        "trainable_params": summary["trainable_params"],
        "layers_4bit": layers_4bit,
    }
    del run  # the export needs no torch model
    t = time.perf_counter()
    gate = Gate(q8_bundles=0.0, quant_bundles=0.0) if args.steps < 20 else Gate()  # a few steps: top-1 only
    recipe = ExportRecipe(quants=["Q8_0"], golden=args.golden, gen_max_tokens=args.gen_max_tokens, gate=gate)
    manifest = export_run(out / "run", out / "export", recipe, log=lambda *a: None)
    row["export_s"] = round(time.perf_counter() - t, 1)
    row["parity"] = {r["stage"]: {"top1": r["top1_agreement"], "top1_all": r["top1_all"], "positions": r["positions"],
                                  "near_ties": r["near_ties"], "bundles": r["identical_bundles"], "passed": r["passed"]}
                     for r in manifest["parity"]["stages"]}  # fmt: skip
    return row


def student(args) -> dict:
    """The shipped student (default) through llama.cpp on `--student-sessions` sessions: CPU, then
    with every layer offloaded when this llama.cpp has a GPU backend."""
    from bundlekd_edge.runtime.llamacpp import build_info

    info = build_info()
    cli = [sys.executable, "-m", "bundlekd_edge.cli", "generate", "--model", "default", "--sessions", args.sessions,
           "--limit", str(args.student_sessions), "--quiet"]  # fmt: skip
    rows = {}
    for name, extra in (("cpu", []), ("gpu", ["--gpu-layers", "all"])):
        if name == "gpu" and not gpu_offload():
            rows[name] = {"skipped": "this llama.cpp build has no GPU backend"}
            continue
        out = Path(args.out) / f"student-{name}.jsonl"
        t = time.perf_counter()
        done = subprocess.run(cli + ["--out", str(out), "--summary", str(out.with_suffix(".run.json"))] + extra,
                              capture_output=True, text=True, cwd=ROOT)  # fmt: skip
        if done.returncode:
            rows[name] = {"error": done.stderr.strip().splitlines()[-1:] or [f"exit {done.returncode}"]}
            continue
        summary = json.loads(out.with_suffix(".run.json").read_text())
        preds = [json.loads(line) for line in out.read_text().splitlines()]
        rows[name] = {"wall_s": round(time.perf_counter() - t, 1), "sessions": len(preds),
                      "partitions": [p["bundles"] for p in preds],
                      "latency_p50_s": summary.get("latency_p50_s"), "peak_rss_mib": summary.get("peak_rss", 0) >> 20,
                      **{k: summary["run"].get(k) for k in ("gpu_layers", "device")}}  # fmt: skip
    if "partitions" in rows.get("gpu", {}) and "partitions" in rows["cpu"]:
        same = sum(a == b for a, b in zip(rows["cpu"]["partitions"], rows["gpu"]["partitions"]))
        rows["same_partitions"] = f"{same}/{len(rows['cpu']['partitions'])}"
    return {"llama_cpp": info, **rows}


def gpu_offload() -> bool:
    from llama_cpp import llama_cpp as lib

    return bool(lib.llama_supports_gpu_offload())


def machine(device: str) -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cpu_count": os.cpu_count()}
    try:
        import bitsandbytes

        info["bitsandbytes"] = bitsandbytes.__version__
    except ImportError:
        info["bitsandbytes"] = None
    if device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_memory_mib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**20)
    return info


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--steps", type=int, default=40, help="optimizer steps per mode (the same for both)")
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--sessions", default=str(ROOT / "bundlekd_edge/sample/sessions.jsonl"))
    p.add_argument("--modes", default="lora,qlora")
    p.add_argument("--limit-train", type=int, default=0, help="first N training sessions only (0: all)")
    p.add_argument("--eval-sessions", type=int, default=8)
    p.add_argument("--golden", type=int, default=2, help="parity sessions per export")
    p.add_argument("--gen-max-tokens", type=int, default=0)
    p.add_argument("--student-sessions", type=int, default=10, help="0: skip the shipped student")
    p.add_argument("--out", required=True, help="a folder; gpu_check.json is written in it")
    p.add_argument("--mode", help=argparse.SUPPRESS)  # internal: run one mode in this process
    args = p.parse_args()
    if args.mode:
        print(json.dumps(train_one(args)))
        return 0
    t0 = time.perf_counter()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    result = {"device": args.device, "steps": args.steps, "recipe": str(RECIPE.relative_to(ROOT)),
              "sessions": args.sessions, "machine": machine(args.device), "modes": {}}  # fmt: skip
    for mode in args.modes.split(","):
        done = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--mode", mode], capture_output=True,
                              text=True, cwd=ROOT)  # fmt: skip
        lines = done.stdout.strip().splitlines()
        if done.returncode or not lines:
            result["modes"][mode] = {"error": (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]}
        else:
            result["modes"][mode] = json.loads(lines[-1])
        print(f"{mode}: {json.dumps(result['modes'][mode])}", flush=True)
    if args.student_sessions:
        result["student"] = student(args)
        print(f"student: {json.dumps({k: v for k, v in result['student'].items() if k != 'llama_cpp'})}")
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    path = Path(args.out) / "gpu_check.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path} ({result['wall_s']} s)")
    ok = all("error" not in r and all(s["passed"] for s in r["parity"].values()) for r in result["modes"].values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
