"""A training run folder, as export and the experiment grid see it (no torch here).

RUN/
  recipe.json         the resolved recipe
  data.json           example counts, token counts, dropped examples, sha256 of the data
  examples.jsonl      a few decoded training examples (what the model really sees)
  metrics.jsonl       one line per logged step and per evaluation
  checkpoints/last/   adapter + optimizer + scheduler + RNG + step: `--resume` continues here
  best/               the adapter with the best val strict F1 so far
  adapter/            the final (best) LoRA adapter, peft format
  run.json            status, base model (path, sha256), best step and scores, timings
  manifest.json       format bkd-run/1 and the sha256 of every file but checkpoints/ and best/;
                      written last, so its presence means the run finished
"""

from __future__ import annotations

import json
from pathlib import Path

from .. import BkdError
from ..artifacts import MANIFEST, verify_folder

RUN_FORMAT = "bkd-run/1"
RUN_SCRATCH = ("checkpoints/", "best/")  # working state while training, not part of the result


def is_finished(run_dir: str | Path) -> bool:
    return (Path(run_dir) / MANIFEST).is_file()


def read_run(run_dir: str | Path) -> tuple[dict, dict]:
    """run.json and recipe.json of a finished run whose files match its manifest, or a clear error."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise BkdError(f"{run_dir}: no such run folder")
    if not is_finished(run_dir):
        raise BkdError(
            f"{run_dir}: the run did not finish (no {MANIFEST}); "
            "continue it with `bkd-edge train RECIPE --out RUN --resume`"
        )
    problems = verify_folder(run_dir, RUN_FORMAT, "training run", unlisted_ok=RUN_SCRATCH)
    if problems:
        raise BkdError(f"{run_dir}: the run's files do not match its manifest:\n  " + "\n  ".join(problems[:5]))
    try:
        return json.loads((run_dir / "run.json").read_text()), json.loads((run_dir / "recipe.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BkdError(f"{run_dir}: run.json / recipe.json unreadable ({e})") from None
