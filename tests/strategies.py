"""Hypothesis strategies shared by the test files: random mask specs over a batch of B rows of length L."""

import torch
from hypothesis import strategies as st

import attnmask as am


@st.composite
def row_lengths(draw, batch, length):
    return [draw(st.integers(0, length)) for _ in range(batch)]


@st.composite
def primitive(draw, batch, length):
    kind = draw(st.sampled_from(["causal", "window", "chunk", "chunk_off", "prefix", "doc", "pad", "full", "custom"]))
    if kind == "causal":
        return am.causal()
    if kind == "window":
        return am.sliding_window(draw(st.integers(1, length + 1)))
    if kind == "chunk":
        return am.chunked(draw(st.integers(1, length + 1)))
    if kind == "chunk_off":
        return am.chunked(draw(st.integers(1, length + 1)), [draw(st.integers(0, length)) for _ in range(batch)])
    if kind == "prefix":
        return am.prefix_lm(draw(row_lengths(batch, length)))
    if kind == "doc":
        rows = []
        for _ in range(batch):
            lens, left = [], draw(st.integers(0, length))
            while left > 0:
                n = draw(st.integers(1, left))
                lens.append(n)
                left -= n
            rows.append(lens)
        return am.document(seq_lens=rows, length=length)
    if kind == "pad":
        m = torch.tensor([[draw(st.integers(0, 1)) for _ in range(length)] for _ in range(batch)])
        return am.key_padding(m)
    if kind == "full":
        return am.full()
    return am.custom(lambda b, h, q, k: (q + k) % 3 != 0, name="q_plus_k_mod3")


@st.composite
def spec_tree(draw, batch, length, depth=2):
    if depth == 0 or draw(st.booleans()):
        return draw(primitive(batch, length))
    op = draw(st.sampled_from(["and", "or", "not"]))
    left = draw(spec_tree(batch, length, depth - 1))
    if op == "not":
        return ~left
    right = draw(spec_tree(batch, length, depth - 1))
    return left & right if op == "and" else left | right


@st.composite
def spec_case(draw):
    batch = draw(st.integers(1, 3))
    kv_len = draw(st.integers(1, 12))
    q_len = draw(st.integers(1, kv_len))
    return draw(spec_tree(batch, kv_len)), batch, q_len, kv_len


@st.composite
def attention_case(draw, max_len=12):
    """A random attention problem: spec over ``batch`` rows, ``Q <= K``, grouped-query heads and head dims.

    Returns a dict with ``spec, batch, heads, kv_heads, q_len, kv_len, head_dim, value_dim``.
    """
    batch = draw(st.integers(1, 3))
    kv_len = draw(st.integers(1, max_len))
    q_len = draw(st.integers(1, kv_len))
    kv_heads = draw(st.integers(1, 2))
    heads = kv_heads * draw(st.sampled_from([1, 2, 3]))
    head_dim = draw(st.sampled_from([1, 4, 8]))
    value_dim = draw(st.sampled_from([head_dim, 3]))
    spec = draw(spec_tree(batch, kv_len))
    return dict(
        spec=spec,
        batch=batch,
        heads=heads,
        kv_heads=kv_heads,
        q_len=q_len,
        kv_len=kv_len,
        head_dim=head_dim,
        value_dim=value_dim,
    )


@st.composite
def heads_and_dims(draw, batch, q_len, kv_len):
    """Shapes of an attention problem: grouped-query heads (``heads`` a multiple of ``kv_heads``), head dims 4 or 8
    and a value dim equal to it or 6. Returns ``dict(batch, heads, kv_heads, q_len, kv_len, head_dim, value_dim)``."""
    kv_heads = draw(st.integers(1, 2))
    head_dim = draw(st.sampled_from([4, 8]))
    return dict(
        batch=batch,
        heads=kv_heads * draw(st.sampled_from([1, 2, 3])),
        kv_heads=kv_heads,
        q_len=q_len,
        kv_len=kv_len,
        head_dim=head_dim,
        value_dim=draw(st.sampled_from([head_dim, 6])),
    )
