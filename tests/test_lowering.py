"""Block layouts equal FlexAttention's create_block_mask and the dense mask; exports and varlen arguments."""

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn.attention.flex_attention import flex_attention

import attnmask as am
from attnmask.lowering import (
    FULL,
    NONE,
    PARTIAL,
    BlockLayout,
    VarlenArgs,
    block_layout,
    varlen_args,
    varlen_form,
)
from tests.lowering_refs import assert_same_block_mask, dense_classes, flex_reference
from tests.naive import naive_attention
from tests.strategies import primitive, spec_tree


def doc_lens(total: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    lens = []
    while sum(lens) < total:
        lens.append(int(torch.randint(1, 60, (1,), generator=g)))
    lens[-1] -= sum(lens) - total
    return [n for n in lens if n]


def padding_mask(lengths: list[int], total: int, left: bool = False) -> torch.Tensor:
    m = torch.zeros(len(lengths), total, dtype=torch.long)
    for i, n in enumerate(lengths):
        if left:
            m[i, total - n :] = 1
        else:
            m[i, :n] = 1
    return m


# ---------------------------------------------------------------------------------------------------------------------
# Parity with FlexAttention's create_block_mask

L = 200  # not a multiple of the block sizes below
SPECS = {
    "causal": lambda: am.causal(),
    "sliding_window": lambda: am.sliding_window(37),
    "chunked": lambda: am.chunked(50),
    "chunked_offsets": lambda: am.chunked(40, offsets=[3, 17]),
    "causal_chunked": lambda: am.causal() & am.chunked(48, offsets=[0, 5]),
    "prefix": lambda: am.prefix_lm([70, 0]),
    "document": lambda: am.document(seq_lens=doc_lens(L, 0)),
    "document_padded_rows": lambda: am.document(seq_lens=[doc_lens(150, 1), doc_lens(L, 2)], length=L),
    "key_padding_right": lambda: am.key_padding(padding_mask([120, L], L)),
    "key_padding_left": lambda: am.key_padding(padding_mask([90, 33], L, left=True)),
    "causal_document": lambda: am.causal() & am.document(seq_lens=doc_lens(L, 3)),
    "window_document": lambda: am.sliding_window(20) & am.document(seq_lens=doc_lens(L, 4)),
    "causal_key_padding": lambda: am.causal() & am.key_padding(padding_mask([120, 61], L, left=True)),
    "document_key_padding": lambda: (
        am.causal()
        & am.document(seq_lens=[doc_lens(150, 5), doc_lens(180, 6)], length=L)
        & am.key_padding(padding_mask([150, 180], L))
    ),
    "prefix_key_padding": lambda: am.prefix_lm([40, 100]) & am.key_padding(padding_mask([150, L], L)),
    "causal_or_document": lambda: am.causal() | am.document(seq_lens=doc_lens(L, 7)),
    "window_or_chunk": lambda: am.sliding_window(16) | am.chunked(64),
    "not_document": lambda: ~am.document(seq_lens=doc_lens(L, 8)),
    "not_causal": lambda: ~am.causal(),
    "full": lambda: am.full(),
    "chunk_key_padding": lambda: (
        am.causal() & am.chunked(32, offsets=[0, 9]) & am.key_padding(padding_mask([L, 150], L))
    ),
    "window_or_prefix": lambda: am.sliding_window(24) | am.prefix_lm([30, 60]),
    "not_window_and_document": lambda: ~am.sliding_window(10) & am.document(seq_lens=doc_lens(L, 10)),
}
SHAPES = [(L, L, 32), (L, L, 25), (192, 192, 32), (70, L, 16)]
# Two PARTIAL parts can together cover a tile (|) or leave it empty (&): those tiles stay PARTIAL (sound, not exact).
SOUND_ONLY = {("causal_or_document", (70, L, 16)), ("not_window_and_document", (L, L, 25))}
CASES = [(name, *shape) for name in SPECS for shape in SHAPES if (name, shape) not in SOUND_ONLY]


@pytest.mark.parametrize("name, q_len, kv_len, block_size", CASES)
def test_flex_export_equals_create_block_mask(name, q_len, kv_len, block_size):
    spec = SPECS[name]()
    layout = spec.block_layout(q_len, kv_len, block_size)
    assert_same_block_mask(layout.to_flex(), flex_reference(spec, q_len, kv_len, block_size))


@pytest.mark.parametrize("name, q_len, kv_len, block_size", CASES)
def test_layout_classes_equal_those_of_the_dense_mask(name, q_len, kv_len, block_size):
    spec = SPECS[name]()
    layout = spec.block_layout(q_len, kv_len, block_size)
    want = dense_classes(spec.to_dense(q_len, kv_len), block_size)
    assert layout.classes.dtype == torch.int8
    assert torch.equal(layout.classes, want)


@pytest.mark.parametrize("name, q_len, kv_len, block_size", [(name, *shape) for name, shape in sorted(SOUND_ONLY)])
def test_combinations_of_partial_parts_are_sound_but_may_miss_full_or_empty_tiles(name, q_len, kv_len, block_size):
    spec = SPECS[name]()
    layout = spec.block_layout(q_len, kv_len, block_size)
    implied = dense_classes(spec.to_dense(q_len, kv_len), block_size)
    assert_sound(layout, spec.to_dense(q_len, kv_len))
    assert ((layout.classes == PARTIAL) & (implied != PARTIAL)).any()


def test_short_edge_tile_is_full_in_the_layout_and_partial_in_the_flex_export():
    layout = am.full().block_layout(5, block_size=4)
    assert layout.classes[0].tolist() == [[FULL, FULL], [FULL, FULL]]
    flex = layout.to_flex()
    assert flex.full_kv_num_blocks.flatten().tolist() == [1, 0]
    assert flex.kv_num_blocks.flatten().tolist() == [1, 2]


# ---------------------------------------------------------------------------------------------------------------------
# Properties against the dense oracle


@st.composite
def layout_case(draw, make_spec):
    batch = draw(st.integers(1, 3))
    kv_len = draw(st.integers(1, 14))
    q_len = draw(st.integers(1, kv_len))
    block_size = draw(st.integers(1, 6))
    return draw(make_spec(batch, kv_len)), q_len, kv_len, block_size


@settings(max_examples=25)
@given(layout_case(primitive), st.booleans())
def test_flex_export_of_a_random_primitive_equals_create_block_mask(case, negate):
    spec, q_len, kv_len, block_size = case
    spec = ~spec if negate else spec
    layout = spec.block_layout(q_len, kv_len, block_size)
    assert_same_block_mask(layout.to_flex(), flex_reference(spec, q_len, kv_len, block_size))


def assert_sound(layout: BlockLayout, dense: torch.Tensor):
    implied = dense_classes(dense, layout.block_size)
    assert not ((layout.classes == NONE) & (implied != NONE)).any(), "an allowed pair in a NONE tile"
    assert not ((layout.classes == FULL) & (implied != FULL)).any(), "a denied pair in a FULL tile"


@given(layout_case(spec_tree))
def test_layout_of_any_combination_is_sound(case):
    spec, q_len, kv_len, block_size = case
    assert_sound(spec.block_layout(q_len, kv_len, block_size), spec.to_dense(q_len, kv_len))


@given(layout_case(primitive), st.booleans())
def test_layout_of_a_primitive_or_its_negation_is_exact(case, negate):
    spec, q_len, kv_len, block_size = case
    spec = ~spec if negate else spec
    layout = spec.block_layout(q_len, kv_len, block_size)
    assert torch.equal(layout.classes, dense_classes(spec.to_dense(q_len, kv_len), block_size)), repr(spec)


@given(layout_case(spec_tree), st.data())
def test_layout_with_explicit_unordered_positions_is_sound(case, data):
    spec, q_len, kv_len, block_size = case
    rows = spec.batch_size or 2

    def positions(n):
        return torch.tensor(
            [data.draw(st.lists(st.integers(0, kv_len - 1), min_size=n, max_size=n)) for _ in range(rows)]
        )

    pos = {"q_positions": positions(q_len), "kv_positions": positions(kv_len)}
    dense = spec.to_dense(q_len, kv_len, **pos)
    band = spec.block_layout(q_len, kv_len, block_size, **pos, band=True)
    every = spec.block_layout(q_len, kv_len, block_size, **pos, band=False)
    assert_sound(band, dense)
    assert torch.equal(band.classes, every.classes)


@given(layout_case(spec_tree), st.booleans())
def test_classifying_only_the_band_gives_the_same_classes(case, per_row_positions):
    spec, q_len, kv_len, block_size = case
    q_pos = None
    if per_row_positions:
        q_pos = torch.arange(q_len).expand(spec.batch_size or 2, q_len) + torch.arange(spec.batch_size or 2)[:, None]
        q_pos = q_pos.clamp(max=kv_len - 1)
    band = spec.block_layout(q_len, kv_len, block_size, q_positions=q_pos, band=True)
    every = spec.block_layout(q_len, kv_len, block_size, q_positions=q_pos, band=False)
    assert torch.equal(band.classes, every.classes), repr(spec)


def test_band_of_a_long_document_causal_row_equals_every_tile():
    spec = am.causal() & am.document(seq_lens=doc_lens(4000, 9), length=4096)
    assert torch.equal(
        spec.block_layout(4096, block_size=16).classes, spec.block_layout(4096, block_size=16, band=False).classes
    )


# ---------------------------------------------------------------------------------------------------------------------
# The layout as an object


def test_causal_layout_prints_as_a_picture():
    text = str(am.causal().block_layout(5, block_size=2))
    assert text.splitlines() == [
        "BlockLayout(B=1, Q=5, K=5, block_size=2: 4 full, 2 partial, 3 none tiles)",
        "+..",
        "#+.",
        "###",
    ]


def test_large_layout_picture_groups_tiles():
    lines = str(am.causal().block_layout(4096, block_size=16)).splitlines()[1:]
    assert len(lines) == 64 and all(len(line) == 64 for line in lines)
    assert lines[1] == "#+" + "." * 62


def test_kv_blocks_list_full_and_partial_tiles_per_query_tile():
    layout = am.causal().block_layout(5, block_size=2)
    full_num, full_idx = layout.kv_blocks(FULL)
    part_num, part_idx = layout.kv_blocks(PARTIAL)
    assert full_num.tolist() == [[0, 1, 3]]  # the short last tile (key 4) is FULL for query 4
    assert full_idx[0, 2].tolist() == [0, 1, 2]
    assert part_num.tolist() == [[1, 1, 0]]
    assert [part_idx[0, i, 0].item() for i in range(2)] == [0, 1]
    assert layout.tiles(PARTIAL).tolist() == [[0, 0, 0], [0, 1, 1]]


def test_layout_records_lengths_positions_and_tile_ranges():
    layout = am.causal().block_layout(3, 10, block_size=4)
    assert (layout.q_len, layout.kv_len, layout.block_size) == (3, 10, 4)
    assert layout.q_positions.tolist() == [7, 8, 9]
    assert layout.classes.shape == (1, 1, 3)
    assert layout.kv_range(2) == (8, 10) and layout.q_range(0) == (0, 3)
    assert layout.nbytes == 3 + 8 * 13


def test_layout_rows_follow_the_spec_data():
    spec = am.causal() & am.key_padding(torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]]))
    layout = spec.block_layout(4, block_size=2)
    assert layout.classes.tolist() == [[[PARTIAL, NONE], [FULL, PARTIAL]], [[PARTIAL, NONE], [FULL, NONE]]]
    assert layout.counts() == {"full": 2, "partial": 3, "none": 3}


