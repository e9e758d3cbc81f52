"""The simulated backend keeps the real backend's cache accounting and is deterministic."""

from __future__ import annotations

import threading

from pichat.config import SimConfig
from pichat.protocol import ChatMessage, Sampling
from pichat.worker.engine.sim import SimModel
from pichat.worker.engine.textstream import TextStream

FAST = SimConfig(prompt_tps=1e6, gen_tps=1e6, reply_tokens=6)


GREEDY = Sampling(temperature=0)


def generate(ctx, prompt, sampling=GREEDY, cancelled=None, stop=()):
    out = TextStream(lambda *_: None, stop=stop)
    result = ctx.generate(prompt, sampling, out, cancelled or threading.Event())
    out.close()
    return result, out.text


def test_answers_are_a_function_of_the_prompt_under_greedy_sampling():
    model = SimModel(FAST, 4096)
    prompt = model.chat_tokens([ChatMessage("user", "hi there")])
    (a, text_a), (b, text_b) = (generate(model.new_context(1), prompt) for _ in range(2))
    assert text_a == text_b
    assert len(text_a.split()) == a.completion_tokens == 6 and a.finish == "stop"


def test_an_answer_quoted_in_the_next_turn_is_fully_cached():
    model = SimModel(FAST, 4096)
    ctx = model.new_context(1)
    history = [ChatMessage("user", "hi there")]
    first, text = generate(ctx, model.chat_tokens(history))
    history += [ChatMessage("assistant", text), ChatMessage("user", "next")]
    second, _ = generate(ctx, model.chat_tokens(history))
    assert second.cached_tokens == first.prompt_tokens + first.completion_tokens


def test_max_tokens_and_context_end_cut_with_length():
    model = SimModel(FAST, 4096)
    prompt = model.chat_tokens([ChatMessage("user", "hi")])
    result, text = generate(model.new_context(1), prompt, Sampling(temperature=0, max_tokens=2))
    assert (result.finish, result.completion_tokens, len(text.split())) == ("length", 2, 2)
    small = SimModel(FAST, len(prompt) + 3)
    result, _ = generate(small.new_context(1), prompt, Sampling(temperature=0, max_tokens=100))
    assert (result.finish, result.completion_tokens) == ("length", 3)


def test_cancel_during_the_prompt_stops_at_once():
    slow = SimModel(SimConfig(prompt_tps=1.0), 4096)  # would take minutes
    cancelled = threading.Event()
    threading.Timer(0.05, cancelled.set).start()
    result, text = generate(slow.new_context(1), slow.chat_tokens(
        [ChatMessage("user", "word " * 200)]), cancelled=cancelled)
    assert (result.finish, text) == ("cancelled", "")


def test_seed_decides_the_answer_when_sampling():
    model = SimModel(FAST, 4096)
    prompt = model.chat_tokens([ChatMessage("user", "hi")])
    answers = {generate(model.new_context(1), prompt, Sampling(temperature=1, seed=s))[1]
               for s in (1, 1, 2)}
    assert len(answers) == 2
