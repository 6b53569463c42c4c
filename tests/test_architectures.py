"""Any student, any trainer: train -> export -> parity -> generate for the architectures people fine-tune.

Each model is tiny (2 layers, width 256) and randomly initialised here, with a real tokenizer trained
here (sentencepiece, 512 pieces, byte fallback, ChatML markers): the folders are what transformers
saves, and llama.cpp's own converter and runtime take them as they would a hub checkpoint. No downloads.
"""

import json
import shutil

import numpy as np
import pytest

from bundlekd_edge import BkdError

torch = pytest.importorskip("torch")
pytest.importorskip("sentencepiece")

ARCHS = {  # GGUF architecture: transformers model type
    "llama": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma3": "gemma3_text",
    "phi3": "phi3",
}
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]  # ids 3, 4, 5 (phi3's vocab wants <|endoftext|>)
EOS = 4


def make_tokenizer(folder, sample_path):
    """A real sentencepiece model (BPE, byte fallback, the ChatML markers as pieces) trained on the sample."""
    import sentencepiece as spm

    titles = [item["title"] for line in sample_path.read_text().splitlines() for item in json.loads(line)["items"]]
    answer = '{"bundles": [{"items": [1, 2], "intent": "home office setup"}]}\nSession items:\n1. a\n2. b'
    (folder / "corpus.txt").write_text("\n".join(titles + [answer] * 20))
    spm.SentencePieceTrainer.train(
        input=str(folder / "corpus.txt"), model_prefix=str(folder / "tokenizer"), vocab_size=512, model_type="bpe",
        byte_fallback=True, user_defined_symbols=SPECIALS, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        character_coverage=1.0, minloglevel=2,
    )  # fmt: skip
    return folder / "tokenizer.model"


def tiny_recipe(base: str, sessions) -> str:
    """One LoRA step on CPU, evaluated on one val session."""
    return (
        f'base = "{base}"\nsessions = "{sessions}"\nmax_steps = 1\nbatch_size = 2\nmax_len = 4096\nlora_r = 4\n'
        'lora_alpha = 8\nwarmup_steps = 0\ndevice = "cpu"\nprecision = "fp32"\neval_sessions = 1\neval_max_tokens = 8\n'
    )


# A random 2-layer model has no margin to spare at 4 bits (Q4_K_M agrees on ~60% of its decided positions);
# the 0.8 gate below 8 bits is for trained students. F16 and Q8_0 keep their gates.
EXPORT_ARGS = ["--quant", "Q8_0,Q4_K_M", "--keep-f16", "--golden", "2", "--gen-max-tokens", "32", "--min-top1", "0.5"]


@pytest.fixture(scope="module")
def tokenizer_model(tmp_path_factory, sample_path):
    return make_tokenizer(tmp_path_factory.mktemp("spm"), sample_path)


def tiny_model(folder, arch: str, tokenizer_model) -> str:
    """An HF model folder as transformers saves it: config, safetensors, tokenizer with a chat template."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        ARCHS[arch], vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=4096,
        bos_token_id=1, eos_token_id=EOS, pad_token_id=0, tie_word_embeddings=True, initializer_range=0.1,
    )  # fmt: skip
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    shutil.copy(tokenizer_model, folder / "tokenizer.model")
    added = {str(3 + i): {"content": t, "special": True} for i, t in enumerate(SPECIALS)}
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "chat_template": CHATML, "bos_token": "<s>", "eos_token": "<|im_end|>",
        "unk_token": "<unk>", "add_bos_token": False, "add_eos_token": False, "added_tokens_decoder": added,
    }))  # fmt: skip
    return str(folder)


def peft_adapter(model_dir: str, out, seed: int = 1) -> str:
    """An adapter written by peft itself, as another trainer leaves it, with B non-zero (a trained look)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    model.save_pretrained(out)
    return str(out)