def test_tile_mask_is_the_dense_mask_of_the_tile():
    spec = am.causal() & am.document(seq_lens=[[3, 7], [10]])
    layout = spec.block_layout(6, 10, block_size=4)
    dense = spec.to_dense(6, 10)
    assert torch.equal(layout.tile_mask(0, 4, 6, 4, 8), dense[0, 4:6, 4:8])
    assert torch.equal(layout.tile_mask(1, 0, 4, 8, 10), dense[1, 0:4, 8:10])


def test_custom_predicate_is_evaluated_per_element():
    spec = am.custom(lambda b, h, q, k: (q // 3) == (k // 3), name="thirds")
    layout = spec.block_layout(9, block_size=3)
    assert layout.classes[0].tolist() == [[FULL, NONE, NONE], [NONE, FULL, NONE], [NONE, NONE, FULL]]


def test_custom_predicate_is_evaluated_only_where_the_structural_parts_allow():
    seen = []

    def fn(b, h, q, k):
        seen.append(torch.broadcast_shapes(b.shape, q.shape, k.shape).numel())
        return (q - k) % 5 != 1

    spec = am.causal() & am.document(seq_lens=[64] * 4) & am.custom(fn)
    layout = spec.block_layout(256, block_size=16, band=False)
    assert torch.equal(layout.classes, dense_classes(spec.to_dense(256, 256), 16))
    assert sum(seen) - 256 * 256 <= 4 * 64 * 64  # to_dense saw every pair; the layout only the diagonal blocks


def test_conjunction_of_custom_predicates_uses_every_part():
    thirds = am.custom(lambda b, h, q, k: (q // 3) == (k // 3))
    spec = thirds & am.custom(lambda b, h, q, k: k <= q)
    layout = spec.block_layout(9, block_size=3)
    assert torch.equal(layout.classes, dense_classes(spec.to_dense(9), 3))
    assert (layout.classes == PARTIAL).sum() == 3


def test_partial_parts_that_together_leave_a_tile_empty_or_cover_it_are_exact_when_a_custom_part_is_there():
    """Each part alone is PARTIAL on the one tile; together they allow nothing (&) or everything (|)."""
    odd = am.custom(lambda b, h, q, k: (q + k) % 2 == 1, name="odd")
    even = am.custom(lambda b, h, q, k: (q + k) % 2 == 0, name="even")
    for spec, want in (
        (~am.custom(lambda b, h, q, k: k <= q) & am.causal() & am.sliding_window(1), NONE),
        (odd & am.local_window(0, 0), NONE),
        (odd | (am.local_window(0, 0) | ~am.local_window(0, 0)), FULL),
        (odd | even, FULL),
        (odd & even, NONE),
    ):
        assert spec.block_layout(4, 4, block_size=4).classes.flatten().tolist() == [want], repr(spec)
        assert torch.equal(spec.block_layout(9, block_size=3).classes, dense_classes(spec.to_dense(9), 3))


def test_a_per_head_predicate_outside_every_band_is_classified_none_not_an_error():
    per_head = am.custom(lambda b, h, q, k: k <= q, heads=2)
    spec = per_head & ~(am.causal() & am.causal())  # the structural part leaves no key tile to evaluate
    assert spec.block_layout(1, 1, block_size=1).classes.tolist() == [[[NONE]]]


def test_layout_leaves_the_thread_setting_as_it_found_it():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        am.causal().block_layout(64, block_size=16)
        with pytest.raises(am.SpecError):
            am.document(seq_lens=[3]).block_layout(4)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_empty_lengths_give_an_empty_layout():
    layout = am.causal().block_layout(0, 0, block_size=4)
    assert layout.classes.shape == (1, 0, 0)
    assert layout.density() == 0.0


@pytest.mark.parametrize(
    "make, words",
    [
        (lambda: am.causal().block_layout(4, block_size=0), ["block_size", ">= 1", "0"]),
        (lambda: block_layout(torch.ones(3), 4), ["spec", "MaskSpec", "Tensor"]),
        (lambda: am.causal().block_layout(4).kv_blocks(0), ["kind", "PARTIAL", "0"]),
        (lambda: am.document(seq_lens=[3]).block_layout(4), ["kv_positions", "[0, 3)"]),
    ],
)
def test_bad_layout_arguments_raise_a_typed_error(make, words):
    with pytest.raises(am.AttnmaskError) as info:
        make()
    for word in words:
        assert word in str(info.value)


# ---------------------------------------------------------------------------------------------------------------------
# FlexAttention with the exported BlockMask


@pytest.mark.parametrize(
    "spec, q_len, kv_len",
    [
        (am.causal() & am.document(seq_lens=[[10, 30, 24], [40, 10]], length=64), 64, 64),
        (am.sliding_window(9) & am.key_padding(padding_mask([50, 64], 64)), 64, 64),
        (am.causal() & am.key_padding(padding_mask([20, 64], 64, left=True)), 24, 64),
        (am.prefix_lm([20, 5]) | am.chunked(16), 40, 40),
    ],
)
def test_flex_attention_with_the_exported_block_mask_equals_naive_attention(spec, q_len, kv_len):
    torch.manual_seed(0)
    q = torch.randn(2, 2, q_len, 8)
    k, v = torch.randn(2, 2, kv_len, 8), torch.randn(2, 2, kv_len, 8)
    block_mask = spec.block_layout(q_len, kv_len, block_size=16).to_flex()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = flex_attention(q, k, v, block_mask=block_mask)
    want = naive_attention(q, k, v, spec.to_dense(q_len, kv_len)[:, None])
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)


def test_flex_mask_mod_follows_explicit_positions():
    pos = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]])
    layout = am.causal().block_layout(4, 8, block_size=2, q_positions=pos)
    mod = layout.mask_mod()
    got = mod(torch.arange(2).view(-1, 1, 1), torch.tensor(0), torch.arange(4).view(1, -1, 1), torch.arange(8))
    assert torch.equal(got, am.causal().to_dense(4, 8, q_positions=pos))


