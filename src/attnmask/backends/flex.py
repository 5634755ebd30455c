"""``"flex"``: FlexAttention compiled with the spec's block layout (``BlockLayout.to_flex()``).

Layer 3 (attention); imports ``masks``, ``lowering``, ``plancache`` and ``backends.contract``.

Any mask spec, structural or ``custom`` (the predicate is the spec's ``mask_mod``, evaluated only in PARTIAL tiles of
128 x 128), explicit positions, grouped-query attention (``enable_gqa``), ``Q < K``. A per-head spec: one layout for
all heads (the union over heads, ``BlockLayout``), and FlexAttention hands the predicate of PARTIAL tiles the query
head, so every head gets its own mask. A query row with no allowed key
comes back as exact 0 from FlexAttention itself (the tests and ``benchmarks/device_check.py`` hold it to that).

- On CUDA: forward and backward, float32, float16 and bfloat16, head dims of at least 16 (Triton's ``tl.dot``); a
  real candidate of ``"auto"``, costed by ``cuda_costs.flex_cost`` (the tiles it computes).
- On CPU: forward only (compiled FlexAttention has no CPU backward: train with ``"blocksparse"``), and never chosen
  by ``"auto"`` (cost ``inf``): named explicitly only. The first call of each shape and dtype is checked against
  uncompiled FlexAttention on the same inputs and block mask (which materialises the ``(B, H, Q, K)`` scores once;
  "shape" here includes the spec's structure, which picks the compiled kernel, not its tensors' values):
  on an AVX2-only AMD EPYC, torch 2.13's compiled CPU kernel returned wrong values or NaN for some shapes (head dim
  8 on rows of 40: errors of 0.7-2.9 where the uncompiled one matched the reference to 5e-7; RESULTS.md, issue 15).
  A shape that disagrees raises ``BackendError`` and is refused from then on (``explain`` says why).

Every new shape compiles (``torch.compile(flex_attention, dynamic=False)``, seconds; forward and backward on first use
with a gradient), so rows of a fixed length suit it best. Torch keeps at most ``torch._dynamo.config.recompile_limit``
compiled variants of ``flex_attention`` (8 by default) and runs any further one uncompiled, materialising the
``(B, H, Q, K)`` scores (seen on torch 2.13: the ninth row length). So once torch holds that many, a call whose
signature (shapes, dtype, spec structure, gradient, scale) has not run here is refused with the reason: ``"auto"``
takes another backend, and ``backend="flex"`` raises ``BackendError`` instead of falling back silently.
"""

from __future__ import annotations

import warnings

import torch

import attnmask.backends.cuda_costs as cuda_costs
from attnmask.backends._common import cached, degenerate
from attnmask.backends.contract import Backend
from attnmask.errors import BackendError, bad
from attnmask.lowering import block_layout
from attnmask.masks import MaskSpec, full

__all__ = ["BACKEND", "BLOCK_SIZE", "flex_cost", "flex_run", "flex_unsupported"]

BLOCK_SIZE = 128  # FlexAttention's CPU and GPU kernels are tuned for tiles of 128
_DTYPES = frozenset({torch.float32, torch.float16, torch.bfloat16})  # the CPU kernel refuses float64
_MIN_CUDA_HEAD_DIM = 16
_compiled_flex = None
_CPU_CHECKED: dict[tuple, float | None] = {}  # CPU shapes and dtype -> None (agreed with eager) or the max difference
_RAN: set[tuple] = set()  # the signatures (_compile_signature) compiled FlexAttention has run in this process


def _flex():
    """``torch.compile(flex_attention)``, compiled once per process (the first call of each shape compiles)."""
    global _compiled_flex
    if _compiled_flex is None:
        from torch.nn.attention.flex_attention import flex_attention

        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex


def _layout(call):
    """The call's ``BlockLayout`` in tiles of ``BLOCK_SIZE``: on the device of a structural spec's data (the CPU for a
    spec without tensors, where its O(B·nQ·nK) tile arithmetic is cheapest), else on ``q``'s device (explicit
    positions, or a ``custom`` predicate, which may read tensors of its own)."""
    spec = full() if call.mask is None else call.mask
    q_pos, kv_pos = (call.q_positions, call.kv_positions) if call.positions_given else (None, None)
    device = call.q.device if call.positions_given or not spec.is_structural else spec.device
    return block_layout(
        spec, call.q_len, call.kv_len, BLOCK_SIZE, q_positions=q_pos, kv_positions=kv_pos, device=device
    )


