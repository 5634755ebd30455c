"""Hugging Face transformers integration: an ``"attnmask"`` attention implementation, collators, step token counts.

One line plugs attnmask into any transformers model that uses the ``AttentionInterface``::

    >>> from attnmask.integrations import hf
    >>> hf.register()                                   # doctest: +SKIP
    >>> model = AutoModelForCausalLM.from_config(cfg, attn_implementation="attnmask")  # doctest: +SKIP

Per attention call, the mask is rebuilt as a *spec* from what transformers passes, never as an O(L^2) tensor:

- the module's ``is_causal`` (and the config's ``is_causal``) -> ``causal()``, or ``full()`` for bidirectional models;
- the layer's ``sliding_window`` (``w`` keys including the query itself, as transformers) -> ``sliding_window(w)``;
- transformers' bidirectional sliding window (ModernBERT's, Ultrabert's local layers: ``abs(q - k) <= w``, ``w`` read
  from its mask predicate) -> ``local_window(w, w)``, with documents and padding as for causal windows;
- the 2D padding mask ``(B, past + Q)`` -> ``key_padding(mask)`` (dropped when it is all ones);
- packed rows -> ``document(...)``: boundaries from ``seq_lens`` / ``cu_seq_lens_q`` kwargs when given, else from
  ``position_ids`` (a document starts wherever a position is not the previous one plus one, as in transformers'
  ``find_packed_sequence_indices``). Unlike transformers' own sdpa/eager path this also holds when an all-ones 2D mask
  or a (still empty) KV cache comes with packed ``position_ids`` (transformers PR #46634); padding gets document -1;
- chunked-attention layers (Llama4's ``attention_chunk_size``; transformers says so only to the mask call, as
  ``local_size``) -> chunks counted as transformers counts them: per document in position space on packed rows
  (folded into the document ids, so varlen runs per chunk), else after each row's left padding;
- a KV cache: the queries are the last ``Q`` positions (bottom-right), or the positions the cache reports (static
  caches). Documents are only detected when the keys are the queries' own (no cache content, no static-cache slots):
  a decoding step treats each row as one sequence.

To get the 2D padding mask and the cache geometry without transformers building a 4D mask, ``register`` also adds a
mask function to transformers' ``AttentionMaskInterface``; it returns an :class:`HFMaskInfo` (O(B·L) memory) that
the model hands back to the attention function in place of the 4D mask. ``attnmask.attention`` then picks the cheapest
exact backend (per-document ``varlen`` for packed rows). Limits: models whose masks add ``or``/``and`` overlays (e.g.
image tokens) are honoured through their predicate, per element (O(B·Q·K)), with the documents of packed rows added
when the call carries them;
transformers' own ``block_sequence_ids`` overlay (Gemma3 / PaliGemma image tokens) structurally, as
``| bidirectional_blocks(ids)``; additive position biases (T5) are not supported. Which rule a call follows (causal,
bidirectional, cross-attention) comes from transformers' mask (`HFMaskInfo.causal`), as in its own attention.
Score modifiers models pass (`PASSED_MODIFIERS`: Gemma2's
``softcap``, gpt-oss's sinks as ``s_aux``, or ``sinks``) go to ``attnmask.attention`` with the call, which chooses
among the backends that declare them. The attention function keeps an explicit list of the keywords it knows to be
harmless (`HARMLESS_KEYWORDS`); any other keyword, and a score modifier it cannot honour (`SCORE_MODIFIERS`:
``position_bias``) that is not None, raises ``BackendError`` naming it at the first forward, so a new transformers
version cannot slip a score change past it.

Models it cannot serve exactly are refused with a typed error at the first forward, never computed wrong:

- a model whose own code computes with the mask (``scores + mask``: BLOOM, MPT, XGLM, BigBird, Doge's dynamic mask,
  ...): ``MaskObjectError`` (from :class:`HFMaskInfo`, which is no tensor) naming the model type and the operation;
  a dense 4D mask carrying a score bias (values other than 0 and ``finfo.min``): ``BackendError``;
- packed rows in a model that mixes tokens outside attention (state-space, convolution, linear-attention layers:
  Falcon-H1, Qwen3-Next, LFM2, ...; `token_mixing_outside_attention` reads it from the config):
  ``UnsupportedModelError`` naming the layer type;
- packed rows whose boundaries reach neither the attention function nor transformers' mask (a model that does not
  hand ``position_ids`` to its attention, called with an attention_mask or a KV cache: GPT-BigCode, Persimmon, Llama4
  with ``use_cache=True``): found on the call stack (`enclosing_position_ids`, a few µs per call without
  boundaries) and refused with ``UnsupportedModelError``;
- packed rows whose documents start at another position than a sequence alone does (RoBERTa-family models count
  from ``padding_idx + 1``, a packing collator from 0; `position_offset_on_stack`): ``UnsupportedModelError``.

Also here: :class:`DataCollatorForCausalLM` (padding or packing, completion-only labels) for the ``Trainer`` and plain
loops, and :func:`num_items_in_step` (the target count of an optimizer step, for ``masked_cross_entropy``).
"""

from __future__ import annotations

import functools
import logging
import sys
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from attnmask import plancache
from attnmask._checks import short_repr
from attnmask.attention import attention
from attnmask.batch import Batch, Collator
from attnmask.errors import BackendError, InputError, MaskObjectError, ShapeError, UnsupportedModelError, bad
from attnmask.integrations.ranks import global_num_items
from attnmask.masks import (
    MaskSpec,
    bidirectional_blocks,
    causal,
    chunked,
    custom,
    document,
    full,
    key_padding,
    local_window,
    offsets_in_runs,
    sliding_window,
)

__all__ = [
    "ATTN_IMPLEMENTATION",
    "DataCollatorForCausalLM",
    "HFMaskInfo",
    "attention_forward",
    "build_mask_info",
    "check_packed_inputs",
    "document_ids_from_position_ids",
    "enclosing_position_ids",
    "num_items_in_step",
    "position_offset_on_stack",
    "register",
    "spec_for_call",
    "token_mixing_outside_attention",
]

ATTN_IMPLEMENTATION = "attnmask"
logger = logging.getLogger("attnmask")
_registered_names: set[str] = set()  # every name register() gave attnmask's attention


# ----------------------------------------------------------------------------------------------------------------------
# What the mask interface hands to the attention function


