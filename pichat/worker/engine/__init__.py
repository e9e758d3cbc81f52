"""The inference backends behind one interface (backend): llama.cpp (llama, batch,
llamalib) and the simulator (sim), with what they share (shift, textstream, tools,
toolfit, summary). `load_model` picks one for a worker's config. Imports the wire and
pichat.config, never the store or the daemon."""

from __future__ import annotations

from pichat.config import WorkerConfig
from pichat.worker.engine.backend import Model

__all__ = ["load_model"]


def load_model(config: WorkerConfig) -> Model:
    """The backend's model for `config` (loads weights: may take seconds)."""
    if config.backend == "sim":
        from pichat.worker.engine.sim import SimModel

        name = "sim" if config.model == "default" else config.model
        return SimModel(config.sim, config.ctx, name=name)
    from pichat.models import resolve
    from pichat.worker.engine.llama import LlamaModel

    path, name = resolve(config.model)
    if config.engine == "batched":
        return LlamaModel(path, n_ctx=config.ctx, name=name, threads=config.threads,
                          lanes=config.slots, kv_type=config.kv_type)
    return LlamaModel(path, n_ctx=config.ctx, name=name, kv_type=config.kv_type,
                      threads=max(1, config.threads // config.slots))
