"""Small config files (TOML or JSON) loaded into dataclasses, strictly.

Every field has a default that works, so a file names only what it changes (peft style).
Unknown keys and wrong types are errors naming the file and the key: a typo must not silently
run with a default.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, fields
from pathlib import Path

from . import BkdError


def read_config(path: str | Path, what: str = "config") -> dict:
    """The table of keys in a .toml or .json file."""
    path = Path(path)
    if not path.is_file():
        raise BkdError(f"{path}: no such {what} file")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".json":
            obj = json.loads(text)
        else:
            try:
                import tomllib
            except ImportError:  # Python 3.10
                import tomli as tomllib
            obj = tomllib.loads(text)
    except (ValueError, json.JSONDecodeError) as e:
        raise BkdError(f"{path}: not a valid {path.suffix.lstrip('.') or 'TOML'} {what} ({e})") from None
    if not isinstance(obj, dict):
        raise BkdError(f"{path}: a {what} is a table of keys")
    return obj


def check_type(value, default, where: str):
    """`value` if it has the type of `default` (ints pass as floats, lists hold strings), else an error."""
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, list):
        ok = isinstance(value, list) and all(isinstance(x, str) for x in value)
    else:
        ok = isinstance(value, str)
    if not ok:
        raise BkdError(f"{where}: expected {type(default).__name__}, got {value!r}")
    return value


def from_dict(cls, obj: dict, where: str):
    """An instance of dataclass `cls` from `obj`, every key known and of its field's type."""
    known = {f.name: f for f in fields(cls)}
    values = {}
    for key, value in obj.items():
        if key not in known:
            raise BkdError(f"{where}: unknown key {key!r} (known: {', '.join(known)})")
        f = known[key]
        default = f.default if f.default is not MISSING else f.default_factory()
        values[key] = check_type(value, default, f"{where}: {key}")
    return cls(**values)
