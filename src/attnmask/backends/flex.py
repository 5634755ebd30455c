"""The "flex" backend: compiled FlexAttention with the spec's block layout (opt-in: never picked by ``"auto"``).

Layer 3 (attention). The first call of each shape compiles for seconds, so ``"auto"`` never picks it
(``auto=False``); on CPU it runs forward only (compiled FlexAttention has no CPU backward: ``unsupported`` says so).
"""

from __future__ import annotations

import torch

from attnmask import masks as M
from attnmask.backends._common import cached, degenerate
from attnmask.backends.contract import ALL_DTYPES, TORCH_DEVICES, Backend
from attnmask.lowering import block_layout

__all__ = ["BACKEND"]

_FLEX_BLOCK = 128  # FlexAttention's CPU and GPU kernels are tuned for tiles of 128
_compiled_flex = None


def _flex():
    """``torch.compile(flex_attention)``, compiled once per process (the first call of each shape compiles)."""
    global _compiled_flex
    if _compiled_flex is None:
        from torch.nn.attention.flex_attention import flex_attention

        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex


def unsupported(call) -> str | None:
    if (empty := degenerate(call)) is not None or call.head_dim == 0:
        return empty or "needs a head dim >= 1"  # the compiled kernel dies on a division by zero otherwise
    if (
        call.q.device.type == "cpu"
        and torch.is_grad_enabled()
        and any(t.requires_grad for t in (call.q, call.k, call.v))
    ):
        return "compiled FlexAttention on CPU has no backward (use 'blocksparse' to train)"
    return None


def cost(call) -> float:
    """Opt-in: never chosen by "auto" (the first call of every shape compiles for seconds)."""
    return float("inf")


def run(call) -> torch.Tensor:
    """Compiled FlexAttention with ``layout.to_flex()`` (kept with the call's plans). A query row with no allowed key
    comes back as exact 0 from FlexAttention itself (the tests hold it to that)."""
    gqa = call.heads != call.kv_heads
    block_mask = cached(call, "flex", _flex_block_mask)
    return _flex()(call.q, call.k, call.v, block_mask=block_mask, scale=call.scale, enable_gqa=gqa)


def _flex_block_mask(call):
    spec = M.full() if call.mask is None else call.mask
    q_pos, kv_pos = (call.q_positions, call.kv_positions) if call.positions_given else (None, None)
    layout = block_layout(
        spec, call.q_len, call.kv_len, _FLEX_BLOCK, q_positions=q_pos, kv_positions=kv_pos, device=call.q.device
    )
    return layout.to_flex()


def _available() -> str | None:
    try:
        from torch.nn.attention.flex_attention import BlockMask  # noqa: F401
    except ImportError:
        return "this torch has no FlexAttention"
    return None


BACKEND = Backend(
    "flex",
    run,
    cost,
    devices=TORCH_DEVICES,
    dtypes=ALL_DTYPES,
    masks=frozenset({"none", "structural", "custom"}),
    auto=False,
    unsupported=unsupported,
    available=_available,
)
