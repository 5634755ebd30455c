"""Pictures of masks, packing plans and length histograms: plain text for the terminal, PNG via matplotlib.

Text pictures are deterministic (tests compare them with pictures written out literally). A mask is drawn with
queries as rows (labelled with their positions on the left) and keys as columns; ``■`` means "may attend", ``·``
means masked (``#`` and ``.`` with ``ascii_only=True``). ``causal()`` over 4 positions::

    >>> print(draw_mask(causal(), 4))
      k 0 1 2 3
    q 0 ■ · · ·
      1 ■ ■ · ·
      2 ■ ■ ■ ·
      3 ■ ■ ■ ■

Larger masks are drawn in tiles of ``block`` positions (or shrunk to at most ``max_cells`` tiles per side): a tile is
``■`` when every pair in it may attend, ``▒`` (``+``) when some may, ``·`` when none may.

PNG output imports matplotlib lazily with the Agg backend; the image is exactly ``width x height`` pixels as asked.

The only drawing module: every picture and table of attnmask is drawn here or by ``attnmask._draw``, the leaf module
holding the few primitives that layers below this one print through (``BlockLayout.__str__`` in ``lowering``,
``PackPlan.__str__`` in ``pack``: tile lines, plan bars, the character set). Imports point down: ``viz`` -> ``_draw``
<- ``lowering``, ``pack``. One character set: ``UNICODE`` (``■ ▒ ·``) in the terminal, ``ASCII`` (``# + .``) with
``ascii_only=True`` and in every ``__str__``; documents of a packed row are letters ``A``, ``B``, ... The command line's
reports print through ``draw_table`` and ``FillReport``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from attnmask._checks import dense_data, short_repr
from attnmask._draw import ASCII, UNICODE, group_tiles, marks, plan_bar, tile_symbols
from attnmask.errors import InputError, ShapeError, SpecError, bad
from attnmask.masks import MaskSpec

__all__ = [
    "draw_mask",
    "draw_plan",
    "draw_tiles",
    "group_tiles",
    "draw_histogram",
    "draw_table",
    "FillReport",
    "ASCII",
    "UNICODE",
    "mask_tiles",
    "save_mask_png",
    "save_tiles_png",
    "save_histogram_png",
]

# Denser masks are refused: drawing is for looking, not for 100K-token rows (that is what block layouts are for).
MAX_DRAW_ELEMENTS = 1 << 26


# ----------------------------------------------------------------------------------------------------------------------
# Masks


def dense_row(
    mask: MaskSpec | torch.Tensor, q_len: int | None, kv_len: int | None = None, row: int = 0
) -> torch.Tensor:
    """The ``(Q, K)`` bool mask of one batch row, from a spec or a bool tensor ``(Q, K)`` / ``(B, Q, K)`` /
    ``(B, 1, Q, K)``. A spec with per-row data is lowered for all its ``B`` rows, so memory is O(B·Q·K); ``Q·K``
    above ``MAX_DRAW_ELEMENTS`` is refused. A sparse tensor is read as its dense values, a nested one refused."""
    if isinstance(mask, MaskSpec):
        if q_len is None:
            raise bad(SpecError, "q_len", "an int when drawing a spec", None)
        kv = q_len if kv_len is None else kv_len
        if q_len * kv > MAX_DRAW_ELEMENTS:
            raise bad(SpecError, "q_len x kv_len", f"at most {MAX_DRAW_ELEMENTS} pairs to draw", f"{q_len} x {kv}")
        rows = mask.batch_size or 1
        if not 0 <= row < rows:
            raise bad(SpecError, "row", f"a row in [0, {rows})", row)
        if mask.heads is not None:  # one picture per head: the caller picks the head
            hint = "draw one head h as spec.to_dense(Q, K, per_head=True)[:, h]"
            raise bad(SpecError, "mask", f"a spec that is one mask for every head ({hint})", repr(mask))
        return mask.to_dense(q_len, kv_len)[row].cpu()
    if not isinstance(mask, torch.Tensor):
        raise bad(SpecError, "mask", "a MaskSpec or a bool tensor", type(mask).__name__)
    mask = dense_data("mask", mask, SpecError)
    if mask.dtype != torch.bool:
        raise bad(SpecError, "mask", "a bool tensor (True = may attend)", f"dtype {mask.dtype}")
    if mask.dim() == 4 and mask.shape[1] == 1:
        mask = mask[:, 0]
    if mask.dim() == 3:
        if not 0 <= row < mask.shape[0]:
            raise bad(SpecError, "row", f"a row in [0, {mask.shape[0]})", row)
        mask = mask[row]
    if mask.dim() != 2:
        raise bad(ShapeError, "mask", "shape (Q, K), (B, Q, K) or (B, 1, Q, K)", tuple(mask.shape))
    return mask.cpu()


def mask_tiles(dense: torch.Tensor, block_q: int, block_k: int | None = None) -> torch.Tensor:
    """Tile states of a ``(Q, K)`` bool mask: int8 ``(ceil(Q/bq), ceil(K/bk))`` with 2 = every pair allowed,
    1 = some, 0 = none. Edge tiles hold only the positions that exist.

    Example: causal over 4 positions, tiles of 2: ``[[1, 0], [2, 1]]``. A sparse ``dense`` is read as its values.
    """
    dense = dense_data("dense", dense)
    block_k = block_q if block_k is None else block_k
    q_len, kv_len = dense.shape
    nq, nk = math.ceil(q_len / block_q), math.ceil(kv_len / block_k)
    padded = torch.zeros(nq * block_q, nk * block_k, dtype=torch.int32)
    valid = torch.zeros_like(padded)
    padded[:q_len, :kv_len] = dense.to(torch.int32)
    valid[:q_len, :kv_len] = 1
    allowed = padded.view(nq, block_q, nk, block_k).sum(dim=(1, 3))
    present = valid.view(nq, block_q, nk, block_k).sum(dim=(1, 3))
    tiles = torch.where(allowed == 0, 0, torch.where(allowed == present, 2, 1))
    return tiles.to(torch.int8)


def draw_mask(
    mask: MaskSpec | torch.Tensor,
    q_len: int | None = None,
    kv_len: int | None = None,
    *,
    row: int = 0,
    block: int | None = None,
    max_cells: int = 48,
    ascii_only: bool = False,
) -> str:
    """Draw one row of a mask as text: queries down, keys across, labels on the left and top.

    ``mask``: a spec (give ``q_len`` and optionally ``kv_len``; with ``Q < K`` queries are the last Q positions and
    are labelled so) or a bool tensor ``(Q, K)`` / ``(B, Q, K)`` / ``(B, 1, Q, K)``. ``block``: draw tiles of that
    many positions; without it, masks wider or taller than ``max_cells`` are shrunk into tiles automatically.
    Memory O(Q·K).
    """
    dense = dense_row(mask, q_len, kv_len, row)
    q_n, k_n = dense.shape
    if block is None and max(q_n, k_n) > max_cells:
        block = math.ceil(max(q_n, k_n) / max_cells)
    if block is not None and (isinstance(block, bool) or not isinstance(block, int) or block < 1):
        raise bad(SpecError, "block", "an int >= 1", block)
    step = block or 1
    tiles = mask_tiles(dense, step) if step > 1 else dense.to(torch.int8) * 2
    offset = k_n - q_n if isinstance(mask, MaskSpec) else 0  # bottom-right alignment of queries
    return draw_tiles(tiles, step, q_n, k_n, q_offset=offset, ascii_only=ascii_only)


def draw_tiles(
    tiles: torch.Tensor,
    block: int,
    q_len: int,
    kv_len: int,
    *,
    q_offset: int = 0,
    ascii_only: bool = False,
) -> str:
    """Draw tile classes ``(nQ, nK)`` (2 = every pair allowed, 1 = some, 0 = none; as ``mask_tiles`` or a
    ``BlockLayout``'s ``classes[b]``) of a ``(q_len, kv_len)`` mask cut in tiles of ``block``. Query labels start
    at ``q_offset``. With ``block=1`` the tiles are the elements and the picture is the mask itself. Sparse ``tiles``
    are read as their dense values."""
    tiles = dense_data("tiles", tiles)
    m = marks(ascii_only)
    q_labels = [str(q_offset + i * block) for i in range(tiles.shape[0])]
    k_labels = [i * block for i in range(tiles.shape[1])]
    width = max(len(q_labels[-1]) if q_labels else 1, 1)
    symbol = tile_symbols(ascii_only)
    lines = []
    if block > 1:
        lines.append(
            f"{q_len} x {kv_len}, tiles of {block}: {m['full']} all, {m['partial']} some, {m['none']} none may attend"
        )
    for digit in range(len(str(max(k_labels, default=0))) - 1, 0, -1):
        lines.append(f"  {' ' * width} " + " ".join(_header_digit(k, block, digit) for k in k_labels))
    lines.append(f"  {'k'.rjust(width)} " + " ".join(str(k % 10) for k in k_labels))
    for i, label in enumerate(q_labels):
        prefix = "q" if i == 0 else " "
        cells = " ".join(symbol[int(v)] for v in tiles[i].tolist())
        lines.append(f"{prefix} {label.rjust(width)} {cells}")
    return "\n".join(line.rstrip() for line in lines)


def _header_digit(k: int, step: int, digit: int) -> str:
    """Digit ``digit`` (1 = tens, 2 = hundreds, ...) of column label ``k``, shown only where it changes."""
    unit = 10**digit
    if k < unit or (k > 0 and k // unit == (k - step) // unit):
        return " "
    return str(k // unit % 10)


# ----------------------------------------------------------------------------------------------------------------------
# Packing plans


def _row_lengths(row: Any) -> list[int]:
    """Segment lengths of one plan row: ``(index, start, stop)`` triples or plain lengths."""
    out = []
    for seg in row:
        if isinstance(seg, int) and not isinstance(seg, bool):
            n = seg
        elif isinstance(seg, (tuple, list)) and len(seg) == 3:
            n = int(seg[2]) - int(seg[1])
        elif hasattr(seg, "start") and hasattr(seg, "stop"):
            n = int(seg.stop) - int(seg.start)
        else:
            raise bad(InputError, "plan row", "segments (index, start, stop) or lengths", repr(seg))
        if n < 0:
            raise bad(InputError, "plan row", "segments of non-negative length", repr(seg))
        out.append(n)
    return out


def draw_plan(
    plan: Any, max_length: int | None = None, *, width: int = 64, max_rows: int = 16, ascii_only: bool = False
) -> str:
    """Draw a packing plan: one bar per row, each document a run of one letter, padding as ``·``.

    ``plan``: a ``PackPlan`` (its ``bins`` and ``max_length`` are used), or a list of rows, each a list of segments
    ``(index, start, stop)`` or of lengths. Bars are ``width`` cells; a cell covers ``ceil(max_length / width)``
    tokens and shows the document at its first token. Example, ``[[3, 2], [4]]`` with ``max_length=5``::

        row 0 |AAABB| 5/5 100%
        row 1 |AAAA·| 4/5  80%
    """
    rows = getattr(plan, "bins", plan)
    max_length = getattr(plan, "max_length", None) if max_length is None else max_length
    lens = [_row_lengths(r) for r in rows]
    if max_length is None:
        max_length = max((sum(r) for r in lens), default=1)
    if max_length < 1:
        raise bad(InputError, "max_length", "an int >= 1", max_length)
    scale = max(1, math.ceil(max_length / width))
    digits = len(str(max(len(lens) - 1, 0)))
    lines = []
    if scale > 1:
        lines.append(f"one cell = {scale} tokens")
    for i, r in enumerate(lens[:max_rows]):
        bar = plan_bar(r, max_length, width, marks(ascii_only)["none"])
        used = sum(r)
        lines.append(f"row {str(i).rjust(digits)} |{bar}| {used}/{max_length} {100 * used / max_length:3.0f}%")
    if len(lens) > max_rows:
        lines.append(f"... {len(lens) - max_rows} more rows")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------------
# Tables (the command line's reports)


def draw_table(rows: list[tuple[str, str]]) -> str:
    """Two aligned columns, indented by two spaces: ``[("rows", "3"), ("tokens", "4,743")]`` ->
    ``"  rows    3\n  tokens  4,743"``."""
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k.ljust(width)}  {v}" for k, v in rows)


def pct(x: float) -> str:
    """A share as a percentage with one decimal: ``0.5`` -> ``"50.0%"``."""
    return f"{100 * x:.1f}%"


@dataclass(frozen=True)
class FillReport:
    """Padding vs packing for a set of lengths: padding every sequence to ``longest`` (one row each, or
    ``pad_rows`` when long sequences take several), or packing into rows of ``max_length`` (``rows`` of the plan).
    ``lines()`` are the rows of a ``draw_table``."""

    sequences: int
    tokens: int
    longest: int
    max_length: int
    rows: int
    pad_rows: int | None = None

    @property
    def padded_rows(self) -> int:
        return self.sequences if self.pad_rows is None else self.pad_rows

    @property
    def pad_fill(self) -> float:
        return self.tokens / (self.padded_rows * self.longest) if self.padded_rows else 0.0

    @property
    def pack_fill(self) -> float:
        return self.tokens / (self.rows * self.max_length) if self.rows else 0.0

    @property
    def lower_bound(self) -> int:
        return math.ceil(self.tokens / self.max_length)

    def lines(self) -> list[tuple[str, str]]:
        slots_pad = self.padded_rows * self.longest
        return [
            ("sequences", f"{self.sequences:,}"),
            ("tokens", f"{self.tokens:,}"),
            (
                "padding",
                f"{self.padded_rows:,} rows x {self.longest} = {slots_pad:,} slots, fill {pct(self.pad_fill)}, "
                f"waste {pct(1 - self.pad_fill)} ({slots_pad - self.tokens:,} pad tokens)",
            ),
            (
                "packing",
                f"{self.rows:,} rows x {self.max_length} = {self.rows * self.max_length:,} slots, fill "
                f"{pct(self.pack_fill)} (lower bound {self.lower_bound:,} rows)",
            ),
        ]


# ----------------------------------------------------------------------------------------------------------------------
# Length histograms


def _length_values(lengths: Any) -> list[int]:
    """``lengths`` (a list, an array or a tensor; a sparse one as its values) as Python ints, else `InputError`."""
    lengths = dense_data("lengths", lengths)
    try:
        return [int(n) for n in lengths]
    except (TypeError, ValueError, RuntimeError):  # not iterable, or an item that is no single number (a 2D row)
        shown = f"shape {tuple(lengths.shape)}" if hasattr(lengths, "shape") else short_repr(lengths)
        raise bad(InputError, "lengths", "a flat sequence of integer lengths", shown) from None


def histogram(lengths: Sequence[int], bins: int = 10) -> list[tuple[int, int, int]]:
    """Equal-width integer bins over ``[min, max]``: a list of ``(low, high, count)`` with ``low <= n < high``."""
    values = _length_values(lengths)
    if not values:
        return []
    lo, hi = min(values), max(values) + 1
    step = max(1, math.ceil((hi - lo) / bins))
    n_bins = math.ceil((hi - lo) / step)
    counts = [0] * n_bins
    for n in values:
        counts[(n - lo) // step] += 1
    return [(lo + i * step, lo + (i + 1) * step, c) for i, c in enumerate(counts)]


def draw_histogram(lengths: Sequence[int], *, bins: int = 10, width: int = 40, ascii_only: bool = False) -> str:
    """Text histogram of sequence lengths, one line per bin ``[low, high)`` with a bar scaled to ``width``.

    Example, lengths ``[1, 2, 2, 3]`` with 3 bins::

        [1, 2) 1 ####################
        [2, 3) 2 ########################################
        [3, 4) 1 ####################
    """
    table = histogram(lengths, bins)
    if not table:
        return "(no lengths)"
    mark = "#" if ascii_only else "█"
    top = max(c for _, _, c in table)
    left = max(len(f"[{lo}, {hi})") for lo, hi, _ in table)
    cw = len(str(top))
    lines = []
    for lo, hi, c in table:
        bar = mark * (round(width * c / top) if top else 0)
        lines.append(f"{f'[{lo}, {hi})'.ljust(left)} {str(c).rjust(cw)} {bar}".rstrip())
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------------
# PNG output (matplotlib, imported lazily)


def _pyplot():
    try:
        import matplotlib
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise InputError("PNG output needs matplotlib: pip install 'attnmask[viz]'") from e
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def save_mask_png(
    mask: MaskSpec | torch.Tensor,
    path: str | Path,
    q_len: int | None = None,
    kv_len: int | None = None,
    *,
    row: int = 0,
    title: str | None = None,
    size: tuple[int, int] = (480, 480),
    dpi: int = 96,
) -> Path:
    """Write one row of a mask as a PNG of exactly ``size = (width, height)`` pixels; dark = may attend.

    Axes are labelled with positions (queries bottom-right aligned for a spec with ``Q < K``). Memory O(Q·K): for
    long rows draw the block layout with ``save_tiles_png``."""
    dense = dense_row(mask, q_len, kv_len, row)
    q_n, k_n = dense.shape
    offset = k_n - q_n if isinstance(mask, MaskSpec) else 0
    extent = (-0.5, k_n - 0.5, offset + q_n - 0.5, offset - 0.5)
    default = "True = may attend (dark)"
    return _image_png(dense.float().numpy(), path, extent, title or default, size, dpi)


def save_tiles_png(
    tiles: torch.Tensor,
    block: int,
    q_len: int,
    kv_len: int,
    path: str | Path,
    *,
    q_offset: int = 0,
    title: str | None = None,
    size: tuple[int, int] = (480, 480),
    dpi: int = 96,
) -> Path:
    """Write tile classes ``(nQ, nK)`` (2 all, 1 some, 0 none may attend; e.g. a ``BlockLayout``'s ``classes[b]``)
    as a PNG of exactly ``size`` pixels: black = FULL, grey = PARTIAL, white = NONE. Memory O(nQ·nK)."""
    tiles = dense_data("tiles", tiles)
    n_q, n_k = tiles.shape
    extent = (0, min(n_k * block, kv_len), q_offset + min(n_q * block, q_len), q_offset)
    default = f"tiles of {block}: black all, grey some, white none may attend"
    return _image_png(tiles.float().cpu().numpy() / 2, path, extent, title or default, size, dpi)


def _image_png(values, path, extent, title: str, size: tuple[int, int], dpi: int) -> Path:
    """A grey image of ``values`` in [0, 1] (1 = black) with position axes, exactly ``size`` pixels."""
    with _figure(path, size, dpi) as ax:
        ax.imshow(values, cmap="Greys", vmin=0, vmax=1, interpolation="nearest", aspect="auto", extent=extent)
        ax.set_xlabel("key position")
        ax.set_ylabel("query position")
        ax.set_title(title, fontsize=9)
    return Path(path)


def save_histogram_png(
    lengths: Sequence[int],
    path: str | Path,
    *,
    bins: int = 20,
    title: str = "sequence lengths",
    size: tuple[int, int] = (640, 400),
    dpi: int = 96,
) -> Path:
    """Write a histogram of sequence lengths as a PNG of exactly ``size = (width, height)`` pixels."""
    values = _length_values(lengths)
    with _figure(path, size, dpi) as ax:
        ax.hist(values, bins=bins, color="#4c72b0", edgecolor="white")
        ax.yaxis.get_major_locator().set_params(integer=True)
        ax.set_xlabel("tokens")
        ax.set_ylabel("sequences")
        ax.set_title(title, fontsize=9)
    return Path(path)


@contextmanager
def _figure(path: str | Path, size: tuple[int, int], dpi: int):
    """One matplotlib axes on a figure of exactly ``size`` pixels, saved as PNG to ``path`` (folders made) when the
    block ends without error; the figure is always closed."""
    plt = _pyplot()
    fig = plt.figure(figsize=(size[0] / dpi, size[1] / dpi), dpi=dpi)
    try:
        yield fig.add_subplot(1, 1, 1)
        fig.tight_layout()
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=dpi, format="png")
    finally:
        plt.close(fig)