# ---------------------------------------------------------------------------------------------------------------------
# Varlen arguments


def test_three_documents_give_cu_seqlens_0_2_6_9():
    args = (am.causal() & am.document(seq_lens=[2, 4, 3])).varlen(9)
    assert isinstance(args, VarlenArgs)
    assert args.cu_seqlens_q.tolist() == [0, 2, 6, 9] and args.cu_seqlens_q.dtype == torch.int32
    assert args.cu_seqlens_k.tolist() == [0, 2, 6, 9]
    assert (args.max_seqlen_q, args.max_seqlen_k) == (4, 4)
    assert args.causal and args.window_size == (-1, -1)
    assert args.indices_q.tolist() == args.indices_k.tolist() == list(range(9))
    assert args.seq_lens == [2, 4, 3]


def test_sliding_window_becomes_flash_window_size():
    args = varlen_args(am.sliding_window(4) & am.document(seq_lens=[5, 3]), 8)
    assert args.window_size == (3, 0) and args.causal
    assert args.as_flash_kwargs() == {
        "cu_seqlens_q": args.cu_seqlens_q,
        "cu_seqlens_k": args.cu_seqlens_k,
        "max_seqlen_q": 5,
        "max_seqlen_k": 5,
        "causal": True,
        "window_size": (3, 0),
    }


