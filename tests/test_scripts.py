"""The scripts/ folder: commands the README tells users to run, so they are tested like the CLI."""

import json
import subprocess
import sys
from pathlib import Path

from bundlekd_edge.metrics import load_predictions

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def merge(*args):
    cmd = [sys.executable, str(SCRIPTS / "merge_student.py"), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True)


def partitions(path: Path) -> dict:
    return {sid: sorted(map(sorted, p.bundles)) for sid, p in load_predictions(path).items()}


def test_merge_student_f16_answers_as_the_adapter_does(tmp_path, cli, sample_path):
    out = tmp_path / "merged"
    done = merge("--quant", "F16", "--out", out)
    assert done.returncode == 0, done.stderr
    card = json.loads((out / "student.json").read_text())
    assert card["adapters"] == [] and (out / card["base"]["file"]).is_file()

    for model, pred in (("default", tmp_path / "adapter.jsonl"), (out, tmp_path / "merged.jsonl")):
        r = cli("generate", "--model", model, "--sessions", sample_path, "--limit", 8, "--out", pred, "--quiet")
        assert r.exit_code == 0, r.output
    # The same weights, added before the matrix product instead of after: rounding may flip a close choice.
    adapter, merged = partitions(tmp_path / "adapter.jsonl"), partitions(tmp_path / "merged.jsonl")
    assert len(merged) == 8 and sum(merged[s] == adapter[s] for s in adapter) >= 6


def test_merge_student_bad_input_is_one_line_and_writes_nothing(tmp_path):
    bad = merge("--quant", "Q9", "--out", tmp_path / "q9")
    assert bad.returncode == 1 and "--quant Q9: not a llama.cpp type" in bad.stderr
    assert "Traceback" not in bad.stderr and not (tmp_path / "q9").exists()

    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    again = merge("--quant", "F16", "--out", taken)
    assert again.returncode == 1 and "exists; choose a new folder" in again.stderr
    assert [p.name for p in taken.iterdir()] == ["keep.txt"]
