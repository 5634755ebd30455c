"""References for block layouts shared by the lowering tests: tile classes from a dense mask, FlexAttention's own
block mask for a spec's predicate, and equality of two block masks."""

import torch
from torch.nn.attention.flex_attention import create_block_mask

from attnmask.lowering import PARTIAL


def dense_classes(dense: torch.Tensor, block_size: int) -> torch.Tensor:
    """Tile classes implied by a dense ``(B, Q, K)`` mask, counting only the pairs that exist in a short edge tile."""
    B, Q, K = dense.shape
    nq, nk = -(-Q // block_size), -(-K // block_size)
    pad = (0, nk * block_size - K, 0, nq * block_size - Q)
    tiles_all = torch.nn.functional.pad(dense, pad, value=True).view(B, nq, block_size, nk, block_size)
    tiles_any = torch.nn.functional.pad(dense, pad, value=False).view(B, nq, block_size, nk, block_size)
    every = tiles_all.all(4).all(2)
    some = tiles_any.any(4).any(2)
    return (every.to(torch.int8) - (~some).to(torch.int8)) + PARTIAL


def flex_reference(spec, q_len, kv_len, block_size):
    """FlexAttention's own block mask for the spec's predicate (evaluated per element)."""
    return create_block_mask(
        spec.mask_mod(q_offset=kv_len - q_len),
        spec.batch_size or 1,
        1,
        q_len,
        kv_len,
        device="cpu",
        BLOCK_SIZE=block_size,
    )


def assert_same_block_mask(got, want):
    assert got.seq_lengths == want.seq_lengths
    assert got.BLOCK_SIZE == want.BLOCK_SIZE
    for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices"):
        g, w = getattr(got, name), getattr(want, name)
        assert torch.equal(g, w), name
