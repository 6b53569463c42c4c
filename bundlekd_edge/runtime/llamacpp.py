"""llama.cpp behind one door: every call into llama-cpp-python, its private attributes and its
ctypes structures, for the whole project.

llama-cpp-python's low-level API and the private attributes of `Llama` (`_ctx`, `_model`,
`_batch`, `_input_ids`, `_requires_eval`) change between releases; keeping them in this one file
means an upgrade is read, fixed and tested here. Everything else holds a `Llama` and calls the
functions below (tests/test_runtime.py checks that no other module imports llama_cpp).

Also here, because it is ctypes through and through: the grammar-first greedy sampler
(`GrammarGreedy`) and a multi-sequence context for batched decoding (`SequenceContext`).
"""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Callable
from pathlib import Path

import llama_cpp
import numpy as np
from llama_cpp import Llama
from llama_cpp import llama_cpp as lib

from .. import BkdError

# ---------------------------------------------------------------- the library


def build_info() -> dict:
    """Which llama.cpp computed a result (numerics differ between builds and CPUs)."""
    return {
        "llama_cpp_python": llama_cpp.__version__,
        "system_info": lib.llama_print_system_info().decode(errors="replace").strip(),
    }


def quant_types() -> list[str]:
    """The file types llama.cpp quantises to (Q4_0, Q4_K_M, Q8_0, F16, ...)."""
    prefix = "LLAMA_FTYPE_MOSTLY_"
    return sorted(name[len(prefix) :] for name in dir(lib) if name.startswith(prefix))


def quantize_file(src: str | Path, dst: str | Path, quant: str, threads: int = 0) -> int:
    """llama.cpp's quantiser, src -> dst as `quant`; its status code (0: done)."""
    params = lib.llama_model_quantize_default_params()
    params.ftype = getattr(lib, f"LLAMA_FTYPE_MOSTLY_{quant}")
    params.nthread = threads
    return lib.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))


def json_schema_grammar(schema_text: str):
    """A llama.cpp grammar for a JSON schema, as `create_chat_completion(grammar=...)` takes it."""
    from llama_cpp import LlamaGrammar

    return LlamaGrammar.from_json_schema(schema_text, verbose=False)


# ---------------------------------------------------------------- loading


def load_model(path: str | Path, n_ctx: int, n_batch: int, threads: int, seed: int, gpu_layers: int = 0) -> Llama:
    """A model and its one context, `gpu_layers` of its layers on the GPU (-1: all; a CPU-only build
    keeps them on the CPU). Raises ValueError or RuntimeError when llama.cpp refuses the file."""
    return Llama(
        model_path=str(path),
        n_ctx=n_ctx,
        n_batch=n_batch,
        n_threads=threads,
        n_threads_batch=threads,
        seed=seed,
        n_gpu_layers=gpu_layers,
        verbose=False,
    )


def devices() -> list[dict]:
    """The devices this llama.cpp build computes on (ggml's backend registry), e.g. {"name": "CPU",
    "description": "AMD EPYC", "gpu": False}, or "Vulkan0" / "CUDA0" with the GPU's name."""
    from llama_cpp._ggml import libggml as ggml

    ggml.ggml_backend_dev_count.restype = ctypes.c_size_t
    ggml.ggml_backend_dev_get.argtypes, ggml.ggml_backend_dev_get.restype = [ctypes.c_size_t], ctypes.c_void_p
    for name in ("ggml_backend_dev_name", "ggml_backend_dev_description"):
        getattr(ggml, name).argtypes, getattr(ggml, name).restype = [ctypes.c_void_p], ctypes.c_char_p
    ggml.ggml_backend_dev_type.argtypes, ggml.ggml_backend_dev_type.restype = [ctypes.c_void_p], ctypes.c_int
    found = []
    for i in range(ggml.ggml_backend_dev_count()):
        dev = ggml.ggml_backend_dev_get(i)
        found.append({"name": ggml.ggml_backend_dev_name(dev).decode(errors="replace"),
                      "description": ggml.ggml_backend_dev_description(dev).decode(errors="replace"),
                      "gpu": ggml.ggml_backend_dev_type(dev) != 0})  # fmt: skip  # 0: GGML_BACKEND_DEVICE_TYPE_CPU
    return found


