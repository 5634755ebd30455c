"""Mask specs: small, structural, composable descriptions of which query may attend to which key.

A spec is not a matrix. It is a frozen value such as ``causal() & key_padding(attention_mask)`` that each consumer
lowers to the cheapest exact form it needs (a dense bool mask, a block layout, varlen arguments).

Conventions, shared with SDPA's boolean ``attn_mask`` and FlexAttention's ``mask_mod``:

- **True means "may attend".**
- Specs are evaluated on *positions*: ``q`` and ``k`` are token positions along a row (the column index of the
  ``(B, L)`` tensors such as ``attention_mask``), ``b`` is the batch row.
- With ``Q < K`` (decoding with a KV cache, chunked prefill) the queries are the **last** ``Q`` positions
  (bottom-right alignment, as flash-attn >= 2.1 and transformers with a cache). ``q_positions=`` /
  ``kv_positions=`` override this.
- A spec is one mask for every head, unless it holds a predicate built per head (``custom(fn, heads=H)``,
  ``from_mask_mod(mod, heads=H)``): then ``spec.heads == H``, the predicate is evaluated for every query head
  ``h in range(H)`` and the mask is ``(B, H, Q, K)`` (``to_dense(..., per_head=True)``). Combined with specs that are
  the same for every head, the result is per-head; two per-head parts must agree on ``H``.

Worked example, one packed row of 3 documents of lengths 2, 4, 3 (offsets ``[0, 2, 6, 9]``)::

    >>> spec = causal() & document(seq_lens=[2, 4, 3])
    >>> spec.to_dense(9).shape
    torch.Size([1, 9, 9])

Query 3 (second token of the second document) may attend to keys 2 and 3 only.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from attnmask._checks import check_allocation, check_int, dense_data, short_repr, sparse_or_nested
from attnmask._dense import and_into, compare, empty_buffer, fold, warn_if_large
from attnmask.errors import DeviceError, DTypeError, ShapeError, SpecError, bad
from attnmask.tiles import FULL, NONE, TileGrid, per_row, segment_min_max, tile_classes, tile_view

__all__ = [
    "MaskSpec",
    "causal",
    "sliding_window",
    "local_window",
    "chunked",
    "prefix_lm",
    "document",
    "key_padding",
    "full",
    "custom",
    "bidirectional_blocks",
    "key_filter",
    "document_prefix_lm",
    "from_mask_mod",
    "resolve_positions",
    "doc_ids_from_seq_lens",
]

MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

MAX_SIZE = (1 << 62) - 1
"""Largest window, chunk size, prefix or document length a spec accepts: positions are int64, and ``q - k`` plus or
minus a size must not overflow. Anything larger is refused with a ``SpecError`` (nothing is clamped)."""

MAX_DEPTH = 100
"""Deepest nesting of ``&``, ``|`` and ``~`` a spec may have: evaluation, ``repr`` and lowering recurse over the tree,
and Python's stack would give out (``RecursionError``) a few hundred levels down. Real masks have a handful."""

PLANS_ATTRIBUTE = "_attnmask_plans"
"""Name of the attribute ``attnmask.plancache`` stores a spec's cached attention plans under (not a field)."""

_MEMO_ATTRIBUTE = "_attnmask_memo"  # structural properties of a composed spec, computed once (``memo``)


def memo(spec: MaskSpec, name: str, compute: Callable[[], Any]) -> Any:
    """``compute()``, kept on the (frozen) spec object under ``name``: for properties that follow from the spec's
    structure alone (its parts' types, heads and rows of per-row data, never tensor values), which attention asks
    several times a call and which walk every part (here, and ``lowering.varlen_form``). Not pickled
    (``__getstate__``)."""
    kept = spec.__dict__.get(_MEMO_ATTRIBUTE)
    if kept is None:
        kept = spec.__dict__.setdefault(_MEMO_ATTRIBUTE, {})
    if name not in kept:
        kept[name] = compute()
    return kept[name]


_FIELD_NAMES: dict[type, tuple[str, ...]] = {}


def _field_names(spec_type: type) -> tuple[str, ...]:
    """The dataclass field names of a spec type, asked once per type (``dataclasses.fields`` rebuilds its tuple on
    every call, and planning a fresh spec asks for its tensors each time)."""
    names = _FIELD_NAMES.get(spec_type)
    if names is None:
        names = _FIELD_NAMES[spec_type] = tuple(f.name for f in dataclasses.fields(spec_type))
    return names


# ----------------------------------------------------------------------------------------------------------------------
# Positions


