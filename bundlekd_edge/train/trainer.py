"""LoRA SFT of a small student: one plain loop (nanoGPT style) over packed rows.

Run folder (every file written atomically; `adapter/` appears last, so its presence means done):

    RUN/
      recipe.json         the resolved recipe
      data.json           example counts, token counts, dropped examples, sha256 of the data
      examples.jsonl      a few decoded training examples (what the model really sees)
      metrics.jsonl       one line per logged step and per evaluation
      checkpoints/last/   adapter + optimizer + scheduler + RNG + step: `--resume` continues here
      best/               the adapter with the best val strict F1 so far
      adapter/            the final (best) LoRA adapter, peft format
      run.json            format bkd-run/1, status, base model (path, sha256), best step and scores, timings

Multi-GPU: `accelerate launch -m bundlekd_edge.cli train RECIPE --out RUN` (each process takes
every world_size-th row; process 0 evaluates and writes). Only the single-process path is tested.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import shutil
import time
from pathlib import Path

from .. import BkdError, __version__
from ..artifacts import building
from ..data import load_sessions, spread
from ..files import atomic_write, sha256_file, write_json
from .model import load_base_model, pick_device, resolve_base, score_model, set_threads
from .recipe import Recipe
from .sft import (
    PromptMaker,
    build_examples,
    collate,
    dump_examples,
    load_thoughts,
    make_rows,
    with_shuffled_copies,
)

RUN_FORMAT = "bkd-run/1"


class Interrupted(Exception):
    """Raised by `stop_after` (tests): the run stops as if killed right after a checkpoint."""


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Plain lists, ints and tensors only, so a checkpoint loads with torch's weights_only (no pickle)."""
    import numpy as np
    import torch

    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(internal), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }


def set_rng_state(state: dict) -> None:
    import numpy as np
    import torch

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])


def save_adapter(model, folder: Path) -> None:
    with building(folder, replace=True) as tmp:
        model.save_pretrained(str(tmp))


def save_checkpoint(folder: Path, model, optimizer, scheduler, state: dict) -> None:
    with building(folder, replace=True) as tmp:
        _save_state(tmp, model, optimizer, scheduler, state)


def _save_state(tmp: Path, model, optimizer, scheduler, state: dict) -> None:
    import torch
    from peft import get_peft_model_state_dict

    torch.save(
        {
            "adapter": get_peft_model_state_dict(model),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": rng_state(),
        },
        tmp / "state.pt",
    )
    write_json(tmp / "progress.json", state)