def offload_device(gpu_layers: int) -> str:
    """Where the offloaded layers run, as llama.cpp names the device ("Vulkan0 (llvmpipe ...)"), or
    "CPU" when no layer is offloaded or this build has no GPU backend."""
    gpus = [d for d in devices() if d["gpu"]]
    if not gpu_layers or not gpus:
        return "CPU"
    return ", ".join(f"{d['name']} ({d['description']})" for d in gpus)


def load_vocab(path: str | Path) -> Llama:
    """The tokenizer and metadata of a GGUF without its weights (fast)."""
    return Llama(str(path), vocab_only=True, verbose=False)


def chat_formatter(llm: Llama, template: str) -> tuple[Callable[[list[dict]], str], bool]:
    """(render(messages) -> prompt text, whether the tokenizer adds BOS) for a Jinja chat template.
    Raises whatever Jinja raises for a template that does not compile."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    vocab = llm._model
    eos, bos = vocab.token_get_text(llm.token_eos()), vocab.token_get_text(llm.token_bos())
    formatter = Jinja2ChatFormatter(template, eos, bos)
    return (lambda messages: formatter(messages=messages).prompt), bool(vocab.add_bos_token())


def load_adapter(llm: Llama, path: str | Path):
    """llama.cpp's handle of a LoRA adapter GGUF for this model (freed with the model), or None if refused."""
    return lib.llama_adapter_lora_init(llm._model.model, str(path).encode("utf-8")) or None


def set_adapters(llm: Llama, handles: list, scales: list[float]) -> bool:
    """Apply these adapters, at these scales, to every evaluation of the model's context."""
    return _set_adapters(llm._ctx.ctx, handles, scales)


def _set_adapters(ctx, handles: list, scales: list[float]) -> bool:
    """llama.cpp keeps adapters per context: each context of a model needs them set."""
    array = (lib.llama_adapter_lora_p_ctypes * len(handles))(*handles)
    factors = (ctypes.c_float * len(scales))(*scales)
    return lib.llama_set_adapters_lora(ctx, array, len(handles), factors) == 0


def trim_heap() -> None:
    """Hand memory freed by Python or a native library (an ONNX session) back to the OS: glibc keeps
    it otherwise, and a model loaded next would be counted on top of it. A no-op outside glibc."""
    libc = ctypes.CDLL(None) if sys.platform.startswith("linux") else None
    if hasattr(libc, "malloc_trim"):  # glibc (not musl)
        libc.malloc_trim(0)


# ---------------------------------------------------------------- the model's own context


def forget(llm: Llama) -> None:
    """Empty the KV cache: the next evaluation starts from nothing."""
    llm._ctx.kv_cache_clear()
    llm.reset()


def last_logits(llm: Llama) -> np.ndarray:
    """The logits after the last evaluated token (a view: the next evaluation overwrites it)."""
    return np.ctypeslib.as_array(lib.llama_get_logits_ith(llm._ctx.ctx, -1), shape=(llm.n_vocab(),))


def logits_of(llm: Llama, ids: list[int], start: int) -> np.ndarray:
    """Evaluate `ids` at positions start.. in one batch and return every position's logits (a copy),
    leaving their KV cells in place (drop them with `drop_cells_from`); `llm.n_tokens` is unchanged."""
    llm._ctx.kv_cache_seq_rm(-1, start, -1)
    llm._batch.set_batch(ids, n_past=start, logits_all=True)
    llm._ctx.decode(llm._batch)
    return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(len(ids), llm.n_vocab())).astype(np.float64)


def eval_rows(llm: Llama, ids: list[int]) -> np.ndarray:
    """`llm.eval(ids)` in one batch (`logits_of`, its cells kept as the cache's next tokens),
    returning the logits after every one of them."""
    n = llm.n_tokens
    if n + len(ids) > llm.n_ctx() or len(ids) > llm.n_batch:
        raise BkdError(f"{len(ids)} tokens after {n} do not fit the context or the batch")
    rows = logits_of(llm, ids, n)
    llm.input_ids[n : n + len(ids)] = ids
    llm.n_tokens = n + len(ids)
    return rows


