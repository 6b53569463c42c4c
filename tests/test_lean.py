"""The lean edge path: what `generate` imports, the scipy-free matching, and the merged default
(made once per machine, cached, verified before use, rebuilt when changed)."""

import itertools
import json
import subprocess
import sys

import numpy as np
import pytest

from bundlekd_edge.data import load_sessions
from bundlekd_edge.metrics import _best_matching
from bundlekd_edge.student import resolve_student

FORBIDDEN = ("scipy", "torch", "transformers", "matplotlib", "pandas")
PROBE = """
import json, sys
from bundlekd_edge.cli import main
sys.argv = ["bkd-edge", "generate", "--json", "--model", sys.argv[1]]
try:
    main()
except SystemExit as e:
    assert not e.code, e.code
print(json.dumps(sorted(m for m in sys.modules if "." not in m)), file=sys.stderr)
"""


def _modules_of_generate(model: str, session: dict) -> set[str]:
    done = subprocess.run([sys.executable, "-c", PROBE, model], input=json.dumps(session), capture_output=True,
                          text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout)["bundles"] is not None
    return set(json.loads(done.stderr.strip().splitlines()[-1]))


@pytest.fixture(scope="module")
def one_session(sample_path) -> dict:
    s = next(s for s in load_sessions(sample_path, split="test"))
    return {"session_id": s.session_id, "items": [vars(i) for i in s.items]}


def test_generate_without_a_pack_imports_no_scipy_torch_or_encoder(one_session):
    modules = _modules_of_generate("base", one_session)
    assert not modules & {*FORBIDDEN, "onnxruntime"}, modules & {*FORBIDDEN, "onnxruntime"}


def test_the_default_imports_the_encoder_for_its_hint_and_no_scipy_or_torch(one_session):
    modules = _modules_of_generate("default", one_session)  # merged, from this machine's cache
    assert "onnxruntime" in modules and not modules & set(FORBIDDEN), modules & set(FORBIDDEN)


def test_small_matchings_are_scipys():
    from scipy.optimize import linear_sum_assignment

    rng = np.random.default_rng(0)
    for shape in itertools.product(range(0, 6), range(1, 6)):
        sim = rng.integers(0, 4, size=shape) / 3  # ties, as Jaccard values have
        rows, cols = _best_matching(sim)
        ref_rows, ref_cols = linear_sum_assignment(sim, maximize=True)
        assert sim[rows, cols].sum() == pytest.approx(sim[ref_rows, ref_cols].sum())
        assert len(set(rows)) == len(rows) == len(set(cols)) == min(shape) and list(rows) == sorted(rows)


def test_default_adapter_runs_the_adapter_over_the_base():
    student = resolve_student("default:adapter")
    model, adapters = student.runnable()
    assert model == student.model and [a.path.name for a in adapters] == ["adapter.gguf"]
    assert student.form == "base + adapter" and not resolve_student("default", ["x.gguf"]).merge


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    """The default student merged at one quant (no candidates to time) in a fresh cache that holds a
    damaged copy first: a manifest whose file differs from its sha256. One build serves both tests."""
    from bundlekd_edge.export.materialise import MERGED_FORMAT, cache_folder, merged_model

    student = resolve_student("default")
    folder, _ = cache_folder(student, ("Q8_0",), tmp_path_factory.mktemp("merged"))
    folder.mkdir(parents=True)
    (folder / "model-Q8_0.gguf").write_bytes(b"GGUF damaged")
    manifest = {"format": MERGED_FORMAT, "quant": "Q8_0", "file": "model-Q8_0.gguf",
                "files": {"model-Q8_0.gguf": "0" * 64}}  # fmt: skip
    (folder / "manifest.json").write_text(json.dumps(manifest))
    notes = []
    record = merged_model(student, ("Q8_0",), folder.parent, golden=2, log=notes.append)
    return student, folder, record, notes


def test_a_changed_merged_file_is_rebuilt_not_run(merged):
    from bundlekd_edge.files import sha256_file

    _, folder, record, notes = merged
    assert "changed (sha256 differs from the manifest)" in notes[0] and "merging again" in notes[0]
    assert any("merged smollm2-bundles at Q8_0" in n for n in notes)
    assert record["quant"] == "Q8_0" and record["parity"][-1]["passed"], record
    assert record["path"] == str(folder / "model-Q8_0.gguf") and record["files"][record["file"]] == sha256_file(
        record["path"])  # fmt: skip


def test_the_merged_default_is_verified_and_reused(merged):
    from bundlekd_edge.export.materialise import merged_model

    student, folder, record, _ = merged
    again = []
    assert merged_model(student, ("Q8_0",), folder.parent, golden=2, log=again.append)["created"] == record["created"]
    assert again == []  # verified and reused: nothing made, nothing said


def test_title_tree_cuts_are_scipys():
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.spatial.distance import pdist

    from bundlekd_edge.baselines import TitleClusters
    from bundlekd_edge.data import Item, Session

    rng = np.random.default_rng(0)
    for trial in range(200):
        n = int(rng.integers(2, 16))
        vectors = rng.normal(size=(3, 8))[rng.integers(0, 3, n)] + rng.normal(scale=rng.uniform(0.1, 1.5), size=(n, 8))
        vectors[1] = vectors[0] if trial % 5 == 0 else vectors[1]  # a tie
        session = Session("s", [Item(f"i{k}", f"t{k}") for k in range(n)])
        clusters = TitleClusters(encode=lambda texts: None)
        clusters._vectors = {f"t{k}": vectors[k] for k in range(n)}
        tree, reference = clusters._linkage(session), linkage(np.clip(pdist(vectors, "cosine"), 0, 2), "average")
        for cut in (0.3, 0.58, 0.7, 0.82, 1.0):
            bundles = clusters._cut(session, tree, {"threshold": cut, "fallback": "none"})
            ours = sorted(sorted(b["items"]) for b in bundles)
            groups = {}
            for item_id, label in zip(session.item_ids(), fcluster(reference, cut, criterion="distance")):
                groups.setdefault(label, []).append(item_id)
            assert ours == sorted(sorted(g) for g in groups.values() if len(g) >= 2)


def test_a_model_is_hashed_once_a_process_but_a_change_is_seen(tmp_path):
    """sha256_file remembers large files' digests by inode, size, mtime and ctime: the merged cache,
    the base check and the prefix cache's key do not each read the model again, and an edit in place
    (same size, same inode) is still hashed anew."""
    import hashlib

    from bundlekd_edge import files

    model = tmp_path / "model.gguf"
    model.write_bytes(b"\0" * (17 << 20))
    first = files.sha256_file(model)
    assert files.sha256_file(model) == first and first in files._DIGESTS.values()
    with open(model, "r+b") as f:
        f.seek(5 << 20)
        f.write(b"\1")
    assert files.sha256_file(model) == hashlib.sha256(model.read_bytes()).hexdigest() != first
