"""The knowledge store: plain JSONL knowledge records with provenance, and a manifest.

    KNOWLEDGE_DIR/
      patterns.jsonl   one record a line: {"kind": "pattern"|"rule"|"thought", "text": ...,
      rules.jsonl        "source_session_ids": [...], "teacher_model": ..., "prompt_sha256": ...,
      thoughts.jsonl     "format": "patterns"|"rules"|"thoughts", ...extra fields}
      manifest.json    what made it (each run: command args, teacher, counts) and sha256 of every file
      teacher-cache/   the teacher call cache (resumable; not part of the knowledge, not hashed)

Every file is written atomically. Formats accumulate: distilling rules into a folder that already
holds patterns keeps them, and the manifest lists every run and hashes every knowledge file, so
`bkd-edge pack build` reads one consistent folder.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .. import BkdError
from ..artifacts import verify_folder
from ..artifacts import write_manifest as write_folder_manifest
from ..files import write_jsonl

STORE_FORMAT = "bkd-knowledge/1"
KINDS = ("pattern", "rule", "thought")
FORMATS = {"patterns": "pattern", "rules": "rule", "thoughts": "thought"}  # format -> record kind
CACHE_DIR = "teacher-cache"


@dataclass
class Record:
    kind: str  # pattern | rule | thought
    text: str
    source_session_ids: list[str]
    format: str  # patterns | rules | thoughts: which distillation format made it
    teacher_model: str = ""  # empty for patterns: mined, no teacher
    prompt_sha256: list[str] = field(default_factory=list)  # cache keys of the teacher calls behind it
    extra: dict = field(default_factory=dict)  # e.g. support/confidence of a pattern

    def to_dict(self) -> dict:
        d = asdict(self)
        extra = d.pop("extra")
        return {**d, **extra}


def record_from_dict(obj: dict, where: str) -> Record:
    try:
        kind, text = obj["kind"], obj["text"]
    except (KeyError, TypeError):
        raise BkdError(f"{where}: not a knowledge record (needs 'kind' and 'text')") from None
    if kind not in KINDS or not isinstance(text, str):
        raise BkdError(f"{where}: field 'kind' must be one of {', '.join(KINDS)} and 'text' a string")
    known = {"kind", "text", "source_session_ids", "format", "teacher_model", "prompt_sha256"}
    keys = obj.get("prompt_sha256") or []
    return Record(
        kind,
        text,
        [str(s) for s in obj.get("source_session_ids") or []],
        str(obj.get("format") or ""),
        str(obj.get("teacher_model") or ""),
        [keys] if isinstance(keys, str) else list(keys),
        {k: v for k, v in obj.items() if k not in known},
    )


def write_records(folder: str | Path, fmt: str, records: list[Record]) -> Path:
    if fmt not in FORMATS:
        raise BkdError(f"unknown knowledge format {fmt!r} (choose from {', '.join(FORMATS)})")
    path = Path(folder) / f"{fmt}.jsonl"
    write_jsonl(path, (r.to_dict() for r in records))
    return path


def read_records(folder: str | Path) -> list[Record]:
    """Every record of every knowledge file in the folder, in format order then file order."""
    paths = (Path(folder) / f"{fmt}.jsonl" for fmt in FORMATS)
    return [rec for path in paths if path.exists() for rec in file_records(path)]


def file_records(path: Path):
    """The records of one knowledge file, each checked; errors name the file and line."""
    for n, line in enumerate(path.open(encoding="utf-8"), 1):
        if line.strip():
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise BkdError(f"{path}:{n}: not a knowledge record (not valid JSON: {e.msg})") from None
            yield record_from_dict(obj, f"{path}:{n}")


def write_manifest(folder: str | Path, run: dict) -> dict:
    """Add this run to the manifest and re-hash every knowledge file (written last, atomically)."""
    folder = Path(folder)
    path = folder / "manifest.json"
    runs = []
    if path.exists():
        try:
            runs = json.loads(path.read_text()).get("runs", [])
        except (json.JSONDecodeError, AttributeError):
            raise BkdError(f"{path}: not valid JSON; remove it or choose a new --out folder") from None
    counts = {}
    for name in sorted(p.name for p in folder.glob("*.jsonl")):
        counts[name] = sum(1 for line in (folder / name).open(encoding="utf-8") if line.strip())
    fields = {"runs": [*runs, run], "records": counts}
    return write_folder_manifest(folder, STORE_FORMAT, fields, skip=(CACHE_DIR + "/",))


def verify_store(folder: str | Path) -> list[str]:
    """Problems found, empty when every file the manifest names is present and unchanged."""
    return verify_folder(folder, STORE_FORMAT, "knowledge", unlisted_ok=(CACHE_DIR + "/",))


def read_knowledge(folder: Path | None, formats: list[str] | None = None) -> tuple[list[str], dict[str, str]]:
    """What a prompt pack takes from a knowledge folder: static lines (rules first, then patterns,
    in file order) and thoughts by session id. A store `distill` wrote is verified first; a folder
    of hand-written *.jsonl records is read as it is.

    `formats` (e.g. ["patterns", "rules"]) picks which of the folder's knowledge files are read."""
    if folder is None:
        return [], {}
    folder = Path(folder)
    if (folder / "manifest.json").exists():  # a store `distill` made: verified before use
        problems = verify_store(folder)
        if problems:
            raise BkdError(f"{folder}: refusing a changed knowledge store: " + "; ".join(problems))
    files = sorted(folder.glob("*.jsonl"))
    if formats is not None:
        missing = [f for f in formats if not (folder / f"{f}.jsonl").is_file()]
        if missing:
            raise BkdError(f"{folder}: no {', '.join(missing)} knowledge ({', '.join(f + '.jsonl' for f in missing)})")
        files = [p for p in files if p.stem in formats]
    if not files:
        raise BkdError(f"{folder}: no knowledge (*.jsonl) files")
    rules, patterns, thoughts = [], [], {}
    for path in files:
        for rec in file_records(path):
            kind, text = rec.kind, rec.text.strip()
            if kind == "rule":
                rules.append(text)
            elif kind == "pattern":
                patterns.append(text)
            elif kind == "thought":
                for sid in rec.source_session_ids:
                    thoughts[sid] = text
    lines = []
    if rules:
        lines += ["Rules for finding bundles:"] + [f"- {r}" for r in rules]
    if patterns:
        lines += ["Product types often bundled together:"] + [f"- {p}" for p in patterns]
    return lines, thoughts
