"""Span masks on the host, the ignore index and the label hints: the label helpers ``batch``, ``pack``, ``labels``
and the collators share.

A leaf module below every layer that uses it (numpy, torch, ``attnmask.errors`` and ``attnmask._checks`` only), so
that ``batch`` (layer 4) and ``pack`` (layer 5) need not import ``labels`` (layer 6); ``attnmask.labels`` re-exports
the public names. Tensors given sparse are read as their dense values (``_checks.dense_data``).

**The label convention** (every collator: `pad` / `Collator`, `PackPlan.collate` / `PackingCollator`, and the
transformers ``DataCollatorForCausalLM``). An example dict may carry these hints, each in every example of a batch
or in none:

- ``labels``: per token, aligned with ``input_ids`` (-100 = not a target); without it the labels are the ids;
- ``assistant_masks`` (as ``apply_chat_template(..., return_assistant_tokens_mask=True)`` gives it) and
  ``completion_mask`` (TRL's prompt-completion column): per token, 1 = a trained token, 0 = not;
- ``prompt_length`` or ``prompt_lengths`` (an int): the first tokens are prompt, not trained.

A token is a target only if **no hint excludes it**: the hints intersect, so their order never matters and none is
dropped (as TRL's dataset preparation folds ``assistant_masks`` and ``completion_mask``). A hint given twice
(``prompt_length`` and ``prompt_lengths`` with different values; a ``labels=`` argument next to hints in the
examples) raises `LabelError`. Padding, and in packed rows the first token of every document, are never targets.
Example: ids ``[5, 6, 7, 8]``, ``assistant_masks [0, 1, 1, 1]``, ``prompt_length 2`` give ``[-100, -100, 7, 8]``.
A collator asked for completion-only labels (``completion_only=True``) needs one of ``assistant_masks``,
``completion_mask``, ``prompt_length(s)`` in every example; and a collated batch with no target token raises
`NoTargetError` unless ``allow_empty=True``.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from attnmask._checks import dense_data, sparse_or_nested
from attnmask.errors import InputError, LabelError, NoTargetError, ShapeError, bad

__all__ = ["IGNORE_INDEX", "LABEL_HINTS", "check_targets", "example_labels", "int_vector", "label_hints", "span_mask"]

IGNORE_INDEX = -100
MASK_HINTS = ("assistant_masks", "completion_mask")
PROMPT_HINTS = ("prompt_length", "prompt_lengths")
LABEL_HINTS = ("labels", *MASK_HINTS, *PROMPT_HINTS)


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
    """``value`` (an int, a list, an array or a tensor, a sparse one read as its dense values) as a ``(N,)`` int64
    numpy array, else `InputError` / `ShapeError` naming ``name``."""
    value = dense_data(name, value)
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


# ----------------------------------------------------------------------------------------------------------------------
# Label hints of example dicts (the convention is in the module docstring)


def label_hints(
    examples: Sequence[Any],
    *,
    labels_key: str | None = "labels",
    prompt_key: str | None = "prompt_length",
    completion_only: bool = False,
    name: str = "examples",
) -> tuple[str, ...]:
    """The hint keys the example dicts carry, in `LABEL_HINTS` order; each must be in every example or in none.

    ``labels_key`` / ``prompt_key`` rename the ``labels`` / ``prompt_length`` hints (None: not read). A key whose
    value is None counts as absent. ``completion_only=True``: one of ``assistant_masks``, ``completion_mask`` or the
    prompt keys must be present, else `LabelError` saying which keys were looked for and which were found. ``name``:
    the argument named in errors.
    """
    names = [labels_key, *MASK_HINTS, prompt_key, "prompt_lengths"]
    looked = tuple(dict.fromkeys(k for k in names if k))
    dicts = [ex for ex in examples if isinstance(ex, Mapping)]
    found = []
    for key in looked:
        has = [ex.get(key) is not None for ex in dicts]
        if any(has) and (not all(has) or len(dicts) != len(examples)):
            missing = len(examples) - has.count(True)
            raise bad(InputError, name, f"{key!r} in every example or in none", f"missing in {missing}")
        if has and all(has):
            found.append(key)
    if completion_only and not set(found) - {labels_key}:
        wanted = [k for k in looked if k != labels_key]
        keys = sorted(dicts[0]) if dicts else type(examples[0]).__name__ if len(examples) else "no examples"
        raise bad(LabelError, name, f"one of {wanted} in every example (completion_only=True)", f"keys {keys}")
    return tuple(found)


def example_labels(
    where: str,
    example: Mapping,
    ids: Any,
    hints: tuple[str, ...],
    *,
    labels_key: str | None = "labels",
) -> tuple[Any, int | None]:
    """``(labels, prompt_length)`` of one example from its ``hints`` (keys found by `label_hints`).

    ``ids``: the example's token ids (list, 1D array or tensor). ``labels``: None when the labels are simply the ids
    (no ``labels`` and no mask hint), else a 1D int64 tensor on the device of the given labels (or ids) when they are
    tensors, an int64 numpy array otherwise: the given labels (or the ids) with -100 wherever a mask hint is 0.
    ``prompt_length``: None, or an int in ``[0, len(ids)]`` (``prompt_length`` and ``prompt_lengths`` must agree).
    ``where`` names the example in errors, e.g. ``"examples[3]"``.
    """
    n = len(ids)
    labels = example[labels_key] if labels_key in hints else None
    if sparse_or_nested(labels):
        labels = dense_data(f"{where}[{labels_key!r}]", labels, LabelError)
    masks = [k for k in hints if k in MASK_HINTS]
    if masks:
        base = labels if labels is not None else ids
        if len(base) != n:
            raise bad(ShapeError, f"{where}[{labels_key!r}]", f"{n} labels like its input_ids", len(base))
        keep = [_keep_row(f"{where}[{k!r}]", example[k], n, base) for k in masks]
        labels = _fold(base, keep)
    prompts = {k: _prompt_length(f"{where}[{k!r}]", example[k], n) for k in hints if k not in (labels_key, *masks)}
    if len(set(prompts.values())) > 1:
        raise bad(LabelError, where, "one prompt length (the hints are given twice)", prompts)
    return labels, next(iter(prompts.values()), None)


def check_targets(labels: torch.Tensor, *, allow_empty: bool, hints: tuple[str, ...] = ()) -> None:
    """Raise `NoTargetError` when ``labels`` ``(B, L)`` holds no target after the causal shift (``labels[:, 1:]``
    all -100), unless ``allow_empty``: such a step trains nothing and its loss is 0. ``hints``: the label hints that
    were applied, named in the message."""
    if allow_empty:
        return
    targets = dense_data("labels", labels, LabelError)[:, 1:]
    if targets.device.type == "cpu":  # numpy: one thread, no intra-op pool to wake for a collator-sized check
        targets = targets.detach().numpy()
    if bool((targets != IGNORE_INDEX).any()):
        return
    used = ", ".join(hints) if hints else "none"
    raise bad(
        NoTargetError,
        "labels",
        "at least one target token in the batch (or allow_empty=True)",
        f"all {labels.numel()} positions -100 after the shift (label hints applied: {used})",
    )


def _keep_row(name: str, value: Any, n: int, like: Any) -> Any:
    """A 0/1 mask hint as bool: a tensor on ``like``'s device when ``like`` is a tensor, else a numpy array."""
    value = dense_data(name, value, LabelError)
    if isinstance(like, torch.Tensor):
        m = torch.as_tensor(value, device=like.device)
        ok_dtype = m.dtype == torch.bool or not (m.is_floating_point() or m.is_complex())
    else:
        m = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
        ok_dtype = m.dtype.kind in "biu" or m.size == 0
    if not ok_dtype:
        raise bad(LabelError, name, "0/1 integers or booleans per token", f"dtype {m.dtype}")
    if m.ndim != 1 or m.shape[0] != n:
        raise bad(ShapeError, name, f"{n} entries like its input_ids", tuple(m.shape))
    if n and not bool(((m == 0) | (m == 1)).all()):
        raise bad(LabelError, name, "values 0 (not trained) and 1 (trained)", "other values")
    return m != 0


def _fold(base: Any, keep: list) -> Any:
    if isinstance(base, torch.Tensor):
        out = base.long().clone()
        for k in keep:
            out.masked_fill_(~k, IGNORE_INDEX)
        return out
    out = np.array(base.detach().cpu().numpy() if isinstance(base, torch.Tensor) else base, dtype=np.int64)
    for k in keep:
        out[~k] = IGNORE_INDEX
    return out.reshape(-1)


def _prompt_length(name: str, value: Any, n: int) -> int:
    value = dense_data(name, value, LabelError)
    if isinstance(value, (torch.Tensor, np.ndarray)) and value.ndim == 0:
        value = value.item()
    if isinstance(value, (bool, np.bool_, float, np.floating)):
        raise bad(LabelError, name, f"an int in [0, {n}]", repr(value))
    try:
        value = operator.index(value)
    except TypeError:
        raise bad(LabelError, name, f"an int in [0, {n}]", repr(value)) from None
    if not 0 <= value <= n:
        raise bad(LabelError, name, f"an int in [0, {n}] (at most the sequence length)", value)
    return value
