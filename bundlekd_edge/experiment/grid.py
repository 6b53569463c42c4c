"""`bkd-edge experiment GRID`: the paper's three research questions as one resumable run.

A grid file names a base cell and the values each factor sweeps over:

    sessions = "data/electronic.jsonl"
    spread = 40                     # test sessions scored per cell, spread evenly over the split
    teacher = "gguf:default"        # the distillation teacher (URL or gguf:PATH)
    sft_model = "runs/export"       # a fine-tuned student to reuse for the SFT cells ...
    # sft_recipe = "train/cpu-smollm2.toml"   # ... or one to train (sft_max_steps) and export once
    [base]
    formats = "rules"  sampling = "random"  ratio = 0.1  use = "icl"
    [sweep]
    formats = ["none", "examples", "patterns", "rules", "thoughts", "patterns,rules,thoughts"]
    sampling = ["random", "length", "diversity"]
    ratio = [0.05, 0.1]
    use = ["icl", "sft", "sft+icl"]

Three tables come out: knowledge format (RQ1: formats swept, the rest at base), quantity (RQ2: every
sampling x ratio, base format) and utilisation (RQ3: use swept). Format "none" is no pack at all,
"examples" a pack of retrieved training sessions without distilled knowledge. Every step is a
`bkd-edge` command in its own process and leaves a finished artifact: knowledge per (sampling,
ratio) (its teacher calls cached in GRID_OUT/teacher-cache and shared by all cells), packs, the SFT
export, and one result.json per cell. A rerun skips whatever is finished, so an interrupted
experiment resumes where it stopped.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from .. import BkdError
from ..config import from_dict, read_config
from ..files import atomic_write, write_json
from ..knowledge.sampling import STRATEGIES
from ..tables import table
from ..train.run_folder import is_finished

KNOWLEDGE = ("patterns", "rules", "thoughts")
USES = ("icl", "sft", "sft+icl")


@dataclass(frozen=True)
class Cell:
    formats: str = "rules"  # "none", "examples", or a comma list of patterns, rules, thoughts
    sampling: str = "random"
    ratio: float = 0.1
    use: str = "icl"  # icl: the untuned student with the pack; sft: the fine-tuned one, no pack; sft+icl: both

    @property
    def distilled(self) -> list[str]:
        return [f for f in self.formats.split(",") if f in KNOWLEDGE]

    @property
    def has_pack(self) -> bool:
        return self.use != "sft" and self.formats != "none"

    @property
    def quantity(self) -> str:
        return f"{self.sampling}-{self.ratio:g}"

    @property
    def pack_name(self) -> str:
        return f"{self.formats.replace(',', '+')}@{self.quantity}" if self.distilled else self.formats

    @property
    def name(self) -> str:
        return f"{self.use}__{self.pack_name if self.has_pack else 'no-pack'}"


@dataclass
class Grid:
    sessions: str = ""
    split: str = "test"
    spread: int = 0  # sessions of the split scored per cell, spread evenly over it (0: all)
    teacher: str = "gguf:default"
    student: str = "base"  # the untuned student of the ICL cells (`default` is the shipped, tuned one)
    sft_model: str = ""  # fine-tuned student for the SFT cells: EXPORT_DIR[:QUANT] or a .gguf (reused)
    sft_recipe: str = ""  # ... or a training recipe, trained and exported once into GRID_OUT/sft
    sft_max_steps: int = 0  # override the recipe's steps (0: the recipe's)
    k: int = 1  # retrieved examples per prompt
    static_budget: int = 1200  # tokens of static knowledge in a pack
    seed: int = 0
    n_ctx: int = 2048
    base: Cell = field(default_factory=Cell)
    sweep: dict = field(default_factory=dict)  # factor -> values

    def cells(self) -> dict[str, list[Cell]]:
        """The cells of each table, base cell included, in sweep order."""
        s = self.sweep
        samplings, ratios = s.get("sampling", [self.base.sampling]), s.get("ratio", [self.base.ratio])
        quantity = [replace(self.base, sampling=m, ratio=float(r)) for m in samplings for r in ratios]
        return {
            "format": [replace(self.base, formats=f) for f in s.get("formats", [self.base.formats])],
            "quantity": quantity,
            "utilisation": [replace(self.base, use=u) for u in s.get("use", [self.base.use])],
        }


def _check_cell(cell: Cell, where: str) -> None:
    parts = cell.formats.split(",")
    if cell.formats not in ("none", "examples") and (not parts or any(p not in KNOWLEDGE for p in parts)):
        known = f"'none', 'examples' or a comma list of {', '.join(KNOWLEDGE)}"
        raise BkdError(f"{where}: formats {cell.formats!r}: {known}")
    if cell.sampling not in STRATEGIES:
        raise BkdError(f"{where}: sampling {cell.sampling!r}: choose from {', '.join(STRATEGIES)}")
    if not 0 < cell.ratio <= 1:
        raise BkdError(f"{where}: ratio {cell.ratio} must be in (0, 1]")
    if cell.use not in USES:
        raise BkdError(f"{where}: use {cell.use!r}: choose from {', '.join(USES)}")


def load_grid(path: str | Path) -> Grid:
    obj = read_config(path, "grid")
    base = from_dict(Cell, obj.pop("base", {}), f"{path}: [base]")
    sweep = obj.pop("sweep", {})
    known = {"formats": str, "sampling": str, "ratio": (int, float), "use": str}
    for key, values in sweep.items():
        if key not in known:
            raise BkdError(f"{path}: [sweep] unknown factor {key!r} (known: {', '.join(known)})")
        if not isinstance(values, list) or not values or not all(isinstance(v, known[key]) for v in values):
            raise BkdError(f"{path}: [sweep] {key} must be a non-empty list")
    grid = replace(from_dict(Grid, obj, str(path)), base=base, sweep=sweep)
    if not grid.sessions:
        raise BkdError(f"{path}: the grid names no `sessions` file")
    for table_cells in grid.cells().values():
        for cell in table_cells:
            _check_cell(cell, str(path))
    return grid


# ---------------------------------------------------------------- steps: each a bkd-edge command


def _bkd(args: list, log: Path) -> None:
    """Run one `bkd-edge` command in its own process; a failure names the command and its last words."""
    cmd = [sys.executable, "-m", "bundlekd_edge.cli", *[str(a) for a in args]]
    with open(log, "a") as f:
        f.write(f"$ bkd-edge {' '.join(str(a) for a in args)}\n")
        f.flush()
        proc = subprocess.run(cmd, stdout=f, stderr=f)
    if proc.returncode != 0:
        lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip() and "it/s]" not in ln]
        raise BkdError(f"`bkd-edge {args[0]}` failed (exit {proc.returncode}): {' | '.join(lines[-3:])} (log: {log})")


class Experiment:
    def __init__(self, grid: Grid, out: str | Path, say=print):
        if any(c.use != "icl" for cs in grid.cells().values() for c in cs) and not (grid.sft_model or grid.sft_recipe):
            raise BkdError("the grid's SFT cells need `sft_model` (a fine-tuned export to reuse) or `sft_recipe`")
        self.grid, self.out, self.say = grid, Path(out), say
        self.out.mkdir(parents=True, exist_ok=True)
        self.log = self.out / "experiment.log"
        self._scored_written = False

    def scored_sessions(self) -> Path:
        """The sessions every cell scores: the split, or `spread` of them spread evenly over it
        (data.spread). Written once per run, the same file for every cell."""
        from ..data import load_sessions, spread, write_sessions

        path = self.out / "scored-sessions.jsonl"
        if not self._scored_written:
            sessions = load_sessions(self.grid.sessions, split=self.grid.split)
            if not sessions:
                raise BkdError(f"{self.grid.sessions}: no sessions with split {self.grid.split!r}")
            write_sessions(path, spread(sessions, self.grid.spread))
            self._scored_written = True
        return path

    def knowledge(self, cell: Cell) -> Path:
        """One knowledge folder per quantity, with every format some cell of that quantity needs."""
        want = sorted({f for cs in self.grid.cells().values() for c in cs if c.quantity == cell.quantity
                       for f in c.distilled})  # fmt: skip
        folder = self.out / "knowledge" / cell.quantity
        done = folder / "manifest.json"
        if done.is_file() and {f"{f}.jsonl" for f in want} <= set(json.loads(done.read_text()).get("records", {})):
            return folder
        self.say(f"distil {','.join(want)} from {cell.quantity} of the train split")
        g = self.grid
        _bkd(["distill", "--teacher", g.teacher, "--sessions", g.sessions, "--formats", ",".join(want),
              "--sampling", cell.sampling, "--ratio", cell.ratio, "--seed", g.seed, "--cache",
              self.out / "teacher-cache", "--out", folder, "--quiet"], self.log)  # fmt: skip
        return folder

    def pack(self, cell: Cell) -> Path | None:
        if not cell.has_pack:
            return None
        folder = self.out / "packs" / cell.pack_name
        if (folder / "manifest.json").is_file():
            return folder
        args = ["pack", "build"]
        if cell.distilled:
            args += [self.knowledge(cell), "--formats", ",".join(cell.distilled)]
        self.say(f"pack {cell.pack_name}")
        g = self.grid
        _bkd(args + ["--sessions", g.sessions, "--model", g.student, "--k", g.k, "--static-budget", g.static_budget,
                     "--out", folder], self.log)  # fmt: skip
        return folder

    def sft_model(self) -> str:
        g = self.grid
        if g.sft_model:
            return g.sft_model
        run, export = self.out / "sft" / "run", self.out / "sft" / "export"
        if not (export / "manifest.json").is_file():
            if not is_finished(run):
                self.say(f"train {g.sft_recipe}")
                steps = ["--max-steps", g.sft_max_steps] if g.sft_max_steps else []
                resume = ["--resume"] if run.is_dir() else []
                _bkd(["train", g.sft_recipe, "--sessions", g.sessions, "--out", run, *steps, *resume, "--quiet"],
                     self.log)  # fmt: skip
            shutil.rmtree(export, ignore_errors=True)  # a failed export leaves nothing that looks complete anyway
            self.say("export the SFT student")
            _bkd(["export", run, "--out", export, "--quant", "Q4_K_M"], self.log)
        return str(export)

    def run_cell(self, cell: Cell) -> dict:
        folder = self.out / "cells" / cell.name
        done = folder / "result.json"
        same = {"cell": asdict(cell), "spread": self.grid.spread}
        if done.is_file() and {k: json.loads(done.read_text()).get(k) for k in same} == same:
            return json.loads(done.read_text())
        folder.mkdir(parents=True, exist_ok=True)
        pack = self.pack(cell)
        model = self.grid.student if cell.use == "icl" else self.sft_model()
        g = self.grid
        self.say(f"run {cell.name}")
        args = [
            "generate",
            "--model",
            model,
            "--sessions",
            self.scored_sessions(),
            "--n-ctx",
            g.n_ctx,
            "--seed",
            g.seed,
            "--out",
            folder / "pred.jsonl",
            "--summary",
            folder / "run.json",
            "--force",  # a cell without its result.json is run again whole (its timings belong together)
            "--quiet",
        ]
        if pack:
            args += ["--pack", pack]
        _bkd(args, self.log)
        from ..data import load_sessions
        from ..metrics import evaluate, load_predictions

        gold = load_sessions(self.scored_sessions())
        run = json.loads((folder / "run.json").read_text())
        result = {
            "cell": asdict(cell),
            "spread": g.spread,
            "name": cell.name,
            "model": model,
            "pack": str(pack) if pack else None,
            "pack_tokens": json.loads((pack / "manifest.json").read_text())["tokens"] if pack else None,
            "quality": evaluate(gold, load_predictions(folder / "pred.jsonl")),
            "latency": {k: run[k] for k in ("latency_p50_s", "latency_p95_s", "ttft_p50_s", "prompt_tokens_mean")},
        }
        write_json(done, result)
        return result

    def run(self) -> dict:
        t0 = time.perf_counter()
        tables = {}
        for name, cells in self.grid.cells().items():
            tables[name] = [self.run_cell(c) for c in cells]
        report = {"grid": asdict(self.grid), "tables": tables, "seconds": time.perf_counter() - t0}
        write_json(self.out / "results.json", report)
        with atomic_write(self.out / "results.md") as f:
            f.write(markdown(report))
        plot(report, self.out / "experiment.png")
        return report


# ---------------------------------------------------------------- tables and plot


def _row(r: dict, **extra) -> dict:
    q, lat = r["quality"], r["latency"]
    return {**extra, "strict_f1": q["strict_f1"], "exact_match": q["exact_match"], "precision": q["precision"],
            "recall": q["recall"], "coverage": q["coverage"], "prompt_tokens": lat["prompt_tokens_mean"],
            "latency_p50_s": lat["latency_p50_s"]}  # fmt: skip


SCORE_COLUMNS = [
    ("strict_f1", "strict F1", ".3f"),
    ("exact_match", "exact", ".3f"),
    ("precision", "paper P", ".3f"),
    ("recall", "paper R", ".3f"),
    ("coverage", "coverage", ".3f"),
    ("prompt_tokens", "prompt tokens", ".0f"),
    ("latency_p50_s", "latency p50 (s)", ".2f"),
]


def markdown(report: dict) -> str:
    g, t = report["grid"], report["tables"]
    base = g["base"]
    out = [
        "# bkd-edge experiment",
        "",
        f"Sessions `{g['sessions']}`, split `{g['split']}`"
        + (f" ({g['spread']} sessions spread evenly over it)" if g["spread"] else "")
        + f"; teacher `{g['teacher']}`; student `{g['student']}`; SFT student `{g['sft_model'] or 'trained here'}`; "
        f"k={g['k']} retrieved examples. Base cell: formats `{base['formats']}`, sampling `{base['sampling']}` at "
        f"ratio {base['ratio']:g}, use `{base['use']}`. Took {report['seconds'] / 60:.1f} min (finished steps reused).",
        "",
        "## Knowledge format (RQ1)",
        "",
        table(
            [_row(r, formats=r["cell"]["formats"]) for r in t["format"]], [("formats", "formats", "")] + SCORE_COLUMNS
        ),  # fmt: skip
        "",
        "## Knowledge quantity (RQ2): strict F1 by sampling strategy and ratio",
        "",
    ]
    ratios = sorted({r["cell"]["ratio"] for r in t["quantity"]})
    by = {}
    for r in t["quantity"]:
        by.setdefault(r["cell"]["sampling"], {})[f"{r['cell']['ratio']:g}"] = r["quality"]["strict_f1"]
    cols = [("sampling", "sampling", "")] + [(f"{x:g}", f"ratio {x:g}", ".3f") for x in ratios]
    out += [table([{"sampling": m, **v} for m, v in by.items()], cols), ""]
    out += ["## Knowledge utilisation (RQ3)", ""]
    out += [table([_row(r, use=r["cell"]["use"]) for r in t["utilisation"]], [("use", "use", "")] + SCORE_COLUMNS)]
    out += ["", "![experiment](experiment.png)", ""]
    return "\n".join(out)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..bench.report import save_png

    t = report["tables"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    ax = axes[0]
    names = [r["cell"]["formats"].replace(",", "+") for r in t["format"]]
    ax.barh(names, [r["quality"]["strict_f1"] for r in t["format"]], color="tab:blue", label="strict F1")
    ax.barh(names, [r["quality"]["exact_match"] for r in t["format"]], color="tab:orange", height=0.4, label="exact")
    ax.bar_label(ax.containers[0], fmt="%.3f", fontsize=7, padding=2)
    ax.invert_yaxis()
    ax.set_title("RQ1: knowledge format")
    ax.set_xlabel("score")
    ax.set_xlim(0, 1)  # every panel on the full 0..1 scale: small differences look small
    ax.legend(fontsize=8, loc="lower right")
    ax = axes[1]
    curves = {}
    for r in t["quantity"]:
        curves.setdefault(r["cell"]["sampling"], []).append((r["cell"]["ratio"], r["quality"]["strict_f1"]))
    for m, pts in curves.items():
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m)
    ax.set_title("RQ2: knowledge quantity")
    ax.set_xlabel("ratio of training sessions distilled")
    ax.set_ylabel("strict F1")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(True, alpha=0.3)
    ax = axes[2]
    uses = [r["cell"]["use"] for r in t["utilisation"]]
    ax.bar(uses, [r["quality"]["strict_f1"] for r in t["utilisation"]], color="tab:blue", label="strict F1")
    ax.bar(uses, [r["quality"]["exact_match"] for r in t["utilisation"]], color="tab:orange", width=0.4,
           label="exact")  # fmt: skip
    ax.bar_label(ax.containers[0], fmt="%.3f", fontsize=7, padding=2)
    ax.set_title("RQ3: knowledge utilisation")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    save_png(fig, path)
    plt.close(fig)
