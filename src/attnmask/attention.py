"""Attention that honours a mask spec on every backend, with one semantics for all of them.

``attention(q, k, v, mask)`` validates its inputs, packs them into an :class:`AttentionCall` and hands it to a
backend from a small registry. ``backend="auto"`` picks the cheapest registered backend that supports the call.

Semantics every backend obeys (the tests hold each one to ``tests/naive.py::naive_attention``):

- ``q``: ``(B, H, Q, D)``; ``k``: ``(B, Hkv, K, D)``; ``v``: ``(B, Hkv, K, Dv)``; output ``(B, H, Q, Dv)`` in
  ``q``'s dtype. ``H % Hkv == 0``: query head ``h`` reads key/value head ``h // (H // Hkv)`` (grouped-query attention).
- ``mask``: ``None`` (every query sees every key), a :class:`~attnmask.masks.MaskSpec` (evaluated at query positions
  ``K - Q .. K - 1`` and key positions ``0 .. K - 1``, bottom-right aligned, unless ``q_positions`` /
  ``kv_positions`` are given: exactly as ``MaskSpec.to_dense``), or a bool tensor broadcastable to ``(B, H, Q, K)``.
  True means "may attend".
- A query row with no allowed key returns exactly 0, and its gradient with respect to ``q``, ``k`` and ``v`` is
  exactly 0: never NaN, never a uniform average over the masked keys.
- ``dropout_p`` (attention dropout, as SDPA's): each attention probability, after the softmax, is zeroed with
  probability ``p`` and the kept ones are scaled by ``1 / (1 - p)``, independently per (row, head, query, key); the
  output's expectation is the output without dropout. Dropout never moves weight to a masked key (a key the mask
  denies has probability 0 before and after), and a row with no allowed key still returns exactly 0. It is applied
  whenever ``dropout_p > 0`` (a functional API: pass 0 in evaluation); masks are drawn from torch's global RNG
  (SDPA takes no generator), so ``torch.manual_seed`` (or ``torch.random.fork_rng``) makes a backend's result
  reproducible, while two backends draw different masks for the same seed. Backends ``"reference"``, ``"sdpa"`` and
  ``"varlen"`` support it; the others report it from ``unsupported``, so ``"auto"`` never picks them for such a call.
  ``dropout_p=0`` runs exactly the code without dropout (bit-for-bit, no RNG draw).

Backend contract (how to add ``"varlen"``, ``"blocksparse"`` or ``"flex"``): build a :class:`Backend` and call
:func:`register_backend`. Its three functions each receive one :class:`AttentionCall`, whose fields are

- ``q``, ``k``, ``v``: the validated tensors (same dtype and device, shapes as above, not made contiguous);
- ``mask``: ``None``, the ``MaskSpec`` as given, or the bool tensor viewed as 4D (leading 1s added, not expanded);
- ``scale``: the softmax scale as a float (``D ** -0.5`` unless given);
- ``q_positions`` / ``kv_positions``: for a spec, the resolved int64 positions, ``(Q,)`` / ``(K,)`` or per row
  ``(B, Q)`` / ``(B, K)``, on ``q``'s device; ``None`` for a tensor or no mask;
- ``positions_given``: whether the caller passed explicit positions (a backend may then not assume alignment);
- ``dropout_p``: the attention dropout probability in ``[0, 1)`` (0.0: none). A backend without dropout must return a
  reason from ``unsupported`` when it is > 0 (``attnmask.sparse.dropout_unsupported``).

``run(call)`` returns the ``(B, H, Q, Dv)`` output in ``q``'s dtype; ``unsupported(call)`` returns ``None`` when the
backend can serve the call, else a short reason (shown when the backend was named explicitly); ``cost(call)`` is an
estimate of the work in element operations, only compared between backends. :func:`dense_mask` and
:func:`rows_with_keys` are the shared helpers a backend needs to honour the empty-row rule.

Worked example, two queries decoding against four cached keys (bottom-right: the queries sit at positions 2 and 3)::

    >>> q, k, v = torch.randn(1, 4, 2, 8), torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8)
    >>> attention(q, k, v, causal()).shape
    torch.Size([1, 4, 2, 8])
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from attnmask.errors import BackendError, DeviceError, DTypeError, InputError, ShapeError, bad
from attnmask.masks import Causal, Full, MaskSpec, resolve_positions
from attnmask.plancache import call_plans
from attnmask.sparse import check_dropout_p  # sparse never imports this module

__all__ = [
    "AttentionCall",
    "Backend",
    "attention",
    "available_backends",
    "choose_backend",
    "dense_mask",
    "register_backend",
    "rows_with_keys",
]


# ----------------------------------------------------------------------------------------------------------------------
# The call a backend receives


@dataclass(frozen=True, eq=False)
class AttentionCall:
    """Validated inputs of one ``attention`` call; see the module docstring for each field."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    mask: MaskSpec | torch.Tensor | None
    scale: float
    q_positions: torch.Tensor | None = None
    kv_positions: torch.Tensor | None = None
    positions_given: bool = False
    dropout_p: float = 0.0

    @property
    def batch(self) -> int:
        return self.q.shape[0]

    @property
    def heads(self) -> int:
        return self.q.shape[1]

    @property
    def kv_heads(self) -> int:
        return self.k.shape[1]

    @property
    def q_len(self) -> int:
        return self.q.shape[2]

    @property
    def kv_len(self) -> int:
        return self.k.shape[2]

    @property
    def head_dim(self) -> int:
        return self.q.shape[3]

    @property
    def value_dim(self) -> int:
        return self.v.shape[3]

    @property
    def is_plain_causal(self) -> bool:
        """The mask is exactly ``causal()`` with ``Q == K`` and default positions (SDPA's top-left ``is_causal``)."""
        return type(self.mask) is Causal and self.q_len == self.kv_len and not self.positions_given

    @property
    def is_full(self) -> bool:
        """No key is ever masked: no mask, or exactly ``full()``."""
        return self.mask is None or type(self.mask) is Full


