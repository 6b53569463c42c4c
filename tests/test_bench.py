"""`bkd-edge bench`: real engines in fresh processes (llama.cpp student, a real OpenAI-compatible
server on 127.0.0.1, baselines), a broken engine reported in its row, report files, resume."""

import json
from pathlib import Path

import pytest

from bundlekd_edge import BkdError
from bundlekd_edge.bench import BenchOptions, parse_engine, run_bench
from bundlekd_edge.bench.worker import kv_cache_bytes
from bundlekd_edge.data import load_sessions
from bundlekd_edge.metrics import Prediction, evaluate
from bundlekd_edge.runtime import default_model_path
from tests.conftest import LlamaServer


def test_parse_engine(tmp_path):
    s = parse_engine("student=default")
    assert (s.name, s.kind, s.model, s.pack) == ("student", "llama", "default", "")
    s = parse_engine(f"tuned=gguf:/x/m.gguf,pack={tmp_path},label=fine-tuned")
    assert (s.kind, s.model, s.pack, s.label) == ("llama", "/x/m.gguf", str(tmp_path), "fine-tuned")
    assert parse_engine("t=http://127.0.0.1:8080/v1").kind == "http"
    s = parse_engine("t=https://api.example.com/v1,constraint=json-schema,key=MY_KEY")
    assert (s.kind, s.constraint, s.api_key_env) == ("http", "json-schema", "MY_KEY")
    assert parse_engine("w=baseline:whole").kind == "baseline"
    assert parse_engine("x=default,pack=none").pack == "none"  # not even an export's own pack
    s = parse_engine("b=base,adapter=/x/a.gguf:0.5,adapter=/x/b.gguf")
    assert (s.model, s.adapters) == ("base", ["/x/a.gguf:0.5", "/x/b.gguf:1"])
    assert parse_engine("j=base,jump=on").jump_forward and not parse_engine("j=base,jump=off").jump_forward
    with pytest.raises(BkdError, match="out of range"):
        parse_engine("b=base,adapter=/x/a.gguf:9")
    for bad in ("noequals", "=default", "a b=default", "x=default,colour=red", f"w=baseline:whole,pack={tmp_path}",
                "x=default,pack=/no/such/pack", "w=baseline:whole,adapter=/x/a.gguf", "t=http://h/v1,constraint=xml",
                "x=default,key=MY_KEY", "t=http://h/v1,adapter=/x/a.gguf", "j=base,jump=yes",
                "w=baseline:whole,jump=on", "t=http://h/v1,jump=on"):  # fmt: skip
        with pytest.raises(BkdError):
            parse_engine(bad)


@pytest.fixture(scope="module")
def bench(sample_path, tmp_path_factory):
    """One bench over every kind of engine, measured once for the module's tests."""
    out = tmp_path_factory.mktemp("bench")
    broken = out / "broken.gguf"
    broken.write_bytes(default_model_path().read_bytes()[: 2**20])  # a truncated download
    server = LlamaServer().start()
    try:
        specs = [
            parse_engine(f"teacher={server.url},label=teacher stand-in"),
            parse_engine("student=default"),
            parse_engine(f"broken={broken}"),
            parse_engine("whole=baseline:whole"),
            parse_engine("pairs=baseline:pairs"),
        ]
        opt = BenchOptions(sessions=str(sample_path), split="test", warmup=1, cold=1, concurrency=[1, 2],
                           throughput_sessions=2, threads=1)  # fmt: skip
        report = run_bench(specs, opt, out, teacher="teacher", compare=[("student", "whole")])
    finally:
        server.stop()
    return report, out, specs, opt


def test_bench_rows(bench, sample_path):
    report, out, _, _ = bench
    rows = {r["name"]: r for r in report["rows"]}
    assert list(rows) == ["teacher", "student", "broken", "whole", "pairs"]
    gold = load_sessions(sample_path, split="test")
    for name in ("teacher", "student", "whole", "pairs"):
        r = rows[name]
        assert r["status"] == "ok", r.get("error")
        assert r["quality"]["sessions"] == len(gold)
        assert r["quality"]["hallucination_rate"] == 0.0
        assert r["latency"]["latency_p50_s"] > 0
        preds = [json.loads(line) for line in (out / "rows" / f"{name}.pred.jsonl").open()]
        assert [p["session_id"] for p in preds] == [s.session_id for s in gold]

    # The baseline's scores are exactly what scoring its predictions directly gives.
    whole = {s.session_id: Prediction(s.session_id, [[it.id for it in s.items]]) for s in gold}
    assert rows["whole"]["quality"] == evaluate(gold, whole)

    student = rows["student"]
    lat, mem = student["latency"], student["memory"]
    assert student["quality"]["valid_rate"] == 1.0
    for key in ("ttft_cached_p50_s", "ttft_uncached_p50_s", "prefill_tps", "decode_tps", "sessions_per_min"):
        assert lat[key] > 0, key
    assert lat["uncached_prompt_tokens_mean"] > 0
    assert mem["peak_rss"] >= mem["rss_file"] > 0 and mem["rss_anon"] > 0
    assert mem["model_file_bytes"] == Path(student["engine"]["model"]).stat().st_size  # the form that ran
    # SmolLM2-135M: 30 layers, 3 KV heads of 64 dims, f16 K and V at n_ctx 2048.
    assert mem["kv_cache_bytes"] == 2048 * 30 * 3 * (64 + 64) * 2
    assert [t["concurrency"] for t in student["throughput"]] == [1, 2]
    assert all(t["sessions_per_min"] > 0 for t in student["throughput"])
    assert len(student["model_sha256"]) == 64

    # Ratios against the teacher row are the plain quotients of the two rows' numbers.
    ratio = student["vs_teacher"]["latency_p50_s"]
    assert ratio == pytest.approx(lat["latency_p50_s"] / rows["teacher"]["latency"]["latency_p50_s"])
    assert "teacher" not in rows["teacher"].get("vs_teacher", {})
    assert report["comparisons"][0]["engine"] == "student"