@pytest.mark.slow
@pytest.mark.parametrize("arch", list(ARCHS))
def test_train_export_parity_generate(arch, tokenizer_model, sample_path, cli, tmp_path):
    base = tiny_model(tmp_path / f"tiny-{arch}", arch, tokenizer_model)
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(tiny_recipe(base, sample_path))
    run = tmp_path / "run"
    result = cli("train", recipe, "--out", run, "--quiet")
    assert result.exit_code == 0, result.output
    modules = json.loads((run / "adapter" / "adapter_config.json").read_text())["target_modules"]
    assert "lm_head" not in modules and len(modules) >= 4  # every linear layer, by this architecture's names

    out = tmp_path / "export"
    result = cli("export", run, "--out", out, *EXPORT_ARGS)
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["base"]["arch"] == arch and manifest["parity"]["tokenizer"]["eos_token_id"] == EOS
    stages = {s["stage"]: s for s in manifest["parity"]["stages"]}
    assert set(stages) == {"F16", "Q8_0", "Q4_K_M"} and all(s["passed"] for s in stages.values())
    assert stages["F16"]["positions"] >= 100  # the gate judges hundreds of positions, not a few answer tokens
    assert (out / "adapter.gguf").is_file() and not list(out.glob(".merged*"))

    pred = tmp_path / "pred.jsonl"
    result = cli("generate", "--model", out, "--sessions", sample_path, "--limit", 2, "--out", pred, "--quiet")
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in pred.read_text().splitlines()]
    assert len(rows) == 2 and all("bundles" in r for r in rows)


@pytest.fixture(scope="module")
def llama_pair(tmp_path_factory, tokenizer_model):
    """A tiny llama (q/k permuted by the converter), its GGUF, and a peft adapter over it."""
    from bundlekd_edge.export.convert import hf_to_gguf

    folder = tmp_path_factory.mktemp("llama")
    base = tiny_model(folder / "tiny-llama", "llama", tokenizer_model)
    return base, hf_to_gguf(base, folder / "base.gguf"), peft_adapter(base, folder / "peft")


@pytest.mark.slow
def test_a_peft_adapter_from_another_trainer_exports_and_runs(llama_pair, sample_path, cli, tmp_path):
    base, base_gguf, adapter = llama_pair
    out = tmp_path / "export"
    result = cli("export", "--base", base, "--adapter", adapter, "--out", out, "--quant", "Q8_0", "--golden", "2")
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["base"]["kind"] == "hf" and manifest["adapter"]["gguf"]["rank"] == 4
    assert all(s["passed"] for s in manifest["parity"]["stages"])

    runs = []
    for model, extra in ((base_gguf, ["--adapter", adapter]), (out, [])):  # the adapter over its base, and merged
        pred = tmp_path / f"pred{len(runs)}.jsonl"
        result = cli("generate", "--model", model, *extra, "--sessions", sample_path, "--limit", 2, "--out", pred,
                     "--quiet")  # fmt: skip
        assert result.exit_code == 0, result.output
        rows = [json.loads(line) for line in pred.read_text().splitlines()]
        runs.append([[b["items"] for b in row["bundles"]] for row in rows])  # a random model's intents drift
    assert len(runs[0]) == 2 and runs[0] == runs[1]


def test_the_parity_gate_passes_a_correct_merge_and_fails_a_wrong_one(llama_pair, sample_path, tmp_path, monkeypatch):
    """A mis-permuted q/k and a LoRA applied at the wrong scale fail at F16; the correct merge passes."""
    from bundlekd_edge.data import load_sessions
    from bundlekd_edge.export import gguf_write, lora_gguf, parity
    from bundlekd_edge.train.sft import PromptMaker, gguf_chat_tokenizer

    _, base_gguf, adapter = llama_pair
    gold = parity.golden_set(load_sessions(sample_path, split="test"), gguf_chat_tokenizer(base_gguf),
                             PromptMaker("sft"), 3, max_tokens=16)  # fmt: skip
    good = lora_gguf.write_lora_gguf(base_gguf, adapter, tmp_path / "good.gguf")
    assert good["arch"] == "llama"
    ref = parity.gguf_top1_and_generate(base_gguf, gold, adapter=tmp_path / "good.gguf")
    monkeypatch.setattr(lora_gguf, "PERMUTED_QK", frozenset())  # q/k's B left in HF's layout
    lora_gguf.write_lora_gguf(base_gguf, adapter, tmp_path / "unpermuted.gguf")

    results = {}
    for name, adapter_file, scale in (("good", "good.gguf", 1.0), ("half", "good.gguf", 0.5),
                                      ("unpermuted", "unpermuted.gguf", 1.0)):  # fmt: skip
        f16 = tmp_path / f"merged-{name}.gguf"
        gguf_write.write_gguf_f16(base_gguf, gguf_write.iter_merged(base_gguf, tmp_path / adapter_file, scale), f16)
        results[name] = parity.compare("F16", gold, ref, parity.gguf_top1_and_generate(f16, gold), parity.Gate())
    assert results["good"]["passed"] and results["good"]["positions"] >= 100
    assert not results["half"]["passed"] and not results["unpermuted"]["passed"]


