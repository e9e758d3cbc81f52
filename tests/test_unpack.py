"""Bounded msgpack decoding: the same values as msgpack for what fits the limits, and for
hostile bodies a refusal before the memory is spent (measured with tracemalloc, which
counts allocations, not time: the same on a loaded machine)."""

from __future__ import annotations

import tracemalloc

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pichat.unpack import FAST_BYTES, DecodeError, Limits, unpack

GENEROUS = Limits(objects=1 << 20, ints=1 << 20, depth=64)

scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**64 - 1),
                    st.floats(allow_nan=False), st.text(max_size=30), st.binary(max_size=30))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=8), st.dictionaries(st.text(max_size=8), inner, max_size=6)),
    max_leaves=60)


@settings(max_examples=300, deadline=None)
@given(values, st.integers(0, 1))
def test_what_fits_decodes_exactly_as_msgpack_does(value, padded):
    # Padding pushes the body past the fast path, so both paths are compared.
    wrapped = {"v": value, "pad": "x" * (FAST_BYTES if padded else 0)}
    body = msgpack.packb(wrapped)
    assert unpack(body, GENEROUS) == msgpack.unpackb(body, raw=False, strict_map_key=False)


@pytest.mark.parametrize("tokens", [[0, 1, 127], [128, 255, 65535, 65536, 2**32 - 1],
                                    list(range(70_000))])
def test_token_arrays_decode_in_one_piece(tokens):
    body = msgpack.packb({"tokens": tokens, "pad": "x" * FAST_BYTES})
    limits = Limits(objects=16, ints=len(tokens), depth=2)
    assert unpack(body, limits)["tokens"] == tokens
    with pytest.raises(DecodeError, match="integers"):
        unpack(body, Limits(objects=16, ints=len(tokens) - 1, depth=2))


@pytest.mark.parametrize("name, hostile", [
    ("empty arrays", [[[]] * 4000] * 1000),
    ("empty maps", [[{}] * 4000] * 1000),
    ("short strings", [["ab"] * 4000] * 300),
    ("negative ints", [-1] * 3_000_000),
    ("floats", [0.5] * 400_000),
    ("big ints in an array", [2**40] * 400_000),
    ("one huge flat array", [None] * 3_000_000),
    ("deep nesting", [[[[[[[[[[[[["x"] * 1000]]]]]]]]]]]] * 100),
])
def test_a_hostile_body_is_refused_before_it_costs_memory(name, hostile):
    body = msgpack.packb({"id": "r1", "junk": hostile})
    limits = Limits(objects=30_000, ints=1 << 17, depth=8)
    tracemalloc.start()
    try:
        with pytest.raises(DecodeError):
            unpack(body, limits)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # msgpack.unpackb would build 40-290 MB from these 1-5 MB bodies; the budget of 30,000
    # objects is a few MB whatever they are.
    assert peak < 8 << 20, f"{name}: {peak / 2**20:.1f} MiB"


@pytest.mark.parametrize("body, mentions", [
    (b"\xc1", "not valid msgpack"),
    (msgpack.packb({"a": "x" * FAST_BYTES})[:-1], "not valid msgpack"),
    (msgpack.packb({"a": "x" * FAST_BYTES}) + b"\x00", "extra bytes"),
    (b"\xdf\x00\x00\x00\x01\x91\x00" + msgpack.packb("x" * FAST_BYTES), "container"),
    (b"\xdf\x00\x00\x00\x01\x05" + msgpack.packb("x" * FAST_BYTES), "not a string"),
    (b"\x91" * 2000 + b"\xc0", "not valid msgpack"),  # the fast path's own depth limit
])
def test_malformed_bodies(body, mentions):
    with pytest.raises(DecodeError, match=mentions):
        unpack(body, Limits(objects=64, depth=4))


@pytest.mark.parametrize("size", [200, FAST_BYTES + 10])
def test_strings_are_bounded_inside_msgpack(size):
    with pytest.raises(DecodeError, match="max_str_len"):
        unpack(msgpack.packb({"a": "x" * size}), Limits(max_str=100))