def dense_mask(call: AttentionCall) -> tuple[torch.Tensor | None, bool]:
    """The call's mask as a bool tensor that broadcasts to ``(B, H, Q, K)``, and whether the caller owns it.

    A spec becomes ``(B or 1, 1, Q, K)`` via ``MaskSpec.to_dense`` (O(B·Q·K) memory; a fresh tensor the caller may
    write to, unless the spec holds a ``custom`` predicate, whose result might alias the user's data); a tensor mask is
    returned as given (not owned); ``None`` stays ``None``.
    """
    if isinstance(call.mask, MaskSpec):
        dense = call.mask.to_dense(
            call.q_len, call.kv_len, q_positions=call.q_positions, kv_positions=call.kv_positions, device=call.q.device
        )
        return dense.unsqueeze(1), call.mask.is_structural
    return call.mask, False


def rows_with_keys(mask: torch.Tensor) -> torch.Tensor:
    """``(..., Q, 1)`` bool: whether each query row of a dense mask ``(..., Q, K)`` allows at least one key."""
    return mask.any(dim=-1, keepdim=True)


# ----------------------------------------------------------------------------------------------------------------------
# Backends


@dataclass(frozen=True)
class Backend:
    """An attention implementation: ``run``, ``unsupported`` and ``cost`` each take an :class:`AttentionCall`."""

    name: str
    run: Callable[[AttentionCall], torch.Tensor]
    unsupported: Callable[[AttentionCall], str | None]
    cost: Callable[[AttentionCall], float]


_BACKENDS: dict[str, Backend] = {}


def register_backend(backend: Backend, *, replace: bool = False) -> Backend:
    """Add ``backend`` to the registry that ``attention(..., backend=name)`` and ``"auto"`` draw from."""
    if not isinstance(backend, Backend):
        raise bad(BackendError, "backend", "a Backend", type(backend).__name__)
    if backend.name == "auto" or (backend.name in _BACKENDS and not replace):
        raise bad(BackendError, "backend.name", "a new name (pass replace=True to override)", repr(backend.name))
    _BACKENDS[backend.name] = backend
    return backend


