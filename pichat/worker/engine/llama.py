"""The llama.cpp backend (llama-cpp-python) on one GGUF file: the tokenizer and chat
template, and the slots' contexts, made by one of two engines:

- `batched` (the default): one context whose sequences are the slots, decoded together by
  a `BatchEngine` (pichat/worker/engine/batch.py);
- `contexts`: one `Llama` object per slot (`LlamaContext` below), each with its own KV
  cache and buffers (~500 MB more per slot for the 0.5B default at 4k context, measured),
  sharing the mmapped weights; each slot generates in its own thread (llama.cpp releases
  the GIL). Kept for comparison (`make bench`).

KV state moves between slots and the session store with llama.cpp's per-sequence state
API (`llama_state_seq_get_data` / `llama_state_seq_set_data`): measured here at 2-14 ms
to save and 1-9 ms to restore an 800-token session. `Llama.save_state()` and
`LlamaRAMCache` are not used: they copy the whole logits array (tokens x vocabulary
floats, up to 512 MiB per snapshot).
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pichat.errors import BadRequest, PichatError
from pichat.logs import clip
from pichat.protocol import ChatMessage, Sampling
from pichat.worker.engine import shift
from pichat.worker.engine.backend import Generation, Room, SavedState, common_prefix
from pichat.worker.engine.llamalib import (
    KV_TYPES,
    Pieces,
    kv_bytes_per_token,
    load_seq,
    model_format,
    save_seq,
)
from pichat.worker.engine.textstream import TextStream
from pichat.worker.engine.tools import family_of, template_messages, template_tools

__all__ = ["LlamaModel", "LlamaContext", "FALLBACK_TEMPLATE", "FILE_TYPES", "parameter_size"]

log = logging.getLogger(__name__)

FALLBACK_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
"""ChatML, for GGUF files that carry no chat template (base models)."""

_SEQ = 0
"""Each context holds one conversation, as llama.cpp sequence 0."""

EMBED_TOKENS = 512
"""The longest input an embeddings request may have, in tokens (the embedding context
decodes 2,048 tokens of up to 16 inputs at once)."""

PREFILL_SLICE = 128
"""Prompt tokens evaluated per call, so a cancel is noticed between calls. Measured here
(0.5B model, 2 threads, 1024-token prompt): 512, 256 and 128 all read ~300 tokens/s, 64
read 4 % slower. On a Pi at 15 tokens/s, 128 tokens is ~8 s of latency for a cancel."""


FILE_TYPES = {"0": "F32", "1": "F16", "2": "Q4_0", "3": "Q4_1", "7": "Q8_0", "8": "Q5_0",
              "9": "Q5_1", "10": "Q2_K", "11": "Q3_K_S", "12": "Q3_K_M", "13": "Q3_K_L",
              "14": "Q4_K_S", "15": "Q4_K_M", "16": "Q5_K_S", "17": "Q5_K_M", "18": "Q6_K",
              "19": "IQ2_XXS", "20": "IQ2_XS", "21": "Q2_K_S", "22": "IQ3_XS",
              "23": "IQ3_XXS", "24": "IQ1_S", "25": "IQ4_NL", "26": "IQ3_S", "27": "IQ3_M",
              "28": "IQ2_S", "29": "IQ2_M", "30": "IQ4_XS", "31": "IQ1_M", "32": "BF16",
              "36": "TQ1_0", "37": "TQ2_0", "38": "MXFP4"}
"""llama.cpp's `general.file_type` numbers (`enum llama_ftype`) by the names Ollama shows."""


