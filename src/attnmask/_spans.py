"""Span masks on the host and the ignore index: the label helpers that ``batch``, ``pack`` and ``labels`` share.

A leaf module below every layer that uses it (numpy and ``attnmask.errors`` only), so that ``batch`` (layer 4) and
``pack`` (layer 5) need not import ``labels`` (layer 6); ``attnmask.labels`` re-exports both public names.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from attnmask.errors import InputError, ShapeError, bad

__all__ = ["IGNORE_INDEX", "int_vector", "span_mask"]

IGNORE_INDEX = -100


def span_mask(shape: tuple[int, int], rows: Any, starts: Any, lengths: Any) -> np.ndarray:
    """Bool ``(B, L)`` numpy array, True on ``[rows[j], starts[j] : starts[j] + lengths[j]]`` for every span j.

    ``rows``, ``starts``, ``lengths``: ``(N,)`` ints (lists, arrays or CPU tensors), one entry per span, e.g. the
    prompt of each sequence or the first token of each document of a packed row. Spans may be empty and may overlap;
    each must lie inside ``[0, L]``. Built on the host from the lengths (which collators know on the host) with a
    difference array: O(B·L + N) whatever the number of spans.

    ``span_mask((1, 4), rows=[0], starts=[1], lengths=[2])`` gives ``[[False, True, True, False]]``.
    """
    n_rows, length = shape
    rows_a, starts_a, lens_a = (int_vector(k, v) for k, v in (("rows", rows), ("starts", starts), ("lengths", lengths)))
    if not (rows_a.shape == starts_a.shape == lens_a.shape):
        sizes = (rows_a.size, starts_a.size, lens_a.size)
        raise bad(ShapeError, "rows, starts, lengths", "one entry per span in each", f"sizes {sizes}")
    if rows_a.size == 0:
        return np.zeros(shape, dtype=bool)
    ends = starts_a + lens_a
    _check_range("rows", rows_a, 0, n_rows - 1)
    _check_range("lengths", lens_a, 0, length)
    _check_range("starts", starts_a, 0, length)
    _check_range("starts + lengths", ends, 0, length)
    delta = np.zeros((n_rows, length + 1), dtype=np.int32)
    np.add.at(delta, (rows_a, starts_a), 1)
    np.add.at(delta, (rows_a, ends), -1)
    return np.cumsum(delta[:, :length], axis=1) > 0


def int_vector(name: str, value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    a = np.asarray(value)
    if a.size and a.dtype.kind not in "iu":
        raise bad(InputError, name, "integers", f"dtype {a.dtype}")
    if a.ndim == 0:
        a = a.reshape(1)
    if a.ndim != 1:
        raise bad(ShapeError, name, "a (N,) vector", a.shape)
    return a.astype(np.int64, copy=False)


def _check_range(name: str, t: np.ndarray, low: int, high: int) -> None:
    if int(t.min()) < low or int(t.max()) > high:
        raise bad(InputError, name, f"values in [{low}, {high}]", f"range [{int(t.min())}, {int(t.max())}]")