def _block_mask(call):
    return cached(call, "flex_layout", _layout).to_flex().to(call.q.device)


def flex_unsupported(call) -> str | None:
    """What the declarations cannot say: degenerate shapes (the compiled kernel dies on them), no CPU backward,
    Triton's smallest head dim on CUDA."""
    if (empty := degenerate(call)) is not None or call.head_dim == 0:
        return empty or "needs a head dim >= 1"  # the compiled kernel dies on a division by zero otherwise
    device = call.device_type
    if device == "cpu" and call.needs_grad:
        return "compiled FlexAttention on CPU has no backward (use 'blocksparse' to train)"
    if device == "cpu" and (error := _CPU_CHECKED.get(_compile_signature(call)[0])) is not None:
        return _miscompiled(error)
    if device == "cuda" and min(call.head_dim, call.value_dim) < _MIN_CUDA_HEAD_DIM:
        return (
            f"FlexAttention's CUDA kernel needs head dims >= {_MIN_CUDA_HEAD_DIM}, got D={call.head_dim}, "
            f"Dv={call.value_dim}"
        )
    if _compile_signature(call) not in _RAN:
        held, limit = _compiled_variants(), _recompile_limit()
        if held is not None and held >= limit:
            return (
                f"torch holds {held} compiled FlexAttention variants, its recompile limit "
                f"(torch._dynamo.config.recompile_limit = {limit}): a new shape would run uncompiled, materialising "
                "the (B, H, Q, K) scores"
            )
    return None


def _compile_signature(call) -> tuple:
    """What a compiled variant is kept for, as far as this module knows: ``_cpu_signature``, whether a gradient is
    needed and the scale (a Python float the compiler specialises on). Kept with the call's plans, whose key holds
    all three (walking the spec's structure costs ~20 us, and both ``flex_unsupported`` and ``flex_run`` ask)."""
    return cached(call, "flex_signature", lambda c: (_cpu_signature(c), c.needs_grad, c.scale))


def _compiled_variants() -> int | None:
    """How many compiled variants of ``flex_attention`` torch holds (its cache entries on the function's code), or
    ``None`` where this torch does not say."""
    try:
        from torch._dynamo.eval_frame import _debug_get_cache_entry_list
        from torch.nn.attention.flex_attention import flex_attention

        return len(_debug_get_cache_entry_list(flex_attention.__code__))
    except (ImportError, AttributeError, TypeError, RuntimeError):
        return None


def _recompile_limit() -> int:
    config = torch._dynamo.config
    return int(getattr(config, "recompile_limit", getattr(config, "cache_size_limit", 8)))


def flex_available() -> str | None:
    try:
        from torch.nn.attention.flex_attention import BlockMask  # noqa: F401
    except ImportError:
        return "this torch has no FlexAttention"
    return None


def flex_cost(call) -> float:
    """``inf`` on CPU (compiles per shape: named explicitly only); on CUDA ``cuda_costs.flex_cost`` of the tiles the
    layout computes. A ``custom`` predicate is not laid out just to estimate (that evaluates every pair)."""
    if call.device_type != "cuda":
        return float("inf")
    if isinstance(call.mask, MaskSpec) and not call.mask.is_structural:
        return cuda_costs.flex_cost(call, None, BLOCK_SIZE, 1)
    layout = cached(call, "flex_layout", _layout)
    return cuda_costs.flex_cost(call, layout.counts(), BLOCK_SIZE, layout.batch_size)


def flex_run(call) -> torch.Tensor:
    """Compiled FlexAttention with the layout's ``BlockMask`` (kept with the call's plans); on CPU, checked against
    uncompiled FlexAttention on the first call of each shape and dtype (see the module docstring)."""
    block_mask = cached(call, "flex", _block_mask)
    kwargs = dict(block_mask=block_mask, scale=call.scale, enable_gqa=call.heads != call.kv_heads)
    out = _flex()(call.q, call.k, call.v, **kwargs)
    _RAN.add(_compile_signature(call))
    if call.device_type != "cpu":
        return out
    signature = _compile_signature(call)[0]
    if signature not in _CPU_CHECKED:
        _CPU_CHECKED[signature] = _verdict(call, kwargs, out)
    if (error := _CPU_CHECKED[signature]) is not None:
        raise bad(
            BackendError, "backend", "a backend whose kernel computes this call ('flex' cannot)", _miscompiled(error)
        )
    return out


