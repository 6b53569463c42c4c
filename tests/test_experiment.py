"""`bkd-edge experiment`: a tiny real grid end to end (distil -> pack -> generate -> eval), resume."""

import json

import pytest

from bundlekd_edge import BkdError
from bundlekd_edge.data import load_sessions
from bundlekd_edge.experiment import Cell, Experiment, load_grid

GRID = """
sessions = "{sessions}"
spread = 2
k = 1
[base]
formats = "patterns"
sampling = "random"
ratio = 0.5
use = "icl"
[sweep]
formats = ["none", "examples", "patterns"]
ratio = [0.5, 1.0]
"""


def generate_calls(out) -> int:
    return (out / "experiment.log").read_text().count("$ bkd-edge generate")


def test_tiny_grid_runs_and_resumes(tmp_path, sample_path, cli):
    grid_file = tmp_path / "grid.toml"
    grid_file.write_text(GRID.format(sessions=sample_path))
    out = tmp_path / "exp"
    r = cli("experiment", grid_file, "--out", out)
    assert r.exit_code == 0, r.output
    report = json.loads((out / "results.json").read_text())
    t = report["tables"]
    assert [c["cell"]["formats"] for c in t["format"]] == ["none", "examples", "patterns"]
    assert [c["cell"]["ratio"] for c in t["quantity"]] == [0.5, 1.0]
    assert t["format"][0]["pack"] is None and t["format"][1]["pack_tokens"]["static"] == 0
    for row in t["format"] + t["quantity"]:
        assert row["quality"]["sessions"] == 2 and row["quality"]["valid_rate"] == 1.0
    # `spread` sessions spread evenly over the split, not its first ones (files are often sorted)
    test = load_sessions(sample_path, split="test")
    scored = [s.session_id for s in load_sessions(out / "scored-sessions.jsonl")]
    assert scored == [test[0].session_id, test[len(test) // 2].session_id]
    # The knowledge of each quantity really differs: ratio 1.0 mined from all 14 train sessions.
    ids = {q: json.loads((out / "knowledge" / q / "manifest.json").read_text())["runs"][-1]["sessions"]["sampled"]
           for q in ("random-0.5", "random-1")}  # fmt: skip
    assert ids == {"random-0.5": 7, "random-1": 14}
    for section in ("## Knowledge format (RQ1)", "## Knowledge quantity (RQ2)", "## Knowledge utilisation (RQ3)"):
        assert section in r.output
    assert (out / "experiment.png").read_bytes()[:4] == b"\x89PNG"
    # The base cell appears in all three tables but runs once: 4 distinct cells.
    assert generate_calls(out) == 4

    # Rerun: everything finished is reused. Lose one cell's result (an interruption): only it reruns.
    assert cli("experiment", grid_file, "--out", out).exit_code == 0
    assert generate_calls(out) == 4
    (out / "cells" / "icl__examples" / "result.json").unlink()
    assert cli("experiment", grid_file, "--out", out).exit_code == 0
    assert generate_calls(out) == 5
    # Another spread scores other sessions: no cell result is reused.
    assert cli("experiment", grid_file, "--out", out, "--spread", "3").exit_code == 0
    assert generate_calls(out) == 9
    assert json.loads((out / "results.json").read_text())["tables"]["format"][0]["quality"]["sessions"] == 3


def test_grid_errors(tmp_path, sample_path):
    bad = tmp_path / "bad.toml"
    for text, message in [
        ('spread = 2\n[base]\nformats = "rules"', "names no `sessions`"),
        (f'sessions = "{sample_path}"\n[sweep]\ncolour = ["red"]', "unknown factor 'colour'"),
        (f'sessions = "{sample_path}"\n[sweep]\nformats = ["poems"]', "formats 'poems'"),
        (f'sessions = "{sample_path}"\n[base]\nratio = 0', "ratio 0.0"),
        (f'sessions = "{sample_path}"\nlimt = 3', "unknown key 'limt'"),
    ]:
        bad.write_text(text)
        with pytest.raises(BkdError, match=message):
            load_grid(bad)
    bad.write_text(f'sessions = "{sample_path}"\n[sweep]\nuse = ["icl", "sft"]')
    with pytest.raises(BkdError, match="SFT cells need"):
        Experiment(load_grid(bad), tmp_path / "x")


def test_cell_names():
    assert Cell("patterns,rules", "diversity", 0.05, "sft+icl").name == "sft+icl__patterns+rules@diversity-0.05"
    assert Cell("rules", use="sft").name == "sft__no-pack"
    assert Cell("none").name == "icl__no-pack"