@dataclass(frozen=True, eq=False)
class HFMaskInfo:
    """The mask transformers would have built, described instead of materialised: O(B·L) memory, not O(B·Q·K).

    - ``padding``: ``(B, kv_length)`` bool, True = real key, for the keys of this call (already sliced to the cache
      window and padded with False past the given mask, as transformers does); ``None`` when every key is real.
    - ``q_length``, ``kv_length``: the attention call's query and key counts.
    - ``q_offset``, ``kv_offset``: absolute position of the first query and of the first key. Without a cache both
      are 0; with a dynamic cache ``q_offset = past`` and ``kv_offset = 0`` (or the start of the sliding window).
    - ``mask_function``: transformers' predicate ``(b, h, q, k) -> bool`` on absolute positions. Only consulted when
      ``overlay`` is True (a model added and/or mask functions, e.g. image tokens): then the mask is evaluated per
      element, O(B·Q·K).
    - ``chunk_size``: set for the mask of chunked-attention layers (Llama4's ``attention_chunk_size``): a query sees
      keys of its own chunk only. ``left_padding``: ``(B,)`` int64, the leading padding of every row of the full 2D
      mask, which chunks start after (as transformers' ``chunked_overlay``); ``None`` when there is no mask.
    - ``position_ids``: ``(B, L)``, the packed rows' positions when transformers found packed sequences (it tells the
      mask function only, inside its predicate); the documents of models that do not hand ``position_ids`` to their
      attention function (Llama4) come from them.
    - ``block_ids``: ``(B, kv_length)`` int64, transformers' ``block_sequence_ids`` for the keys of this call (sliced
      like ``padding``, -1 past the given ids): tokens of one block (an image) attend to each other both ways, on top
      of the causal rule (``| bidirectional_blocks``).

    - ``model_type``: the config's ``model_type``, named by the errors below.
    - ``causal``: whether transformers built a causal mask (its predicate holds ``causal_mask_function``: causal,
      sliding-window and chunked masks) or a bidirectional one (``bidirectional_mask_function``: encoders,
      cross-attention), ``None`` when it holds neither or adds and/or overlays. The attention function follows it
      over the module's ``is_causal`` flag, as transformers' eager and sdpa follow the mask (BigBird-Pegasus and
      NLLB-MoE build their decoder self-attention ``is_causal=False``).
    - ``bidirectional_window``: ``w`` when the predicate is transformers' bidirectional sliding window
      (``sliding_window_bidirectional_overlay(w)``: ``abs(q - k) <= w``, ModernBERT's and Ultrabert's local layers,
      without and/or overlays), read from its closure; the attention function then builds ``local_window(w, w)``.

    Example: decoding one token after a 5-token prompt with a dynamic cache gives ``q_length=1, kv_length=6,
    q_offset=5, kv_offset=0``. Transformers treats it as an already-prepared 4D mask (``ndim == 4``) when
    ``generate`` builds masks ahead of the forward (compilable caches).

    It is no tensor: a model whose own code computes with the mask (``scores + mask``, ``mask.size()``,
    ``masked_fill(mask, ...)``, ``mask[..., :k]``: models whose attention does not go through transformers'
    ``AttentionInterface``, e.g. BLOOM, MPT, XGLM) gets a ``MaskObjectError`` naming the model type and the operation
    at its first forward, from ``__torch_function__`` (torch dispatches every torch function and tensor operator that
    meets the object to it) and from the operators and attribute lookups below; never a raw ``TypeError``.
    """

    padding: torch.Tensor | None
    q_length: int
    kv_length: int
    q_offset: int = 0
    kv_offset: int = 0
    mask_function: Callable | None = None
    overlay: bool = False
    chunk_size: int | None = None
    left_padding: torch.Tensor | None = None
    position_ids: torch.Tensor | None = None
    block_ids: torch.Tensor | None = None
    model_type: str | None = None
    causal: bool | None = None
    bidirectional_window: int | None = None

    ndim = 4  # read by transformers' mask preprocessing: "already prepared, pass it through"

    @property
    def shape(self) -> tuple[int, int, int, int]:
        rows = 1 if self.padding is None else self.padding.shape[0]
        return (rows, 1, self.q_length, self.kv_length)

    @property
    def has_past(self) -> bool:
        """Whether there are keys besides the queries' own (a cache's past tokens, static-cache slots)."""
        return self.q_offset != self.kv_offset or self.q_length != self.kv_length

    def contiguous(self) -> HFMaskInfo:
        return self

    def to(self, *args, **kwargs) -> HFMaskInfo:
        return self

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        found = [a for a in (*args, *(kwargs or {}).values()) if isinstance(a, HFMaskInfo)]
        name = getattr(func, "__qualname__", None) or getattr(func, "__name__", repr(func))
        raise _mask_used_as_tensor(found[0].model_type if found else None, f"torch's {name}")

    def __getattr__(self, name: str) -> Any:  # only reached for names the dataclass does not define
        # read through __dict__: during copy / unpickling the fields are not set yet, and self.model_type would recurse
        raise _mask_used_as_tensor(self.__dict__.get("model_type"), f"the tensor attribute .{name}")


def _mask_used_as_tensor(model_type: str | None, use: str) -> MaskObjectError:
    who = f"model type {model_type!r}" if model_type else "a model"
    return bad(
        MaskObjectError,
        "attention_mask",
        "a model that hands the mask untouched to its attention function through transformers' AttentionInterface "
        "(attnmask gives its layers a mask description, HFMaskInfo, not a tensor)",
        f"{who} using {use} on it in its own attention code; run it with attn_implementation='eager' or 'sdpa'",
    )


def _refuse_operator(name: str) -> Callable:
    def operator(self: HFMaskInfo, *args: Any) -> Any:
        raise _mask_used_as_tensor(self.model_type, f"the operator {name}")

    operator.__name__ = name
    return operator


for _name in (
    "__add__ __radd__ __sub__ __rsub__ __mul__ __rmul__ __truediv__ __rtruediv__ __and__ __rand__ __or__ __ror__ "
    "__xor__ __rxor__ __invert__ __neg__ __lt__ __le__ __gt__ __ge__ __getitem__ __iter__ __float__ __int__ __index__"
).split():
    setattr(HFMaskInfo, _name, _refuse_operator(_name))


def build_mask_info(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int | torch.Tensor = 0,
    kv_offset: int | torch.Tensor = 0,
    mask_function: Callable | None = None,
    attention_mask: torch.Tensor | HFMaskInfo | None = None,
    use_vmap: bool = False,
    **kwargs: Any,
) -> HFMaskInfo:
    """transformers ``AttentionMaskInterface`` function: describe the mask instead of building it.

    ``attention_mask`` is the 2D padding mask ``(B, past + Q)`` (bool, True = real) or ``None``. Returns an
    :class:`HFMaskInfo`; an ``HFMaskInfo`` given as ``attention_mask`` (prepared earlier by ``generate``) is returned
    as is. O(B·L) time and memory.
    """
    if isinstance(attention_mask, HFMaskInfo):
        return attention_mask
    q_offset, kv_offset = int(q_offset), int(kv_offset)
    chunk_size, overlay = _chunk_size(kwargs.get("config"), kwargs.get("local_size"))
    padding = left_padding = None
    if attention_mask is not None:
        if chunk_size is not None:  # counted on the whole 2D mask, before the cache window slices it
            left_padding = (attention_mask.long().cumsum(dim=-1) == 0).sum(dim=-1)
        padding = attention_mask.bool()
        missing = kv_offset + kv_length - padding.shape[-1]
        if missing > 0:  # e.g. a static cache longer than the tokens seen: the unused slots are not real keys
            padding = torch.nn.functional.pad(padding, (0, missing), value=False)
        padding = padding[:, kv_offset : kv_offset + kv_length]
        if bool(padding.all()):
            padding = None
    overlay = overlay or bool(use_vmap)
    packed = blocks = None
    if attention_mask is None and mask_function is not None:
        packed = _closure_tensor(mask_function, "position_ids")
    if not overlay and mask_function is not None:
        blocks = _closure_tensor(mask_function, "block_sequence_ids")
        if blocks is not None:
            missing = kv_offset + kv_length - blocks.shape[-1]
            if missing > 0:
                blocks = torch.nn.functional.pad(blocks, (0, missing), value=-1)
            blocks = blocks[:, kv_offset : kv_offset + kv_length].long()
    return HFMaskInfo(
        padding,
        q_length,
        kv_length,
        q_offset,
        kv_offset,
        mask_function,
        overlay,
        chunk_size,
        left_padding,
        packed,
        blocks,
        getattr(kwargs.get("config"), "model_type", None),
        None if overlay or mask_function is None else _mask_rule(mask_function),
        None if overlay or mask_function is None else _bidirectional_window(mask_function),
    )


def _mask_rule(fn: Callable, depth: int = 0) -> bool | None:
    """True when transformers' mask predicate ``fn`` is built on its ``causal_mask_function``, False when on its
    ``bidirectional_mask_function``, else ``None`` (looked up in the predicates' closures, never called)."""
    utils = sys.modules.get("transformers.masking_utils")
    if utils is None or depth > 8:
        return None
    if fn is getattr(utils, "causal_mask_function", None):
        return True
    if fn is getattr(utils, "bidirectional_mask_function", None):
        return False
    for cell in getattr(fn, "__closure__", None) or ():
        try:
            value = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        for item in value if isinstance(value, tuple) else (value,):
            found = _mask_rule(item, depth + 1) if callable(item) else None
            if found is not None:
                return found
    return None


def _search_closures(fn: Callable, match: Callable[[Any, dict[str, Any]], Any], depth: int = 0) -> Any:
    """The first result that is not ``None`` of ``match(code, free_variables)`` on ``fn`` and the predicates nested
    in its closure (transformers' and/or combinators nest them; depth first, at most 8 levels), else ``None``.
    ``free_variables``: the closure's cells by name, empty ones left out. Read, never called."""
    code, cells = getattr(fn, "__code__", None), getattr(fn, "__closure__", None)
    if code is None or cells is None or depth > 8:
        return None
    values = {}
    for var, cell in zip(code.co_freevars, cells, strict=True):
        try:
            values[var] = cell.cell_contents
        except ValueError:  # an empty cell
            continue
    found = match(code, values)
    if found is not None:
        return found
    for value in values.values():
        for item in value if isinstance(value, tuple) else (value,):
            found = _search_closures(item, match, depth + 1) if callable(item) else None
            if found is not None:
                return found
    return None