def available_backends() -> tuple[str, ...]:
    """Names of the registered backends, in registration order."""
    return tuple(_BACKENDS)


def choose_backend(call: AttentionCall, backend: str = "auto") -> Backend:
    """The backend named ``backend``, or for ``"auto"`` the cheapest registered backend that supports ``call``.

    Ties go to the backend registered first. Raises ``BackendError`` for an unknown name or an unsupported call.
    The ``"auto"`` choice is cached with the call's plans (``attnmask.plancache``: per spec object and call
    signature) together with the registry it was made from, so a repeated spec and shape skips every ``unsupported``
    and ``cost``: these may depend only on the spec, the shapes, strides, dtype and device of q, k, v, whether a
    gradient is needed and the call's scalar fields (the scale), never on tensor values outside the spec.
    """
    if backend == "auto":
        plans = call_plans(call)
        registry = tuple(_BACKENDS.values())
        made = plans.get("auto")
        if made is not None and made[0] == registry:
            return made[1]
        candidates = [b for b in registry if b.unsupported(call) is None]
        if not candidates:
            reasons = "; ".join(f"{b.name}: {b.unsupported(call)}" for b in registry)
            raise bad(BackendError, "backend", "a registered backend that supports these inputs", reasons)
        chosen = min(candidates, key=lambda b: b.cost(call))
        plans["auto"] = (registry, chosen)
        return chosen
    if not isinstance(backend, str) or backend not in _BACKENDS:
        raise bad(BackendError, "backend", f"one of {['auto', *_BACKENDS]}", repr(backend))
    chosen = _BACKENDS[backend]
    reason = chosen.unsupported(call)
    if reason is not None:
        raise bad(BackendError, "backend", f"a backend that supports these inputs ({backend!r} cannot)", reason)
    return chosen


# -- reference ---------------------------------------------------------------------------------------------------------


