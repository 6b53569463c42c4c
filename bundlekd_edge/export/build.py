"""`bkd-edge export RUN_DIR`: one deployable folder from a training run.

Named steps: read the source -> adapter GGUF -> reference answers (base + adapter in llama.cpp)
-> merge into an f16 GGUF -> quantise -> parity -> package. Built in a
temporary sibling folder and renamed into place at the very end (`artifacts.building`), so an
interrupted or failed export never leaves a folder that looks complete.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .. import BkdError, __version__
from ..artifacts import building, write_manifest
from ..files import atomic_write, sha256_file
from ..prompts import system_text
from ..train.run_folder import read_run
from .folder import ADAPTER_FILE, DEFAULT_QUANT, EXPORT_FORMAT
from .lora_gguf import write_lora_gguf
from .parity import Answers, Gate
from .quantize import describe_gguf, quantize
from .recipe import ExportRecipe


def _run_data(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / "data.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def model_card(manifest: dict) -> str:
    rows = "\n".join(
        f"| {q} | `{m['file']}` | {m['bytes'] / 2**20:.1f} MiB | {m['bits_per_weight']:.2f} | {m['fallbacks']} |"
        for q, m in manifest["models"].items()
    )
    parity = "\n".join(
        f"| {r['stage']} | {r['top1_agreement']:.3f} | {r.get('identical_bundles', float('nan')):.3f} | "
        f"{'pass' if r['passed'] else 'dropped' if r.get('dropped') else 'FAIL'} |"
        for r in manifest["parity"]["stages"]
    )
    run = manifest["run"]
    f1 = run.get("best_val_strict_f1")
    return _card_head(manifest, run, f1, rows, parity) + _card_quant_pick(manifest.get("quant_pick"))


def _card_quant_pick(pick: dict | None) -> str:
    if not pick:
        return ""
    rows = "\n".join(
        f"| {t['quant']}{' (chosen)' if t['quant'] == pick['choice'] else ''} | {t['latency_p50_s']:.3f} | "
        f"{t['decode_tps']:.1f} | {t['prefill_tps']:.1f} | {(t['peak_rss'] or 0) / 2**20:.0f} | "
        f"{t['val_strict_f1']:.3f} |"
        for t in pick["table"]
    )
    machine = pick["machine"]
    return f"""
Quant chosen on {machine["cpu"].get("model", "this machine")} ({machine["threads"]} threads), {pick["measured"]}:
{pick["rule"]}, over {pick["sessions"]} {pick["split"]} sessions (`bkd-edge quant-pick`).

| quant | p50 latency s | decode tok/s | prefill tok/s | peak RSS MiB | val strict F1 |
|---|---|---|---|---|---|
{rows}
"""


def _card_head(manifest: dict, run: dict, f1, rows: str, parity: str) -> str:
    return f"""# {manifest["name"]}: a bundle-generation student

LoRA-fine-tuned from `{Path(manifest["base"]["path"]).name}` ({manifest["base"]["arch"]},
mode `{manifest["recipe"]["mode"]}`,
{run.get("steps")} steps, best val strict F1 {f1 if f1 is None else round(f1, 3)} at step {run.get("best_step")}),
merged and quantised by bundlekd-edge {manifest["bkd_edge"]}.

Given a shopping session (items numbered 1..N), it answers
`{{"bundles": [{{"items": [1, 3], "intent": "..."}}]}}`.

```
bkd-edge generate --model {manifest["name"]} --sessions S.jsonl --out pred.jsonl       # {manifest["default_quant"]}
bkd-edge generate --model {manifest["name"]}:Q8_0 --sessions S.jsonl --out pred.jsonl  # another quant
```

`adapter.gguf` is the same student as a LoRA adapter over the base GGUF (or the GGUF llama.cpp converts from the base)
({manifest["adapter"]["gguf"]["bytes"] / 2**20:.1f} MiB, rank {manifest["adapter"]["gguf"]["rank"]}):
`bkd-edge generate --model base --adapter adapter.gguf ...`, or `ollama create -f Modelfile.adapter`.
`bkd-edge export RUN --out EXPORT --promote NAME` installs it as a shipped student (bundlekd_edge/students/NAME).

`manifest.json` holds the sha256 of every file; the runtime refuses a changed file.

| quant | file | size | bits/weight | k-quant fallbacks |
|---|---|---|---|---|
{rows}

Parity against the adapter over its base (llama.cpp, what `--adapter` runs) on
{manifest["parity"]["golden_sessions"]} golden val sessions (top-1 token agreement teacher-forced
over the golden answers, where the reference's best token leads by at least
{manifest["parity"]["gate"].get("tie_logits", 0)} logits; identical parsed bundles under greedy decoding):

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


