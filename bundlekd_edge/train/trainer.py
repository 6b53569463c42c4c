"""LoRA SFT of a small student: one plain loop (nanoGPT style) over packed rows, into a run folder
(train/run_folder.py: every file written atomically, the manifest last, so its presence means done).

Several processes: `accelerate launch --multi_gpu --num_processes N -m bundlekd_edge.cli train RECIPE
--out RUN` (GPUs, or CPU processes over gloo). Each process takes every N-th row; the loss is summed
over the step's answer tokens and divided by their count over all processes, so N processes take the
step one process takes with the same global batch (tests/test_train_export.py). Every process runs
each forward pass (evaluation too) and takes part in gathering the adapter before process 0 writes
it, so the same loop runs with the weights sharded over the processes (`--config_file
train/accelerate/fsdp.yaml` or `deepspeed-zero3.yaml`, for a student that does not fit one GPU).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path

from .. import BkdError, __version__
from ..artifacts import building, write_manifest
from ..data import load_sessions, spread
from ..files import atomic_write, sha256_file, write_json
from .model import load_adapter, load_base_model, pick_device, rank_loss, resolve_base, score_model, set_threads
from .recipe import Recipe
from .run_folder import RUN_FORMAT, RUN_SCRATCH, is_finished
from .sft import (
    IGNORE,
    PromptMaker,
    build_examples,
    build_rank_examples,
    collate,
    dump_examples,
    load_thoughts,
    make_rows,
    recombined_sessions,
    with_closest_candidate,
    with_shuffled_copies,
)


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


def save_checkpoint(folder: Path, adapter: dict, optimizer: dict | None, scheduler, state: dict) -> None:
    with building(folder, replace=True) as tmp:
        _save_state(tmp, adapter, optimizer, scheduler, state)


def _save_state(tmp: Path, adapter: dict, optimizer: dict | None, scheduler, state: dict) -> None:
    import torch

    torch.save(
        {
            "adapter": adapter,
            "optimizer": optimizer,
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
    if is_finished(out):
        raise BkdError(f"{out}: this run is already complete (manifest.json exists); choose another --out")
    if resume:
        return last if (last / "progress.json").exists() else None
    if out.exists() and any(out.iterdir()):
        raise BkdError(f"{out}: the run folder is not empty; pass --resume to continue it or choose another --out")
    return None


def train(recipe: Recipe, out: str | Path, resume: bool = False, progress: bool = True, stop_after: int = 0) -> dict:
    """Train a LoRA adapter by `recipe` into the run folder `out`; returns run.json's content."""
    out = Path(out)
    checkpoint = check_run_dir(out, resume)
    run = Training(recipe, out, progress)
    run.load_data()
    run.build_model()
    run.start(checkpoint)
    run.loop(stop_after)
    return run.finish()


