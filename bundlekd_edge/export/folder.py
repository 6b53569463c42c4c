"""A finished export folder, as the runtime sees it: verify the manifest, pick a quant.

    EXPORT/
      model-Q4_K_M.gguf    quantised students (one per requested type; model-F16.gguf with --keep-f16)
      model-Q8_0.gguf
      adapter.gguf         the LoRA adapter alone (llama.cpp GGUF adapter) over the base GGUF it was trained on
      manifest.json        sha256 of every file, base model, adapter, recipe, quant stats, parity
      README.md            model card
      Modelfile            Ollama (when the chat template is ChatML); Modelfile.adapter: base + ADAPTER
      pack/                the prompt pack the student was trained with (mode 'knowledge')

No torch here: `bkd-edge generate --model EXPORT` runs on a laptop with the runtime only.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from .. import BkdError
from ..artifacts import check_files, unlisted_problems
from ..files import path_inside, sha256_file

EXPORT_FORMAT = "bkd-export/1"
MANIFEST = "manifest.json"
ADAPTER_FILE = "adapter.gguf"
DEFAULT_QUANT = "Q4_K_M"
_QUANT_SUFFIX = re.compile(r"^(.*):([A-Za-z0-9_]+)$")


def split_quant(model: str) -> tuple[str, str | None]:
    """'EXPORT_DIR:Q8_0' -> ('EXPORT_DIR', 'Q8_0'); anything else -> (model, None)."""
    m = _QUANT_SUFFIX.match(model)
    if m and Path(m.group(1)).is_dir():
        return m.group(1), m.group(2).upper()
    return model, None


def read_manifest(folder: str | Path) -> dict:
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise BkdError(f"{folder}: not an export folder (no {MANIFEST}; made by `bkd-edge export`)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise BkdError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if manifest.get("format") != EXPORT_FORMAT:
        raise BkdError(f"{path}: format {manifest.get('format')!r}, expected {EXPORT_FORMAT!r}")
    return manifest


def verify_export(folder: str | Path, manifest: dict | None = None) -> list[str]:
    """Problems with the folder's files (missing, changed); empty when every sha256 matches."""
    folder = Path(folder)
    manifest = manifest or read_manifest(folder)
    pack = manifest.get("pack")
    return check_files(folder, manifest.get("files", {}), unlisted_ok=(f"{pack}/state/",) if pack else ())


def resolve_export(folder: str | Path, quant: str | None = None) -> Path:
    """The GGUF of `quant` (default: the manifest's default, Q4_K_M) in a verified export folder."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    models = manifest.get("models", {})
    quant = (quant or manifest.get("default_quant") or DEFAULT_QUANT).upper()
    if quant not in models:
        raise BkdError(f"{folder}: no {quant} model in this export (has {', '.join(models) or 'none'})")
    name = models[quant].get("file") if isinstance(models[quant], dict) else None
    path = path_inside(folder, name, str(folder / MANIFEST), f"the {quant} model")
    digest = manifest.get("files", {}).get(name)
    if not path.is_file():
        raise BkdError(f"{path}: missing from the export folder")
    if digest is None or sha256_file(path) != digest:
        raise BkdError(f"{path}: refusing a changed model file (sha256 differs from {folder / MANIFEST})")
    pack = manifest.get("pack")
    added = unlisted_problems(folder, manifest.get("files", {}), (f"{pack}/state/",) if isinstance(pack, str) else ())
    if added:  # cheap (no file is read): the other files are checked by sha256 where they are used
        raise BkdError(f"{folder}: refusing an export folder with files its manifest does not list: {added[0]}")
    return path
