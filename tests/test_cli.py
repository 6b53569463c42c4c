import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bundlekd_edge.metrics import METRIC_KEYS
from tests.conftest import UNINTERRUPTED, answers, bkd_edge, session, write_lines


def test_generate_then_eval_writes_machine_readable_scores(tmp_path, cli, sample_path):
    pred, scores, summary = tmp_path / "pred.jsonl", tmp_path / "scores.json", tmp_path / "summary.json"
    r = cli("generate", "--sessions", sample_path, "--split", "test", "--out", pred, "--summary", summary, "--quiet")
    assert r.exit_code == 0, r.output
    assert "4 sessions generated now" in r.output and "100.0% valid" in r.output
    rows = [json.loads(line) for line in pred.read_text().splitlines()]
    assert [row["session_id"] for row in rows] == ["sample-17", "sample-18", "sample-19", "sample-20"]
    assert all(row["valid"] and row["timing"]["total_s"] > 0 for row in rows)
    # the hint computed ahead of the run (the pack's `prepare`) is counted in each session's latency
    assert all(0 < row["timing"]["prepare_s"] < row["timing"]["total_s"] for row in rows)
    assert json.loads(summary.read_text())["latency_p50_s"] > 0

    r = cli("eval", "--gold", sample_path, "--pred", pred, "--split", "test", "--out", scores)
    assert r.exit_code == 0, r.output
    assert "strict F1" in r.output and "hallucinated-item rate" in r.output
    result = json.loads(scores.read_text())
    assert set(METRIC_KEYS) | {"sessions"} <= set(result)
    assert result["sessions"] == 4 and result["valid_rate"] == 1.0 and result["hallucination_rate"] == 0.0


def test_shards_split_a_run_and_eval_scores_their_union(tmp_path, cli, sample_path):
    runs = {}
    for name, extra in (("all", ()), ("part-0", ("--shard", "0/2")), ("part-1", ("--shard", "1/2"))):
        out = tmp_path / f"{name}.jsonl"
        r = cli("generate", "--sessions", sample_path, "--limit", 6, "--out", out, "--quiet", *extra)
        assert r.exit_code == 0, r.output
        rows = map(json.loads, out.read_text().splitlines())
        runs[name] = {row["session_id"]: [b["items"] for b in row["bundles"]] for row in rows}
    assert runs["part-0"] and runs["part-1"] and not set(runs["part-0"]) & set(runs["part-1"])
    # same sessions, same partitions. An intent can differ at a near-tie: a session's prompt is evaluated
    # after the prefix it shares with the one before, so its batch split depends on that neighbour, and
    # on some CPUs and quants (merged Q4_K_S on an AVX-512 build) the rounding moves with the split
    assert {**runs["part-0"], **runs["part-1"]} == runs["all"]

    scores = {}
    for name, preds in (("all", ["--pred", tmp_path / "all.jsonl"]), ("parts", ["--pred", tmp_path / "part-*.jsonl"])):
        r = cli("eval", "--gold", sample_path, *preds, "--out", tmp_path / f"{name}.json")
        assert r.exit_code == 0, r.output
        scores[name] = json.loads((tmp_path / f"{name}.json").read_text())
    assert scores["parts"]["pred"] == [str(tmp_path / "part-0.jsonl"), str(tmp_path / "part-1.jsonl")]
    scores["parts"].pop("pred"), scores["all"].pop("pred")
    assert scores["parts"] == scores["all"]

    r = cli("eval", "--gold", sample_path, "--pred", tmp_path / "all.jsonl", "--pred", tmp_path / "part-0.jsonl")
    assert r.exit_code == 1 and "also predicted in" in r.output and "all.jsonl" in r.output
    r = cli("eval", "--gold", sample_path, "--pred", tmp_path / "nothing-*.jsonl")
    assert r.exit_code == 1 and "no file matches" in r.output
    r = cli("generate", "--sessions", sample_path, "--shard", "2/2", "--out", tmp_path / "x.jsonl")
    assert r.exit_code == 1 and "shard '2/2': expected K/N with 0 <= K < N" in r.output


