"""Frequent patterns: Apriori frequent itemsets and association rules over item TYPES.

Item types (deterministic, no model):
  1. an item with categories: the most specific category of its first category path;
  2. otherwise from the title, lower-cased and HTML-unescaped:
     a. the *head* of the title is the text before the first " - ", ",", "(", "[", " for ",
        ". ", " with " or " compatible " (what follows names compatibility, colours, part numbers);
     b. lexicon terms (TYPE_LEXICON: product-type head nouns and their aliases, plurals allowed)
        are matched on word boundaries; in the head, the match that ENDS last wins (English puts
        the head noun last: "battery case" is a case), ties going to the longest;
     c. no match in the head: the match that STARTS first in the whole title (the product is
        named before what it fits);
     d. no match anywhere: the last all-letter word of the head (>= 3 letters, not a stopword),
        with a plural "s" stripped; else "other".

Transactions are the type sets of the training bundles, one per bundle, not per session: a bundle
is exactly "what goes together", while a session also mixes unrelated bundles and items that fit
no bundle, so session-level co-occurrence would mostly measure browsing, not bundling.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass

from ..data import Item, Session

# canonical type -> aliases (the type itself is always an alias). Electronics first; general
# retail terms after. Extend freely: a longer alias beats a shorter one ending at the same place.
TYPE_LEXICON: dict[str, tuple[str, ...]] = {
    "memory card": ("memory card", "sd card", "sdhc card", "sdxc card", "microsd card", "microsdhc", "microsdxc",
                    "micro sd card", "compact flash", "cf card", "flash memory card"),
    "usb flash drive": ("flash drive", "thumb drive", "usb drive", "pen drive"),
    "hard drive": ("hard drive", "hard disk", "hdd", "ssd", "solid state drive", "bare drive", "external drive"),
    "ram": ("ram", "memory kit", "memory module", "sodimm", "dimm"),
    "battery": ("battery", "batteries", "battery pack"),
    "battery case": ("battery case", "juice pack"),
    "power bank": ("power bank", "external battery", "external battery charger", "portable charger"),
    "charger": ("charger", "battery charger", "charging station", "ac adapter", "power adapter", "car charger"),
    "surge protector": ("surge protector", "power strip", "surge strip"),
    "power supply": ("power supply", "psu"),
    "case": ("case", "cover", "sleeve", "skin", "shell", "bumper", "folio", "jacket", "pouch"),
    "computer case": ("computer case", "tower case", "mid tower", "full tower", "chassis", "gaming case"),
    "bag": ("bag", "backpack", "messenger bag", "camera bag", "carrying bag"),
    "screen protector": ("screen protector", "protector film", "protective film", "screen guard"),
    "cable": ("cable", "cord", "extension cable", "speaker wire", "patch cord"),
    "adapter": ("adapter", "adaptor", "converter", "dongle"),
    "network adapter": ("network adapter", "wireless adapter", "wifi adapter", "wi-fi adapter", "network card"),
    "router": ("router", "access point"),
    "range extender": ("range extender", "extender", "repeater"),
    "network switch": ("ethernet switch", "network switch", "gigabit switch", "switch"),
    "usb hub": ("usb hub", "hub"),
    "keyboard": ("keyboard",),
    "mouse": ("mouse", "mice"),
    "mouse pad": ("mouse pad", "mousepad"),
    "monitor": ("monitor", "display"),
    "mount": ("mount", "mounting kit", "bracket", "holder", "monitor arm"),
    "stand": ("stand",),
    "tripod": ("tripod", "monopod", "ball head", "tripod head"),
    "lens": ("lens", "lenses", "zoom lens", "prime lens"),
    "filter": ("filter", "filters", "filter set"),
    "lens cap": ("lens cap", "lens hood"),
    "cleaning kit": ("cleaning kit", "lens pen", "cleaning pen", "cleaning cloth", "microfiber cloth", "blower"),
    "card reader": ("card reader",),
    "camera": ("camera", "camcorder", "dslr", "action camera", "dash cam"),
    "webcam": ("webcam", "web camera"),
    "flash": ("flash", "speedlite"),
    "light": ("light", "ring light", "led light", "lamp"),
    "headphones": ("headphones", "headphone", "headset", "earbuds", "earbud", "earphones", "earphone"),
    "speaker": ("speaker", "speakers", "subwoofer", "soundbar", "sound bar"),
    "microphone": ("microphone", "mic"),
    "receiver": ("receiver", "amplifier", "amp"),
    "car stereo": ("car stereo", "head unit", "car radio"),
    "dash kit": ("dash kit", "installation kit", "install kit"),
    "wiring harness": ("wiring harness", "wire harness", "harness"),
    "antenna": ("antenna",),
    "tv": ("tv", "television", "hdtv"),
    "projector": ("projector",),
    "media player": ("blu-ray player", "dvd player", "media player", "streaming player", "disc player"),
    "remote": ("remote", "remote control"),
    "laptop": ("laptop", "notebook", "chromebook", "ultrabook"),
    "tablet": ("tablet",),
    "phone": ("phone", "smartphone", "cordless phone"),
    "printer": ("printer",),
    "ink": ("ink", "toner", "ink cartridge", "toner cartridge"),
    "graphics card": ("video card", "graphics card"),
    "sound card": ("sound card", "audio interface"),
    "blank disc": ("disc", "discs", "blank disc", "cd-r", "dvd-r", "bd-r"),
    "motherboard": ("motherboard", "motherboards"),
    "processor": ("processor", "cpu"),
    "cooler": ("cooler", "cooling fan", "case fan", "fan", "cooling pad", "thermal paste"),
    "stylus": ("stylus",),
    "gps": ("gps", "navigator"),
    "protection plan": ("protection plan", "warranty"),
    "watch": ("watch", "smartwatch", "fitness tracker"),
}  # fmt: skip

_HEAD_CUT = re.compile(r" - |,|\(|\[|\. | for | with | compatible ")
_STOPWORDS = frozenset(
    "the and for with new pack set kit black white blue red green silver gray grey pink purple inch inches "
    "feet foot meter series edition model version generation replacement original premium professional "
    "pro mini portable universal wireless digital high speed".split()
)


def _compile_lexicon(lexicon: dict[str, tuple[str, ...]]) -> list[tuple[re.Pattern, str]]:
    out = []
    for type_, aliases in lexicon.items():
        for alias in {type_, *aliases}:
            out.append((re.compile(r"(?<![a-z0-9])" + re.escape(alias) + r"(?:s|es)?(?![a-z0-9])"), type_))
    return out


_LEXICON = _compile_lexicon(TYPE_LEXICON)


def _matches(text: str) -> list[tuple[int, int, str]]:
    return [(m.start(), m.end(), t) for pattern, t in _LEXICON for m in pattern.finditer(text)]


def title_type(title: str) -> str:
    """The product type of a title, by the rule in this module's docstring."""
    text = " ".join(html.unescape(title).lower().split())
    head = _HEAD_CUT.split(text, maxsplit=1)[0].strip()
    found = _matches(head)
    if found:  # the head noun comes last; the longest alias ending there
        start, end, type_ = max(found, key=lambda m: (m[1], m[1] - m[0]))
        return type_
    found = _matches(text)
    if found:  # the product is named first
        start, end, type_ = min(found, key=lambda m: (m[0], -(m[1] - m[0])))
        return type_
    for word in reversed(head.split()):
        if word.isalpha() and len(word) >= 3 and word not in _STOPWORDS:
            return word[:-1] if word.endswith("s") and not word.endswith("ss") and len(word) > 3 else word
    return "other"


