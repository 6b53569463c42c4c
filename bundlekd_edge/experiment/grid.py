"""`bkd-edge experiment GRID`: the paper's three research questions as one resumable run.

A grid file names a base cell and the values each factor sweeps over:

    sessions = "data/electronic.jsonl"
    spread = 40                     # test sessions scored per cell, spread evenly over the split
    teacher = "gguf:default"        # the distillation teacher (URL, gguf:PATH, or gguf:qwen1.5b: a real local one)
    sft_recipe = "train/cpu-smollm2.toml"   # how each SFT cell's student is trained
    baselines = ["whole", "apriori", "cluster"]
    [base]
    formats = "rules"  sampling = "random"  ratio = 0.1  use = "icl"
    [sweep]
    formats = ["none", "examples", "patterns", "rules", "thoughts", "patterns,rules,thoughts"]
    sampling = ["random", "length", "diversity"]
    ratio = [0.05, 0.1]
    use = ["icl", "sft", "sft+icl"]

Three tables come out, each for every use swept: knowledge format (RQ1: formats swept, the rest at
base), quantity (RQ2: every sampling x ratio) and utilisation (RQ3: the uses at the base cell).
Format "none" is no pack at all, "examples" a pack of retrieved training sessions without distilled
knowledge. Uses: `icl` asks the untuned student with the cell's pack; `sft` trains a student on the
cell's knowledge (one per format x sampling x ratio: LoRA on the sessions that sampling picked, the
cell's pack in every training prompt; format "none" trains on the bare sessions) and asks it
without the pack; `sft+icl` asks that student with the pack. Reference rows on the same sessions:
the untuned student without a pack, the teacher (with the base cell's pack) and the non-LLM
baselines. Every strict F1 has a bootstrap interval over the scored sessions, and each row's
difference from its table's best says whether it is inside the noise.

Every step is a `bkd-edge` command in its own process and leaves a finished artifact: knowledge per
(sampling, ratio) (its teacher calls cached in GRID_OUT/teacher-cache and shared by all cells),
packs, one trained and exported student per SFT cell (cached by the hash of its inputs) and one
result.json per cell. A rerun skips whatever is finished, so an interrupted experiment resumes.
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
    use: str = "icl"  # icl: the untuned student with the pack; sft: a student trained on it, no pack; sft+icl: both

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
    def student_name(self) -> str:
        """The trained student of an SFT cell: one per knowledge and quantity (training sessions)."""
        return f"{self.formats.replace(',', '+')}@{self.quantity}"

    @property
    def name(self) -> str:
        if self.use == "icl":
            return f"icl__{self.pack_name if self.has_pack else 'no-pack'}"
        return f"{self.use}__{self.student_name}" + ("" if self.has_pack or self.use == "sft" else "__no-pack")


@dataclass
class Grid:
    sessions: str = ""
    split: str = "test"
    spread: int = 0  # sessions of the split scored per cell, spread evenly over it (0: all)
    teacher: str = "gguf:default"
    teacher_label: str = ""  # how tables name the teacher row; default: "teacher", the local teacher's own
    # label for gguf:qwen1.5b, "teacher stand-in" for any other gguf:
    teacher_api_key_env: str = "OPENAI_API_KEY"  # the NAME of the variable holding a URL teacher's key
    student: str = "base"  # the untuned student of the ICL cells (`default` is the shipped, tuned one)
    sft_recipe: str = ""  # the training recipe of every SFT cell's student (mode, pack, sessions set per cell)
    sft_max_steps: int = 0  # override the recipe's steps (0: the recipe's)
    sft_model: str = ""  # instead: one fine-tuned student reused by every SFT cell (not trained on the knowledge)
    baselines: list[str] = field(default_factory=lambda: ["whole", "apriori", "cluster"])
    k: int = 1  # retrieved examples per prompt
    static_budget: int = 1200  # tokens of static knowledge in a pack
    seed: int = 0
    n_ctx: int = 2048
    bootstrap: int = 2000  # resamples of the scored sessions for the intervals
    base: Cell = field(default_factory=Cell)
    sweep: dict = field(default_factory=dict)  # factor -> values

    def cells(self) -> dict[str, list[Cell]]:
        """The cells of each table, base cell included, in sweep order, for every use swept."""
        s = self.sweep
        uses = s.get("use", [self.base.use])
        formats = s.get("formats", [self.base.formats])
        samplings, ratios = s.get("sampling", [self.base.sampling]), s.get("ratio", [self.base.ratio])
        return {
            "format": [replace(self.base, formats=f, use=u) for f in formats for u in uses],
            "quantity": [
                replace(self.base, sampling=m, ratio=float(r), use=u) for m in samplings for r in ratios for u in uses
            ],  # fmt: skip
            "utilisation": [replace(self.base, use=u) for u in uses],
        }

    @property
    def teacher_name(self) -> str:
        from ..runtime.teacher_file import teacher_label

        if self.teacher_label or not self.teacher.startswith("gguf:"):
            return self.teacher_label or "teacher"
        return teacher_label(self.teacher) or "teacher stand-in"  # a real local teacher names itself


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
    from ..baselines import BASELINES

    for name in grid.baselines:
        if name not in BASELINES:
            raise BkdError(f"{path}: baselines: unknown {name!r} (choose from {', '.join(BASELINES)})")
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
            raise BkdError("the grid's SFT cells need `sft_recipe` (how to train each cell's student) or `sft_model`")
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
        """One knowledge folder per quantity, with every format some cell of that quantity needs
        (patterns at least: mined, no teacher call, and its manifest names the sampled sessions)."""
        want = sorted({f for cs in self.grid.cells().values() for c in cs if c.quantity == cell.quantity
                       for f in c.distilled} or {"patterns"})  # fmt: skip
        folder = self.out / "knowledge" / cell.quantity
        done = folder / "manifest.json"
        if done.is_file() and {f"{f}.jsonl" for f in want} <= set(json.loads(done.read_text()).get("records", {})):
            return folder
        self.say(f"distil {','.join(want)} from {cell.quantity} of the train split")
        g = self.grid
        _bkd(["distill", "--teacher", g.teacher, "--api-key-env", g.teacher_api_key_env, "--sessions", g.sessions,
              "--formats", ",".join(want),
              "--sampling", cell.sampling, "--ratio", cell.ratio, "--seed", g.seed, "--cache",
              self.out / "teacher-cache", "--out", folder, "--quiet"], self.log)  # fmt: skip
        return folder

    def pack(self, cell: Cell) -> Path | None:
        """The cell's pack (also what its SFT student trains with), built once."""
        if cell.formats == "none":
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

    def training_sessions(self, cell: Cell) -> Path:
        """The sessions an SFT cell's student learns from: the train sessions its quantity's sampling
        picked (those the knowledge was distilled from), and the val split to choose a checkpoint."""
        from ..data import load_sessions, write_sessions

        path = self.out / "sft" / f"sessions@{cell.quantity}.jsonl"
        if not path.is_file():
            run = json.loads((self.knowledge(cell) / "manifest.json").read_text())["runs"][-1]
            picked = set(run["sessions"]["ids"])
            rows = [s for s in load_sessions(self.grid.sessions, split="train") if s.session_id in picked]
            val = load_sessions(self.grid.sessions, split="val", empty_split_ok=True)
            write_sessions(path, rows + val)  # atomic
        return path

    def sft_inputs(self, cell: Cell):
        """(recipe, inputs): how the cell's student is trained, and everything that makes it what it is."""
        from ..files import sha256_file
        from ..train.recipe import load_recipe

        g = self.grid
        pack = self.pack(cell)
        sessions = self.training_sessions(cell)
        recipe = load_recipe(g.sft_recipe, {"sessions": str(sessions), "max_steps": g.sft_max_steps or None})
        recipe = replace(recipe, name=cell.student_name, mode="knowledge" if pack else "sft", pack=str(pack or ""))
        inputs = {"recipe": recipe.to_dict(), "sessions_sha256": sha256_file(sessions),
                  "pack_sha256": sha256_file(pack / "manifest.json") if pack else None}  # fmt: skip
        return recipe, inputs

    def sft_student(self, cell: Cell) -> str:
        """The cell's fine-tuned student: trained on its knowledge and exported once, reused while its
        inputs (recipe, sessions, pack) are the same; a changed input trains it again."""
        g = self.grid
        if g.sft_model:
            return g.sft_model
        folder = self.out / "sft" / cell.student_name
        run, export = folder / "run", folder / "export"
        recipe, inputs = self.sft_inputs(cell)
        stamp = folder / "inputs.json"
        if stamp.is_file() and json.loads(stamp.read_text()) == inputs and (export / "manifest.json").is_file():
            return str(export)
        if stamp.is_file() and json.loads(stamp.read_text()) != inputs:
            shutil.rmtree(folder)  # trained from other inputs: not this cell's student
        folder.mkdir(parents=True, exist_ok=True)
        write_json(folder / "recipe.json", recipe.to_dict())
        if not is_finished(run):
            self.say(f"train {cell.student_name} ({recipe.mode}, on {recipe.sessions})")
            _bkd(["train", folder / "recipe.json", "--out", run, *(["--resume"] if run.is_dir() else []), "--quiet"],
                 self.log)  # fmt: skip
        shutil.rmtree(export, ignore_errors=True)
        self.say(f"export {cell.student_name}")
        _bkd(["export", run, "--out", export, "--quant", "Q8_0"], self.log)
        write_json(stamp, inputs)  # last: its presence means the student is finished
        return str(export)

    def generate(self, name: str, folder: Path, model: list, pack: Path | None, extra: dict) -> dict:
        """One row: `generate` on the scored sessions into FOLDER, scored; reused while `extra` holds."""
        done = folder / "result.json"
        same = {**extra, "spread": self.grid.spread}
        if done.is_file() and {k: json.loads(done.read_text()).get(k) for k in same} == same:
            return json.loads(done.read_text())
        folder.mkdir(parents=True, exist_ok=True)
        g = self.grid
        self.say(f"run {name}")
        _bkd(["generate", *model, "--pack", pack or "none", "--sessions", self.scored_sessions(), "--n-ctx", g.n_ctx,
              "--seed", g.seed, "--out", folder / "pred.jsonl", "--summary", folder / "run.json",
              "--force",  # a cell without its result.json is run again whole (its timings belong together)
              "--quiet"], self.log)  # fmt: skip
        run = json.loads((folder / "run.json").read_text())
        result = {
            **same,
            "name": name,
            "model": [str(m) for m in model],
            "pack": str(pack) if pack else None,
            "pack_tokens": json.loads((pack / "manifest.json").read_text())["tokens"] if pack else None,
            "latency": {k: run[k] for k in ("latency_p50_s", "latency_p95_s", "prompt_tokens_mean")},
            **self.score(folder / "pred.jsonl"),
        }
        write_json(done, result)
        return result

    def score(self, pred_path: Path) -> dict:
        """Quality, and the per-session strict precision and recall the intervals are drawn from."""
        from ..data import load_sessions
        from ..metrics import evaluate, load_predictions, strict_by_session

        gold, preds = load_sessions(self.scored_sessions()), load_predictions(pred_path)
        return {"quality": evaluate(gold, preds), "strict_by_session": strict_by_session(gold, preds).tolist()}

    def run_cell(self, cell: Cell) -> dict:
        from ..files import sha256_file

        if cell.use == "sft+icl" and not cell.has_pack:  # format none: the same student and prompt as sft
            return {**self.run_cell(replace(cell, use="sft")), "cell": asdict(cell), "name": cell.name}
        pack = self.pack(cell) if cell.has_pack else None
        model = self.grid.student if cell.use == "icl" else self.sft_student(cell)
        manifest = Path(model) / "manifest.json"  # a retrained student is another student: its cells run again
        extra = {"cell": asdict(cell), "student": model,
                 "student_sha256": sha256_file(manifest) if manifest.is_file() else None}  # fmt: skip
        return self.generate(cell.name, self.out / "cells" / cell.name, ["--model", model], pack, extra)

    def references(self) -> list[dict]:
        """The rows every table is read against: untuned student, teacher, non-LLM baselines."""
        g = self.grid
        untuned = self.run_cell(replace(g.base, formats="none", use="icl"))  # RQ1's none/icl cell when swept
        rows = [{**untuned, "row": f"untuned {g.student}, no pack"}]
        teacher = g.teacher.removeprefix("gguf:")
        if teacher.startswith(("http://", "https://")):
            model = ["--model", teacher, "--student", "base", "--constraint", "json-schema",
                     "--api-key-env", g.teacher_api_key_env]  # fmt: skip
        else:
            model = ["--model", "base" if teacher == "default" else teacher]
        pack = self.pack(g.base) if g.base.formats != "none" else None
        row = self.generate("teacher", self.out / "rows" / "teacher", model, pack, {"teacher": g.teacher})
        rows.append({**row, "row": f"{g.teacher_name} ({g.teacher}), pack {g.base.pack_name}"})
        for name in g.baselines:
            rows.append({**self.baseline(name), "row": f"baseline {name}"})
        return rows

    def baseline(self, name: str) -> dict:
        """A non-LLM baseline fitted on the train split, scored on the same sessions (milliseconds: not cached)."""
        from ..baselines import make_baseline
        from ..data import load_sessions
        from ..files import write_jsonl

        gold = load_sessions(self.scored_sessions())
        baseline = make_baseline(name).fit(load_sessions(self.grid.sessions, split="train"))
        path = self.out / "rows" / f"baseline-{name}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_jsonl(path, ({"session_id": s.session_id, "bundles": baseline.predict(s), "valid": True} for s in gold))
        return {"name": name, "baseline": baseline.describe(), "latency": None, **self.score(path)}

    def run(self) -> dict:
        t0 = time.perf_counter()
        tables = {name: [self.run_cell(c) for c in cells] for name, cells in self.grid.cells().items()}
        references = self.references()
        intervals(tables, references, self.grid.bootstrap, self.grid.seed)
        report = {"grid": asdict(self.grid), "tables": tables, "references": references,
                  "seconds": time.perf_counter() - t0}  # fmt: skip
        write_json(self.out / "results.json", report)
        with atomic_write(self.out / "results.md") as f:
            f.write(markdown(report))
        plot(report, self.out / "experiment.png")
        return report


