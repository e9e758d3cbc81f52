"""The llama.cpp backend with a real GGUF (a tiny random-weight model written at test time)."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from pichat.errors import BadRequest, PichatError
from pichat.protocol import ChatMessage, Sampling
from pichat.worker.engine.backend import SavedState
from pichat.worker.engine.llama import LlamaModel
from pichat.worker.engine.textstream import TextStream
from tiny_model import write_tiny_model

GREEDY = Sampling(temperature=0.0, max_tokens=24)
HELLO = (ChatMessage("user", "hello world, how are you?"),)


@pytest.fixture(scope="module")
def model(tiny_model):
    m = LlamaModel(tiny_model, n_ctx=512, threads=1)
    yield m
    m.close()


def generate(ctx, prompt, sampling=GREEDY, cancelled=None, stop=()):
    sent: list[str] = []
    out = TextStream(lambda text, _: sent.append(text), stop=stop, flush_tokens=1)
    result = ctx.generate(prompt, sampling, out, cancelled or threading.Event())
    out.close()
    return result, "".join(sent)


def test_model_reads_name_context_and_template(model, tiny_model):
    assert model.name == "pichat-tiny-test"
    assert model.n_ctx == 512
    assert model.backend == "llama"
    tokens = model.chat_tokens(HELLO)
    assert tokens[0] == 1 and tokens[1] == 3  # <s> then <|im_start|> as one control token
    assert tokens[-2:] != tokens[:2]


def test_a_continuation_outside_the_vocabulary_is_refused_before_llama_cpp_sees_it(model):
    from pichat.protocol import Request, RequestId
    from pichat.worker.store.slots import SlotManager

    manager = SlotManager(model, 1, threads=1, cache_bytes=1 << 20)
    slot = manager.acquire(None)
    out = TextStream(lambda *_: None)
    with pytest.raises(BadRequest, match=f"vocabulary \\({model.n_vocab} tokens"):
        manager.run(slot, Request(RequestId("a"), HELLO, GREEDY, continuation=(model.n_vocab,)),
                    out, threading.Event())
    result = manager.run(slot, Request(RequestId("b"), HELLO, GREEDY,
                                       continuation=(model.n_vocab - 1,)), out, threading.Event())
    assert result.prompt_tokens == len(model.chat_tokens(HELLO)) + 1


def test_greedy_generation_is_deterministic_across_contexts(model):
    prompt = model.chat_tokens(HELLO)
    first, text1 = generate(model.new_context(1), prompt)
    second, text2 = generate(model.new_context(1), prompt)
    assert text1 == text2 and text1
    assert first.completion_tokens == second.completion_tokens > 0
    assert first.prompt_tokens == len(prompt) and first.cached_tokens == 0


def test_a_continued_conversation_evaluates_only_new_tokens(model):
    ctx = model.new_context(1)
    prompt = model.chat_tokens(HELLO)
    result, text = generate(ctx, prompt)
    follow = model.chat_tokens(HELLO + (ChatMessage("assistant", text),
                                        ChatMessage("user", "more")))
    again, _ = generate(ctx, follow)
    assert again.cached_tokens >= len(prompt)
    assert again.prompt_tokens == len(follow)


def test_saved_state_restores_into_another_context_and_continues_identically(model):
    prompt = model.chat_tokens(HELLO)
    warm = model.new_context(1)
    _, text = generate(warm, prompt)
    saved = warm.save()
    assert saved.tokens == tuple(warm.tokens())
    assert saved.nbytes >= len(saved.data) > 0
    follow = model.chat_tokens(HELLO + (ChatMessage("assistant", text),
                                        ChatMessage("user", "go on")))

    other = model.new_context(1)
    assert other.restore(saved)
    assert list(other.tokens()) == list(saved.tokens)
    restored, restored_text = generate(other, follow)
    assert restored.cached_tokens >= len(prompt)

    cold, cold_text = generate(model.new_context(1), follow)
    warm_result, warm_text = generate(warm, follow)
    assert cold.cached_tokens == 0
    assert restored_text == cold_text == warm_text


def test_restoring_garbage_fails_cleanly(model):
    ctx = model.new_context(1)
    generate(ctx, model.chat_tokens(HELLO))
    assert not ctx.restore(SavedState((1, 2, 3), b"\x00" * 16, 16))
    assert list(ctx.tokens()) == []
    result, text = generate(ctx, model.chat_tokens(HELLO))  # still usable
    assert result.completion_tokens > 0


def test_max_tokens_ends_with_length(model):
    result, _ = generate(model.new_context(1), model.chat_tokens(HELLO),
                         Sampling(temperature=0, max_tokens=5))
    assert (result.finish, result.completion_tokens) == ("length", 5)


def test_generation_stops_at_the_end_of_the_context(model):
    prompt = model.chat_tokens(HELLO)
    result, _ = generate(model.new_context(1), prompt, Sampling(temperature=0, max_tokens=10_000))
    assert result.finish in ("length", "stop")
    assert result.prompt_tokens + result.completion_tokens <= model.n_ctx


def test_stop_string_truncates_the_answer(model):
    prompt = model.chat_tokens(HELLO)
    _, full = generate(model.new_context(1), prompt, Sampling(temperature=0, max_tokens=40))
    stop = full[len(full) // 2:len(full) // 2 + 3]
    assert stop.strip()
    result, text = generate(model.new_context(1), prompt, Sampling(temperature=0, max_tokens=40),
                            stop=(stop,))
    assert result.finish == "stop"
    assert text == full[:full.index(stop)]


def test_cancel_stops_before_generating(model):
    cancelled = threading.Event()
    cancelled.set()
    result, text = generate(model.new_context(1), model.chat_tokens(HELLO), cancelled=cancelled)
    assert (result.finish, result.completion_tokens, text) == ("cancelled", 0, "")


def test_seeded_sampling_repeats(model):
    prompt = model.chat_tokens(HELLO)
    sampling = Sampling(temperature=1.0, seed=42, max_tokens=16)
    _, a = generate(model.new_context(1), prompt, sampling)
    _, b = generate(model.new_context(1), prompt, sampling)
    assert a == b


def test_slots_generate_in_parallel_threads_with_the_same_results(model):
    prompts = [model.chat_tokens((ChatMessage("user", f"question number {i}"),)) for i in range(4)]
    sequential = [generate(model.new_context(1), p)[1] for p in prompts]
    contexts = [model.new_context(1) for _ in prompts]
    with ThreadPoolExecutor(4) as pool:
        parallel = list(pool.map(lambda cp: generate(*cp)[1], zip(contexts, prompts)))
    assert parallel == sequential


def test_a_template_that_rejects_the_messages_is_a_bad_request(tmp_path):
    path = write_tiny_model(tmp_path / "strict.gguf", chat_template=(
        "{% for m in messages %}{% if m['role'] == 'system' %}"
        "{{ raise_exception('System role not supported') }}{% endif %}"
        "{{ m['content'] }}{% endfor %}"))
    strict = LlamaModel(path, n_ctx=128)
    with pytest.raises(BadRequest, match="System role not supported"):
        strict.chat_tokens((ChatMessage("system", "x"), ChatMessage("user", "y")))
    strict.close()


def test_a_file_that_is_not_gguf_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a model at all")
    with pytest.raises(PichatError, match="cannot load GGUF model"):
        LlamaModel(bad, n_ctx=128)


def test_cancel_during_a_long_prompt_stops_between_slices(model, monkeypatch):
    from pichat.worker.engine import llama

    ctx = model.new_context(1)
    cancelled = threading.Event()
    evals = []
    real_eval = ctx.llm.eval

    def eval_then_cancel(tokens):
        evals.append(len(tokens))
        real_eval(tokens)
        cancelled.set()  # as if CANCEL arrived while this slice was being read

    monkeypatch.setattr(ctx.llm, "eval", eval_then_cancel)
    long_prompt = model.chat_tokens((ChatMessage("user", "hello world " * 150),))
    assert len(long_prompt) > 2 * llama.PREFILL_SLICE
    result, text = generate(ctx, long_prompt, cancelled=cancelled)
    assert (result.finish, text) == ("cancelled", "")
    assert evals == [llama.PREFILL_SLICE]


def test_another_owners_kv_is_reused_only_up_to_a_message_boundary(tiny_model):
    from pichat.protocol import Request, RequestId, SessionId
    from pichat.worker.store.slots import SlotManager

    model = LlamaModel(tiny_model, n_ctx=512, threads=1)
    manager = SlotManager(model, 1, threads=1, cache_bytes=1 << 20)
    system = ChatMessage("system", "You are the school's helpful assistant.")

    def turn(owner: str, text: str, isolate: bool = False):
        slot = manager.acquire(SessionId(owner))
        try:
            request = Request(RequestId(owner), (system, ChatMessage("user", text)), GREEDY,
                              session=SessionId(owner), owner=owner, isolate=isolate)
            return manager.run(slot, request, TextStream(lambda *_: None), threading.Event())
        finally:
            manager.release(slot)

    try:
        boundary = len(model.prefix_tokens([system], 1))
        assert model.chat_tokens([system, ChatMessage("user", "x")])[:boundary] == \
            model.prefix_tokens([system], 1)
        turn("alice", "my password is correct horse battery staple")
        # A guess sharing most of alice's message gets the system prompt from the cache,
        # not one token more (the real template's tokens, with its special tokens).
        assert turn("mallory", "my password is correct horse").cached_tokens == boundary
        turn("alice", "my password is correct horse battery staple")
        # Nor a guess of her whole message, exactly right.
        assert turn("trudy", "my password is correct horse battery staple"
                    ).cached_tokens == boundary
        turn("alice", "my password is correct horse battery staple")
        assert turn("eve", "my password is correct horse", isolate=True).cached_tokens == 0
        # The same owner reuses every equal token.
        turn("mallory", "my password is correct horse")
        assert turn("mallory", "my password is correct").cached_tokens > boundary
    finally:
        model.close()


def test_a_conversation_past_the_context_slides_with_the_real_template(model):
    from pichat.protocol import Request, RequestId, SessionId
    from pichat.worker.store.slots import SlotManager

    manager = SlotManager(model, 1, threads=1, cache_bytes=8 << 20)
    history = [ChatMessage("system", "You are terse.")]
    rows = []
    for t in range(60):  # turns of ~30 tokens; a block is 128 (a quarter of 512)
        history.append(ChatMessage("user", f"q{t}"))
        slot = manager.acquire(SessionId("long"))
        try:
            sent: list[str] = []
            result = manager.run(slot, Request(RequestId(f"r{t}"), tuple(history),
                                               Sampling(temperature=0.0, max_tokens=4),
                                               session=SessionId("long")),
                                 TextStream(lambda text, _, sent=sent: sent.append(text)),
                                 threading.Event())
        finally:
            manager.release(slot)
        history.append(ChatMessage("assistant", "".join(sent)))
        new = len(model.chat_tokens(history[-2:-1]))
        rows.append((result.prompt_tokens, result.cached_tokens, result.dropped_tokens, new))
    assert len(model.chat_tokens(history)) > 2 * model.n_ctx  # it went far past the context
    assert all(prompt + 4 <= model.n_ctx for prompt, *_ in rows)
    sliding = [r for r in rows if r[2]]
    assert sliding and rows[0][2] == 0
    # Between slides the kept start stays: only the new message (and the answer before it)
    # is read.
    warm = [r for r in sliding if r[1] >= r[0] - r[3] - 16]
    assert len(warm) >= len(sliding) // 2, rows