def _bidirectional_window(fn: Callable) -> int | None:
    """``w`` when transformers' mask predicate ``fn`` holds its ``sliding_window_bidirectional_overlay(w)`` (the
    predicate ``abs(q - k) <= w``, recognised by its code object), else ``None``. Read, never called."""
    overlay = getattr(sys.modules.get("transformers.masking_utils"), "sliding_window_bidirectional_overlay", None)
    if overlay is None:
        return None
    overlay_code = overlay(1).__code__

    def window_of(code: Any, values: dict[str, Any]) -> int | None:
        if code is not overlay_code:
            return None
        window = values.get("sliding_window")
        if isinstance(window, bool) or not isinstance(window, int) or window < 0:
            raise bad(BackendError, "sliding_window", "an int >= 0 in a bidirectional window mask", repr(window))
        return window

    return _search_closures(fn, window_of)


def _closure_tensor(fn: Callable, name: str) -> torch.Tensor | None:
    """The 2D tensor a transformers mask predicate holds under the free variable ``name`` (its and/or combinators
    nest predicates in closures), or ``None``. transformers' packed-sequence predicate is the only one of its mask
    builders that captures ``position_ids``, its block overlay the only one that captures ``block_sequence_ids``;
    they are read, never called. O(size of the predicate tree)."""

    def tensor(code: Any, values: dict[str, Any]) -> torch.Tensor | None:
        value = values.get(name)
        return value if isinstance(value, torch.Tensor) and value.dim() == 2 else None

    return _search_closures(fn, tensor)


def _packed_inner_predicate(fn: Callable) -> Callable | None:
    """The predicate transformers' packed-rows remap wraps (``remap_positions_for_packed_sequence``: the closure that
    holds both ``mask_function`` and ``position_ids``) inside ``fn``, or ``None``. Read, never called."""

    def wrapped(code: Any, values: dict[str, Any]) -> Callable | None:
        if callable(values.get("mask_function")) and isinstance(values.get("position_ids"), torch.Tensor):
            return values["mask_function"]
        return None

    return _search_closures(fn, wrapped)


def _chunk_size(config: Any, local_size: Any) -> tuple[int | None, bool]:
    """The chunk of a chunked-attention mask call, and whether the call must fall back to the model's predicate.

    transformers tells the mask function nothing but ``local_size``: the chunk size for ``create_chunked_causal_mask``
    and the window for sliding-window masks. It is a chunk when it equals the config's ``attention_chunk_size``; when
    the config's ``sliding_window`` has the same value the two cannot be told apart, and the model's own predicate is
    evaluated per element instead (exact, O(B·Q·K))."""
    chunk = getattr(config, "attention_chunk_size", None)
    if local_size is None or chunk is None or int(local_size) != int(chunk):
        return None, False
    if getattr(config, "sliding_window", None) == chunk:
        return None, True
    return int(chunk), False


# ----------------------------------------------------------------------------------------------------------------------
# Documents of packed rows


