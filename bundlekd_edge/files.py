"""Small file helpers every stage uses: atomic writes and checksums."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import time
from pathlib import Path

from . import BkdError


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


def refuse_overwrite(out, inputs, force: bool = False, option: str = "--out") -> None:
    """Refuse, before any work, an output that is one of the command's inputs (writing it would
    destroy the input), or an existing file unless `force`."""
    if out is None:
        return
    target = Path(out).resolve()
    for given in inputs:
        if given is not None and str(given) != "-" and Path(given).resolve() == target:
            raise BkdError(f"{option} {out} is an input of this command ({given}); choose another output path")
    if not force and target.exists():
        raise BkdError(f"{option} {out} exists; --force overwrites it")


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


def path_inside(folder: str | os.PathLike, name, where: str, what: str = "file") -> Path:
    """`folder/name`, refusing a name that is absolute, has `..`, or leaves the folder through a
    symlink: manifests and cards are untrusted input. `where` names the file that gave the name."""
    folder = Path(folder)
    if not isinstance(name, str) or not name:
        raise BkdError(f"{where}: {what} must be a path inside {folder}, not {name!r}")
    path = folder / name
    if Path(name).is_absolute() or ".." in Path(name).parts or not path.resolve().is_relative_to(folder.resolve()):
        raise BkdError(f"{where}: {what} {name!r} leaves {folder}")
    return path


class RecordLog:
    """A JSONL output that survives a kill, and a run that resumes.

    Each record is written and flushed as it is made (fsync at most every `sync_s`), so a killed
    run loses only what was in flight. A sidecar `OUT.run.json` holds the run's settings and
    whether it finished; `resume=True` checks the settings against it, drops a line cut by the
    kill, and hands back the finished records (`done`) so the caller skips them. Without
    `resume`, an existing OUT is refused unless `force`: it may be someone's data, or an
    interrupted run's finished work.
    """

    def __init__(self, path, settings: dict, resume: bool = False, force: bool = False, sync_s: float = 2.0):
        self.path = Path(path)
        self.sidecar = self.path.with_name(self.path.name + ".run.json")
        self.settings, self.sync_s = settings, sync_s
        self.done: dict[str, dict] = {}
        if resume and self.path.exists():
            self._check_settings()
            self.done = self._read_finished()
        elif self.path.exists() and not force:
            raise BkdError(f"{self.path} exists; --resume continues the run that wrote it, --force overwrites it")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_json(self.sidecar, {"settings": settings, "complete": False})
        self._file = open(self.path, "a" if self.done else "w", encoding="utf-8")
        self._synced = time.monotonic()

    def _check_settings(self) -> None:
        try:
            recorded = json.loads(self.sidecar.read_text(encoding="utf-8"))["settings"]
        except (OSError, ValueError, KeyError, TypeError):
            recorded = None
        if not isinstance(recorded, dict):
            raise BkdError(f"{self.path}: no readable {self.sidecar.name}, so not a run to resume; --force starts over")
        differ = sorted(k for k in set(recorded) | set(self.settings) if recorded.get(k) != self.settings.get(k))
        if differ:
            raise BkdError(
                f"{self.path}: cannot resume, the run was made with other settings ({', '.join(differ)}); "
                "give the same ones, or --force to start over"
            )

    def _read_finished(self) -> dict[str, dict]:
        """The records already written; a last line cut by a kill is dropped from the file."""
        done, keep = {}, 0
        with open(self.path, "rb") as f:
            for raw in f:
                try:
                    record = json.loads(raw) if raw.endswith(b"\n") else None
                except ValueError:
                    record = None
                if not isinstance(record, dict) or "session_id" not in record:
                    break
                done[str(record["session_id"])] = record
                keep += len(raw)
        with open(self.path, "r+b") as f:
            f.truncate(keep)
        return done

    def append(self, record: dict) -> None:
        self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._file.flush()
        if time.monotonic() - self._synced >= self.sync_s:
            os.fsync(self._file.fileno())
            self._synced = time.monotonic()

    def close(self, complete: bool) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        write_json(self.sidecar, {"settings": self.settings, "complete": complete})