def _cpu_signature(call) -> tuple:
    """What picks the compiled kernel: the shapes, the dtype and the spec's structure (each part's type and fields; a
    tensor by its shape and dtype, a predicate by its code and what its closure holds), not the tensors' values."""
    structure = call.mask.structure(_kernel_key) if isinstance(call.mask, MaskSpec) else (type(call.mask).__name__,)
    return tuple(call.q.shape), tuple(call.k.shape), tuple(call.v.shape), call.q.dtype, structure


def _kernel_key(value, depth: int = 0):
    """A hashable stand-in for ``value`` as the compiler guards on it: scalars as they are, a tensor by its shape and
    dtype, a function by its code and the keys of its closure's contents (two lambdas differ; so does one closing over
    another window), anything else by its type."""
    if isinstance(value, (int, float, str, bool, type(None), torch.dtype)):
        return value
    if isinstance(value, torch.Tensor):
        return tuple(value.shape), value.dtype
    if isinstance(value, (tuple, list)) and depth < 4:
        return tuple(_kernel_key(item, depth + 1) for item in value)
    code = getattr(value, "__code__", None)
    if code is not None and depth < 4:
        cells = []
        for cell in getattr(value, "__closure__", None) or ():
            try:
                cells.append(_kernel_key(cell.cell_contents, depth + 1))
            except ValueError:  # an empty cell
                cells.append(None)
        return code, tuple(cells)
    return type(value).__qualname__


def _eager_flex(*args, **kwargs) -> torch.Tensor:
    """Uncompiled FlexAttention (it materialises the scores), without its warning that it is unfused."""
    from torch.nn.attention.flex_attention import flex_attention

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return flex_attention(*args, **kwargs)


def _verdict(call, kwargs: dict, out: torch.Tensor) -> float | None:
    """``_difference`` of the compiled kernel's ``out`` against uncompiled FlexAttention on the same call; on inputs
    with a NaN or an infinity, of both on the inputs with those entries at 0 instead (the verdict is kept for every
    later call of the shape, and the two may differ on a row whose scores are NaN without the kernel being wrong)."""
    q, k, v = call.q, call.k, call.v
    if all(bool(torch.isfinite(t).all()) for t in (q, k, v)):
        return _difference(out, _eager_flex(q, k, v, **kwargs))
    q, k, v = (torch.nan_to_num(t, nan=0.0, posinf=0.0, neginf=0.0) for t in (q, k, v))
    return _difference(_flex()(q, k, v, **kwargs), _eager_flex(q, k, v, **kwargs))


def _difference(got: torch.Tensor, want: torch.Tensor) -> float | None:
    """``None`` when ``got`` equals ``want`` up to the rounding of its dtype (NaN where ``want`` has NaN), else the
    largest difference (``inf`` for a NaN or infinity ``want`` has not)."""
    tol = 1e-4 if got.dtype in (torch.float32, torch.float64) else 2e-2
    got, want = got.double(), want.double()
    if not torch.equal(torch.isfinite(got), torch.isfinite(want)):
        return float("inf")
    finite = torch.isfinite(want)
    diff = (got[finite] - want[finite]).abs()
    if diff.numel() == 0 or bool((diff <= tol * (1 + want[finite].abs())).all()):
        return None
    return float(diff.max())


def _miscompiled(error: float) -> str:
    return (
        f"compiled FlexAttention on this CPU computed this shape wrongly (largest difference {error:.3g} against "
        "uncompiled FlexAttention on the same call); use 'blocksparse'"
    )


BACKEND = Backend(
    "flex",
    flex_run,
    flex_cost,
    devices=frozenset({"cpu", "cuda"}),
    dtypes=_DTYPES,
    masks=frozenset({"none", "structural", "custom"}),
    per_head=True,  # the layout is the union over heads; FlexAttention passes the query head to the predicate
    dropout=False,
    backward=True,  # on CUDA; flex_unsupported refuses a CPU call that needs a gradient
    auto=frozenset({"cuda"}),  # on CPU every shape compiles and nothing trains: named explicitly only
    unsupported=flex_unsupported,
    available=flex_available,
)
