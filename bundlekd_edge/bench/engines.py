"""What a bench row runs: an engine spec, parsed from one short command-line string.

    NAME=MODEL[,pack=PACK|none][,adapter=FILE[:SCALE]]...[,jump=on][,label=TEXT][,constraint=C][,key=ENV_VAR]

MODEL is whatever `bkd-edge generate --model` takes ('default', 'base', a .gguf file, EXPORT_DIR[:QUANT],
`gguf:qwen1.5b`: the local teacher, labelled as such unless `label` says otherwise),
an OpenAI-compatible base URL (http://... or https://..., e.g. a teacher endpoint), or
`baseline:whole|pairs|apriori|cluster|category|choice|learned` for a non-LLM baseline. An export
trained with a pack runs with it unless `pack=none`. A URL row asks in the JSON answer format, with
the output constraint sent as `constraint` says (gbnf: llama.cpp's servers, the default; vllm; json-schema: hosted APIs,
Ollama) and the API key of environment variable `key` (none unless named). `jump=on` runs a local
model with jump-forward decoding (`generate --jump-forward`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .. import BkdError

KINDS = ("llama", "http", "baseline")
# The environment variable that hands a row's model, as given (a URL with its credentials), to its
# worker process; rows/NAME.spec.json holds it redacted.
WORKER_MODEL = "BKD_BENCH_MODEL"


@dataclass(frozen=True)
class EngineSpec:
    name: str
    kind: str  # one of KINDS
    model: str  # llama: model argument; http: base URL; baseline: baseline name
    pack: str = ""  # prompt pack folder (LLM engines only); "none": not even an export's own
    label: str = ""  # free text for the report, e.g. "teacher stand-in"
    adapters: list[str] = field(default_factory=list)  # LoRA adapters FILE[:SCALE] over the model (LLM only)
    constraint: str = "gbnf"  # URL rows: how the output grammar is sent (runtime.remote.CONSTRAINTS)
    api_key_env: str = ""  # URL rows: the NAME of the variable holding the API key
    jump_forward: bool = False  # llama rows: grammar-forced text evaluated in batches (EngineConfig.jump_forward)

    def key(self, options: dict) -> str:
        """Hash of everything a row's numbers depend on: a saved row is reused only when it matches."""
        blob = json.dumps({"spec": asdict(self), "options": options}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class BenchOptions:
    """How every row is measured; the same for all rows of one report."""

    sessions: str = ""
    split: str = "test"
    limit: int = 0  # 0: every session of the split
    n_ctx: int = 2048
    threads: int = 0  # 0: every core the process may use
    seed: int = 0
    warmup: int = 1  # sessions generated and discarded after loading (val split when it has sessions)
    cold: int = 3  # sessions measured with an empty KV cache (TTFT with the prefix evaluated)
    concurrency: list[int] = field(default_factory=lambda: [1, 2, 4])  # batch throughput levels
    throughput_sessions: int = 12  # sessions per throughput level (0: skip the throughput test)
    timeout_s: float = 3600.0  # per engine process
    gpu_layers: int | None = None  # llama rows: layers offloaded to a GPU (-1: all); None: the student card's

    def measured(self) -> dict:
        """The options that change a row's numbers (the timeout does not)."""
        d = asdict(self)
        d.pop("timeout_s")
        return d


def parse_engine(text: str) -> EngineSpec:
    name, sep, rest = text.partition("=")
    name = name.strip()
    if not sep or not name or not rest:
        raise BkdError(f"engine {text!r}: expected NAME=MODEL[,pack=PACK][,label=TEXT]")
    if not all(c.isalnum() or c in "-_." for c in name):
        raise BkdError(f"engine {text!r}: the name may hold only letters, digits, '-', '_' and '.'")
    model, *opts = rest.split(",")
    extra, adapters = {}, []
    for opt in opts:
        key, sep, value = opt.partition("=")
        if not sep or key not in ("pack", "label", "adapter", "jump", "constraint", "key"):
            raise BkdError(
                f"engine {text!r}: unknown option {opt!r} (known: pack=PACK, adapter=FILE[:SCALE], jump=on|off, "
                "label=TEXT, constraint=gbnf|vllm|json-schema, key=ENV_VAR)"
            )
        if key == "adapter":
            from ..runtime.adapters import parse_adapter

            adapters.append(str(parse_adapter(value)))  # a bad scale is refused here, before any row runs
        else:
            extra[key] = value
    if model.startswith("baseline:"):
        kind, model = "baseline", model.removeprefix("baseline:")
        if extra.get("pack") or adapters:
            raise BkdError(f"engine {text!r}: a baseline takes no pack or adapter")
    elif model.startswith(("http://", "https://")):
        kind = "http"
        if adapters:
            raise BkdError(f"engine {text!r}: a server applies its own adapters")
    else:
        kind, model = "llama", model.removeprefix("gguf:")
        if "label" not in extra:
            from ..runtime.teacher_file import teacher_label

            extra["label"] = teacher_label(model)  # a local teacher: its file is checked when the row loads it
    if extra.get("pack") not in (None, "", "none") and not Path(extra["pack"]).is_dir():
        raise BkdError(f"engine {text!r}: pack {extra['pack']!r} is not a folder")
    if kind != "http" and ({"constraint", "key"} & set(extra)):
        raise BkdError(f"engine {text!r}: constraint and key are for server URLs")
    if extra.get("jump", "off") not in ("on", "off") or (kind != "llama" and "jump" in extra):
        raise BkdError(f"engine {text!r}: jump=on|off, for a local model only")
    from ..runtime.remote import CONSTRAINTS

    if extra.get("constraint", "gbnf") not in CONSTRAINTS:
        raise BkdError(f"engine {text!r}: constraint {extra['constraint']!r}, choose from {', '.join(CONSTRAINTS)}")
    return EngineSpec(
        name, kind, model, extra.get("pack", ""), extra.get("label", ""), adapters,
        extra.get("constraint", "gbnf"), extra.get("key", ""), extra.get("jump") == "on",
    )  # fmt: skip
