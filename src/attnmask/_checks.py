"""Argument checks shared by the modules above: one definition of "an int in a range"."""

from __future__ import annotations

import operator
import os
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from attnmask.errors import AttnmaskError, InputError, bad

INT64_MAX = 2**63 - 1
"""The largest token id or length a tensor of int64 holds."""

_NESTED = "a nested tensor"


def check_int(
    name: str, value: Any, *, low: int, high: int | None = None, error: type[AttnmaskError] = InputError
) -> int:
    """``value`` as a Python int in ``[low, high]`` (``high=None``: no upper bound), else ``error`` naming ``name``.

    Accepts ``int`` and numpy / torch integer scalars (anything with ``__index__``); refuses ``bool``, floats (even
    ``2.0``) and strings. Example: ``check_int("max_length", np.int64(8), low=1)`` gives ``8``.
    """
    expected = f"an int >= {low}" if high is None else f"an int in [{low}, {high}]"
    if isinstance(value, (bool, np.bool_, float, np.floating)):
        raise bad(error, name, expected, repr(value))
    try:
        value = operator.index(value)
    except TypeError:
        raise bad(error, name, expected, short_repr(value)) from None
    if value < low:
        raise bad(error, name, f"an int >= {low}", short_repr(value))
    if high is not None and value > high:
        raise bad(error, name, expected, short_repr(value))
    return value


def check_strided(name: str, t: torch.Tensor, error: type[AttnmaskError] = InputError) -> None:
    """Refuse, naming ``name`` and its layout, a tensor that is not dense and strided (sparse COO / CSR / ..., nested,
    MKL-DNN): attention kernels read strided memory, and torch's own refuse such inputs with untyped errors."""
    if sparse_or_nested(t):
        raise bad(error, name, "a dense (strided) tensor", _NESTED if t.is_nested else f"layout {t.layout}")


def dense_data(name: str, value: Any, error: type[AttnmaskError] = InputError) -> Any:
    """``value`` with a sparse tensor (COO, CSR, ... or MKL-DNN) read as its dense values, exactly as if the dense
    tensor had been given; a nested tensor refused with ``error`` naming ``name``. Anything else (a dense strided
    tensor, an array, a list, an int) is returned as it is, without a copy: for a dense tensor the cost is two
    attribute reads.

    For data arguments (token ids, lengths, masks, labels, positions), which are read as values. A sparse tensor
    whose dense form would take more than half the memory (`check_allocation`) is refused with ``error``.
    """
    if not sparse_or_nested(value):
        return value
    if value.is_nested:
        raise bad(error, name, "a dense tensor", _NESTED)
    check_allocation(name, value.numel() * value.element_size(), error)  # numel counts the dense elements
    try:
        return value.to_dense()
    except (RuntimeError, MemoryError, NotImplementedError) as e:  # the allocator refused it, or a layout torch lacks
        reason = str(e).splitlines()[0][:80] if str(e) else type(e).__name__
        raise bad(
            error, name, "a tensor whose dense values torch can build", f"layout {value.layout} ({reason})"
        ) from None


# Types that are never tensors, told apart by one type lookup (~0.04 us): isinstance(x, torch.Tensor) costs ~0.24 us
# for anything that is not a tensor (torch's metaclass hook), per item of a loop over many sequences.
_NOT_TENSORS = frozenset({list, tuple, int, np.ndarray, range, str, bytes, dict, type(None)})


def sparse_or_nested(value: Any) -> bool:
    """Whether `dense_data` would change or refuse ``value``: a tensor that is sparse (or otherwise not strided) or
    nested. About 0.05 us for a list or a dense tensor, so that loops over many items pay little and build an
    item's name only when it is needed."""
    return (
        type(value) not in _NOT_TENSORS
        and isinstance(value, torch.Tensor)
        and (value.is_nested or value.layout is not torch.strided)
    )


def dense_items(items: list, name_of: Callable[[int], str]) -> list:
    """``items`` with `dense_data` applied to each sparse or nested tensor among them, the ``j``-th named
    ``name_of(j)``; ``items`` itself when it holds none: a loop over many sequences pays one type check per item
    (~0.05 us) and builds no names."""
    odd = [j for j, x in enumerate(items) if type(x) not in _NOT_TENSORS and sparse_or_nested(x)]
    if not odd:
        return items
    items = list(items)
    for j in odd:
        items[j] = dense_data(name_of(j), items[j])
    return items


def sequences_data(name: str, value: Any, error: type[AttnmaskError] = InputError) -> Any:
    """For an argument that is a list of sequences: a nested tensor as the list of its rows (``value.unbind(0)``,
    the same as passing its component tensors), else `dense_data`: a sparse tensor as its dense values (a 2D one
    is then read as its rows), anything else as it is."""
    if isinstance(value, torch.Tensor) and value.is_nested:
        return list(value.unbind(0))
    return dense_data(name, value, error)


def short_repr(value: Any) -> str:
    """``repr(value)``, cut to 60 characters (a 5,000-digit int or a long list must not flood a message)."""
    if isinstance(value, int) and value.bit_length() > 200:  # repr of a 5,000-digit int raises in Python >= 3.11
        return f"an int of {value.bit_length()} bits"
    try:
        text = repr(value)
    except ValueError:  # a huge int nested in a list or tuple
        return f"a {type(value).__name__} holding a huge int"
    return text if len(text) <= 60 else text[:57] + "..."


def check_allocation(name: str, nbytes: int, error: type[AttnmaskError] = InputError) -> None:
    """Refuse, naming ``name``, to build a tensor of more than half the machine's physical memory: the allocator may
    overcommit and the kernel's OOM killer end the process instead of a typed error."""
    try:
        physical = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not POSIX: let the allocator decide
        return
    if nbytes > physical // 2:
        raise bad(
            error, name, f"data that fits in half the memory ({physical / 2**31:.1f} GiB)", f"{nbytes / 2**30:,.1f} GiB"
        )