def parameter_size(n: int) -> str:
    """`n` parameters as Ollama writes them: 494032768 -> "494.03M", 3212749888 -> "3.21B"."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


class LlamaModel:
    """`lanes` 0: each slot its own llama.cpp context (`new_context` loads another one);
    `lanes` N: one context of N sequences decoded together by a `BatchEngine`
    (pichat/worker/engine/batch.py), each slot one of its lanes."""

    backend = "llama"

    def __init__(self, path: str | Path, *, n_ctx: int, name: str | None = None,
                 threads: int = 1, lanes: int = 0, kv_type: str = "f16") -> None:
        import llama_cpp  # deferred: importing it loads the shared library
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        self._llama_cpp = llama_cpp
        self.path = str(path)
        self._threads = threads
        self._embedder: Any = None
        self._embed_lock = threading.Lock()
        self.weights_bytes = Path(path).stat().st_size
        self.kv_type = kv_type
        self.engine = "batched" if lanes else "contexts"
        self.batch: Any = None
        """The `BatchEngine` (batched)."""
        # With lanes, this first context only serves the tokenizer: keep it tiny.
        first = self._load(64, threads, "f16") if lanes else self._load(n_ctx, threads)
        train_ctx = first._model.n_ctx_train()
        if n_ctx > train_ctx:
            log.warning("ctx %d exceeds the model's training context %d; using %d",
                        n_ctx, train_ctx, train_ctx)
            n_ctx = train_ctx
            if not lanes:
                first.close()
                first = self._load(n_ctx, threads)
        self._spare: Any = None if lanes else first
        self._ref = first
        self.n_ctx = n_ctx
        self._lanes = 0
        meta = first.metadata
        self.name = name or meta.get("general.name") or Path(path).stem
        model = first._model.model
        self.format = model_format(self.path, kv_type)
        self.kv_token_bytes = kv_bytes_per_token(llama_cpp, model, kv_type)
        if lanes:
            from pichat.worker.engine.batch import BatchEngine

            self.batch = BatchEngine(first, llama_cpp, lanes=lanes, n_ctx=n_ctx,
                                     threads=threads, kv_type=kv_type, fmt=self.format)
        self.n_vocab = first.n_vocab()
        self.family = str(meta.get("general.architecture", ""))
        self.parameter_size = parameter_size(first._model.n_params())
        self.quantization = FILE_TYPES.get(str(meta.get("general.file_type", "")), "")
        template = meta.get("tokenizer.chat_template")
        if not template:
            log.warning("%s has no chat template; using ChatML", self.path)
            template = FALLBACK_TEMPLATE
        eos, bos = first.token_eos(), first.token_bos()
        tokens = {"eos_token": first._model.token_get_text(eos) if eos != -1 else "",
                  "bos_token": first._model.token_get_text(bos) if bos != -1 else ""}
        self.tool_family = family_of(template)
        """How the model writes a tool call (pichat/worker/engine/tools.py)."""
        self._formatter = Jinja2ChatFormatter(template=template, **tokens)
        self._prefix_formatter = Jinja2ChatFormatter(template=template,
                                                     add_generation_prompt=False, **tokens)

    def _load(self, n_ctx: int, threads: int, kv_type: str | None = None) -> Any:
        kv_type = kv_type or self.kv_type
        try:
            return self._llama_cpp.Llama(
                model_path=self.path,
                n_ctx=n_ctx,
                n_batch=min(512, n_ctx),
                n_threads=threads,
                n_threads_batch=threads,
                logits_all=False,
                type_k=KV_TYPES[kv_type][0],
                type_v=KV_TYPES[kv_type][0],
                flash_attn=kv_type != "f16",
                verbose=False,
            )
        except (ValueError, RuntimeError) as exc:
            raise PichatError(f"cannot load GGUF model {self.path}: {exc}") from None

    def chat_tokens(self, messages: Sequence[ChatMessage], tools: str = "") -> list[int]:
        return self._render(self._formatter, messages, tools)

    def prefix_tokens(self, messages: Sequence[ChatMessage], k: int, tools: str = ""
                      ) -> list[int]:
        return self._render(self._prefix_formatter, messages[:k], tools) if k else []

    def _render(self, formatter: Any, messages: Sequence[ChatMessage], tools: str) -> list[int]:
        functions = template_tools(tools, compact=True)
        try:
            rendered = formatter(
                messages=template_messages(messages, functions, self.tool_family),
                tools=functions if self.tool_family != "generic" else None,
            )
        except Exception as exc:  # the template's raise_exception, or a Jinja error
            raise BadRequest(f"the model's chat template rejected the messages: "
                             f"{clip(str(exc), 200)}") from None
        return self._ref.tokenize(
            rendered.prompt.encode("utf-8"), add_bos=not rendered.added_special, special=True
        )

    def text_tokens(self, text: str) -> list[int]:
        return self._ref.tokenize(text.encode("utf-8"), add_bos=True, special=False)

    def embed(self, texts: Sequence[str]) -> tuple[list[bytes], int]:
        """On a context of its own (made at the first call, sharing the mapped weights):
        inputs of up to `EMBED_TOKENS` tokens, up to 16 per decode."""
        with self._embed_lock:
            if self._embedder is None:
                self._embedder = self._load_embedder()
            llm = self._embedder
            counts = [len(llm.tokenize(t.encode("utf-8"), add_bos=True, special=False))
                      for t in texts]
            for i, n in enumerate(counts):
                if n > EMBED_TOKENS:
                    raise BadRequest(f"input {i} is {n} tokens; this worker embeds at most "
                                     f"{EMBED_TOKENS} at once: split it")
            vectors = llm.embed(list(texts), normalize=True, truncate=False)
        return [np.asarray(v, dtype="<f4").tobytes() for v in vectors], sum(counts)

    def _load_embedder(self) -> Any:
        try:
            return self._llama_cpp.Llama(
                model_path=self.path, embedding=True, n_ctx=EMBED_TOKENS * 4,
                n_batch=EMBED_TOKENS * 4, n_ubatch=EMBED_TOKENS * 4, n_seq_max=16,
                pooling_type=self._llama_cpp.LLAMA_POOLING_TYPE_MEAN,
                n_threads=self._threads, n_threads_batch=self._threads, verbose=False)
        except (ValueError, RuntimeError) as exc:
            raise PichatError(f"cannot make an embedding context of {self.path}: {exc}"
                              ) from None

    def new_context(self, threads: int) -> Any:
        if self.batch is not None:
            from pichat.worker.engine.batch import Lane

            if self._lanes >= self.batch.lanes:
                raise PichatError(f"the engine has {self.batch.lanes} lanes")
            self._lanes += 1
            return Lane(self.batch, self._lanes - 1)
        llm, self._spare = self._spare, None
        if llm is None:
            llm = self._load(self.n_ctx, threads)
        else:
            llm._ctx.set_n_threads(threads, threads)
        return LlamaContext(llm, self.format)

    def close(self) -> None:
        if self.batch is not None:
            self.batch.close()
            self.batch = None
        if self._spare is not None:
            self._spare.close()
            self._spare = None


class LlamaContext:
    def __init__(self, llm: Any, fmt: str) -> None:
        import llama_cpp

        self.llm = llm
        self.format = fmt
        self._lib = llama_cpp
        self._vocab = llm._model.vocab
        self._piece = Pieces(llama_cpp, self._vocab)

    def tokens(self) -> list[int]:
        return self.llm.input_ids[: self.llm.n_tokens].tolist()

    def save(self) -> SavedState:
        return save_seq(self._lib, self.llm.ctx, _SEQ, tuple(self.tokens()), self.format)

    def restore(self, state: SavedState) -> bool:
        llm = self.llm
        llm._ctx.kv_cache_seq_rm(_SEQ, -1, -1)
        if not load_seq(self._lib, llm.ctx, _SEQ, state, self.format):
            self.clear()
            return False
        n = len(state.tokens)
        llm.input_ids[:n] = state.tokens
        llm.n_tokens = n
        llm._requires_eval = True
        return True

    def clear(self) -> None:
        self.llm._ctx.kv_cache_seq_rm(_SEQ, -1, -1)
        self.llm.n_tokens = 0

    def truncate(self, n: int) -> None:
        # The KV cells past n_tokens are dropped by the next eval, before it decodes.
        self.llm.n_tokens = min(self.llm.n_tokens, n)

    def adopt(self, donor: Any, prefix: Sequence[int]) -> int:
        return 0  # contexts share no cells

    def splice(self, prompt: Sequence[int]) -> int:
        llm, lib = self.llm, self._lib
        held = self.tokens()
        mem = lib.llama_get_memory(llm.ctx)
        plan = shift.plan(held, prompt) if lib.llama_memory_can_shift(mem) else None
        if plan is None:
            return common_prefix(held, prompt)
        remove = lambda p0, p1: lib.llama_memory_seq_rm(mem, _SEQ, p0, p1)  # noqa: E731

        def read(tokens: Sequence[int], pos: int) -> None:
            llm.n_tokens = pos
            llm.eval(list(tokens))

        try:
            shift.apply(plan, remove=remove, read=read, prompt=prompt,
                        move=lambda p0, p1, d: lib.llama_memory_seq_add(mem, _SEQ, p0, p1, d))
            shift.settle(plan, remove=remove, read=read, prompt=prompt)
        except Exception:
            self.clear()
            raise
        llm.input_ids[:plan.reused] = prompt[:plan.reused]
        llm.n_tokens = plan.reused
        return plan.reused

    def generate(self, prompt: Sequence[int], sampling: Sampling, out: TextStream,
                 cancelled: threading.Event, resume: int = 0, room: Room | None = None
                 ) -> Generation:
        """`resume`: how many of the prompt's last tokens are an answer begun elsewhere;
        the model simply continues after them. `room` is not used: `Llama.generate` stops
        at the context's end (the batched engine shifts and goes on)."""
        llm = self.llm
        t0 = time.perf_counter()
        cached = min(common_prefix(self.tokens(), prompt), len(prompt) - 1)
        # Evaluate the new part of the prompt slice by slice, so that a cancel does not
        # wait for a long prompt (minutes on a Pi) to finish. `Llama.eval` drops any KV
        # beyond n_tokens before it decodes.
        llm.n_tokens = cached
        for start in range(cached, len(prompt), PREFILL_SLICE):
            if cancelled.is_set():
                return Generation("cancelled", len(prompt), cached, 0,
                                  (time.perf_counter() - t0) * 1000, 0.0)
            llm.eval(prompt[start:start + PREFILL_SLICE])
        # Now the whole prompt is held: Llama.generate finds it cached and samples at once.
        llm.set_seed(sampling.seed if sampling.seed is not None else random.getrandbits(32))
        limit = min(sampling.max_tokens, llm.n_ctx() - len(prompt))
        finish = "length"
        n = 0
        t1 = t_last = time.perf_counter()
        grammar = None
        if sampling.grammar and not sampling.grammar_trigger:  # (no lazy grammars here)
            from llama_cpp.llama_grammar import LlamaGrammar

            try:
                grammar = LlamaGrammar.from_string(sampling.grammar, verbose=False)
            except ValueError:
                raise BadRequest("the answer's grammar does not parse") from None
        for token in llm.generate(
            prompt,
            temp=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k,
            min_p=sampling.min_p,
            repeat_penalty=sampling.repeat_penalty,
            reset=True,
            grammar=grammar,
        ):
            t_last = time.perf_counter()
            if n == 0:
                t1 = t_last
            if self._lib.llama_vocab_is_eog(self._vocab, token):
                finish = "stop"
                break
            n += 1
            if out.push(self._piece(token), token):
                finish = "stop"
                break
            if n >= limit:
                break
            if cancelled.is_set():
                finish = "cancelled"
                break
        return Generation(finish, len(prompt), cached, n, (t1 - t0) * 1000, (t_last - t1) * 1000)