def item_type(item: Item) -> str:
    """The most specific category of the item's first category path, else the title's type."""
    if item.categories and item.categories[0]:
        return item.categories[0][-1].strip().lower()
    return title_type(item.title)


# ---------------------------------------------------------------- Apriori


@dataclass(frozen=True)
class PatternConfig:
    min_support: float = 0.01  # share of training bundles whose type set holds the itemset
    min_confidence: float = 0.3
    max_length: int = 4  # longest itemset (and rule, lhs + rhs) considered
    max_rules: int = 60  # keep the most confident; a prompt has room for a few dozen lines
    max_itemsets: int = 40  # frequent type sets of >= 2 types, most supported first
    max_rhs: int = 1  # "what to add": one type per consequent keeps the lines short and few


@dataclass(frozen=True)
class Pattern:
    kind: str  # "itemset" (types bundled together) or "association" (lhs -> rhs)
    lhs: tuple[str, ...]
    rhs: tuple[str, ...]  # empty for an itemset
    support: float
    confidence: float  # 1.0 for an itemset
    lift: float
    session_ids: tuple[str, ...]  # training sessions with a bundle that holds all these types

    def text(self) -> str:
        if self.kind == "itemset":
            return f"{' + '.join(self.lhs)} (support {self.support:.2f})"
        return (
            f"{' + '.join(self.lhs)} -> {' + '.join(self.rhs)} "
            f"(support {self.support:.2f}, confidence {self.confidence:.2f})"
        )


