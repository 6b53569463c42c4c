"""`bkd-edge export RUN_DIR`: one deployable folder from a training run.

Built in a temporary sibling folder and renamed into place at the very end, so an interrupted or
failed export never leaves a folder that looks complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path

from .. import BkdError, __version__
from ..files import atomic_write, sha256_file, write_json
from ..prompts import system_text
from .folder import ADAPTER_FILE, DEFAULT_QUANT, EXPORT_FORMAT, MANIFEST
from .lora_gguf import write_lora_gguf
from .parity import Gate
from .quantize import DEFAULT_QUANTS, check_quants, describe_gguf, quantize


def read_run(run_dir: Path) -> tuple[dict, dict]:
    """run.json and recipe.json of a finished run with an adapter, or a clear error."""
    if not run_dir.is_dir():
        raise BkdError(f"{run_dir}: no such run folder")
    adapter = run_dir / "adapter"
    if not (adapter / "adapter_config.json").is_file():
        raise BkdError(
            f"{run_dir}: no adapter (adapter/adapter_config.json missing): the run did not finish; "
            "continue it with `bkd-edge train RECIPE --out RUN --resume`"
        )
    try:
        run = json.loads((run_dir / "run.json").read_text())
        recipe = json.loads((run_dir / "recipe.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise BkdError(f"{run_dir}: run.json / recipe.json unreadable ({e})") from None
    return run, recipe


def _run_data(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / "data.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def load_merged(base, adapter_dir: Path, golden):
    """The base with the LoRA merged in, and the adapted model's teacher-forced top-1 (merge parity)."""
    import torch
    from peft import PeftModel

    from ..train.model import load_base_model
    from .parity import hf_top1

    model = load_base_model(base, torch.float32, "cpu")
    model = PeftModel.from_pretrained(model, str(adapter_dir))
    adapted_top1 = hf_top1(model, golden)
    return model.merge_and_unload(), adapted_top1


def model_card(manifest: dict) -> str:
    rows = "\n".join(
        f"| {q} | `{m['file']}` | {m['bytes'] / 2**20:.1f} MiB | {m['bits_per_weight']:.2f} | {m['fallbacks']} |"
        for q, m in manifest["models"].items()
    )
    parity = "\n".join(
        f"| {r['stage']} | {r['top1_agreement']:.3f} | {r.get('identical_bundles', float('nan')):.3f} | "
        f"{'pass' if r['passed'] else 'FAIL'} |"
        for r in manifest["parity"]["stages"]
    )
    run = manifest["run"]
    f1 = run.get("best_val_strict_f1")
    return f"""# {manifest["name"]}: a bundle-generation student

LoRA-fine-tuned from `{Path(manifest["base"]["path"]).name}` (mode `{manifest["recipe"]["mode"]}`,
{run.get("steps")} steps, best val strict F1 {f1 if f1 is None else round(f1, 3)} at step {run.get("best_step")}),
merged and quantised by bundlekd-edge {manifest["bkd_edge_version"]}.

Given a shopping session (items numbered 1..N), it answers
`{{"bundles": [{{"items": [1, 3], "intent": "..."}}]}}`.

```
bkd-edge generate --model {manifest["name"]} --sessions S.jsonl --out pred.jsonl       # {manifest["default_quant"]}
bkd-edge generate --model {manifest["name"]}:Q8_0 --sessions S.jsonl --out pred.jsonl  # another quant
```

`adapter.gguf` is the same student as a LoRA adapter over the base GGUF it was trained on
({manifest["adapter"]["gguf"]["bytes"] / 2**20:.1f} MiB, rank {manifest["adapter"]["gguf"]["rank"]}):
`bkd-edge generate --model base --adapter adapter.gguf ...`, or `ollama create -f Modelfile.adapter`.
`bkd-edge export RUN --out EXPORT --promote NAME` installs it as a shipped student (models/NAME).

`manifest.json` holds the sha256 of every file; the runtime refuses a changed file.

| quant | file | size | bits/weight | k-quant fallbacks |
|---|---|---|---|---|
{rows}

Parity against the merged HF model on {manifest["parity"]["golden_sessions"]} golden val sessions
(top-1 token agreement teacher-forced over the golden answers; identical parsed bundles under
greedy decoding):

| stage | top-1 agreement | identical bundles | gate |
|---|---|---|---|
{parity}
"""


