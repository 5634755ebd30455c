"""``attnmask.distributed``: the torch.distributed tools under one name, as the README imports them.

A namespace only; the code lives in :mod:`attnmask.integrations.context_parallel` (context parallelism),
:mod:`attnmask.integrations.sampler` (the balanced packed sampler) and :mod:`attnmask.integrations.ranks`
(``global_num_items``, the target tokens of an optimizer step over ranks).
"""

from attnmask.integrations.context_parallel import (
    SpecSlice,
    context_parallel_attention,
    context_parallel_method,
    context_parallel_positions,
    context_parallel_slices,
    shard_for_context_parallel,
)
from attnmask.integrations.ranks import global_num_items
from attnmask.integrations.sampler import DistributedPackedSampler, SamplerStats

__all__ = [
    "DistributedPackedSampler",
    "SamplerStats",
    "SpecSlice",
    "context_parallel_attention",
    "context_parallel_method",
    "context_parallel_positions",
    "context_parallel_slices",
    "global_num_items",
    "shard_for_context_parallel",
]