def test_documents_of_several_rows_are_concatenated_row_major_without_padding():
    spec = am.full() & am.document(seq_lens=[[2, 3], [4]], length=6) & am.key_padding(padding_mask([5, 4], 6))
    args = spec.varlen(6)
    assert args.cu_seqlens_q.tolist() == [0, 2, 5, 9]
    assert not args.causal
    assert args.indices_k.tolist() == [0, 1, 2, 3, 4, 6, 7, 8, 9]
    assert not args.padding_queries_attend


def test_empty_documents_take_no_entry():
    assert varlen_args(am.causal() & am.document(seq_lens=[3, 0, 2]), 5).cu_seqlens_q.tolist() == [0, 3, 5]


def test_padded_batch_gives_one_sequence_per_row():
    m = padding_mask([3, 5, 0], 5)
    args = (am.causal() & am.key_padding(m)).varlen(5)
    assert args.cu_seqlens_q.tolist() == [0, 3, 8]
    assert args.indices_k.tolist() == [0, 1, 2, 5, 6, 7, 8, 9]
    assert args.padding_queries_attend  # right-padding queries see the real keys under the spec


def test_left_padded_causal_batch_has_no_attending_padding_queries():
    args = (am.causal() & am.key_padding(padding_mask([3, 5], 5, left=True))).varlen(5)
    assert args.cu_seqlens_q.tolist() == [0, 3, 8]
    assert args.indices_k.tolist() == [2, 3, 4, 5, 6, 7, 8, 9]
    assert not args.padding_queries_attend


