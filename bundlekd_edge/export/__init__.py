"""Export: merge the LoRA, write GGUF, quantise, check parity, package one deployable folder.

`folder` (reading a finished export folder) imports neither torch nor transformers: the runtime
uses it. The other modules need the `[train]` extra and are imported only by `bkd-edge export`.
"""