def modelfile(source: str, chat_template: str, system: str, adapter: str | None = None) -> str | None:
    """An Ollama Modelfile for ChatML models (SmolLM2); None for other templates. With `adapter`,
    FROM is the base GGUF and ADAPTER the LoRA file (Ollama applies it as llama.cpp does)."""
    if "<|im_start|>" not in chat_template:
        return None
    return f'''FROM {source}
{f"ADAPTER ./{adapter}" + chr(10) if adapter else ""}TEMPLATE """{{{{ if .System }}}}<|im_start|>system
{{{{ .System }}}}<|im_end|>
{{{{ end }}}}<|im_start|>user
{{{{ .Prompt }}}}<|im_end|>
<|im_start|>assistant
"""
SYSTEM """{system}"""
PARAMETER stop "<|im_end|>"
PARAMETER temperature 0
'''


def remove_stale_temps(out: Path) -> None:
    """Temp folders of exports that were killed (SIGKILL, power loss) before they could clean up."""
    for tmp in out.parent.glob(f".{out.name}.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(tmp, ignore_errors=True)


def export_run(
    run_dir: str | Path,
    out: str | Path,
    quants=DEFAULT_QUANTS,
    golden: int = 8,
    gate: Gate = Gate(),
    gen_max_tokens: int = 0,
    keep_f16: bool = False,
    ollama: bool = True,
    threads: int = 0,
    log=print,
) -> dict:
    """Merge, write GGUF f16, quantise, check parity, package; returns the manifest."""
    run_dir, out = Path(run_dir), Path(out)
    quants = check_quants(quants)
    run, recipe_dict = read_run(run_dir)
    if out.exists():
        raise BkdError(f"{out}: already exists; choose another --out (an export is never overwritten in place)")
    from ..data import load_sessions
    from ..train.model import resolve_base, tokenizer_for
    from ..train.recipe import recipe_from_dict
    from ..train.sft import PromptMaker
    from . import parity
    from .gguf_write import check_base, write_gguf_f16

    recipe = recipe_from_dict(recipe_dict, str(run_dir / "recipe.json"))
    base = resolve_base(run["base"]["path"])
    if base.kind != "gguf":
        raise BkdError(f"{base.path}: export needs a GGUF base (its tokenizer and metadata are copied); "
                       "this run was trained from an HF folder")  # fmt: skip
    if run["base"].get("sha256") and sha256_file(base.path) != run["base"]["sha256"]:
        raise BkdError(f"{base.path}: the base model changed since training (sha256 differs from run.json)")
    reader = check_base(base.path)
    chat_template = (
        str(reader.fields["tokenizer.chat_template"].contents()) if "tokenizer.chat_template" in reader.fields else ""
    )
    del reader

    # golden sessions: the val split (the run never trained on it), else test
    sessions = load_sessions(recipe.sessions, split="val", empty_split_ok=True) or load_sessions(
        recipe.sessions, split="test"
    )
    if not sessions:
        raise BkdError(f"{recipe.sessions}: no val or test sessions for the parity check")
    tok = tokenizer_for(base)
    pack = None
    if recipe.mode == "knowledge":
        from ..packs import Pack

        pack = Pack(recipe.pack)
    maker = PromptMaker(recipe.mode, recipe.prompt_config(), pack=pack)
    gold = parity.golden_set(sessions, tok, maker, golden, gen_max_tokens)

    remove_stale_temps(out)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    t0 = time.perf_counter()
    try:
        tmp.mkdir(parents=True)
        log(f"merging {run_dir / 'adapter'} into {base.path.name}")
        merged, adapted_top1 = load_merged(base, run_dir / "adapter", gold)
        ref_top1 = parity.hf_top1(merged, gold)
        stages = [parity.compare("merge", gold, adapted_top1, None, ref_top1, None, gate)]
        parity.check(stages)
        log(f"merged ({time.perf_counter() - t0:.0f} s)")
        t = time.perf_counter()
        ref_texts = parity.hf_generate(merged, tok, gold)
        log(f"reference generation with the merged HF model ({time.perf_counter() - t:.0f} s)")

        f16 = tmp / "model-F16.gguf"
        t = time.perf_counter()
        write_gguf_f16(base.path, merged.state_dict(), f16)
        timings = {"write_f16_s": round(time.perf_counter() - t, 2)}
        del merged
        log(f"wrote {f16.name} ({f16.stat().st_size / 2**20:.0f} MiB)")

        models = {}
        if keep_f16 or "F16" in quants:
            models["F16"] = {"file": f16.name, **describe_gguf(f16)}
        for q in quants:
            if q == "F16":
                continue
            path = tmp / f"model-{q}.gguf"
            seconds = quantize(f16, path, q, threads)
            models[q] = {"file": path.name, "quantize_s": round(seconds, 2), **describe_gguf(path, q)}
            m = models[q]
            log(f"quantised {path.name}: {m['bytes'] / 2**20:.1f} MiB, {m['bits_per_weight']:.2f} bits/weight, "
                f"{m['fallbacks']} k-quant fallbacks")  # fmt: skip

        t = time.perf_counter()
        for stage, path in [("F16", f16)] + [(q, tmp / models[q]["file"]) for q in models if q != "F16"]:
            top1, texts = parity.gguf_top1_and_generate(path, gold, threads)
            stages.append(parity.compare(stage, gold, ref_top1, ref_texts, top1, texts, gate))
            r = stages[-1]
            log(
                f"parity {stage}: top-1 {r['top1_agreement']:.3f}, identical bundles {r['identical_bundles']:.3f} "
                f"({time.perf_counter() - t:.0f} s)"
            )
        # The adapter alone, over the very base file it was trained on: what a shipped student runs.
        t = time.perf_counter()
        adapter_info = write_lora_gguf(base.path, run_dir / "adapter", tmp / ADAPTER_FILE)
        top1, texts = parity.gguf_top1_and_generate(base.path, gold, threads, adapter=tmp / ADAPTER_FILE)
        stages.append(parity.compare("adapter", gold, ref_top1, ref_texts, top1, texts, gate))
        r = stages[-1]
        log(
            f"wrote {ADAPTER_FILE} ({adapter_info['bytes'] / 2**20:.1f} MiB, rank {adapter_info['rank']}); parity "
            f"base+adapter: top-1 {r['top1_agreement']:.3f}, identical bundles {r['identical_bundles']:.3f} "
            f"({time.perf_counter() - t:.0f} s)"
        )
        timings["parity_s"] = round(time.perf_counter() - t, 2)
        parity.check(stages)
        if not (keep_f16 or "F16" in quants):
            f16.unlink()

        default = DEFAULT_QUANT if DEFAULT_QUANT in models else next(iter(models))
        if pack is not None:
            shutil.copytree(pack.folder, tmp / "pack", ignore=shutil.ignore_patterns("state"))
        adapter_files = sorted(p for p in (run_dir / "adapter").iterdir() if p.is_file())
        manifest = {
            "format": EXPORT_FORMAT,
            "name": out.name,
            "bkd_edge_version": __version__,
            "created_unix": int(time.time()),
            "base": {"path": str(base.path), "sha256": run["base"].get("sha256"), "arch": "llama"},
            "adapter": {
                "run_dir": str(run_dir.resolve()),
                "files": {p.name: sha256_file(p) for p in adapter_files},
                "gguf": adapter_info,
            },
            "prompt": asdict(recipe.prompt_config()),
            "recipe": recipe.to_dict(),
            "run": {k: run.get(k) for k in ("steps", "best_step", "best_val_strict_f1", "train_s", "tokens_per_s")},
            "data": _run_data(run_dir),
            "default_quant": default,
            "models": models,
            "pack": "pack" if pack is not None else None,
            "parity": {"golden_sessions": len(gold), "gate": asdict(gate), "stages": stages},
            "timings": timings,
        }
        with atomic_write(tmp / "README.md") as f:
            f.write(model_card(manifest))
        system = system_text(recipe.prompt_config())
        for name, source in (("Modelfile", f"./{models[default]['file']}"), ("Modelfile.adapter", str(base.path))):
            text = modelfile(source, chat_template, system, ADAPTER_FILE if name.endswith("adapter") else None)
            if ollama and text:
                with atomic_write(tmp / name) as f:
                    f.write(text)
        manifest["files"] = {str(p.relative_to(tmp)): sha256_file(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        manifest["timings"]["total_s"] = round(time.perf_counter() - t0, 2)
        write_json(tmp / MANIFEST, manifest)
        tmp.rename(out)
        return manifest
    except OSError as e:
        raise BkdError(f"export to {out} failed while writing ({e}); nothing was left behind") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(tmp)
