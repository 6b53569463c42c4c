"""The artifact contract: how every stage hands a folder to the next.

A knowledge store, a prompt pack, a training run and an export are each a folder with

    manifest.json   {"format": "bkd-<kind>/<version>", "bkd_edge": "<version>", "created": "<UTC>",
                     ...what the stage records..., "files": {"<relative path>": "<sha256>", ...}}

A folder is built in a temporary sibling and renamed into place only when complete (`building`),
so a killed or failed build never leaves a folder that looks finished; temporaries of processes
that died (SIGKILL, power loss) are removed by the next build. A reader verifies the manifest and
every file before use (`verify_folder`), and refuses files the manifest does not list, except
under the prefixes a kind declares as its own scratch (a pack's persisted prefix `state/`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

from . import BkdError, __version__
from .files import path_inside, sha256_file, write_json

MANIFEST = "manifest.json"


def file_hashes(folder: str | os.PathLike, skip: tuple[str, ...] = ()) -> dict[str, str]:
    """sha256 of every file under `folder` (relative POSIX paths), but the manifest and `skip` prefixes."""
    folder = Path(folder)
    names = (p.relative_to(folder).as_posix() for p in sorted(folder.rglob("*")) if p.is_file())
    return {n: sha256_file(folder / n) for n in names if n != MANIFEST and not n.startswith(skip)}


def write_manifest(folder: str | os.PathLike, fmt: str, fields: dict, skip: tuple[str, ...] = ()) -> dict:
    """Write `folder`/manifest.json: the format, this version, the time, `fields`, and the sha256 of
    every file now in the folder (last, so it covers everything written before)."""
    manifest = {
        "format": fmt,
        "bkd_edge": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **fields,
        "files": file_hashes(folder, skip),
    }
    write_json(Path(folder) / MANIFEST, manifest)
    return manifest


def amend_manifest(folder: str | os.PathLike, manifest: dict, fields: dict, changed: tuple[str, ...] = ()) -> dict:
    """A finished folder's manifest with `fields` added and the files `changed` since hashed again
    (the others, a model of hundreds of MB, are not read again); written atomically."""
    folder = Path(folder)
    amended = {**manifest, **fields}
    amended["files"] = {**manifest.get("files", {}), **{name: sha256_file(folder / name) for name in changed}}
    write_json(folder / MANIFEST, amended)
    return amended


def check_files(folder: str | os.PathLike, digests: dict[str, str], unlisted_ok: tuple[str, ...] = ()) -> list[str]:
    """Problems with a folder against the sha256 its manifest lists: a listed file missing, changed or
    outside the folder, or a file the manifest does not list (`unlisted_problems`)."""
    folder = Path(folder)
    if not isinstance(digests, dict):
        return [f'{folder / "manifest.json"}: "files" must map file names to sha256']
    problems = []
    for name, digest in digests.items():
        try:
            path = path_inside(folder, name, str(folder / "manifest.json"))
        except BkdError as e:
            problems.append(str(e))
            continue
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif sha256_file(path) != digest:
            problems.append(f"{path}: changed (sha256 differs from the manifest)")
    return problems + unlisted_problems(folder, digests, unlisted_ok)


def unlisted_problems(folder: str | os.PathLike, digests: dict, unlisted_ok: tuple[str, ...] = ()) -> list[str]:
    """Files the manifest does not list (an added or edited file), without reading any file. Under
    `unlisted_ok` (folders written at run time, such as a pack's persisted prefix state) any plain
    file may be, but no link: a link there could point anywhere."""
    folder = Path(folder)
    listed = set()
    for name in digests if isinstance(digests, dict) else ():
        with contextlib.suppress(BkdError):
            listed.add(path_inside(folder, name, str(folder / MANIFEST)).resolve())
    problems = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        scratch = any(rel.startswith(p) for p in unlisted_ok)
        if scratch and path.is_symlink():
            problems.append(f"{path}: a link, where only files written at run time may be")
        elif (path.is_file() or path.is_symlink()) and path.resolve() not in listed:
            if rel != MANIFEST and not scratch:
                problems.append(f"{path}: not listed in the manifest (an added or edited file)")
    return problems


def verify_folder(folder: str | os.PathLike, fmt: str, kind: str, unlisted_ok: tuple[str, ...] = ()) -> list[str]:
    """Problems of a folder whose manifest.json names its format and the sha256 of its files."""
    problems, manifest = _load(folder, fmt, kind)
    return problems or check_files(folder, manifest.get("files", {}), unlisted_ok)


def _load(folder: str | os.PathLike, fmt: str, kind: str) -> tuple[list[str], dict]:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return [f"{path}: missing (not a {kind} folder)"], {}
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        return [f"{path}: not valid JSON ({e})"], {}
    if not isinstance(manifest, dict):
        return [f"{path}: not a manifest (a JSON object)"], {}
    if manifest.get("format") != fmt:
        return [f"{path}: format {manifest.get('format')!r}, expected {fmt!r}"], {}
    return [], manifest


@contextlib.contextmanager
def building(out: str | os.PathLike, replace: bool = False) -> Iterator[Path]:
    """A temporary sibling of `out` to build in; renamed to `out` when the block finishes, removed
    when it raises. `replace` swaps out an existing `out` only once the new one is complete."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{out.name}.tmp-*"):  # left by builds that were killed
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(stale, ignore_errors=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        if replace and out.exists():
            out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