def eval_after_cached(llm: Llama, tokens: list[int]) -> int:
    """Evaluate `tokens` after the longest prefix they share with the tokens already in the KV
    cache; return how many were evaluated. The last token is always evaluated: its logits choose
    the next one."""
    cached = llm.input_ids[: llm.n_tokens]
    m = min(len(cached), len(tokens) - 1)
    differ = np.flatnonzero(cached[:m] != np.asarray(tokens[:m]))
    llm.n_tokens = int(differ[0]) if len(differ) else m  # eval() drops the KV cells from here on
    n = len(tokens) - llm.n_tokens
    llm.eval(tokens[llm.n_tokens :])
    return n


def drop_last(llm: Llama, n: int) -> None:
    """Forget the last `n` evaluated tokens (the next evaluation overwrites their KV cells)."""
    llm.n_tokens -= n


def completion(llm: Llama, prompt: list[int], **params) -> dict:
    """llama-cpp-python's own completion of these tokens on the model's context (a local teacher)."""
    return llm.create_completion(prompt=prompt, **params)


def drop_cells_from(llm: Llama, start: int) -> None:
    """Remove the KV cells at positions start.. (what `logits_of` evaluated)."""
    llm._ctx.kv_cache_seq_rm(-1, start, -1)


def is_end(llm: Llama, token: int) -> bool:
    """An end-of-generation token (end of turn, end of text)."""
    return bool(lib.llama_vocab_is_eog(llm._model.vocab, token))


def save_sequence(llm: Llama, tokens: list[int], path: Path) -> bool:
    """Write the tokens and KV cells now in the context (they must be exactly `tokens`) to `path`."""
    if llm.n_tokens != len(tokens) or list(llm._input_ids) != list(tokens):
        raise BkdError("internal: the context does not hold the prefix to save")
    arr = (lib.llama_token * len(tokens))(*tokens)
    return bool(lib.llama_state_seq_save_file(llm._ctx.ctx, str(path).encode(), 0, arr, len(tokens)))


def load_sequence(llm: Llama, tokens: list[int], path: Path) -> bool:
    """Restore a state written by `save_sequence` if it holds exactly `tokens`; else leave the context empty."""
    forget(llm)
    out = (lib.llama_token * len(tokens))()
    n_out = ctypes.c_size_t(0)
    n_read = lib.llama_state_seq_load_file(llm._ctx.ctx, str(path).encode(), 0, out, len(tokens), ctypes.byref(n_out))
    if not n_read or list(out[: n_out.value]) != list(tokens):
        forget(llm)
        return False
    llm.input_ids[: len(tokens)] = tokens
    llm.n_tokens = len(tokens)
    llm._requires_eval = True  # logits are not part of the state: the next call re-evaluates one token
    return True


# ---------------------------------------------------------------- greedy decoding under a grammar

_TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])


# A batch of n tokens costs about 7 + 3n ms on 2 cores for SmolLM2-135M against 7n one at a time
# (plus ~1 ms a row for the logits the draft check needs): a draft pays from ~3 tokens.
MIN_DRAFT = 3


