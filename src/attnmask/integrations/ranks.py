"""The process group, read lazily, and the target-token count of an optimizer step across ranks.

Layer 8 (integrations), shared by :mod:`attnmask.integrations.context_parallel`, :mod:`attnmask.integrations.sampler`
and :mod:`attnmask.integrations.hf`. Nothing touches ``torch.distributed`` at import time: process-group state is read
when a function needs it, and an uninitialised process group means one process (world size 1, rank 0), so the same
code runs under ``torchrun`` and in a plain script.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from attnmask.errors import InputError, bad
from attnmask.loss import count_target_tokens

__all__ = ["global_num_items", "resolve_world", "world"]


def world(group: Any = None) -> tuple[int, int]:
    """``(world_size, rank)`` of ``group``, or ``(1, 0)`` when torch.distributed is not initialised."""
    if not dist.is_available() or not dist.is_initialized():
        if group is not None:
            raise bad(InputError, "group", "None unless torch.distributed is initialised", repr(group))
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def resolve_world(world_size: int | None, rank: int | None, group: Any) -> tuple[int, int]:
    """``(world_size, rank)`` as given, each defaulting to ``group``'s; checked (``0 <= rank < world_size``)."""
    if world_size is None or rank is None:
        w, r = world(group)
        world_size = w if world_size is None else world_size
        rank = r if rank is None else rank
    _check_int("world_size", world_size, 1)
    _check_int("rank", rank, 0)
    if rank >= world_size:
        raise bad(InputError, "rank", f"an int in [0, {world_size})", rank)
    return world_size, rank


def _check_int(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise bad(InputError, name, f"an int >= {low}", repr(value))


def global_num_items(labels: Any, *, group: Any = None) -> torch.Tensor:
    """Target tokens of the whole optimizer step, summed over gradient-accumulation micro-batches and ranks.

    ``labels``: one ``(B, L)`` labels tensor or ``Batch``, or a list of them (the micro-batches this rank runs in the
    step), aligned with ``input_ids`` as in transformers (the model shifts; a target is a ``labels[:, 1:]`` entry
    other than -100). The count is all-reduced (sum) over ``group`` when torch.distributed is initialised. Returns a
    0-dim int64 tensor on the labels' device (``attnmask.integrations.hf.num_items_in_step`` builds on it).

    Use: ``loss = masked_cross_entropy(logits, labels, num_items=n)`` on each rank gives this rank's share of the
    step's mean loss; the shares add up to the mean over every token of every rank, each token weighted the same.
    DDP *averages* gradients over ranks, so back-propagate ``loss * world_size`` to get the single-process gradient
    (as transformers' Trainer does with ``average_tokens_across_devices``). Example: ranks with 3 and 5 targets both
    get ``8``.
    """
    count = count_target_tokens(labels)
    world_size, _ = world(group)
    if world_size == 1:
        return count
    on_wire = count.cpu() if dist.get_backend(group) == dist.Backend.GLOO else count.clone()
    dist.all_reduce(on_wire, group=group)
    return on_wire.to(count.device)
