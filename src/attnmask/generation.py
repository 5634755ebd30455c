"""Generation with left padding: position ids from the mask, mask specs for decoding with a KV cache, a greedy loop.

Prompts of different lengths are padded on the **left** so that every row's next token is in the last column::

    prompts [5, 6, 7] and [8, 9]   ->   input_ids      [[5, 6, 7], [0, 8, 9]]
                                        attention_mask [[1, 1, 1], [0, 1, 1]]
                                        position_ids   [[0, 1, 2], [0, 0, 1]]   (0 on padding)

Each decoding step appends one column: the mask grows by a 1, the new token's position is the row's last position
plus one, and the ``Q`` new queries attend to the cached keys through ``causal() & key_padding(mask)`` evaluated
bottom-right (the queries are the last ``Q`` of the ``K`` keys). Nothing here imports transformers: the loop runs any
model with the Hugging Face call convention. Masks and token ids given as sparse tensors are read as their dense
values; prompts given as a nested tensor are its rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from attnmask._checks import check_int, dense_data, sequences_data, short_repr
from attnmask.batch import pad
from attnmask.errors import InputError, ShapeError, bad
from attnmask.masks import MaskSpec, causal, key_padding

__all__ = [
    "decode_spec",
    "extend_attention_mask",
    "greedy_generate",
    "left_pad_prompts",
    "position_ids_from_mask",
]


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids ``(B, L)`` int64 counting the real tokens of each row from 0; 0 on padding.

    ``attention_mask`` ``(B, L)``, 1 = real. Left padding ``[0, 0, 1, 1, 1]`` gives ``[0, 0, 0, 1, 2]``. The same
    rule as transformers' ``generate``, so a padded row gets the positions of its prompt alone.
    """
    mask = _check_mask(attention_mask).long()
    return (mask.cumsum(dim=-1) - 1).clamp_(min=0).masked_fill_(mask == 0, 0)


def extend_attention_mask(attention_mask: torch.Tensor, num_new: int = 1) -> torch.Tensor:
    """The mask ``(B, L + num_new)`` after appending ``num_new`` real tokens to every row."""
    attention_mask = _check_mask(attention_mask)
    ones = attention_mask.new_ones((attention_mask.shape[0], num_new))
    return torch.cat([attention_mask, ones], dim=-1)


def decode_spec(attention_mask: torch.Tensor) -> MaskSpec:
    """Mask spec for a decoding step over all ``K`` keys seen so far (cached + new): ``causal() & key_padding(mask)``.

    ``attention_mask`` ``(B, K)`` covers every key, past and new. Evaluate it with ``Q <= K`` queries: they are the
    last ``Q`` positions (bottom-right), e.g. ``spec.to_dense(1, K)`` for one new token, or pass it to
    ``attnmask.attention(q, k, v, spec)``. Example: mask ``[[0, 1, 1, 1]]``, ``Q = 1``: the query at position 3 sees
    keys 1, 2 and 3. Nothing O(Q·K) is built until a backend needs it.
    """
    return causal() & key_padding(_check_mask(attention_mask))


def left_pad_prompts(prompts: Sequence[Any], *, pad_id: int, device: torch.device | str | None = None):
    """Pad token-id prompts on the left into ``(input_ids, attention_mask, position_ids)``, each ``(B, L)`` int64.

    ``prompts``: lists, arrays or 1D tensors of token ids (at least one token each), or a 2D or nested tensor (its
    rows). Example: ``[[5, 6, 7], [8, 9]]`` with ``pad_id=0`` gives ``[[5, 6, 7], [0, 8, 9]]``. Built by
    ``attnmask.pad(..., side="left")``; O(B·L).
    """
    prompts = sequences_data("prompts", prompts)
    if not len(prompts):
        raise bad(InputError, "prompts", "at least one prompt", "none")
    lengths = [len(p) for p in prompts]
    if min(lengths) == 0:
        empty = [i for i, n in enumerate(lengths) if n == 0]
        raise bad(InputError, "prompts", "at least one token per prompt", f"empty prompt(s) at {empty[:5]}")
    batch = pad(list(prompts), pad_id=pad_id, side="left", device=device)
    return batch.input_ids, batch.attention_mask, batch.position_ids


