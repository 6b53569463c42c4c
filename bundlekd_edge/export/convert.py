"""llama.cpp's own HF -> GGUF converter, at the runtime's commit.

It ships in the llama-cpp-python sdist the runtime is built from (vendor/llama.cpp:
convert_hf_to_gguf.py, conversion/, gguf-py/), so a GGUF it writes is one the runtime reads.
The sdist is fetched once from PyPI (`make setup` does it), checked against the sha256 pinned here,
and only those files are unpacked into the cache; nothing of llama.cpp is copied into this
repository. It runs in a subprocess with its own, newer gguf-py first on the path (PyPI's gguf is
older than the converter), offline: it sees only a folder we wrote. Adapters need no converter:
`lora_gguf` writes them over the converted model's own tensor names.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from .. import BkdError
from ..files import cache_dir, sha256_file

LLAMA_CPP_PYTHON = "0.3.36"  # the runtime's version (pyproject pins the same)
SDIST = f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
MEMBERS = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/", "LICENSE")
READY = ".ready"


def converter_dir(fetch: bool = True, log=None) -> Path:
    """The unpacked converter; fetched from PyPI the first time (76 MB, sha256-checked)."""
    folder = cache_dir() / f"llama.cpp-convert-{LLAMA_CPP_PYTHON}"
    if (folder / READY).is_file():
        return folder
    if not fetch:
        raise BkdError(f"llama.cpp's converter is not set up ({folder}): run `make setup`")
    with tempfile.TemporaryDirectory(prefix="bkd-sdist-") as tmp:
        sdist = _sdist(Path(tmp), log)
        got = sha256_file(sdist)
        if got != SDIST_SHA256:
            raise BkdError(f"{sdist.name}: sha256 {got[:16]}… is not the pinned {SDIST_SHA256[:16]}…; refused")
        staging = Path(tmp) / "unpacked"
        prefix = f"llama_cpp_python-{LLAMA_CPP_PYTHON}/vendor/llama.cpp/"
        with tarfile.open(sdist) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(prefix)
                       and m.name[len(prefix):].startswith(MEMBERS) and (m.isfile() or m.isdir())]  # fmt: skip
            for m in members:
                m.name = m.name[len(prefix) :]
            tar.extractall(staging, members=members, filter="data")  # no links, no paths leaving `staging`
        (staging / READY).write_text(SDIST_SHA256 + "\n")
        folder.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(folder, ignore_errors=True)  # a half-written one from an interrupted fetch
        shutil.move(str(staging), folder)
    return folder


def _sdist(tmp: Path, log) -> Path:
    """The sdist: the copy `make setup` keeps beside its wheel ($BKD_SDIST), else downloaded by pip."""
    kept = os.environ.get("BKD_SDIST")
    if kept and Path(kept).is_file():
        return Path(kept)
    if log:
        log(f"fetching llama.cpp's converter: {SDIST} from PyPI (76 MB, once)")
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
           f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", str(tmp)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode or not (tmp / SDIST).is_file():
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise BkdError(f"could not fetch {SDIST} from PyPI ({last}); run `make setup` where PyPI is reachable")
    return tmp / SDIST


def _run(script: str, args: list[str], what: str, log=None) -> None:
    folder = converter_dir(log=log)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(folder)}
    env.pop("NO_LOCAL_GGUF", None)  # the converter's own gguf-py, not PyPI's older one
    done = subprocess.run([sys.executable, str(folder / script), *args], capture_output=True, text=True, env=env)
    if done.returncode:
        lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
        errors = [line for line in lines if "Error" in line or "error" in line] or lines or ["no output"]
        raise BkdError(f"{what} failed in llama.cpp's {script}: {errors[-1].strip()}")


def hf_to_gguf(model_dir: str | Path, out: str | Path, log=None, source: str | Path = "") -> Path:
    """An HF model folder (safetensors, config, tokenizer) as a GGUF f16 file, tokenizer and chat
    template included; `source` names the model in errors (the user's folder, not our merged copy)."""
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        _run("convert_hf_to_gguf.py", [str(model_dir), "--outfile", str(tmp), "--outtype", "f16"],
             f"converting {source or model_dir} to GGUF", log)  # fmt: skip
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    return out