def load_checkpoint(folder: Path, model, optimizer, scheduler) -> dict:
    import torch
    from peft import set_peft_model_state_dict

    try:  # weights_only: a checkpoint is untrusted input, never unpickled into code
        blob = torch.load(folder / "state.pt", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError/RuntimeError for anything but tensors and plain data
        raise BkdError(f"{folder / 'state.pt'}: not a checkpoint this trainer wrote ({type(e).__name__}); "
                       "refusing to load it") from None  # fmt: skip
    set_peft_model_state_dict(model, blob["adapter"])
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    set_rng_state(blob["rng"])
    return json.loads((folder / "progress.json").read_text())


def _append_metrics(path: Path, row: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


def _trim_metrics(path: Path, step: int) -> None:
    """On resume, forget what was logged after the checkpoint (those steps run again)."""
    if path.exists():
        keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        with atomic_write(path) as f:
            f.write("".join(line + "\n" for line in keep))


def check_run_dir(out: Path, resume: bool) -> Path | None:
    """The checkpoint to resume from, or None; refuses to overwrite a finished or started run."""
    last = out / "checkpoints" / "last"
    if (out / "adapter").exists():
        raise BkdError(f"{out}: this run is already complete (adapter/ exists); choose another --out")
    if resume:
        return last if (last / "progress.json").exists() else None
    if out.exists() and any(out.iterdir()):
        raise BkdError(f"{out}: the run folder is not empty; pass --resume to continue it or choose another --out")
    return None


def train(recipe: Recipe, out: str | Path, resume: bool = False, progress: bool = True, stop_after: int = 0) -> dict:
    """Train a LoRA adapter by `recipe` into the run folder `out`; returns run.json's content."""
    import torch
    from accelerate import Accelerator
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from tqdm import tqdm
    from transformers import get_cosine_schedule_with_warmup

    out = Path(out)
    ckpt = check_run_dir(out, resume)
    t_start = time.perf_counter()
    set_threads(recipe.threads)
    seed_everything(recipe.seed)

    # -- data ---------------------------------------------------------------------------
    if not recipe.sessions:
        raise BkdError("the recipe names no `sessions` file")
    train_sessions = load_sessions(recipe.sessions, split="train")
    if recipe.limit_train:
        train_sessions = train_sessions[: recipe.limit_train]
    val_sessions = spread(load_sessions(recipe.sessions, split="val", empty_split_ok=True), recipe.eval_sessions)
    if not train_sessions:
        raise BkdError(f"{recipe.sessions}: no sessions with split 'train'")
    base = resolve_base(recipe.base)
    from .model import tokenizer_for

    tok = tokenizer_for(base)
    pack = None
    if recipe.mode == "knowledge":
        from ..packs import Pack

        pack = Pack(recipe.pack)
    maker = PromptMaker(recipe.mode, recipe.prompt_config(), pack=pack)
    thoughts = load_thoughts(recipe.thoughts) if recipe.thoughts else None
    train_sessions = with_shuffled_copies(train_sessions, recipe.shuffled_copies, recipe.seed)
    examples, data_stats = build_examples(train_sessions, tok, maker, recipe.max_len, thoughts)
    if not examples:
        raise BkdError(f"no training example fits max_len {recipe.max_len} tokens (raise max_len)")
    rows = make_rows(examples, recipe.max_len, recipe.packing, recipe.seed)

    # -- model ----------------------------------------------------------------------------
    device = pick_device(recipe.device)
    bf16 = recipe.precision == "bf16" or (recipe.precision == "auto" and device == "cuda")
    accelerator = Accelerator(cpu=device == "cpu", mixed_precision="bf16" if bf16 else "no")
    main = accelerator.is_main_process
    model = load_base_model(base, torch.float32, accelerator.device.type, recipe.qlora)
    if recipe.qlora:
        model = prepare_model_for_kbit_training(model)
    model.config.use_cache = False
    lora = LoraConfig(
        task_type="CAUSAL_LM",
        r=recipe.lora_r,
        lora_alpha=recipe.lora_alpha,
        lora_dropout=recipe.lora_dropout,
        target_modules=list(recipe.target_modules),
    )
    try:
        model = get_peft_model(model, lora)
    except ValueError as e:
        raise BkdError(f"recipe target_modules {recipe.target_modules}: {e}") from None
    model.base_model.model.name_or_path = str(base.path)  # recorded in adapter_config.json
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=recipe.lr, weight_decay=recipe.weight_decay)

    world, rank = accelerator.num_processes, accelerator.process_index
    my_rows = rows[rank::world] if world > 1 else rows
    steps_per_epoch = max(1, math.ceil(math.ceil(len(my_rows) / recipe.batch_size) / recipe.grad_accum))
    total_steps = recipe.max_steps or recipe.epochs * steps_per_epoch
    scheduler = get_cosine_schedule_with_warmup(optimizer, min(recipe.warmup_steps, total_steps // 2), total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)

    state = {"step": 0, "best_f1": -1.0, "best_step": 0, "evals": [], "tokens": 0, "train_s": 0.0}
    metrics_path = out / "metrics.jsonl"
    if main:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "recipe.json", recipe.to_dict())
        write_json(
            out / "data.json", {**data_stats, "rows": len(rows), "sessions_sha256": sha256_file(recipe.sessions)}
        )
        dump_examples(out / "examples.jsonl", examples, tok)
    if ckpt is not None:
        state = load_checkpoint(ckpt, accelerator.unwrap_model(model), optimizer, scheduler)
        if main:
            _trim_metrics(metrics_path, state["step"])
            print(f"resuming {out} at step {state['step']}/{total_steps}")

    def evaluate_and_keep_best(step: int) -> None:
        if not main:
            return
        if not val_sessions:
            save_adapter(accelerator.unwrap_model(model), out / "best")
            state["best_step"] = step
            return
        t0 = time.perf_counter()
        result = score_model(accelerator.unwrap_model(model), tok, maker, val_sessions, recipe.eval_max_tokens)
        scores = result["scores"]
        row = {"step": step, "eval": {k: round(v, 4) for k, v in scores.items()}, "eval_s": time.perf_counter() - t0}
        _append_metrics(metrics_path, row)
        state["evals"].append({"step": step, "strict_f1": scores["strict_f1"], "exact_match": scores["exact_match"]})
        if scores["strict_f1"] > state["best_f1"]:
            state["best_f1"], state["best_step"] = scores["strict_f1"], step
            save_adapter(accelerator.unwrap_model(model), out / "best")
        tqdm.write(
            f"step {step}: val strict F1 {scores['strict_f1']:.3f}, exact {scores['exact_match']:.3f} "
            f"({len(val_sessions)} sessions, {row['eval_s']:.0f} s); best {state['best_f1']:.3f} @ {state['best_step']}"
        )

    # -- loop -----------------------------------------------------------------------------
    def groups(epoch: int):
        """The micro-batches of each optimizer step, in a fixed seeded order per epoch (resumable)."""
        order = list(range(len(my_rows)))
        random.Random(recipe.seed * 1000 + epoch).shuffle(order)
        micro = [order[i : i + recipe.batch_size] for i in range(0, len(order), recipe.batch_size)]
        for i in range(0, len(micro), recipe.grad_accum):
            yield [collate([my_rows[j] for j in idx], tok.eos_id) for idx in micro[i : i + recipe.grad_accum]]

    model.train()
    bar = tqdm(
        total=total_steps, initial=state["step"], disable=not (progress and main), unit="step", dynamic_ncols=True
    )
    step = state["step"]
    epoch, skip = divmod(step, steps_per_epoch)
    t_loop, tokens_run = time.perf_counter(), 0
    while step < total_steps:
        for g, group in enumerate(groups(epoch)):
            if g < skip:
                continue  # resumed mid-epoch: these steps were done before the checkpoint
            loss_sum, answer_tokens = 0.0, 0
            for m, batch in enumerate(group):
                batch = {k: v.to(accelerator.device) for k, v in batch.items()}
                # gradients are all-reduced once per step, on the last micro-batch
                sync = m == len(group) - 1
                with contextlib.nullcontext() if sync else accelerator.no_sync(model):
                    loss = model(**batch, use_cache=False).loss / len(group)
                    accelerator.backward(loss)
                loss_sum += loss.item()
                answer_tokens += int((batch["labels"] != -100).sum())
                tokens_run += int(batch["input_ids"].numel())
            if recipe.max_grad_norm:
                accelerator.clip_grad_norm_(trainable, recipe.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad()
            scheduler.step()
            step += 1
            elapsed = time.perf_counter() - t_loop
            tps = tokens_run / elapsed if elapsed else 0.0
            bar.set_postfix(loss=f"{loss_sum:.3f}", tok_s=f"{tps:.0f}", epoch=epoch)
            bar.update(1)
            if main and (step % recipe.log_every == 0 or step == total_steps):
                row = {"step": step, "epoch": epoch, "loss": round(loss_sum, 5), "lr": scheduler.get_last_lr()[0],
                       "tokens_per_s": round(tps, 1), "answer_tokens": answer_tokens}  # fmt: skip
                _append_metrics(metrics_path, row)
            end_of_epoch = step % steps_per_epoch == 0
            due = step % recipe.eval_every == 0 if recipe.eval_every else end_of_epoch
            if (due or step == total_steps) and not any(e["step"] == step for e in state["evals"]):
                evaluate_and_keep_best(step)
            if step % recipe.save_every == 0 or step == total_steps or end_of_epoch:
                state["step"] = step
                state["tokens"] += tokens_run
                state["train_s"] += time.perf_counter() - t_loop
                if main:
                    unwrapped = accelerator.unwrap_model(model)
                    save_checkpoint(out / "checkpoints" / "last", unwrapped, optimizer, scheduler, state)
                accelerator.wait_for_everyone()
                t_loop, tokens_run = time.perf_counter(), 0
                if stop_after and stop_after <= step < total_steps:
                    bar.close()
                    raise Interrupted(f"stopped after step {step} (simulated interruption)")
            if step >= total_steps:
                break
            if recipe.max_minutes and time.perf_counter() - t_start > 60 * recipe.max_minutes:
                total_steps = step + 1  # out of time: one more step, then evaluate and finish as usual
                bar.total = total_steps
        epoch, skip = epoch + 1, 0
    bar.close()

    # -- finish: the best adapter becomes adapter/, last of all --------------------------------
    result = {}
    if main:
        train_s = state.get("train_s", 0.0)
        result = {
            "format": RUN_FORMAT,
            "status": "complete",
            "bkd_edge_version": __version__,
            "name": recipe.name,
            "mode": recipe.mode,
            "base": {
                "kind": base.kind,
                "path": str(base.path),
                "sha256": sha256_file(base.path) if base.kind == "gguf" else None,
            },
            "device": device,
            "precision": "bf16" if bf16 else "fp32",
            "processes": world,
            "steps": step,
            "examples": len(examples),
            "rows": len(rows),
            "best_step": state["best_step"],
            "best_val_strict_f1": state["best_f1"] if val_sessions else None,
            "evals": state["evals"],
            "val_sessions": len(val_sessions),
            "tokens": state.get("tokens", 0),
            "train_s": round(train_s, 2),
            "s_per_step": round(train_s / max(1, step), 3),
            "tokens_per_s": round(state.get("tokens", 0) / train_s, 1) if train_s else 0.0,
            "wall_s": round(time.perf_counter() - t_start, 2),
            "trainable_params": sum(p.numel() for p in trainable),
        }
        best = out / "best"
        if not best.exists():
            save_adapter(accelerator.unwrap_model(model), best)
        tmp = out / "adapter.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(best, tmp)
        write_json(out / "run.json", result)
        tmp.rename(out / "adapter")
    accelerator.wait_for_everyone()
    return result
