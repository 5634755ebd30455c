"""The contract between ``attention()`` and its backends: the call a backend receives and what a backend declares.

A backend is one module under ``attnmask/backends/`` that builds one :class:`Backend`: three functions of an
:class:`AttentionCall` (``run``, ``cost`` and, for what no declaration can say, ``unsupported``) plus plain declared
capabilities (devices, dtypes, mask kinds, dropout, backward, score modifiers, whether ``"auto"`` may pick it).
:meth:`Backend.not_supported_reasons` turns the declarations into reasons, and the same reasons drive ``"auto"``'s
choice, the message of a refused explicit ``backend=``, ``attnmask.explain`` and the conformance tests.

Layer 3 (attention); imports only ``masks``, ``errors`` and their helpers (``_checks``, ``_dense``).

Worked example, a backend that only runs float32 CUDA calls without dropout::

    backend = Backend("mine", run, cost, devices=frozenset({"cuda"}), dtypes=frozenset({torch.float32}))
    backend.not_supported_reasons(call_on_cpu)   # ["runs on cuda, not cpu"]
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from attnmask._checks import check_strided
from attnmask._dense import warn_if_large
from attnmask.errors import DeviceError, DTypeError, InputError, ShapeError, bad
from attnmask.masks import And, Causal, Full, KeyPadding, MaskSpec, SlidingWindow

__all__ = [
    "ALL_DTYPES",
    "MASK_KINDS",
    "SCORE_MODS",
    "TORCH_DEVICES",
    "TRANSFORMS",
    "AttentionCall",
    "active_transforms",
    "Backend",
    "check_dropout_p",
    "check_score_mods",
    "dense_mask",
    "mask_kind",
    "no_floor",
    "rows_with_keys",
    "score_bias",
    "score_positions",
]

ALL_DTYPES = frozenset({torch.float64, torch.float32, torch.bfloat16, torch.float16})
TORCH_DEVICES = frozenset({"cpu", "cuda", "mps", "xpu"})
"""Device types torch's own operators (matmul, softmax, SDPA) run on: the devices of a backend written in torch."""
SCORE_MODS = frozenset({"softcap", "sinks", "alibi"})
"""Score modifiers a call may carry and a backend may declare: logit soft-capping, attention sinks, ALiBi slopes."""
MASK_KINDS = frozenset({"none", "tensor", "structural", "custom"})
"""What ``mask`` holds: ``None`` (or ``full()``), a bool tensor, a spec built from structural primitives, or a spec
holding a ``custom`` predicate (evaluated per pair, no structure to lower)."""
TRANSFORMS = frozenset({"grad", "vmap", "jvp", "functionalize"})
"""functorch transforms a call may run under and a backend may declare: ``torch.func.grad`` / ``vjp`` / ``jacrev``
(``"grad"``), ``torch.func.vmap``, ``torch.func.jvp`` / ``jacfwd`` (``"jvp"``) and ``functionalize``."""
_TRANSFORM_NAMES = {"Grad": "grad", "Vmap": "vmap", "Jvp": "jvp", "Functionalize": "functionalize"}


def active_transforms() -> frozenset[str]:
    """The functorch transforms active on this thread (``TRANSFORMS``' names; empty outside any), read from
    functorch's interpreter stack; every name of ``TRANSFORMS`` where that stack cannot be read but one is active."""
    if not torch._C._are_functorch_transforms_active():
        return frozenset()
    stack = getattr(torch._C._functorch, "get_interpreter_stack", None)
    try:
        found = frozenset(_TRANSFORM_NAMES.get(i.key().name, i.key().name.lower()) for i in (stack() or ()))
    except (AttributeError, RuntimeError, TypeError):  # another torch's functorch: assume the worst
        return TRANSFORMS
    return found or TRANSFORMS


# ----------------------------------------------------------------------------------------------------------------------
# The call


