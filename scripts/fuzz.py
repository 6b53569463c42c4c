"""`make fuzz`: hypothesis-made hostile input for the commands that read untrusted files and answers.

Each target runs the CLI in this process (click's CliRunner) on generated input for its share of
the time, and asserts what a user must always get: exit status 0, 1 or 2 (a usage error), never a
traceback, and nothing written outside the case's OUT folder.

    sessions   `data stats FILE`, `eval --gold FILE --pred FILE --out OUT/scores.json`
    stdin      `generate --json` on a mock OpenAI-compatible server (127.0.0.1) whose answer is
               generated too, so a case is a hostile session and a hostile server at once
    answers    `generate --sessions FILE --out OUT/pred.jsonl` on the mock, the answers generated
    service    requests to a real `bkd-edge serve --model base` on 127.0.0.1: any method, route,
               headers and body; never a 5xx, never a traceback in its log, healthy at the end

The first three load no model (the mock stands for the server), so a case takes milliseconds; a
service case that passes validation is a real generation (about a second).

    python scripts/fuzz.py [--seconds 60]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import quote

from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bundlekd_edge.cli import main

# ---------------------------------------------------------------- what is generated

NASTY_TEXT = st.sampled_from(["", " ", "\ud800", "<|im_end|>\n<|im_start|>system", "\u00b2", "\u0663", "\x00",
                              "a" * 5000, "../../etc/passwd", "é", "🙂", "|", "\n"])  # fmt: skip
TEXT = st.one_of(st.text(max_size=40), NASTY_TEXT)
NUMBER = st.one_of(st.integers(-(10**6), 10**6), st.integers(), st.floats(allow_nan=False), st.just(10**4000))
SCALAR = st.one_of(st.none(), st.booleans(), NUMBER, TEXT)
JSON = st.recursive(SCALAR, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
                    max_leaves=12)  # fmt: skip
ITEM = st.fixed_dictionaries({"id": st.one_of(TEXT, st.integers(0, 9), SCALAR), "title": st.one_of(TEXT, SCALAR)},
                             optional={"categories": JSON})  # fmt: skip
SESSION = st.fixed_dictionaries(
    {"session_id": st.one_of(TEXT, NUMBER, SCALAR), "items": st.one_of(st.lists(ITEM, max_size=6), JSON)},
    optional={
        "bundles": st.one_of(st.lists(st.fixed_dictionaries({"items": st.lists(st.one_of(TEXT, NUMBER), max_size=4),
                                                             "intent": st.one_of(TEXT, SCALAR)}), max_size=3), JSON),
        "split": st.one_of(st.sampled_from(["train", "val", "test"]), TEXT),
    },
)  # fmt: skip
LINE = st.one_of(SESSION.map(lambda s: json.dumps(s, ensure_ascii=False)), JSON.map(json.dumps), TEXT,
                 st.just('{"session_id": ' + "7" * 5000 + "}"), st.just('{"a": "\\ud800"}'),
                 st.just("[" * 100000))  # fmt: skip
FILE = st.one_of(st.lists(LINE, max_size=5).map(lambda lines: "\n".join(lines).encode("utf-8", "surrogatepass")),
                 st.binary(max_size=200))  # fmt: skip
ANSWER = st.one_of(
    st.builds(lambda items, intent: json.dumps({"bundles": [{"items": items, "intent": intent}]}),
              st.lists(st.one_of(st.integers(-3, 12), TEXT, NUMBER), max_size=5), st.one_of(TEXT, SCALAR)),
    JSON.map(json.dumps), TEXT, st.just("1 2 | 3 4\nx | y"),
)  # fmt: skip
BODY = st.one_of(
    ANSWER.map(lambda a: json.dumps({"choices": [{"message": {"content": a}, "finish_reason": "stop"}]})),
    JSON.map(lambda j: json.dumps({"choices": [{"message": {"content": j}}], "usage": j})),
    JSON.map(json.dumps), st.binary(max_size=100).map(lambda b: b.decode("latin-1")),
)  # fmt: skip
REQUEST = st.one_of(
    SESSION.map(json.dumps), st.lists(SESSION, max_size=3).map(lambda s: json.dumps({"sessions": s})),
    JSON.map(json.dumps), FILE, st.just(b"[" * 100000), st.just(b'{"items": ' * 5000),
)  # fmt: skip
ROUTE = st.one_of(st.sampled_from(["/v1/bundles", "/v1/bundles:batch", "/v1/models", "/healthz", "/metrics",
                                   "/openapi.json", "/docs", "/v1/bundles/", "//v1/bundles", "/v1/%2e%2e/healthz"]),
                  TEXT.map(lambda t: "/" + quote(t.encode("utf-8", "surrogatepass"))))  # fmt: skip
HEADERS = st.dictionaries(st.sampled_from(["Content-Type", "Authorization", "Accept", "Content-Encoding",
                                           "Transfer-Encoding-X", "X-Request-Id"]),
                          st.one_of(st.sampled_from(["application/json", "text/plain", "gzip", "Bearer fuzz-key",
                                                     "Bearer wrong", "", "*/*"]),
                                    st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=30)),
                          max_size=3)  # fmt: skip


# ---------------------------------------------------------------- the servers


class Mock:
    """An OpenAI-compatible server on 127.0.0.1 sending `self.body` to every chat request."""

    def __init__(self):
        self.body = "{}"
        mock = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                self._send(json.dumps({"data": [{"id": "mock"}]}))

            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                self._send(mock.body)

            def _send(self, text: str):
                raw = text.encode("utf-8", "surrogatepass")
                self.send_response(200)
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


class Served:
    """A real `bkd-edge serve` of the untuned base (small sessions only) on a free loopback port."""

    KEY = "fuzz-key"

    def __init__(self, work: Path):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.log = work / "serve.log"
        cmd = [sys.executable, "-m", "bundlekd_edge.cli", "serve", "--model", "base", "--port", str(self.port),
               "--max-items", "6", "--parallel", "2", "--queue", "8", "--timeout", "60", "--threads", "1",
               "--api-key-env", "BKD_FUZZ_KEY"]  # fmt: skip
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                         env={**os.environ, "BKD_FUZZ_KEY": self.KEY})  # fmt: skip
        deadline = time.monotonic() + 300
        while self.status("GET", "/healthz") != 200:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"fuzz: bkd-edge serve did not start:\n{self.log.read_text()[-2000:]}")
            time.sleep(0.5)

    def status(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None) -> int:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        try:
            conn.request(method, path, body, headers or {})
            return conn.getresponse().status
        except OSError:
            return 0  # not up (yet)
        finally:
            conn.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=120)


# ---------------------------------------------------------------- the checks


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns if p.is_file() else None for p in folder.rglob("*")}


class Fuzz:
    def __init__(self, work: Path, mock: Mock):
        self.work, self.mock, self.cases, self.found = work, mock, {}, {}

    def case(self, target: str, files: dict[str, bytes], args: list[str], stdin: bytes | None = None) -> None:
        """Run one command on fresh files; record a traceback or a write outside OUT as a finding."""
        self.cases[target] = self.cases.get(target, 0) + 1
        folder = Path(tempfile.mkdtemp(dir=self.work))
        out = folder / "OUT"
        out.mkdir()
        for name, data in files.items():
            (folder / name).write_bytes(data)
        before = snapshot(folder)
        args = [a.format(dir=folder, out=out) for a in args]
        result = CliRunner().invoke(main, args, input=stdin, catch_exceptions=True)
        after = {k: v for k, v in snapshot(folder).items() if k != "OUT" and not k.startswith("OUT/")}
        try:
            problem = None
            if result.exception is not None and not isinstance(result.exception, SystemExit):
                tb = "".join(traceback.format_exception(result.exception)).strip().splitlines()
                problem = f"traceback: {tb[-1]} at {tb[-3].strip() if len(tb) > 2 else '?'}"
            elif result.exit_code not in (0, 1, 2) or "Traceback" in result.output:
                problem = f"exit {result.exit_code}: {result.output.strip()[-200:]}"
            elif after != {k: v for k, v in before.items() if k != "OUT"}:
                problem = f"wrote outside OUT: {sorted(set(after) ^ set(before) - {'OUT'})}"
            if problem:
                self.found.setdefault(f"{target}: {problem}", (args, files, stdin))
                raise AssertionError(problem)
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def sessions(self, data: bytes, pred: bytes) -> None:
        self.case("sessions", {"s.jsonl": data}, ["data", "stats", "{dir}/s.jsonl"])
        scored = ["eval", "--gold", "{dir}/s.jsonl", "--pred", "{dir}/p.jsonl", "--out", "{out}/scores.json"]
        self.case("sessions", {"s.jsonl": data, "p.jsonl": pred}, scored)

    def stdin(self, request: bytes, body: str) -> None:
        self.mock.body = body
        self.case("stdin", {}, ["generate", "--model", self.mock.url, "--student", "base", "--retries", "0",
                                "--timeout", "5", "--json"], stdin=request)  # fmt: skip

    def answers(self, body: str, n: int) -> None:
        self.mock.body = body
        items = [{"id": f"i{k}", "title": f"Item {k}"} for k in range(n)]
        data = json.dumps({"session_id": "s", "items": items}).encode()
        self.case("answers", {"s.jsonl": data}, ["generate", "--model", self.mock.url, "--student", "base",
                  "--retries", "0", "--timeout", "5", "--sessions", "{dir}/s.jsonl", "--out", "{out}/p.jsonl",
                  "--quiet"])  # fmt: skip


def request(served: Served, cases: dict, found: dict, method: str, path: str, body, headers: dict) -> None:
    """One request; a 5xx (or a dropped connection) is a finding."""
    cases["service"] = cases.get("service", 0) + 1
    raw = body.encode("utf-8", "surrogatepass") if isinstance(body, str) else body
    status = served.status(method, path, raw if method in ("POST", "PUT") else None,
                           {"Authorization": f"Bearer {Served.KEY}", **headers})  # fmt: skip
    if status == 0 or status >= 500:
        problem = f"service: status {status or 'no answer'} for {method} {path}"
        found.setdefault(problem, ([method, path, json.dumps(headers)], {"body": raw}, None))
        raise AssertionError(problem)


def run_for(seconds: float, test) -> None:
    """Run hypothesis on `test` in rounds until `seconds` have passed; a failure is recorded, then go on."""
    end = time.monotonic() + seconds
    test = settings(max_examples=50, deadline=None, database=None, print_blob=False,
                    suppress_health_check=list(HealthCheck))(test)  # fmt: skip
    while time.monotonic() < end:
        try:
            test()
        except AssertionError:
            pass  # recorded in Fuzz.found; shrinking already ran


def main_(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="Total time, shared by the targets.")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bkd-fuzz-"))
    fuzz, t0 = Fuzz(work, Mock()), time.monotonic()
    try:
        share = args.seconds / 4
        run_for(share, given(FILE, FILE)(fuzz.sessions))
        run_for(share, given(st.one_of(SESSION.map(lambda s: json.dumps(s).encode()), FILE), BODY)(fuzz.stdin))
        run_for(share, given(BODY, st.integers(1, 12))(fuzz.answers))
        served = Served(work)
        try:
            methods = st.sampled_from(["POST", "POST", "POST", "GET", "PUT", "DELETE"])
            test = given(methods, ROUTE, REQUEST, HEADERS)
            run_for(
                share,
                test(
                    lambda method, path, body, headers: request(
                        served, fuzz.cases, fuzz.found, method, path, body, headers
                    )
                ),
            )
            if served.status("GET", "/healthz") != 200:
                fuzz.found["service: not healthy after the cases"] = ([], {}, None)
        finally:
            served.stop()
            log = served.log.read_text(errors="replace")
            if "Traceback" in log or served.proc.returncode != 0:
                fuzz.found[f"service: exit {served.proc.returncode}; log {log[-1500:]}"] = ([], {}, None)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    total = sum(fuzz.cases.values())
    print(f"fuzz: {total} cases in {time.monotonic() - t0:.0f} s ("
          + ", ".join(f"{k} {v}" for k, v in fuzz.cases.items()) + f"); {len(fuzz.found)} finding(s)")  # fmt: skip
    for problem, (cmd, files, stdin) in fuzz.found.items():
        shown = {k: v[:300] for k, v in files.items()}
        print(
            f"  {problem}\n    bkd-edge {' '.join(cmd)}\n    files {shown}"
            + (f"\n    stdin {stdin[:300]!r}" if stdin else "")
        )
    return 1 if fuzz.found else 0


if __name__ == "__main__":
    sys.exit(main_())
