"""`generate --model http://...`: REAL llama-cpp-python servers on 127.0.0.1 serving the default GGUF,
against the in-process engine: same answers, several servers, a server killed mid-run."""

import json
import subprocess
import time

import pytest

from bundlekd_edge import BkdError
from bundlekd_edge.prompts import PromptConfig
from bundlekd_edge.runtime.remote import RemoteConfig, Server, parse_server
from tests.conftest import LlamaServer, answers, bkd_edge

N = 6  # sessions per remote run: the first N of the sample


def first(path, n=N) -> list[tuple]:
    ids = [json.loads(line)["session_id"] for line in path.read_text().splitlines()][:n]
    return [a for a in answers(path) if a[0] in ids]


def generate(sample_path, out, *servers, extra=()) -> subprocess.CompletedProcess:
    models = [arg for url in servers for arg in ("--model", url)]
    cmd = [bkd_edge(), "generate", *models, "--student", "base", "--sessions", str(sample_path), "--limit", str(N),
           "--out", str(out), "--quiet", *extra]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def test_a_server_answers_as_the_engine_does(tmp_path, sample_path, uninterrupted):
    server = LlamaServer().start()
    try:
        out = tmp_path / "remote.jsonl"
        done = generate(sample_path, out, server.url + "/v1")
        assert done.returncode == 0, done.stderr
        assert f"{N} sessions generated now" in done.stdout and "sessions/min" in done.stdout
        assert answers(out) == first(uninterrupted)  # greedy under the same grammar: byte-identical answers
        settings = json.loads((tmp_path / "remote.jsonl.run.json").read_text())
        assert settings["complete"] and settings["settings"]["constraint"] == "gbnf"
    finally:
        server.stop()


def test_two_servers_share_a_run_and_survive_one_killed(tmp_path, sample_path, uninterrupted):
    a, b = LlamaServer().start(), LlamaServer().start()
    out = tmp_path / "two.jsonl"
    try:
        cmd = [bkd_edge(), "generate", "--model", a.url, "--model", b.url + "/v1,concurrency=1", "--student", "base",
               "--sessions", str(sample_path), "--limit", str(N), "--out", str(out), "--quiet",
               "--retries", "1"]  # fmt: skip
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 300
        while (not out.exists() or len(out.read_text().splitlines()) < 2) and time.monotonic() < deadline:
            time.sleep(0.05)
        a.stop()  # mid-run: its request in flight fails, is retried, then b takes its sessions
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, stderr
        assert answers(out) == first(uninterrupted)
    finally:
        a.stop()
        b.stop()


def test_a_run_whose_only_server_dies_resumes_on_another(tmp_path, sample_path, uninterrupted):
    server = LlamaServer().start()
    out = tmp_path / "pred.jsonl"
    try:
        cmd = [bkd_edge(), "generate", "--model", server.url, "--student", "base", "--sessions", str(sample_path),
               "--limit", str(N), "--out", str(out), "--quiet", "--retries", "1"]  # fmt: skip
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 300
        while (not out.exists() or len(out.read_text().splitlines()) < 2) and time.monotonic() < deadline:
            time.sleep(0.05)
        server.stop()
        _, stderr = proc.communicate(timeout=120)
    finally:
        server.stop()
    kept = len(out.read_text().splitlines())
    assert proc.returncode == 1 and 2 <= kept < N
    assert f"server {server.url}/v1/chat/completions: connection refused" in stderr and "Traceback" not in stderr

    other = LlamaServer().start()  # another address, the same model: the run's settings still hold
    try:
        resumed = generate(sample_path, out, other.url, extra=["--resume"])
    finally:
        other.stop()
    assert resumed.returncode == 0, resumed.stderr
    assert f"{N - kept} sessions generated now ({kept} from before)" in resumed.stdout
    assert answers(out) == first(uninterrupted)


