"""Sessions, items and bundles: the JSONL layout, the BundleRec CSV layout, preprocessing, splits, stats.

A session is an ordered list of items a shopper looked at; its bundles are the ground truth
(sets of >= 2 of its items with an intent). Every loader validates as it reads and names the
file, line and field of the first problem it finds.
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
import re
from collections import defaultdict
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from . import BkdError
from .files import write_jsonl

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Item:
    id: str
    title: str = ""
    # Category paths, e.g. (("Electronics", "Camera & Photo", "Lenses"),); empty when unknown.
    categories: tuple[tuple[str, ...], ...] = ()


@dataclass(frozen=True)
class Bundle:
    items: tuple[str, ...]
    intent: str = ""


@dataclass
class Session:
    session_id: str
    items: list[Item]
    bundles: list[Bundle] = field(default_factory=list)
    split: str = ""
    # Fields we carry through untouched (e.g. "neighbors" in the Electronic file).
    extra: dict = field(default_factory=dict)

    def item_ids(self) -> list[str]:
        return [it.id for it in self.items]

    def to_dict(self) -> dict:
        d = {"session_id": self.session_id}
        if self.split:
            d["split"] = self.split
        items = []
        for it in self.items:
            row = {"id": it.id, "title": it.title}
            if it.categories:
                row["categories"] = [list(p) for p in it.categories]
            items.append(row)
        d["items"] = items
        d["bundles"] = [{"intent": b.intent, "items": list(b.items)} for b in self.bundles]
        d.update(self.extra)
        return d


def check_split(split: str | None) -> str | None:
    if split is not None and split not in SPLITS:
        raise BkdError(f"unknown split {split!r} (choose from {', '.join(SPLITS)})")
    return split


# ---------------------------------------------------------------- parsing one session


def _need(obj: dict, key: str, kind, where: str):
    if key not in obj:
        raise BkdError(f"{where}: missing field {key!r}")
    value = obj[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        names = " or ".join(_JSON_NAMES.get(k, k.__name__) for k in kinds)
        raise BkdError(f"{where}: field {key!r} must be {names}, got {_json_name(value)}")
    return value


_JSON_NAMES = {str: "a string", int: "an integer", list: "a list", dict: "an object", float: "a number"}


def _json_name(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    return _JSON_NAMES.get(type(value), type(value).__name__)


def _categories(value, where: str) -> tuple[tuple[str, ...], ...]:
    """Category paths: a list of lists of names (a list of names is one path)."""
    if value is None:
        return ()
    if not isinstance(value, list):
        raise BkdError(f"{where}: field 'categories' must be a list of category paths, got {_json_name(value)}")
    if all(isinstance(c, str) for c in value):
        return (tuple(value),) if value else ()
    if not all(isinstance(p, list) and all(isinstance(c, str) for c in p) for p in value):
        raise BkdError(f"{where}: field 'categories' must be a list of category paths (lists of names)")
    return tuple(tuple(p) for p in value)


def session_from_dict(obj, where: str, require_bundles: bool = True) -> Session:
    """Build a validated Session from one decoded JSON object; `where` is 'file:line'."""
    if not isinstance(obj, dict):
        raise BkdError(f"{where}: expected a JSON object, got {_json_name(obj)}")
    check_text(obj, where)
    sid = _need(obj, "session_id", (str, int), where)
    sid = str(sid)
    split = obj.get("split", "")
    if split and split not in SPLITS:
        raise BkdError(f"{where}: field 'split': unknown split {split!r} (choose from {', '.join(SPLITS)})")

    raw_items = _need(obj, "items", list, where)
    if not raw_items:
        raise BkdError(f"{where}: session {sid!r} has no items")
    items, seen = [], set()
    for i, it in enumerate(raw_items):
        at = f"{where}: items[{i}]"
        if not isinstance(it, dict):
            raise BkdError(f"{at}: expected an object with 'id' and 'title'")
        iid = str(_need(it, "id", (str, int), at))
        if iid in seen:
            raise BkdError(f"{at}: item {iid!r} appears twice in session {sid!r}")
        seen.add(iid)
        title = it.get("title") or ""
        if not isinstance(title, str):
            raise BkdError(f"{at}: field 'title' must be a string")
        items.append(Item(iid, title, _categories(it.get("categories"), at)))

    bundles = []
    raw_bundles = obj.get("bundles")
    if raw_bundles is None:
        if require_bundles:
            raise BkdError(f"{where}: missing field 'bundles'")
        raw_bundles = []
    if not isinstance(raw_bundles, list):
        raise BkdError(f"{where}: field 'bundles' must be a list")
    for j, b in enumerate(raw_bundles):
        at = f"{where}: bundles[{j}]"
        if not isinstance(b, dict):
            raise BkdError(f"{at}: expected an object with 'items' and 'intent'")
        raw_members = _need(b, "items", list, at)
        if not all(isinstance(x, (str, int)) and not isinstance(x, bool) for x in raw_members):
            raise BkdError(f"{at}.items: item ids must be strings or integers")
        members = [str(x) for x in raw_members]
        for x in members:
            if x not in seen:
                raise BkdError(f"{at}.items: item {x!r} is not in session {sid!r}")
        if len(set(members)) < 2:
            raise BkdError(f"{at}.items: a bundle needs at least 2 distinct items")
        intent = b.get("intent") or ""
        if not isinstance(intent, str):
            raise BkdError(f"{at}: field 'intent' must be a string, got {_json_name(intent)}")
        bundles.append(Bundle(tuple(dict.fromkeys(members)), str(intent).strip()))

    extra = {k: v for k, v in obj.items() if k not in {"session_id", "split", "items", "bundles"}}
    return Session(sid, items, bundles, split, extra)


def check_text(obj, where: str) -> None:
    """Refuse a lone surrogate (JSON's `"\\ud800"` escape): Python holds it, but it is no text, and
    UTF-8 (a tokenizer, a hash, an output file) would fail on it later, far from the input."""
    try:
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as e:
        bad = e.object[e.start : e.end].encode("unicode_escape").decode("ascii")
        raise BkdError(f"{where}: holds {bad}, a lone UTF-16 surrogate, which is not text") from None


# ---------------------------------------------------------------- JSONL


def iter_jsonl(path: str | Path):
    """Yield (line_number, decoded object) for each non-blank line, with clear errors."""
    path = Path(path)
    if not path.exists():
        raise BkdError(f"{path}: no such file")
    if path.is_dir():
        raise BkdError(f"{path}: a folder, not a JSONL file")
    with open(path, "rb") as f:
        if f.read(2) == b"\x1f\x8b":
            raise BkdError(f"{path}: a gzip file; decompress it first (gzip -dc {path.name} > sessions.jsonl)")
        f.seek(0)
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise BkdError(f"{path}:{n}: not UTF-8 text (byte {e.start + 1}); re-encode it as UTF-8") from None
            if not line.strip():
                continue
            try:
                yield n, json.loads(line)
            except json.JSONDecodeError as e:
                raise BkdError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno})") from None
            except ValueError as e:  # an integer of more than 4,300 digits (Python's conversion limit)
                raise BkdError(f"{path}:{n}: not usable JSON ({str(e).split(':')[0]})") from None
            except RecursionError:
                raise BkdError(f"{path}:{n}: JSON nested too deeply") from None


def sample_sessions_path() -> Path:
    """The built-in sample: 20 sessions the project wrote itself (not a real data set)."""
    return Path(str(resources.files("bundlekd_edge") / "sample" / "sessions.jsonl"))


def load_sessions(
    path: str | Path, split: str | None = None, require_bundles: bool = True, empty_split_ok: bool = False
) -> list[Session]:
    """Load and validate a sessions JSONL file; keep only `split` when given. An empty split is an
    error, unless `empty_split_ok` (a caller with a fallback, such as training without val)."""
    check_split(split)
    sessions, first_line = [], {}
    for n, obj in iter_jsonl(path):
        s = session_from_dict(obj, f"{path}:{n}", require_bundles)
        if s.session_id in first_line:
            raise BkdError(
                f"{path}:{n}: duplicate session_id {s.session_id!r} (first on line {first_line[s.session_id]})"
            )
        first_line[s.session_id] = n
        sessions.append(s)
    if not sessions:
        raise BkdError(f"{path}: no sessions in file")
    if split is not None:
        sessions = [s for s in sessions if s.split == split]
        if not sessions and not empty_split_ok:
            raise BkdError(f"{path}: no sessions in split {split!r}")
    return sessions


def spread(sessions: list, n: int | None) -> list:
    """`n` of the sessions spread evenly over the list (all when n is None or 0).

    Data files are often ordered (Electronic by session length), so the first n would be the easiest n."""
    n = min(n or len(sessions), len(sessions))
    return [sessions[i * len(sessions) // n] for i in range(n)]


def parse_shard(text: str) -> tuple[int, int]:
    """'K/N' -> (K, N), 0 <= K < N: the K-th of N shards."""
    k, _, n = text.partition("/")
    if not (re.fullmatch("[0-9]{1,9}", k) and re.fullmatch("[0-9]{1,9}", n)) or not 0 <= int(k) < int(n):
        raise BkdError(f"shard {text!r}: expected K/N with 0 <= K < N, e.g. 0/2")
    return int(k), int(n)


def in_shard(session_id: str, k: int, n: int) -> bool:
    """Whether a session belongs to shard k of n: by a hash of its id, so every process, machine
    and rerun agrees without talking to the others, whatever the file's order."""
    return int.from_bytes(hashlib.sha256(session_id.encode("utf-8")).digest()[:8], "big") % n == k


def write_sessions(path: str | Path, sessions: list[Session]) -> int:
    return write_jsonl(path, (s.to_dict() for s in sessions))


# ---------------------------------------------------------------- preprocessing and splits


def clean_bundles(bundles: list[Bundle]) -> list[Bundle]:
    """Drop exact duplicates (as sets) and any bundle that strictly contains another one.

    This is the preprocessing of the paper's line of work: a superset bundle adds nothing
    a model can be asked to find that its subset does not already pin down.
    """
    unique: dict[frozenset, Bundle] = {}
    for b in bundles:
        key = frozenset(b.items)
        if len(key) >= 2 and key not in unique:
            unique[key] = b
    sets = list(unique)
    return [unique[s] for s in sets if not any(o < s for o in sets)]


def split_sessions(sessions: list[Session], seed: int = 0, ratios=(0.7, 0.1, 0.2)) -> list[Session]:
    """Assign train/val/test by a seeded shuffle (the same seed always gives the same split)."""
    order = list(range(len(sessions)))
    random.Random(seed).shuffle(order)
    n_train = round(ratios[0] * len(order))
    n_val = round(ratios[1] * len(order))
    for rank, idx in enumerate(order):
        sessions[idx].split = "train" if rank < n_train else "val" if rank < n_train + n_val else "test"
    return sessions


# ---------------------------------------------------------------- BundleRec CSV layout

BUNDLEREC_FILES = {
    "session_item.csv": ("session ID", "item ID"),
    "session_bundle.csv": ("session ID", "bundle ID"),
    "bundle_item.csv": ("bundle ID", "item ID"),
    "bundle_intent.csv": ("bundle ID", "intent"),
    "item_titles.csv": ("item ID", "titles"),
    "item_categories.csv": ("item ID", "categories"),
}
OPTIONAL_FILES = {"bundle_intent.csv", "item_titles.csv", "item_categories.csv"}


def _read_pairs(path: Path, header: tuple[str, str]):
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        head = next(reader, None)
        if head is None or [h.strip() for h in head[:2]] != list(header):
            raise BkdError(f"{path}:1: expected header {','.join(header)!r}, got {','.join(head or [])!r}")
        for row in reader:
            if not row:
                continue
            if len(row) < 2:
                raise BkdError(f"{path}:{reader.line_num}: expected 2 columns, got {len(row)}")
            yield reader.line_num, row[0].strip(), row[1]


# A category string looks like "[[Electronics,Camera & Photo,Lenses],[Cell Phones,...]]".
# Names may hold ", " ("Batteries, Chargers & Accessories"), so split on commas not followed by a space.
_CATEGORY_PATH = re.compile(r"\[([^\[\]]*)\]")


def parse_categories(text: str) -> tuple[tuple[str, ...], ...]:
    paths = []
    for body in _CATEGORY_PATH.findall(text):
        parts = tuple(p.strip() for p in re.split(r",(?! )", body) if p.strip())
        if parts:
            paths.append(parts)
    return tuple(paths)


def import_bundlerec(folder: str | Path, seed: int = 0, prefix: str = "") -> tuple[list[Session], dict]:
    """Read a BundleRec domain folder and apply the paper's preprocessing.

    Returns the sessions (with a seeded 70/10/20 split) and a report of what was dropped.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise BkdError(f"{folder}: not a folder")
    for name in BUNDLEREC_FILES:
        if name not in OPTIONAL_FILES and not (folder / name).exists():
            raise BkdError(f"{folder / name}: missing (a BundleRec folder holds {', '.join(BUNDLEREC_FILES)})")

    def pairs(name):
        path = folder / name
        return _read_pairs(path, BUNDLEREC_FILES[name]) if path.exists() else iter(())

    session_items: dict[str, list[str]] = defaultdict(list)
    for _, sid, iid in pairs("session_item.csv"):
        if iid.strip() not in session_items[sid]:
            session_items[sid].append(iid.strip())
    session_bundles: dict[str, list[str]] = defaultdict(list)
    for _, sid, bid in pairs("session_bundle.csv"):
        session_bundles[sid].append(bid.strip())
    bundle_items: dict[str, list[str]] = defaultdict(list)
    for _, bid, iid in pairs("bundle_item.csv"):
        bundle_items[bid].append(iid.strip())
    intents = {bid: " ".join(text.split()) for _, bid, text in pairs("bundle_intent.csv")}
    titles = {iid: text.strip() for _, iid, text in pairs("item_titles.csv")}
    categories = {iid: parse_categories(text) for _, iid, text in pairs("item_categories.csv")}

    report = {"sessions_in": len(session_items), "bundles_in": 0, "bundle_items_outside_session": 0}
    sessions = []
    for sid, iids in session_items.items():
        members = set(iids)
        bundles = []
        for bid in session_bundles.get(sid, []):
            report["bundles_in"] += 1
            inside = [i for i in dict.fromkeys(bundle_items.get(bid, [])) if i in members]
            report["bundle_items_outside_session"] += len(set(bundle_items.get(bid, []))) - len(inside)
            bundles.append(Bundle(tuple(inside), intents.get(bid, "")))
        bundles = clean_bundles(bundles)
        if not bundles:
            continue
        items = [Item(i, titles.get(i, ""), categories.get(i, ())) for i in iids]
        sessions.append(Session(prefix + sid, items, bundles))
    sessions.sort(key=lambda s: (len(s.session_id), s.session_id))
    split_sessions(sessions, seed)
    report["sessions_out"] = len(sessions)
    report["bundles_out"] = sum(len(s.bundles) for s in sessions)
    return sessions, report


# ---------------------------------------------------------------- stats


def stats(sessions: list[Session]) -> dict:
    """Per split (and 'all'): sessions, items, bundles, bundles/session, mean bundle size, untitled items,
    category coverage."""
    groups: dict[str, list[Session]] = defaultdict(list)
    for s in sessions:
        groups[s.split or "(none)"].append(s)
    groups["all"] = sessions
    out = {}
    for name in [*SPLITS, "(none)", "all"]:
        group = groups.get(name)
        if not group:
            continue
        n_items = sum(len(s.items) for s in group)
        n_bundles = sum(len(s.bundles) for s in group)
        sizes = [len(b.items) for s in group for b in s.bundles]
        out[name] = {
            "sessions": len(group),
            "items": n_items,
            "unique_items": len({it.id for s in group for it in s.items}),
            "bundles": n_bundles,
            "bundles_per_session": round(n_bundles / len(group), 3),
            "mean_bundle_size": round(sum(sizes) / len(sizes), 3) if sizes else 0.0,
            "mean_session_length": round(n_items / len(group), 3),
            "items_without_title": sum(1 for s in group for it in s.items if not it.title.strip()),
            **category_coverage(group),
        }
    return out


def category_coverage(sessions: list[Session]) -> dict:
    """How much of a catalogue carries category paths: items with any (and their share), paths per
    such item, mean path depth (levels, the root included)."""
    items = [it for s in sessions for it in s.items]
    with_paths = [it for it in items if any(it.categories)]
    paths = [p for it in with_paths for p in it.categories if p]
    return {
        "items_with_categories": len(with_paths),
        "category_coverage": round(len(with_paths) / len(items), 3) if items else 0.0,
        "category_paths_per_item": round(len(paths) / len(with_paths), 3) if with_paths else 0.0,
        "category_mean_depth": round(sum(len(p) for p in paths) / len(paths), 3) if paths else 0.0,
    }