def test_an_llm_judge_scores_intents_once_per_pair_and_caches(tmp_path, cli, sample_path):
    from bundlekd_edge.data import load_sessions

    gold = [s for s in load_sessions(sample_path) if len(s.bundles) >= 2][:2]
    gold_file = write_lines(tmp_path / "gold.jsonl", [s.to_dict() for s in gold])
    rows = [{"session_id": s.session_id, "bundles": [{"items": list(b.items), "intent": b.intent.upper()}
                                                      for b in s.bundles]} for s in gold]  # fmt: skip
    pred, out = write_lines(tmp_path / "pred.jsonl", rows), tmp_path / "scores.json"
    args = ["eval", "--gold", gold_file, "--pred", pred, "--judge", "gguf:default", "--judge-cache", tmp_path / "c"]
    r = cli(*args, "--out", out)
    assert r.exit_code == 0, r.output
    first = json.loads(out.read_text())
    pairs = sum(len(s.bundles) for s in gold)
    assert first["intent_judge_pairs"] == pairs and 0.0 <= first["intent_judge"] <= 1.0
    assert first["intent_judge_unparsed"] == 0  # the answer is schema-constrained: always a score
    assert first["intent_judge_calls"]["made"] == len({(b.intent.upper(), b.intent) for s in gold for b in s.bundles})
    assert "intent judge score" in r.output
    r = cli(*args, "--out", out, "--force")
    again = json.loads(out.read_text())
    assert again["intent_judge"] == first["intent_judge"] and again["intent_judge_calls"]["made"] == 0


def test_eval_scores_the_intents_of_matched_bundles(tmp_path, cli, sample_path):
    from bundlekd_edge.data import load_sessions

    gold = [s for s in load_sessions(sample_path) if len(s.bundles) >= 2]
    variants = {
        "named": lambda s, k: s.bundles[k].intent,  # the true names
        "swapped": lambda s, k: s.bundles[(k + 1) % len(s.bundles)].intent,  # another bundle's name
        "unnamed": lambda s, k: "",
    }
    gold_file, scores = write_lines(tmp_path / "gold.jsonl", [s.to_dict() for s in gold]), {}
    for name, intent in variants.items():
        rows = [{"session_id": s.session_id, "bundles": [{"items": list(b.items), "intent": intent(s, k)}
                                                          for k, b in enumerate(s.bundles)]} for s in gold]  # fmt: skip
        pred, out = write_lines(tmp_path / f"{name}.jsonl", rows), tmp_path / f"{name}.json"
        r = cli("eval", "--gold", gold_file, "--pred", pred, "--intents", "--out", out)
        assert r.exit_code == 0, r.output
        scores[name] = json.loads(out.read_text())
        assert scores[name]["strict_f1"] == 1.0 and scores[name]["sessions"] == len(gold)
    assert "intent cosine" in r.output
    assert scores["named"]["intent_cosine"] == pytest.approx(1.0, abs=1e-4) and scores["named"]["intent_exact"] == 1.0
    assert 0 < scores["swapped"]["intent_cosine"] < 0.9 and scores["swapped"]["intent_exact"] < 0.5
    assert scores["unnamed"]["intent_cosine"] == 0.0 and scores["unnamed"]["intent_pairs"] > 0


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
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    form = summary["student"]["form"]  # which form ran: the adapter merged on this machine, or over its base
    assert "Student: smollm2-bundles = " in r.output and f", {form}, " in r.output and "--model base" in r.output
    assert "predicted: [" in r.output and "truth: [" in r.output
    assert "Quality" in r.output and "strict F1" in r.output
    assert "Latency and memory" in r.output and "peak RSS (MiB)" in r.output
    assert json.loads((tmp_path / "demo" / "scores.json").read_text())["sessions"] == 2
    assert summary["student"]["name"] == "smollm2-bundles"
    assert len(summary["run"]["adapters"]) == (1 if form == "base + adapter" else 0) and form != "model"


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT])
def test_generate_killed_mid_run_resumes_to_the_same_file(tmp_path, sample_path, uninterrupted, sig):
    n = UNINTERRUPTED  # the first 8 sample sessions: a kill after 3 leaves work on both sides of it
    out = tmp_path / "pred.jsonl"
    cmd = [bkd_edge(), "generate", "--model", "base", "--sessions", str(sample_path), "--limit", str(n), "--out",
           str(out), "--quiet"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while (not out.exists() or len(out.read_text().splitlines()) < 3) and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    kept = len(out.read_text().splitlines())
    assert 3 <= kept < n, "killed mid-run, after 3 finished sessions"
    if sig == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL
    else:
        assert proc.returncode == 130 and "--resume" in err and "Traceback" not in err

    refused = subprocess.run(cmd, capture_output=True, text=True)  # without --resume the work is not overwritten
    assert refused.returncode == 1 and "--resume continues" in refused.stderr
    assert len(out.read_text().splitlines()) == kept

    resumed = subprocess.run(cmd + ["--resume"], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert f"{n - kept} sessions generated now ({kept} from before)" in resumed.stdout
    assert answers(out) == answers(uninterrupted)
    assert json.loads((tmp_path / "pred.jsonl.run.json").read_text())["complete"] is True


def test_resume_refuses_other_settings_and_a_cut_line_is_redone(tmp_path, sample_path, uninterrupted):
    out = tmp_path / "pred.jsonl"
    shutil.copy(uninterrupted, out)
    shutil.copy(uninterrupted.with_name("pred.jsonl.run.json"), tmp_path / "pred.jsonl.run.json")
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:5]) + lines[5][:40])  # a kill in the middle of writing line 6
    cmd = [bkd_edge(), "generate", "--model", "base", "--sessions", str(sample_path), "--limit", str(UNINTERRUPTED),
           "--out", str(out), "--quiet"]  # fmt: skip
    other = subprocess.run(cmd + ["--resume", "--seed", "7"], capture_output=True, text=True)
    assert other.returncode == 1 and "other settings (seed)" in other.stderr
    resumed = subprocess.run(cmd + ["--resume"], capture_output=True, text=True)
    assert resumed.returncode == 0 and "3 sessions generated now (5 from before)" in resumed.stdout
    assert answers(out) == answers(uninterrupted)


