"""A worker's RAM, added up: the weights, the slots' KV cache and the session store, with
room for the system and llama.cpp's buffers (docs/sizing.md). Pure arithmetic over
the model's facts, apart from `total_memory`, which reads the machine's."""

from __future__ import annotations

from pichat.worker.engine.backend import Model

__all__ = ["HEADROOM", "describe", "kv_cache_bytes", "memory_warning", "total_memory"]

HEADROOM = 768 << 20
"""RAM a worker leaves for the system and needs for llama.cpp's compute buffers and Python
(measured: a worker on the default model at 4 x 4,096 tokens takes 815 MB, of which 400 MB
are weights and 192 MB KV cache)."""

_MIB = 2 ** 20


def total_memory() -> int | None:
    """MemTotal from /proc/meminfo, bytes (None where there is none)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def kv_cache_bytes(slots: int, model: Model) -> int:
    """The RAM `slots` slots' KV cache reserves."""
    return slots * model.n_ctx * model.kv_token_bytes


def describe(slots: int, model: Model, store_budget: int) -> str:
    """Where a worker's RAM for conversations goes, in one line."""
    per_token = model.kv_token_bytes
    return (f"KV cache: {slots} x {model.n_ctx} tokens ({model.engine}, "
            f"{model.kv_type}, {per_token / 1024:.1f} KiB/token) = "
            f"{kv_cache_bytes(slots, model) / _MIB:.0f} MiB; session store "
            f"{store_budget / _MIB:.0f} MiB (~{store_budget // max(1, per_token)} tokens parked)")


def memory_warning(slots: int, model: Model, store_budget: int,
                   total: int | None) -> str | None:
    """A warning if the weights, the KV cache and the session store (with `HEADROOM`) add
    up to more than `total` bytes of RAM (None: unknown, no warning)."""
    if total is None:
        return None
    kv = kv_cache_bytes(slots, model)
    need = model.weights_bytes + kv + store_budget + HEADROOM
    if need <= total:
        return None
    return (f"the model ({model.weights_bytes / _MIB:.0f} MiB), the KV cache "
            f"({kv / _MIB:.0f} MiB), the session store "
            f"({store_budget / _MIB:.0f} MiB) and {HEADROOM // _MIB} MiB for "
            f"the system and buffers need {need / _MIB:.0f} MiB; this machine has "
            f"{total / _MIB:.0f} MiB: lower --slots, --ctx or --cache-mb, or use "
            "--kv-type q8_0 (docs/sizing.md)")
