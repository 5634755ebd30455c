"""Tiles: query and key positions cut into ``block_size`` tiles, per-tile bounds and the tile classes.

The interval arithmetic a block layout is built from, below the spec algebra: ``masks`` classifies tiles with it
(each primitive's ``classify_tiles`` / ``key_band``), ``lowering`` builds the grid and collects the classes. Nothing
here knows a spec. Example, ``Q = K = 5``, ``block_size = 2``: query tiles ``[0, 1], [2, 3], [4]``, bounds
``q_min = [0, 2, 4]``, ``q_max = [1, 3, 4]``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["NONE", "PARTIAL", "FULL", "TileGrid", "per_row", "segment_min_max", "tile_classes", "tile_view"]

NONE, PARTIAL, FULL = 0, 1, 2
"""Tile classes (int8): no pair allowed, some allowed, every existing pair allowed. ``&`` is ``min``, ``|`` is ``max``,
``~`` is ``2 - c``."""


@dataclass(frozen=True, eq=False)
class TileGrid:
    """Query and key positions cut into tiles of ``block_size``, with each tile's smallest and largest position.

    - ``q_pos``: ``(Rq, Q)`` int64, ``kv_pos``: ``(Rk, K)`` int64 (``Rq``, ``Rk`` are 1 or ``n_rows``).
    - ``q_min``, ``q_max``: ``(Rq, nQ, 1)``, with ``nQ = ceil(Q / block_size)``.
    - ``tile_k_min``, ``tile_k_max``: ``(Rk, nK)``, the bounds of every key tile.
    - The *key axis* of the grid is either every key tile (``k_index is None``: classes are ``(R, nQ, nK)``) or a
      band of ``W`` key tiles per query tile (``k_index``: ``(Rb, nQ, W)``, the key tile of each band column, tiles
      past the band repeated; classes are ``(R, nQ, W)``). ``k_min``, ``k_max`` are the key bounds on that axis
      (``(Rk, 1, nK)`` or ``(R, nQ, W)``); ``key_axis`` puts any per-key-tile value there.
    - ``need``: optional ``(Rn, nQ, nK)`` bool, the tiles whose class matters (``&`` marks those its structural parts
      did not find NONE); a per-element classification may call the others NONE.
    - The last tile of a side is short when the length is not a multiple of ``block_size``; its bounds cover only the
      positions that exist.

    Example: ``Q = K = 5``, ``block_size = 2``: query tiles ``[0, 1], [2, 3], [4]``, ``q_min = [0, 2, 4]``,
    ``q_max = [1, 3, 4]``. Memory O(Q + K) plus the band.
    """

    q_pos: torch.Tensor
    kv_pos: torch.Tensor
    block_size: int
    n_rows: int
    q_min: torch.Tensor
    q_max: torch.Tensor
    tile_k_min: torch.Tensor
    tile_k_max: torch.Tensor
    k_min: torch.Tensor
    k_max: torch.Tensor
    k_index: torch.Tensor | None = None
    need: torch.Tensor | None = None
    memo: dict = dataclasses.field(default_factory=dict, repr=False)

    @classmethod
    def build(
        cls,
        q_pos: torch.Tensor,
        kv_pos: torch.Tensor,
        block_size: int,
        n_rows: int,
        starts: tuple[int, int] | None = None,
    ) -> TileGrid:
        """Every tile over ``q_pos`` ``(Q,)``/``(Rq, Q)`` and ``kv_pos`` ``(K,)``/``(Rk, K)``; O(Q + K).

        ``starts``: ``(p, r)`` when the caller knows the positions are the runs ``[p, p + Q)`` and ``[r, r + K)``
        (the default positions), which spares the check."""
        q_pos = q_pos.view(1, -1) if q_pos.dim() == 1 else q_pos
        kv_pos = kv_pos.view(1, -1) if kv_pos.dim() == 1 else kv_pos
        memo: dict = {}
        if starts is not None:
            memo["run_start", "q"], memo["run_start", "kv"] = starts
        q_lo, q_hi = _tile_bounds(q_pos, block_size, memo, "q")
        k_lo, k_hi = _tile_bounds(kv_pos, block_size, memo, "kv")
        return cls(
            q_pos,
            kv_pos,
            block_size,
            n_rows,
            q_lo[:, :, None],
            q_hi[:, :, None],
            k_lo,
            k_hi,
            k_lo[:, None],
            k_hi[:, None],
            memo=memo,
        )

    def restrict(self, lo: torch.Tensor, hi: torch.Tensor) -> TileGrid:
        """The band of key tiles ``[lo, hi)`` (``(Rb, nQ)`` each) of every query tile, ``W = max(hi - lo)`` wide."""
        width = int((hi - lo).clamp(min=0).max()) if lo.numel() else 0
        k_index = lo[:, :, None] + torch.arange(width, device=lo.device)
        band = dataclasses.replace(self, k_index=k_index)
        return dataclasses.replace(band, k_min=band.key_axis(self.tile_k_min), k_max=band.key_axis(self.tile_k_max))

    @property
    def n_q_tiles(self) -> int:
        return -(-self.q_pos.shape[-1] // self.block_size)

    @property
    def n_kv_tiles(self) -> int:
        return -(-self.kv_pos.shape[-1] // self.block_size)

    @property
    def kv_sorted(self) -> bool:
        """Whether key positions are non-decreasing along each row (then key tile bounds are sorted)."""
        return self.cached("kv_sorted", lambda: bool((self.kv_pos[:, 1:] >= self.kv_pos[:, :-1]).all()))

    def cached(self, key: Any, compute: Callable[[], Any]) -> Any:
        """``compute()`` once per grid and its bands (per-tile values several specs or passes need)."""
        if key not in self.memo:
            self.memo[key] = compute()
        return self.memo[key]

    def span(self, side: str) -> tuple:
        """A key for per-tile values of one side: ``(start, length)`` of its run of positions, else the side's name
        (so that queries and keys over the same run share them)."""
        pos = self.q_pos if side == "q" else self.kv_pos
        start = self.cached(("run_start", side), lambda: _run_start(pos))
        return (side,) if start is None else (start, pos.shape[-1])

    def read(self, data: torch.Tensor, side: str) -> torch.Tensor:
        """Per-row data ``(Bd, L)`` at the query (``side="q"``) or key positions -> ``(max(Bd, Rp), P)``.

        A slice when the positions are one run ``[p, p + P)`` (the default), a gather otherwise."""
        pos = self.q_pos if side == "q" else self.kv_pos
        start = self.cached(("run_start", side), lambda: _run_start(pos))
        if start is not None:
            return data[:, start : start + pos.shape[-1]]
        return _row_data(data, pos)

    def key_axis(self, per_tile: torch.Tensor) -> torch.Tensor:
        """A per-key-tile value ``(Rx, nK)`` on the grid's key axis: ``(Rx, 1, nK)``, or ``(R, nQ, W)`` on a band."""
        if self.k_index is None:
            return per_tile[:, None, :]
        rows = max(per_tile.shape[0], self.k_index.shape[0])
        n_q, width = self.k_index.shape[1:]
        index = self.k_index.clamp(0, max(per_tile.shape[-1] - 1, 0)).expand(rows, n_q, width)
        return torch.gather(per_tile[:, None, :].expand(rows, n_q, per_tile.shape[-1]), 2, index)

    def needed_key_tiles(self, i: int) -> torch.Tensor | None:
        """Ascending key tiles ``(n,)`` to classify for query tile ``i`` (in the band and needed), ``None`` for all."""
        tiles = None
        if self.k_index is not None:
            tiles = torch.unique(self.k_index[:, i].clamp(0, max(self.n_kv_tiles - 1, 0)))
        if self.need is not None:
            needed = self.need[:, i].any(0)
            tiles = torch.nonzero(needed).view(-1) if tiles is None else tiles[needed[tiles]]
        return tiles

    def to_every_tile(self, flags: torch.Tensor) -> torch.Tensor:
        """Bool flags on the key axis -> ``(R, nQ, nK)`` bool over every tile (False outside a band)."""
        if self.k_index is None:
            return flags.expand(max(flags.shape[0], 1), self.n_q_tiles, self.n_kv_tiles)
        rows = max(flags.shape[0], self.k_index.shape[0])
        index = self.k_index.clamp(0, max(self.n_kv_tiles - 1, 0)).expand(rows, *self.k_index.shape[1:])
        out = torch.zeros((rows, self.n_q_tiles, self.n_kv_tiles), dtype=torch.uint8, device=flags.device)
        out.scatter_reduce_(2, index, flags.to(torch.uint8).expand(rows, *index.shape[1:]), "amax")
        return out.bool()

    def on_key_axis(self, classes: torch.Tensor) -> torch.Tensor:
        """Classes of every tile ``(R, nQ, nK)`` restricted to the grid's key axis."""
        if self.k_index is None:
            return classes
        rows = max(classes.shape[0], self.k_index.shape[0])
        index = self.k_index.clamp(0, max(classes.shape[-1] - 1, 0)).expand(rows, *self.k_index.shape[1:])
        return torch.gather(classes.expand(rows, *classes.shape[1:]), 2, index)

    def first_tile(self, sorted_per_tile: torch.Tensor, value: torch.Tensor, right: bool = False) -> torch.Tensor:
        """Per query tile, the first key tile whose ``sorted_per_tile`` ``(Rk, nK)`` value is ``>= value``
        (``> value`` with ``right``); ``value``: ``(Rv, nQ)`` or ``(Rv, nQ, 1)``. A binary search: O(nQ log nK)."""
        value = value.reshape(value.shape[0], -1)
        rows = max(sorted_per_tile.shape[0], value.shape[0])
        seq = sorted_per_tile.expand(rows, -1).contiguous()
        return torch.searchsorted(seq, value.expand(rows, -1).contiguous(), right=right)