@dataclass
class Source:
    """What an export is made from: a base (GGUF file or HF folder), a peft adapter folder, how the
    student is prompted, and the golden sessions; from a run folder (`read_source`) or given
    directly (`source_from`: an adapter from another trainer)."""

    base: object  # train.model.Base
    adapter_dir: Path
    prompt: object  # prompts.PromptConfig
    mode: str  # sft | knowledge | thoughts (how the prompt is built)
    pack: object  # packs.Pack | None
    sessions: Path  # the golden sessions come from its val (else test) split
    run_dir: Path | None = None
    run: dict | None = None
    recipe: object = None  # train.recipe.Recipe | None


def export_run(run_dir: str | Path, out: str | Path, recipe: ExportRecipe | None = None, threads: int = 0,
               log=print) -> dict:  # fmt: skip
    """`bkd-edge export RUN_DIR`: the run's adapter over the base it was trained on."""
    return export_source(read_source(Path(run_dir)), out, recipe, threads, log)


def export_adapter(base: str | Path, adapter: str | Path, out: str | Path, sessions: str | Path | None = None,
                   recipe: ExportRecipe | None = None, threads: int = 0, log=print) -> dict:  # fmt: skip
    """`bkd-edge export --base BASE --adapter ADAPTER`: a peft adapter (from any trainer) or a run folder
    over an HF model folder or a GGUF file."""
    return export_source(source_from(base, adapter, sessions), out, recipe, threads, log)


def export_source(src: Source, out: str | Path, recipe: ExportRecipe | None = None, threads: int = 0,
                  log=print) -> dict:  # fmt: skip
    """Adapter GGUF, reference answers, merged GGUF f16, quantise, check parity, package; returns the
    manifest. A GGUF base needs neither torch nor transformers (the merge is gguf-py's, the reference
    llama.cpp's); an HF base is merged shard by shard, converted by llama.cpp's own converter and
    judged against the merged model in torch."""
    out, recipe = Path(out), recipe or ExportRecipe()
    if out.exists():
        raise BkdError(f"{out}: already exists; choose another --out (an export is never overwritten in place)")
    t0 = time.perf_counter()
    timings: dict = {}
    try:
        with building(out) as tmp:
            f16 = tmp / "model-F16.gguf"
            if src.base.kind == "gguf":
                adapter, gold, ref, checks = _from_gguf_base(src, tmp, f16, recipe, threads, timings, log)
            else:
                adapter, gold, ref, checks = _from_hf_base(src, tmp, f16, recipe, timings, log)
            models = quantise(f16, recipe.quants, recipe.keep_f16, threads, log)
            t = time.perf_counter()
            stages = check_parity(gold, tmp, models, ref, recipe.gate, threads, log, recipe.drop_failing_quants)
            timings["parity_s"] = round(time.perf_counter() - t, 2)
            if "F16" not in models:
                f16.unlink()
            timings["total_s"] = round(time.perf_counter() - t0, 2)
            return package(src, tmp, out.name, models, adapter, stages, gold, checks, recipe, timings)
    except OSError as e:
        raise BkdError(f"export to {out} failed while writing ({e}); nothing was left behind") from None


def _from_gguf_base(src: Source, tmp: Path, f16: Path, recipe: ExportRecipe, threads: int, timings: dict, log):
    """The adapter GGUF over the base, its answers in llama.cpp (the reference: what `--adapter` and
    a shipped student run), then the merge into an f16 twin of the base."""
    from ..train.model import tokenizer_for
    from . import parity
    from .gguf_write import iter_merged, write_gguf_f16

    t = time.perf_counter()
    adapter = write_lora_gguf(src.base.path, src.adapter_dir, tmp / ADAPTER_FILE)
    log(f"wrote {ADAPTER_FILE} ({adapter['bytes'] / 2**20:.1f} MiB, rank {adapter['rank']}, {adapter['arch']})")
    gold = golden(src, tokenizer_for(src.base), recipe)
    timings["read_source_s"] = round(time.perf_counter() - t, 2)
    t = time.perf_counter()
    ref = parity.gguf_top1_and_generate(src.base.path, gold, threads, adapter=tmp / ADAPTER_FILE)
    log(f"reference answers: {src.base.path.name} + {ADAPTER_FILE} on {len(gold)} golden sessions")
    timings["reference_s"] = round(time.perf_counter() - t, 2)
    t = time.perf_counter()
    write_gguf_f16(src.base.path, iter_merged(src.base.path, tmp / ADAPTER_FILE), f16)
    log(f"merged into {f16.name} ({f16.stat().st_size / 2**20:.0f} MiB)")
    timings["merge_f16_s"] = round(time.perf_counter() - t, 2)
    return adapter, gold, ref, {}


