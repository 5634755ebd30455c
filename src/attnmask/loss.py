"""Token-normalised causal-LM cross entropy.

The loss of an optimizer step is the sum of its token losses divided by the number of target tokens in the whole step
(all gradient-accumulation micro-batches and, when distributed, all ranks), not a mean of per-batch means: a batch of
long sequences then weighs what its tokens weigh. Count the step's targets with `count_target_tokens` and pass the
total as ``num_items`` to every micro-batch's `masked_cross_entropy`.

Worked example: two micro-batches with 3 and 1 targets and token losses ``[1, 2, 3]`` and ``[6]``: with
``num_items=4`` they give ``6/4`` and ``6/4``, summing to the step's mean 3; per-batch means would give ``2 + 6``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F

from attnmask._checks import check_strided, dense_data
from attnmask.errors import DTypeError, InputError, NoTargetError, ShapeError, bad
from attnmask.labels import IGNORE_INDEX

__all__ = ["masked_cross_entropy", "count_target_tokens"]


def masked_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    num_items: int | torch.Tensor | None = None,
    *,
    allow_empty: bool = False,
) -> torch.Tensor:
    """Causal-LM cross entropy, shifted as in transformers' ``ForCausalLMLoss``: ``logits[:, t]`` predicts label t+1.

    - ``logits``: ``(B, L, V)`` floating (any float dtype; computed in float32); ``labels``: ``(B, L)`` integer,
      aligned with the inputs, ``-100`` = not a target.
    - ``num_items``: the target-token count of the whole optimizer step (an int or a 0-dim tensor, e.g. from
      `count_target_tokens`); the summed loss is divided by it. ``None``: divide by this batch's own count.
    - A micro-batch with no target gives exactly 0 (and a zero gradient), never NaN, when ``num_items`` (the step's
      count) is positive. A **step** with no target trains nothing: ``num_items=0``, or ``num_items=None`` with no
      target in this batch, raises `NoTargetError` unless ``allow_empty=True`` (then the loss is exactly 0). The
      check reads the count on the host: it is made for an int and for CPU tensors, and skipped for a count on an
      accelerator (it would cost a synchronisation).

    Returns a 0-dim float32 tensor. Memory: a float32 copy of half-precision ``logits`` (as transformers), none of
    contiguous float32 ones (the shift is on the labels). Label values are checked against the vocabulary when
    ``labels`` is on the CPU (on an accelerator that check would cost a synchronisation).
    ``labels`` and ``num_items`` given sparse are read as their dense values (nested ones raise `InputError`);
    ``logits`` must be dense and strided (`InputError` naming the layout otherwise).
    """
    if isinstance(logits, torch.Tensor):
        check_strided("logits", logits)
    labels = dense_data("labels", labels)
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3:
        raise bad(ShapeError, "logits", "a (B, L, V) tensor", _shape(logits))
    if not logits.is_floating_point():
        raise bad(DTypeError, "logits", "a floating tensor", logits.dtype)
    if not isinstance(labels, torch.Tensor) or tuple(labels.shape) != tuple(logits.shape[:2]):
        raise bad(ShapeError, "labels", f"shape {tuple(logits.shape[:2])} like logits' (B, L)", _shape(labels))
    if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
        raise bad(DTypeError, "labels", "an integer tensor", labels.dtype)
    vocab = logits.shape[-1]
    targets = labels[:, 1:].to(logits.device, torch.long)
    if targets.device.type == "cpu" and targets.numel():
        wrong = targets[(targets != IGNORE_INDEX) & ((targets < 0) | (targets >= vocab))]
        if wrong.numel():
            raise bad(InputError, "labels", f"ids in [0, {vocab}) or {IGNORE_INDEX}", f"{int(wrong[0])}")
    # The labels shifted, not the logits: position t's target is label t + 1, the last position's none. A slice of
    # the logits cost a copy of them (the reshape of a non-contiguous view) and a zero tensor of their size backward.
    shifted = F.pad(targets, (0, 1), value=IGNORE_INDEX) if logits.shape[1] else targets
    total = F.cross_entropy(
        logits.reshape(-1, vocab).float(), shifted.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    if num_items is None:
        denominator = (targets != IGNORE_INDEX).sum()
    else:
        denominator = _check_num_items(num_items)
    if not allow_empty and denominator.device.type == "cpu" and int(denominator) == 0:
        raise bad(
            NoTargetError,
            "num_items",
            "at least one target token in the optimizer step (or allow_empty=True)",
            "0" if num_items is not None else f"0 (no label of labels[:, 1:] {tuple(targets.shape)} is a target)",
        )
    return total / denominator.to(total.device).clamp_min(1).to(total.dtype)


def count_target_tokens(labels: torch.Tensor | Any | Iterable[Any]) -> torch.Tensor:
    """Target tokens after the causal shift (``labels[:, 1:] != -100``), as a 0-dim int64 tensor.

    ``labels``: a ``(B, L)`` tensor, a `Batch`, or an iterable of them (the micro-batches of one optimizer step).
    The result stays on the labels' device without a synchronisation, ready for ``all_reduce`` and ``num_items``.
    Sparse labels are read as their dense values; nested ones are refused (`InputError`).
    ``count_target_tokens(torch.tensor([[5, 6, -100], [7, -100, -100]]))`` is 1 + 0 = 1.
    """
    if isinstance(labels, torch.Tensor) or hasattr(labels, "labels"):
        return _count_one(labels)
    if isinstance(labels, (str, bytes)) or not isinstance(labels, Iterable):
        raise bad(InputError, "labels", "a (B, L) tensor, a Batch, or an iterable of them", type(labels).__name__)
    counts = [_count_one(x) for x in labels]
    if not counts:
        raise bad(InputError, "labels", "at least one labels tensor or Batch", "an empty iterable")
    return torch.stack([c.to(counts[0].device) for c in counts]).sum()


def _count_one(labels: Any) -> torch.Tensor:
    t = labels.labels if hasattr(labels, "labels") and not isinstance(labels, torch.Tensor) else labels
    t = dense_data("labels", t)
    if not isinstance(t, torch.Tensor) or t.dim() != 2:
        raise bad(ShapeError, "labels", "a (B, L) tensor", _shape(t))
    return (t[:, 1:] != IGNORE_INDEX).sum()


def _check_num_items(num_items: int | torch.Tensor) -> torch.Tensor:
    num_items = dense_data("num_items", num_items)
    if isinstance(num_items, torch.Tensor):
        if num_items.numel() != 1 or num_items.is_complex():
            raise bad(InputError, "num_items", "a 0-dim tensor or an int >= 0", f"shape {tuple(num_items.shape)}")
        return num_items.reshape(())
    if isinstance(num_items, bool) or not isinstance(num_items, int) or num_items < 0:
        raise bad(InputError, "num_items", "an int >= 0 or a 0-dim tensor", repr(num_items))
    return torch.tensor(num_items)


def _shape(x: Any) -> Any:
    return tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