def document_ids_from_position_ids(
    position_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor | None:
    """Document id of every position of packed rows, or ``None`` when no row holds more than one document.

    ``position_ids``: ``(B, L)`` (or ``(1, L)``, broadcast to ``attention_mask``'s rows). A document starts at column 0
    and wherever ``position_ids[b, t] != position_ids[b, t - 1] + 1``. ``attention_mask`` ``(B, L)`` (True = real
    token) optional: padding gets id -1 (in no document) and does not count as a document. Example: positions
    ``[0, 1, 2, 0, 1, 0, 0]`` with mask ``[1, 1, 1, 1, 1, 0, 0]`` give ``[0, 0, 0, 1, 1, -1, -1]``.
    Left padding as ``generate`` makes it (positions ``[0, 0, 0, 1, 2]``, mask ``[0, 0, 1, 1, 1]``) is one document.
    O(B·L); one host sync to decide whether any row is packed.
    """
    if position_ids.dim() != 2:
        raise bad(ShapeError, "position_ids", "shape (B, L)", tuple(position_ids.shape))
    if attention_mask is not None and position_ids.shape[0] != attention_mask.shape[0]:
        position_ids = position_ids.expand(attention_mask.shape[0], -1)
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    if attention_mask is not None:
        real = attention_mask.bool()
        first_real = real & (real.long().cumsum(dim=1) == 1)  # a row's first real token always opens a document
        starts = (starts & real) | first_real
    if not bool((starts.sum(dim=1) > 1).any()):
        return None
    ids = starts.long().cumsum(dim=1) - 1
    if attention_mask is not None:
        ids = ids.masked_fill(~real, -1)
    return ids


class _LastDocuments:
    """One-entry memo: every layer of a forward sees the same ``position_ids``; detect documents once per forward.

    An entry is reused only for the very same tensors (held by weak references, never by ``id()``, which a freed
    tensor hands on to the next allocation) at the same ``_version`` (unchanged in place).
    """

    def __init__(self) -> None:
        self._refs: tuple = ()
        self._versions: tuple = ()
        self._value: torch.Tensor | None = None
        self._lock = threading.Lock()

    def get(self, position_ids: torch.Tensor, padding: torch.Tensor | None) -> torch.Tensor | None:
        tensors = (position_ids,) if padding is None else (position_ids, padding)
        if any(t.is_inference() for t in tensors):
            return document_ids_from_position_ids(position_ids, padding)  # no version counter: nothing to key on
        versions = tuple(t._version for t in tensors)
        with self._lock:
            same = len(self._refs) == len(tensors) and all(r() is t for r, t in zip(self._refs, tensors, strict=True))
            if same and self._versions == versions:
                return self._value
        value = document_ids_from_position_ids(position_ids, padding)
        with self._lock:
            self._refs, self._versions, self._value = tuple(weakref.ref(t) for t in tensors), versions, value
        return value


_documents_memo = _LastDocuments()


class _RecentSpecs:
    """The spec objects of the last few distinct calls, so that every layer of one forward hands ``attention`` the
    SAME spec object, whose plans (``attnmask.plancache``) are then made once per forward instead of once per layer.

    A spec is reused when the call's settings are equal and its input tensors are the same objects, unchanged
    (``_version``; held weakly, since a freed tensor's id can be reused). Inference-mode tensors have no version
    counter: there the entry keeps copies of their contents and compares them, where they take at most
    ``plancache.SNAPSHOT_MAX_BYTES`` (generation under ``torch.inference_mode``: one spec, and one plan, per step for
    every layer); larger ones build their spec every time. Keeps ``size`` specs (full-attention and sliding-window
    layers make two per forward) and through them their padding masks and document ids, O(B·L) each.
    """

    def __init__(self, size: int = 4) -> None:
        self._size = size
        self._entries: OrderedDict = OrderedDict()  # key -> (weak refs to the tensors, spec)
        self._lock = threading.Lock()

    def get(self, settings: tuple, tensors: tuple, build: Callable[[], MaskSpec]) -> MaskSpec:
        present = [t for t in tensors if t is not None]
        inference = any(t.is_inference() for t in present)  # no version counters: compared by contents, where small
        mark = (lambda t: (id(t), "contents")) if inference else (lambda t: (id(t), t._version))
        key = (settings, tuple(None if t is None else mark(t) for t in tensors))
        with self._lock:
            hit = self._entries.get(key)
            if hit is not None and all(ref() is t for ref, t in zip(hit[0], present, strict=True)):
                if hit[2] is None or plancache.unchanged(present, hit[2]):
                    self._entries.move_to_end(key)
                    return hit[1]
        snapshots = plancache.snapshot(present) if inference else None
        if inference and snapshots is None:
            return build()
        spec = build()
        with self._lock:
            self._entries[key] = (tuple(weakref.ref(t) for t in present), spec, snapshots)
            self._entries.move_to_end(key)
            while len(self._entries) > self._size:
                self._entries.popitem(last=False)
        return spec


_recent_specs = _RecentSpecs()


def _frozen(value: Any) -> Any:
    """Nested lists / tuples of ints as nested tuples (a hashable memo key), or ``_UNHASHABLE``."""
    if isinstance(value, (list, tuple)):
        items = tuple(_frozen(v) for v in value)
        return _UNHASHABLE if _UNHASHABLE in items else items
    return value if isinstance(value, int) else _UNHASHABLE


_UNHASHABLE = object()


def _documents_spec(
    kwargs: dict, info: HFMaskInfo | None, shape: tuple[int, int], padding: torch.Tensor | None, device: torch.device
) -> tuple[MaskSpec | None, bool]:
    """``document(...)`` for the rows of a call without past keys, or ``None`` (then ``key_padding`` applies), and
    whether the rows are packed (documents from the call's boundaries rather than one per padded row).

    Packed rows: from ``seq_lens``, ``cu_seq_lens_q`` or ``position_ids`` (in that order). A padded batch of single
    sequences becomes one document per row with padding in none (``doc_ids = mask - 1``): the real queries see the
    same keys as under ``key_padding``, padding queries see none (exactly 0; their outputs are never used), and the
    form is one varlen backends take. ``shape``: ``(B, Q)``.
    """
    if info is not None and info.has_past:
        return None, False  # decoding: documents of past keys are not known; rows are single sequences
    batch, q_len = shape
    seq_lens = kwargs.get("seq_lens")
    if seq_lens is not None:
        return document(seq_lens=seq_lens, length=q_len, device=device), True
    cu = kwargs.get("cu_seq_lens_q")
    if cu is not None:
        if batch != 1 or int(cu[-1]) != q_len:
            raise bad(ShapeError, "cu_seq_lens_q", f"one flattened row whose lengths sum to {q_len}", cu.tolist())
        return document(seq_lens=torch.diff(cu).tolist(), length=q_len, device=device), True
    pos = kwargs.get("position_ids")
    ids = None
    if pos is not None and pos.dim() == 2 and pos.shape[-1] == q_len:
        ids = _documents_memo.get(pos, padding)
    if ids is None:
        return (None if padding is None else document(doc_ids=padding.long() - 1)), False
    return document(doc_ids=ids.expand(batch, -1) if ids.shape[0] != batch else ids), True


def _packed_documents(
    kwargs: dict,
    info: HFMaskInfo | None,
    shape: tuple[int, int],
    padding: torch.Tensor | None,
    device: torch.device,
    config: Any,
) -> tuple[MaskSpec | None, bool]:
    """`_documents_spec`, with packed rows refused where the model cannot keep them apart or does not embed each
    document as alone (``UnsupportedModelError``: mixing outside attention, offset or self-numbered positions)."""
    documents, packed = _documents_spec(kwargs, info, shape, padding, device)
    if packed:
        _refuse_packed_rows(config, "documents from seq_lens, cu_seq_lens_q or position_ids")
        _refuse_offset_positions(config, kwargs.get("position_ids"), documents)
        _refuse_ignored_positions(config, kwargs.get("position_ids"))
    return documents, packed


def _chunked_documents(
    documents: MaskSpec, size: int, packed: bool, position_ids: Any, left_padding: torch.Tensor | None, first: int = 0
) -> MaskSpec:
    """``documents & chunked(...)`` as one ``document`` spec whose ids are the (document, chunk) pairs, so that every
    backend, varlen included, runs it per chunk.

    Chunks are counted as transformers counts them: in position space per document on packed rows (its packed-mask
    path evaluates the chunk predicate on ``position_ids``; without them, on the position inside the document), else
    on the absolute column (``first``: that of the first key) minus the row's left padding (``chunked_overlay``).
    Example, ``size=2``, packed positions ``[0, 1, 2, 0, 1]``: ids ``[0, 0, 1, 2, 2]``. O(B·L).
    """
    ids = documents.doc_ids
    column = torch.arange(first, first + ids.shape[-1], device=ids.device).expand_as(ids)
    if packed and isinstance(position_ids, torch.Tensor) and position_ids.shape[-1] == ids.shape[-1]:
        within = position_ids.to(ids.device).expand_as(ids)
    elif packed:
        within = offsets_in_runs(ids)
    else:
        within = column if left_padding is None else column - left_padding.to(ids.device).view(-1, 1)
    inside = ids >= 0
    chunk = torch.div(within, size, rounding_mode="floor")
    if not bool(inside.any()):
        return documents
    chunk = chunk - chunk[inside].min()
    pairs = ids * (int(chunk[inside].max()) + 1) + chunk
    return document(doc_ids=torch.where(inside, pairs, -1))


def _chunks_on_keys(size: int, info: HFMaskInfo, batch: int, device: torch.device) -> MaskSpec:
    """``chunked(size)`` on the key positions of a call (relative to ``info.kv_offset``, e.g. with a cache): chunks
    start after each row's left padding, counted on absolute columns as transformers does."""
    left = info.left_padding
    if left is None and info.kv_offset == 0:
        return chunked(size)
    left = torch.zeros(batch, dtype=torch.long, device=device) if left is None else left.to(device).long()
    return chunked(size, offsets=left - info.kv_offset)


# ----------------------------------------------------------------------------------------------------------------------
# Packed rows a model's attention cannot keep apart

# Words that name token mixing outside softmax attention in transformers' per-layer type lists (``layer_types``,
# ``layers_block_type``, ``block_types``) and in config attribute names (``mamba_d_state``, ``conv_L_cache``, ...).
_MIXING_WORDS = ("mamba", "ssm", "linear", "conv", "recurrent", "rwkv", "hybrid", "lstm", "delta", "retention")
_LAYER_LISTS = ("layer_types", "layers_block_type", "block_types")
_mixing_verdicts: dict[int, tuple[weakref.ref, str | None]] = {}
_mixing_lock = threading.Lock()


def token_mixing_outside_attention(config: Any) -> str | None:
    """What in ``config`` mixes tokens outside attention (a state-space, convolution, recurrent or linear-attention
    layer), in words, or ``None``. No attention mask can cut such mixing at the documents of a packed row.

    Read from the config only: an entry of its per-layer type lists (``layer_types``, ``layers_block_type``,
    ``block_types``) or a set attribute (``mamba_d_state``, ``conv_L_cache``, ``linear_conv_kernel_dim``, ...) whose
    name holds one of ``_MIXING_WORDS``. Example: Qwen3-Next's ``layer_types`` entry ``'linear_attention'``.
    Cached per config object (its layer lists do not change after the model is built).
    """
    if config is None:
        return None
    key = id(config)
    with _mixing_lock:
        hit = _mixing_verdicts.get(key)
        if hit is not None and hit[0]() is config:
            return hit[1]
    verdict = _find_mixing(config)
    with _mixing_lock:
        for stale in [k for k, (ref, _) in _mixing_verdicts.items() if ref() is None]:
            del _mixing_verdicts[stale]
        _mixing_verdicts[key] = (weakref.ref(config), verdict)
    return verdict


def _find_mixing(config: Any) -> str | None:
    for name in _LAYER_LISTS:
        entries = getattr(config, name, None)
        for entry in entries if isinstance(entries, (list, tuple)) else ():
            if isinstance(entry, str) and any(word in entry.lower() for word in _MIXING_WORDS):
                return f"{name} entry {entry!r}"
    for name, value in sorted(vars(config).items()):
        if value and not name.startswith("_") and any(word in name.lower() for word in _MIXING_WORDS):
            return f"config attribute {name}={value!r}"
    return None


def _refuse_packed_rows(config: Any, how: str) -> None:
    """Raise ``UnsupportedModelError`` for packed rows (``how``: where their documents were found) when the model
    mixes tokens outside attention."""
    mixing = token_mixing_outside_attention(config)
    if mixing is not None:
        model_type = getattr(config, "model_type", None)
        raise bad(
            UnsupportedModelError,
            "position_ids",
            f"one sequence per row for model type {model_type!r}, which mixes tokens outside attention ({mixing}): "
            "no attention mask can keep the documents of a packed row apart there; pad them into separate rows",
            f"packed rows ({how})",
        )


_FRAMES_SEARCHED = 40
_BOUNDS = ("position_ids", "seq_lens", "cu_seq_lens_q")  # keywords that tell an attention call its documents


def enclosing_position_ids(length: int, depth: int | None = None) -> torch.Tensor | None:
    """The ``(B, length)`` or ``(length,)`` ``position_ids`` tensor of the nearest enclosing module ``forward`` on
    the call stack (a local of that name), or ``None``: the positions the model embeds, e.g. packed positions a model
    took in its forward but did not hand to its attention, or positions it numbered itself (BART's decoder). Frames
    are skipped on their code object (name ``forward``, ``position_ids`` among its variables) before their locals
    are read. ``depth``: frames searched (``_FRAMES_SEARCHED`` by default). O(depth); a few µs
    (``benchmarks/bench_hf_overhead.py``).
    """
    for value in _enclosing_locals("position_ids", depth):
        if isinstance(value, torch.Tensor) and value.dim() in (1, 2) and value.shape[-1] == length:
            return value
    return None


def _enclosing_locals(name: str, depth: int | None = None) -> Iterable[Any]:
    """The values of the local ``name`` in the enclosing module ``forward`` frames, innermost first (frames whose
    code has no such variable are skipped before their locals are read)."""
    frame = sys._getframe(1)
    for _ in range(_FRAMES_SEARCHED if depth is None else depth):
        frame = frame.f_back
        if frame is None:
            return
        code = frame.f_code
        if code.co_name == "forward" and name in code.co_varnames:
            yield frame.f_locals.get(name)


def position_offset_on_stack(depth: int | None = None) -> int:
    """The first position of a sequence in the model whose ``forward`` encloses this call: ``padding_idx + 1`` when
    its learned position embedding reserves a padding row (RoBERTa, XLM-R, CamemBERT, Data2Vec-Text, ESM, ...,
    which number a sequence's positions from there), else 0. Read from the ``embeddings.position_embeddings`` of the
    ``self`` of enclosing ``forward`` frames. O(depth)."""
    for owner in _enclosing_locals("self", depth):
        table = getattr(getattr(owner, "embeddings", None), "position_embeddings", None)
        if isinstance(table, torch.nn.Embedding):
            return 0 if table.padding_idx is None else int(table.padding_idx) + 1
    return 0


def _refuse_offset_positions(config: Any, position_ids: Any, documents: MaskSpec) -> None:
    """Raise ``UnsupportedModelError`` when the documents of packed rows start at a position other than the one a
    sequence alone starts at in this model (`position_offset_on_stack`): a RoBERTa-family model given positions that
    restart at 0 (a packing collator's) embeds every document at other positions than alone, silently."""
    ids = documents.doc_ids
    if not isinstance(position_ids, torch.Tensor) or position_ids.shape[-1] != ids.shape[-1]:
        return
    first = position_offset_on_stack()
    if first == 0:
        return
    starts = torch.ones_like(ids, dtype=torch.bool)
    starts[:, 1:] = ids[:, 1:] != ids[:, :-1]
    given = position_ids.to(ids.device).expand_as(ids)[starts & (ids >= 0)]
    if bool((given != first).any()):
        model_type = getattr(config, "model_type", None)
        raise bad(
            UnsupportedModelError,
            "position_ids",
            f"every document of a packed row to start at position {first}, where model type {model_type!r} starts a "
            "sequence alone (its position embedding reserves padding_idx and counts from padding_idx + 1)",
            f"documents starting at {sorted(set(given.tolist()))[:8]}",
        )


def _refuse_ignored_positions(config: Any, position_ids: Any) -> None:
    """Raise ``UnsupportedModelError`` when the packed rows' ``position_ids`` ``(B, L)`` (which the attention was
    given) are not the positions the model embeds: an enclosing forward numbers positions of its own (BART-family
    decoders: ``arange(L)`` over the whole row), so every document after the first is embedded at other positions
    than alone."""
    if not isinstance(position_ids, torch.Tensor):
        return
    embedded = next((v for v in _enclosing_locals("position_ids") if isinstance(v, torch.Tensor)), None)
    if embedded is None or embedded is position_ids:
        return
    if not embedded.is_floating_point():  # else: the name now holds the position embeddings the model made itself
        if embedded.dim() not in (1, 2) or embedded.shape[-1] != position_ids.shape[-1]:
            return  # positions of another form (e.g. multimodal rotary sections): not comparable
        if embedded.device == position_ids.device and torch.equal(embedded.expand_as(position_ids), position_ids):
            return
    model_type = getattr(config, "model_type", None)
    raise bad(
        UnsupportedModelError,
        "position_ids",
        f"positions the model embeds; model type {model_type!r} numbers the positions of a row itself, so the "
        "documents of a packed row are not embedded as each alone: pad them into separate rows",
        f"packed position_ids, where the model embeds {short_repr(embedded.tolist())}"
        if not embedded.is_floating_point()
        else "packed position_ids, where the model embeds positions it numbered itself",
    )


def _refuse_hidden_boundaries(config: Any, q_len: int, padding: torch.Tensor | None) -> None:
    """For a call that carries no document boundaries and no past keys: raise ``UnsupportedModelError`` when an
    enclosing forward holds packed ``position_ids`` (restarting inside a row; padding ``(B, L)`` True = real) that
    neither the attention function nor transformers' mask was told about. Computing the call as one sequence per row
    would let tokens attend across documents."""
    position_ids = enclosing_position_ids(q_len)
    if position_ids is None or position_ids.dim() != 2 or _documents_memo.get(position_ids, padding) is None:
        return
    _refuse_packed_rows(config, "position_ids restart inside a row")
    model_type = getattr(config, "model_type", None)
    raise bad(
        UnsupportedModelError,
        "position_ids",
        f"document boundaries that reach the attention; model type {model_type!r} does not hand the packed rows' "
        "position_ids to its attention function, and transformers tells its mask about packed rows only when the "
        "model hands it position_ids, with no attention_mask and no KV cache: pass use_cache=False and no "
        "attention_mask (as attnmask's packing collators do), or pad the documents into separate rows",
        "packed rows (position_ids restart inside a row) with no boundaries at the attention call",
    )


# ----------------------------------------------------------------------------------------------------------------------
# The mask spec of one attention call


def spec_for_call(
    *,
    is_causal: bool = True,
    window: int | None = None,
    padding: torch.Tensor | None = None,
    documents: MaskSpec | None = None,
    chunks: MaskSpec | None = None,
    bidirectional_window: int | None = None,
) -> MaskSpec:
    """The mask spec of one call: ``causal() | sliding_window(w) | local_window(r, r) | full()`` & documents & key
    padding [& chunks].

    ``window``: keys per query including itself (transformers' ``sliding_window``); implies causal.
    ``bidirectional_window``: ``r`` of transformers' bidirectional sliding window, keys within ``r`` positions on
    either side (``abs(q - k) <= r``, inclusive) -> ``local_window(r, r)``; only for a bidirectional call.
    ``padding``: ``(B, K)`` True = real key. ``documents``: a ``document(...)`` spec; positions outside every document
    attend to nothing, so padding is then already excluded. ``chunks``: a ``chunked(...)`` spec (chunked-attention
    layers with a cache; without one the chunks are folded into ``documents``). Example: ``spec_for_call(window=3)``
    is ``sliding_window(3)``.
    """
    if window is not None and not is_causal:
        wanted = "a causal layer (a bidirectional window comes from transformers' mask: bidirectional_window=)"
        raise bad(BackendError, "sliding_window", wanted, window)
    if bidirectional_window is not None:
        if is_causal or window is not None:
            wanted = "a bidirectional call without a causal sliding_window"
            raise bad(BackendError, "bidirectional_window", wanted, f"is_causal={is_causal}, sliding_window={window}")
        spec = local_window(int(bidirectional_window), int(bidirectional_window))
    else:
        spec = sliding_window(int(window)) if window is not None else (causal() if is_causal else full())
    if documents is not None:
        spec = spec & documents
    if padding is not None and documents is None:
        spec = spec & key_padding(padding)
    if chunks is not None:
        spec = spec & chunks
    return spec


# ----------------------------------------------------------------------------------------------------------------------
# The attention function


def attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: HFMaskInfo | torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    *,
    backend: str = "auto",
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: ``query (B, H, Q, D)``, ``key``/``value`` ``(B, Hkv, K, D)`` ->
    ``(attn_output (B, Q, H, D), None)``.

    The mask spec is built by :func:`spec_for_call` from the module and the call (see the module docstring) and handed
    to ``attnmask.attention``, which picks the cheapest exact backend; no O(Q·K) mask is built for causal, window,
    padding or document masks unless the chosen backend needs one. A 4D tensor mask (a user's own) is honoured as is.
    Attention dropout (``dropout``, which transformers passes as ``attention_dropout`` in training and 0 in
    evaluation; ignored while ``module`` is in eval mode) goes to ``attention(..., dropout_p=dropout)``, so "auto"
    chooses among the backends with dropout: packed rows still run per document (``varlen``, no O(Q·K) mask) wherever
    that is the cheapest.
    """
    _check_keywords(kwargs)
    mods = _score_mods(kwargs)
    batch, _, q_len, _ = query.shape
    kv_len = key.shape[2]
    is_causal = kwargs.get("is_causal")
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    config = getattr(module, "config", None)
    is_causal = bool(is_causal) and getattr(config, "is_causal", True) is not False
    if isinstance(attention_mask, HFMaskInfo) and attention_mask.causal is not None:
        is_causal = attention_mask.causal  # transformers' mask rules over the module's flag, as in its eager and sdpa

    q_positions = kv_positions = None
    if isinstance(attention_mask, torch.Tensor):
        spec = _dense_mask_as_bool(attention_mask, batch, q_len, kv_len)
        if spec.shape[-2] == 1 < q_len == kv_len and not any(kwargs.get(k) is not None for k in _BOUNDS):
            # a model's own key-padding mask (B, 1, 1, K), e.g. LayoutLM's: it holds no documents
            _refuse_hidden_boundaries(config, q_len, spec[:, 0, 0, :] if spec.shape[0] == batch else None)
    else:
        info = attention_mask
        if info is not None and (info.kv_length != kv_len or info.q_length != q_len):
            raise bad(ShapeError, "attention_mask", f"a mask for Q={q_len}, K={kv_len}", info.shape)
        local = None if info is None else info.bidirectional_window  # abs(q - k) <= local, from transformers' mask
        window = sliding_window if local is None else local
        cross = _is_cross_attention(module, is_causal, window, q_len, kv_len)
        if not cross and kwargs.get("position_ids") is None and info is not None and info.position_ids is not None:
            kwargs = {**kwargs, "position_ids": info.position_ids}  # the model's attention is not given them
        if not cross and (info is None or not info.has_past) and not any(kwargs.get(k) is not None for k in _BOUNDS):
            _refuse_hidden_boundaries(config, q_len, None if info is None else info.padding)
        if cross:
            # keys are the encoder's: only its padding matters, never the queries' own positions
            spec = full() if info is None or info.padding is None else full() & key_padding(info.padding)
            if q_len > kv_len:  # the rule ignores query positions; any in range will do
                q_positions = torch.zeros(q_len, dtype=torch.long, device=query.device)
        elif info is not None and (info.overlay or (sliding_window is not None and not is_causal and local is None)):
            # and/or overlays, or a window the attention is told of and transformers' mask holds none of (its sdpa
            # and eager follow the mask): transformers' predicate, per element
            spec = _overlay_spec(info)
            documents, packed = _packed_documents(kwargs, info, (batch, q_len), info.padding, query.device, config)
            if packed:  # the predicate knows them only when transformers found the packed rows itself
                spec = spec & documents
            q_positions = torch.arange(info.q_offset, info.q_offset + q_len, device=query.device)
            kv_positions = torch.arange(info.kv_offset, info.kv_offset + kv_len, device=query.device)
        else:
            padding = info.padding if info is not None else None
            chunk = info.chunk_size if info is not None else None

            def build() -> MaskSpec:
                documents, packed = _packed_documents(kwargs, info, (batch, q_len), padding, query.device, config)
                chunks = None
                if chunk is not None and documents is None:  # with a cache, or one unpadded sequence per row
                    chunks = _chunks_on_keys(chunk, info, batch, query.device)
                elif chunk is not None:
                    position_ids, first = kwargs.get("position_ids"), info.kv_offset
                    documents = _chunked_documents(documents, chunk, packed, position_ids, info.left_padding, first)
                spec = spec_for_call(
                    is_causal=is_causal,
                    window=sliding_window if local is None else None,
                    padding=padding,
                    documents=documents,
                    chunks=chunks,
                    bidirectional_window=local,
                )
                if info is not None and info.block_ids is not None:  # transformers ORs the blocks in, then pads
                    spec = spec | bidirectional_blocks(info.block_ids)
                    spec = spec if padding is None else spec & key_padding(padding)
                return spec

            spec = _shared_spec(
                kwargs, info, (batch, q_len, kv_len), padding, query.device, is_causal, sliding_window, build
            )
            if info is not None and info.q_offset + q_len != info.kv_offset + kv_len:
                # e.g. a static cache with unused slots: queries are not the last Q keys
                q_positions = torch.arange(info.q_offset - info.kv_offset, info.q_offset - info.kv_offset + q_len)
                q_positions = q_positions.to(query.device)
    out = attention(
        query,
        key,
        value,
        spec,
        backend=backend,
        scale=scaling,
        q_positions=q_positions,
        kv_positions=kv_positions,
        dropout_p=float(dropout) if module.training else 0.0,
        **mods,
    )
    return out.transpose(1, 2).contiguous(), None


# Keywords transformers 5.x hands attention functions that leave the scores unchanged, or that `attention_forward`
# reads itself (is_causal, position_ids, cu_seq_lens_q/k, seq_lens). Found by recording every keyword of forwards,
# packed / padded / flattened batches, generate and training steps of Llama, Mistral, Qwen2, Qwen3, Qwen3-MoE, Gemma,
# Gemma2, Gemma3, OLMo2, Granite, Starcoder2 and Cohere. Anything else is refused: a new keyword may change the
# scores, and one silently dropped is a silent wrong result.
HARMLESS_KEYWORDS = frozenset(
    {
        "is_causal",
        "position_ids",
        "cu_seq_lens_q",
        "cu_seq_lens_k",
        "max_length_q",
        "max_length_k",
        "seq_lens",
        "seq_idx",  # linear-attention / convolution layers' packed index, not attention's
        "use_cache",
        "output_attentions",  # attention weights are not returned (None), as with sdpa
        "output_hidden_states",
        "output_router_logits",
        "num_items_in_batch",
        "deterministic",  # flash-attention backward determinism
        "logits_to_keep",  # which positions the LM head computes (GOT-OCR2 hands it down)
    }
)
# Score modifiers models pass that attnmask's attention honours: the keyword, and the `attention` argument it becomes
# (Gemma2 passes `softcap=config.attn_logit_softcapping`, gpt-oss `s_aux=module.sinks`, one logit per head).
PASSED_MODIFIERS = {"softcap": "softcap", "s_aux": "sinks", "sinks": "sinks"}
# Score modifiers that models pass and attnmask's attention does not honour: refused unless None (no modifier).
SCORE_MODIFIERS = {
    "position_bias": "an additive position bias (T5-family relative attention)",
}
# Keywords harmless when None (absent), refused otherwise: BERT-family layers (RoBERTa, XLM-R, Data2Vec, ...) hand
# their attention function the cross-attention inputs they were called with, None outside encoder-decoder use;
# Ultrabert its (absent) cache.
ABSENT_KEYWORDS = frozenset({"encoder_hidden_states", "encoder_attention_mask", "past_key_values"})


def _check_keywords(kwargs: dict) -> None:
    """Refuse, with `BackendError` naming it, every keyword that is not known to be harmless."""
    for name, value in kwargs.items():
        if name in HARMLESS_KEYWORDS or name in PASSED_MODIFIERS:
            continue
        if value is None and (name in SCORE_MODIFIERS or name in ABSENT_KEYWORDS):
            continue
        if name in SCORE_MODIFIERS:
            feature = f"None: attnmask's attention does not support {SCORE_MODIFIERS[name]}"
            raise bad(BackendError, name, feature, _describe(value))
        raise bad(
            BackendError,
            name,
            "a keyword attnmask's attention knows to leave the scores unchanged, refused rather than ignored "
            f"(known: {', '.join(sorted(HARMLESS_KEYWORDS))})",
            _describe(value),
        )
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_k is not None and (cu_q is None or not torch.equal(torch.as_tensor(cu_k), torch.as_tensor(cu_q))):
        wanted = "equal to cu_seq_lens_q (the keys are the queries' own tokens)"
        raise bad(BackendError, "cu_seq_lens_k", wanted, None if cu_k is None else torch.as_tensor(cu_k).tolist())


def _score_mods(kwargs: dict) -> dict:
    """The score modifiers among ``kwargs`` as ``attnmask.attention`` keywords (absent ones, None, left out); a
    ``BackendError`` when two keywords name the same modifier (``s_aux`` and ``sinks``)."""
    mods, given_as = {}, {}
    for name, target in PASSED_MODIFIERS.items():
        value = kwargs.get(name)
        if value is None:
            continue
        if target in mods:
            raise bad(BackendError, name, f"None when {given_as[target]!r} is given (both are {target})", "a value")
        mods[target], given_as[target] = value, name
    return mods


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return repr(value) if isinstance(value, (int, float, bool, str)) else f"a {type(value).__name__}"


def _shared_spec(kwargs, info, shape, padding, device, is_causal, window, build) -> MaskSpec:
    """``build()``, or the spec an earlier layer of this forward built from the same inputs (``_RecentSpecs``)."""
    seq_lens = kwargs.get("seq_lens")
    listed = None if seq_lens is None or isinstance(seq_lens, torch.Tensor) else _frozen(seq_lens)
    if listed is _UNHASHABLE:
        return build()
    has_past = info is not None and info.has_past
    chunk = None if info is None else (info.chunk_size, info.kv_offset)
    local = None if info is None else info.bidirectional_window
    settings = (is_causal, window, shape, device, has_past, listed, chunk, local)
    tensors = (padding, kwargs.get("position_ids"), kwargs.get("cu_seq_lens_q"))
    tensors += (None, None) if info is None else (info.left_padding, info.block_ids)
    tensors += (seq_lens,) if isinstance(seq_lens, torch.Tensor) else (None,)
    if not all(t is None or isinstance(t, torch.Tensor) for t in tensors):
        return build()
    return _recent_specs.get(settings, tensors, build)


def _is_cross_attention(module: Any, is_causal: bool, window: int | None, q_len: int, kv_len: int) -> bool:
    """Whether the call attends from decoder queries to encoder keys (BART-family ``encoder_attn``, Whisper, ...).

    transformers says so to neither the mask nor the attention function. A bidirectional call is one when its module
    is a decoder's (``is_decoder=True``: decoder self-attention is causal, by its mask, and encoder self-attention is
    not a decoder's), says so (``is_cross_attention``, a ``...CrossAttention`` class: BERT-family decoders), or has
    more queries than keys."""
    if is_causal or window is not None:
        return False
    named = getattr(module, "is_cross_attention", False) is True or "CrossAttention" in type(module).__name__
    return named or getattr(module, "is_decoder", False) is True or q_len > kv_len


def _overlay_spec(info: HFMaskInfo) -> MaskSpec:
    """A model's own and/or overlays: its predicate, evaluated per element on absolute positions (O(B·Q·K)).

    Packed rows whose predicate looks tensors up by column (transformers' ``block_sequence_ids`` overlays, as
    Gemma3's sliding layers pass them): transformers wraps the predicate in a packed-rows remap that hands it
    in-document positions, so those lookups read the wrong tokens (its own sdpa and eager masks differ from each
    document alone). There the wrapped predicate is evaluated on columns, within each document (``document``): the
    mask each document gets alone, since columns and positions differ by a constant inside a document.
    """
    fn = info.mask_function
    inner = _packed_inner_predicate(fn) if info.position_ids is not None else None
    if inner is not None and _closure_tensor(inner, "block_sequence_ids") is not None:
        documents = document_ids_from_position_ids(info.position_ids)
        spec = custom(lambda b, h, q, k: inner(b, h, q, k).bool(), name="transformers mask_function, unpacked")
        return spec if documents is None else spec & document(doc_ids=documents)
    spec = custom(lambda b, h, q, k: fn(b, h, q, k).bool(), name="transformers mask_function")
    if info.padding is not None:
        padding = torch.nn.functional.pad(info.padding, (info.kv_offset, 0), value=False)
        spec = spec & key_padding(padding)
    return spec


def _dense_mask_as_bool(mask: torch.Tensor, batch: int, q_len: int, kv_len: int) -> torch.Tensor:
    """A user's 4D mask ``(B, 1, Q, K')`` (bool, or additive with 0 = allowed and ``finfo.min`` / ``-inf`` =
    masked) as bool ``(B, 1, Q, K)``. An additive mask holding any other value is a score bias (e.g. Doge's dynamic
    mask), which attnmask's attention does not take: ``BackendError``, never a bias silently dropped."""
    if mask.dim() != 4:
        raise bad(ShapeError, "attention_mask", "a 4D mask (B, 1, Q, K) or transformers' 2D mask", tuple(mask.shape))
    mask = mask[..., :kv_len]
    if mask.dtype == torch.bool:
        return mask
    if not mask.is_floating_point():
        raise bad(BackendError, "attention_mask", "a bool or an additive (floating) 4D mask", mask.dtype)
    allowed = mask == 0
    if not bool((allowed | (mask <= torch.finfo(mask.dtype).min / 2)).all()):
        wanted = "a bool mask or an additive one of 0 and finfo(dtype).min only (attnmask's attention takes no bias)"
        raise bad(BackendError, "attention_mask", wanted, "an additive mask with other values (a score bias)")
    return allowed


# ----------------------------------------------------------------------------------------------------------------------
# Collators


class DataCollatorForCausalLM:
    """Collator for the ``Trainer`` and plain loops: pads (`attnmask.Collator`) or packs (`attnmask.PackingCollator`)
    examples and returns the dict the model takes.

    ``examples``: dicts with ``input_ids`` and optionally ``labels`` (aligned with ``input_ids``, -100 = ignored),
    ``prompt_lengths`` (or ``prompt_length``, an int: the first tokens that are prompt), ``assistant_masks`` (0/1
    per token, as ``tokenizer.apply_chat_template(..., return_assistant_tokens_mask=True, return_dict=True)`` gives
    it) and ``completion_mask`` (0/1 per token, TRL's prompt-completion column); plain token lists are accepted too.
    Returns a dict of ``(B, L)`` int64 tensors:

    - padding (``packing=False``): ``input_ids``, ``attention_mask``, ``position_ids``, ``labels``; rows padded on
      ``padding_side`` (right by default) to the longest example, rounded up to ``pad_to_multiple_of``;
    - packing (``packing=True``): rows of ``max_length`` tokens holding several documents each: ``input_ids``,
      ``position_ids`` (restarting at 0 in every document: the document boundaries the ``"attnmask"`` attention
      reads), ``labels`` (-100 on each document's first token, so no target crosses a boundary) and
      ``use_cache=False``. No ``attention_mask``: a 2D mask next to packed ``position_ids`` makes transformers' own
      sdpa and eager paths attend across documents (PR #46634); they also do so whenever the model creates a KV cache
      (``use_cache``, on by default in the config), hence ``use_cache=False`` in the batch. The ``"attnmask"``
      implementation separates documents in every case.
      ``padding_free=True`` gives one ``(1, total)`` row plus transformers' flash-attention kwargs
      ``cu_seq_lens_q/k`` and ``max_length_q/k``.

    Labels follow the one convention of ``attnmask._spans`` (the same as `attnmask.pad` and
    `attnmask.PackingCollator`): the hints ``labels``, ``assistant_masks``, ``completion_mask``, ``prompt_length`` /
    ``prompt_lengths`` present in the examples are always honoured, and a token is a target unless a hint excludes it
    (by position, never by comparing token ids). ``completion_only=True`` requires a hint that marks the prompt in
    every example (``LabelError`` names the keys looked for and found). A batch with no target token raises
    ``NoTargetError`` unless ``allow_empty=True``.
    An example's own ``attention_mask`` (examples that come padded) is honoured: padding strips its 0 positions, as
    `attnmask.pad` does; packing refuses an example with padding in it (``InputError``) rather than pack pad tokens.
    Too-long examples are an error, unless ``truncation=True`` (padding:
    the first ``max_length`` tokens are kept) or packing, which splits them into ``max_length`` pieces; the running
    count of cut tokens is ``self.num_truncated_tokens``. ``return_batch=True`` returns the ``Batch`` instead.
    With the ``Trainer``, set ``remove_unused_columns=False`` so that ``prompt_lengths`` / ``assistant_masks`` reach
    the collator.
    Cost: O(total tokens) plus O(B·L); no O(L^2) mask.

    >>> collate = DataCollatorForCausalLM(pad_id=0, packing=True, max_length=8)
    >>> collate([[1, 2, 3], [4, 5, 6, 7, 8]])["position_ids"].tolist()
    [[0, 1, 2, 3, 4, 0, 1, 2]]
    """

    def __init__(
        self,
        pad_id: int,
        *,
        packing: bool = False,
        max_length: int | None = None,
        completion_only: bool = False,
        padding_side: str = "right",
        pad_to_multiple_of: int | None = None,
        truncation: bool = False,
        strategy: str = "bfd",
        padding_free: bool = False,
        return_batch: bool = False,
        allow_empty: bool = False,
    ) -> None:
        if packing and max_length is None:
            raise bad(InputError, "max_length", "the row length (an int) when packing=True", None)
        if padding_free and not packing:
            raise bad(InputError, "padding_free", "False unless packing=True", padding_free)
        self.pad_id = pad_id
        self.packing = packing
        self.max_length = max_length
        self.completion_only = completion_only
        self.padding_side = padding_side
        self.pad_to_multiple_of = pad_to_multiple_of
        self.truncation = truncation
        self.strategy = strategy
        self.padding_free = padding_free
        self.return_batch = return_batch
        self.allow_empty = allow_empty
        self.num_truncated_tokens = 0

    def __call__(self, examples: Sequence[Any]) -> dict[str, Any] | Batch:
        if not len(examples):
            raise bad(InputError, "examples", "at least one example", "an empty list")
        if self.packing:
            from attnmask.pack import PackingCollator

            batch = PackingCollator(
                self.max_length,
                self.pad_id,
                strategy=self.strategy,
                padding_free=self.padding_free,
                completion_only=self.completion_only,
                allow_empty=self.allow_empty,
            )(examples)
        else:
            batch = Collator(
                pad_id=self.pad_id,
                side=self.padding_side,
                pad_to_multiple_of=self.pad_to_multiple_of,
                max_length=self.max_length,
                truncation=self.truncation,
                completion_only=self.completion_only,
                allow_empty=self.allow_empty,
            )(examples)
        self.num_truncated_tokens += batch.num_truncated_tokens
        if self.return_batch:
            return batch
        out = {"input_ids": batch.input_ids, "position_ids": batch.position_ids, "labels": batch.labels}
        if not self.packing:
            out["attention_mask"] = batch.attention_mask
            return out
        out["use_cache"] = False  # with no cache, transformers' own attention paths find the documents too
        if self.padding_free:
            cu = batch.cu_seqlens
            out.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=batch.max_seqlen, max_length_k=batch.max_seqlen)
        return out


# ----------------------------------------------------------------------------------------------------------------------
# Loss over the optimizer step


def num_items_in_step(micro_batches: Iterable[Any], *, group: Any = None) -> torch.Tensor:
    """Target tokens of one optimizer step: summed over its gradient-accumulation micro-batches and, when
    ``torch.distributed`` is initialised, all-reduced (sum) over ``group``'s ranks. A 0-dim int64 tensor.

    ``micro_batches``: the step's micro-batches as collator dicts (their ``"labels"``), ``Batch`` es or ``(B, L)``
    label tensors. A target is a ``labels[:, 1:]`` entry other than -100 (the model shifts). Use::

        n = num_items_in_step(micro_batches)
        for mb in micro_batches:
            masked_cross_entropy(model(**mb).logits, mb["labels"], num_items=n).backward()

    so the step's gradient is that of the mean over all its tokens, whatever the split (under DDP, which averages
    gradients over ranks, scale each loss by the world size). Example: micro-batches with 3 and 5 targets give 8.
    """
    labels = [mb["labels"] if isinstance(mb, Mapping) else mb for mb in micro_batches]
    return global_num_items(labels, group=group)


# ----------------------------------------------------------------------------------------------------------------------
# Registration


def register(name: str = ATTN_IMPLEMENTATION, *, backend: str = "auto") -> str:
    """Register attnmask with transformers under ``name``; returns the name for ``attn_implementation=``.

    ``backend``: the ``attnmask.attention`` backend every call uses (``"auto"``: the cheapest exact one per call).

    Adds :func:`attention_forward` to ``AttentionInterface`` and :func:`build_mask_info` to
    ``AttentionMaskInterface`` (so transformers hands over the 2D padding mask and cache geometry instead of building
    an O(L^2) mask). Idempotent. Imports transformers lazily.
    """
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError as exc:  # an optional dependency: say how to get it
        hint = "attnmask.integrations.hf.register needs transformers >= 4.56: pip install 'attnmask[hf]'"
        raise ImportError(hint) from exc

    forward = attention_forward if backend == "auto" else functools.partial(attention_forward, backend=backend)
    AttentionInterface.register(name, forward)
    AttentionMaskInterface.register(name, build_mask_info)
    _registered_names.add(name)
    return name


@functools.cache
def _dispatches_attention(module_name: str) -> bool:
    """Whether the Python module ``module_name`` looks attention functions up in transformers'
    ``ALL_ATTENTION_FUNCTIONS`` (its source, read once per module); True when the source cannot be read."""
    import inspect

    try:
        return "ALL_ATTENTION_FUNCTIONS" in inspect.getsource(sys.modules[module_name])
    except (KeyError, OSError, TypeError):
        return True


def _reaches_attnmask(model: torch.nn.Module) -> bool:
    """Whether some layer of ``model`` (its own modeling modules in transformers, sub-models included) dispatches its
    attention through ``AttentionInterface``; True for a model with no transformers modeling module (not known)."""
    names = {type(m).__module__ for m in model.modules()}
    names = {n for n in names if n.startswith("transformers.models.")}
    return not names or any(_dispatches_attention(n) for n in names)


def _attnmask_keeps_documents_apart(model: torch.nn.Module, impl: str) -> bool:
    """Under attnmask's attention: False, with a warning, for a model whose attention never reaches it (its modeling
    code does not look its attention up in transformers' ``AttentionInterface``: by transformers' own test
    ``_can_set_attn_implementation`` (OpenAI-GPT, XLM, DeBERTa, ...) or because none of its modeling modules uses it
    (FNet, Mamba: no attention layer at all)) or that mixes tokens outside attention (hybrids: those raise at the
    first attention call, if any)."""
    can_set = getattr(type(model), "_can_set_attn_implementation", None)
    own_attention = (callable(can_set) and not can_set()) or not _reaches_attnmask(model)
    mixing = token_mixing_outside_attention(getattr(model, "config", None))
    if not own_attention and mixing is None:
        return True
    why = "its attention does not go through transformers' AttentionInterface" if own_attention else ""
    why = why or f"it mixes tokens outside attention ({mixing})"
    logger.warning(
        "packed position_ids meet attn_implementation=%r on a model attnmask cannot keep them apart in: %s; "
        "tokens attend across documents (or the forward is refused): pad the documents into separate rows",
        impl,
        why,
    )
    return False


def check_packed_inputs(model: torch.nn.Module, inputs: Mapping[str, Any]) -> bool:
    """Whether ``model(**inputs)`` keeps the documents of packed rows apart; warns on the ``attnmask`` logger when
    packed ``position_ids`` meet a model whose attention is not attnmask's.

    ``inputs``: the dict the model is called with (a collator's output, ``batch.model_inputs()``). Rows are packed when
    their ``position_ids`` restart inside them (`document_ids_from_position_ids`). Under ``attn_implementation`` names
    given by `register`, packed rows are separate (True, no warning) unless the model's attention never reaches
    attnmask's or it mixes tokens outside attention (False, a warning). Under any other attention, transformers
    finds the documents from ``position_ids`` only when there is no ``attention_mask`` and no KV cache (neither
    ``past_key_values`` nor ``use_cache``, which defaults to the config's, usually True): the warning says whether
    that holds (True: exact, as attnmask's collators arrange) or not (False: tokens attend across documents).
    Example: ``hf.check_packed_inputs(model, collate(examples))`` before a training loop on a stock model.
    """
    position_ids = inputs.get("position_ids")
    if not isinstance(position_ids, torch.Tensor) or position_ids.dim() != 2:
        return True
    mask = inputs.get("attention_mask")
    padding = mask if isinstance(mask, torch.Tensor) and mask.shape == position_ids.shape else None
    if document_ids_from_position_ids(position_ids, padding) is None:
        return True
    config = getattr(model, "config", None)
    impl = getattr(config, "_attn_implementation", None)
    if impl in _registered_names:
        return _attnmask_keeps_documents_apart(model, impl)
    use_cache = inputs.get("use_cache")
    use_cache = getattr(config, "use_cache", True) if use_cache is None else use_cache
    leaks = [
        reason
        for reason, present in (
            ("an attention_mask", mask is not None),
            ("past_key_values", inputs.get("past_key_values") is not None),
            ("use_cache (a KV cache is created)", bool(use_cache)),
        )
        if present
    ]
    if leaks:
        logger.warning(
            "packed position_ids meet attn_implementation=%r, not attnmask's: with %s, transformers does not detect "
            "the documents and tokens attend across them; use attn_implementation=hf.register(), or pass no "
            "attention_mask and use_cache=False",
            impl,
            " and ".join(leaks),
        )
        return False
    logger.warning(
        "packed position_ids meet attn_implementation=%r, not attnmask's: exact only through transformers' own "
        "packed-sequence detection (no attention_mask, no cache); attn_implementation=hf.register() keeps documents "
        "apart in every case",
        impl,
    )
    return True
