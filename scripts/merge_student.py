"""A shipped student with its adapter merged into the base, as a new student folder (no training run).

What the card of `bundlekd_edge/students/smollm2-bundles` compares with the adapter at run time: the base GGUF is
dequantised, the LoRA delta added (`export/gguf_write.merged_tensors`, no torch), written f16 and
quantised by llama.cpp to QUANT. The folder holds the merged GGUF, a copy of the student's pack and
a card naming that file as its base and no adapter, so `generate --model OUT` and `bench --engine
NAME=OUT` run it with the student's own prompt settings.

    python scripts/merge_student.py [--student bundlekd_edge/students/smollm2-bundles] --quant Q8_0 --out merged-q8_0
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from bundlekd_edge import BkdError
from bundlekd_edge.artifacts import building
from bundlekd_edge.export.gguf_write import merged_tensors, write_gguf_f16
from bundlekd_edge.files import sha256_file, write_json
from bundlekd_edge.runtime import llamacpp
from bundlekd_edge.student import STUDENT_CARD, models_dir, student_from_folder


def merge_student(student_dir: Path, quant: str, out: Path) -> dict:
    student = student_from_folder(student_dir)  # every file checked against its card
    if len(student.adapters) != 1 or student.adapters[0].scale != 1.0:
        raise BkdError(f"{student_dir}: merging takes a student with one adapter at scale 1")
    if quant not in llamacpp.quant_types():
        raise BkdError(f"--quant {quant}: not a llama.cpp type ({', '.join(llamacpp.quant_types())})")
    name = f"merged-{quant.lower()}.gguf"
    with building(out) as tmp:
        f16 = tmp / "merged-f16.gguf"
        write_gguf_f16(student.model, merged_tensors(student.model, student.adapters[0].path), f16)
        if quant != "F16":  # the f16 file is the intermediate, named `name` only when it is the result
            if llamacpp.quantize_file(f16, tmp / name, quant) != 0:
                raise BkdError(f"llama.cpp could not quantise the merged model to {quant}")
            f16.unlink()
        card = dict(student.card, name=f"{student.name}-merged-{quant.lower()}", adapters=[])
        card["base"] = {"file": name, "sha256": sha256_file(tmp / name), "merged_from": student.card.get("base")}
        if student.pack:
            shutil.copytree(student.pack.folder, tmp / "pack", ignore=shutil.ignore_patterns("state"))
            card["pack"] = "pack"
        write_json(tmp / STUDENT_CARD, card)
    return card


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--student", type=Path, default=models_dir() / "smollm2-bundles")
    ap.add_argument("--quant", default="Q8_0", help="llama.cpp type of the merged file (Q8_0, Q4_1, F16, ...)")
    ap.add_argument("--out", type=Path, required=True, help="new student folder")
    args = ap.parse_args()
    if args.out.exists():
        sys.exit(f"{args.out}: exists; choose a new folder")
    try:
        card = merge_student(args.student, args.quant, args.out)
    except BkdError as e:
        sys.exit(f"error: {e}")
    print(f"{args.out}: {card['base']['file']} (sha256 {card['base']['sha256'][:12]}…), run it with --model {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