def test_decoding_queries_are_the_last_tokens_of_the_last_documents():
    spec = am.causal() & am.document(seq_lens=[3, 4])
    args = spec.varlen(2, 7)
    assert args.cu_seqlens_q.tolist() == [0, 2] and args.cu_seqlens_k.tolist() == [0, 4]
    assert args.indices_q.tolist() == [0, 1] and args.indices_k.tolist() == [3, 4, 5, 6]
    args = spec.varlen(5, 7)
    assert args.cu_seqlens_q.tolist() == [0, 1, 5] and args.cu_seqlens_k.tolist() == [0, 3, 7]


def test_more_queries_than_keys_is_an_error():
    with pytest.raises(am.SpecError, match="q_len"):
        am.causal().varlen(5, 3)


def fit(lens: list[int], total: int) -> list[int]:
    """The longest prefix of ``lens`` that fits in ``total`` tokens."""
    out = []
    for n in lens:
        if sum(out) + n > total:
            break
        out.append(n)
    return out


def varlen_reference(q, k, v, args):
    """Attention sequence by sequence from varlen arguments, by the textbook formula (bottom-right in each sequence);
    rows of no sequence are 0. q: (B, H, Q, D), k, v: (B, H, K, D) -> (B, H, Q, D) float64."""
    B, H, Q, D = q.shape
    K = k.shape[2]
    q_flat = q.permute(0, 2, 1, 3).reshape(B * Q, H, D)[args.indices_q]
    k_flat = k.permute(0, 2, 1, 3).reshape(B * K, H, D)[args.indices_k]
    v_flat = v.permute(0, 2, 1, 3).reshape(B * K, H, D)[args.indices_k]
    out = torch.zeros(B * Q, H, D, dtype=torch.float64)
    cq, ck = args.cu_seqlens_q.tolist(), args.cu_seqlens_k.tolist()
    left = args.window_size[0]
    for i in range(args.num_sequences):
        qs = q_flat[cq[i] : cq[i + 1]].transpose(0, 1)[None]
        ks, vs = k_flat[ck[i] : ck[i + 1]].transpose(0, 1)[None], v_flat[ck[i] : ck[i + 1]].transpose(0, 1)[None]
        n_q, n_k = qs.shape[2], ks.shape[2]
        pos = torch.arange(n_q)[:, None] + (n_k - n_q)
        key = torch.arange(n_k)[None, :]
        allowed = torch.ones(n_q, n_k, dtype=torch.bool)
        if args.causal:
            allowed &= key <= pos
        if left >= 0:
            allowed &= pos - key <= left
        out[args.indices_q[cq[i] : cq[i + 1]]] = naive_attention(qs, ks, vs, allowed)[0].transpose(0, 1)
    return out.view(B, Q, H, D).permute(0, 2, 1, 3)