def _from_hf_base(src: Source, tmp: Path, f16: Path, recipe: ExportRecipe, timings: dict, log):
    """Merge into the HF folder shard by shard, convert it with llama.cpp's converter, check the
    tokenizer survived, and take the reference from the merged model in torch, on the very tokens
    the runtime will feed (the converted GGUF's tokenizer and chat template)."""
    from ..train.sft import gguf_chat_tokenizer
    from . import parity
    from .convert import hf_to_gguf
    from .hf_merge import merge_hf

    if not any((src.base.path / name).is_file() for name in ("tokenizer.json", "tokenizer.model")):
        raise BkdError(f"{src.base.path}: no tokenizer (tokenizer.json or tokenizer.model); the GGUF needs one")
    merged = tmp / ".merged-hf"
    t = time.perf_counter()
    merge_hf(src.base.path, src.adapter_dir, merged)
    timings["merge_hf_s"] = round(time.perf_counter() - t, 2)
    t = time.perf_counter()
    hf_to_gguf(merged, f16, log, source=src.base.path)
    timings["convert_s"] = round(time.perf_counter() - t, 2)
    log(f"merged and converted into {f16.name} ({f16.stat().st_size / 2**20:.0f} MiB) by llama.cpp's converter")
    # the adapter alone, for `--adapter` over any GGUF converted from this base: the merged file has its layout
    adapter = write_lora_gguf(f16, src.adapter_dir, tmp / ADAPTER_FILE, pin_base=False)
    tok = gguf_chat_tokenizer(f16)
    checks = {"tokenizer": parity.check_tokenizer(src.base.path, tok, f16)}
    gold = golden(src, tok, recipe)
    t = time.perf_counter()
    ref = parity.torch_top1_and_generate(merged, gold, tok)
    log(f"reference answers: the merged model in torch on {len(gold)} golden sessions")
    timings["reference_s"] = round(time.perf_counter() - t, 2)
    shutil.rmtree(merged)
    return adapter, gold, ref, checks


def read_source(run_dir: Path) -> Source:
    """A finished run: its adapter, recipe and base (checked against what it was trained on)."""
    from ..train.model import resolve_base
    from ..train.recipe import recipe_from_dict

    run, recipe_dict = read_run(run_dir)
    recipe = recipe_from_dict(recipe_dict, str(run_dir / "recipe.json"))
    base = resolve_base(run["base"]["path"])
    if base.kind == "gguf" and run["base"].get("sha256") and sha256_file(base.path) != run["base"]["sha256"]:
        raise BkdError(f"{base.path}: the base model changed since training (sha256 differs from run.json)")
    pack = None
    if recipe.mode == "knowledge":
        from ..packs import Pack

        pack = Pack(recipe.pack)
    return Source(base, run_dir / "adapter", recipe.prompt_config(), recipe.mode, pack, Path(recipe.sessions),
                  run_dir, run, recipe)  # fmt: skip


def source_from(base: str | Path, adapter: str | Path, sessions: str | Path | None = None) -> Source:
    """`--base --adapter`: ADAPTER a peft folder (prompted as our `sft` mode with the default prompt)
    or one of our run folders (its own prompt settings and pack)."""
    from ..prompts import PromptConfig
    from ..train.model import resolve_base

    adapter = Path(adapter)
    if (adapter / "run.json").is_file():
        src = read_source(adapter)
        src.base = resolve_base(str(base))
        src.sessions = Path(sessions) if sessions else src.sessions
        return src
    if sessions is None:
        from ..data import sample_sessions_path

        sessions = sample_sessions_path()
    return Source(resolve_base(str(base)), adapter, PromptConfig(), "sft", None, Path(sessions))


def golden(src: Source, tok, recipe: ExportRecipe) -> list:
    """The golden sessions: the val split (a run never trained on it), else test."""
    from ..data import load_sessions
    from ..train.sft import PromptMaker
    from . import parity

    sessions = load_sessions(src.sessions, split="val", empty_split_ok=True) or load_sessions(
        src.sessions, split="test", empty_split_ok=True
    )
    if not sessions:
        raise BkdError(f"{src.sessions}: no val or test sessions for the parity check")
    maker = PromptMaker(src.mode, src.prompt, pack=src.pack)
    return parity.golden_set(sessions, tok, maker, recipe.golden, recipe.gen_max_tokens)


