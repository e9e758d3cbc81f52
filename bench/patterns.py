"""What a pattern's grammar costs per token, for the worst patterns `pichat.schemas` lets
through and for the ones it refuses.

For each pattern (a JSON schema `{"type": "string", "pattern": ...}`): its grammar applied
to the default model's whole vocabulary (151K tokens), as the engine does when the model's
own pick is refused, for `STEPS` tokens in a row; after each, the longest allowed token is
taken (the deepest walk through the grammar). We report the slowest step, and its ratio to
a plain string's grammar measured in the same run. Refused patterns are converted by
llama-cpp-python directly (what a worker did before the check).
"""

from __future__ import annotations

import ctypes
import json
import time

import llama_cpp as lib
from llama_cpp.llama_grammar import json_schema_to_gbnf

from pichat.models import DEFAULT_MODEL, resolve
from pichat.schemas import SchemaError, check_schema

STEPS = 12
PATTERNS = [
    "^[a-zA-Z0-9._%+-]+@[a-zA-Z0-9.-]+[.][a-zA-Z]{2,}$",
    "^.*.*$",
    "^(.+){2}$",
    "^.*.{6}$",
    "^.{0,3}.{0,3}$",
    "^((a{1000}){1000}){1000}$",
    # refused:
    "^.*.*.*$",
    "^.*.{14}$",
    "^(a{0,10}){0,30}$",
    "^([a-z]|[a-y]|[b-z])*$",
    "^.{0,1000}.{0,1000}$",
]


def _cost(vocab, n: int, grammar: str) -> float:
    sampler = lib.llama_sampler_init_grammar(vocab, grammar.encode(), b"root")
    if not sampler:
        return float("nan")
    buf = ctypes.create_string_buffer(256)
    slowest = 0.0
    try:
        for _ in range(STEPS):
            data = (lib.llama_token_data * n)(*[lib.llama_token_data(i, 0.0, 0.0)
                                                for i in range(n)])
            array = lib.llama_token_data_array(data, n, -1, False)
            start = time.perf_counter()
            lib.llama_sampler_apply(sampler, ctypes.byref(array))
            slowest = max(slowest, time.perf_counter() - start)
            allowed = [data[i].id for i in range(n) if data[i].logit != float("-inf")]
            if not allowed:
                break

            def length(token: int) -> int:
                return lib.llama_token_to_piece(vocab, token, buf, 256, 0, True)

            lib.llama_sampler_accept(sampler, max(allowed[:20000], key=length))
    finally:
        lib.llama_sampler_free(sampler)
    return slowest


async def main(argv: list[str]) -> list[str]:
    lib.llama_backend_init()
    params = lib.llama_model_default_params()
    params.vocab_only = True
    model = lib.llama_model_load_from_file(str(resolve(DEFAULT_MODEL)[0]).encode(), params)
    vocab = lib.llama_model_get_vocab(model)
    n = lib.llama_vocab_n_tokens(vocab)
    base = _cost(vocab, n, json_schema_to_gbnf(json.dumps({"type": "string"})))
    lines = [f"a plain string's grammar: {base * 1000:.0f} ms per token over {n} tokens",
             f"{'pattern':<52} {'check':<34} {'ms/token':>9} {'ratio':>6}"]
    for pattern in PATTERNS:
        schema = {"type": "string", "pattern": pattern}
        try:
            check_schema(schema)
            verdict = "accepted"
        except SchemaError as exc:
            verdict = "refused: " + str(exc).split(": ")[-1][:25]
        cost = _cost(vocab, n, json_schema_to_gbnf(json.dumps(schema)))
        lines.append(f"{pattern[:52]:<52} {verdict:<34} {cost * 1000:>9.0f} "
                     f"{cost / base:>6.1f}")
    lib.llama_model_free(model)
    return lines