@given(st.data())
def test_attention_from_varlen_arguments_equals_attention_under_the_spec(data):
    batch = data.draw(st.integers(1, 2))
    kv_len = data.draw(st.integers(1, 12))
    q_len = data.draw(st.integers(1, kv_len))
    rows = [fit(data.draw(st.lists(st.integers(1, 5), max_size=4)), kv_len) for _ in range(batch)]
    spec = _with_rule(data, am.document(seq_lens=rows, length=kv_len))
    _assert_varlen_equals_the_spec(spec, batch, q_len, kv_len)


def _with_rule(data, spec):
    """``spec`` alone (full), with ``causal()`` or with a drawn ``sliding_window``."""
    base = data.draw(st.sampled_from(["causal", "full", "window"]))
    if base == "causal":
        return am.causal() & spec
    if base == "window":
        return am.sliding_window(data.draw(st.integers(1, 4))) & spec
    return spec


def _assert_varlen_equals_the_spec(spec, batch: int, q_len: int, kv_len: int) -> None:
    torch.manual_seed(0)
    q = torch.randn(batch, 2, q_len, 4, dtype=torch.float64)
    k, v = torch.randn(batch, 2, kv_len, 4, dtype=torch.float64), torch.randn(batch, 2, kv_len, 4, dtype=torch.float64)
    want = naive_attention(q, k, v, spec.to_dense(q_len, kv_len)[:, None])
    got = varlen_reference(q, k, v, spec.varlen(q_len, kv_len))
    torch.testing.assert_close(got, want)


