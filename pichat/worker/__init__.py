"""The worker side: the daemon (service), slot and KV-session bookkeeping (slots), the
inference backends behind one interface (backend): llama.cpp (llama, its batched engine in
batch, its state I/O in llamalib) and a simulator (sim); KV states on disk (disk) and
moving between workers (migration)."""

from __future__ import annotations

from pichat.config import WorkerConfig
from pichat.worker.backend import Model

__all__ = ["load_model"]


def load_model(config: WorkerConfig) -> Model:
    """The backend's model for `config` (loads weights: may take seconds)."""
    if config.backend == "sim":
        from pichat.worker.sim import SimModel

        name = "sim" if config.model == "default" else config.model
        return SimModel(config.sim, config.ctx, name=name)
    from pichat.models import resolve
    from pichat.worker.llama import LlamaModel

    path, name = resolve(config.model)
    if config.engine == "batched":
        return LlamaModel(path, n_ctx=config.ctx, name=name, threads=config.threads,
                          lanes=config.slots, kv_type=config.kv_type)
    return LlamaModel(path, n_ctx=config.ctx, name=name, kv_type=config.kv_type,
                      threads=max(1, config.threads // config.slots))
