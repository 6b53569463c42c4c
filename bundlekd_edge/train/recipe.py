"""Training recipes: a small TOML or JSON file under `train/`, loaded strictly into a dataclass (config.py)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from .. import BkdError
from ..config import from_dict, read_config
from ..prompts import PromptConfig

MODES = ("sft", "knowledge", "thoughts")
TARGETS = ("truth", "closest_candidate")
ALL_LINEAR = "all-linear"  # peft's own word for it


@dataclass
class Recipe:
    name: str = "run"
    base: str = "default"  # 'default' (SmolLM2-135M-Instruct GGUF), a .gguf file, or an HF model folder
    sessions: str = ""  # sessions JSONL (train and val splits); relative paths are from the working directory
    mode: str = "sft"  # sft: session -> bundles; knowledge: pack content in the prompt; thoughts: rationale first
    pack: str = ""  # prompt pack folder (mode 'knowledge')
    thoughts: str = ""  # mode 'thoughts': a `distill` output folder or its thoughts.jsonl (else sessions' "thought")
    limit_train: int = 0  # use only the first N training sessions (0: all)
    shuffled_copies: int = 0  # extra copies of each training session, items in a new seeded order (augmentation)
    max_len: int = 512  # tokens per example/packed row; longer examples are dropped whole, never cut
    title_chars: int = PromptConfig.title_chars  # item titles cut (at a word) to this many characters
    instructions: bool = True  # false: the system message without the task and answer contract (shorter)
    answer_format: str = PromptConfig.answer_format  # json | compact: what the student learns to write (prompts.py)
    packing: bool = True  # pack short examples into rows of max_len (attention stays within an example)
    # truth: learn the true bundles; closest_candidate: learn the pack's candidate partition closest to
    # them (train/sft.py), for a compact student whose runtime ranks those candidates
    target: str = "truth"
    recombined: int = 0  # more training sessions made from train bundles and loose items (sft.recombined_sessions)
    # > 0: add the listwise loss over the pack's candidate partitions (train/model.rank_loss), this
    # much per ranking example, `rank_per_step` examples a step, at the runtime's temperature `rank_temperature`
    rank_weight: float = 0.0
    rank_per_step: int = 4
    rank_temperature: float = 2.0
    init_adapter: str = ""  # start from this adapter: a peft folder, or a GGUF adapter over the same base

    # LoRA
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    # ["all-linear"]: every linear layer but the output head, whatever the architecture calls them
    # (q_proj ... down_proj in Llama/Qwen/Gemma/Mistral, qkv_proj and gate_up_proj in Phi-3); or names
    target_modules: list[str] = field(default_factory=lambda: [ALL_LINEAR])
    qlora: bool = False  # 4-bit NF4 base with bitsandbytes (CUDA, or its CPU backend); the LoRA stays float

    # optimisation
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 10
    epochs: int = 1
    max_steps: int = 0  # optimizer steps; 0: as many as `epochs` take
    max_minutes: float = 0.0  # wall-clock budget: stop (evaluate, keep the best) after this; 0: none
    batch_size: int = 4  # rows per micro-batch (per process)
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32
    threads: int = 0  # CPU threads for torch; 0: torch's default

    # evaluation, checkpoints, logging
    eval_sessions: int = 16  # val sessions (spread evenly over the split) generated and scored at each evaluation
    eval_every: int = 0  # optimizer steps between evaluations; 0: at the end of each epoch
    eval_max_tokens: int = 0  # cap on generated tokens per val session; 0: the output contract's bound
    save_every: int = 50  # optimizer steps between resumable checkpoints
    log_every: int = 1

    def to_dict(self) -> dict:
        return asdict(self)

    def lora_targets(self) -> str | list[str]:
        """`target_modules` as peft takes it: its word 'all-linear' alone, or the module names."""
        return ALL_LINEAR if self.target_modules == [ALL_LINEAR] else list(self.target_modules)

    def prompt_config(self) -> PromptConfig:
        """How the student sees a session: recorded with the run, used again by export and the runtime."""
        return PromptConfig(
            title_chars=self.title_chars, instructions=self.instructions, answer_format=self.answer_format
        )


def recipe_from_dict(obj: dict, where: str = "recipe") -> Recipe:
    recipe = from_dict(Recipe, obj, where)
    if recipe.mode not in MODES:
        raise BkdError(f"{where}: mode {recipe.mode!r} is not one of {', '.join(MODES)}")
    if recipe.mode == "knowledge" and not recipe.pack:
        raise BkdError(f"{where}: mode 'knowledge' needs `pack` (a prompt pack folder)")
    if recipe.target not in TARGETS:
        raise BkdError(f"{where}: target {recipe.target!r} is not one of {', '.join(TARGETS)}")
    if recipe.target == "closest_candidate" and (recipe.mode != "knowledge" or recipe.answer_format != "compact"):
        raise BkdError(f"{where}: target 'closest_candidate' needs mode 'knowledge' and answer_format 'compact'")
    if recipe.rank_weight and (recipe.mode != "knowledge" or recipe.answer_format != "compact"):
        raise BkdError(f"{where}: rank_weight needs mode 'knowledge' and answer_format 'compact' (candidates to rank)")
    if recipe.rank_weight < 0 or recipe.recombined < 0 or recipe.rank_temperature <= 0:
        raise BkdError(f"{where}: rank_weight and recombined must be >= 0, rank_temperature > 0")
    if ALL_LINEAR in recipe.target_modules and len(recipe.target_modules) > 1:
        raise BkdError(f"{where}: target_modules: '{ALL_LINEAR}' stands alone, or list module names")
    if recipe.device not in ("auto", "cpu", "cuda"):
        raise BkdError(f"{where}: device {recipe.device!r} is not one of auto, cpu, cuda")
    if recipe.precision not in ("auto", "bf16", "fp32"):
        raise BkdError(f"{where}: precision {recipe.precision!r} is not one of auto, bf16, fp32")
    try:
        recipe.prompt_config()
    except BkdError as e:
        raise BkdError(f"{where}: {e}") from None
    for key in ("max_len", "batch_size", "grad_accum", "epochs", "lora_r", "title_chars", "rank_per_step"):
        if getattr(recipe, key) < 1:
            raise BkdError(f"{where}: {key} must be >= 1")
    return recipe


def load_recipe(path: str | Path, overrides: dict | None = None) -> Recipe:
    """Read a .toml or .json recipe; `overrides` (from the command line) win over the file."""
    obj = read_config(path, "recipe")
    obj.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return recipe_from_dict(obj, str(path))