class GrammarGreedy:
    """One answer's sampler: a GBNF grammar (advanced by each accepted token) and a greedy choice.

    llama.cpp's grammar sampler tests a candidate token by walking the grammar over the token's
    text; applied to the whole vocabulary (49,152 tokens for SmolLM2) that costs about as much as
    the model's own decode step on a small model. Greedy decoding only needs the best *allowed*
    token, so the unconstrained argmax is tested first: when the grammar accepts it (almost always
    for a model that has learnt the format) it is the answer, exactly as if the grammar had been
    applied first; only when it is rejected is the grammar run over the whole vocabulary. This is
    what llama.cpp's own `common_sampler_sample` does.
    """

    def __init__(self, llm: Llama, gbnf: str):
        self.grammar = lib.llama_sampler_init_grammar(llm._model.vocab, gbnf.encode("utf-8"), b"root")
        if not self.grammar:
            raise BkdError("llama.cpp rejected the output grammar")
        self.llm = llm
        self.n_vocab = llm.n_vocab()
        self._one = np.zeros(1, dtype=_TOKEN_DATA)
        self._all: np.ndarray | None = None  # the whole vocabulary, built on the first rejection
        self.fallbacks = 0  # steps where the argmax was rejected and the whole vocabulary was tested

    def sample(self, logits: np.ndarray) -> int:
        """The best token the grammar allows under these logits; the grammar accepts it."""
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

    def draft(self) -> list[int]:
        """Jump-forward: the text the grammar allows as the only continuation here (JSON keys,
        brackets, separators), as tokens, not yet accepted; [] below `MIN_DRAFT` tokens. The caller
        evaluates them in one batch and keeps them as far as greedy would have chosen them
        (`take_draft`).

        The grammar is probed one byte at a time, on a copy, with the vocabulary's single-byte
        tokens and its end tokens: while exactly one ASCII byte is allowed (and not the end), it
        is forced. The forced text is tokenized on its own, which is how the model saw such text
        in training but not always how it splits it: hence the check in `take_draft`.
        """
        ids, ascii_byte = _byte_tokens(self.llm)
        probe = np.zeros(len(ids), dtype=_TOKEN_DATA)
        forced, grammar = bytearray(), None
        try:
            while True:
                probe["id"], probe["logit"] = ids, 0.0
                self._allowed(probe, grammar)
                allowed = probe["id"][np.isfinite(probe["logit"])]
                if len(allowed) != 1 or int(allowed[0]) not in ascii_byte:
                    break
                grammar = grammar or lib.llama_sampler_clone(self.grammar)
                lib.llama_sampler_accept(grammar, int(allowed[0]))
                forced += ascii_byte[int(allowed[0])]
        finally:
            if grammar:
                lib.llama_sampler_free(grammar)
        tokens = self.llm.tokenize(bytes(forced), add_bos=False, special=False) if forced else []
        return tokens if len(tokens) >= MIN_DRAFT else []

    def take_draft(self, logits: np.ndarray, draft: list[int], rows: np.ndarray) -> tuple[int, int]:
        """Greedy decoding along a draft: `logits` are those before draft[0], rows[j] those after
        draft[j]. Returns (how many draft tokens greedy takes, the token it chooses after them);
        every token taken is accepted by the grammar. Exact: a draft token is kept only where it
        is the best token the grammar allows, as in speculative decoding with the grammar as the
        draft model."""
        for j, token in enumerate(draft):
            best = self.sample(logits)
            if best != token:
                return j, best
            logits = rows[j]
        return len(draft), self.sample(logits)

    def _allowed(self, candidates: np.ndarray, grammar=None) -> bool:
        """Apply the grammar (or a copy of it) in place (rejected tokens get -inf); True if the first survived."""
        array = lib.llama_token_data_array(
            data=candidates.ctypes.data_as(ctypes.POINTER(lib.llama_token_data)),
            size=len(candidates),
            selected=-1,
            sorted=False,
        )
        lib.llama_sampler_apply(grammar or self.grammar, ctypes.byref(array))
        return bool(np.isfinite(candidates["logit"][0]))

    def free(self) -> None:
        if self.grammar:
            lib.llama_sampler_free(self.grammar)
            self.grammar = None

    def __del__(self):
        self.free()


def _byte_tokens(llm: Llama) -> tuple[np.ndarray, dict[int, bytes]]:
    """(the probe's token ids: every single-byte token and every end token, {id: byte} of the
    ASCII ones), read once per model from its vocabulary (~50 ms for 49,152 tokens)."""
    cached = getattr(llm, "_bkd_byte_tokens", None)
    if cached is None:
        vocab, buf, ids, ascii_byte = llm._model.vocab, ctypes.create_string_buffer(8), [], {}
        for token in range(llm.n_vocab()):
            n = lib.llama_token_to_piece(vocab, token, buf, len(buf), 0, False)
            if n == 1 or lib.llama_vocab_is_eog(vocab, token):
                ids.append(token)
                if n == 1 and buf.raw[0] < 0x80:
                    ascii_byte.setdefault(token, buf.raw[:1])
        cached = llm._bkd_byte_tokens = (np.asarray(ids, dtype=np.int32), ascii_byte)
    return cached


