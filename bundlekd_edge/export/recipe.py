"""Export recipes: which quants to make and how strict the parity gate is, as TOML files under the
top-level `export/` folder (as training recipes live under `train/`).

    quants = ["Q8_0", "Q4_K_M"]   # llama.cpp quant types written next to the f16 conversion
    golden = 8                    # val sessions in the parity check
    gen_max_tokens = 0            # cap on generated tokens per golden session (0: the answer contract's)
    keep_f16 = false              # also ship model-F16.gguf
    ollama = true                 # write the Ollama Modelfiles
    drop_failing_quants = false   # leave out a quant below the gate instead of failing (--quant auto)

    [gate]                        # parity thresholds per stage (parity.Gate)
    quant_top1 = 0.8
    quant_bundles = 0.5
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from .. import BkdError
from ..config import from_dict, read_config
from .parity import Gate
from .quantize import DEFAULT_QUANTS, check_quants


@dataclass
class ExportRecipe:
    quants: list[str] = field(default_factory=lambda: list(DEFAULT_QUANTS))
    golden: int = 8
    gen_max_tokens: int = 0
    keep_f16: bool = False
    ollama: bool = True
    drop_failing_quants: bool = False  # a quant below the gate is left out instead of failing the export
    gate: Gate = field(default_factory=Gate)

    def __post_init__(self):
        self.quants = check_quants(self.quants)
        if not self.quants:
            raise BkdError("an export needs at least one quant type")
        if self.golden < 1:
            raise BkdError(f"golden {self.golden}: the parity check needs at least 1 session")
        if self.gen_max_tokens < 0:
            raise BkdError(f"gen_max_tokens {self.gen_max_tokens}: must be >= 0 (0: the answer contract's)")
        for name, value in asdict(self.gate).items():
            if not 0.0 <= value <= 1.0:
                raise BkdError(f"gate.{name} {value}: a share, between 0 and 1")

    def to_dict(self) -> dict:
        return asdict(self)


# `--quant auto`: every candidate worth measuring on a CPU, F16 kept as the reference quant-pick
# compares with, and a candidate below the parity gate left out rather than failing the export.
AUTO_QUANTS = ("Q4_0", "Q4_K_S", "Q4_K_M", "Q5_K_M", "Q8_0", "F16")


def with_auto_quants(recipe: ExportRecipe) -> ExportRecipe:
    return replace(recipe, quants=list(AUTO_QUANTS), keep_f16=True, drop_failing_quants=True)


def load_export_recipe(path: str | Path) -> ExportRecipe:
    """An export recipe file, every key checked (unknown keys and wrong types name the file)."""
    obj = read_config(path, "export recipe")
    gate = obj.pop("gate", {})
    if not isinstance(gate, dict):
        raise BkdError(f"{path}: gate: a table of thresholds")
    recipe = from_dict(ExportRecipe, obj, str(path))
    recipe.gate = from_dict(Gate, gate, f"{path}: gate")
    recipe.__post_init__()  # the gate's thresholds, checked now that it is read
    return recipe
