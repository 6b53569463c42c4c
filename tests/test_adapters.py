"""LoRA adapters at run time (`--adapter FILE[:SCALE]`) and shipped students (`--model default|base|NAME`).

Adapters here are real llama.cpp GGUF adapters written by our writer from peft-layout tensors; the
one a user runs by default is the committed bundlekd_edge/students/ student.
"""

import json
import shutil

import numpy as np
import pytest

from bundlekd_edge import BkdError
from bundlekd_edge.data import load_sessions
from bundlekd_edge.runtime import Engine, EngineConfig, default_model_path, llamacpp
from bundlekd_edge.runtime.adapters import AdapterSpec, check_adapter, parse_adapter

pytest.importorskip("safetensors")

LAYERS = {"q_proj": (576, 576), "k_proj": (192, 576), "v_proj": (192, 576)}  # SmolLM2-135M: (out, in)


def write_peft_adapter(folder, rank=4, scale=0.05, seed=0, layers=(0, 1, 2)):
    """A peft-layout adapter folder with random (not zero) A and B for q/k/v of a few layers."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    tensors = {}
    for i in layers:
        for module, (n_out, n_in) in LAYERS.items():
            prefix = f"base_model.model.model.layers.{i}.self_attn.{module}"
            tensors[f"{prefix}.lora_A.weight"] = (rng.standard_normal((rank, n_in)) * scale).astype(np.float32)
            tensors[f"{prefix}.lora_B.weight"] = (rng.standard_normal((n_out, rank)) * scale).astype(np.float32)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    config = {"r": rank, "lora_alpha": 2 * rank, "target_modules": list(LAYERS), "peft_type": "LORA"}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def adapter_file(tmp_path_factory):
    from bundlekd_edge.export.lora_gguf import write_lora_gguf

    tmp = tmp_path_factory.mktemp("adapter")
    info = write_lora_gguf(default_model_path(), write_peft_adapter(tmp / "peft"), tmp / "adapter.gguf")
    assert info["tensors"] == 2 * 3 * 3 and info["rank"] == 4 and info["alpha"] == 8.0
    return tmp / "adapter.gguf"


def test_adapter_file_has_llama_cpp_layout(adapter_file):
    from gguf import GGUFReader

    r = GGUFReader(adapter_file)
    fields = {k: r.fields[k].contents() for k in ("general.type", "adapter.type", "adapter.lora.alpha")}
    assert fields == {"general.type": "adapter", "adapter.type": "lora", "adapter.lora.alpha": 8.0}
    shapes = {t.name: tuple(int(x) for x in reversed(t.shape)) for t in r.tensors}  # numpy order
    assert shapes["blk.0.attn_q.weight.lora_a"] == (4, 576) and shapes["blk.0.attn_q.weight.lora_b"] == (576, 4)
    assert shapes["blk.2.attn_k.weight.lora_b"] == (192, 4)
    from bundlekd_edge.files import sha256_file

    assert r.fields["bkd.base.sha256"].contents() == sha256_file(default_model_path())


def test_an_adapter_changes_the_answers_and_keys_the_persisted_prefix(engine, adapter_file, sample_path, tmp_path):
    session = load_sessions(sample_path, split="test")[0]
    tuned = Engine("default", EngineConfig(adapters=(AdapterSpec(adapter_file, 1.0),)))
    assert tuned.adapters[0]["scale"] == 1.0 and tuned.describe()["adapters"][0]["sha256"]
    logits = []
    for e in (engine, tuned):
        e.llm.reset()
        e.llm.eval(e.prompt_tokens(session))
        logits.append(llamacpp.last_logits(e.llm).copy())
    assert np.abs(logits[0] - logits[1]).max() > 0.05  # the adapter is applied
    assert tuned.generate(session).valid  # the grammar still holds

    knowledge = "Rules:\n1. A camera and its accessories form one bundle."
    assert tuned.warm_prefix(knowledge, tmp_path)["status"] == "missing"
    assert engine.warm_prefix(knowledge, tmp_path)["status"] == "refused: made with a different adapters"
    half = Engine("default", EngineConfig(adapters=(AdapterSpec(adapter_file, 0.5),)))
    assert half.warm_prefix(knowledge, tmp_path)["status"] == "refused: made with a different adapters"


def _write_adapter(path, arch="llama", tensors=None, kind="adapter"):
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_string("general.type", kind)
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", 8.0)
    for name, array in (tensors or {}).items():
        w.add_tensor(name, array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_bad_adapters_are_refused_with_the_reason(adapter_file, tmp_path):
    base = default_model_path()
    a, b = np.zeros((4, 576), np.float16), np.zeros((576, 4), np.float16)
    cases = {
        "truncated": (adapter_file.read_bytes()[: adapter_file.stat().st_size // 2], "truncated"),
        "other-arch": (
            _write_adapter(
                tmp_path / "g.gguf", "gemma3", {"blk.0.attn_q.weight.lora_a": a, "blk.0.attn_q.weight.lora_b": b}
            ),
            "architecture 'gemma3'",
        ),  # fmt: skip
        "other-shape": (
            _write_adapter(
                tmp_path / "s.gguf",
                tensors={"blk.0.attn_q.weight.lora_a": np.zeros((4, 960), np.float16), "blk.0.attn_q.weight.lora_b": b},
            ),
            "made for another base",
        ),  # fmt: skip
        "other-tensor": (
            _write_adapter(
                tmp_path / "t.gguf", tensors={"blk.99.attn_q.weight.lora_a": a, "blk.99.attn_q.weight.lora_b": b}
            ),
            "has no tensor in",
        ),  # fmt: skip
        "not-adapter": (base, "not a LoRA adapter"),
        "not-gguf": (b"PK\x03\x04 a zip file", "not a GGUF file"),
    }
    for name, (content, message) in cases.items():
        path = tmp_path / f"{name}.gguf"
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path = content
        with pytest.raises(BkdError, match=message):
            check_adapter(path, base)

    # made for another base with the same shapes: the base sha256 the adapter records does not match
    other = tmp_path / "other-base.gguf"
    shutil.copyfile(base, other)
    with open(other, "ab") as f:
        f.write(b"\0" * 32)  # another file (padding after the tensors: llama.cpp still loads it)
    with pytest.raises(BkdError, match="adapter made for base SmolLM2-135M-Instruct.Q4_1.gguf"):
        check_adapter(adapter_file, other)


def test_adapter_specs_and_scales(adapter_file):
    assert parse_adapter(str(adapter_file)) == AdapterSpec(adapter_file, 1.0)
    assert parse_adapter(f"{adapter_file}:0.5") == AdapterSpec(adapter_file, 0.5)
    for bad in ("0", "-1", "4.5", "nan", "inf"):
        with pytest.raises(BkdError, match="out of range"):
            parse_adapter(f"{adapter_file}:{bad}")


def test_cli_refuses_bad_adapters_before_generating(cli, adapter_file, sample_path, tmp_path):
    out = tmp_path / "pred.jsonl"
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(adapter_file.read_bytes()[: adapter_file.stat().st_size // 2])
    a, b = np.zeros((4, 960), np.float16), np.zeros((576, 4), np.float16)  # lora_a made for a 960-wide base
    wide = _write_adapter(tmp_path / "wide.gguf", tensors={"blk.0.attn_q.weight.lora_a": a,
                                                           "blk.0.attn_q.weight.lora_b": b})  # fmt: skip
    for spec, message in ((f"{adapter_file}:9", "out of range"), (str(cut), "truncated"),
                          (str(tmp_path / "none.gguf"), "no such model file"),
                          (str(wide), "does not fit blk.0.attn_q.weight")):  # fmt: skip
        r = cli("generate", "--model", "base", "--adapter", spec, "--sessions", sample_path, "--limit", "1",
                "--out", out, "--quiet")  # fmt: skip
        assert r.exit_code == 1 and message in r.output and "Traceback" not in r.output, r.output
        assert not out.exists()
    r = cli("generate", "--model", "base", "--adapter", f"{adapter_file}:0.5", "--sessions", sample_path,
            "--split", "test", "--limit", "1", "--out", out, "--quiet", "--summary", tmp_path / "s.json")  # fmt: skip
    assert r.exit_code == 0, r.output
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["run"]["adapters"][0]["scale"] == 0.5 and summary["student"]["name"] == "base"
