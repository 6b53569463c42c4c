"""Training: SFT data per knowledge-use mode and a LoRA/QLoRA trainer.

Imports torch, transformers and peft (the `[train]` extra). The CLI imports this package only
inside `bkd-edge train`, so the edge runtime never pulls it in.
"""
