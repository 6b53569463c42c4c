"""Greedy decoding under a GBNF grammar, the cheap way round.

llama.cpp's grammar sampler tests a candidate token by walking the grammar over the token's
text; applied to the whole vocabulary (49,152 tokens for SmolLM2) that costs about as much as
the model's own decode step on a small model. Greedy decoding only needs the best *allowed*
token, so test the unconstrained argmax first: when the grammar accepts it (almost always for a
model that has learnt the format) it is the answer, exactly as if the grammar had been applied
first; only when it is rejected is the grammar run over the whole vocabulary. This is what
llama.cpp's own `common_sampler_sample` does.
"""

from __future__ import annotations

import ctypes

import numpy as np
from llama_cpp import llama_cpp as lib

from .. import BkdError

_TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])


class GrammarGreedy:
    """One answer's sampler: a grammar (advanced by each accepted token) and a greedy choice."""

    def __init__(self, vocab: lib.llama_vocab_p, n_vocab: int, gbnf: str):
        self.grammar = lib.llama_sampler_init_grammar(vocab, gbnf.encode("utf-8"), b"root")
        if not self.grammar:
            raise BkdError("llama.cpp rejected the output grammar")
        self.n_vocab = n_vocab
        self._one = np.zeros(1, dtype=_TOKEN_DATA)
        self._all: np.ndarray | None = None  # the whole vocabulary, built on the first rejection
        self.fallbacks = 0  # steps where the argmax was rejected and the whole vocabulary was tested

    def sample(self, ctx: lib.llama_context_p, index: int = -1) -> int:
        """The best token the grammar allows after logits row `index`; the grammar accepts it."""
        logits = np.ctypeslib.as_array(lib.llama_get_logits_ith(ctx, index), shape=(self.n_vocab,))
        token = int(logits.argmax())
        self._one[0] = (token, logits[token], 0.0)
        if not self._allowed(self._one):
            self.fallbacks += 1
            if self._all is None:
                self._all = np.zeros(self.n_vocab, dtype=_TOKEN_DATA)
                self._all["id"] = np.arange(self.n_vocab)
            self._all["logit"] = logits
            self._allowed(self._all)
            token = int(self._all["logit"].argmax())  # rejected tokens now hold -inf
        lib.llama_sampler_accept(self.grammar, token)
        return token

    def _allowed(self, candidates: np.ndarray) -> bool:
        """Apply the grammar in place (rejected tokens get -inf); True if the first survived."""
        array = lib.llama_token_data_array(
            data=candidates.ctypes.data_as(ctypes.POINTER(lib.llama_token_data)),
            size=len(candidates),
            selected=-1,
            sorted=False,
        )
        lib.llama_sampler_apply(self.grammar, ctypes.byref(array))
        return bool(np.isfinite(candidates["logit"][0]))

    def free(self) -> None:
        if self.grammar:
            lib.llama_sampler_free(self.grammar)
            self.grammar = None

    def __del__(self):
        self.free()
