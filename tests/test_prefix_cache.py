import json

from bundlekd_edge.data import load_sessions
from bundlekd_edge.runtime import Engine, EngineConfig

KNOWLEDGE = "Rules:\n" + "\n".join(
    f"{i}. A device and the accessories made for it (case, charger, cable, memory card) form one bundle."
    for i in range(1, 9)
)


def test_persisted_prefix_loads_in_a_new_engine_and_changes_nothing(engine, tmp_path, sample_path):
    s = load_sessions(sample_path, split="test")[0]
    first = engine.warm_prefix(KNOWLEDGE, tmp_path)
    assert first["status"] == "missing" and first["tokens"] > 100
    cold = engine.generate(s, KNOWLEDGE)
    assert cold.timing.prefill_tokens < cold.timing.prompt_tokens - 100  # the prefix came from the cache

    fresh = Engine("default")  # a new process would start like this
    second = fresh.warm_prefix(KNOWLEDGE, tmp_path)
    assert second["status"] == "loaded" and second["tokens"] == first["tokens"]
    warm = fresh.generate(s, KNOWLEDGE)
    assert warm.raw == cold.raw  # same answer from the restored state
    assert warm.timing.prefill_tokens == cold.timing.prefill_tokens


def test_state_made_for_other_settings_or_damaged_is_refused(engine, tmp_path):
    engine.warm_prefix(KNOWLEDGE, tmp_path)
    other = Engine("default", EngineConfig(n_batch=256))
    assert other.warm_prefix(KNOWLEDGE, tmp_path)["status"] == "refused: made with a different n_batch"
    assert engine.warm_prefix(KNOWLEDGE, tmp_path)["status"] == "refused: made with a different n_batch"  # replaced

    key = next(tmp_path.glob("*.json"))
    state = json.loads(key.read_text())
    (tmp_path / state["state_file"]).write_bytes(b"garbage")
    status = Engine("default").warm_prefix(KNOWLEDGE, tmp_path)["status"]
    assert status.startswith("refused:") and "did not load" in status
