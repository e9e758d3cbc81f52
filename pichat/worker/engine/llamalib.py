"""What both llama.cpp engines (pichat/worker/engine/llama.py, one context per slot, and
pichat/worker/engine/batch.py, one batched context) do the same way through llama.cpp's C API:
token pieces, a sequence's KV state in and out, KV cache types and their size.

A saved state records the `format` it was made in (the model and the KV cache type): a
state is only ever loaded into a context of the same format, since llama.cpp would
otherwise read the bytes as something else.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
from typing import Any

from pichat.worker.engine.backend import SavedState

__all__ = ["KV_TYPES", "Pieces", "file_fingerprint", "kv_bytes_per_token", "model_format",
           "save_seq", "load_seq"]

KV_TYPES: dict[str, tuple[int, float]] = {
    "f16": (1, 2.0),
    "q8_0": (8, 34 / 32),
    "q4_0": (2, 18 / 32),
}
"""KV cache type -> (ggml type id, bytes per element): q8_0 and q4_0 store blocks of 32
values with one f16 scale."""


class Pieces:
    """A token's raw bytes, with its leading space (unlike detokenizing it alone)."""

    def __init__(self, lib: Any, vocab: Any) -> None:
        self._lib = lib
        self._vocab = vocab
        self._buf = ctypes.create_string_buffer(64)

    def __call__(self, token: int) -> bytes:
        buf = self._buf
        n = self._lib.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
        if n < 0:  # the piece is longer than the buffer
            buf = self._buf = ctypes.create_string_buffer(-n)
            n = self._lib.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
        return buf.raw[:n]


def model_format(path: str, kv_type: str) -> str:
    """What a saved state depends on: the model's weights (`file_fingerprint`), the KV
    cache type, and the llama.cpp build that wrote it (its state layout may change)."""
    import llama_cpp

    return f"llama-cpp-python {llama_cpp.__version__}:{file_fingerprint(path)}:{kv_type}"


def file_fingerprint(path: str, samples: int = 32, block: int = 64 * 1024) -> str:
    """A digest of a model file that tells two files apart without reading gigabytes (a
    Pi reads an SD card at ~50 MB/s): its size, its first MiB (the GGUF header and
    metadata) and `samples` blocks spread over the rest (weights differ everywhere)."""
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        digest.update(size.to_bytes(8, "little"))
        digest.update(f.read(1 << 20))
        for i in range(samples):
            f.seek(size * i // samples)
            digest.update(f.read(block))
    return digest.hexdigest()


def kv_bytes_per_token(lib: Any, model: Any, kv_type: str) -> int:
    """Bytes of KV cache one token takes in one sequence: every layer's K and V rows."""
    layers = lib.llama_model_n_layer(model)
    heads_kv = lib.llama_model_n_head_kv(model)
    arch = _meta(lib, model, "general.architecture")
    k_dim = _meta_int(lib, model, f"{arch}.attention.key_length")
    v_dim = _meta_int(lib, model, f"{arch}.attention.value_length")
    if not k_dim or not v_dim:
        head = lib.llama_model_n_embd(model) // max(1, lib.llama_model_n_head(model))
        k_dim, v_dim = k_dim or head, v_dim or head
    return int(layers * heads_kv * (k_dim + v_dim) * KV_TYPES[kv_type][1])


def _meta(lib: Any, model: Any, key: str) -> str:
    buf = ctypes.create_string_buffer(256)
    n = lib.llama_model_meta_val_str(model, key.encode(), buf, len(buf))
    return buf.value.decode("utf-8", "replace") if n >= 0 else ""


def _meta_int(lib: Any, model: Any, key: str) -> int:
    value = _meta(lib, model, key)
    return int(value) if value.isdigit() else 0


def save_seq(lib: Any, ctx: Any, seq: int, tokens: tuple[int, ...], fmt: str) -> SavedState:
    """Sequence `seq`'s KV state (it holds `tokens`)."""
    size = lib.llama_state_seq_get_size(ctx, seq)
    buf = (ctypes.c_uint8 * size)()
    n = lib.llama_state_seq_get_data(ctx, buf, size, seq)
    return SavedState(tokens, ctypes.string_at(buf, n), n + 4 * len(tokens), format=fmt)


def load_seq(lib: Any, ctx: Any, seq: int, state: SavedState, fmt: str) -> bool:
    """Load `state` into sequence `seq`, which must be empty. False if it was made in
    another format or llama.cpp refused it (the sequence is then empty)."""
    if state.format != fmt:
        return False
    data = state.data
    buf = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
    if lib.llama_state_seq_set_data(ctx, buf, len(data), seq) == 0:
        lib.llama_memory_seq_rm(lib.llama_get_memory(ctx), seq, -1, -1)
        return False
    return True