class Training:
    """One run, in the order it happens: data -> model -> start (or resume) -> loop, evaluating
    on val and keeping the best adapter -> finish. `train()` drives it."""

    def __init__(self, recipe: Recipe, out: Path, progress: bool = True):
        self.recipe, self.out, self.progress = recipe, out, progress
        self.t_start = time.perf_counter()
        self.metrics_path = out / "metrics.jsonl"
        set_threads(recipe.threads)
        seed_everything(recipe.seed)

    # -- data ---------------------------------------------------------------------------
    def load_data(self) -> None:
        from .model import tokenizer_for

        recipe = self.recipe
        if not recipe.sessions:
            raise BkdError("the recipe names no `sessions` file")
        train_sessions = load_sessions(recipe.sessions, split="train")
        if recipe.limit_train:
            train_sessions = train_sessions[: recipe.limit_train]
        if not train_sessions:
            raise BkdError(f"{recipe.sessions}: no sessions with split 'train'")
        val = load_sessions(recipe.sessions, split="val", empty_split_ok=True)  # none: train without evaluating
        self.val_sessions = spread(val, recipe.eval_sessions)
        self.base = resolve_base(recipe.base)
        self.tok = tokenizer_for(self.base)
        pack = None
        if recipe.mode == "knowledge":
            from ..packs import Pack

            pack = Pack(recipe.pack)
        self.maker = PromptMaker(recipe.mode, recipe.prompt_config(), pack=pack)
        thoughts = load_thoughts(recipe.thoughts) if recipe.thoughts else None
        train_sessions += recombined_sessions(train_sessions, recipe.recombined, recipe.seed)
        train_sessions = with_shuffled_copies(train_sessions, recipe.shuffled_copies, recipe.seed)
        self.rank_examples, rank_stats = [], {}
        if recipe.rank_weight:
            if not pack.candidates(train_sessions[0]):
                raise BkdError(f"{recipe.pack}: rank_weight needs a pack with the similar-items hint (candidates)")
            self.rank_examples, rank_stats = build_rank_examples(train_sessions, self.tok, self.maker, recipe.max_len)
            if not self.rank_examples:
                raise BkdError("rank_weight: no training session has candidates that differ in strict F1")
        if recipe.target == "closest_candidate":
            if not pack.candidates(train_sessions[0]):
                raise BkdError(f"{recipe.pack}: target 'closest_candidate' needs a pack with the similar-items hint")
            train_sessions = [with_closest_candidate(s, pack.candidates(s)) for s in train_sessions]
        self.examples, self.data_stats = build_examples(train_sessions, self.tok, self.maker, recipe.max_len, thoughts)
        if not self.examples:
            raise BkdError(f"no training example fits max_len {recipe.max_len} tokens (raise max_len)")
        self.data_stats.update(rank_stats, recombined=recipe.recombined)
        self.rows = make_rows(self.examples, recipe.max_len, recipe.packing, recipe.seed)

    # -- model ----------------------------------------------------------------------------
    def build_model(self) -> None:
        import torch
        from accelerate import Accelerator, DistributedType
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
        from transformers import get_cosine_schedule_with_warmup

        recipe = self.recipe
        self.device = pick_device(recipe.device)
        self.bf16 = recipe.precision == "bf16" or (recipe.precision == "auto" and self.device == "cuda")
        self.accelerator = acc = Accelerator(cpu=self.device == "cpu", mixed_precision="bf16" if self.bf16 else "no")
        self.main = acc.is_main_process
        # FSDP and DeepSpeed spread the weights over the processes (accelerate falls back to DDP on CPU)
        self.sharded = acc.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
        asked = [name for name in ("FSDP", "DEEPSPEED") if os.environ.get(f"ACCELERATE_USE_{name}") == "true"]
        if asked and not self.sharded and self.main:
            print(f"note: the accelerate config asks for {asked[0]}, but on {self.device} accelerate runs "
                  f"{acc.distributed_type.value}: every process holds the whole model", file=sys.stderr)  # fmt: skip
        if acc.distributed_type == DistributedType.DEEPSPEED and recipe.grad_accum != 1:
            raise BkdError(f"recipe grad_accum {recipe.grad_accum}: DeepSpeed accumulates gradients itself "
                           "(gradient_accumulation_steps); set grad_accum = 1 and raise batch_size")  # fmt: skip
        compute = torch.bfloat16 if self.bf16 else torch.float32  # QLoRA: the 4-bit layers' compute dtype
        model = load_base_model(self.base, torch.float32, acc.device.type, recipe.qlora, compute)
        if recipe.qlora:
            model = prepare_model_for_kbit_training(model)
        model.config.use_cache = False
        lora = LoraConfig(
            task_type="CAUSAL_LM",
            r=recipe.lora_r,
            lora_alpha=recipe.lora_alpha,
            lora_dropout=recipe.lora_dropout,
            target_modules=recipe.lora_targets(),
        )
        try:
            model = get_peft_model(model, lora)
        except ValueError as e:
            raise BkdError(f"recipe target_modules {recipe.target_modules}: {e}") from None
        model.base_model.model.name_or_path = str(self.base.path)  # recorded in adapter_config.json
        if recipe.init_adapter:
            load_adapter(model, recipe.init_adapter, self.base, recipe.lora_alpha)
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(self.trainable, lr=recipe.lr, weight_decay=recipe.weight_decay)

        self.world, rank = acc.num_processes, acc.process_index
        self.my_rows = self.rows[rank :: self.world] if self.world > 1 else self.rows
        batches = math.ceil(len(self.my_rows) / recipe.batch_size)
        self.steps_per_epoch = max(1, math.ceil(batches / recipe.grad_accum))
        self.total_steps = recipe.max_steps or recipe.epochs * self.steps_per_epoch
        warmup = min(recipe.warmup_steps, self.total_steps // 2)
        self.scheduler = get_cosine_schedule_with_warmup(optimizer, warmup, self.total_steps)
        self.model, self.optimizer = acc.prepare(model, optimizer)

    # -- start or resume --------------------------------------------------------------------
    def start(self, checkpoint: Path | None) -> None:
        out, recipe = self.out, self.recipe
        self.state = {"step": 0, "best_f1": -1.0, "best_step": 0, "evals": [], "tokens": 0, "train_s": 0.0}
        if self.main:
            out.mkdir(parents=True, exist_ok=True)
            write_json(out / "recipe.json", recipe.to_dict())
            data = {**self.data_stats, "rows": len(self.rows), "sessions_sha256": sha256_file(recipe.sessions)}
            write_json(out / "data.json", data)
            dump_examples(out / "examples.jsonl", self.examples, self.tok)
        if checkpoint is not None:
            if self.sharded:  # its optimizer moments live in shards, which a checkpoint does not keep
                raise BkdError(f"{out}: a run whose weights are sharded (FSDP, DeepSpeed) does not resume; "
                               f"its last adapter is in {checkpoint}")  # fmt: skip
            model = self.accelerator.unwrap_model(self.model)
            self.state = load_checkpoint(checkpoint, model, self.optimizer, self.scheduler)
            if self.main:
                _trim_metrics(self.metrics_path, self.state["step"])
                print(f"resuming {out} at step {self.state['step']}/{self.total_steps}")

    # -- the adapter's weights, gathered from every process -----------------------------------
    def adapter_state(self) -> dict:
        """The LoRA tensors, whole; every process calls it. FSDP2 shards are gathered one LoRA tensor
        at a time, never the whole model; DeepSpeed ZeRO-3 goes through accelerate's 16-bit gather."""
        from accelerate import DistributedType
        from peft import get_peft_model_state_dict
        from torch.distributed.tensor import DTensor

        model = self.accelerator.unwrap_model(self.model)
        if self.accelerator.distributed_type == DistributedType.DEEPSPEED:
            whole = self.accelerator.get_state_dict(self.model)
        else:
            whole = {name: (p.full_tensor() if isinstance(p, DTensor) else p).detach()
                     for name, p in model.named_parameters() if p.requires_grad}  # fmt: skip
        return get_peft_model_state_dict(model, state_dict=whole)

    def save_adapter(self, folder: Path) -> None:
        """peft's adapter folder (process 0 writes; every process calls it)."""
        adapter = self.adapter_state()
        if self.main:
            with building(folder, replace=True) as tmp:
                self.accelerator.unwrap_model(self.model).save_pretrained(str(tmp), state_dict=adapter)

    # -- evaluate ---------------------------------------------------------------------------
    def evaluate(self, step: int) -> None:
        """Score val as the runtime answers (`score_model`); keep the adapter when it is the best.
        Every process answers (sharded weights need all of them for each forward pass); process 0's
        score decides."""
        from tqdm import tqdm

        state, model = self.state, self.accelerator.unwrap_model(self.model)
        if not self.val_sessions:
            self.save_adapter(self.out / "best")
            state["best_step"] = step
            return
        t0 = time.perf_counter()
        scores = score_model(model, self.tok, self.maker, self.val_sessions, self.recipe.eval_max_tokens,
                             synced=self.world > 1)["scores"]  # fmt: skip
        scores["strict_f1"] = self.from_main(scores["strict_f1"])  # one decision: the save below is collective
        row = {"step": step, "eval": {k: round(v, 4) for k, v in scores.items()}, "eval_s": time.perf_counter() - t0}
        state["evals"].append({"step": step, "strict_f1": scores["strict_f1"], "exact_match": scores["exact_match"]})
        if scores["strict_f1"] > state["best_f1"]:
            state["best_f1"], state["best_step"] = scores["strict_f1"], step
            self.save_adapter(self.out / "best")
        if not self.main:
            return
        _append_metrics(self.metrics_path, row)
        tqdm.write(
            f"step {step}: val strict F1 {scores['strict_f1']:.3f}, exact {scores['exact_match']:.3f} "
            f"({len(self.val_sessions)} sessions, {row['eval_s']:.0f} s); "
            f"best {state['best_f1']:.3f} @ {state['best_step']}"
        )

    # -- loop -------------------------------------------------------------------------------
    def groups(self, epoch: int):
        """The micro-batches of each optimizer step, in a fixed seeded order per epoch (resumable)."""
        recipe, rows = self.recipe, self.my_rows
        order = list(range(len(rows)))
        random.Random(recipe.seed * 1000 + epoch).shuffle(order)
        micro = [order[i : i + recipe.batch_size] for i in range(0, len(order), recipe.batch_size)]
        for i in range(0, len(micro), recipe.grad_accum):
            yield [collate([rows[j] for j in idx], self.tok.eos_id) for idx in micro[i : i + recipe.grad_accum]]

    def loop(self, stop_after: int = 0) -> None:
        import torch
        from tqdm import tqdm

        recipe, acc, model, state = self.recipe, self.accelerator, self.model, self.state
        model.train()
        show = self.progress and self.main
        bar = tqdm(total=self.total_steps, initial=state["step"], disable=not show, unit="step", dynamic_ncols=True)
        step = state["step"]
        epoch, skip = divmod(step, self.steps_per_epoch)
        t_loop, tokens_run = time.perf_counter(), 0
        while step < self.total_steps:
            for g, group in enumerate(self.groups(epoch)):
                if g < skip:
                    continue  # resumed mid-epoch: these steps were done before the checkpoint
                loss_sum, answer_tokens, step_tokens, rank_sum = 0.0, 0, 0, 0.0
                # Every predicted answer token of the step weighs the same, however the rows fall on
                # micro-batches and processes: the loss is summed and divided by the step's token count
                # (times the processes, whose gradients data parallelism averages).
                n_items = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in group)
                n_items = self.summed(n_items)[0] if self.world > 1 else n_items
                n_items = torch.tensor(n_items, device=acc.device)
                for m, batch in enumerate(group):
                    batch = {k: v.to(acc.device) for k, v in batch.items()}
                    # gradients are all-reduced once per step, on the last micro-batch
                    sync = m == len(group) - 1
                    with contextlib.nullcontext() if sync else acc.no_sync(model):
                        loss = model(**batch, use_cache=False, num_items_in_batch=n_items).loss * self.world
                        if sync and self.rank_examples:
                            rank = self.rank_term(step)
                            rank_sum = rank.item()
                            loss = loss + rank * self.world
                        acc.backward(loss)
                    loss_sum += loss.item()
                    answer_tokens += int((batch["labels"] != -100).sum())
                    step_tokens += int(batch["input_ids"].numel())
                if self.world > 1:  # each process saw its share of the global batch: log the whole of it
                    loss_sum, answer_tokens, step_tokens = self.summed(loss_sum / self.world, answer_tokens,
                                                                       step_tokens)  # fmt: skip
                tokens_run += step_tokens
                if recipe.max_grad_norm:
                    acc.clip_grad_norm_(self.trainable, recipe.max_grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad()
                self.scheduler.step()
                step += 1
                elapsed = time.perf_counter() - t_loop
                tps = tokens_run / elapsed if elapsed else 0.0
                bar.set_postfix(loss=f"{loss_sum:.3f}", tok_s=f"{tps:.0f}", epoch=epoch)
                bar.update(1)
                if self.main and (step % recipe.log_every == 0 or step == self.total_steps):
                    lr = self.scheduler.get_last_lr()[0]
                    row = {"step": step, "epoch": epoch, "loss": round(loss_sum, 5), "lr": lr,
                           "tokens_per_s": round(tps, 1), "answer_tokens": answer_tokens}  # fmt: skip
                    if self.rank_examples:
                        row["rank_loss"] = round(rank_sum / self.recipe.rank_weight, 5)
                    _append_metrics(self.metrics_path, row)
                end_of_epoch = step % self.steps_per_epoch == 0
                due = step % recipe.eval_every == 0 if recipe.eval_every else end_of_epoch
                if (due or step == self.total_steps) and not any(e["step"] == step for e in state["evals"]):
                    self.evaluate(step)
                if step % recipe.save_every == 0 or step == self.total_steps or end_of_epoch:
                    self.checkpoint(step, tokens_run, time.perf_counter() - t_loop)
                    t_loop, tokens_run = time.perf_counter(), 0
                    if stop_after and stop_after <= step < self.total_steps:
                        bar.close()
                        raise Interrupted(f"stopped after step {step} (simulated interruption)")
                if step >= self.total_steps:
                    break
                if recipe.max_minutes and self.out_of_time():
                    self.total_steps = step + 1  # out of time: one more step, then evaluate and finish as usual
                    bar.total = self.total_steps
            epoch, skip = epoch + 1, 0
        bar.close()

    def rank_term(self, step: int):
        """The ranking loss of step `step`: the mean listwise loss of its `rank_per_step` examples
        (this process's share, in a seeded order per pass over them, so a resumed run takes the
        same ones), times `rank_weight`."""
        recipe, pool = self.recipe, self.rank_examples[self.accelerator.process_index :: self.world]
        picked = []
        for j in range(step * recipe.rank_per_step, (step + 1) * recipe.rank_per_step):
            order = list(range(len(pool)))
            random.Random(recipe.seed * 1000 + j // len(pool)).shuffle(order)  # pass j // len(pool)'s order
            picked.append(pool[order[j % len(pool)]])
        model = self.accelerator.unwrap_model(self.model)
        loss = sum(rank_loss(model, ex, recipe.rank_temperature) for ex in picked) / len(picked)
        return recipe.rank_weight * loss

    def checkpoint(self, step: int, tokens: int, seconds: float) -> None:
        """Everything `--resume` needs to continue after `step`."""
        state = self.state
        state["step"] = step
        state["tokens"] += tokens
        state["train_s"] += seconds
        adapter = self.adapter_state()
        if self.main:
            # a sharded optimizer's state is each process's own: kept by none (such runs do not resume)
            optimizer = None if self.sharded else self.optimizer.state_dict()
            save_checkpoint(self.out / "checkpoints" / "last", adapter, optimizer, self.scheduler, state)
        self.accelerator.wait_for_everyone()

    def out_of_time(self) -> bool:
        """Past the recipe's max_minutes (process 0's clock decides, so all processes stop together)."""
        return self.from_main(float(time.perf_counter() - self.t_start > 60 * self.recipe.max_minutes)) > 0

    def from_main(self, value: float) -> float:
        """Process 0's value on every process, so that all of them take a collective step or none."""
        return self.summed(value if self.main else 0.0)[0] if self.world > 1 else value

    def summed(self, *values: float) -> list:
        """Each value summed over every process (one all-reduce)."""
        import torch

        mine = torch.tensor(values, dtype=torch.float64, device=self.accelerator.device)
        total = self.accelerator.reduce(mine, "sum")
        return [type(v)(x) for v, x in zip(values, total.tolist())]

    def ranks_agree(self) -> bool:
        """Whether every process holds the same adapter weights (data parallelism must keep them equal)."""
        import torch

        flat = torch.cat([p.detach().double().flatten() for p in self.trainable])
        weights = torch.arange(1, len(flat) + 1, dtype=torch.float64, device=flat.device)
        mine = torch.stack([flat.sum(), (flat * weights).sum()])[None]  # order-sensitive checksum
        every = self.accelerator.gather(mine)
        return bool((every == every[0]).all())

    # -- finish: the best adapter becomes adapter/, last of all -------------------------------
    def finish(self) -> dict:
        if self.world > 1 and not self.sharded and not self.ranks_agree():
            raise BkdError("the processes ended with different adapter weights; the run is not kept")
        best = self.out / "best"
        if self.from_main(float(not best.exists())):
            self.save_adapter(best)
        result = {}
        if self.main:
            result = self.summary()
            with building(self.out / "adapter", replace=True) as tmp:  # replace: a finish cut short before
                shutil.copytree(best, tmp, dirs_exist_ok=True)
            write_json(self.out / "run.json", result)
            write_manifest(self.out, RUN_FORMAT, {"name": self.recipe.name}, skip=RUN_SCRATCH)  # last: done
        self.accelerator.wait_for_everyone()
        return result

    def summary(self) -> dict:
        """run.json: what was trained, on what, how well and how fast."""
        state, base, step = self.state, self.base, self.state["step"]
        train_s = state.get("train_s", 0.0)
        return {
            "status": "complete",
            "bkd_edge_version": __version__,
            "name": self.recipe.name,
            "mode": self.recipe.mode,
            "base": {
                "kind": base.kind,
                "path": str(base.path),
                "sha256": sha256_file(base.path) if base.kind == "gguf" else None,
            },
            "device": self.device,
            "precision": "bf16" if self.bf16 else "fp32",
            "processes": self.world,
            "distributed": self.accelerator.distributed_type.value,
            "steps": step,
            "examples": len(self.examples),
            "rows": len(self.rows),
            "best_step": state["best_step"],
            "best_val_strict_f1": state["best_f1"] if self.val_sessions else None,
            "evals": state["evals"],
            "val_sessions": len(self.val_sessions),
            "tokens": state.get("tokens", 0),
            "train_s": round(train_s, 2),
            "s_per_step": round(train_s / max(1, step), 3),
            "tokens_per_s": round(state.get("tokens", 0) / train_s, 1) if train_s else 0.0,
            "wall_s": round(time.perf_counter() - self.t_start, 2),
            "trainable_params": sum(p.numel() for p in self.trainable),
        }