@torch.no_grad()
def greedy_generate(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    max_new_tokens: int,
    pad_token_id: int,
    eos_token_id: int | Sequence[int] | None = None,
) -> torch.Tensor:
    """Greedy decoding of a left-padded batch with a KV cache; returns ``(B, L + n)`` with ``n <= max_new_tokens``.

    ``model`` is called as ``model(input_ids=..., attention_mask=..., position_ids=..., past_key_values=...,
    use_cache=True)`` and must return ``.logits`` ``(B, Q, V)`` and ``.past_key_values`` (any Hugging Face causal
    LM). ``attention_mask`` ``(B, L)``: 1 = real, prompts padded on the left (default: no padding). After a row
    emits ``eos_token_id`` it receives ``pad_token_id``; the loop stops early when every row has finished. Each row
    gets exactly the tokens its prompt would get alone. Memory: the model's KV cache, O(B·(L + n)) here.
    """
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise bad(InputError, "max_new_tokens", "an int >= 0", repr(max_new_tokens))
    input_ids = dense_data("input_ids", input_ids)
    if not isinstance(input_ids, torch.Tensor):
        raise bad(InputError, "input_ids", "a (B, L) tensor of token ids", type(input_ids).__name__)
    if input_ids.dim() != 2:
        raise bad(ShapeError, "input_ids", "shape (B, L)", tuple(input_ids.shape))
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    attention_mask = dense_data("attention_mask", attention_mask)
    if not isinstance(attention_mask, torch.Tensor):
        expected = "None or a (B, L) tensor, 1 = real token"
        raise bad(InputError, "attention_mask", expected, type(attention_mask).__name__)
    if attention_mask.shape != input_ids.shape:
        raise bad(ShapeError, "attention_mask", f"shape {tuple(input_ids.shape)} like input_ids", attention_mask.shape)
    if bool((attention_mask[:, -1] == 0).any()):
        raise bad(InputError, "attention_mask", "prompts padded on the left (last column real)", "right padding")
    eos = _eos_tensor(eos_token_id, input_ids.device)
    position_ids = position_ids_from_mask(attention_mask)
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    sequences, step_ids, past = input_ids, input_ids, None
    for _ in range(max_new_tokens):
        out = model(
            input_ids=step_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past,
            use_cache=True,
        )
        past = out.past_key_values
        next_ids = out.logits[:, -1, :].argmax(dim=-1)
        next_ids = next_ids.masked_fill(finished, pad_token_id)
        if eos is not None:
            finished |= torch.isin(next_ids, eos)
        sequences = torch.cat([sequences, next_ids[:, None]], dim=-1)
        if eos is not None and bool(finished.all()):
            break
        step_ids = next_ids[:, None]
        attention_mask = extend_attention_mask(attention_mask)
        position_ids = position_ids[:, -1:] + 1
    return sequences


def _eos_tensor(eos_token_id: int | Sequence[int] | None, device: torch.device) -> torch.Tensor | None:
    if eos_token_id is None:
        return None
    eos_token_id = dense_data("eos_token_id", eos_token_id)
    expected = "None, a token id or a sequence of token ids"
    if isinstance(eos_token_id, (str, bytes)):
        raise bad(InputError, "eos_token_id", expected, repr(eos_token_id))
    if isinstance(eos_token_id, int) or getattr(eos_token_id, "ndim", None) == 0:  # an int, a 0-dim tensor or array
        eos_token_id = [eos_token_id]
    try:
        values = list(eos_token_id)
    except TypeError:
        raise bad(InputError, "eos_token_id", expected, short_repr(eos_token_id)) from None
    ids = [check_int("eos_token_id", x, low=0) for x in values]
    return torch.tensor(ids, dtype=torch.long, device=device)


def _check_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """``attention_mask`` (a sparse one as its dense values), or `ShapeError` when it is not a ``(B, L)`` tensor."""
    attention_mask = dense_data("attention_mask", attention_mask)
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
        shape = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask)
        raise bad(ShapeError, "attention_mask", "a (B, L) tensor, 1 = real token", shape)
    return attention_mask