def test_foreign_folders_are_data_never_code(llama_pair, tmp_path):
    """Pickle weights, custom code, links out of the folder, absurd sizes, another base: one line each."""
    from bundlekd_edge.export.lora_gguf import write_lora_gguf
    from bundlekd_edge.export.model_folder import read_adapter_config, read_model_config, read_safetensors
    from bundlekd_edge.train.model import resolve_base

    base, base_gguf, adapter = llama_pair
    model = tmp_path / "model"
    shutil.copytree(base, model)
    config = json.loads((model / "config.json").read_text())

    (model / "model.safetensors").rename(model / "pytorch_model.bin")
    with pytest.raises(BkdError, match="pytorch_model.bin is a pickle file, refused and never loaded"):
        resolve_base(str(model))
    (model / "pytorch_model.bin").rename(model / "model.safetensors")
    (model / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModel": "x.Model"}}))
    with pytest.raises(BkdError, match="custom code is never run"):
        read_model_config(model)
    (model / "config.json").write_text(json.dumps({**config, "hidden_size": 10**9}))
    with pytest.raises(BkdError, match="hidden_size = 1000000000 is out of range"):
        read_model_config(model)
    (model / "config.json").write_text(json.dumps(config))
    (model / "tokenizer.model").unlink()
    (model / "tokenizer.model").symlink_to("/etc/passwd")
    with pytest.raises(BkdError, match="a link leaving the model folder"):
        read_model_config(model)

    foreign = tmp_path / "foreign"
    shutil.copytree(adapter, foreign)
    peft_config = json.loads((foreign / "adapter_config.json").read_text())
    (foreign / "adapter_config.json").write_text(json.dumps({**peft_config, "use_dora": True}))
    with pytest.raises(BkdError, match="DoRA"):
        read_adapter_config(foreign)
    (foreign / "adapter_config.json").write_text(json.dumps({**peft_config, "r": 10**6}))
    with pytest.raises(BkdError, match="not a rank"):
        read_adapter_config(foreign)
    (foreign / "adapter_config.json").write_text(json.dumps(peft_config))
    weights = read_safetensors(foreign / "adapter_model.safetensors")
    assert all(w.dtype == np.float32 for w in weights.values())
    data = (foreign / "adapter_model.safetensors").read_bytes()
    (foreign / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(BkdError, match="outside the file or has the wrong size"):
        read_safetensors(foreign / "adapter_model.safetensors")

    from bundlekd_edge.runtime.model_file import default_model_path

    with pytest.raises(BkdError, match="does not fit .*made for"):  # a llama adapter over SmolLM2 (also llama)
        write_lora_gguf(default_model_path(), adapter, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


@pytest.mark.slow
def test_export_errors_are_one_line_and_leave_nothing(llama_pair, cli, tmp_path):
    """No tokenizer, an architecture llama.cpp cannot convert, an adapter for another base."""
    base, _, adapter = llama_pair
    cases = {}
    for name, change in (("no-tokenizer", "tokenizer"), ("unknown-arch", "arch")):
        model = tmp_path / name
        shutil.copytree(base, model)
        if change == "tokenizer":
            (model / "tokenizer.model").unlink()
        else:
            config = json.loads((model / "config.json").read_text())
            (model / "config.json").write_text(json.dumps({**config, "architectures": ["NoSuchForCausalLM"]}))
        cases[name] = model
    expected = {"no-tokenizer": "no tokenizer", "unknown-arch": "NoSuchForCausalLM"}
    for name, model in cases.items():
        out = tmp_path / f"out-{name}"
        result = cli("export", "--base", model, "--adapter", adapter, "--out", out)
        assert result.exit_code != 0 and expected[name] in result.output, result.output
        assert "Traceback" not in result.output and not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(cases)  # nothing half-written beside them