def quantise(f16: Path, quants: list[str], keep_f16: bool, threads: int, log) -> dict:
    """{quant: description} of the quantised files written next to `f16` (F16 itself when kept)."""
    models = {}
    if keep_f16 or "F16" in quants:
        models["F16"] = {"file": f16.name, **describe_gguf(f16)}
    for q in quants:
        if q == "F16":
            continue
        path = f16.with_name(f"model-{q}.gguf")
        seconds = quantize(f16, path, q, threads)
        models[q] = m = {"file": path.name, "quantize_s": round(seconds, 2), **describe_gguf(path, q)}
        log(f"quantised {path.name}: {m['bytes'] / 2**20:.1f} MiB, {m['bits_per_weight']:.2f} bits/weight, "
            f"{m['fallbacks']} k-quant fallbacks")  # fmt: skip
    return models


def check_parity(gold: list, folder: Path, models: dict, ref: Answers, gate: Gate, threads: int, log,
                 drop_failing: bool = False) -> list[dict]:  # fmt: skip
    """Each merged file (F16, every quant) against the reference (the adapter over its base);
    raises when one falls below the gate. `drop_failing`: a quant below the gate is removed from
    the export instead (`--quant auto` tries candidates), its stage kept in the record."""
    from . import parity

    stages = []
    files = [("F16", folder / "model-F16.gguf")] + [(q, folder / m["file"]) for q, m in models.items() if q != "F16"]
    t = time.perf_counter()
    for stage, path in files:
        got = parity.gguf_top1_and_generate(path, gold, threads)
        stages.append(r := parity.compare(stage, gold, ref, got, gate))
        log(f"parity {stage}: top-1 {r['top1_agreement']:.3f} ({r['near_ties']} near-ties apart; all "
            f"{r['top1_all']:.3f}), identical bundles {r['identical_bundles']:.3f} "
            f"({time.perf_counter() - t:.0f} s)")  # fmt: skip
    for r in stages:
        if drop_failing and not r["passed"] and r["stage"] in models and r["stage"] != "F16":
            (folder / models.pop(r["stage"])["file"]).unlink()
            r["dropped"] = True
            log(f"dropped {r['stage']}: below the parity gate")
    parity.check([r for r in stages if not r.get("dropped")])
    return stages


def package(src: Source, folder: Path, name: str, models: dict, adapter: dict, stages: list, gold: list,
            checks: dict, recipe: ExportRecipe, timings: dict) -> dict:  # fmt: skip
    """The pack, model card, Modelfiles and manifest around the checked models."""
    from .gguf_write import check_base, field_value

    default = DEFAULT_QUANT if DEFAULT_QUANT in models else next(iter(models))
    if src.pack is not None:
        shutil.copytree(src.pack.folder, folder / "pack", ignore=shutil.ignore_patterns("state"))
    adapter_files = sorted(p for p in src.adapter_dir.iterdir() if p.is_file())
    run = src.run or {}
    base_sha = (run.get("base") or {}).get("sha256") or adapter.get("base_sha256")  # hashed once, by the writer
    fields = {
        "name": name,
        "base": {"path": str(src.base.path), "kind": src.base.kind, "sha256": base_sha, "arch": adapter["arch"]},
        "adapter": {
            "run_dir": str(src.run_dir.resolve()) if src.run_dir else None,
            "dir": str(src.adapter_dir.resolve()),
            "files": {p.name: sha256_file(p) for p in adapter_files},
            "gguf": adapter,
        },
        "prompt": asdict(src.prompt),
        "recipe": src.recipe.to_dict() if src.recipe else {"mode": src.mode},
        "run": {k: run.get(k) for k in ("steps", "best_step", "best_val_strict_f1", "train_s", "tokens_per_s")},
        "data": _run_data(src.run_dir) if src.run_dir else {},
        "default_quant": default,
        "models": models,
        "pack": "pack" if src.pack is not None else None,
        "parity": {"golden_sessions": len(gold), "gate": asdict(recipe.gate), "stages": stages, **checks},
        "export_recipe": recipe.to_dict(),
        "timings": timings,
    }
    with atomic_write(folder / "README.md") as f:
        f.write(model_card({**fields, "bkd_edge": __version__}))
    system = system_text(src.prompt)
    template = str(field_value(check_base(folder / models[default]["file"]), "tokenizer.chat_template") or "")
    base_gguf = str(src.base.path) if src.base.kind == "gguf" else None
    for file, source in (("Modelfile", f"./{models[default]['file']}"), ("Modelfile.adapter", base_gguf)):
        text = source and modelfile(source, template, system, ADAPTER_FILE if file.endswith("adapter") else None)
        if recipe.ollama and text:
            with atomic_write(folder / file) as f:
                f.write(text)
    return write_manifest(folder, EXPORT_FORMAT, fields)