def intervals(tables: dict[str, list[dict]], references: list[dict], n: int, seed: int) -> None:
    """Each row's strict F1 interval, and its difference from the best row of its table (paired by
    session): `within_noise` when that interval holds 0. Rows are changed in place."""
    import numpy as np

    from ..metrics import bootstrap_strict_f1

    def versus(r: dict, other: dict) -> dict:
        a, b = np.array(r["strict_by_session"]), np.array(other["strict_by_session"])
        lo, hi = bootstrap_strict_f1(a, b, n=n, seed=seed)
        return {"other": other["name"], "diff_ci": [lo, hi], "within_noise": lo <= 0 <= hi}

    for rows in [*tables.values(), references]:
        best = max(rows, key=lambda r: r["quality"]["strict_f1"])
        for r in rows:
            r["strict_f1_ci"] = bootstrap_strict_f1(np.array(r["strict_by_session"]), n=n, seed=seed)
            if r is not best:
                r["vs_best"] = versus(r, best)
    # RQ1's distilled formats against retrieval alone (the `examples` cell of the same use): what the
    # knowledge adds beyond the retrieved example every pack also carries.
    examples = {r["cell"]["use"]: r for r in tables.get("format", []) if r["cell"]["formats"] == "examples"}
    for r in tables.get("format", []):
        if r["cell"]["formats"] not in ("none", "examples") and r["cell"]["use"] in examples:
            r["vs_examples"] = versus(r, examples[r["cell"]["use"]])