# ---------------------------------------------------------------- several sequences in one context


class SequenceContext:
    """A second context on a loaded model's weights (shared, not copied) holding `n_seq` sequences,
    each in its own KV stream of `n_ctx` cells, and a batch of up to `n_batch` tokens.

    The model's own context params are copied so that everything affecting numerics (flash
    attention, KV cache types, ubatch size, threads) matches its one-sequence context. The KV cache
    is not unified: each sequence's cells lie exactly as they would in that context.
    """

    def __init__(self, llm: Llama, n_ctx: int, n_seq: int, n_batch: int, adapters: tuple = ((), ())):
        params = lib.llama_context_params.from_buffer_copy(llm.context_params)
        params.n_ctx = n_seq * n_ctx
        params.n_seq_max = n_seq
        params.n_batch = n_batch
        params.n_ubatch = min(params.n_ubatch, n_batch)
        params.kv_unified = False
        self.ctx = lib.llama_init_from_model(llm._model.model, params)
        if not self.ctx:
            raise BkdError(f"llama.cpp could not create a context for {n_seq} sequences of {n_ctx} tokens")
        if adapters[0] and not _set_adapters(self.ctx, *adapters):  # (handles, scales), as on the model's context
            self.free()
            raise BkdError("llama.cpp could not set the LoRA adapters on a multi-sequence context")
        self.batch = lib.llama_batch_init(n_batch, 0, 1)
        self.vocab, self.n_vocab = llm._model.vocab, llm.n_vocab()

    def decode(self, entries: list[tuple[int, int, int, bool]]) -> None:
        """One llama_decode of `entries`: (sequence id, position, token, whether its logits are wanted)."""
        batch = self.batch
        for n, (seq, pos, token, logits) in enumerate(entries):
            batch.token[n] = token
            batch.pos[n] = pos
            batch.n_seq_id[n] = 1
            batch.seq_id[n][0] = seq
            batch.logits[n] = logits
        batch.n_tokens = len(entries)
        rc = lib.llama_decode(self.ctx, batch)
        if rc != 0:
            raise BkdError(f"llama_decode failed with code {rc} on a batch of {len(entries)} tokens")

    def logits(self, index: int) -> np.ndarray:
        """The logits of the `index`-th entry of the last decode that asked for logits (a view)."""
        return np.ctypeslib.as_array(lib.llama_get_logits_ith(self.ctx, index), shape=(self.n_vocab,))

    def state(self, seq: int) -> ctypes.Array:
        """A copy of sequence `seq`'s KV cells, to restore into other sequences."""
        state = (ctypes.c_uint8 * lib.llama_state_seq_get_size(self.ctx, seq))()
        lib.llama_state_seq_get_data(self.ctx, state, len(state), seq)
        return state

    def restore(self, state: ctypes.Array, seq: int) -> bool:
        return bool(lib.llama_state_seq_set_data(self.ctx, state, len(state), seq))

    def remove(self, seq: int, start: int = -1) -> None:
        """Free the KV cells of sequence `seq` at positions start.. (every cell by default)."""
        lib.llama_memory_seq_rm(lib.llama_get_memory(self.ctx), seq, start, -1)

    def is_end(self, token: int) -> bool:
        return bool(lib.llama_vocab_is_eog(self.vocab, token))

    def piece(self, token: int) -> bytes:
        """A token's bytes (a piece may be part of a UTF-8 character: join bytes, decode at the end)."""
        buf = ctypes.create_string_buffer(64)
        n = lib.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
        if n < 0:  # too small: -n is the size needed
            buf = ctypes.create_string_buffer(-n)
            n = lib.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
        return buf.raw[:n]

    def free(self) -> None:
        if self.ctx:
            lib.llama_batch_free(self.batch)
            lib.llama_free(self.ctx)
            self.ctx = None
