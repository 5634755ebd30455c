"""Label masking by length and position, never by token id.

Labels follow Hugging Face: ``labels`` is aligned with ``input_ids`` (``(B, L)`` int64) and the model shifts, so the
label at position ``t`` is the target predicted from positions ``< t``. ``IGNORE_INDEX`` (-100) marks a position that
is not a target. Which positions are ignored is decided from lengths, spans and the attention mask only: with
``pad_id == eos_id`` a real EOS token keeps its label, because nothing here compares token ids.

Worked example, right padding, prompt of 2 tokens in row 0::

    input_ids      = [[5, 6, 7, 2], [8, 2, 2, 2]]      # pad_id = eos_id = 2
    attention_mask = [[1, 1, 1, 1], [1, 1, 0, 0]]
    labels_from_input_ids(input_ids, attention_mask)   # [[5, 6, 7, 2], [8, 2, -100, -100]]
    mask_spans(that, rows=[0], starts=[0], lengths=[2])  # [[-100, -100, 7, 2], [8, 2, -100, -100]]

The functions are pure (they return new arrays) and O(B·L). Span masks are built on the host with numpy from
lengths, which collators know there (``pad`` and the packer both use `span_mask`); `mask_spans`, `mask_padding` and
`mask_document_starts` apply masks to label tensors on their own device.
This module depends only on ``torch``, ``numpy``, ``attnmask.errors``, ``attnmask._checks`` and ``attnmask._spans``
(where ``IGNORE_INDEX``, `span_mask` and the label hints live, below ``batch`` and ``pack``, which use them too). The
label convention every collator follows (hints ``labels``, ``assistant_masks``, ``completion_mask``,
``prompt_length(s)``: a token is a target unless a hint excludes it) is described in ``attnmask._spans`` and applied
by `label_hints` and `example_labels`; `check_targets` refuses a batch with no target token. Tensors given sparse
(labels, masks, spans) are read as their dense values; nested ones are refused (`InputError`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from attnmask._checks import dense_data
from attnmask._spans import IGNORE_INDEX, LABEL_HINTS, check_targets, example_labels, int_vector, label_hints, span_mask
from attnmask.errors import InputError, ShapeError, bad

__all__ = [
    "IGNORE_INDEX",
    "LABEL_HINTS",
    "check_targets",
    "example_labels",
    "label_hints",
    "labels_from_input_ids",
    "mask_padding",
    "span_mask",
    "mask_spans",
    "mask_document_starts",
]


def labels_from_input_ids(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Causal-LM labels: a copy of ``input_ids`` ``(B, L)`` with ``IGNORE_INDEX`` where ``attention_mask`` is 0."""
    return mask_padding(_check_2d("input_ids", input_ids), attention_mask)


def mask_padding(labels: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """``labels`` ``(B, L)`` with ``IGNORE_INDEX`` wherever ``attention_mask`` ``(B, L)`` is 0 (padding).

    ``[[4, 5, 6]]`` with mask ``[[0, 1, 1]]`` gives ``[[-100, 5, 6]]``.
    """
    labels = _check_2d("labels", labels)
    attention_mask = dense_data("attention_mask", attention_mask)
    if tuple(attention_mask.shape) != tuple(labels.shape):
        raise bad(
            ShapeError, "attention_mask", f"the shape of labels {tuple(labels.shape)}", tuple(attention_mask.shape)
        )
    keep = attention_mask if attention_mask.dtype == torch.bool else attention_mask != 0
    return labels.long().masked_fill(~keep, IGNORE_INDEX)


def mask_spans(labels: torch.Tensor, rows: Any, starts: Any, lengths: Any) -> torch.Tensor:
    """``labels`` ``(B, L)`` with ``IGNORE_INDEX`` on the spans of `span_mask` (e.g. prompts), on labels' device.

    ``mask_spans([[1, 2, 3, 4]], rows=[0], starts=[1], lengths=[2])`` gives ``[[1, -100, -100, 4]]``.
    """
    labels = _check_2d("labels", labels)
    ignore = torch.from_numpy(span_mask(tuple(labels.shape), rows, starts, lengths)).to(labels.device)
    return labels.long().masked_fill(ignore, IGNORE_INDEX)


def mask_document_starts(labels: torch.Tensor, rows: Any, starts: Any) -> torch.Tensor:
    """``labels`` ``(B, L)`` with ``IGNORE_INDEX`` at the first token of each document (``labels[rows[j], starts[j]]``).

    In a packed row that token would otherwise be predicted from the previous document, across a boundary.
    """
    return mask_spans(labels, rows, starts, np.ones_like(int_vector("starts", starts)))


def _check_2d(name: str, t: torch.Tensor) -> torch.Tensor:
    """``t`` (a sparse tensor as its dense values) if it is a ``(B, L)`` tensor, else a typed error naming ``name``."""
    t = dense_data(name, t)
    if not isinstance(t, torch.Tensor):
        raise bad(InputError, name, "a torch.Tensor", type(t).__name__)
    if t.dim() != 2:
        raise bad(ShapeError, name, "shape (B, L)", tuple(t.shape))
    return t