def segment_min_max(values: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per tile of ``block_size`` consecutive entries: the min and max of ``values`` ``(R, L)`` -> two ``(R, n)``.

    The short last tile covers only the entries that exist. Example: ``[[3, 1, 4, 1, 5]]``, ``block_size=2`` gives
    ``[[1, 1, 5]]`` and ``[[3, 4, 5]]``. O(R·L).
    """
    if values.dtype == torch.bool:
        return tile_view(values, block_size, True).all(-1), tile_view(values, block_size, False).any(-1)
    info = torch.iinfo(values.dtype)
    return tile_view(values, block_size, info.max).amin(-1), tile_view(values, block_size, info.min).amax(-1)


def tile_view(values: torch.Tensor, block_size: int, fill: Any) -> torch.Tensor:
    """``values`` ``(R, L)`` -> ``(R, n, block_size)``, the short last tile filled with ``fill``."""
    rows, length = values.shape
    n = -(-length // block_size)
    short = n * block_size - length
    if short:
        pad = torch.full((rows, short), fill, dtype=values.dtype, device=values.device)
        values = torch.cat([values, pad], dim=1)
    return values.reshape(rows, n, block_size)


def tile_classes(all_allowed: torch.Tensor, none_allowed: torch.Tensor) -> torch.Tensor:
    """int8 classes from two broadcastable bool tensors: FULL where ``all_allowed``, NONE where ``none_allowed``."""
    return (all_allowed.to(torch.int8) - none_allowed.to(torch.int8)).add_(PARTIAL)


def _tile_bounds(pos: torch.Tensor, block_size: int, memo: dict, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Smallest and largest position of every tile of ``pos`` ``(R, P)``: closed form for one run, else a scan."""
    if ("run_start", side) not in memo:
        memo["run_start", side] = _run_start(pos)
    start = memo["run_start", side]
    if start is None:
        return segment_min_max(pos, block_size)
    first = torch.arange(0, pos.shape[1], block_size, device=pos.device)
    last = (first + block_size).clamp(max=pos.shape[1]) - 1
    return (first + start)[None], (last + start)[None]


def _run_start(pos: torch.Tensor) -> int | None:
    """``p`` when ``pos`` ``(1, P)`` is ``[p, p + 1, ..., p + P - 1]``, else ``None``."""
    if pos.shape[0] != 1 or pos.shape[1] == 0:
        return None
    start = int(pos[0, 0])
    return start if bool((pos[0] == torch.arange(start, start + pos.shape[1], device=pos.device)).all()) else None


def _row_data(data: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Per-row data ``(Bd, L)`` read at positions ``(Rp, P)`` -> ``(max(Bd, Rp), P)``."""
    if pos.shape[0] == 1:
        return data[:, pos[0]]
    if data.shape[0] == 1:
        return data[0][pos]
    return torch.gather(data, 1, pos)


def per_row(values: torch.Tensor) -> torch.Tensor:
    """Per-row values ``(R,)`` -> ``(R, 1, 1)``, to broadcast against per-tile bounds ``(R, nQ, nK)``."""
    return values.view(-1, 1, 1)
