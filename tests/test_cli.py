import json
import shutil
import subprocess
import sys
from pathlib import Path

from bundlekd_edge.metrics import METRIC_KEYS
from tests.conftest import session, write_lines


def test_generate_then_eval_writes_machine_readable_scores(tmp_path, cli, sample_path):
    pred, scores, summary = tmp_path / "pred.jsonl", tmp_path / "scores.json", tmp_path / "summary.json"
    r = cli("generate", "--sessions", sample_path, "--split", "test", "--out", pred, "--summary", summary, "--quiet")
    assert r.exit_code == 0, r.output
    assert "4 sessions" in r.output and "100.0% valid JSON" in r.output
    rows = [json.loads(line) for line in pred.read_text().splitlines()]
    assert [row["session_id"] for row in rows] == ["sample-17", "sample-18", "sample-19", "sample-20"]
    assert all(row["valid"] and row["timing"]["total_s"] > 0 for row in rows)
    assert json.loads(summary.read_text())["latency_p50_s"] > 0

    r = cli("eval", "--gold", sample_path, "--pred", pred, "--split", "test", "--out", scores)
    assert r.exit_code == 0, r.output
    assert "strict F1" in r.output and "hallucinated-item rate" in r.output
    result = json.loads(scores.read_text())
    assert set(METRIC_KEYS) | {"sessions"} <= set(result)
    assert result["sessions"] == 4 and result["valid_rate"] == 1.0 and result["hallucination_rate"] == 0.0


def test_bad_sessions_file_fails_without_output(tmp_path, cli):
    bad = write_lines(tmp_path / "bad.jsonl", [session("a"), session("a")])
    out = tmp_path / "pred.jsonl"
    r = cli("generate", "--sessions", bad, "--out", out)
    assert r.exit_code == 1
    assert "bad.jsonl:2: duplicate session_id 'a'" in r.output
    assert not out.exists() and list(tmp_path.iterdir()) == [bad]


def test_unknown_split_and_unknown_prediction_session(tmp_path, cli, sample_path):
    r = cli("generate", "--sessions", sample_path, "--split", "dev", "--out", tmp_path / "p.jsonl")
    assert r.exit_code == 1 and "unknown split 'dev'" in r.output
    pred = write_lines(tmp_path / "p.jsonl", [{"session_id": "nobody", "bundles": []}])
    r = cli("eval", "--gold", sample_path, "--pred", pred)
    assert r.exit_code == 1 and "'nobody'" in r.output


def test_truncated_model_fails_clearly(tmp_path, cli, sample_path):
    from bundlekd_edge.runtime import default_model_path

    cut = tmp_path / "cut.gguf"
    cut.write_bytes(default_model_path().read_bytes()[:5_000_000])
    r = cli("generate", "--model", cut, "--sessions", sample_path, "--out", tmp_path / "p.jsonl")
    assert r.exit_code == 1 and "truncated" in r.output
    assert not (tmp_path / "p.jsonl").exists()


def test_generate_json_on_stdin_through_the_console_script():
    exe = shutil.which("bkd-edge") or str(Path(sys.executable).parent / "bkd-edge")
    one = {"items": [{"id": "cam", "title": "Canon EOS Rebel DSLR Camera"},
                     {"id": "bag", "title": "Padded camera shoulder bag"},
                     {"id": "sd", "title": "SanDisk 64GB SD card"}]}  # fmt: skip
    done = subprocess.run([exe, "generate", "--json"], input=json.dumps(one), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert answer["valid"] and answer["bundles"]
    assert all(set(b["items"]) <= {"cam", "bag", "sd"} for b in answer["bundles"])

    done = subprocess.run([exe, "generate", "--json"], input="{not json", capture_output=True, text=True)
    assert done.returncode == 1 and "<stdin>: not valid JSON" in done.stderr


def test_demo_prints_bundles_and_both_tables(tmp_path, cli):
    r = cli("demo", "--limit", "2", "--show", "1", "--out", tmp_path / "demo")
    assert r.exit_code == 0, r.output
    assert "built-in SAMPLE" in r.output
    assert "Student: smollm2-bundles" in r.output and "adapter adapter.gguf" in r.output and "--model base" in r.output
    assert "predicted: [" in r.output and "truth: [" in r.output
    assert "Quality" in r.output and "strict F1" in r.output
    assert "Latency and memory" in r.output and "peak RSS (MiB)" in r.output
    assert json.loads((tmp_path / "demo" / "scores.json").read_text())["sessions"] == 2
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert summary["student"]["name"] == "smollm2-bundles" and len(summary["run"]["adapters"]) == 1
