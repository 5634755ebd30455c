"""Hypothesis strategies shared by the test files: random mask specs over a batch of B rows of length L."""

import torch
from hypothesis import strategies as st

import attnmask as am
from attnmask import masks as M


@st.composite
def row_lengths(draw, batch, length):
    return [draw(st.integers(0, length)) for _ in range(batch)]


@st.composite
def primitive(draw, batch, length):
    kinds = ["causal", "window", "local", "chunk", "chunk_off", "prefix", "doc", "pad", "full", "custom"]
    kind = draw(st.sampled_from(kinds + ["blocks", "key_filter", "doc_prefix", "mask_mod"]))
    if kind == "causal":
        return am.causal()
    if kind == "window":
        return am.sliding_window(draw(st.integers(1, length + 1)))
    if kind == "local":
        return am.local_window(draw(st.integers(0, length + 1)), draw(st.integers(0, length + 1)))
    if kind == "chunk":
        return am.chunked(draw(st.integers(1, length + 1)))
    if kind == "chunk_off":
        return am.chunked(draw(st.integers(1, length + 1)), [draw(st.integers(0, length)) for _ in range(batch)])
    if kind == "prefix":
        return am.prefix_lm(draw(row_lengths(batch, length)))
    if kind in ("doc", "doc_prefix"):
        rows = []
        for _ in range(batch):
            lens, left = [], draw(st.integers(0, length))
            while left > 0:
                n = draw(st.integers(1, left))
                lens.append(n)
                left -= n
            rows.append(lens)
        if kind == "doc_prefix":
            prefixes = [[draw(st.integers(0, n)) for n in lens] for lens in rows]
            spec = am.document_prefix_lm(prefixes, rows, length=length)
            return spec.parts[1] if draw(st.booleans()) else spec  # the prefix-keys primitive, or with its documents
        return am.document(seq_lens=rows, length=length)
    if kind == "blocks":  # runs of image tokens numbered in order along the row, -1 between them
        rows = []
        for _ in range(batch):
            flags = [draw(st.booleans()) for _ in range(length)]
            starts = [f and (i == 0 or not flags[i - 1]) for i, f in enumerate(flags)]
            ids = torch.tensor(starts).long().cumsum(0) - 1
            rows.append(torch.where(torch.tensor(flags, dtype=torch.bool), ids, -1))
        return am.bidirectional_blocks(torch.stack(rows))
    if kind == "key_filter":
        ids = torch.tensor([[draw(st.integers(0, 4)) for _ in range(length)] for _ in range(batch)])
        return am.key_filter(ids, draw(st.lists(st.integers(0, 4), min_size=1, max_size=2)))
    if kind == "mask_mod":
        return am.from_mask_mod(lambda b, h, q_idx, kv_idx: (q_idx - kv_idx) % 2 == 0, name="even_distance")
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


@st.composite
def packed_case(draw):
    """Packed rows of documents (some longer than varlen's tiny-document limit of 32 tokens, some tiny), trailing
    padding, causal / bidirectional / sliding window, optional key padding of the positions outside documents."""
    batch = draw(st.integers(1, 2))
    kv_len = draw(st.integers(1, 90))
    q_len = draw(st.one_of(st.just(kv_len), st.integers(1, kv_len)))
    rows = []
    for _ in range(batch):
        lens, left = [], draw(st.integers(0, kv_len))
        while left > 0:
            n = min(left, draw(st.one_of(st.integers(1, 6), st.integers(30, 70))))
            lens.append(n)
            left -= n
        rows.append(lens)
    spec = am.document(seq_lens=rows, length=kv_len)
    rule = draw(st.sampled_from(["causal", "full", "window"]))
    if rule == "causal":
        spec = am.causal() & spec
    elif rule == "window":
        spec = spec & am.sliding_window(draw(st.integers(1, 40)))
    if draw(st.booleans()):
        spec = spec & am.key_padding(next(p for p in spec.walk() if isinstance(p, M.Document)).doc_ids >= 0)
    return spec, draw(heads_and_dims(batch, q_len, kv_len))