# ---------------------------------------------------------------- tables and plot


def _diff(versus: dict | None, missing: str) -> str:
    if versus is None:
        return missing
    lo, hi = versus["diff_ci"]
    return f"[{lo:+.3f}, {hi:+.3f}]" + (" noise" if versus["within_noise"] else "")


def _row(r: dict, **extra) -> dict:
    q, lat = r["quality"], r.get("latency") or {}
    lo, hi = r["strict_f1_ci"]
    return {**extra, "strict_f1": q["strict_f1"], "ci": f"[{lo:.3f}, {hi:.3f}]",
            "vs_best": _diff(r.get("vs_best"), "best"), "vs_examples": _diff(r.get("vs_examples"), ""),
            "exact_match": q["exact_match"], "precision": q["precision"], "recall": q["recall"],
            "coverage": q["coverage"], "prompt_tokens": lat.get("prompt_tokens_mean"),
            "latency_p50_s": lat.get("latency_p50_s")}  # fmt: skip


SCORE_COLUMNS = [
    ("strict_f1", "strict F1", ".3f"),
    ("ci", "95% CI", ""),
    ("vs_best", "minus best: 95% CI", ""),
    ("exact_match", "exact", ".3f"),
    ("precision", "paper P", ".3f"),
    ("recall", "paper R", ".3f"),
    ("coverage", "coverage", ".3f"),
    ("prompt_tokens", "prompt tokens", ".0f"),
    ("latency_p50_s", "latency p50 (s)", ".2f"),
]