def test_outputs_never_clobber_inputs_or_other_files(tmp_path, cli, sample_path):
    data = tmp_path / "in.jsonl"
    shutil.copy(sample_path, data)
    before = data.read_bytes()
    r = cli("generate", "--sessions", data, "--out", data)
    assert r.exit_code == 1 and "an input of this command" in r.output
    r = cli("eval", "--gold", data, "--pred", data, "--out", data)
    assert r.exit_code == 1 and "an input of this command" in r.output
    mine = tmp_path / "notes.jsonl"
    mine.write_text("my own notes\n")
    r = cli("generate", "--sessions", data, "--out", mine, "--limit", "1")
    assert r.exit_code == 1 and "--force overwrites it" in r.output
    assert data.read_bytes() == before and mine.read_text() == "my own notes\n"
    r = cli("generate", "--sessions", data, "--out", tmp_path / "p.jsonl", "--limit", "-2")
    assert r.exit_code == 2 and "-2 is not in the range x>=0" in r.output


def test_one_item_sessions_are_skipped_and_eval_warns_about_missing_predictions(tmp_path, cli, sample_path):
    rows = [session("solo", n=1, bundles=()), session("pair", n=2, bundles=())]
    data = write_lines(tmp_path / "s.jsonl", rows)
    out = tmp_path / "p.jsonl"
    r = cli("generate", "--model", "base", "--sessions", data, "--out", out, "--quiet")
    assert r.exit_code == 0, r.output
    solo, pair = (json.loads(line) for line in out.read_text().splitlines())
    assert solo["bundles"] == [] and solo["skipped"] == "fewer than 2 items: no bundle possible"
    assert "skipped" not in pair and pair["valid"]
    r = cli("eval", "--gold", sample_path, "--pred", write_lines(tmp_path / "q.jsonl", [
        {"session_id": "sample-17", "bundles": []}]))  # fmt: skip
    assert r.exit_code == 0 and "warning: 19 of 20 gold sessions have no prediction" in r.output


def test_generate_json_refuses_bytes_that_are_not_utf8():
    done = subprocess.run([bkd_edge(), "generate", "--json"], input=b'{"items": [\xff]}', capture_output=True)
    assert done.returncode == 1 and b"<stdin>: not UTF-8 text" in done.stderr and b"Traceback" not in done.stderr