@st.composite
def padded_case(draw):
    """A left-padded batch (the padding queries see no key), causal or sliding window."""
    batch = draw(st.integers(1, 3))
    kv_len = q_len = draw(st.integers(1, 60))
    mask = torch.zeros(batch, kv_len, dtype=torch.long)
    for b in range(batch):
        mask[b, kv_len - draw(st.integers(0, kv_len)) :] = 1
    rule = draw(st.sampled_from([am.causal(), am.sliding_window(draw(st.integers(1, 20)))]))
    return rule & am.key_padding(mask), draw(heads_and_dims(batch, q_len, kv_len))


@st.composite
def short_documents_case(draw):
    """Rows of documents of 1-12 tokens (lengths any, not multiples of a tile), causal, optionally with a sliding
    window smaller than the band and key padding of an untokenised tail of up to 10 positions."""
    batch = draw(st.integers(1, 2))
    length = draw(st.integers(1, 80))
    tail = draw(st.integers(0, min(10, length - 1)))
    rows = []
    for _ in range(batch):
        lens, left = [], length - tail
        while left > 0:
            lens.append(min(left, draw(st.integers(1, 12))))
            left -= lens[-1]
        rows.append(lens)
    spec = am.causal() & am.document(seq_lens=rows, length=length)
    if draw(st.booleans()):
        spec = spec & am.sliding_window(draw(st.integers(1, 8)))
    if draw(st.booleans()):
        spec = spec & am.key_padding(torch.arange(length).expand(batch, length) < length - tail)
    return spec, draw(heads_and_dims(batch, length, length))


@st.composite
def per_head_predicate(draw, heads, length):
    """A per-head spec for ``heads`` query heads over rows of ``length`` positions, and the same rule written on
    Python ints, ``rule(b, h, q, k) -> bool``, as the independent reference. Kinds: a causal window per head
    (``0 <= q - k < w[h]``), an ALiBi-style cut-off (a key is dropped once ``slope_h · (q - k)`` passes ``t``, slopes
    ``2^(-8(h+1)/H)``), and attention-gym style scalar mods taken as is (``from_mask_mod``): a dilation per head, a
    table of the keys each head may see, and a head that sees nothing (its rows give 0)."""
    kind = draw(st.sampled_from(["window", "alibi_cutoff", "dilated_mod", "key_table_mod", "silent_head"]))
    if kind == "window":
        widths = [draw(st.integers(1, length + 1)) for _ in range(heads)]
        w = torch.tensor(widths)
        spec = am.custom(lambda b, h, q, k: (k <= q) & (q - k < w[h]), name="window_per_head", heads=heads)
        return spec, lambda b, h, q, k: 0 <= q - k < widths[h]
    if kind == "alibi_cutoff":
        t = draw(st.floats(0.0, 4.0))
        slopes = [2 ** (-8 * (i + 1) / heads) for i in range(heads)]
        s = torch.tensor(slopes, dtype=torch.float64)
        spec = am.custom(lambda b, h, q, k: (q - k) * s[h] <= t, name="alibi_cutoff", heads=heads)
        return spec, lambda b, h, q, k: (q - k) * slopes[h] <= t
    if kind == "dilated_mod":
        spec = am.from_mask_mod(
            lambda b, h, q_idx, kv_idx: (q_idx >= kv_idx) & ((q_idx - kv_idx) % (h + 1) == 0), heads=heads
        )
        return spec, lambda b, h, q, k: q >= k and (q - k) % (h + 1) == 0
    if kind == "key_table_mod":
        table = [[draw(st.booleans()) for _ in range(length)] for _ in range(heads)]
        t = torch.tensor(table, dtype=torch.bool).view(heads, length)
        spec = am.from_mask_mod(lambda b, h, q_idx, kv_idx: t[h, kv_idx], name="key_table", heads=heads)
        return spec, lambda b, h, q, k: table[h][k]
    silent = draw(st.integers(0, heads - 1))
    spec = am.custom(lambda b, h, q, k: (h != silent) & (k <= q), name="silent_head", heads=heads)
    return spec, lambda b, h, q, k: h != silent and k <= q