def test_generate_demo_and_bench_run_the_same_student_the_same_way(bench, cli, sample_path, tmp_path):
    """One road: the three commands resolve `--model default` to the same student (adapter, pack,
    prompt settings, context) and give each session the same prompt tokens and the same answer."""
    _, out, _, _ = bench

    def answers(path):
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        return [(r["session_id"], r["raw"], r["bundles"], r["timing"]["prompt_tokens"]) for r in rows]

    r = cli("generate", "--model", "default", "--sessions", sample_path, "--split", "test", "--threads", "1",
            "--out", tmp_path / "generate.jsonl", "--quiet")  # fmt: skip
    assert r.exit_code == 0, r.output
    r = cli("demo", "--sessions", sample_path, "--split", "test", "--threads", "1", "--out", tmp_path / "demo")
    assert r.exit_code == 0, r.output
    bench_answers = answers(out / "rows" / "student.pred.jsonl")
    assert answers(tmp_path / "generate.jsonl") == bench_answers
    assert answers(tmp_path / "demo" / "predictions.jsonl") == bench_answers


def test_broken_engine_is_reported_in_its_row(bench):
    report, out, _, _ = bench
    broken = next(r for r in report["rows"] if r["name"] == "broken")
    assert broken["status"] == "failed"
    assert "truncated" in broken["error"] and "broken.gguf" in broken["error"]
    md = (out / "report.md").read_text()
    assert "## Failed engines" in md and "`broken`" in md


def test_report_files(bench):
    report, out, _, opt = bench
    saved = json.loads((out / "report.json").read_text())
    assert saved["rows"] == report["rows"]
    repro = saved["reproducibility"]
    assert repro["n_ctx"] == opt.n_ctx and repro["threads"] == 1 and repro["seed"] == 0
    assert len(repro["sessions_sha256"]) == 64 and repro["models"]["student"] == report["rows"][1]["model_sha256"]
    assert repro["cpu"]["cores_usable"] >= 1 and repro["llama_cpp_system_info"]
    md = (out / "report.md").read_text()
    for section in ("## Quality", "## Latency", "## Memory", "## Batch throughput", "## Ratios against the teacher"):
        assert section in md
    for png in ("quality_latency.png", "memory.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    from bundlekd_edge.artifacts import verify_folder

    assert verify_folder(out, "bkd-bench/1", "bench report") == []  # every file listed, as written
    assert {"report.json", "report.md", "memory.png", "rows/student.json"} <= set(
        json.loads((out / "manifest.json").read_text())["files"]
    )


def test_rerun_reuses_finished_rows(bench):
    report, out, specs, opt = bench
    again = run_bench([s for s in specs if s.name in ("student", "whole")], opt, out)
    assert all(r.get("reused") for r in again["rows"])
    assert again["rows"][0]["quality"] == report["rows"][1]["quality"]


def test_kv_cache_bytes_needs_the_shape():
    assert kv_cache_bytes({"general.architecture": "llama"}, 2048) is None
    md = {"general.architecture": "gemma3", "gemma3.block_count": "2", "gemma3.attention.head_count": "4",
          "gemma3.attention.head_count_kv": "1", "gemma3.embedding_length": "640",
          "gemma3.attention.key_length": "256", "gemma3.attention.value_length": "256"}  # fmt: skip
    assert kv_cache_bytes(md, 100) == 100 * 2 * 1 * 512 * 2


def test_bench_cli_exits_nonzero_when_an_engine_fails(cli, sample_path, tmp_path):
    r = cli("bench", "--sessions", sample_path, "--out", tmp_path / "b", "--engine", "whole=baseline:whole",
            "--engine", f"missing={tmp_path / 'nope.gguf'}", "--throughput-sessions", 0)  # fmt: skip
    assert r.exit_code == 1
    assert "missing: FAILED" in r.output and "| whole" in r.output


def test_a_sessions_file_without_val_warms_up_on_the_split_itself(sample_path, tmp_path):
    """The warm-up takes val sessions when the file has them, else the scored split's own first ones."""
    from bundlekd_edge.data import write_sessions

    no_val = tmp_path / "no-val.jsonl"
    write_sessions(no_val, [s for s in load_sessions(sample_path) if s.split != "val"])
    opt = BenchOptions(sessions=str(no_val), split="test", limit=2, warmup=1, cold=1, concurrency=[1],
                       throughput_sessions=0, threads=1)  # fmt: skip
    report = run_bench([parse_engine("student=default")], opt, tmp_path / "b")
    (row,) = report["rows"]
    assert row["status"] == "ok", row.get("error")
    assert row["quality"]["sessions"] == 2
