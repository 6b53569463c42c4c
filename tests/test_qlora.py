"""QLoRA on this CPU (bitsandbytes' CPU backend), through the GPU check's CPU form: one step on the
shipped student's recipe over two sample sessions, 4-bit NF4 linear layers, exported (the adapter
merged into the dequantised GGUF base) and passing parity. `scripts/gpu_check.sh --device cpu` is the
command the day a GPU is lent runs with `--device cuda`, so this test runs that command as it is."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")


# ~70 s on 2 cores: the base dequantised into an HF folder and loaded in NF4 (~35 s), one step, export.
@pytest.mark.slow
def test_gpu_check_cpu_form_trains_qlora_exports_and_passes_parity(tmp_path):
    out = tmp_path / "check"
    cmd = ["bash", "scripts/gpu_check.sh", "--device", "cpu", "--precision", "fp32", "--steps", "1", "--modes",
           "qlora", "--limit-train", "2", "--eval-sessions", "1", "--golden", "3", "--gen-max-tokens", "12",
           "--student-sessions", "0", "--out", str(out)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHON": sys.executable})
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads((out / "gpu_check.json").read_text())
    assert result["device"] == "cpu" and result["machine"]["bitsandbytes"]
    row = result["modes"]["qlora"]
    assert row["steps"] == 1 and row["device"] == "cpu" and row["tokens_per_s"] > 0 and row["peak_rss_mib"] > 0
    assert row["layers_4bit"] == 30 * 7  # every targeted linear layer of SmolLM2-135M's 30 blocks in NF4
    assert list(row["parity"]) == ["F16", "Q8_0"] and all(s["passed"] for s in row["parity"].values())
    f16 = row["parity"]["F16"]
    # agreement where the reference decides (most positions); its near-ties are rounding, set apart
    assert f16["top1"] >= 0.97 and f16["positions"] > f16["near_ties"]
    run = json.loads((out / "qlora/run/run.json").read_text())
    assert json.loads((out / "qlora/run/recipe.json").read_text())["qlora"] is True and run["steps"] == 1
    manifest = json.loads((out / "qlora/export/manifest.json").read_text())
    assert manifest["recipe"]["qlora"] is True and manifest["adapter"]["gguf"]["rank"] == 8


def test_qlora_without_bitsandbytes_is_a_clear_error(monkeypatch):
    from pathlib import Path

    import torch

    from bundlekd_edge import BkdError
    from bundlekd_edge.train.model import Base, load_base_model

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # what `import bitsandbytes` does when it is absent
    with pytest.raises(BkdError, match=r"QLoRA .* needs bitsandbytes: pip install"):
        load_base_model(Base("gguf", Path("x.gguf")), torch.float32, "cpu", qlora=True)


# ------------------------------------------------------------------ --gpu-layers (no model loaded)


def test_gpu_layers_option_and_the_device_llama_cpp_reports(cli):
    from bundlekd_edge.runtime import llamacpp
    from bundlekd_edge.student import parse_gpu_layers

    assert [parse_gpu_layers(v) for v in ("all", "0", 12, "7")] == [-1, 0, 12, 7]
    for bad in ("-1", "some", 2.5, True):
        with pytest.raises(Exception, match="not a number of layers >= 0 or 'all'"):
            parse_gpu_layers(bad, "card: gpu_layers")
    found = llamacpp.devices()
    assert any(d["name"] == "CPU" and not d["gpu"] for d in found)
    assert llamacpp.offload_device(0) == "CPU"
    if not any(d["gpu"] for d in found):  # this machine's CPU build: offloaded layers stay on the CPU
        assert llamacpp.offload_device(-1) == "CPU"
    r = cli("generate", "--gpu-layers", "half", "--sessions", "x.jsonl", "--out", "y.jsonl")
    assert r.exit_code == 2 and "'half' is not a number of layers" in r.output
    session = json.dumps({"session_id": "s", "items": [{"id": "a", "title": "A"}, {"id": "b", "title": "B"}]})
    r = cli("generate", "--model", "http://127.0.0.1:9/v1", "--gpu-layers", "all", "--json", input=session)
    assert r.exit_code == 2 and "a server offloads its own layers" in r.output
