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
GRID = 'baselines = ["whole", "cluster"]\n' + GRID


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
        lo, hi = row["strict_f1_ci"]
        assert lo <= row["quality"]["strict_f1"] <= hi
    # Reference rows on the same sessions: the untuned student (RQ1's none cell), the teacher, baselines.
    refs = {r["name"]: r for r in report["references"]}
    assert list(refs) == ["icl__no-pack", "teacher", "whole", "cluster"]
    assert refs["icl__no-pack"]["quality"] == t["format"][0]["quality"]
    assert all(r["quality"]["sessions"] == 2 for r in refs.values())
    assert "vs_examples" in t["format"][2] and "vs_examples" not in t["format"][1]  # patterns vs retrieval alone
    best = max(t["format"], key=lambda r: r["quality"]["strict_f1"])
    assert all(("vs_best" in r) == (r is not best) for r in t["format"])
    # `spread` sessions spread evenly over the split, not its first ones (files are often sorted)
    test = load_sessions(sample_path, split="test")
    scored = [s.session_id for s in load_sessions(out / "scored-sessions.jsonl")]
    assert scored == [test[0].session_id, test[len(test) // 2].session_id]
    # The knowledge of each quantity really differs: ratio 1.0 mined from all 14 train sessions.
    ids = {q: json.loads((out / "knowledge" / q / "manifest.json").read_text())["runs"][-1]["sessions"]["sampled"]
           for q in ("random-0.5", "random-1")}  # fmt: skip
    assert ids == {"random-0.5": 7, "random-1": 14}
    for section in ("## Reference rows (teacher stand-in)", "## Knowledge format (RQ1)", "## Knowledge quantity (RQ2)",
                    "## Knowledge utilisation (RQ3)", "95% CI", "paper P", "coverage",
                    "minus examples-only"):  # fmt: skip
        assert section in r.output
    assert (out / "experiment.png").read_bytes()[:4] == b"\x89PNG"
    # The base cell appears in all three tables but runs once: 4 distinct cells, and the teacher.
    assert generate_calls(out) == 5

    # Rerun: everything finished is reused. Lose one cell's result (an interruption): only it reruns.
    assert cli("experiment", grid_file, "--out", out).exit_code == 0
    assert generate_calls(out) == 5
    (out / "cells" / "icl__examples" / "result.json").unlink()
    assert cli("experiment", grid_file, "--out", out).exit_code == 0
    assert generate_calls(out) == 6
    # Another spread scores other sessions: a cell's result is not reused (each result names its spread).
    assert json.loads((out / "cells" / "icl__examples" / "result.json").read_text())["spread"] == 2


SFT_GRID = """
sessions = "{sessions}"
spread = 2
sft_recipe = "{recipe}"
baselines = []
static_budget = 200
[base]
formats = "patterns"
sampling = "random"
ratio = 0.5
use = "sft"
[sweep]
use = ["sft", "sft+icl"]
"""


def test_sft_cells_train_a_student_on_their_knowledge_once(tmp_path, sample_path, cli):
    pytest.importorskip("torch")
    recipe = tmp_path / "tiny.toml"
    recipe.write_text('max_steps = 1\nbatch_size = 1\nmax_len = 1024\nlora_r = 4\neval_sessions = 1\n'
                      'eval_max_tokens = 8\ndevice = "cpu"\n')  # fmt: skip
    grid_file = tmp_path / "grid.toml"
    grid_file.write_text(SFT_GRID.format(sessions=sample_path, recipe=recipe))
    out = tmp_path / "exp"
    r = cli("experiment", grid_file, "--out", out)
    assert r.exit_code == 0, r.output
    t = json.loads((out / "results.json").read_text())["tables"]
    assert [row["name"] for row in t["utilisation"]] == ["sft__patterns@random-0.5", "sft+icl__patterns@random-0.5"]
    student = out / "sft" / "patterns@random-0.5"
    trained = json.loads((student / "recipe.json").read_text())
    assert trained["mode"] == "knowledge" and trained["pack"] == str(out / "packs" / "patterns@random-0.5")
    # It learnt from the 7 train sessions the sampling picked (plus val to choose a checkpoint).
    sessions = load_sessions(trained["sessions"])
    assert sum(s.split == "train" for s in sessions) == 7
    assert t["utilisation"][0]["pack"] is None and t["utilisation"][1]["pack"]  # sft asks without the pack
    assert all(row["student"] == str(student / "export") for row in t["utilisation"])
    log = (out / "experiment.log").read_text()
    assert log.count("$ bkd-edge train") == 1 and log.count("$ bkd-edge export") == 1
    # Rerun: nothing trains again. Another recipe would be another student (trained again).
    assert cli("experiment", grid_file, "--out", out).exit_code == 0
    assert (out / "experiment.log").read_text().count("$ bkd-edge train") == 1
    stamp = json.loads((student / "inputs.json").read_text())
    experiment = Experiment(load_grid(grid_file), out)
    assert experiment.sft_inputs(Cell("patterns", "random", 0.5, "sft"))[1] == stamp
    recipe.write_text(recipe.read_text().replace("lora_r = 4", "lora_r = 2"))
    assert experiment.sft_inputs(Cell("patterns", "random", 0.5, "sft"))[1] != stamp


def test_grid_errors(tmp_path, sample_path):
    bad = tmp_path / "bad.toml"
    for text, message in [
        ('spread = 2\n[base]\nformats = "rules"', "names no `sessions`"),
        (f'sessions = "{sample_path}"\n[sweep]\ncolour = ["red"]', "unknown factor 'colour'"),
        (f'sessions = "{sample_path}"\n[sweep]\nformats = ["poems"]', "formats 'poems'"),
        (f'sessions = "{sample_path}"\n[base]\nratio = 0', "ratio 0.0"),
        (f'sessions = "{sample_path}"\nlimt = 3', "unknown key 'limt'"),
        (f'sessions = "{sample_path}"\nbaselines = ["oracle"]', "baselines: unknown 'oracle'"),
    ]:
        bad.write_text(text)
        with pytest.raises(BkdError, match=message):
            load_grid(bad)
    bad.write_text(f'sessions = "{sample_path}"\n[sweep]\nuse = ["icl", "sft"]')
    with pytest.raises(BkdError, match="SFT cells need `sft_recipe`"):
        Experiment(load_grid(bad), tmp_path / "x")


def test_cell_names():
    assert Cell("patterns,rules", "diversity", 0.05, "sft+icl").name == "sft+icl__patterns+rules@diversity-0.05"
    assert Cell("rules", use="sft").name == "sft__rules@random-0.1"
    assert Cell("none", use="sft+icl").name == "sft+icl__none@random-0.1__no-pack"
    assert Cell("none").name == "icl__no-pack"
