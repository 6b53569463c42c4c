"""Training: SFT data per knowledge-use mode and a LoRA/QLoRA trainer.

Imports torch, transformers and peft (the `[train]` extra). The CLI imports this package only
inside `bkd-edge train`, so the edge runtime never pulls it in.
"""

import os

# Offline by design: bases and adapters are local files. Without this, importing bitsandbytes (through
# peft) on an AVX512-BF16 CPU tries to fetch a CPU kernel from a model hub ("kernels-community").
os.environ.setdefault("HF_HUB_OFFLINE", "1")
