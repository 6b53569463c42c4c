"""Persist the evaluated KV state of a static prompt prefix, so a cold start skips its prefill.

Within one process llama-cpp-python already reuses the longest common token prefix between
calls. This module carries that state across processes: the prefix (system text + pack
knowledge) is evaluated once, its sequence state is written with llama.cpp's own
`llama_state_seq_save_file` (tokens + KV of sequence 0, no logits; `llamacpp.save_sequence`), and a
JSON key beside it says what the state is valid for. A state is loaded only when the key matches exactly: the same GGUF
(sha256), llama.cpp build, context settings and prefix tokens. Anything else is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from .. import BkdError
from ..files import atomic_write
from . import llamacpp

STATE_SUFFIX = ".kv"
KEY_SUFFIX = ".json"


def prefix_key(engine, tokens: list[int]) -> dict:
    """Everything a KV state depends on."""
    c = engine.config
    return {
        "model_sha256": engine.model_sha256(),
        "adapters": [[a["sha256"], a["scale"]] for a in engine.adapters],
        **llamacpp.build_info(),
        "n_ctx": c.n_ctx,
        "n_batch": c.n_batch,
        "n_tokens": len(tokens),
        "tokens_sha256": hashlib.sha256(np.asarray(tokens, dtype=np.int32).tobytes()).hexdigest(),
    }


def state_paths(folder: str | Path, key: dict) -> tuple[Path, Path]:
    # Named by the prefix alone: a state made under other settings sits at the same name, is
    # refused by its key, and is replaced by the new one.
    name = "prefix-" + key["tokens_sha256"][:16]
    folder = Path(folder)
    return folder / (name + STATE_SUFFIX), folder / (name + KEY_SUFFIX)


def save_prefix_state(engine, tokens: list[int], folder: str | Path) -> Path:
    """Write the state of the tokens now in the context (they must be exactly `tokens`)."""
    key = prefix_key(engine, tokens)
    state, key_path = state_paths(folder, key)
    state.parent.mkdir(parents=True, exist_ok=True)
    tmp = state.with_name(f".{state.name}.{os.getpid()}.tmp")
    try:
        if not llamacpp.save_sequence(engine.llm, tokens, tmp):
            raise BkdError(f"{state}: llama.cpp could not write the prefix state")
        os.replace(tmp, state)
    finally:
        tmp.unlink(missing_ok=True)
    with atomic_write(key_path) as f:  # the key is written last: a state without a key is ignored
        json.dump({**key, "state_file": state.name, "state_bytes": state.stat().st_size}, f, indent=2)
    return state


def load_prefix_state(engine, tokens: list[int], folder: str | Path) -> str:
    """Restore the prefix state if a matching one exists. Returns 'loaded', or why it was not."""
    key = prefix_key(engine, tokens)
    state, key_path = state_paths(folder, key)
    if not key_path.exists() or not state.exists():
        return "missing"
    try:
        stored = json.loads(key_path.read_text())
    except (OSError, json.JSONDecodeError):
        return f"refused: {key_path.name} is not readable JSON"
    differs = [k for k in key if stored.get(k) != key[k]]
    if differs:
        return "refused: made with a different " + ", ".join(differs)
    if not llamacpp.load_sequence(engine.llm, tokens, state):
        return f"refused: {state.name} did not load or holds other tokens"
    return "loaded"
