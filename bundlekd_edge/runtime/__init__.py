"""The edge runtime: llama.cpp inference of bundles. Imports neither torch nor transformers."""

from .engine import Engine, EngineConfig, Generation, Timing
from .memory import memory_snapshot
from .model_file import default_model_path, inspect_gguf

__all__ = ["Engine", "EngineConfig", "Generation", "Timing", "default_model_path", "inspect_gguf", "memory_snapshot"]
