"""The text-drawing primitives of ``attnmask.viz``, in a leaf module so that layers below viz can print through them.

``viz`` (layer 9) is the drawing API; ``BlockLayout.__str__`` (lowering, layer 2) and ``PackPlan.__str__`` (pack,
layer 5) cannot import it without an upward arrow, so the few pieces they draw with live here and ``viz`` builds on
the same ones. One character set: ``UNICODE`` for pictures in the terminal, ``ASCII`` (``ascii_only=True``, and every
``__str__``) with the same meaning. Tile classes: 2 = every pair may attend, 1 = some, 0 = none (the int8 values of
``attnmask.tiles``); documents of a row are letters ``A``, ``B``, ... and free space is the ``none`` mark.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Sequence

import torch

UNICODE = {"full": "■", "partial": "▒", "none": "·"}
ASCII = {"full": "#", "partial": "+", "none": "."}
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def marks(ascii_only: bool) -> dict[str, str]:
    """The character set: ``{"full", "partial", "none"}`` -> mark."""
    return ASCII if ascii_only else UNICODE


def tile_symbols(ascii_only: bool) -> dict[int, str]:
    """Tile class (2, 1, 0) -> its mark."""
    m = marks(ascii_only)
    return {2: m["full"], 1: m["partial"], 0: m["none"]}


def group_tiles(tiles: torch.Tensor, group_q: int, group_k: int | None = None) -> torch.Tensor:
    """Merge ``group_q x group_k`` tiles of classes ``(nQ, nK)`` (2 all, 1 some, 0 none): a group is 2 or 0 when all
    its tiles are, else 1. Edge groups hold only the tiles that exist. Example: ``[[2, 0], [2, 2]]``, 2 -> ``[[1]]``."""
    group_k = group_q if group_k is None else group_k
    n_q, n_k = tiles.shape
    gq, gk = math.ceil(n_q / group_q), math.ceil(n_k / group_k)
    lo = torch.full((gq * group_q, gk * group_k), 2, dtype=torch.int8)
    hi = torch.zeros((gq * group_q, gk * group_k), dtype=torch.int8)
    lo[:n_q, :n_k] = tiles.cpu()
    hi[:n_q, :n_k] = tiles.cpu()
    lo = lo.view(gq, group_q, gk, group_k).amin(dim=(1, 3))
    hi = hi.view(gq, group_q, gk, group_k).amax(dim=(1, 3))
    return torch.where(lo == hi, lo, torch.ones_like(lo))


def tile_lines(tiles: torch.Tensor, max_size: int, ascii_only: bool = True) -> list[str]:
    """Tile classes ``(nQ, nK)`` -> one line of marks per query tile, tiles grouped so no side exceeds ``max_size``.

    Causal over 5 positions in tiles of 2: ``["+..", "#+.", "###"]``."""
    n_q, n_k = tiles.shape
    gq, gk = max(1, -(-n_q // max_size)), max(1, -(-n_k // max_size))
    if gq > 1 or gk > 1:
        tiles = group_tiles(tiles, gq, gk)
    symbol = tile_symbols(ascii_only)
    return ["".join(symbol[int(x)] for x in row) for row in tiles.tolist()]


def plan_bar(lengths: Sequence[int], max_length: int, cells: int, pad_mark: str) -> str:
    """One packed row as ``cells`` characters, each covering ``ceil(max_length / cells)`` tokens and showing the
    document at its first token (``A``, ``B``, ...) or ``pad_mark`` past the row's tokens. ``[3, 2]`` of 5 in 5
    cells: ``AAABB``; ``[4]``: ``AAAA`` and one pad mark."""
    scale = max(1, math.ceil(max_length / cells))
    ends = list(itertools.accumulate(lengths))  # document d holds tokens [ends[d - 1], ends[d])
    total = ends[-1] if ends else 0
    out = []
    for c in range(math.ceil(max_length / scale)):
        token = c * scale
        out.append(LETTERS[bisect.bisect_right(ends, token) % len(LETTERS)] if token < total else pad_mark)
    return "".join(out)