def bundle_transactions(sessions: list[Session]) -> tuple[list[tuple[str, ...]], list[str]]:
    """One transaction per ground-truth bundle: the sorted set of its items' types, and its session id."""
    transactions, owners = [], []
    for s in sessions:
        types = {it.id: item_type(it) for it in s.items}
        for b in s.bundles:
            transactions.append(tuple(sorted({types[x] for x in b.items})))
            owners.append(s.session_id)
    return transactions, owners


def mine_patterns(sessions: list[Session], config: PatternConfig = PatternConfig()) -> list[Pattern]:
    """Association rules (most confident first), then frequent itemsets of >= 2 types (most supported first)."""
    from efficient_apriori import apriori  # the `distill` extra; only this stage needs it

    transactions, owners = bundle_transactions(sessions)
    if not transactions:
        return []
    itemsets, rules = apriori(
        transactions, min_support=config.min_support, min_confidence=config.min_confidence, max_length=config.max_length
    )
    n = len(transactions)
    as_sets = [frozenset(t) for t in transactions]

    def sessions_with(types) -> tuple[str, ...]:
        need = frozenset(types)
        return tuple(dict.fromkeys(o for o, t in zip(owners, as_sets) if need <= t))

    single = {k[0]: v / n for k, v in itemsets.get(1, {}).items()}
    out = []
    # Sorted fully (ties by name) so the output never depends on dict or set order.
    rules = sorted(rules, key=lambda r: (-r.confidence, -r.support, r.lhs, r.rhs))
    kept: list = []
    for r in rules:
        if len(r.rhs) > config.max_rhs:
            continue
        # Redundant: a rule with the same consequent, a smaller antecedent and at least this confidence.
        if any(k.rhs == r.rhs and set(k.lhs) < set(r.lhs) and k.confidence >= r.confidence for k in kept):
            continue
        kept.append(r)
    for r in kept[: config.max_rules]:
        out.append(
            Pattern("association", tuple(r.lhs), tuple(r.rhs), r.support, r.confidence, r.lift,
                    sessions_with((*r.lhs, *r.rhs)))
        )  # fmt: skip
    sets = [(k, v) for size, group in itemsets.items() if size >= 2 for k, v in group.items()]
    for types, count in sorted(sets, key=lambda kv: (-kv[1], kv[0]))[: config.max_itemsets]:
        expected = 1.0
        for t in types:
            expected *= single.get(t, 1.0)
        out.append(Pattern("itemset", tuple(types), (), count / n, 1.0, (count / n) / expected, sessions_with(types)))
    return out


def type_stats(sessions: list[Session]) -> dict:
    """How items were typed: by category, by lexicon or fallback, and the most common types."""
    from collections import Counter

    counts, sources = Counter(), Counter()
    for s in sessions:
        for it in s.items:
            t = item_type(it)
            counts[t] += 1
            sources["category" if it.categories else "title"] += 1
    return {"items": sum(counts.values()), "types": len(counts), "by": dict(sources), "top": counts.most_common(15)}