def _cell_table(rows: list[dict], *factors: str, extra_columns=()) -> str:
    return table([_row(r, **{f: r["cell"][f] for f in factors}) for r in rows], [(f, f, "") for f in factors]
                 + SCORE_COLUMNS[:3] + list(extra_columns) + SCORE_COLUMNS[3:])  # fmt: skip


def markdown(report: dict) -> str:
    g, t = report["grid"], report["tables"]
    base = g["base"]
    from ..runtime.teacher_file import teacher_label

    stand_in = g["teacher"].startswith("gguf:") and not (g["teacher_label"] or teacher_label(g["teacher"]))
    if g["sft_model"]:
        sft = f"`{g['sft_model']}` reused by every SFT cell (not knowledge-trained)"
    elif g["sft_recipe"]:
        steps = f" ({g['sft_max_steps']} steps)" if g["sft_max_steps"] else ""
        sft = f"trained per cell from `{g['sft_recipe']}`{steps}"
    else:
        sft = "none (no SFT cell)"
    out = [
        "# bkd-edge experiment" + (" (teacher stand-in)" if stand_in else ""),
        "",
        f"Sessions `{g['sessions']}`, split `{g['split']}`"
        + (f" ({g['spread']} sessions spread evenly over it)" if g["spread"] else "")
        + f"; teacher `{g['teacher']}`"
        + (" — a stand-in, not a real teacher" if stand_in else "")
        + f"; untuned student `{g['student']}`; SFT students {sft}; k={g['k']} retrieved examples. Base cell: "
        f"formats `{base['formats']}`, sampling `{base['sampling']}` at ratio {base['ratio']:g}, use "
        f"`{base['use']}`. Took {report['seconds'] / 60:.1f} min (finished steps reused).",
        "",
        "Uses: `icl` the untuned student with the cell's pack; `sft` a student LoRA-trained on the sessions the "
        "cell's sampling picked, with the cell's pack in its training prompts (format `none`: bare sessions), "
        "asked without the pack; `sft+icl` the same student with the pack. 95% CI: percentile bootstrap over "
        f"the scored sessions ({g['bootstrap']} resamples); 'minus best' is the paired interval of the "
        "difference from the table's best row, marked `noise` when it holds 0; in RQ1, 'minus examples-only' "
        "is the same against the retrieval-only pack of the same use: what the distilled knowledge adds.",
        "",
        "## Reference rows" + (" (teacher stand-in)" if stand_in else ""),
        "",
        table([_row(r, row=r["row"]) for r in report["references"]], [("row", "row", "")] + SCORE_COLUMNS),
        "",
        "## Knowledge format (RQ1)",
        "",
        _cell_table(t["format"], "formats", "use", extra_columns=[("vs_examples", "minus examples-only: 95% CI", "")]),
        "",
        "## Knowledge quantity (RQ2)",
        "",
        _cell_table(t["quantity"], "sampling", "ratio", "use"),
        "",
    ]
    ratios = sorted({r["cell"]["ratio"] for r in t["quantity"]})
    by = {}
    for r in t["quantity"]:
        key = f"{r['cell']['sampling']} / {r['cell']['use']}"
        by.setdefault(key, {})[f"{r['cell']['ratio']:g}"] = r["quality"]["strict_f1"]
    cols = [("sampling", "sampling / use", "")] + [(f"{x:g}", f"ratio {x:g}", ".3f") for x in ratios]
    out += ["Strict F1 by ratio:", "", table([{"sampling": m, **v} for m, v in by.items()], cols), ""]
    out += ["## Knowledge utilisation (RQ3)", "", _cell_table(t["utilisation"], "use")]
    out += ["", "![experiment](experiment.png)", ""]
    return "\n".join(out)