@given(st.data())
def test_chunks_lower_to_one_sequence_per_chunk_and_document(data):
    batch = data.draw(st.integers(1, 2))
    kv_len = data.draw(st.integers(1, 12))
    q_len = data.draw(st.integers(1, kv_len))
    offsets = data.draw(st.none() | st.lists(st.integers(0, 6), min_size=batch, max_size=batch))
    spec = am.chunked(data.draw(st.integers(1, 6)), offsets)
    if data.draw(st.booleans()):
        rows = [fit(data.draw(st.lists(st.integers(1, 5), max_size=4)), kv_len) for _ in range(batch)]
        spec = spec & am.document(seq_lens=rows, length=kv_len)
    spec = _with_rule(data, spec)
    assert varlen_form(spec).chunked is not None
    # a spec without per-row data lowers to one row (the backends repeat it)
    _assert_varlen_equals_the_spec(spec, spec.batch_size or 1, q_len, kv_len)


@pytest.mark.parametrize("left", [False, True])
@pytest.mark.parametrize("base", ["causal", "window"])
def test_padded_batch_varlen_matches_the_spec_on_real_queries(left, base):
    lengths, total = [5, 2, 7], 7
    m = padding_mask(lengths, total, left=left)
    spec = (am.causal() if base == "causal" else am.sliding_window(3)) & am.key_padding(m)
    torch.manual_seed(1)
    q, k, v = (torch.randn(3, 2, total, 4, dtype=torch.float64) for _ in range(3))
    want = naive_attention(q, k, v, spec.to_dense(total)[:, None])
    args = spec.varlen(total)
    got = varlen_reference(q, k, v, args)
    real = m.bool()[:, None, :, None].expand_as(got)
    torch.testing.assert_close(got[real], want[real])
    if not args.padding_queries_attend:
        torch.testing.assert_close(got, want)


def test_varlen_form_takes_the_spec_apart():
    doc = am.document(seq_lens=[2, 3])
    form = varlen_form(am.sliding_window(8) & doc & am.causal() & am.sliding_window(4))
    assert (form.causal, form.window, form.document, form.key_padding) == (True, 4, doc, ())
    assert not varlen_form(am.full()).causal


def test_plain_causal_rows_are_one_sequence_each():
    args = am.causal().varlen(7)
    assert args.cu_seqlens_q.tolist() == [0, 7] and args.max_seqlen_q == 7


@pytest.mark.parametrize(
    "make, words",
    [
        (lambda: (am.causal() | am.document(seq_lens=[2, 2])).varlen(4), ["spec", "causal() | document"]),
        (
            lambda: (am.causal() & am.chunked(2) & am.key_padding(torch.tensor([[1, 1, 1, 0]]))).varlen(4),
            ["spec", "with a document", "no document"],
        ),
        (lambda: (am.chunked(2) & am.chunked(3)).varlen(4), ["spec", "at most one chunked"]),
        (lambda: (am.causal() & am.custom(lambda b, h, q, k: q >= k)).varlen(4), ["spec", "custom"]),
        (
            lambda: (am.document(seq_lens=[2, 2]) & am.key_padding(torch.tensor([[1, 0, 1, 1]]))).varlen(4),
            ["key_padding", "outside documents", "1 padding positions inside"],
        ),
        (lambda: am.key_padding(torch.tensor([[1, 0, 1, 1]])).varlen(4), ["key_padding", "contiguous", "1 rows"]),
        (lambda: am.document(doc_ids=torch.tensor([0, 1, 0])).varlen(3), ["document", "contiguous run"]),
        (
            lambda: (am.document(seq_lens=[2, 2]) & am.document(seq_lens=[1, 3])).varlen(4),
            ["spec", "at most one document"],
        ),
    ],
)
def test_specs_outside_the_varlen_form_raise_backend_error(make, words):
    with pytest.raises(am.BackendError) as info:
        make()
    for word in words:
        assert word in str(info.value)
