"""Teacher clients against a REAL OpenAI-compatible server (llama-cpp-python's, serving the default
GGUF on 127.0.0.1) and, for retry/backoff only, a tiny scripted HTTP server."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from bundlekd_edge import BkdError
from bundlekd_edge.knowledge import CallCache, TeacherConfig, TeacherError, make_teacher
from bundlekd_edge.openai_client import normalise_base_url
from bundlekd_edge.prompts import PromptConfig, output_schema
from tests.conftest import LlamaServer, free_port


@pytest.fixture(scope="module")
def llama_server():
    server = LlamaServer().start()
    yield server
    server.stop()


def bundle_request(n_items: int, k: int = 0) -> dict:
    items = ["Canon EOS DSLR camera", "Padded camera bag", "SanDisk 64GB SD card", "HDMI cable", "USB charger"]
    text = "\n".join(f"{i}. {t}" for i, t in enumerate(items[:n_items], 1))
    messages = [
        {"role": "system", "content": "Group items bought together. Answer in JSON."},
        {"role": "user", "content": f"Session {k}:\n{text}"},
    ]
    # One short bundle at most: a few dozen tokens, so the suite stays quick on 2 busy cores.
    schema = output_schema(n_items, PromptConfig(max_bundles=1, intent_chars=12))
    return {"messages": messages, "schema": schema, "max_tokens": 64}


def fast(cache_dir=None, **kw) -> TeacherConfig:
    return TeacherConfig(retries=2, backoff_s=0.01, timeout_s=30, cache_dir=cache_dir, **kw)


# ---------------------------------------------------------------- real llama.cpp server


def test_real_server_schema_cache_and_secret(llama_server, tmp_path, monkeypatch):
    monkeypatch.setenv("BKD_TEST_TEACHER_KEY", "sk-test-secret-123")
    config = fast(tmp_path / "cache", api_key_env="BKD_TEST_TEACHER_KEY", concurrency=2)
    teacher = make_teacher(llama_server.url, config)  # no /v1: normalised; model discovered from /v1/models
    assert teacher.name == llama_server.url + "/v1" and teacher.model.endswith(".gguf")

    requests = [bundle_request(3, k) for k in range(2)]
    replies = teacher.map(requests)
    for reply in replies:
        answer = json.loads(reply.text)  # schema-constrained: always valid JSON
        assert set(answer) == {"bundles"}
        assert all(1 <= x <= 3 for b in answer["bundles"] for x in b["items"])
        assert not reply.cached and reply.usage["completion_tokens"] > 0
    assert teacher.describe()["schema_mode"] == "json_object"  # llama.cpp rejected json_schema; auto switched
    assert (teacher.stats.made, teacher.stats.cached, teacher.stats.failed) == (2, 0, 0)
    assert teacher.stats.tokens == sum(r.usage["prompt_tokens"] + r.usage["completion_tokens"] for r in replies)

    # A rerun costs nothing: same answers, served from disk, in request order.
    again = make_teacher(llama_server.url + "/v1/chat/completions", config)
    assert [r.text for r in again.map(requests)] == [r.text for r in replies]
    assert (again.stats.made, again.stats.cached, again.stats.tokens) == (0, 2, 0)

    files = list((tmp_path / "cache").rglob("*.json"))
    assert len(files) == 2 == len(CallCache(tmp_path / "cache"))
    assert all("sk-test-secret" not in f.read_text() for f in files)
    assert "sk-test-secret" not in json.dumps(teacher.describe())


def test_server_killed_mid_run_then_resumed_from_cache(tmp_path):
    server = LlamaServer().start()
    requests = [bundle_request(2, k) for k in range(4)]
    config = fast(tmp_path / "cache", concurrency=1)
    teacher = make_teacher(server.url, config)
    model = teacher.model

    def kill_after_second(i, reply):
        if teacher.stats.made == 2:
            server.stop()

    try:
        with pytest.raises(TeacherError, match=rf"teacher {server.url}/v1/chat/completions: (connection|cannot)"):
            teacher.map(requests, on_done=kill_after_second)
    finally:
        server.stop()
    assert (teacher.stats.made, teacher.stats.failed) == (2, 1)
    assert len(CallCache(tmp_path / "cache")) == 2  # every finished call was kept

    restarted = LlamaServer().start()  # a new port: the cache is keyed by model, not by address
    try:
        resumed = make_teacher(restarted.url, fast(tmp_path / "cache", concurrency=1, model=model))
        replies = resumed.map(requests)
    finally:
        restarted.stop()
    assert (resumed.stats.cached, resumed.stats.made, resumed.stats.failed) == (2, 2, 0)
    assert [r.cached for r in replies] == [True, True, False, False]
    assert len(CallCache(tmp_path / "cache")) == 4


def test_unreachable_endpoint_is_a_fast_clear_error(tmp_path):
    port = free_port()  # nothing listens here
    t0 = time.monotonic()
    with pytest.raises(
        TeacherError, match=rf"teacher http://127.0.0.1:{port}/v1/models: connection refused.*3 attempts"
    ):
        make_teacher(f"http://127.0.0.1:{port}", fast())
    teacher = make_teacher(f"http://127.0.0.1:{port}/v1", fast(tmp_path / "c", model="m"))  # no contact needed
    with pytest.raises(TeacherError, match=rf"127.0.0.1:{port}/v1/chat/completions: connection refused"):
        teacher.complete(**bundle_request(2))
    assert time.monotonic() - t0 < 5
    assert (teacher.stats.failed, teacher.stats.retries, len(CallCache(tmp_path / "c"))) == (1, 2, 0)


def test_teacher_specs():
    assert normalise_base_url("http://h:1/v1/") == "http://h:1/v1"
    assert normalise_base_url("https://api.example.com/v1/chat/completions") == "https://api.example.com/v1"
    for bad in ("ftp://x", "teacher.gguf", "gguf:"):
        with pytest.raises(BkdError, match="teacher"):
            make_teacher(bad)
    with pytest.raises(BkdError, match="no such model file"):
        make_teacher("gguf:/nonexistent/teacher.gguf")
    with pytest.raises(BkdError, match="schema mode"):
        make_teacher("http://127.0.0.1:9/v1", TeacherConfig(model="m", schema_mode="xml"))


def test_gguf_teacher_through_the_runtime(tmp_path):
    teacher = make_teacher("gguf:default", TeacherConfig(cache_dir=tmp_path / "c", n_ctx=1024))
    assert teacher.model.startswith("gguf:SmolLM2-135M-Instruct.Q4_1.gguf:")
    reply = teacher.complete(**bundle_request(2))
    assert set(json.loads(reply.text)) == {"bundles"} and reply.usage["prompt_tokens"] > 0
    assert teacher.complete(**bundle_request(2)).cached
    assert (teacher.stats.made, teacher.stats.cached) == (1, 1)


# ---------------------------------------------------------------- retries and backoff (scripted server)


class Scripted:
    """A loopback server that answers POSTs from a script of (status, headers, delay_s) steps."""

    def __init__(self, steps):
        self.steps, self.seen = list(steps), []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                outer.seen.append({"auth": self.headers.get("Authorization"), "body": None, "method": "GET"})
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.seen.append({"auth": self.headers.get("Authorization"), "body": body})
                status, headers, delay = outer.steps.pop(0) if outer.steps else (200, {}, 0)
                time.sleep(delay)
                answer = {"error": "no"}
                if status == 200:
                    answer = {"choices": [{"message": {"content": '{"ok": 1}'}, "finish_reason": "stop"}],
                              "usage": {"prompt_tokens": 7, "completion_tokens": 3}}  # fmt: skip
                data = json.dumps(answer).encode()
                try:
                    self.send_response(status)
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out and left

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self):
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def test_429_and_500_are_retried_with_backoff(monkeypatch):
    monkeypatch.setenv("BKD_TEST_TEACHER_KEY", "sk-abc")
    with Scripted([(429, {"Retry-After": "0.2"}, 0), (500, {}, 0), (503, {}, 0)]) as srv:
        teacher = make_teacher(
            srv.url, TeacherConfig(model="m", retries=3, backoff_s=0.01, api_key_env="BKD_TEST_TEACHER_KEY")
        )
        t0 = time.monotonic()
        reply = teacher.complete([{"role": "user", "content": "hi"}], schema={"type": "object"})
        assert time.monotonic() - t0 >= 0.2  # Retry-After honoured over the shorter backoff
    assert reply.text == '{"ok": 1}' and reply.usage == {"prompt_tokens": 7, "completion_tokens": 3}
    assert (teacher.stats.made, teacher.stats.retries, teacher.stats.tokens) == (1, 3, 10)
    assert srv.seen[0]["auth"] == "Bearer sk-abc"
    assert srv.seen[0]["body"]["response_format"]["type"] == "json_schema"  # OpenAI's form first


def test_timeouts_are_retried_then_reported():
    with Scripted([(200, {}, 1.0)]) as srv:  # the first answer is too slow, the retry is fine
        teacher = make_teacher(srv.url, TeacherConfig(model="m", timeout_s=0.3, retries=2, backoff_s=0.01))
        assert teacher.complete([{"role": "user", "content": "hi"}]).text == '{"ok": 1}'
        assert teacher.stats.retries == 1
    with Scripted([(200, {}, 1.0)] * 3) as srv:
        teacher = make_teacher(srv.url, TeacherConfig(model="m", timeout_s=0.3, retries=2, backoff_s=0.01))
        with pytest.raises(TeacherError, match=rf"{srv.url}/chat/completions: timed out after 0.3 s \(3 attempts\)"):
            teacher.complete([{"role": "user", "content": "hi"}])
        assert (teacher.stats.failed, teacher.stats.retries) == (1, 2)


def test_client_errors_are_not_retried():
    with Scripted([(401, {}, 0)]) as srv:
        teacher = make_teacher(srv.url, TeacherConfig(model="m", retries=3, backoff_s=0.01))
        with pytest.raises(TeacherError, match=r"HTTP 401 \(check the API key variable\)"):
            teacher.complete([{"role": "user", "content": "hi"}])
        assert (len(srv.seen), teacher.stats.retries, teacher.stats.failed) == (1, 0, 1)


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_a_redirect_is_refused_and_the_key_never_leaves(monkeypatch, tmp_path, status):
    monkeypatch.setenv("BKD_TEST_TEACHER_KEY", "sk-secret")
    with Scripted([]) as elsewhere:
        target = elsewhere.url + "/chat/completions"
        with Scripted([(status, {"Location": target}, 0)]) as srv:
            config = TeacherConfig(model="m", retries=2, backoff_s=0.01, api_key_env="BKD_TEST_TEACHER_KEY")
            teacher = make_teacher(srv.url, config)
            with pytest.raises(TeacherError, match=f"HTTP {status} redirect to {target} refused"):
                teacher.complete([{"role": "user", "content": "hi"}])
            assert srv.seen[0]["auth"] == "Bearer sk-secret" and len(srv.seen) == 1  # not retried
    assert elsewhere.seen == []  # neither the key nor a GET reached the other host