def plot(report: dict, path: Path) -> None:
    """Strict F1 with its 95% interval: RQ1 by format, RQ2 by ratio, RQ3 by use, one colour a use;
    the reference rows are dashed lines across every panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from ..bench.report import save_png

    t = report["tables"]
    uses = list(dict.fromkeys(r["cell"]["use"] for r in t["utilisation"]))
    colours = dict(zip(USES, ("tab:blue", "tab:green", "tab:purple")))

    def err(rows):
        f1 = np.array([r["quality"]["strict_f1"] for r in rows])
        ci = np.array([r["strict_f1_ci"] for r in rows]).reshape(-1, 2)
        return f1, np.vstack([f1 - ci[:, 0], ci[:, 1] - f1])

    fig, axes = plt.subplots(1, 3, figsize=(16, 5))
    formats = list(dict.fromkeys(r["cell"]["formats"] for r in t["format"]))
    width = 0.8 / len(uses)
    for j, use in enumerate(uses):
        rows = [next(r for r in t["format"] if r["cell"]["formats"] == f and r["cell"]["use"] == use) for f in formats]
        f1, e = err(rows)
        axes[0].barh(np.arange(len(formats)) + j * width, f1, width, xerr=e, color=colours[use], label=use, capsize=2)
    axes[0].set_yticks(np.arange(len(formats)) + width * (len(uses) - 1) / 2, [f.replace(",", "+") for f in formats])
    axes[0].invert_yaxis()
    axes[0].set_title("RQ1: knowledge format")
    axes[0].set_xlabel("strict F1")
    axes[0].set_xlim(0, 1)  # every panel on the full 0..1 scale: small differences look small
    for use in uses:
        for m in dict.fromkeys(r["cell"]["sampling"] for r in t["quantity"]):
            rows = sorted((r for r in t["quantity"] if r["cell"]["use"] == use and r["cell"]["sampling"] == m),
                          key=lambda r: r["cell"]["ratio"])  # fmt: skip
            f1, e = err(rows)
            axes[1].errorbar([r["cell"]["ratio"] for r in rows], f1, yerr=e, marker="o", capsize=2,
                             color=colours[use], linestyle="-" if m == t["quantity"][0]["cell"]["sampling"] else ":",
                             label=f"{m} / {use}")  # fmt: skip
    axes[1].set_title("RQ2: knowledge quantity")
    axes[1].set_xlabel("ratio of training sessions distilled")
    axes[1].set_ylim(0, 1)
    axes[1].grid(True, alpha=0.3)
    f1, e = err(t["utilisation"])
    bars = axes[2].bar(uses, f1, yerr=e, color=[colours[u] for u in uses], capsize=3)
    axes[2].bar_label(bars, fmt="%.3f", fontsize=7, padding=2)
    axes[2].set_title("RQ3: knowledge utilisation")
    axes[2].set_ylim(0, 1)
    for r, style in zip(report["references"], ("--", "-.", ":", (0, (1, 3)), (0, (5, 5)))):
        f = r["quality"]["strict_f1"]
        axes[0].axvline(f, color="grey", linestyle=style, linewidth=1, label=r["row"][:28])
        for ax in axes[1:]:
            ax.axhline(f, color="grey", linestyle=style, linewidth=1)
    axes[0].legend(fontsize=7, loc="lower right")
    axes[1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    save_png(fig, path)
    plt.close(fig)
