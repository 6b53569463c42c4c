"""Small file helpers every stage uses: atomic writes and checksums."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w"):
    """Write to a temporary file beside `path`, then rename it into place.

    If the block raises, the temporary file is removed and `path` is untouched, so a
    failed run never leaves a half-written artifact that looks complete.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else "utf-8") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def cache_dir() -> Path:
    """Where built artifacts shared between runs live (the ONNX encoder, ...); $BKD_CACHE overrides."""
    return Path(os.environ.get("BKD_CACHE", Path.home() / ".cache" / "bundlekd-edge"))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: str | os.PathLike, obj) -> None:
    with atomic_write(path) as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


def write_jsonl(path: str | os.PathLike, rows) -> int:
    n = 0
    with atomic_write(path) as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def check_files(folder: str | os.PathLike, digests: dict[str, str]) -> list[str]:
    """Problems with the files a manifest lists (missing, changed); empty when every sha256 matches."""
    folder = Path(folder)
    problems = []
    for name, digest in digests.items():
        path = folder / name
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif sha256_file(path) != digest:
            problems.append(f"{path}: changed (sha256 differs from the manifest)")
    return problems


def verify_folder(folder: str | os.PathLike, fmt: str, kind: str) -> list[str]:
    """Problems of a folder whose manifest.json names its format and the sha256 of its files."""
    path = Path(folder) / "manifest.json"
    if not path.exists():
        return [f"{path}: missing (not a {kind} folder)"]
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        return [f"{path}: not valid JSON ({e.msg})"]
    if manifest.get("format") != fmt:
        return [f"{path}: format {manifest.get('format')!r}, expected {fmt!r}"]
    return check_files(folder, manifest.get("files", {}))
