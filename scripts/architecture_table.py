"""The architecture table of README "Any student, any trainer": `tests/test_architectures.py`'s flow per
architecture (a tiny random model, one LoRA step, export F16/Q8_0/Q4_K_M with parity, generate), timed.

    python scripts/architecture_table.py --out runs/architectures
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from click.testing import CliRunner

from bundlekd_edge.cli import main as cli
from bundlekd_edge.data import sample_sessions_path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import test_architectures as t  # noqa: E402  (the test's own model and tokenizer makers)


def timed(*args) -> float:
    start = time.perf_counter()
    result = CliRunner().invoke(cli, [str(a) for a in args])
    if result.exit_code:
        sys.exit(f"bkd-edge {args[0]} failed:\n{result.output}")
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/architectures"))
    out = ap.parse_args().out
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    sample = sample_sessions_path()
    spm = t.make_tokenizer(out, sample)
    rows = []
    for arch in t.ARCHS:
        d = out / arch
        d.mkdir()
        (d / "recipe.toml").write_text(t.tiny_recipe(t.tiny_model(d / f"tiny-{arch}", arch, spm), sample))
        train_s = timed("train", d / "recipe.toml", "--out", d / "run", "--quiet")
        export_s = timed("export", d / "run", "--out", d / "export", *t.EXPORT_ARGS)
        generate_s = timed("generate", "--model", d / "export", "--sessions", sample, "--limit", 2,
                           "--out", d / "pred.jsonl", "--quiet")  # fmt: skip
        manifest = json.loads((d / "export" / "manifest.json").read_text())
        stages = {s["stage"]: s for s in manifest["parity"]["stages"]}
        parity = " | ".join(
            f"{stages[q]['top1_agreement']:.3f} ({stages[q]['positions']})" for q in ("F16", "Q8_0", "Q4_K_M")
        )
        rows.append(f"| {arch} | {manifest['base']['arch']} | {train_s:.1f} | {export_s:.1f} | {parity} | "
                    f"OK ({generate_s:.1f} s) |")  # fmt: skip
        print(rows[-1], flush=True)
    print("\n| HF model | GGUF arch | train 1 step s | export s | F16 top-1 (positions) | Q8_0 | Q4_K_M | generate |")
    print("|---|---|---:|---:|---:|---:|---:|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