class _once:
    """A property computed on first read and kept in the instance's ``__dict__``, which later reads find first: what
    ``functools.cached_property`` does, without the lock it takes on every first read before Python 3.12 (~0.3 us of
    its ~0.5 on the dozen reads of a fresh call). Two threads reading at once may both compute it: only for pure
    functions of the instance."""

    def __init__(self, compute: Callable):
        self.compute = compute
        self.name = compute.__name__
        self.__doc__ = compute.__doc__

    def __set_name__(self, owner, name: str) -> None:
        self.name = name

    def __get__(self, instance, owner=None):
        if instance is None:
            return self
        value = instance.__dict__[self.name] = self.compute(instance)
        return value


@dataclass(frozen=True, eq=False)
class AttentionCall:
    """Validated inputs of one ``attention`` call.

    - ``q``, ``k``, ``v``: ``(B, H, Q, D)``, ``(B, Hkv, K, D)``, ``(B, Hkv, K, Dv)``, one floating dtype and one
      device, ``H % Hkv == 0``; not made contiguous (a backend that needs unit strides makes them so itself). Under a
      mask, ``k`` and ``v`` reach ``run`` finite unless the backend declares ``reads_masked_keys=False`` or
      ``propagates_nonfinite`` (``attention`` contains non-finite ones around the backend).
    - ``mask``: ``None``, the ``MaskSpec`` as given, or the bool tensor viewed as 4D (leading 1s added, not expanded).
    - ``scale``: the softmax scale as a float (``D ** -0.5`` unless given).
    - ``q_positions`` / ``kv_positions``: for a spec, the resolved int64 positions, ``(Q,)`` / ``(K,)`` or per row
      ``(B, Q)`` / ``(B, K)``, on ``q``'s device; ``None`` for a tensor or no mask.
    - ``positions_given``: whether the caller passed explicit positions (a backend may then not assume alignment).
    - ``dropout_p``: attention dropout probability in ``[0, 1)`` (0.0: none).
    - Score modifiers (``None``: absent), applied in this order to each score ``s = scale · q·k``, before the mask:
      ``softcap`` (a float > 0): ``s -> softcap · tanh(s / softcap)``; ``alibi_slopes`` ``(H,)`` float32/float64:
      ``s -> s - slope_h · (q_pos - k_pos)`` at the call's positions (bottom-right by default); ``sinks`` ``(H,)``
      (q's dtype or float32/float64): one logit per head added to the softmax denominator only (a virtual key whose
      value is 0), so a row's weights sum to less than 1; a row with no allowed key still gives exactly 0.

    The sizes and kinds derived from these (``batch`` ... ``masks_no_key``) are computed once per call object and kept
    in its ``__dict__`` (:class:`_once`: planning reads them ~100 times a choice); ``needs_grad`` follows the grad
    mode at each read.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    mask: MaskSpec | torch.Tensor | None
    scale: float
    q_positions: torch.Tensor | None = None
    kv_positions: torch.Tensor | None = None
    positions_given: bool = False
    dropout_p: float = 0.0
    softcap: float | None = None
    sinks: torch.Tensor | None = None
    alibi_slopes: torch.Tensor | None = None

    @_once
    def batch(self) -> int:
        return self.q.shape[0]

    @_once
    def heads(self) -> int:
        return self.q.shape[1]

    @_once
    def kv_heads(self) -> int:
        return self.k.shape[1]

    @_once
    def q_len(self) -> int:
        return self.q.shape[2]

    @_once
    def kv_len(self) -> int:
        return self.k.shape[2]

    @_once
    def head_dim(self) -> int:
        return self.q.shape[3]

    @_once
    def value_dim(self) -> int:
        return self.v.shape[3]

    @_once
    def device_type(self) -> str:
        return self.q.device.type

    @property
    def needs_grad(self) -> bool:
        """Autograd will record this call: grad mode is on and ``q``, ``k``, ``v`` or ``sinks`` requires a gradient."""
        return torch.is_grad_enabled() and self._inputs_require_grad

    @_once
    def _inputs_require_grad(self) -> bool:
        """Whether ``q``, ``k``, ``v`` or ``sinks`` requires a gradient (a call object lives for one ``attention``
        call, during which no input's ``requires_grad`` changes)."""
        tensors = (self.q, self.k, self.v) if self.sinks is None else (self.q, self.k, self.v, self.sinks)
        return any(t.requires_grad for t in tensors)

    @_once
    def score_mods(self) -> frozenset[str]:
        """Names of the score modifiers the call carries, among :data:`SCORE_MODS`."""
        present = (("softcap", self.softcap), ("sinks", self.sinks), ("alibi", self.alibi_slopes))
        return frozenset(name for name, value in present if value is not None)

    @_once
    def mask_heads(self) -> int | None:
        """The head count of a per-head spec (``mask.heads``, equal to :attr:`heads`), else ``None``."""
        return self.mask.heads if isinstance(self.mask, MaskSpec) else None

    @_once
    def is_plain_causal(self) -> bool:
        """The mask is exactly ``causal()`` with ``Q == K`` and default positions (SDPA's top-left ``is_causal``)."""
        return type(self.mask) is Causal and self.q_len == self.kv_len and not self.positions_given

    @_once
    def is_full(self) -> bool:
        """No key is ever masked: no mask, or exactly ``full()``."""
        return self.mask is None or type(self.mask) is Full

    @_once
    def masks_no_key(self) -> bool:
        """Every query may see every key: :attr:`is_full`, or ``causal()`` with one query at the default
        (bottom-right) position, the last one, which sees every key (a decoding step)."""
        one_causal_query = type(self.mask) is Causal and self.q_len == 1 and not self.positions_given
        return self.is_full or (one_causal_query and self.kv_len >= 1)


def mask_kind(call: AttentionCall) -> str:
    """One of :data:`MASK_KINDS` for ``call.mask``."""
    if call.is_full:
        return "none"
    if isinstance(call.mask, MaskSpec):
        return "structural" if call.mask.is_structural else "custom"
    return "tensor"


def check_dropout_p(dropout_p) -> float:
    """``dropout_p`` as a float in ``[0, 1)``, or an ``InputError`` naming it."""
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0 <= dropout_p < 1:
        raise bad(InputError, "dropout_p", "a number in [0, 1)", repr(dropout_p))
    return float(dropout_p)


def check_score_mods(q: torch.Tensor, softcap, sinks, alibi_slopes) -> dict:
    """The score modifiers that are given, checked: ``softcap`` a finite number > 0; ``sinks`` and ``alibi_slopes``
    finite floating ``(H,)`` tensors on q's device (slopes without a gradient). Typed errors name the argument."""
    mods = {}
    if softcap is not None:
        if isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not 0 < softcap < math.inf:
            raise bad(InputError, "softcap", "None or a finite number > 0", repr(softcap))
        mods["softcap"] = float(softcap)
    H = q.shape[1]
    for name, t in (("sinks", sinks), ("alibi_slopes", alibi_slopes)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise bad(InputError, name, f"None or a ({H},) tensor (one value per query head)", type(t).__name__)
        check_strided(name, t)
        if tuple(t.shape) != (H,):
            raise bad(ShapeError, name, f"shape ({H},) (one value per query head)", f"shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise bad(DTypeError, name, "a floating dtype", t.dtype)
        if t.device != q.device:
            raise bad(DeviceError, name, f"q's device {q.device}", t.device)
        if not bool(torch.isfinite(t.detach()).all()):
            raise bad(InputError, name, "finite values", t.detach().tolist())
        mods[name] = t
    if alibi_slopes is not None and alibi_slopes.requires_grad and torch.is_grad_enabled():
        raise bad(InputError, "alibi_slopes", "fixed slopes (no gradient: detach them)", "a tensor requiring grad")
    return mods


def dense_mask(call: AttentionCall) -> tuple[torch.Tensor | None, bool]:
    """The call's mask as a bool tensor that broadcasts to ``(B, H, Q, K)``, and whether the caller owns it.

    A spec becomes ``(B or 1, 1, Q, K)`` via ``MaskSpec.to_dense`` (O(B·Q·K) memory), a per-head spec
    ``(B or 1, H, Q, K)`` (``to_dense(..., per_head=True)``, O(B·H·Q·K)): a fresh tensor the caller may write to
    (owned), unless the spec holds a ``custom`` predicate whose result might alias the user's data, which only a
    per-head spec's copy into its ``(B, H, Q, K)`` buffer rules out; a tensor mask is returned as given (not owned);
    ``None`` stays ``None``.
    """
    if isinstance(call.mask, MaskSpec):
        if (banded := _padded_band(call)) is not None:
            return banded, True
        where = dict(q_positions=call.q_positions, kv_positions=call.kv_positions, device=call.q.device)
        if call.mask_heads is not None:
            return call.mask.to_dense(call.q_len, call.kv_len, per_head=True, **where), True
        dense = call.mask.to_dense(call.q_len, call.kv_len, **where)
        return dense.unsqueeze(1), call.mask.is_structural
    return call.mask, False


def _padded_band(call: AttentionCall) -> torch.Tensor | None:
    """``(R, 1, Q, K)`` bool: ``MaskSpec.to_dense`` of ``[causal() | full()] & [sliding_window(w)...] &
    [key_padding(m)...]`` at the default positions (the queries the last ``Q <= K`` of ``K``) on CPU, built as the
    padding masks' AND (``R`` their rows, 1 without one) and the causal or window band of the last ``Q`` positions:
    ~6 operations where the general evaluation takes ~25 (a decoding step on 2 rows of 300 keys: 17 against 80 us;
    8 padded rows of 256: 45 against 94). ``None`` for any other spec or call, which the general path builds."""
    spec = call.mask
    if call.positions_given or call.mask_heads is not None or call.q.device.type != "cpu" or call.q_len > call.kv_len:
        return None
    Q, K = call.q_len, call.kv_len
    causal, window, real = False, None, None
    for part in spec.parts if type(spec) is And else (spec,):
        if type(part) is Causal:
            causal = True
        elif type(part) is SlidingWindow:
            causal, window = True, part.window if window is None else min(window, part.window)
        elif type(part) is KeyPadding:
            mask = part.attention_mask
            if (
                mask.device.type != "cpu"
                or mask.dim() != 2
                or mask.shape[1] < K
                or mask.shape[0] not in (1, call.batch)
            ):
                return None
            mask = mask[:, :K] if mask.dtype == torch.bool else mask[:, :K] != 0
            real = mask if real is None else real & mask
        elif type(part) is not Full:
            return None
    if real is None:
        real = torch.ones((1, K), dtype=torch.bool)
    warn_if_large((real.shape[0], Q, K), torch.bool)  # as to_dense logs it, before the allocation
    if not causal:
        return real[:, None, None, :].expand(real.shape[0], 1, Q, K).clone()
    keys, queries = torch.arange(K), torch.arange(K - Q, K)
    band = keys[None, :] <= queries[:, None]
    if window is not None:
        band &= keys[None, :] > queries[:, None] - window
    return real[:, None, None, :] & band


def score_positions(call: AttentionCall) -> tuple[torch.Tensor, torch.Tensor]:
    """Query and key positions ``(B or 1, Q)`` and ``(B or 1, K)`` int64 on q's device: the call's resolved ones for
    a spec, else the default bottom-right ones (queries ``K - Q .. K - 1``, keys ``0 .. K - 1``)."""
    device = call.q.device
    q_pos, kv_pos = call.q_positions, call.kv_positions
    if q_pos is None:
        q_pos = torch.arange(call.kv_len - call.q_len, call.kv_len, device=device)
    if kv_pos is None:
        kv_pos = torch.arange(call.kv_len, device=device)
    return q_pos.reshape(-1, call.q_len), kv_pos.reshape(-1, call.kv_len)


def score_bias(call: AttentionCall, dtype: torch.dtype) -> torch.Tensor | None:
    """The ALiBi term ``-slope_h · (q_pos - k_pos)`` as ``(B or 1, H, Q, K)`` in ``dtype`` (O(B·H·Q·K)), or ``None``
    without ``alibi_slopes``. For the dense backends only; the native kernel adds it per pair."""
    if call.alibi_slopes is None:
        return None
    q_pos, kv_pos = score_positions(call)
    distance = (q_pos[:, :, None] - kv_pos[:, None, :]).to(dtype)  # (B or 1, Q, K)
    return -call.alibi_slopes.to(dtype)[None, :, None, None] * distance[:, None]


def rows_with_keys(mask: torch.Tensor) -> torch.Tensor:
    """``(..., Q, 1)`` bool: whether each query row of a dense mask ``(..., Q, K)`` allows at least one key. (The
    maximum of the mask read as bytes: a reduction over a short last axis that runs ~20x faster than ``any`` on CPU.)"""
    if mask.shape[-1] == 0:
        return mask.any(dim=-1, keepdim=True)
    return mask.view(torch.uint8).amax(dim=-1, keepdim=True).view(torch.bool)


# ----------------------------------------------------------------------------------------------------------------------
# The backend


def _no_reason(call: AttentionCall) -> str | None:
    return None


def _always_available() -> str | None:
    return None


def _every_key(call: AttentionCall) -> slice:
    return slice(None)


def _no_scratch(call: AttentionCall) -> int:
    return 0


def no_floor(call: AttentionCall) -> float:
    """The default ``Backend.floor``: no bound, so ``"auto"`` always asks such a backend's ``cost``."""
    return 0.0


@dataclass(frozen=True)
class Backend:
    """An attention implementation and what it declares it supports.

    - ``run(call)``: the ``(B, H, Q, Dv)`` output in ``q``'s dtype.
    - ``cost(call)``: estimated work in element operations, only compared between backends (``inf``: never auto).
    - ``devices``: device types it runs on (``"cpu"``, ``"cuda"``, ...); ``dtypes``: the floating dtypes it computes
      in their declared precision (float64 in float64, the rest at least in float32 accumulation).
    - ``masks``: the mask kinds of :data:`MASK_KINDS` it takes; ``per_head``: whether it honours a per-head spec
      (``mask.heads`` set, one mask per query head, ``(B, H, Q, K)``), False by default, so a backend that applies
      one mask to every head refuses such a spec instead of using one head's; ``unsupported(call)``: a reason for
      what no declaration can say (the spec's structure, explicit positions), or ``None``; consulted only when every
      declaration holds.
    - ``dropout``: attention dropout (``dropout_p > 0``); ``backward``: a gradient through ``q``, ``k``, ``v``;
      ``score_mods``: the score modifiers it honours, by name (:data:`SCORE_MODS`); a call carrying any other is
      refused, so a backend written before a modifier existed never drops it.
    - ``auto``: where ``"auto"`` may pick it: ``True`` (on every declared device), ``False`` (named explicitly only),
      or the device types where it may (FlexAttention: CUDA, where it trains; on CPU it compiles per shape and has no
      backward). Read through :meth:`auto_on`.
    - ``reads_masked_keys``: whether its kernel may touch a key or value the mask denies (a dense matmul multiplies
      by probability 0, and 0 · NaN is NaN). ``attention`` then keeps non-finite keys and values from the queries that
      may not see them; a backend that never reads a denied key (``False``) skips that check.
      ``masked_key_span(call)``: the slice of keys among which a denied one may be read (default: every key), so that
      check scans only those (e.g. "sdpa"'s causal split reads denied keys only in its last ``Q``).
      ``propagates_nonfinite``: the device types on which a non-finite denied key or value either leaves every
      output element as it would be without it or makes some output element non-finite, never a different finite
      value (a probability of exactly 0 times NaN: skipped, or NaN; a NaN score: NaN through the softmax). There,
      ``attention`` may scan the output of a call without a gradient after the run instead of ``k`` and ``v``
      before it, so ``run`` may receive non-finite denied keys and values (none by default: they reach ``run``
      finite). The conformance tests check the declaration on CPU.
    - ``transforms``: the functorch transforms (:data:`TRANSFORMS`) under which it computes the call exactly
      (``torch.func.grad`` through plain torch operators, say); none by default, so a backend whose kernel reads data
      pointers, starts threads or reads values back is refused under a transform instead of failing inside it.
    - ``available()``: ``None`` when its environment serves it (a compiler, an optional package, a torch with the
      kernel), else why not; called on every dispatch, so it should cache its answer.
    - ``scratch_bytes(call)``: about the bytes a run allocates that grow with ``Q·K`` (a dense mask, materialised
      scores), 0 when none do (the default). Measured tuning (``attnmask.tuning``) does not time a backend whose
      scratch would pass ``tuning.TRIAL_SCRATCH_BYTES`` beyond what the estimates' pick allocates.
    - ``floor(call)``: a lower bound of ``cost(call)`` that builds no plan (a few counts on the spec's host data),
      ``0.0`` when it knows none (the default, :func:`no_floor`). ``"auto"`` first asks the backends without a floor
      for their estimates, then skips a backend whose floor passes the cheapest estimate in hand: it could not be
      picked, so neither its plan nor its ``unsupported`` is built. It must never exceed ``cost(call)``
      (``tests/test_floors.py`` holds the built-in ones to it on random specs), else ``"auto"`` could miss the
      cheapest backend.
    """

    name: str
    run: Callable[[AttentionCall], torch.Tensor]
    cost: Callable[[AttentionCall], float]
    devices: frozenset[str] = frozenset({"cpu"})
    dtypes: frozenset[torch.dtype] = ALL_DTYPES
    masks: frozenset[str] = MASK_KINDS
    per_head: bool = False
    dropout: bool = False
    backward: bool = True
    score_mods: frozenset[str] = frozenset()
    auto: bool | frozenset[str] = True
    reads_masked_keys: bool = True
    propagates_nonfinite: frozenset[str] = frozenset()
    masked_key_span: Callable[[AttentionCall], slice] = _every_key
    unsupported: Callable[[AttentionCall], str | None] = _no_reason
    available: Callable[[], str | None] = _always_available
    scratch_bytes: Callable[[AttentionCall], int] = _no_scratch
    floor: Callable[[AttentionCall], float] = no_floor
    transforms: frozenset[str] = frozenset()

    def auto_on(self, device_type: str) -> bool:
        """Whether ``"auto"`` may pick this backend for a call on ``device_type`` (if it supports the call)."""
        return self.auto if isinstance(self.auto, bool) else device_type in self.auto

    def not_supported_reasons(self, call: AttentionCall) -> list[str]:
        """Why this backend cannot serve ``call``, from its declarations first; empty when it can."""
        reasons = []
        if call.device_type not in self.devices:
            reasons.append(f"runs on {', '.join(sorted(self.devices))}, not {call.device_type}")
        if call.q.dtype not in self.dtypes:
            names = ", ".join(sorted(str(d).removeprefix("torch.") for d in self.dtypes))
            reasons.append(f"computes {names}, not {str(call.q.dtype).removeprefix('torch.')}")
        kind = mask_kind(call)
        if kind not in self.masks:
            reasons.append(f"takes masks of kind {', '.join(sorted(self.masks))}, not {kind}")
        if call.mask_heads is not None and not self.per_head:
            reasons.append(f"takes one mask for every head, not a per-head spec ({call.mask_heads} heads)")
        if call.dropout_p > 0 and not self.dropout:
            reasons.append(f"has no attention dropout (dropout_p={call.dropout_p})")
        if call.needs_grad and not self.backward:
            reasons.append("has no backward (a gradient is needed)")
        missing = call.score_mods - self.score_mods
        if missing:
            reasons.append(f"does not honour score modifiers {', '.join(sorted(missing))}")
        outside = active_transforms() - self.transforms
        if outside:
            runs = f"runs under {', '.join(sorted(self.transforms))}" if self.transforms else "runs under no transform"
            reasons.append(f"{runs}, not inside torch.func transforms {', '.join(sorted(outside))}")
        if reasons:
            return reasons
        environment = self.available()
        if environment is not None:
            return [environment]
        specific = self.unsupported(call)
        return [] if specific is None else [specific]

    def supports(self, call: AttentionCall) -> bool:
        return not self.not_supported_reasons(call)