def resolve_positions(
    q_len: int,
    kv_len: int | None = None,
    *,
    q_positions: torch.Tensor | None = None,
    kv_positions: torch.Tensor | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Query and key positions for a ``(Q, K)`` attention, bottom-right aligned unless given.

    Returns ``q_pos`` of shape ``(Q,)`` or ``(B, Q)`` and ``kv_pos`` of shape ``(K,)`` or ``(B, K)``, int64.
    Default: ``kv_pos = arange(K)``, ``q_pos = arange(K - Q, K)`` (the last Q positions). Example: ``Q=2, K=5`` gives
    ``q_pos = [3, 4]``.
    """
    kv_len = q_len if kv_len is None else kv_len
    if not isinstance(q_len, int) or q_len < 0:
        raise bad(SpecError, "q_len", "a non-negative int", repr(q_len))
    if not isinstance(kv_len, int) or kv_len < 0:
        raise bad(SpecError, "kv_len", "a non-negative int", repr(kv_len))
    if kv_positions is None:
        kv_pos = torch.arange(kv_len, device=device)
    else:
        kv_pos = _check_positions("kv_positions", kv_positions, kv_len)
    if q_positions is None:
        if q_len > kv_len and kv_positions is None:
            raise bad(
                SpecError,
                "q_len",
                f"<= kv_len ({kv_len}) when q_positions is not given (queries are the last Q positions)",
                q_len,
            )
        if kv_positions is None:
            q_pos = torch.arange(kv_len - q_len, kv_len, device=device)
        else:
            q_pos = kv_pos[..., kv_pos.shape[-1] - q_len :]
            if q_pos.shape[-1] != q_len:
                raise bad(SpecError, "q_positions", f"given when q_len ({q_len}) > kv_len ({kv_len})", None)
    else:
        q_pos = _check_positions("q_positions", q_positions, q_len)
    return q_pos, kv_pos


def _check_positions(name: str, pos: torch.Tensor, length: int) -> torch.Tensor:
    if not isinstance(pos, torch.Tensor) or sparse_or_nested(pos):
        pos = _as_tensor(name, pos)
    if pos.dtype == torch.bool or pos.is_floating_point() or pos.is_complex():
        raise bad(SpecError, name, "an integer tensor", f"dtype {pos.dtype}")
    if pos.dim() not in (1, 2) or pos.shape[-1] != length:
        raise bad(ShapeError, name, f"shape ({length},) or (B, {length})", tuple(pos.shape))
    return pos.long()


# ----------------------------------------------------------------------------------------------------------------------
# The spec base class


class MaskSpec:
    """Base of every mask spec. Subclasses are frozen dataclasses; combine them with ``&``, ``|`` and ``~``.

    A spec may carry per-row data (a padding mask, document ids, prefix lengths); ``batch_size`` is then its number of
    rows, else ``None`` (the spec is the same for every row and broadcasts).
    """

    # -- algebra -------------------------------------------------------------------------------------------------------
    def __and__(self, other: MaskSpec) -> MaskSpec:
        return _combine(And, self, other)

    def __or__(self, other: MaskSpec) -> MaskSpec:
        return _combine(Or, self, other)

    def __invert__(self) -> MaskSpec:
        if isinstance(self, Not):
            return self.part
        return _nested(Not(self), (self,))

    # -- structure -----------------------------------------------------------------------------------------------------
    @property
    def batch_size(self) -> int | None:
        """Rows of per-row data, or ``None`` when the spec is the same for every row."""
        return None

    @property
    def heads(self) -> int | None:
        """Number of query heads of a per-head spec (one holding ``custom(fn, heads=H)``), else ``None``: the spec is
        then one mask for every head."""
        children = self.children
        return None if not children else memo(self, "heads", lambda: _common_heads(children))

    @property
    def children(self) -> tuple[MaskSpec, ...]:
        return ()

    @property
    def device(self) -> torch.device | None:
        """Device of the spec's per-row data, or ``None`` when it carries none."""
        for child in self.children:
            if (device := child.device) is not None:  # once per child: asking twice is exponential in the depth
                return device
        return None

    @property
    def is_structural(self) -> bool:
        """True unless the spec contains a ``custom`` predicate (which can only be evaluated per element)."""
        children = self.children
        return not children or memo(self, "is_structural", lambda: all(child.is_structural for child in children))

    def walk(self):
        """Yield this spec and every spec inside it, depth first."""
        yield self
        for child in self.children:
            yield from child.walk()

    def structure(self, field_key: Callable[[Any], Any]) -> tuple:
        """What this spec is made of, as a hashable key: per part (``walk`` order) its type name and ``field_key`` of
        each of its dataclass fields, so that the caller decides how much of the data counts (a tensor's shape, its
        dtype, nothing). Example: ``(causal() & sliding_window(4)).structure(repr)`` ->
        ``(('And', '(causal(), sliding_window(4))'), ('Causal',), ('SlidingWindow', '4'))``."""
        return tuple(
            (type(part).__name__, *(field_key(getattr(part, f.name)) for f in dataclasses.fields(part)))
            for part in self.walk()
        )

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """Every tensor the spec and its parts hold (document ids, padding masks, offsets, prefix lengths), depth
        first. A ``custom`` predicate's captured data is not among them. Example: ``(causal() & key_padding(m))
        .tensors()`` is ``(m,)`` for a bool ``m``. ``attnmask.plancache`` watches their ``_version`` counters."""
        return tuple(
            value
            for spec in self.walk()
            for name in _field_names(type(spec))
            if isinstance(value := getattr(spec, name), torch.Tensor)
        )

    def __getstate__(self) -> dict:
        """Pickle and copy the spec's fields only, never the plans ``attention`` cached on the object nor the
        properties kept on it (``memo``)."""
        return {name: value for name, value in self.__dict__.items() if name not in (PLANS_ATTRIBUTE, _MEMO_ATTRIBUTE)}

    def max_position(self) -> int | None:
        """Largest position the spec's per-row data describes plus one (``L``), or ``None`` if unbounded."""
        lengths = [c.max_position() for c in self.children]
        lengths = [n for n in lengths if n is not None]
        return min(lengths) if lengths else None

    def max_query_position(self) -> int | None:
        """Like ``max_position``, but only for data read at query positions: ``None`` for a spec that never looks at
        the query's position (``key_padding``), so queries may lie outside its data (a decoder longer than the padded
        encoder it attends to)."""
        if not self.children:
            return self.max_position()
        lengths = [n for n in (c.max_query_position() for c in self.children) if n is not None]
        return min(lengths) if lengths else None

    # -- evaluation ----------------------------------------------------------------------------------------------------
    def evaluate(self, b: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Whether query position ``q`` of row ``b`` may attend to key position ``k``.

        ``b``, ``q`` and ``k`` are int64 tensors that broadcast against each other; the result is a bool tensor of
        their broadcast shape (or a shape that broadcasts to it). Costs one element of work per broadcast element.
        A per-head spec has no answer without the head: it raises a ``SpecError`` (see ``evaluate_heads``).
        """
        raise NotImplementedError

    def evaluate_heads(self, b: torch.Tensor, h: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """``evaluate`` with the query head: whether query position ``q`` of row ``b`` may attend to key position
        ``k`` in query head ``h`` (int64, broadcasting with ``b``, ``q``, ``k``). A spec that is the same for every
        head ignores ``h``; a per-head spec (:attr:`heads` set) needs it: ``h=None`` (no head known) raises a
        ``SpecError`` rather than evaluating one head for all."""
        return self.evaluate(b, q, k)

    def mask_mod(self, q_offset: int = 0, kv_offset: int = 0) -> MaskMod:
        """A FlexAttention-style predicate ``(b, h, q_idx, kv_idx) -> bool``; ``h`` (the query head) reaches the
        predicates of a per-head spec and is ignored by the rest.

        FlexAttention indexes queries and keys from 0; pass ``q_offset = K - Q`` for bottom-right alignment.
        """

        def mod(b, h, q_idx, kv_idx):
            return self.evaluate_heads(b, h, q_idx + q_offset, kv_idx + kv_offset)

        return mod

    def to_dense(
        self,
        q_len: int,
        kv_len: int | None = None,
        *,
        q_positions: torch.Tensor | None = None,
        kv_positions: torch.Tensor | None = None,
        device: torch.device | str | None = None,
        out: torch.Tensor | None = None,
        per_head: bool = False,
    ) -> torch.Tensor:
        """Materialise the mask as a bool tensor ``(B, Q, K)``, True = may attend; ``B = 1`` without per-row data.

        Memory and time: O(B·Q·K). Use it only where a dense mask is really consumed (SDPA, eager attention).
        ``out``: a contiguous bool ``(B, Q, K)`` tensor to write into and return, so a loop whose mask shape repeats
        reuses one buffer instead of allocating (and page-faulting) O(B·Q·K) fresh memory each step.

        ``per_head=True``: ``(B, H, Q, K)`` with ``H = spec.heads`` (``H = 1`` for a spec that is the same for every
        head), O(B·H·Q·K); ``out`` then has that shape. A per-head spec without ``per_head=True`` raises a
        ``SpecError`` (a ``(B, Q, K)`` mask cannot hold it).
        """
        if per_head is not False:
            if per_head is not True:
                raise bad(SpecError, "per_head", "True or False", repr(per_head))
            return self._to_dense_heads(q_len, kv_len, q_positions, kv_positions, device, out)
        self._refuse_per_head("to_dense", "pass per_head=True for a (B, H, Q, K) mask")
        b, q, k, shape = _index_grid(self, q_len, kv_len, q_positions, kv_positions, device)
        if out is not None:
            _check_out(out, shape, torch.bool, q.device)
            return _and_into(
                self, b, q, k, out, torch.tensor(True, device=q.device), torch.tensor(False, device=q.device)
            )
        warn_if_large(shape, torch.bool)
        out = self.evaluate(b, q, k)
        if tuple(out.shape) != shape or not out.is_contiguous():
            out = empty_buffer(shape, torch.bool, out.device).copy_(torch.broadcast_to(out, shape))
        return out

    def _to_dense_heads(self, q_len, kv_len, q_positions, kv_positions, device, out) -> torch.Tensor:
        """``to_dense(..., per_head=True)``: the ``(B, H, Q, K)`` bool mask, every head's predicate evaluated."""
        b, q, k, (rows, n_q, n_k) = _index_grid(self, q_len, kv_len, q_positions, kv_positions, device)
        n_heads = self.heads or 1
        h = torch.arange(n_heads, device=q.device).view(1, -1, 1, 1)
        shape = (rows, n_heads, n_q, n_k)
        if out is not None:
            _check_out(out, shape, torch.bool, q.device)
        else:
            warn_if_large(shape, torch.bool)
            out = empty_buffer(shape, torch.bool, q.device)
        allowed = self.evaluate_heads(b.unsqueeze(1), h, q.unsqueeze(1), k.unsqueeze(1))
        return out.copy_(torch.broadcast_to(allowed, shape))

    def _refuse_per_head(self, consumer: str, hint: str) -> None:
        """A ``SpecError`` when this spec is per-head and ``consumer`` takes one mask for every head."""
        if self.heads is not None:
            raise bad(
                SpecError,
                consumer,
                f"a spec that is one mask for every head ({hint})",
                f"a per-head spec of {self.heads} heads",
            )

    def to_additive(
        self,
        q_len: int,
        kv_len: int | None = None,
        *,
        dtype: torch.dtype = torch.float32,
        q_positions: torch.Tensor | None = None,
        kv_positions: torch.Tensor | None = None,
        device: torch.device | str | None = None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The mask as an additive bias ``(B, 1, Q, K)``: 0 where allowed, ``torch.finfo(dtype).min`` elsewhere.

        Masks are combined as booleans and turned additive once, so two minima are never added. One full-size pass
        writes the result: for ``shared & per_row`` parts (e.g. ``causal() & key_padding(m)``) the small ``(1, Q, K)``
        and ``(B, 1, K)`` halves are combined straight into the bias, without a full-size bool temporary; otherwise the
        bool mask ``(B, Q, K)`` is built first. O(B·Q·K) memory. ``out``: a contiguous ``(B, 1, Q, K)`` tensor of
        ``dtype`` to write into and return (buffer reuse, as in ``to_dense``).
        """
        if not dtype.is_floating_point:
            raise bad(SpecError, "dtype", "a floating dtype", dtype)
        self._refuse_per_head("to_additive", "a (B, 1, Q, K) bias is the same for every head")
        b, q, k, shape = _index_grid(self, q_len, kv_len, q_positions, kv_positions, device)
        if out is None:
            warn_if_large(shape, dtype)
            bias = empty_buffer(shape, dtype, q.device)
        else:
            _check_out(out, (shape[0], 1, *shape[1:]), dtype, q.device)
            bias = out.view(shape)
        zero = torch.zeros((), dtype=dtype, device=q.device)
        minimum = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=q.device)
        return _and_into(self, b, q, k, bias, zero, minimum).unsqueeze(1)

    def resolve(
        self,
        q_len: int,
        kv_len: int | None = None,
        q_positions: torch.Tensor | None = None,
        kv_positions: torch.Tensor | None = None,
        device: torch.device | str | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Positions (as ``resolve_positions``, checked against the spec's data) and the number of rows ``B``."""
        device = self.device if device is None else torch.device(device)
        q_pos, kv_pos = resolve_positions(
            q_len, kv_len, q_positions=q_positions, kv_positions=kv_positions, device=device
        )
        n_rows = 1 if self.batch_size is None else self.batch_size  # 0 rows of per-row data: an empty batch
        for name, pos in (("q_positions", q_pos), ("kv_positions", kv_pos)):
            if pos.dim() == 2 and pos.shape[0] not in (1, n_rows):
                if self.batch_size is not None:
                    raise bad(ShapeError, name, f"{n_rows} rows like the spec's per-row data", pos.shape[0])
                n_rows = pos.shape[0]
        self._check_range(q_pos, kv_pos)
        return q_pos, kv_pos, n_rows

    # -- tiles ---------------------------------------------------------------------------------------------------------
    def block_layout(
        self,
        q_len: int,
        kv_len: int | None = None,
        block_size: int = 128,
        *,
        q_positions: torch.Tensor | None = None,
        kv_positions: torch.Tensor | None = None,
        device: torch.device | str | None = None,
        band: bool | None = None,
    ):
        """The FULL / PARTIAL / NONE class of every ``block_size`` tile: see ``attnmask.lowering.block_layout``."""
        return _lowering("block_layout")(
            self,
            q_len,
            kv_len,
            block_size,
            q_positions=q_positions,
            kv_positions=kv_positions,
            device=device,
            band=band,
        )

    def varlen(self, q_len: int, kv_len: int | None = None):
        """``cu_seqlens``, ``max_seqlen``, ``window_size`` for varlen attention: see ``lowering.varlen_args``."""
        return _lowering("varlen_args")(self, q_len, kv_len)

    def key_band(self, grid: TileGrid) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Per query tile, key tiles ``[lo, hi)`` (two ``(R, nQ)`` int64) outside which every tile is NONE, or ``None``
        when the spec gives no such bound. Lets a block layout classify only a band of tiles: O(nQ log nK)."""
        return None

    def classify_tiles(self, grid: TileGrid) -> torch.Tensor:
        """int8 tile classes (NONE / PARTIAL / FULL) broadcastable to ``(R, nQ, nK)`` on ``grid``.

        This default evaluates the predicate per element, one row of query tiles at a time, on the key tiles of the
        grid's band and those ``grid.need`` marks (others are NONE): O(R·Q·K) time at most and O(R·block_size·K)
        memory. Every built-in primitive overrides it with interval arithmetic on the tile bounds.

        A per-head spec is classified over all its heads at once (O(R·H·Q·K) time, O(R·H·block_size·K) memory): FULL
        where every head allows every pair, NONE where no head allows any, PARTIAL otherwise; the predicate of a
        PARTIAL tile then decides per head (``mask_mod`` passes the head).
        """
        bs, device = grid.block_size, grid.q_pos.device
        b = torch.arange(grid.n_rows, device=device).view(-1, 1, 1)
        heads = self.heads
        h = None if heads is None else torch.arange(heads, device=device).view(-1, 1, 1)
        out = torch.zeros((grid.n_rows, grid.n_q_tiles, grid.n_kv_tiles), dtype=torch.int8, device=device)
        for i in range(grid.n_q_tiles):
            tiles = grid.needed_key_tiles(i)
            if tiles is None:
                k = grid.kv_pos[:, None, :]
            else:
                columns = (tiles[:, None] * bs + torch.arange(bs, device=device)).view(-1)
                k = grid.kv_pos[:, None, columns[columns < grid.kv_pos.shape[-1]]]
            q = grid.q_pos[:, i * bs : (i + 1) * bs, None]
            if h is None:
                allowed = torch.broadcast_to(self.evaluate(b, q, k), (grid.n_rows, q.shape[1], k.shape[-1]))
            else:  # (R, H, queries, keys) -> (R, H * queries, keys): a tile's pairs in every head
                every_head = self.evaluate_heads(b.unsqueeze(1), h, q.unsqueeze(1), k.unsqueeze(1))
                shape = (grid.n_rows, heads, q.shape[1], k.shape[-1])
                allowed = torch.broadcast_to(every_head, shape).reshape(grid.n_rows, heads * q.shape[1], k.shape[-1])
            tile_all, _ = segment_min_max(allowed.all(1), bs)  # (R, keys) -> (R, tiles)
            _, tile_any = segment_min_max(allowed.any(1), bs)
            if tiles is None:
                out[:, i] = tile_classes(tile_all, ~tile_any)
            else:
                out[:, i, tiles] = tile_classes(tile_all, ~tile_any)
        return grid.on_key_axis(out)

    def _check_range(self, q_pos: torch.Tensor, kv_pos: torch.Tensor) -> None:
        for name, pos, limit in (
            ("kv_positions", kv_pos, self.max_position()),
            ("q_positions", q_pos, self.max_query_position()),
        ):
            if limit is not None and pos.numel() and (int(pos.max()) >= limit or int(pos.min()) < 0):
                raise bad(
                    SpecError,
                    name,
                    f"positions in [0, {limit}) covered by the spec's per-row data",
                    f"range [{int(pos.min())}, {int(pos.max())}]",
                )


LOWERINGS: dict[str, Callable[..., Any]] = {}
"""``block_layout`` and ``varlen_args``, lent by ``attnmask.lowering`` when it is imported (``import attnmask`` imports
it before anything else can run): the layer above provides what ``MaskSpec.block_layout`` / ``MaskSpec.varlen`` call,
so no import points up and masks <-> lowering is no cycle (``tests/test_layers.py``)."""


def _lowering(name: str) -> Callable[..., Any]:
    if name not in LOWERINGS:  # only if attnmask.masks was loaded without the package (e.g. from a bare file)
        raise SpecError(f"{name}: attnmask.lowering is not imported; import attnmask first")
    return LOWERINGS[name]


def _and_into(
    spec: MaskSpec,
    b: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    out: torch.Tensor,
    yes: torch.Tensor,
    no: torch.Tensor,
) -> torch.Tensor:
    """Write ``yes`` where ``spec`` allows and ``no`` elsewhere into ``out`` ``(B, Q, K)``, in one full-size pass.

    For ``shared & per_row`` parts (e.g. ``causal() & key_padding(m)``) the small ``(1, Q, K)`` and ``(B, 1, K)``
    halves meet inside that pass, without a full-size bool temporary; a bool ``out`` takes them so even when the
    per-row half is full-size (``causal() & document(...)``); otherwise the bool mask is built first.
    """
    shape = tuple(out.shape)
    parts = [p.evaluate(b, q, k) for p in (spec.parts if isinstance(spec, And) else (spec,))]
    shared = [t for t in parts if t.dim() < 3 or t.shape[0] == 1]
    per_row = [t for t in parts if t.dim() == 3 and t.shape[0] > 1]
    if shared and per_row:
        left, right = fold(torch.logical_and, shared), fold(torch.logical_and, per_row)
        fits = torch.broadcast_shapes(left.shape, right.shape) == torch.Size(shape)
        if fits and out.dtype == torch.bool:  # one pass into out, even when a half is full-size (documents' ids)
            return and_into(left, right, out)
        if fits and left.numel() < out.numel() and right.numel() < out.numel():
            return torch.where(left, torch.where(right, yes, no), no, out=out)
    allowed = torch.broadcast_to(fold(torch.logical_and, parts), shape)
    if out.dtype == torch.bool:
        return out.copy_(allowed)
    return torch.where(allowed, yes, no, out=out)


def _check_out(out: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> None:
    if not isinstance(out, torch.Tensor):
        raise bad(SpecError, "out", "a tensor", type(out).__name__)
    if tuple(out.shape) != tuple(shape) or not out.is_contiguous():
        raise bad(ShapeError, "out", f"a contiguous tensor of shape {tuple(shape)}", tuple(out.shape))
    if out.dtype != dtype:
        raise bad(DTypeError, "out", f"dtype {dtype}", out.dtype)
    if out.device != device:
        raise bad(DeviceError, "out", f"a tensor on {device}", out.device)


def _index_grid(
    spec: MaskSpec, q_len: int, kv_len: int | None, q_positions, kv_positions, device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[int, int, int]]:
    """Position tensors ``b (B, 1, 1)``, ``q (B|1, Q, 1)``, ``k (B|1, 1, K)`` and the ``(B, Q, K)`` mask shape."""
    q_pos, kv_pos, n_rows = spec.resolve(q_len, kv_len, q_positions, kv_positions, device)
    b = torch.arange(n_rows, device=q_pos.device).view(-1, 1, 1)
    q = q_pos.view(-1, q_pos.shape[-1], 1) if q_pos.dim() == 2 else q_pos.view(1, -1, 1)
    k = kv_pos.view(-1, 1, kv_pos.shape[-1]) if kv_pos.dim() == 2 else kv_pos.view(1, 1, -1)
    return b, q, k, (n_rows, q_pos.shape[-1], kv_pos.shape[-1])


def _combine(cls: type, left: MaskSpec, right: MaskSpec) -> MaskSpec:
    """``left & right`` (``cls=And``) or ``left | right`` (``Or``), flattened: ``(a & b) & c`` has three parts.

    Per-row data of one row broadcasts over the other parts' ``B`` rows (as in numpy): ``key_padding`` of one row
    ``& document`` of three rows holds the padding row expanded to three (a view, no copy). ``B`` rows against ``C``
    rows (both > 1) are refused here, not at evaluation."""
    for side in (left, right):
        if not isinstance(side, MaskSpec):
            raise bad(SpecError, "operand", "a MaskSpec", type(side).__name__)
    parts: list[MaskSpec] = []
    for side in (left, right):
        parts.extend(side.parts if isinstance(side, cls) else (side,))
    rows = _common_batch_size(parts)
    heads = _common_heads(parts)
    if rows is not None and rows != 1:
        parts = [_with_rows(p, rows) if p.batch_size == 1 else p for p in parts]
    spec = _nested(cls(tuple(parts)), tuple(parts))
    memo(spec, "heads", lambda: heads)  # checked above: kept rather than walked again at each call
    return spec


def _common_batch_size(parts: Sequence[MaskSpec]) -> int | None:
    sizes = {p.batch_size for p in parts} - {None}
    if len(sizes) > 1 and 1 in sizes:
        sizes.discard(1)
    if len(sizes) > 1:
        raise bad(
            ShapeError,
            "specs combined",
            "per-row data of the same number of rows (or of one row, which broadcasts)",
            f"{sorted(sizes)} rows",
        )
    return sizes.pop() if sizes else None


def _common_heads(parts: Sequence[MaskSpec]) -> int | None:
    """The head count of the per-head parts (``None`` when no part is per-head); parts of different counts are
    refused: a per-head spec is built for one number of query heads."""
    counts = {n for n in (p.heads for p in parts) if n is not None}
    if len(counts) > 1:
        raise bad(ShapeError, "specs combined", "per-head specs of the same number of heads", f"{sorted(counts)} heads")
    return counts.pop() if counts else None


def _with_rows(spec: MaskSpec, rows: int) -> MaskSpec:
    """A spec whose per-row data has one row, with that row repeated ``rows`` times (expanded views, no copy)."""
    if isinstance(spec, (And, Or)):
        return type(spec)(tuple(_with_rows(p, rows) if p.batch_size == 1 else p for p in spec.parts))
    if isinstance(spec, Not):
        return Not(_with_rows(spec.part, rows))
    changes: dict[str, Any] = {
        f.name: value.expand(rows, *value.shape[1:])
        for f in dataclasses.fields(spec)
        if isinstance(value := getattr(spec, f.name), torch.Tensor) and value.dim() >= 1 and value.shape[0] == 1
    }
    if isinstance(spec, Document) and spec.seq_lens is not None:
        changes["seq_lens"] = spec.seq_lens * rows
    return dataclasses.replace(spec, **changes)


_DEPTH_ATTRIBUTE = "_attnmask_depth"


def _depth(spec: MaskSpec) -> int:
    """Nesting depth of a spec (1 for a primitive), remembered on the combinators ``_nested`` builds."""
    return getattr(spec, _DEPTH_ATTRIBUTE, 1)


def _nested(spec: MaskSpec, operands: tuple[MaskSpec, ...]) -> MaskSpec:
    """Record ``spec``'s depth (one more than its deepest operand) and refuse one past ``MAX_DEPTH``."""
    depth = 1 + max(_depth(o) for o in operands)
    if depth > MAX_DEPTH:
        raise bad(SpecError, "spec", f"at most {MAX_DEPTH} levels of nested &, | and ~", f"{depth} levels")
    object.__setattr__(spec, _DEPTH_ATTRIBUTE, depth)
    return spec


# ----------------------------------------------------------------------------------------------------------------------
# Primitives without data


@dataclass(frozen=True)
class Full(MaskSpec):
    """Every query may attend to every key."""

    def evaluate(self, b, q, k):
        return torch.ones((), dtype=torch.bool, device=q.device).expand(torch.broadcast_shapes(q.shape, k.shape))

    def __repr__(self) -> str:
        return "full()"

    def classify_tiles(self, grid):
        return torch.full((1, 1, 1), FULL, dtype=torch.int8, device=grid.q_pos.device)


@dataclass(frozen=True)
class Causal(MaskSpec):
    """A query attends to keys at its own position or earlier: ``k <= q``."""

    def evaluate(self, b, q, k):
        return compare(torch.le, k, q)

    def __repr__(self) -> str:
        return "causal()"

    def classify_tiles(self, grid):
        """FULL when the tile's last key precedes its first query, NONE when its first key follows its last query."""
        return tile_classes(grid.k_max <= grid.q_min, grid.k_min > grid.q_max)

    def key_band(self, grid):
        if not grid.kv_sorted:
            return None
        hi = grid.first_tile(grid.tile_k_min, grid.q_max, right=True)
        return torch.zeros_like(hi), hi


@dataclass(frozen=True)
class SlidingWindow(MaskSpec):
    """Causal local attention: a query sees at most ``window`` keys, itself included: ``0 <= q - k < window``.

    Equals transformers' ``sliding_window_causal_mask_function(window)`` and flash-attn's
    ``window_size=(window - 1, 0)``. Example, ``window=3``: query 5 sees keys 3, 4, 5.
    """

    window: int

    def evaluate(self, b, q, k):
        # k <= q and q - k < window, each a comparison of the (small) positions themselves
        return fold(torch.logical_and, [compare(torch.le, k, q), compare(torch.gt, k, q - self.window)])

    def __repr__(self) -> str:
        return f"sliding_window({self.window})"

    def classify_tiles(self, grid):
        """On the range of ``q - k`` over the tile, ``[q_min - k_max, q_max - k_min]``, against ``[0, window)``.

        Exact for contiguous positions (the default); sound for any positions."""
        w = self.window
        every = (grid.q_min >= grid.k_max) & (grid.q_max - w < grid.k_min)
        none = (grid.q_max < grid.k_min) | (grid.q_min - w >= grid.k_max)
        return tile_classes(every, none)

    def key_band(self, grid):
        if not grid.kv_sorted:
            return None
        lo = grid.first_tile(grid.tile_k_max, grid.q_min - self.window, right=True)
        return lo, grid.first_tile(grid.tile_k_min, grid.q_max, right=True)


@dataclass(frozen=True)
class LocalWindow(MaskSpec):
    """Local attention both ways: a query sees the ``before`` keys preceding it, itself, and the ``after`` keys
    following it: ``-after <= q - k <= before`` (both bounds inclusive).

    ``local_window(w, w)`` is transformers' ``sliding_window_bidirectional_overlay(w)`` (``abs(q - k) <= w``,
    ModernBERT's local layers) and flash-attn's ``window_size=(w, w)``; ``local_window(w - 1, 0)`` equals
    ``sliding_window(w)``. Example, ``before=2, after=1``: query 5 sees keys 3, 4, 5, 6.
    """

    before: int
    after: int

    def evaluate(self, b, q, k):
        # q - before <= k <= q + after
        return fold(torch.logical_and, [compare(torch.ge, k, q - self.before), compare(torch.le, k, q + self.after)])

    def __repr__(self) -> str:
        return f"local_window({self.before}, {self.after})"

    def classify_tiles(self, grid):
        """On the range of ``q - k`` over the tile, ``[q_min - k_max, q_max - k_min]``, against ``[-after, before]``.

        Exact for contiguous positions (the default); sound for any positions."""
        before, after = self.before, self.after
        every = (grid.q_max - before <= grid.k_min) & (grid.k_max <= grid.q_min + after)
        none = (grid.q_min - before > grid.k_max) | (grid.k_min > grid.q_max + after)
        return tile_classes(every, none)

    def key_band(self, grid):
        """From the first key tile reaching ``q_min - before`` to the last starting at or before ``q_max + after``."""
        if not grid.kv_sorted:
            return None
        lo = grid.first_tile(grid.tile_k_max, grid.q_min - self.before)
        return lo, grid.first_tile(grid.tile_k_min, grid.q_max + self.after, right=True)


@dataclass(frozen=True, eq=False)
class Chunked(MaskSpec):
    """Attention within fixed chunks: ``(q - offset) // size == (k - offset) // size``, not causal by itself.

    ``offsets`` (``(B,)`` int64, optional) shifts chunk boundaries per row, e.g. by the amount of left padding so
    chunks start at the first real token (as transformers' ``chunked_causal_mask_function`` does). Example,
    ``size=4``: positions 0-3 form one chunk, 4-7 the next.
    """

    size: int
    offsets: torch.Tensor | None = None

    @property
    def batch_size(self):
        return None if self.offsets is None else self.offsets.shape[0]

    @property
    def device(self):
        return None if self.offsets is None else self.offsets.device

    def evaluate(self, b, q, k):
        off = 0 if self.offsets is None else self.offsets[b]
        chunk_q = torch.div(q - off, self.size, rounding_mode="floor")
        return compare(torch.eq, chunk_q, torch.div(k - off, self.size, rounding_mode="floor"))

    def __repr__(self) -> str:
        if self.offsets is None:
            return f"chunked({self.size})"
        return f"chunked({self.size}, offsets={self.offsets.tolist()})"

    def classify_tiles(self, grid):
        """On the range of chunk numbers of the tile's positions (monotone in the position).

        FULL when both tiles lie in the same single chunk, NONE when their chunk ranges do not meet. Exact for
        contiguous positions; sound for any."""
        chunk = self._chunk
        cq_lo, cq_hi, ck_lo, ck_hi = chunk(grid.q_min), chunk(grid.q_max), chunk(grid.k_min), chunk(grid.k_max)
        every = (cq_lo == cq_hi) & (ck_lo == ck_hi) & (cq_lo == ck_lo)
        return tile_classes(every, (cq_hi < ck_lo) | (ck_hi < cq_lo))

    def key_band(self, grid):
        if not grid.kv_sorted:
            return None
        per_tile = 0 if self.offsets is None else self.offsets.view(-1, 1)
        ck_lo = torch.div(grid.tile_k_min - per_tile, self.size, rounding_mode="floor")
        ck_hi = torch.div(grid.tile_k_max - per_tile, self.size, rounding_mode="floor")
        lo = grid.first_tile(ck_hi, self._chunk(grid.q_min))
        return lo, grid.first_tile(ck_lo, self._chunk(grid.q_max), right=True)

    def _chunk(self, pos):
        """Chunk number of positions ``(R, n, m)`` (per-row offsets broadcast over the first dimension)."""
        off = 0 if self.offsets is None else per_row(self.offsets)
        return torch.div(pos - off, self.size, rounding_mode="floor")


# ----------------------------------------------------------------------------------------------------------------------
# Primitives with per-row data


@dataclass(frozen=True, eq=False)
class PrefixLM(MaskSpec):
    """Prefix language model: keys in the prefix are visible to every query, the rest is causal.

    ``k <= q  or  k < prefix_lens[b]``. Example, prefix 3 of 6: query 1 sees keys 0-2, query 4 sees keys 0-4.
    ``prefix_lens``: ``(B,)`` int64.
    """

    prefix_lens: torch.Tensor

    @property
    def batch_size(self):
        return self.prefix_lens.shape[0]

    @property
    def device(self):
        return self.prefix_lens.device

    def evaluate(self, b, q, k):
        return fold(torch.logical_or, [compare(torch.le, k, q), compare(torch.lt, k, self.prefix_lens[b])])

    def __repr__(self) -> str:
        return f"prefix_lm({self.prefix_lens.tolist()})"

    def classify_tiles(self, grid):
        """FULL when every key is in the prefix or precedes every query; NONE when no key is, and every key follows
        every query. Exact for any positions."""
        p = per_row(self.prefix_lens)
        every = (grid.k_max <= grid.q_min) | (grid.k_max < p)
        none = (grid.k_min > grid.q_max) & (grid.k_min >= p)
        return tile_classes(every, none)

    def key_band(self, grid):
        if not grid.kv_sorted:
            return None
        last_query = torch.maximum(grid.q_max, per_row(self.prefix_lens) - 1)
        hi = grid.first_tile(grid.tile_k_min, last_query, right=True)
        return torch.zeros_like(hi), hi


@dataclass(frozen=True, eq=False)
class Document(MaskSpec):
    """Documents of a packed row attend only within themselves: ``doc[b, q] == doc[b, k] >= 0``.

    ``doc_ids``: ``(B, L)`` int64, the document of every position; a negative id marks a position in no document
    (padding), which attends to nothing and is attended by nothing. Not causal by itself: combine with ``causal()``.
    ``seq_lens`` (tuple per row) is kept when the spec was built from lengths, for varlen lowering.
    """

    doc_ids: torch.Tensor
    seq_lens: tuple[tuple[int, ...], ...] | None = None

    @property
    def batch_size(self):
        return self.doc_ids.shape[0]

    @property
    def device(self):
        return self.doc_ids.device

    def max_position(self):
        return self.doc_ids.shape[1]

    def evaluate(self, b, q, k):
        dq = self.doc_ids[b, q]
        return fold(torch.logical_and, [compare(torch.eq, dq, self.doc_ids[b, k]), dq >= 0])

    def __repr__(self) -> str:
        if self.seq_lens is not None:
            rows = [list(r) for r in self.seq_lens]
            return f"document(seq_lens={rows[0] if len(rows) == 1 else rows})"
        return f"document(doc_ids=<{tuple(self.doc_ids.shape)}>)"

    def classify_tiles(self, grid):
        """On each tile's smallest and largest document id (ids < 0 left out) and whether it holds a negative id.

        FULL when both tiles hold one and the same id and nothing else; NONE when their id ranges do not meet (or a
        tile holds no document). Always sound. Exact when ids are non-decreasing along each row apart from negative
        ids (packed rows, ``seq_lens=``) and positions are contiguous: then overlapping ranges share an id. O(R·(Q+K))
        plus O(R·nQ·nK) comparisons."""
        q_lo, q_hi, q_neg = self._tile_ids(grid, "q")
        k_lo, k_hi, k_neg = self._tile_ids(grid, "kv")
        q_one = ((q_lo == q_hi) & ~q_neg)[:, :, None]
        k_one = grid.key_axis((k_lo == k_hi) & ~k_neg)
        q_lo, q_hi, k_lo, k_hi = q_lo[:, :, None], q_hi[:, :, None], grid.key_axis(k_lo), grid.key_axis(k_hi)
        every = q_one & k_one & (q_lo == k_lo)
        return tile_classes(every, (q_hi < k_lo) | (k_hi < q_lo))

    def key_band(self, grid):
        """When the key tiles' id ranges are sorted along the row (ids non-decreasing apart from trailing tiles
        without documents), the key tiles meeting a query tile's id range are consecutive: two binary searches."""
        q_lo, q_hi, _ = self._tile_ids(grid, "q")
        k_lo, k_hi, _ = self._tile_ids(grid, "kv")
        k_hi = torch.where(k_hi < 0, torch.iinfo(k_hi.dtype).max, k_hi)  # tiles without documents sort last
        if not (bool((k_lo[:, 1:] >= k_lo[:, :-1]).all()) and bool((k_hi[:, 1:] >= k_hi[:, :-1]).all())):
            return None
        return grid.first_tile(k_hi, q_lo), grid.first_tile(k_lo, q_hi, right=True)

    def _tile_ids(self, grid, side):
        """Per tile of one side: the smallest and largest id >= 0 (``iinfo.max`` / -1 without any), any id < 0."""
        return grid.cached(
            (id(self), grid.span(side)), lambda: self._compute_tile_ids(grid.read(self.doc_ids, side), grid.block_size)
        )

    def _compute_tile_ids(self, ids, block_size):
        neg = ids < 0
        info = torch.iinfo(ids.dtype)
        lo = tile_view(ids.masked_fill(neg, info.max), block_size, info.max).amin(-1)
        hi = tile_view(ids.masked_fill(neg, -1), block_size, -1).amax(-1)
        return lo, hi, tile_view(neg, block_size, False).any(-1)


@dataclass(frozen=True, eq=False)
class KeyPadding(MaskSpec):
    """Keys that are padding are never attended: ``attention_mask[b, k] == 1``.

    ``attention_mask``: ``(B, L)``, 1 (or True) = real token, 0 = padding, as tokenizers return it. Stored as bool.
    Queries at padding positions are not masked by this spec (as in transformers); their outputs are unused.
    """

    attention_mask: torch.Tensor

    @property
    def batch_size(self):
        return self.attention_mask.shape[0]

    @property
    def device(self):
        return self.attention_mask.device

    def max_position(self):
        return self.attention_mask.shape[1]

    def max_query_position(self):
        return None  # the padding of keys only: any query position is fine

    def evaluate(self, b, q, k):
        return self.attention_mask[b, k]

    def __repr__(self) -> str:
        m = self.attention_mask
        return f"key_padding(<{tuple(m.shape)}, {int(m.sum())} real of {m.numel()}>)"

    def classify_tiles(self, grid):
        """Per key tile: FULL when every key is real, NONE when none is, PARTIAL otherwise. Exact. O(R·K)."""
        every, some = self._tiles_real(grid)
        return grid.key_axis(tile_classes(every, ~some))

    def key_band(self, grid):
        """From the first to the last key tile holding a real key (the same for every query tile)."""
        _, some = self._tiles_real(grid)
        index = torch.arange(some.shape[-1], device=some.device)
        lo = torch.where(some, index, some.shape[-1]).amin(-1, keepdim=True) if some.shape[-1] else some.long()
        hi = torch.where(some, index + 1, 0).amax(-1, keepdim=True) if some.shape[-1] else some.long()
        n_q = grid.n_q_tiles
        return lo.expand(-1, n_q), hi.expand(-1, n_q)

    def _tiles_real(self, grid):
        return grid.cached(id(self), lambda: segment_min_max(grid.read(self.attention_mask, "kv"), grid.block_size))


@dataclass(frozen=True, eq=False)
class BidirectionalBlocks(Document):
    """Tokens of one block attend to each other both ways: ``block[b, q] == block[b, k] >= 0``.

    ``doc_ids``: ``(B, L)`` int64 block ids, -1 for a token in no block (text). Combine with ``|`` on top of a causal
    rule: ``causal() | bidirectional_blocks(ids)`` is transformers' ``block_sequence_ids`` overlay (Gemma3 and
    PaliGemma image tokens). The predicate is ``document``'s, so every lowering of it applies; tiles are classified on
    each tile's smallest and largest block id, exact when ids are non-decreasing apart from -1 (blocks numbered in
    order along the row, as transformers numbers them).
    """

    def __repr__(self) -> str:
        n_blocks = int((self.doc_ids >= 0).sum())
        return f"bidirectional_blocks(<{tuple(self.doc_ids.shape)}, {n_blocks} tokens in blocks>)"


@dataclass(frozen=True, eq=False)
class KeyFilter(KeyPadding):
    """Keys whose token id is in ``ignored_ids`` are never attended (special tokens): ``input_ids[b, k] not in ids``.

    Held as the ``(B, L)`` bool mask of kept keys, so every ``key_padding`` lowering applies (exact tiles: FULL where
    every key of a tile is kept, NONE where none is). Queries are not filtered.
    """

    ignored_ids: tuple[int, ...] = ()

    def __repr__(self) -> str:
        return f"key_filter(ignored_ids={list(self.ignored_ids)})"


@dataclass(frozen=True, eq=False)
class PrefixKeys(MaskSpec):
    """Each key is visible from a query position on: ``q >= visible_from[b, k]``.

    ``visible_from``: ``(B, L)`` int64. ``visible_from[b, k] = k`` is causal; a smaller value opens the key to earlier
    queries: for a prefix-LM per packed document (`document_prefix_lm`) a key in its document's prefix is visible from
    the document's first position on. Tiles, on each key tile's smallest and largest ``visible_from``: FULL when the
    largest is at most the first query, NONE when the smallest is past the last query. Exact for contiguous query
    positions; sound for any.
    """

    visible_from: torch.Tensor

    @property
    def batch_size(self):
        return self.visible_from.shape[0]

    @property
    def device(self):
        return self.visible_from.device

    def max_position(self):
        return self.visible_from.shape[1]

    def evaluate(self, b, q, k):
        return compare(torch.ge, q, self.visible_from[b, k])

    def __repr__(self) -> str:
        n_open = int((self.visible_from < torch.arange(self.visible_from.shape[1], device=self.device)).sum())
        return f"prefix_keys(<{tuple(self.visible_from.shape)}, {n_open} keys open to earlier queries>)"

    def classify_tiles(self, grid):
        lo, hi = grid.cached(id(self), lambda: segment_min_max(grid.read(self.visible_from, "kv"), grid.block_size))
        return tile_classes(grid.key_axis(hi) <= grid.q_min, grid.key_axis(lo) > grid.q_max)


class _NoHead:
    """What a ``custom`` predicate that is not per-head receives as ``h``: such a spec is one mask for every head, so
    a predicate that computes with the head index (``h % 2``, ``h == 0``, ``table[h]``) raises a ``SpecError``
    instead of being evaluated for head 0 alone (``custom(fn, heads=H)`` evaluates it per head). Passing ``h`` on to
    another function untouched is fine."""

    __slots__ = ()

    def _refuse(self, *args, **kwargs):
        raise bad(
            SpecError,
            "custom fn",
            "a predicate that does not depend on the head index h (a spec is one mask for every head unless built "
            "per head: custom(fn, heads=H) / from_mask_mod(mod, heads=H))",
            "a predicate computing with h",
        )

    __index__ = __int__ = __float__ = __bool__ = __len__ = __iter__ = __getitem__ = __array__ = _refuse
    __eq__ = __ne__ = __lt__ = __le__ = __gt__ = __ge__ = _refuse  # type: ignore[assignment]
    __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = __mod__ = __rmod__ = _refuse
    __floordiv__ = __rfloordiv__ = __truediv__ = __rtruediv__ = __pow__ = __neg__ = _refuse
    __and__ = __rand__ = __or__ = __ror__ = __xor__ = __rxor__ = __invert__ = _refuse
    __lshift__ = __rshift__ = __abs__ = _refuse
    __hash__ = object.__hash__

    def __repr__(self) -> str:
        return "h (one mask for every head)"


NO_HEAD = _NoHead()


@dataclass(frozen=True, eq=False)
class Custom(MaskSpec):
    """An arbitrary predicate ``fn(b, h, q_pos, k_pos) -> bool tensor`` (FlexAttention's ``mask_mod`` form).

    ``n_heads=None``: one mask for every head; ``h`` is passed as :data:`NO_HEAD`, which refuses (``SpecError``) any
    use that would make the result depend on the head, rather than evaluating head 0 for all. ``n_heads=H``: a
    per-head spec (``heads == H``): ``h`` is an int64 tensor of query-head indices in ``[0, H)`` broadcasting with
    ``b``, ``q`` and ``k``, and evaluating without a head (``evaluate``, a consumer that takes one mask for every
    head) raises a ``SpecError``. Consumers must evaluate the predicate per element (tile by tile in block layouts),
    so prefer the structural primitives where they fit.
    """

    fn: MaskMod
    name: str | None = None
    n_heads: int | None = None

    @property
    def is_structural(self):
        return False

    @property
    def heads(self):
        return self.n_heads

    def evaluate(self, b, q, k):
        return self.evaluate_heads(b, None, q, k)

    def evaluate_heads(self, b, h, q, k):
        if self.n_heads is None:
            h = NO_HEAD
        elif h is None:
            raise bad(
                SpecError,
                "mask",
                "a consumer that evaluates every head of a per-head spec (to_dense(..., per_head=True), "
                "mask_mod, a backend declaring per_head)",
                f"{self!r} evaluated without a head index",
            )
        else:
            h = torch.as_tensor(h)
        out = self.fn(torch.as_tensor(b), h, q, k)
        if not isinstance(out, torch.Tensor) or out.dtype != torch.bool:
            raise bad(
                SpecError,
                "custom fn",
                "a bool tensor",
                type(out).__name__ if not isinstance(out, torch.Tensor) else out.dtype,
            )
        return out

    def __repr__(self) -> str:
        name = self.name or getattr(self.fn, "__name__", "fn")
        return f"custom({name})" if self.n_heads is None else f"custom({name}, heads={self.n_heads})"


# ----------------------------------------------------------------------------------------------------------------------
# Combinators


@dataclass(frozen=True, eq=False)
class And(MaskSpec):
    """Allowed where every part allows."""

    parts: tuple[MaskSpec, ...]

    @property
    def children(self):
        return self.parts

    @property
    def batch_size(self):
        return memo(self, "batch_size", lambda: _common_batch_size(self.parts))

    def evaluate(self, b, q, k):
        return self.evaluate_heads(b, None, q, k)

    def evaluate_heads(self, b, h, q, k):
        # Small parts meet first; one full-size operation writes a fresh buffer (see attnmask._dense.fold).
        return fold(torch.logical_and, [part.evaluate_heads(b, h, q, k) for part in self.parts])

    def __repr__(self) -> str:
        return " & ".join(_wrap(p, (Or,)) for p in self.parts)

    def classify_tiles(self, grid):
        """NONE if any part is NONE, FULL if all are FULL (the minimum class): sound, exact only when parts agree.

        With parts evaluated per element (``custom``), the structural parts decide first and the whole conjunction
        is then evaluated per element on the tiles left (exact there, see `_classify_rest`)."""
        if self.is_structural:
            return _reduce_classes(torch.minimum, [p.classify_tiles(grid) for p in self.parts])
        return _classify_rest(self, grid, torch.minimum, NONE)

    def key_band(self, grid):
        """The intersection of the parts' bands (a part without a band does not narrow it)."""
        bands = [b for b in (p.key_band(grid) for p in self.parts) if b is not None]
        if not bands:
            return None
        return _reduce_classes(torch.maximum, [b[0] for b in bands]), _reduce_classes(
            torch.minimum, [b[1] for b in bands]
        )


@dataclass(frozen=True, eq=False)
class Or(MaskSpec):
    """Allowed where any part allows."""

    parts: tuple[MaskSpec, ...]

    @property
    def children(self):
        return self.parts

    @property
    def batch_size(self):
        return memo(self, "batch_size", lambda: _common_batch_size(self.parts))

    def evaluate(self, b, q, k):
        return self.evaluate_heads(b, None, q, k)

    def evaluate_heads(self, b, h, q, k):
        return fold(torch.logical_or, [part.evaluate_heads(b, h, q, k) for part in self.parts])

    def __repr__(self) -> str:
        return " | ".join(_wrap(p, (And,)) for p in self.parts)

    def classify_tiles(self, grid):
        """FULL if any part is FULL, NONE if all are NONE (the maximum class): sound. With parts evaluated per element
        (``custom``), the tiles no structural part makes FULL are evaluated per element (exact, `_classify_rest`)."""
        if self.is_structural:
            return _reduce_classes(torch.maximum, [p.classify_tiles(grid) for p in self.parts])
        return _classify_rest(self, grid, torch.maximum, FULL)

    def key_band(self, grid):
        """The hull of the parts' bands; none if a part has none."""
        bands = [p.key_band(grid) for p in self.parts]
        if any(b is None for b in bands):
            return None
        return _reduce_classes(torch.minimum, [b[0] for b in bands]), _reduce_classes(
            torch.maximum, [b[1] for b in bands]
        )


@dataclass(frozen=True, eq=False)
class Not(MaskSpec):
    """Allowed exactly where ``part`` does not allow."""

    part: MaskSpec

    @property
    def children(self):
        return (self.part,)

    @property
    def batch_size(self):
        return self.part.batch_size

    def evaluate(self, b, q, k):
        return self.evaluate_heads(b, None, q, k)

    def evaluate_heads(self, b, h, q, k):
        return ~self.part.evaluate_heads(b, h, q, k)

    def __repr__(self) -> str:
        return "~" + _wrap(self.part, (And, Or))

    def classify_tiles(self, grid):
        """FULL and NONE swap; PARTIAL stays. Exact when the part's classes are."""
        return FULL - self.part.classify_tiles(grid)


def _classify_rest(spec: And | Or, grid: TileGrid, op: Callable, decisive: int) -> torch.Tensor:
    """Classes of ``spec`` (an ``&`` or ``|`` holding parts evaluated per element): its structural parts combined by
    ``op`` decide the tiles where they give ``decisive`` (NONE for ``&``, FULL for ``|``); every other tile of the
    grid's band that ``grid.need`` keeps is classified by evaluating the whole of ``spec`` per element
    (`MaskSpec.classify_tiles`), so it is exact: two PARTIAL parts that together leave a tile empty (``&``) or cover
    it (``|``) give NONE or FULL. Costs what evaluating the ``custom`` parts per element on those tiles costs."""
    structural = [p.classify_tiles(grid) for p in spec.parts if p.is_structural]
    if not structural:
        return MaskSpec.classify_tiles(spec, grid)
    classes = _reduce_classes(op, structural)
    need = grid.to_every_tile(classes != decisive)
    narrow = dataclasses.replace(grid, need=need if grid.need is None else need & grid.need)
    return torch.where(classes == decisive, classes, MaskSpec.classify_tiles(spec, narrow))


def _wrap(spec: MaskSpec, needs_parens: tuple[type, ...]) -> str:
    return f"({spec!r})" if isinstance(spec, needs_parens) else repr(spec)


def _reduce_classes(op, classes: list[torch.Tensor]) -> torch.Tensor:
    out = classes[0]
    for c in classes[1:]:
        out = op(out, c)
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Constructors (the public names)


def full() -> MaskSpec:
    """Every query may attend to every key (bidirectional, e.g. an encoder without padding)."""
    return Full()


def causal() -> MaskSpec:
    """Causal mask: query at position ``q`` may attend to keys ``k <= q``."""
    return Causal()


def sliding_window(window: int) -> MaskSpec:
    """Causal sliding window: a query sees at most ``window`` keys including itself (``0 <= q - k < window``).

    The window is *inclusive of the query*: ``sliding_window(1)`` is the diagonal. Same as transformers'
    ``sliding_window`` config value and flash-attn ``window_size=(window - 1, 0)``.
    """
    return SlidingWindow(_check_size("window", window))


def local_window(before: int, after: int) -> MaskSpec:
    """Bidirectional local window: a query at ``q`` sees keys ``k`` with ``-after <= q - k <= before``, i.e. up to
    ``before`` keys before it, itself, and up to ``after`` keys after it (``before + after + 1`` keys at most).

    Both bounds are *inclusive*: ``local_window(0, 0)`` is the diagonal, and ``local_window(w, w)`` is transformers'
    bidirectional sliding window ``abs(q - k) <= w`` (ModernBERT's ``config.sliding_window``) and flash-attn
    ``window_size=(w, w)``. Not causal unless ``after == 0``: ``local_window(w - 1, 0)`` equals ``sliding_window(w)``.
    Example: ``local_window(1, 2)`` lets query 4 see keys 3, 4, 5, 6.
    """
    before = check_int("before", before, low=0, high=MAX_SIZE, error=SpecError)
    return LocalWindow(before, check_int("after", after, low=0, high=MAX_SIZE, error=SpecError))


def chunked(size: int, offsets: Any = None) -> MaskSpec:
    """Chunked (block-local) attention, not causal by itself: ``(q - off) // size == (k - off) // size``.

    ``offsets``: optional per-row shift ``(B,)``, e.g. the count of left-padding tokens, so chunks start at the first
    real token. ``causal() & chunked(size, offsets)`` equals transformers' ``chunked_causal_mask_function``.
    """
    size = _check_size("size", size)
    off = None if offsets is None else _as_row_vector("offsets", offsets)
    if off is not None and off.numel() and int(off.abs().max()) > MAX_SIZE:
        raise bad(SpecError, "offsets", f"shifts in [-{MAX_SIZE}, {MAX_SIZE}]", short_repr(off.tolist()))
    return Chunked(size, off)


def prefix_lm(prefix_lens: Any) -> MaskSpec:
    """Prefix-LM mask: bidirectional over each row's prefix, causal after it: ``k <= q or k < prefix_lens[b]``.

    ``prefix_lens``: an int (one row) or a sequence / ``(B,)`` tensor of per-row prefix lengths (>= 0).
    """
    lens = _as_row_vector("prefix_lens", prefix_lens)
    if lens.numel() and int(lens.min()) < 0:
        raise bad(SpecError, "prefix_lens", "lengths >= 0", short_repr(lens.tolist()))
    return PrefixLM(lens)


def document(
    seq_lens: Any = None, *, doc_ids: Any = None, length: int | None = None, device: torch.device | str | None = None
) -> MaskSpec:
    """Block-diagonal mask over the documents of packed rows (not causal by itself).

    Give either ``seq_lens``, the document lengths of one row (``[2, 4, 3]``) or of each row (``[[2, 4], [3, 3]]``),
    or ``doc_ids``, a ``(L,)`` or ``(B, L)`` int tensor of document ids (negative = no document, e.g. padding).
    With ``seq_lens``, a row is ``length`` positions long (default: the longest row's total); positions past a row's
    documents belong to no document. Example: ``seq_lens=[2, 4, 3]`` gives ids ``[0, 0, 1, 1, 1, 1, 2, 2, 2]``.
    """
    if (seq_lens is None) == (doc_ids is None):
        raise bad(
            SpecError, "document", "exactly one of seq_lens= or doc_ids=", "both" if seq_lens is not None else "neither"
        )
    if doc_ids is not None:
        ids = _as_tensor("doc_ids", doc_ids, device)
        if ids.dtype == torch.bool or ids.is_floating_point() or ids.is_complex():
            raise bad(SpecError, "doc_ids", "an integer tensor", f"dtype {ids.dtype}")
        if ids.dim() == 1:
            ids = ids.unsqueeze(0)
        if ids.dim() != 2:
            raise bad(ShapeError, "doc_ids", "shape (L,) or (B, L)", tuple(ids.shape))
        return Document(ids.long())
    rows = _seq_lens_rows(seq_lens)
    if length is not None:
        length = check_int("length", length, low=0, high=MAX_SIZE, error=SpecError)
    longest = max((sum(r) for r in rows), default=0)
    if longest > MAX_SIZE:
        raise bad(SpecError, "seq_lens", f"rows of at most {MAX_SIZE} positions in all", short_repr(longest))
    check_allocation("seq_lens", len(rows) * max(length or 0, longest) * 8, SpecError)
    try:
        ids = doc_ids_from_seq_lens(rows, length=length, device=device)
    except (RuntimeError, MemoryError) as e:  # the allocator refused the (B, L) ids, e.g. seq_lens=[2**40]
        raise bad(
            SpecError, "seq_lens", f"rows whose document ids fit in memory ({len(rows)} x {length or longest})", e
        ) from None
    return Document(ids, tuple(tuple(r) for r in rows))


def doc_ids_from_seq_lens(
    rows: Sequence[Sequence[int]], *, length: int | None = None, device: torch.device | str | None = None
) -> torch.Tensor:
    """Document ids ``(B, L)`` from per-row document lengths; positions past a row's documents get -1.

    ``[[2, 3], [4]]`` with ``length=5`` gives ``[[0, 0, 1, 1, 1], [0, 0, 0, 0, -1]]``. O(B·L) time and memory.
    """
    totals = [sum(r) for r in rows]
    longest = max(totals, default=0)
    length = longest if length is None else length
    if length < longest:
        raise bad(SpecError, "length", f">= the longest row's total length ({longest})", length)
    out = torch.full((len(rows), length), -1, dtype=torch.long, device=device)
    for i, row in enumerate(rows):
        if row:
            lens = torch.tensor(row, dtype=torch.long, device=device)
            out[i, : totals[i]] = torch.repeat_interleave(torch.arange(len(row), device=device), lens)
    return out


def key_padding(attention_mask: Any) -> MaskSpec:
    """Padding mask over keys from a 2D ``attention_mask`` ``(B, L)``: 1 = real token, 0 = padding.

    Accepts bool, int or float tensors, numpy arrays or nested lists; values other than 0 and 1 are an error.
    """
    m = _as_tensor("attention_mask", attention_mask)
    if m.dim() == 1:
        m = m.unsqueeze(0)
    if m.dim() != 2:
        raise bad(ShapeError, "attention_mask", "shape (B, L)", tuple(m.shape))
    if m.dtype != torch.bool:
        if m.is_complex():
            raise bad(SpecError, "attention_mask", "a real tensor of 0/1", f"dtype {m.dtype}")
        if m.numel() and not bool(((m == 0) | (m == 1)).all()):
            raise bad(
                SpecError,
                "attention_mask",
                "values 0 (padding) and 1 (real token)",
                f"values {sorted(set(m.unique().tolist()))[:5]}",
            )
        m = m.bool()
    return KeyPadding(m)


def bidirectional_blocks(block_ids: Any, device: torch.device | str | None = None) -> MaskSpec:
    """Blocks of tokens that see each other both ways: ``block_ids[b, q] == block_ids[b, k] >= 0``.

    ``block_ids``: ``(L,)`` or ``(B, L)`` ints, -1 = in no block. Not causal by itself: ``causal() |
    bidirectional_blocks(ids)`` lets the tokens of one block (an image) attend to each other in both directions and
    everything else causally, as transformers' ``block_sequence_ids``. Example: ids ``[-1, 0, 0, -1]``: query 1 sees
    key 2.
    """
    ids = document(doc_ids=block_ids, device=device).doc_ids
    return BidirectionalBlocks(ids)


def key_filter(input_ids: Any, ignored_ids: Any) -> MaskSpec:
    """Keys whose token id is one of ``ignored_ids`` are never attended (e.g. special tokens).

    ``input_ids``: ``(L,)`` or ``(B, L)`` ints; ``ignored_ids``: an int or a sequence of ints. Example:
    ``causal() & key_filter(ids, [tokenizer.bos_token_id])``. O(B·L) to build.
    """
    ids = _as_tensor("input_ids", input_ids)
    if ids.dtype == torch.bool or ids.is_floating_point() or ids.is_complex():
        raise bad(SpecError, "input_ids", "an integer tensor", f"dtype {ids.dtype}")
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    if ids.dim() != 2:
        raise bad(ShapeError, "input_ids", "shape (L,) or (B, L)", tuple(ids.shape))
    ignored = _as_row_vector("ignored_ids", ignored_ids).to(ids.device)
    return KeyFilter(~torch.isin(ids.long(), ignored), tuple(ignored.tolist()))


def document_prefix_lm(
    prefix_lens: Any,
    seq_lens: Any = None,
    *,
    doc_ids: Any = None,
    position_ids: Any = None,
    length: int | None = None,
    device: torch.device | str | None = None,
) -> MaskSpec:
    """Prefix-LM per document of packed rows: each document is bidirectional over its prefix and causal after it,
    and never sees another document.

    ``prefix_lens``: one prefix length per document, a list per row (``[[2, 0], [3]]``; a flat list for one row);
    lengths count positions inside the document (position space). Documents as in `document`: ``seq_lens`` or
    ``doc_ids`` (ids must number a row's documents 0, 1, ... in order). ``position_ids`` ``(B, L)`` optional: the
    position of each token in its document (default: its offset from the document's first token). A key ``k`` of a
    query's document is visible when ``k <= q`` or its position is below the document's prefix length. Returns
    ``document(...) & prefix_keys``. Example: ``document_prefix_lm([[2, 1]], [[3, 2]])``: query 0 sees keys 0, 1.
    """
    docs = document(seq_lens, doc_ids=doc_ids, length=length, device=device)
    ids = docs.doc_ids
    rows = _seq_lens_rows(prefix_lens)
    if len(rows) != ids.shape[0]:
        raise bad(ShapeError, "prefix_lens", f"one list per row ({ids.shape[0]} rows)", len(rows))
    width = max((len(r) for r in rows), default=0)
    table = torch.zeros((ids.shape[0], width + 1), dtype=torch.long, device=ids.device)
    for i, row in enumerate(rows):
        table[i, : len(row)] = torch.tensor(row, dtype=torch.long, device=ids.device)
    n_docs = int(ids.max()) + 1 if ids.numel() else 0
    if n_docs > width:
        raise bad(ShapeError, "prefix_lens", f"a length for each of {n_docs} documents", width)
    if position_ids is None:
        within = offsets_in_runs(ids)
    else:
        within = _check_positions("position_ids", torch.as_tensor(position_ids, device=ids.device), ids.shape[-1])
        within = within.expand_as(ids)
    in_prefix = (ids >= 0) & (within < torch.gather(table, 1, ids.clamp(min=0)))
    column = torch.arange(ids.shape[-1], device=ids.device).expand_as(ids)
    return docs & PrefixKeys(torch.where(in_prefix, column - offsets_in_runs(ids), column))


def custom(fn: MaskMod, name: str | None = None, *, heads: int | None = None) -> MaskSpec:
    """Wrap a predicate ``fn(b, h, q_pos, k_pos) -> bool tensor`` (FlexAttention's ``mask_mod`` convention).

    ``b``, ``q_pos``, ``k_pos`` are int64 tensors that broadcast against each other (the result must broadcast to
    their shape). ``heads=None`` (default): one mask for every head; a predicate that computes with ``h`` raises a
    ``SpecError`` (never evaluated for head 0 alone). ``heads=H``: a per-head spec, evaluated for every query head
    ``h in range(H)`` (``h`` an int64 tensor broadcasting with the others); its mask is ``(B, H, Q, K)``, it stays
    per-head under ``&``, ``|``, ``~`` with any other spec, and ``attention`` refuses q with another number of query
    heads (with grouped-query attention the mask is per *query* head). Example, a window per head::

        >>> w = torch.tensor([1, 2, 4, 8])
        >>> spec = causal() & custom(lambda b, h, q, k: q - k < w[h], heads=4)
        >>> spec.to_dense(8, per_head=True).shape
        torch.Size([1, 4, 8, 8])
    """
    if not callable(fn):
        raise bad(SpecError, "fn", "a callable (b, h, q, k) -> bool tensor", type(fn).__name__)
    return Custom(fn, name, _check_heads(heads))


def from_mask_mod(mask_mod: Callable, name: str | None = None, *, heads: int | None = None) -> MaskSpec:
    """A FlexAttention-style scalar ``mask_mod(b, h, q_idx, kv_idx) -> bool`` as is (attention-gym's mods).

    The mod is written for one element; it is vectorised with ``torch.vmap`` over the broadcast index tensors, as
    FlexAttention's ``create_block_mask`` does, and wrapped as ``custom`` (evaluated per element). ``q_idx`` /
    ``kv_idx`` are attnmask positions: with ``Q == K`` FlexAttention's indices; with ``Q < K`` the queries are the
    last positions. ``heads=None``: one mask for every head, and a mod that computes with ``h`` raises a
    ``SpecError`` (see ``Custom``); ``heads=H``: the mod is evaluated for every query head ``h in range(H)``, as
    ``custom(fn, heads=H)``. Example: ``from_mask_mod(lambda b, h, q, kv: q - kv <= h, heads=4)``.
    """
    if not callable(mask_mod):
        raise bad(SpecError, "mask_mod", "a callable (b, h, q_idx, kv_idx) -> bool", type(mask_mod).__name__)

    def fn(b, h, q, k):
        per_head = isinstance(h, torch.Tensor)
        shape = torch.broadcast_shapes(b.shape, q.shape, k.shape, *((h.shape,) if per_head else ()))
        if not math.prod(shape):
            return torch.zeros(shape, dtype=torch.bool, device=q.device)
        if per_head:
            flat = [torch.broadcast_to(t, shape).reshape(-1) for t in (b, h, q, k)]
            return torch.vmap(mask_mod)(*flat).view(shape)
        flat = [torch.broadcast_to(t, shape).reshape(-1) for t in (b, q, k)]
        return torch.vmap(lambda b1, q1, k1: mask_mod(b1, h, q1, k1))(*flat).view(shape)

    return custom(fn, name or getattr(mask_mod, "__name__", "mask_mod"), heads=heads)


def _check_heads(heads: Any) -> int | None:
    return None if heads is None else check_int("heads", heads, low=1, high=MAX_SIZE, error=SpecError)


# ----------------------------------------------------------------------------------------------------------------------
# Argument helpers


def _check_size(name: str, value: Any) -> int:
    return check_int(name, value, low=1, high=MAX_SIZE, error=SpecError)


def _as_tensor(name: str, value: Any, device: torch.device | str | None = None) -> torch.Tensor:
    """``torch.as_tensor(value)`` (a sparse tensor as its dense values), or a ``SpecError`` naming ``name`` for what
    torch cannot read (strings, ragged or mixed lists, ints beyond int64, nested tensors, a sparse tensor whose dense
    form does not fit in memory)."""
    if isinstance(value, (str, bytes)):
        raise bad(SpecError, name, "a tensor, an array or (nested) lists of numbers", type(value).__name__)
    value = dense_data(name, value, SpecError)  # a sparse tensor as its values, exactly; a nested one refused
    try:
        return torch.as_tensor(value, device=device)
    except (TypeError, ValueError, RuntimeError, OverflowError) as e:
        reason = str(e).splitlines()[0][:80] if str(e) else type(e).__name__
        expected = "a tensor, an array or (nested) lists of numbers"
        raise bad(SpecError, name, expected, f"{type(value).__name__} ({reason})") from None


def offsets_in_runs(ids: torch.Tensor) -> torch.Tensor:
    """Offset of every position from the start of its run of equal ids, ``(B, L)`` -> ``(B, L)`` int64.

    Example: ``[[0, 0, 0, 1, 1, -1]]`` gives ``[[0, 1, 2, 0, 1, 0]]``. O(B·L)."""
    column = torch.arange(ids.shape[-1], device=ids.device).expand_as(ids)
    starts = torch.ones_like(ids, dtype=torch.bool)
    starts[:, 1:] = ids[:, 1:] != ids[:, :-1]
    return column - torch.where(starts, column, 0).cummax(dim=-1).values


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise bad(SpecError, name, "an int >= 1", repr(value))


def _as_row_vector(name: str, value: Any) -> torch.Tensor:
    t = _as_tensor(name, value)
    if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
        raise bad(SpecError, name, "integers", f"dtype {t.dtype}")
    if t.dim() == 0:
        t = t.unsqueeze(0)
    if t.dim() != 1 or t.numel() == 0:
        raise bad(ShapeError, name, "an int or a (B,) vector with B >= 1", tuple(t.shape))
    return t.long()


def _seq_lens_rows(seq_lens: Any) -> list[list[int]]:
    if isinstance(seq_lens, torch.Tensor):
        seq_lens = _as_tensor("seq_lens", seq_lens).tolist()
    elif hasattr(seq_lens, "tolist"):
        seq_lens = seq_lens.tolist()
    if not isinstance(seq_lens, (list, tuple)):
        raise bad(SpecError, "seq_lens", "a list of lengths or a list of rows of lengths", type(seq_lens).__name__)
    nested = any(isinstance(x, (list, tuple)) for x in seq_lens)
    if nested and not all(isinstance(x, (list, tuple)) for x in seq_lens):
        expected = "a list of lengths or a list of rows of lengths, not both"
        raise bad(SpecError, "seq_lens", expected, short_repr(seq_lens))
    rows = [list(r) for r in seq_lens] if nested else [list(seq_lens)]
    for r in rows:
        for n in r:
            if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= MAX_SIZE:
                raise bad(SpecError, "seq_lens", f"int lengths in [0, {MAX_SIZE}]", short_repr(n))
    return rows