def test_a_prompt_longer_than_the_servers_context_is_that_sessions_error(tmp_path, sample_path, uninterrupted):
    """The server's context window is its own (not known here): a prompt it refuses as too long is
    recorded as that session's error and the run goes on (its only server was not dropped)."""
    fit, too_long = ["sample-07"], "long"  # sample-07: prompt + answer cap ~360 tokens
    rows = [json.loads(line) for line in sample_path.read_text().splitlines()]
    # a session whose prompt alone is longer than 512 tokens: the items of three sessions in one
    items = [{**item, "id": f"{r['session_id']}-{item['id']}"} for r in rows[:3] for item in r["items"]]
    long = {**rows[0], "session_id": too_long, "items": items,
            "bundles": [{"intent": "all of it", "items": [i["id"] for i in items]}]}  # fmt: skip
    sessions = tmp_path / "sessions.jsonl"
    sessions.write_text("".join(json.dumps(r) + "\n" for r in [*(r for r in rows if r["session_id"] in fit), long]))
    server = LlamaServer("--n_ctx", "512").start()
    try:
        out = tmp_path / "pred.jsonl"
        done = subprocess.run([bkd_edge(), "generate", "--model", server.url, "--student", "base", "--sessions",
                               str(sessions), "--out", str(out), "--quiet"], capture_output=True, text=True,
                              timeout=600)  # fmt: skip
    finally:
        server.stop()
    assert done.returncode == 0, done.stderr
    records = {r["session_id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert not records[too_long]["valid"] and "prompt refused" in records[too_long]["error"]
    assert "context" in records[too_long]["error"] and "512" in records[too_long]["error"]
    assert [a for a in answers(out) if a[0] in fit] == [a for a in answers(uninterrupted) if a[0] in fit]


def test_the_shipped_student_on_a_server_with_its_adapter(tmp_path, cli, sample_path):
    """The compact student: candidates scored by the server's log-probabilities, chosen as in-process."""
    from bundlekd_edge.student import resolve_student

    student = resolve_student("default")
    server = LlamaServer("--lora_path", str(student.adapters[0].path), "--n_ctx", str(student.pack.n_ctx())).start()
    try:
        remote, local = tmp_path / "remote.jsonl", tmp_path / "local.jsonl"
        r = cli("generate", "--model", server.url, "--sessions", sample_path, "--limit", 3, "--out", remote, "--quiet")
        assert r.exit_code == 0, r.output
    finally:
        server.stop()
    r = cli("generate", "--sessions", sample_path, "--limit", 3, "--out", local, "--quiet")
    assert r.exit_code == 0, r.output
    # the same partitions chosen; the intents may differ: the server runs the adapter over the Q4_1 base,
    # locally the default runs merged at this machine's quant
    partitions = [[(a[0], [b["items"] for b in a[1]]) for a in answers(path)] for path in (remote, local)]
    assert partitions[0] == partitions[1]
    assert all(a[2] for a in answers(remote))


def test_server_options_are_checked_before_any_request(cli, sample_path, tmp_path):
    assert parse_server("http://h:1/v1,concurrency=3") == Server("http://h:1/v1", 3)
    for bad in ("http://h:1/v1,concurrency=0", "http://h:1/v1,threads=2", "http://h:1/v1,concurrency=x"):
        with pytest.raises(BkdError, match="server"):
            parse_server(bad)
    with pytest.raises(BkdError, match="compact.*JSON schema cannot describe"):
        RemoteConfig((Server("http://h:1"),), PromptConfig(answer_format="compact"), constraint="json-schema")
    with pytest.raises(BkdError, match="constraint 'xml'"):
        RemoteConfig((Server("http://h:1"),), constraint="xml")
    out = tmp_path / "p.jsonl"
    r = cli("generate", "--model", "base", "--model", "http://127.0.0.1:9/v1", "--sessions", sample_path, "--out", out)
    assert r.exit_code == 2 and "one model, or one or more server URLs" in r.output
    r = cli(
        "generate", "--model", "http://127.0.0.1:9/v1", "--adapter", "x.gguf", "--sessions", sample_path, "--out", out
    )
    assert r.exit_code == 2 and "a server applies its own adapters" in r.output
    assert not out.exists()
