"""Text pictures of masks, plans and histograms match pictures written out by hand; PNGs have the asked size."""

import pytest
import torch

import attnmask as am
from attnmask.errors import SpecError
from attnmask.viz import (
    draw_histogram,
    draw_mask,
    draw_plan,
    draw_tiles,
    group_tiles,
    histogram,
    mask_tiles,
    save_histogram_png,
    save_mask_png,
    save_tiles_png,
)
from tests.images import png_size
from tests.naive import naive_dense


def test_causal_picture_has_query_labels_and_lower_triangle():
    expected = """\
  k 0 1 2 3
q 0 ■ · · ·
  1 ■ ■ · ·
  2 ■ ■ ■ ·
  3 ■ ■ ■ ■"""
    assert draw_mask(am.causal(), 4) == expected


def test_ascii_picture_of_document_mask():
    expected = """\
  k 0 1 2 3 4
q 0 # # . . .
  1 # # . . .
  2 . . # # #
  3 . . # # #
  4 . . # # #"""
    assert draw_mask(am.document([2, 3]), 5, ascii_only=True) == expected


def test_fewer_queries_than_keys_are_labelled_as_the_last_positions():
    expected = """\
  k 0 1 2 3 4
q 3 ■ ■ ■ ■ ·
  4 ■ ■ ■ ■ ■"""
    assert draw_mask(am.causal(), 2, 5) == expected


def test_picture_of_bool_tensor_equals_picture_of_its_spec():
    spec = am.causal() & am.sliding_window(3) | am.document([4, 4])
    assert draw_mask(spec.to_dense(8), ascii_only=True) == draw_mask(spec, 8, ascii_only=True)


def test_picture_cells_follow_the_naive_mask():
    spec = am.prefix_lm([2, 5]) & ~am.sliding_window(2)
    text = draw_mask(spec, 7, row=1, ascii_only=True)
    cells = [line.split()[-7:] for line in text.splitlines()[1:]]
    drawn = torch.tensor([[c == "#" for c in row] for row in cells])
    assert torch.equal(drawn, naive_dense(spec, 7, 7)[1])


def test_two_digit_positions_get_a_tens_line():
    lines = draw_mask(am.causal(), 12).splitlines()
    assert lines[0].rstrip() == "  " + " " * 3 + " " * 20 + "1"
    assert lines[1] == "   k 0 1 2 3 4 5 6 7 8 9 0 1"
    assert lines[-1].startswith("  11 ")


def test_tiles_mark_full_partial_and_empty():
    tiles = mask_tiles(am.causal().to_dense(5)[0], 2)
    assert tiles.tolist() == [[1, 0, 0], [2, 1, 0], [2, 2, 2]]  # the last tile holds only (4, 4)


def test_block_picture_draws_tiles():
    expected = """\
8 x 8, tiles of 4: # all, + some, . none may attend
  k 0 4
q 0 + .
  4 # +"""
    assert draw_mask(am.causal(), 8, block=4, ascii_only=True) == expected


def test_large_masks_are_shrunk_to_max_cells():
    text = draw_mask(am.causal(), 1000, max_cells=10, ascii_only=True)
    assert text.splitlines()[0].startswith("1000 x 1000, tiles of 100")
    assert len(text.splitlines()) == 1 + 3 + 10  # legend, hundreds/tens/ones header, 10 tile rows


def test_drawing_a_spec_needs_q_len():
    with pytest.raises(SpecError, match="q_len"):
        draw_mask(am.causal())


def test_row_out_of_range_is_an_error():
    with pytest.raises(SpecError, match="row"):
        draw_mask(am.key_padding([[1, 0]]), 2, row=1)


def test_plan_picture_shows_documents_and_padding():
    expected = """\
row 0 |AAABB| 5/5 100%
row 1 |AAAA.| 4/5  80%"""
    assert draw_plan([[(0, 0, 3), (1, 0, 2)], [(2, 0, 4)]], 5, ascii_only=True) == expected


def test_plan_picture_scales_long_rows():
    text = draw_plan([[100, 28], [50]], 128, width=32)
    lines = text.splitlines()
    assert lines[0] == "one cell = 4 tokens"
    assert lines[1] == "row 0 |" + "A" * 25 + "B" * 7 + "| 128/128 100%"
    assert lines[2].startswith("row 1 |" + "A" * 13 + "·" * 19 + "|")


def test_printed_plan_draws_its_rows_as_draw_plan_does():
    plan = am.pack([1200, 600, 43, 900, 2000, 5000], 2048)
    printed = [line.split("|")[1] for line in str(plan).splitlines()[1:]]
    drawn = [line.split("|")[1] for line in draw_plan(plan, ascii_only=True).splitlines()[1:]]  # after "one cell"
    assert printed == drawn and all(len(bar) == 64 for bar in printed)


def test_printed_block_layout_draws_the_tiles_as_draw_tiles_does():
    layout = (am.causal() & am.document([3, 5, 4])).block_layout(12, block_size=2)
    labelled = draw_tiles(layout.classes[0], 2, 12, 12, ascii_only=True).splitlines()[3:]  # after title and labels
    cells = [line[-11:].replace(" ", "") for line in labelled]  # 6 tiles: 11 characters with the spaces
    assert str(layout).splitlines()[1:] == cells and "#" in "".join(cells) and "+" in "".join(cells)


def test_histogram_bins_count_every_length():
    assert histogram([1, 2, 2, 3], bins=3) == [(1, 2, 1), (2, 3, 2), (3, 4, 1)]
    assert sum(c for *_, c in histogram(list(range(1000)), bins=7)) == 1000


def test_histogram_picture():
    expected = """\
[1, 2) 1 ##########
[2, 3) 2 ####################
[3, 4) 1 ##########"""
    assert draw_histogram([1, 2, 2, 3], bins=3, width=20, ascii_only=True) == expected


def test_mask_png_has_the_asked_size(tmp_path):
    path = save_mask_png(am.causal() & am.document([3, 5]), tmp_path / "m.png", 8, size=(300, 200))
    assert png_size(path) == (300, 200)


def test_histogram_png_has_the_asked_size(tmp_path):
    path = save_histogram_png([3, 5, 8, 8, 13], tmp_path / "sub" / "h.png", size=(320, 240))
    assert png_size(path) == (320, 240)


def test_group_tiles_merges_into_all_some_none():
    tiles = torch.tensor([[2, 0, 0], [2, 2, 0], [2, 2, 2]], dtype=torch.int8)
    assert group_tiles(tiles, 2).tolist() == [[1, 0], [2, 2]]


@pytest.mark.parametrize(
    "spec, length, block",
    [
        (am.causal() & am.document([3, 5, 4]), 12, 4),
        (am.causal() & am.sliding_window(5), 23, 4),
        (am.chunked(6) | am.prefix_lm(4), 17, 3),
        (~am.causal() & am.document([[7, 9], [16]]), 16, 5),
    ],
)
def test_block_layout_picture_equals_tiles_of_the_dense_mask(spec, length, block):
    layout = spec.block_layout(length, block_size=block)
    for row in range(spec.batch_size or 1):
        from_layout = draw_tiles(layout.classes[row], block, length, length, ascii_only=True)
        assert from_layout == draw_mask(spec, length, row=row, block=block, ascii_only=True)


def test_tiles_png_has_the_asked_size(tmp_path):
    layout = (am.causal() & am.sliding_window(300)).block_layout(2000, block_size=50)
    path = save_tiles_png(layout.classes[0], 50, 2000, 2000, tmp_path / "t.png", size=(200, 160))
    assert png_size(path) == (200, 160)
