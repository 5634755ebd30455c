"""Lowering a mask spec to the forms backends consume: block layouts, FlexAttention ``BlockMask``, varlen arguments.

Layer 2 of DESIGN.md: it imports only ``masks``, ``tiles``, ``errors`` and ``_draw`` (to print a layout), and lends
``masks.LOWERINGS`` the ``block_layout`` and ``varlen_args`` that ``MaskSpec.block_layout`` / ``.varlen`` call.

- ``block_layout(spec, Q, K, block_size)`` -> ``BlockLayout``: the class of every ``block_size x block_size`` tile of
  the ``(Q, K)`` mask, per batch row: FULL (every pair allowed: no mask needed), PARTIAL (mask needed) or NONE
  (skipped). Built by interval arithmetic on the spec's structure in O(B·nQ·nK) time and int8 memory, never per
  element (``custom`` predicates excepted, which are evaluated one row of query tiles at a time).
- ``BlockLayout.to_flex()`` -> ``torch.nn.attention.flex_attention.BlockMask``.
- ``varlen_args(spec, L)`` -> ``VarlenArgs``: ``cu_seqlens`` / ``max_seqlen`` / ``window_size`` for flash-attn's varlen
  functions or a per-document loop, in O(B·L).

Worked example, 3 documents of length 2, 4, 3 (offsets ``[0, 2, 6, 9]``), causal, tiles of 3::

    >>> spec = causal() & document(seq_lens=[2, 4, 3])
    >>> print(spec.block_layout(9, block_size=3))
    BlockLayout(B=1, Q=9, K=9, block_size=3: 0 full, 4 partial, 5 none tiles)
    +..
    ++.
    ..+
    >>> varlen_args(spec, 9).cu_seqlens_q.tolist()
    [0, 2, 6, 9]
    >>> varlen_args(spec, 2, 9).cu_seqlens_q.tolist()  # decoding: the last 2 positions query the last document
    [0, 2]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attnmask import masks as M
from attnmask._draw import tile_lines
from attnmask.errors import BackendError, SpecError, bad
from attnmask.tiles import FULL, NONE, PARTIAL, TileGrid

__all__ = [
    "BlockLayout",
    "VarlenArgs",
    "VarlenForm",
    "block_layout",
    "varlen_args",
    "varlen_form",
    "NONE",
    "PARTIAL",
    "FULL",
]


# ----------------------------------------------------------------------------------------------------------------------
# Block layout


@dataclass(frozen=True, eq=False)
class BlockLayout:
    """Which tiles of a ``(Q, K)`` attention are FULL, PARTIAL or NONE, per batch row.

    - ``classes``: ``(B, nQ, nK)`` int8, ``nQ = ceil(Q / block_size)``, ``nK = ceil(K / block_size)``; values
      ``NONE = 0`` (no allowed pair: skip), ``PARTIAL = 1`` (some allowed: apply the mask), ``FULL = 2`` (every pair
      allowed: no mask). Query tile ``i`` holds query rows ``[i*bs, min((i+1)*bs, Q))``; key tile ``j`` likewise. The
      last tile of a side is short when the length is not a multiple of ``block_size``; it is FULL when every pair
      that exists in it is allowed.
    - ``q_positions`` ``(Q,)``/``(B, Q)`` and ``kv_positions`` ``(K,)``/``(B, K)``: the positions the spec was evaluated
      on (bottom-right aligned by default: queries are the last Q of K positions).
    - ``spec``: the spec, kept for the element-wise predicate of PARTIAL tiles.

    Classes are sound for every spec (a NONE tile has no allowed pair, a FULL tile no denied pair) and exact for each
    built-in primitive (see each primitive's ``classify_tiles``) and for ``~`` of one. ``&`` takes the smallest class
    of its parts and ``|`` the largest: exact whenever one part decides each tile, as for causal or a window with
    documents and key padding (``tests/test_lowering.py`` lists the combinations checked against FlexAttention);
    a tile that two PARTIAL parts together cover or empty stays PARTIAL. Memory: ``B·nQ·nK`` bytes.

    A per-head spec (``spec.heads == H``) has one layout for all its heads, the union over heads: a tile is FULL when
    every head allows every pair, NONE when no head allows any, PARTIAL otherwise, so a consumer that visits the
    tiles once for every head stays exact by evaluating ``mask_mod()`` per head inside PARTIAL tiles (FlexAttention
    passes the query head); ``tile_mask``, which has no head, refuses such a spec (``SpecError``).

    Example, ``causal()`` on ``Q = K = 5`` with ``block_size = 2``::

        +..
        #+.
        ##+
    """

    classes: torch.Tensor
    q_len: int
    kv_len: int
    block_size: int
    q_positions: torch.Tensor
    kv_positions: torch.Tensor
    spec: M.MaskSpec

    # -- shape ---------------------------------------------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        return self.classes.shape[0]

    @property
    def n_q_tiles(self) -> int:
        return self.classes.shape[1]

    @property
    def n_kv_tiles(self) -> int:
        return self.classes.shape[2]

    @property
    def nbytes(self) -> int:
        """Bytes held by the layout's tensors (classes and positions)."""
        return sum(t.numel() * t.element_size() for t in (self.classes, self.q_positions, self.kv_positions))

    def q_range(self, i: int) -> tuple[int, int]:
        """Query rows ``[start, stop)`` of query tile ``i``."""
        return i * self.block_size, min((i + 1) * self.block_size, self.q_len)

    def kv_range(self, j: int) -> tuple[int, int]:
        """Key columns ``[start, stop)`` of key tile ``j``."""
        return j * self.block_size, min((j + 1) * self.block_size, self.kv_len)

    # -- counts --------------------------------------------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        """Number of FULL, PARTIAL and NONE tiles over all rows."""
        hist = torch.bincount(self.classes.flatten().long(), minlength=3).tolist()
        return {"full": hist[FULL], "partial": hist[PARTIAL], "none": hist[NONE]}

    def density(self) -> float:
        """Share of tiles that must be computed (FULL or PARTIAL); 0.0 for an empty layout."""
        total = self.classes.numel()
        return float((self.classes != NONE).sum()) / total if total else 0.0

    # -- index lists ---------------------------------------------------------------------------------------------------
    def kv_blocks(self, kind: int) -> tuple[torch.Tensor, torch.Tensor]:
        """FlexAttention's ``(kv_num_blocks, kv_indices)`` for tiles of class ``kind`` (PARTIAL or FULL).

        ``kv_num_blocks``: ``(B, nQ)`` int32, how many key tiles of that class query tile ``i`` has;
        ``kv_indices``: ``(B, nQ, nK)`` int32, those key tiles first, ascending, then the others (ascending). Example,
        causal ``Q = K = 5``, block 2, FULL: ``num = [0, 1, 3]``, ``indices[1] = [0, 1, 2]``. O(B·nQ·nK).
        """
        if kind not in (PARTIAL, FULL):
            raise bad(SpecError, "kind", "PARTIAL (1) or FULL (2)", kind)
        return _ordered(self.classes == kind)

    def tiles(self, kind: int) -> torch.Tensor:
        """The ``(b, i, j)`` index triples of every tile of class ``kind``, ``(n, 3)`` int64, row-major order."""
        return torch.nonzero(self.classes == kind)

    def tile_mask(self, b: int, q0: int, q1: int, k0: int, k1: int) -> torch.Tensor:
        """The element mask ``(q1 - q0, k1 - k0)`` bool (True = may attend) of query rows ``[q0, q1)`` and key columns
        ``[k0, k1)`` of batch row ``b``, evaluated on this layout's positions: what a PARTIAL tile needs. One mask for
        every head: a per-head spec raises a ``SpecError``."""
        q = _row_positions(self.q_positions, b)[q0:q1]
        k = _row_positions(self.kv_positions, b)[k0:k1]
        allowed = self.spec.evaluate(torch.tensor(b, device=q.device), q[:, None], k[None, :])
        return torch.broadcast_to(allowed, (q.shape[0], k.shape[0]))

    # -- exports -------------------------------------------------------------------------------------------------------
    def mask_mod(self):
        """FlexAttention predicate ``(b, h, q_idx, kv_idx) -> bool`` on query/key *indices*, for this layout's
        positions (bottom-right offsets or the explicit positions). A layout of one row serves every batch row
        (FlexAttention broadcasts its ``BlockMask`` and passes each row's ``b``): its predicate reads row 0. The
        query head ``h`` reaches a per-head spec's predicates."""
        mod = self._row_mask_mod()
        if self.batch_size > 1:
            return mod
        return lambda b, h, q_idx, kv_idx: mod(b * 0, h, q_idx, kv_idx)

    def _row_mask_mod(self):
        q_pos, kv_pos = self.q_positions, self.kv_positions
        if _is_range(q_pos) and _is_range(kv_pos):
            q_start = int(q_pos.view(-1)[0]) if self.q_len else 0
            kv_start = int(kv_pos.view(-1)[0]) if self.kv_len else 0
            return self.spec.mask_mod(q_offset=q_start, kv_offset=kv_start)
        spec = self.spec
        q_rows = q_pos.dim() == 2 and q_pos.shape[0] > 1
        kv_rows = kv_pos.dim() == 2 and kv_pos.shape[0] > 1

        def mod(b, h, q_idx, kv_idx):
            q = q_pos[b, q_idx] if q_rows else q_pos.view(-1)[q_idx]
            k = kv_pos[b, kv_idx] if kv_rows else kv_pos.view(-1)[kv_idx]
            return spec.evaluate_heads(b, h, q, k)

        return mod

    def to_flex(self):
        """A FlexAttention ``BlockMask`` (``BlockMask.from_kv_blocks``) with this layout's tiles and ``mask_mod()``.

        ``BLOCK_SIZE = block_size``, ``seq_lengths = (Q, K)``, shape ``(B, 1, nQ, nK)`` (one head, broadcast over
        heads; for a per-head spec the union layout, the predicate deciding per head). FlexAttention pads a short edge
        tile with denied pairs and never treats it as full, so short edge tiles that are FULL here are exported as
        PARTIAL (the predicate then masks nothing): the result equals ``create_block_mask`` on the same predicate.
        O(B·nQ·nK); no per-element work.
        """
        from torch.nn.attention.flex_attention import BlockMask

        classes = self.classes.clone()
        for short, edge in (
            (self.q_len % self.block_size, classes[:, -1:, :]),
            (self.kv_len % self.block_size, classes[..., -1:]),
        ):
            if short:
                edge[edge == FULL] = PARTIAL
        partial_num, partial_idx = _ordered(classes == PARTIAL)
        full_num, full_idx = _ordered(classes == FULL)
        return BlockMask.from_kv_blocks(
            partial_num[:, None],
            partial_idx[:, None],
            full_num[:, None],
            full_idx[:, None],
            BLOCK_SIZE=self.block_size,
            mask_mod=self.mask_mod(),
            seq_lengths=(self.q_len, self.kv_len),
        )

    # -- picture -------------------------------------------------------------------------------------------------------
    def __str__(self) -> str:
        return self.to_string()

    def to_string(self, max_size: int = 64, max_rows: int = 4) -> str:
        """ASCII picture, one line per query tile: ``#`` FULL, ``+`` PARTIAL, ``.`` NONE (``attnmask.viz``'s ASCII set;
        ``viz.draw_tiles(layout.classes[b], ...)`` draws a row with position labels).

        Layouts wider or taller than ``max_size`` tiles are drawn with each character standing for a group of tiles:
        ``#`` / ``.`` when the whole group is FULL / NONE, ``+`` otherwise. At most ``max_rows`` batch rows.
        """
        c = self.counts()
        head = (
            f"BlockLayout(B={self.batch_size}, Q={self.q_len}, K={self.kv_len}, block_size={self.block_size}: "
            f"{c['full']} full, {c['partial']} partial, {c['none']} none tiles)"
        )
        lines = [head]
        for b in range(min(self.batch_size, max_rows)):
            if self.batch_size > 1:
                lines.append(f"row {b}:")
            lines.extend(tile_lines(self.classes[b], max_size))
        if self.batch_size > max_rows:
            lines.append(f"... {self.batch_size - max_rows} more rows")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return self.to_string().splitlines()[0]


def block_layout(
    spec: M.MaskSpec,
    q_len: int,
    kv_len: int | None = None,
    block_size: int = 128,
    *,
    q_positions: torch.Tensor | None = None,
    kv_positions: torch.Tensor | None = None,
    device: torch.device | str | None = None,
    band: bool | None = None,
) -> BlockLayout:
    """Classify every ``block_size`` tile of ``spec`` on a ``(q_len, kv_len)`` attention (see ``BlockLayout``).

    Positions as in ``MaskSpec.to_dense``: bottom-right aligned unless ``q_positions`` / ``kv_positions`` are given.
    Time and memory O(B·(Q + K) + B·nQ·nK) for structural specs (one int8 per tile); a ``custom`` predicate costs
    O(B·Q·K) time and O(B·block_size·K) memory.

    ``band``: when the spec bounds the key tiles each query tile can reach (causal, windows, chunks, sorted documents,
    key padding, and ``&`` of them), only that band of ``W`` key tiles per query tile is classified, O(B·nQ·W), and
    the rest is NONE. ``None`` (default) does so when the band is at most a quarter of the key tiles; ``True`` always
    when a band exists; ``False`` never. The classes are the same either way.
    """
    if not isinstance(spec, M.MaskSpec):
        raise bad(SpecError, "spec", "a MaskSpec", type(spec).__name__)
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise bad(SpecError, "block_size", "an int >= 1", repr(block_size))
    kv_len = q_len if kv_len is None else kv_len
    q_pos, kv_pos, n_rows = spec.resolve(q_len, kv_len, q_positions, kv_positions, device)
    if spec.batch_size == 0:
        raise bad(SpecError, "spec", "per-row data of at least one row to lay out", "0 rows")
    starts = (kv_len - q_len, 0) if q_positions is None and kv_positions is None else None
    grid = TileGrid.build(q_pos, kv_pos, block_size, n_rows, starts)
    classes = _classify(spec, grid, band)
    return BlockLayout(classes, q_len, kv_len, block_size, q_pos, kv_pos, spec)


def _classify(spec: M.MaskSpec, grid: TileGrid, band: bool | None) -> torch.Tensor:
    """Classes ``(B, nQ, nK)`` int8 of every tile: on the band of reachable key tiles when it pays, else all tiles."""
    shape = (grid.n_rows, grid.n_q_tiles, grid.n_kv_tiles)
    bounds = None if band is False else spec.key_band(grid)
    if bounds is not None:
        lo, hi = torch.broadcast_tensors(*bounds)  # (Rb, nQ) each
        width = int((hi - lo).max()) if lo.numel() else 0
        if band or width * _BAND_SHARE <= grid.n_kv_tiles:
            narrow = grid.restrict(lo, hi)
            return _scatter_band(spec.classify_tiles(narrow), narrow.k_index, hi, shape)
    return torch.broadcast_to(spec.classify_tiles(grid), shape).contiguous()


_BAND_SHARE = 4  # classify a band only when it is at most a quarter of the key tiles


def _scatter_band(band: torch.Tensor, k_index: torch.Tensor, hi: torch.Tensor, shape: tuple) -> torch.Tensor:
    """Band classes ``(R', nQ, W)`` at key tiles ``k_index`` ``(Rb, nQ, W)`` -> every tile ``(R, nQ, nK)``, NONE
    outside the band (columns at or past ``hi`` are dropped)."""
    rows = max(band.shape[0], k_index.shape[0])
    band = band.expand(rows, *k_index.shape[1:])
    where = (band != NONE) & (k_index < hi[:, :, None])  # what lands in the layout
    b, i, w = torch.nonzero(where, as_tuple=True)
    out = torch.zeros((rows, *shape[1:]), dtype=torch.int8, device=band.device)
    out[b, i, k_index[b % k_index.shape[0], i, w]] = band[b, i, w]
    return torch.broadcast_to(out, shape).contiguous()


def _ordered(present: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``present`` ``(B, nQ, nK)`` bool -> counts ``(B, nQ)`` int32 and indices ``(B, nQ, nK)`` int32, present first."""
    num = present.sum(-1, dtype=torch.int32)
    before = present.to(torch.int32).cumsum(-1, dtype=torch.int32)  # present tiles up to and including each tile
    column = torch.arange(present.shape[-1], dtype=torch.int32, device=present.device)
    rank = torch.where(present, before - 1, num[..., None] + column - before).long()
    idx = torch.empty(present.shape, dtype=torch.int32, device=present.device)
    return num, idx.scatter_(-1, rank, column.expand(present.shape))


def _row_positions(pos: torch.Tensor, b: int) -> torch.Tensor:
    """The positions ``(P,)`` of batch row ``b`` from ``(P,)``, ``(1, P)`` or ``(B, P)``."""
    return pos[b] if pos.dim() == 2 and pos.shape[0] > 1 else pos.reshape(-1)


def _is_range(pos: torch.Tensor) -> bool:
    """Whether ``pos`` is one row of consecutive positions ``[p, p + 1, ...]``."""
    if pos.dim() == 2 and pos.shape[0] != 1:
        return False
    pos = pos.reshape(-1)
    return pos.numel() == 0 or bool((pos == torch.arange(pos.numel(), device=pos.device) + pos[0]).all())


# ----------------------------------------------------------------------------------------------------------------------
# Varlen arguments


@dataclass(frozen=True, eq=False)
class VarlenArgs:
    """Arguments of flash-attn's ``flash_attn_varlen_func`` (and of a per-sequence attention loop) for a spec.

    The tokens of every sequence (a document, or the real run of a padded row) are concatenated in row-major order:
    ``q_unpadded = q.reshape(B * Q, ...)[indices_q]``, ``k_unpadded = k.reshape(B * K, ...)[indices_k]``. With
    ``Q < K`` the queries are the last ``Q`` positions of each row (bottom-right), so a sequence's queries are its last
    tokens, as flash-attn (>= 2.1) aligns them; sequences with no query are left out.

    - ``cu_seqlens_q``, ``cu_seqlens_k``: ``(N + 1,)`` int32 offsets of the ``N`` sequences in those concatenations.
      Example: 3 documents of length 2, 4, 3 -> ``[0, 2, 6, 9]``.
    - ``max_seqlen_q``, ``max_seqlen_k``: the longest sequence.
    - ``causal``: whether ``k <= q`` applies within a sequence; ``window_size``: flash-attn's ``(left, right)``,
      ``(w - 1, 0)`` for ``sliding_window(w)`` (a query sees ``w`` keys, itself included), ``(-1, -1)`` for none.
    - ``indices_q``: ``(total_q,)`` int64 into the flattened ``(B * Q)`` queries; ``indices_k``: ``(total_k,)`` into
      the flattened ``(B * K)`` keys.
    - ``padding_queries_attend``: False when every query outside all sequences has no allowed key under the spec
      (then zero-filling those rows reproduces the spec exactly). True for padded rows where the spec lets padding
      queries attend (right padding under ``causal() & key_padding(m)``, any padding without ``causal()``): the
      varlen form does not compute those rows, whose outputs are unused by convention.
    """

    cu_seqlens_q: torch.Tensor
    cu_seqlens_k: torch.Tensor
    max_seqlen_q: int
    max_seqlen_k: int
    causal: bool
    window_size: tuple[int, int]
    indices_q: torch.Tensor
    indices_k: torch.Tensor
    padding_queries_attend: bool = False

    @property
    def num_sequences(self) -> int:
        return self.cu_seqlens_q.numel() - 1

    @property
    def seq_lens(self) -> list[int]:
        """Number of keys of every sequence, in order (its length)."""
        return self.cu_seqlens_k.diff().tolist()

    def as_flash_kwargs(self) -> dict:
        """Keyword arguments for ``flash_attn_varlen_func(q, k, v, **kwargs)`` (q, k, v unpadded with the indices)."""
        return {
            "cu_seqlens_q": self.cu_seqlens_q,
            "cu_seqlens_k": self.cu_seqlens_k,
            "max_seqlen_q": self.max_seqlen_q,
            "max_seqlen_k": self.max_seqlen_k,
            "causal": self.causal,
            "window_size": self.window_size,
        }


_VARLEN_FORM = (
    "[causal() or full()] & [sliding_window(w)] & [chunked(c)] & document(...) & [key_padding(m) marking only "
    "positions outside documents], [causal() or full()] & [sliding_window(w)] & key_padding(m) with one run of real "
    "tokens per row, or [causal() or full()] & [sliding_window(w)] & chunked(c)"
)


@dataclass(frozen=True, eq=False)
class VarlenForm:
    """A spec of the varlen form taken apart: ``causal`` (``causal()`` or a window present), the narrowest
    ``window`` (``sliding_window(w)``, else ``None``), the ``document`` part (or ``None``), the ``key_padding``
    parts and the ``chunked`` part (or ``None``: each chunk then runs as a sequence of its own, cut further by the
    documents). Example: ``causal() & document(seq_lens=[2, 3])`` -> ``causal=True, window=None``, one document."""

    causal: bool
    window: int | None
    document: M.Document | None
    key_padding: tuple[M.KeyPadding, ...]
    chunked: M.Chunked | None = None


def varlen_form(spec: M.MaskSpec) -> VarlenForm:
    """Take ``[causal() or full()] & [sliding_window(w)] & [document(...)] & [key_padding(m)]`` apart; any other spec
    raises ``BackendError`` naming the part that does not fit. O(number of parts), once per composed spec object (kept
    with its structural properties, ``masks.memo``: planning one call asks several times; a single part is taken
    apart each time, since its form would hold the spec itself and keep it alive until a garbage collection)."""
    if not isinstance(spec, M.MaskSpec):
        raise bad(SpecError, "spec", "a MaskSpec", type(spec).__name__)
    if isinstance(spec, M.And):
        form = M.memo(spec, "varlen_form", lambda: _form_or_refusal(spec))
    else:
        form = _form_or_refusal(spec)
    if isinstance(form, str):
        raise BackendError(form)  # a fresh error each time: a kept one would keep its traceback's frames alive
    return form


def _form_or_refusal(spec: M.MaskSpec) -> VarlenForm | str:
    """``_take_apart(spec)``, or the message of the ``BackendError`` it raises."""
    try:
        return _take_apart(spec)
    except BackendError as err:
        return str(err)


def _take_apart(spec: M.MaskSpec) -> VarlenForm:
    causal, window, docs, pads, chunks = False, None, [], [], []
    for part in spec.parts if isinstance(spec, M.And) else (spec,):
        if isinstance(part, M.Causal):
            causal = True
        elif isinstance(part, M.SlidingWindow):
            causal, window = True, part.window if window is None else min(window, part.window)
        elif isinstance(part, M.Document):
            docs.append(part)
        elif isinstance(part, M.KeyPadding):
            pads.append(part)
        elif type(part) is M.Chunked:
            chunks.append(part)
        elif not isinstance(part, M.Full):
            raise bad(BackendError, "spec", f"a spec of the form {_VARLEN_FORM}", f"{spec!r} (the part {part!r})")
    if len(docs) > 1:
        raise bad(BackendError, "spec", "at most one document(...)", f"{len(docs)} in {spec!r}")
    if len(chunks) > 1:
        raise bad(BackendError, "spec", "at most one chunked(...)", f"{len(chunks)} in {spec!r}")
    if chunks and pads and not docs:
        raise bad(
            BackendError, "spec", "chunked(c) & key_padding(m) together with a document(...)", f"{spec!r} (no document)"
        )
    return VarlenForm(causal, window, docs[0] if docs else None, tuple(pads), chunks[0] if chunks else None)


def varlen_args(spec: M.MaskSpec, q_len: int, kv_len: int | None = None) -> VarlenArgs:
    """Varlen arguments for ``spec`` on rows of ``kv_len`` keys whose last ``q_len`` positions are the queries.

    Supported forms (any order of the ``&`` parts):

    - ``[causal() or full()] & [sliding_window(w)] & document(...) & [key_padding(m)]``: one sequence per run of
      equal non-negative document ids (each id must form one run per row; empty documents take no entry). A key
      padding mask may only mark positions outside documents (trailing padding of a packed row); marking a token
      inside a document raises.
    - ``[causal() or full()] & [sliding_window(w)] & key_padding(m)``: a padded batch, each row's real tokens one
      contiguous run (right or left padding).
    - ``causal()``, ``full()`` or ``sliding_window(w)`` alone: one row, one sequence of ``kv_len`` tokens.

    - ``[causal() or full()] & [sliding_window(w)] & chunked(c)``, and ``chunked(c)`` with a ``document(...)`` in the
      first form: one sequence per chunk (per document and chunk).

    Anything else (``|``, ``~``, ``prefix_lm``, ``custom``, several ``document``, ``chunked`` with ``key_padding``
    but no ``document``) raises
    ``BackendError`` naming the part. Explicit positions are not supported (use a block layout). O(B·K) time and
    memory.
    """
    kv_len = q_len if kv_len is None else kv_len
    form = varlen_form(spec)
    spec.resolve(q_len, kv_len)  # checks the lengths and that the spec's data covers them
    causal, window = form.causal, form.window
    n_rows = spec.batch_size or 1
    real = torch.ones((n_rows, kv_len), dtype=torch.bool, device=spec.device)
    for pad in form.key_padding:
        real = real & pad.attention_mask[:, :kv_len]
    first_query = kv_len - q_len
    if form.document is not None:
        ids = torch.broadcast_to(form.document.doc_ids[:, :kv_len], (n_rows, kv_len))
        if form.chunked is not None:
            ids = _within_chunks(ids, form.chunked, kv_len)
        inside_padded = int(((ids >= 0) & ~real).sum())
        if inside_padded:
            raise bad(
                BackendError,
                "key_padding",
                "padding only at positions outside documents for varlen arguments",
                f"{inside_padded} padding positions inside documents",
            )
        attend = False
    elif form.chunked is not None:  # no key padding (varlen_form): every position real, one sequence per chunk
        ids = _within_chunks(torch.zeros((n_rows, kv_len), dtype=torch.long, device=real.device), form.chunked, kv_len)
        attend = False
    else:
        ids = torch.where(real, 0, -1)
        attend = _padding_queries_attend(real, causal, window, first_query)
    starts, lengths = _runs(ids)
    ends = starts + lengths
    column = starts % max(kv_len, 1)
    n_queries = (ends - (starts - column + torch.clamp(column, min=first_query))).clamp(min=0)
    keep = n_queries > 0
    starts, ends, lengths, n_queries = starts[keep], ends[keep], lengths[keep], n_queries[keep]
    in_sequence = _inside_runs(starts, ends, ids.numel()).view(n_rows, kv_len)
    window_size = (-1, -1) if window is None else (window - 1, 0)
    return VarlenArgs(
        cu_seqlens_q=_offsets(n_queries),
        cu_seqlens_k=_offsets(lengths),
        max_seqlen_q=int(n_queries.max()) if n_queries.numel() else 0,
        max_seqlen_k=int(lengths.max()) if lengths.numel() else 0,
        causal=causal,
        window_size=window_size,
        indices_q=torch.nonzero(in_sequence[:, first_query:].reshape(-1)).view(-1),
        indices_k=torch.nonzero(in_sequence.reshape(-1)).view(-1),
        padding_queries_attend=attend,
    )


def _within_chunks(ids: torch.Tensor, chunks: M.Chunked, length: int) -> torch.Tensor:
    """Document ids ``(R, L)`` (-1 outside documents) cut at the boundaries of ``chunks``: one id per (document,
    chunk) pair, -1 kept. Positions ``0 .. length - 1`` (the default ones); each (document, chunk) pair is one run
    when the documents are. O(R·L)."""
    pos = torch.arange(length, device=ids.device)
    shift = 0 if chunks.offsets is None else chunks.offsets.to(ids.device).view(-1, 1)
    chunk = torch.div(pos - shift, chunks.size, rounding_mode="floor")  # (1 or R, L)
    chunk = torch.broadcast_to(chunk - chunk.min(), ids.shape) if chunk.numel() else torch.zeros_like(ids)
    count = int(chunk.max()) + 1 if chunk.numel() else 1
    return torch.where(ids >= 0, ids * count + chunk, -1)


def _offsets(lengths: torch.Tensor) -> torch.Tensor:
    """``(N,)`` lengths -> ``(N + 1,)`` int32 cumulative offsets starting at 0: ``[2, 4, 3]`` -> ``[0, 2, 6, 9]``."""
    out = torch.zeros(lengths.numel() + 1, dtype=torch.int32, device=lengths.device)
    torch.cumsum(lengths, 0, out=out[1:])
    return out


def _inside_runs(starts: torch.Tensor, ends: torch.Tensor, size: int) -> torch.Tensor:
    """``(size,)`` bool, True inside the disjoint flat ranges ``[starts[i], ends[i])``. O(size)."""
    delta = torch.zeros(size + 1, dtype=torch.int32, device=starts.device)
    delta.index_add_(0, starts, torch.ones_like(starts, dtype=torch.int32))
    delta.index_add_(0, ends, torch.ones_like(ends, dtype=torch.int32), alpha=-1)
    return delta.cumsum(0)[:size] > 0


def _runs(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Runs of equal non-negative ids in each row of ``ids`` ``(B, L)``: flat start offsets and lengths, row-major.

    Raises ``BackendError`` when an id forms more than one run in a row (a document that is not contiguous).
    """
    n_rows, length = ids.shape
    if ids.numel() == 0:
        empty = torch.zeros(0, dtype=torch.long, device=ids.device)
        return empty, empty
    change = torch.ones_like(ids, dtype=torch.bool)
    change[:, 1:] = ids[:, 1:] != ids[:, :-1]
    flat_change = change.reshape(-1)
    starts = torch.nonzero(flat_change).view(-1)
    ends = torch.cat([starts[1:], starts.new_tensor([ids.numel()])])
    values = ids.reshape(-1)[starts]
    keep = values >= 0
    starts, ends, values = starts[keep], ends[keep], values[keep]
    rows = torch.div(starts, length, rounding_mode="floor")
    key = rows * (int(values.max()) + 1 if values.numel() else 1) + values
    if torch.unique(key).numel() != key.numel():
        raise bad(BackendError, "document", "each document id in one contiguous run per row", "an id in several runs")
    return starts, ends - starts


def _padding_queries_attend(real: torch.Tensor, causal: bool, window: int | None, first_query: int) -> bool:
    """Whether a query (a position ``>= first_query``) outside the single run of real tokens of a row may attend a
    real key (see ``VarlenArgs``). Raises ``BackendError`` when a row's real tokens are not one contiguous run."""
    n_real = real.sum(1)
    pos = torch.arange(real.shape[1], device=real.device)
    first = torch.where(real, pos, real.shape[1]).amin(1, keepdim=True) if real.shape[1] else n_real[:, None]
    run = (pos >= first) & (pos < first + n_real[:, None])
    if not torch.equal(run, real):
        holes = int((run != real).any(1).sum())
        raise bad(BackendError, "key_padding", "one contiguous run of real tokens per row", f"{holes} rows with holes")
    start, end = first.view(-1), first.view(-1) + n_real
    has_tokens = n_real > 0
    left = start > first_query  # padding queries before the run
    right = end < real.shape[1]  # padding queries after the run
    if causal:
        # the first padding query after the run sees the run's last keys unless the window has moved past them
        after = torch.clamp(end, min=first_query)
        reaches = torch.ones_like(right) if window is None else after - window + 1 < end
        bad_rows = has_tokens & right & reaches
    else:
        bad_rows = has_tokens & (left | right)
    return bool(bad_rows.any())


M.LOWERINGS.update(block_layout=block_layout, varlen_args=varlen_args)  # what MaskSpec.block_layout / .varlen call