def _reference_run(call: AttentionCall) -> torch.Tensor:
    """Textbook attention in float32 (float64 stays float64), scores materialised: O(B·H·Q·K) memory."""
    work = torch.promote_types(call.q.dtype, torch.float32)
    rep = call.heads // call.kv_heads
    q = call.q.to(work)
    k = call.k.to(work).repeat_interleave(rep, dim=1)
    v = call.v.to(work).repeat_interleave(rep, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * call.scale
    allowed, _ = dense_mask(call)
    if allowed is not None:
        has_key = rows_with_keys(allowed)
        # Empty rows get finite scores (a harmless uniform softmax) and are then zeroed: no NaN forward or backward.
        scores = scores.masked_fill(~allowed, float("-inf")).masked_fill(~has_key, 0.0)
        probs = torch.softmax(scores, dim=-1).masked_fill(~has_key, 0.0)
    else:
        probs = torch.softmax(scores, dim=-1)
    if call.dropout_p > 0:
        probs = F.dropout(probs, call.dropout_p)  # zeros stay zero: empty rows and masked keys are untouched
    return torch.matmul(probs, v).to(call.q.dtype)


def _reference_cost(call: AttentionCall) -> float:
    # Unfused, upcast and with materialised scores: several passes over B·H·Q·K.
    return 4.0 * call.batch * call.heads * call.q_len * call.kv_len * (call.head_dim + call.value_dim + 8)


# -- sdpa --------------------------------------------------------------------------------------------------------------


def _sdpa_run(call: AttentionCall) -> torch.Tensor:
    """``torch.nn.functional.scaled_dot_product_attention`` with the dense bool mask (O(B·Q·K) for a spec)."""
    sdpa_kwargs = {"scale": call.scale}
    if call.heads != call.kv_heads:
        sdpa_kwargs["enable_gqa"] = True
    if call.dropout_p > 0:
        sdpa_kwargs["dropout_p"] = call.dropout_p
    if call.is_full:
        return F.scaled_dot_product_attention(call.q, call.k, call.v, **sdpa_kwargs)
    if call.is_plain_causal:
        # is_causal is top-left aligned: only used when Q == K, where both alignments agree.
        return F.scaled_dot_product_attention(call.q, call.k, call.v, is_causal=True, **sdpa_kwargs)
    allowed, owned = dense_mask(call)
    has_key = rows_with_keys(allowed)
    empty_rows = not bool(has_key.all())
    if empty_rows:
        # Let empty rows attend to every key (finite, NaN-free), then zero their output: their gradient is then 0 too.
        allowed = allowed.logical_or_(~has_key) if owned else allowed | ~has_key
    out = F.scaled_dot_product_attention(call.q, call.k, call.v, attn_mask=allowed, **sdpa_kwargs)
    return out.masked_fill(~has_key, 0.0) if empty_rows else out


def _sdpa_cost(call: AttentionCall) -> float:
    work = call.batch * call.heads * call.q_len * call.kv_len * (call.head_dim + call.value_dim)
    if call.is_full:
        return float(work)
    if call.is_plain_causal:
        return work / 2  # the fused kernel skips the tiles above the diagonal
    mask_rows = call.batch if isinstance(call.mask, MaskSpec) else 0
    return float(work + 2 * mask_rows * call.q_len * call.kv_len)


def _never_unsupported(call: AttentionCall) -> str | None:
    return None


REFERENCE = register_backend(Backend("reference", _reference_run, _never_unsupported, _reference_cost))
SDPA = register_backend(Backend("sdpa", _sdpa_run, _never_unsupported, _sdpa_cost))


# ----------------------------------------------------------------------------------------------------------------------
# The public function


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: MaskSpec | torch.Tensor | None = None,
    *,
    backend: str = "auto",
    scale: float | None = None,
    q_positions: torch.Tensor | None = None,
    kv_positions: torch.Tensor | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Scaled dot-product attention honouring ``mask``; rows with no allowed key give exactly 0.

    - ``q``: ``(B, H, Q, D)``; ``k``: ``(B, Hkv, K, D)``; ``v``: ``(B, Hkv, K, Dv)``, ``H % Hkv == 0``, one floating
      dtype and one device. Returns ``(B, H, Q, Dv)`` in that dtype. Mixed dtypes: under autocast (CPU or CUDA,
      bfloat16 or float16) every non-float64 input is cast to the autocast dtype first, exactly as autocast casts
      SDPA's inputs, and the output is in that dtype (``autocast_inputs``); outside autocast, mixed dtypes are a
      ``DTypeError``, as SDPA refuses them.
    - ``mask``: ``None``, a ``MaskSpec`` (queries bottom-right aligned unless ``q_positions`` / ``kv_positions`` are
      given, as ``MaskSpec.to_dense``), or a bool tensor broadcastable to ``(B, H, Q, K)``; True = may attend.
    - ``backend``: ``"auto"`` (cheapest that supports the inputs, by estimated cost), ``"sdpa"``, ``"reference"``,
      ``"varlen"`` (per document), ``"blocksparse"`` (tiles of a block layout) or ``"flex"`` (compiled FlexAttention,
      opt-in; see ``attnmask.sparse``), ``"banded"`` (rows of many short documents: one SDPA call on a narrow band
      of small tiles, see ``attnmask.banded``), ``"native"`` (per document in a small C kernel built on first use:
      rows of many short documents, see ``attnmask.native``), or one registered later. ``scale`` defaults to
      ``D ** -0.5``.
    - ``dropout_p``: attention dropout in ``[0, 1)`` on the probabilities after the softmax, kept ones scaled by
      ``1 / (1 - p)`` (applied whenever > 0: pass 0 in evaluation). Only ``"reference"``, ``"sdpa"`` and
      ``"varlen"`` support it (``"auto"`` chooses among them); reproducible under ``torch.manual_seed`` for a given
      backend. See the module docstring.

    Memory: ``"sdpa"`` builds an O(B·Q·K) bool mask from a spec (none for ``None``, ``full()`` and a plain
    ``causal()`` with ``Q == K``, which uses ``is_causal``); ``"reference"`` materialises O(B·H·Q·K) float32 scores;
    ``"varlen"`` and ``"blocksparse"`` never build more than one document's or one tile group's mask; ``"banded"``
    builds an O(B·L·W·bs) bool mask of its band; ``"native"`` builds no mask at all. With ``dropout_p > 0``, torch's
    CPU SDPA runs its unfused kernel, which holds the O(B·H·Q·K) probabilities and dropout mask (``"varlen"``: one
    document group's at a time).

    Example: ``attention(q, k, v, causal() & key_padding(batch.attention_mask))`` on a left-padded batch gives 0 at
    the padding queries, which see no key.
    """
    q, k, v = autocast_inputs(q, k, v)
    with torch.autocast(q.device.type, enabled=False) if _autocasting(q) else contextlib.nullcontext():
        call = _prepare_call(q, k, v, mask, scale, q_positions, kv_positions, dropout_p)
        return choose_backend(call, backend).run(call)


def _autocasting(t: torch.Tensor) -> bool:
    return isinstance(t, torch.Tensor) and torch.is_autocast_enabled(t.device.type)


def autocast_inputs(q, k, v) -> tuple:
    """``q``, ``k``, ``v`` as SDPA receives them under the autocast active on ``q``'s device, else unchanged.

    Autocast runs ``scaled_dot_product_attention`` in its lower precision: every floating input that is not float64
    is cast to the autocast dtype (bfloat16 or float16), whatever mix of dtypes the model handed over (rotary
    embeddings often leave ``q`` and ``k`` in float32 beside a bfloat16 ``v``). The backend then runs with autocast
    disabled, so it computes in its declared precision for that dtype and returns that dtype, as SDPA does.
    """
    if not _autocasting(q):
        return q, k, v
    dtype = torch.get_autocast_dtype(q.device.type)

    def cast(t):
        eligible = isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype not in (torch.float64, dtype)
        return t.to(dtype) if eligible else t

    return cast(q), cast(k), cast(v)


def _prepare_call(q, k, v, mask, scale, q_positions, kv_positions, dropout_p=0.0) -> AttentionCall:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise bad(InputError, name, "a torch.Tensor", type(t).__name__)
        if t.dim() != 4:
            layout = "(B, H, Q, D)" if name == "q" else f"(B, Hkv, K, {'D' if name == 'k' else 'Dv'})"
            raise bad(ShapeError, name, f"a 4D tensor {layout}", f"shape {tuple(t.shape)}")
    if not q.is_floating_point():
        raise bad(DTypeError, "q", "a floating dtype", q.dtype)
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise bad(DTypeError, name, f"q's dtype {q.dtype}", t.dtype)
        if t.device != q.device:
            raise bad(DeviceError, name, f"q's device {q.device}", t.device)
    B, H, Q, D = q.shape
    if k.shape[0] != B:
        raise bad(ShapeError, "k", f"batch size {B} like q", f"shape {tuple(k.shape)}")
    if k.shape[3] != D:
        raise bad(ShapeError, "k", f"head dim {D} like q", f"shape {tuple(k.shape)}")
    if k.shape[1] == 0 or H % k.shape[1] != 0:
        raise bad(ShapeError, "k", f"a head count dividing q's {H} heads (grouped-query attention)", k.shape[1])
    if v.shape[:3] != k.shape[:3]:
        raise bad(ShapeError, "v", f"(B, Hkv, K) = {tuple(k.shape[:3])} like k", f"shape {tuple(v.shape)}")
    if scale is None:
        scale = D**-0.5 if D else 1.0
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise bad(InputError, "scale", "a finite number or None", repr(scale))
    dropout_p = check_dropout_p(dropout_p)
    K = k.shape[2]
    if isinstance(mask, MaskSpec):
        return _prepare_spec_call(q, k, v, mask, float(scale), q_positions, kv_positions, dropout_p)
    for name, pos in (("q_positions", q_positions), ("kv_positions", kv_positions)):
        if pos is not None:
            raise bad(InputError, name, "None unless mask is a MaskSpec (positions only place a spec)", "a value")
    if mask is not None:
        _check_tensor_mask(mask, (B, H, Q, K), q.device)
        mask = mask.view((1,) * (4 - mask.dim()) + tuple(mask.shape))
    return AttentionCall(q, k, v, mask, float(scale), dropout_p=dropout_p)


def _prepare_spec_call(q, k, v, spec, scale, q_positions, kv_positions, dropout_p=0.0) -> AttentionCall:
    B, Q, K = q.shape[0], q.shape[2], k.shape[2]
    if spec.batch_size not in (None, 1, B):
        raise bad(ShapeError, "mask", f"a spec with per-row data for 1 or {B} rows (q's batch)", spec.batch_size)
    if spec.device is not None and spec.device != q.device:
        raise bad(DeviceError, "mask", f"a spec whose per-row data is on q's device {q.device}", spec.device)
    for name, pos in (("q_positions", q_positions), ("kv_positions", kv_positions)):
        if isinstance(pos, torch.Tensor):
            if pos.device != q.device:
                raise bad(DeviceError, name, f"q's device {q.device}", pos.device)
            if pos.dim() == 2 and pos.shape[0] not in (1, B):
                raise bad(ShapeError, name, f"1 or {B} rows (q's batch)", f"shape {tuple(pos.shape)}")
    q_pos, kv_pos = resolve_positions(Q, K, q_positions=q_positions, kv_positions=kv_positions, device=q.device)
    given = q_positions is not None or kv_positions is not None
    return AttentionCall(q, k, v, spec, scale, q_pos, kv_pos, given, dropout_p)


def _check_tensor_mask(mask, target: tuple[int, int, int, int], device: torch.device) -> None:
    if not isinstance(mask, torch.Tensor):
        raise bad(InputError, "mask", "None, a MaskSpec or a bool tensor", type(mask).__name__)
    if mask.dtype != torch.bool:
        raise bad(DTypeError, "mask", "a bool tensor (True = may attend) or a MaskSpec", mask.dtype)
    if mask.device != device:
        raise bad(DeviceError, "mask", f"q's device {device}", mask.device)
    shape = tuple(mask.shape)
    fits = mask.dim() <= 4 and all(
        m in (1, t) for m, t in zip(reversed(shape), reversed(target[-len(shape) :]), strict=True)
    )
    if not fits:
        hint = " (a (B, Q, K) mask from to_dense needs .unsqueeze(1))" if mask.dim() == 3 else ""
        raise bad(ShapeError, "mask", f"a bool tensor broadcastable to (B, H, Q, K) = {target}{hint}", shape)


# ----------------------------------------------------------------------------------------------------------------------
# Sparse backends (attnmask.sparse): per-document SDPA, block-sparse tiles, compiled FlexAttention (opt-in)

from attnmask import sparse as _sparse  # noqa: E402  (sparse does not import this module)

VARLEN = register_backend(Backend("varlen", _sparse.varlen_run, _sparse.varlen_unsupported, _sparse.varlen_cost))
BLOCKSPARSE = register_backend(
    Backend("blocksparse", _sparse.blocksparse_run, _sparse.blocksparse_unsupported, _sparse.blocksparse_cost)
)
FLEX = register_backend(Backend("flex", _sparse.flex_run, _sparse.flex_unsupported, _sparse.flex_cost))

from attnmask import banded as _banded  # noqa: E402  (banded does not import this module)

BANDED = register_backend(Backend("banded", _banded.banded_run, _banded.banded_unsupported, _banded.banded_cost))

from attnmask import native as _native  # noqa: E402  (native does not import this module)

NATIVE = register_backend(Backend("native", _native.native_run, _native.native_unsupported, _native.native_cost))
