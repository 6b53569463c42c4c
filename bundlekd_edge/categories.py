"""The category view of a session: its items grouped by their catalogue category paths.

An item may carry category paths (`Item.categories`, e.g. `(("Electronics", "Camera & Photo",
"Lenses"),)`). Grouping a session's items by one level of those paths gives a partition a
compact-answer student's choice can pick beside the title cuts (`packs.Pack.candidates`,
`baselines.HintChoice`), and the `category` baseline's answer.

Which path of an item (`path`) and which levels (`depths`) are used differs by catalogue: they are
chosen on its train split (`baselines.tune_category_view`, `baselines.CategoryGroups`). Depth d
keys an item by the first d levels *below the root* of its path (depth 1 on Electronic:
"Computers & Accessories" under "Electronics"); a path shorter than that keys by the whole path.
An item without categories is grouped with no other. A catalogue without categories therefore
gives no category partition at all, and every output stays what it was without the view.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import BkdError
from .data import Item, Session

PATHS = ("first", "longest")  # which of an item's category paths: the catalogue's first, or its deepest
DEPTHS = (1, 2, 3, 4)  # levels below the root


def category_key(item: Item, path: str, depth: int) -> tuple[str, ...] | None:
    """The item's category at `depth` levels below the root of its chosen path; None without one."""
    paths = [p for p in item.categories if p]
    if not paths:
        return None
    chosen = paths[0] if path == "first" else max(paths, key=len)  # max keeps the first of equal length
    return tuple(c.strip().lower() for c in chosen[: depth + 1])


def category_partition(session: Session, path: str, depth: int) -> list[list[int]]:
    """Groups (item numbers, from 1, in session order) of >= 2 items sharing the category at
    `depth`, ordered by their first item; [] when no two items share one."""
    groups: dict[tuple[str, ...], list[int]] = {}
    for n, item in enumerate(session.items, 1):
        key = category_key(item, path, depth)
        if key is not None:
            groups.setdefault(key, []).append(n)
    return [g for g in groups.values() if len(g) >= 2]


@dataclass(frozen=True)
class CategoryView:
    """Which category partitions a session's candidates get: one per depth, of the chosen path.
    No depths: no view (what a catalogue without categories, or a pack built before it, gets)."""

    path: str = "first"
    depths: tuple[int, ...] = ()

    def __post_init__(self):
        if self.path not in PATHS:
            raise BkdError(f"category view path {self.path!r}: not one of {', '.join(PATHS)}")
        if len(set(self.depths)) != len(self.depths) or not all(
            isinstance(d, int) and not isinstance(d, bool) and 1 <= d <= 9 for d in self.depths
        ):
            raise BkdError(f"category view depths {list(self.depths)!r}: distinct whole numbers from 1 to 9")

    def __bool__(self) -> bool:
        return bool(self.depths)

    @property
    def label(self) -> str:
        return f"{self.path} path, depth {'+'.join(map(str, self.depths))}" if self.depths else "none"

    def to_dict(self) -> dict:
        return {"path": self.path, "depths": list(self.depths)}

    @classmethod
    def from_dict(cls, d: dict | None, where: str = "category view") -> CategoryView:
        if d is None:
            return cls()
        if not isinstance(d, dict) or not isinstance(d.get("depths"), list):
            raise BkdError(f'{where}: expected {{"path": ..., "depths": [...]}}, got {d!r}')
        try:
            return cls(d.get("path", "first"), tuple(d["depths"]))
        except BkdError as e:
            raise BkdError(f"{where}: {e}") from None

    def partitions(self, session: Session) -> list[list[list[int]]]:
        """The session's category partitions, one per depth, none where no two items share a category."""
        return [p for d in self.depths if (p := category_partition(session, self.path, d))]


def views(max_depths: int = 2) -> list[CategoryView]:
    """The views a catalogue's train split chooses among, simplest first: none, one depth, two
    adjacent depths; for each path."""
    out = [CategoryView()]
    for path in PATHS:
        out += [CategoryView(path, (d,)) for d in DEPTHS]
        if max_depths >= 2:
            out += [CategoryView(path, (d, d + 1)) for d in DEPTHS[:-1]]
    return out


def category_name(items: list[Item]) -> str:
    """A no-model name for a bundle: of the categories below the root that the most of its items
    carry (any of each item's paths), the deepest, e.g. "Lenses"; "" where no item has categories.
    (On the shipped default's Electronic test bundles: MiniLM cosine with the true intents 0.474;
    the deepest category *all* items share, 0.370: it is often only the root.)"""
    counts: dict[tuple[str, ...], int] = {}
    for item in items:
        for prefix in sorted({tuple(p[:d]) for p in item.categories if p for d in range(2, len(p) + 1)}):
            counts[prefix] = counts.get(prefix, 0) + 1
    if not counts:
        return ""
    best = max(counts.items(), key=lambda kv: (kv[1], len(kv[0])))[0]  # ties: the first in sorted order
    return best[-1].strip()
