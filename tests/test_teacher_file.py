"""The local teacher's file: chunk packages found without importing them, assembled once, sha256-checked
at every load, and named as itself in bench rows and grids. A small fake teacher (three chunk packages of a
few bytes) stands in for the 1.1 GB one."""

import hashlib
import sys
from dataclasses import replace

import pytest

from bundlekd_edge import BkdError
from bundlekd_edge.bench.engines import parse_engine
from bundlekd_edge.experiment.grid import Grid
from bundlekd_edge.runtime import teacher_file
from bundlekd_edge.runtime.model_file import resolve_model

CHUNKS = [b"GGUF" + b"a" * 60, b"b" * 64, b"c" * 17]


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """A teacher `fake` of three chunk packages on sys.path whose __init__ would fail if imported."""
    site = tmp_path / "site"
    for i, chunk in enumerate(CHUNKS, 1):
        package = site / f"fakepart{i}"
        (package / "data").mkdir(parents=True)
        (package / "data" / f"part{i:02d}.bin").write_bytes(chunk)
        (package / "__init__.py").write_text("raise RuntimeError('a chunk package was imported')\n")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("BKD_CACHE", str(tmp_path / "cache"))
    whole = b"".join(CHUNKS)
    teacher = replace(
        teacher_file.QWEN_1_5B, name="fake", file="fake.gguf", sha256=hashlib.sha256(whole).hexdigest(),
        size=len(whole), packages=("fakepart1", "fakepart2", "fakepart3"),
    )  # fmt: skip
    monkeypatch.setattr(teacher_file, "TEACHERS", {"fake": teacher})
    return teacher


def test_assembled_once_then_checked_at_every_load(fake, tmp_path):
    path = resolve_model("fake")
    assert path == tmp_path / "cache" / "teachers" / "fake.gguf"
    assert path.read_bytes() == b"".join(CHUNKS)
    assert not [m for m in sys.modules if m.startswith("fakepart")]  # located, never imported
    assert [p.name for p in path.parent.iterdir()] == ["fake.gguf"]  # no temporary file left
    assert teacher_file.teacher_label("gguf:fake") == fake.label == teacher_file.teacher_label(path)
    assert teacher_file.teacher_label("gguf:default") == ""
    assert parse_engine("t=gguf:fake").label == fake.label and parse_engine("t=gguf:fake,label=x").label == "x"
    assert Grid(teacher="gguf:fake").teacher_name == fake.label and Grid().teacher_name == "teacher stand-in"

    path.write_bytes(b"GGUF" + b"x" * (fake.size - 4))  # same size, other bytes
    bad = hashlib.sha256(path.read_bytes()).hexdigest()
    for name in ("fake", path):  # by name, and a path of the pinned size
        with pytest.raises(BkdError) as e:
            resolve_model(name)
        assert str(path) in str(e.value) and bad in str(e.value) and fake.sha256 in str(e.value)

    path.unlink()  # deleted: assembled again from the packages
    assert resolve_model("fake").read_bytes() == b"".join(CHUNKS)


def test_parts_that_do_not_match_the_pin_leave_nothing(fake, tmp_path, monkeypatch):
    monkeypatch.setitem(teacher_file.TEACHERS, "fake", replace(fake, sha256="0" * 64))
    with pytest.raises(BkdError, match="assembled parts have sha256 .* not the pinned 0{64}"):
        resolve_model("fake")
    assert not list((tmp_path / "cache" / "teachers").iterdir())

    monkeypatch.setitem(teacher_file.TEACHERS, "fake", replace(fake, packages=(*fake.packages, "fakepart9")))
    with pytest.raises(BkdError, match=r"package fakepart9 is not installed \(pip install -e \"\.\[teacher\]\"\)"):
        resolve_model("fake")
