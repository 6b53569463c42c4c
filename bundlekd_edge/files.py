"""Small file helpers every stage uses: atomic writes, checked outputs, output locks and checksums."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import tempfile
import time
from pathlib import Path

from . import BkdError


class WriteError(BkdError):
    """An output could not be written (a full disk, a read-only folder, a file where a folder should be)."""


def write_error(path, e: OSError) -> WriteError:
    return WriteError(f"{path}: cannot write ({e.strerror or type(e).__name__})")


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w"):
    """Write to a temporary file beside `path`, then rename it into place.

    If the block raises, the temporary file is removed and `path` is untouched, so a
    failed run never leaves a half-written artifact that looks complete.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise write_error(path, e) from None
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else "utf-8") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)  # a link at `path` is replaced itself, never written through
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.errno in _WRITE_ERRORS:
            raise write_error(path, e) from None
        raise


# what a write meets on a full disk, over a quota or a file size limit, or in a read-only folder
_WRITE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.EISDIR}


def refuse_overwrite(
    out, inputs=(), force: bool | None = False, option: str = "--out", exists_ok: bool = False
) -> None:
    """Refuse, before any work, an output path that would destroy an input or write through a link.

    Refused: OUT is one of the command's `inputs` (files or folders), resolves to one, is a hard link
    of one (same st_dev/st_ino), holds one or lies inside one; OUT is a symbolic link (dangling
    included) unless `force`, which replaces the link itself, never its target (every output is
    written to a temporary file and renamed); OUT exists unless `force` or `exists_ok` (a command
    that resumes into it, and says so itself). `force` None: the command has no --force.
    """
    if out is None:
        return
    out = Path(out)
    target = out.resolve()
    for given in inputs:
        if given is None or str(given) in ("-", ""):
            continue
        source = Path(given).resolve()
        if target == source or target.is_relative_to(source) or source.is_relative_to(target) or _same(out, given):
            raise BkdError(f"{option} {out} is, or holds, an input of this command ({given}); choose another path")
    if out.is_symlink():
        if not force:
            fix = "--force replaces the link itself" if force is not None else "remove it or choose another path"
            raise BkdError(f"{option} {out} is a symbolic link (to {os.readlink(out)}); {fix}")
    elif out.exists() and not (force or exists_ok):
        fix = "--force overwrites it" if force is not None else "choose another path"
        raise BkdError(f"{option} {out} exists; {fix}")


def claim_output(out, inputs=(), force: bool | None = None, option: str = "--out", exists_ok: bool = False):
    """`refuse_overwrite`, then the output's lock (`OutputLock`): what every writing command does
    before any work. A CLI holds it with `click.get_current_context().with_resource(...)`."""
    refuse_overwrite(out, inputs, force, option, exists_ok)
    return OutputLock(out, option)


def _same(a, b) -> bool:
    """Whether two paths name one file (a hard link is the same st_dev/st_ino under another name)."""
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist
        return False


class OutputLock:
    """An exclusive lock on an output (`OUT.lock` beside it, holding the pid), so a second run writing
    the same output fails at once and names the first. The kernel drops a `flock` with its process,
    so a lock file left by a killed run is simply taken over."""

    def __init__(self, out, option: str = "--out"):
        out = Path(out)
        self.path = out.with_name(out.name + ".lock")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise write_error(self.path, e) from None
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
            except OSError as e:
                raise write_error(self.path, e) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "?"
                os.close(fd)
                raise BkdError(
                    f"{option} {out} is being written by another run (pid {holder}, lock {self.path}); "
                    "wait for it to finish or stop it"
                ) from None
            # The holder before us may have removed the file after we opened it: lock the file now there.
            if _inode(self.path) == os.fstat(fd)[1:3]:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)  # while still held: a waiting opener sees the inode change and retries
            os.close(self.fd)
            self.fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def _inode(path: Path):
    try:
        return os.stat(path, follow_symlinks=False)[1:3]  # (st_ino, st_dev)
    except FileNotFoundError:
        return None


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


_DIGESTS: dict[tuple, str] = {}  # this process's digests of large files, by what fstat says of them


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """The file's sha256. A large file (a model) already hashed in this process and unchanged since
    (the same inode, size, mtime and ctime) is not read again: a model is checked at several layers
    (the merged cache, the base an adapter needs, the prefix cache's key), each in its own words."""
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        if key in _DIGESTS:
            return _DIGESTS[key]
        h = hashlib.sha256()
        while block := f.read(chunk):
            h.update(block)
    if st.st_size >= 1 << 24:
        _DIGESTS[key] = h.hexdigest()
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
        if resume and (self.path.exists() or self.path.is_symlink()):
            if self.path.is_symlink() or self.path.stat().st_nlink > 1:  # appending would write another file
                raise BkdError(f"{self.path}: a link (symbolic or hard), not a run to resume; --force starts over")
            self._check_settings()
            self.done = self._read_finished()
        elif (self.path.exists() or self.path.is_symlink()) and not force:
            raise BkdError(f"{self.path} exists; --resume continues the run that wrote it, --force overwrites it")
        write_json(self.sidecar, {"settings": settings, "complete": False})
        if not self.done:  # a new empty file renamed into place: a link there is replaced, never written through
            with atomic_write(self.path):
                pass
        try:
            self._file = open(self.path, "a", encoding="utf-8", opener=_no_follow)
        except OSError as e:
            raise write_error(self.path, e) from None
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
        try:
            self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
            self._file.flush()
            if time.monotonic() - self._synced >= self.sync_s:
                os.fsync(self._file.fileno())
                self._synced = time.monotonic()
        except OSError as e:  # a full disk: the records before this one are kept
            raise write_error(self.path, e) from None

    def close(self, complete: bool) -> None:
        """Mark the run finished (or not). Closing an unfinished run after a failed write is best effort."""
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
        except OSError as e:
            if complete:
                raise write_error(self.path, e) from None
            complete = False
        finally:
            with contextlib.suppress(OSError):
                self._file.close()
        try:
            write_json(self.sidecar, {"settings": self.settings, "complete": complete})
        except BkdError:
            if complete:
                raise


def _no_follow(path, flags):
    return os.open(path, flags | os.O_NOFOLLOW)
