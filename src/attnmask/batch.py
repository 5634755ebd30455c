"""The `Batch` a collator hands to a model, and `pad`, which builds one from variable-length sequences.

Padding (`pad`, `Collator`) and packing (`attnmask.pack`) both produce a `Batch`; every tensor is ``(B, L)`` int64 on
the device of the inputs.

Worked example, ``pad([[5, 6, 7], [8]], pad_id=0)``::

    input_ids      [[5, 6, 7], [8, 0, 0]]
    attention_mask [[1, 1, 1], [1, 0, 0]]
    position_ids   [[0, 1, 2], [0, 0, 0]]          # 0 on padding
    labels         [[5, 6, 7], [8, -100, -100]]
    mask           causal() & key_padding(attention_mask)
    seq_lens ((3,), (1,)), cu_seqlens [0, 3, 4], max_seqlen 3

With ``side="left"`` the rows are ``[[5, 6, 7], [0, 0, 8]]`` and the position ids ``[[0, 1, 2], [0, 0, 0]]``, i.e.
``cumsum(attention_mask) - 1`` with 0 on padding, as transformers' generation computes them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from attnmask._checks import INT64_MAX, check_int, dense_data, sequences_data
from attnmask._spans import (
    IGNORE_INDEX,
    LABEL_HINTS,
    MASK_HINTS,
    PROMPT_HINTS,
    check_targets,
    example_labels,
    label_hints,
    span_mask,
)
from attnmask.errors import DeviceError, InputError, LabelError, ShapeError, bad, shown
from attnmask.masks import MaskSpec, causal, key_padding

__all__ = ["Batch", "pad", "Collator"]

_SIDES = ("left", "right")
# Keys of an example dict that `pad` reads; every other key is passed through in `Batch.extras`.
_EXAMPLE_KEYS = ("input_ids", "attention_mask", *LABEL_HINTS)
# Fields of a `Batch` that hold tensors of data, read as dense values.
_TENSOR_FIELDS = ("input_ids", "attention_mask", "position_ids", "labels", "cu_seqlens")


@dataclass(frozen=True, eq=False)
class Batch:
    """A model-ready batch.

    - ``input_ids``, ``attention_mask`` (1 = real token, 0 = padding), ``position_ids``, ``labels`` (-100 = ignored):
      ``(B, L)`` int64.
    - ``mask``: the mask spec of the batch, e.g. ``causal() & key_padding(attention_mask)``, or with
      ``document(...)`` for packed rows. Lower it with ``mask.to_dense`` / ``mask.to_additive`` only where needed.
    - ``seq_lens``: per row, the lengths of the sequences (documents) it holds, in order.
    - ``cu_seqlens``: ``(num_docs + 1,)`` int32 cumulative lengths over all documents of the flattened batch, as
      FlashAttention's varlen functions take them; ``max_seqlen`` the longest document.
    - ``num_truncated_tokens``: tokens cut by opt-in truncation (0 when nothing was cut).
    - ``extras``: per-example values `pad` does not interpret (other keys of example dicts), key -> list.

    Tensors given sparse are stored as their dense values; a nested tensor is refused (`InputError`).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor
    mask: MaskSpec
    seq_lens: tuple[tuple[int, ...], ...] = ()
    cu_seqlens: torch.Tensor | None = None
    max_seqlen: int = 0
    num_truncated_tokens: int = 0
    extras: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in _TENSOR_FIELDS:
            value = getattr(self, name)
            dense = dense_data(name, value)
            if dense is not value:
                object.__setattr__(self, name, dense)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.input_ids.shape)

    @property
    def num_tokens(self) -> int:
        """Real (non-padding) tokens in the batch."""
        return int(self.attention_mask.sum())

    @property
    def num_target_tokens(self) -> int:
        """Label positions that count in the loss after the causal shift (labels[:, 1:] != -100)."""
        return int((self.labels[:, 1:] != -100).sum())

    @property
    def is_packed(self) -> bool:
        """Whether some row holds more than one document (``seq_lens``)."""
        return any(len(row) > 1 for row in self.seq_lens)

    def model_inputs(self, *, labels: bool = True) -> dict[str, Any]:
        """The dict a Hugging Face causal LM takes: input_ids, attention_mask, position_ids (and labels).

        Packed rows (`is_packed`) give ``input_ids``, ``position_ids``, ``use_cache=False`` (and labels) instead, with
        no ``attention_mask``: transformers' own sdpa / eager / flash attention find the documents from the restarting
        ``position_ids`` only when neither a 2D mask nor a KV cache is there (``use_cache`` is on by default), so the
        batch is exact with or without ``attn_implementation="attnmask"``. Padding positions then form one-token
        documents of their own, seen by no real token (their labels are -100).
        """
        if self.is_packed:
            out = {"input_ids": self.input_ids, "position_ids": self.position_ids, "use_cache": False}
        else:
            out = {
                "input_ids": self.input_ids,
                "attention_mask": self.attention_mask,
                "position_ids": self.position_ids,
            }
        if labels:
            out["labels"] = self.labels
        return out

    def to(self, device: torch.device | str, *, non_blocking: bool = False) -> Batch:
        """A copy with every tensor (the mask spec's data included) on ``device``; ``extras`` are left as they are."""
        return _map_tensors(self, lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> Batch:
        """A copy in pinned memory; ``torch.utils.data.DataLoader(pin_memory=True)`` calls this."""
        return _map_tensors(self, lambda t: t.pin_memory())


def _map_tensors(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """Apply ``fn`` to every tensor inside a Batch or mask spec (frozen dataclasses, tuples of specs)."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, (Batch, MaskSpec)) and dataclasses.is_dataclass(obj):
        changes = {
            f.name: _map_tensors(getattr(obj, f.name), fn) for f in dataclasses.fields(obj) if f.name != "extras"
        }
        return dataclasses.replace(obj, **changes)
    if isinstance(obj, tuple) and any(isinstance(x, MaskSpec) for x in obj):
        return tuple(_map_tensors(x, fn) for x in obj)
    return obj


# ----------------------------------------------------------------------------------------------------------------------
# pad


def pad(
    sequences: Any,
    *,
    pad_id: int,
    side: str = "right",
    pad_to_multiple_of: int | None = None,
    max_length: int | None = None,
    truncation: bool = False,
    truncation_side: str = "right",
    labels: Any = None,
    prompt_lengths: Any = None,
    device: torch.device | str | None = None,
) -> Batch:
    """Pad variable-length token sequences into a `Batch` of ``(B, L)`` int64 tensors.

    ``sequences`` (B of them, B >= 1): a list of int lists, 1D numpy arrays or 1D integer tensors (mixed freely), a 2D
    array / tensor (its rows), a list of example dicts, or a dict of columns such as a tokenizer's output. An example
    dict has ``input_ids``, optionally ``attention_mask`` (its 0 positions are padding and are removed before
    re-padding) and the label hints of ``attnmask._spans`` (``labels``, ``assistant_masks``, ``completion_mask``,
    ``prompt_length`` / ``prompt_lengths``: a token is a target unless a hint excludes it); its other keys are not
    interpreted and come back per example in ``batch.extras``.
    Token ids must be integers >= 0; a zero-length sequence is allowed: its row is all padding (attention gives 0
    on rows with nothing to attend), its ``seq_lens`` entry is ``()`` and it has no ``cu_seqlens`` entry.
    Tensors given sparse (ids, masks, labels, prompt lengths) are read as their dense values; a nested tensor is read
    as its rows where a list of sequences is expected (``sequences``, ``labels``, a column), else refused.

    - ``side``: ``"right"`` (training) or ``"left"`` (generation). Position ids count the real tokens from 0 and are
      0 on padding: for left padding ``cumsum(attention_mask) - 1`` with 0 on padding.
    - ``L`` is the longest sequence, rounded up to ``pad_to_multiple_of`` when given (a length that already divides
      stays as it is). ``max_length`` caps the sequence length, not ``L``: a longer sequence is an error unless
      ``truncation=True``, which cuts it on ``truncation_side`` (``"right"`` keeps the first ``max_length`` tokens,
      ``"left"`` the last ones) and counts the cut tokens in ``batch.num_truncated_tokens``.
    - Labels (aligned with ``input_ids``, the model shifts): ``labels`` if given (one sequence per input, same
      lengths; padded with -100), else a copy of the ids. -100 is then set on padding and on the first
      ``prompt_lengths[i]`` tokens of sequence i (counted before truncation; the part that survives it is masked),
      by position, never by comparing ids: ``pad_id == eos_id`` keeps real EOS labels.
    - ``mask`` is ``causal() & key_padding(attention_mask)``; ``seq_lens`` has one length per row and
      ``cu_seqlens`` ``(N + 1,)`` int32 (N non-empty sequences) / ``max_seqlen`` describe the real tokens, so the
      batch can feed varlen kernels; they equal ``lowering.varlen_args(batch.mask, L)``.
    - ``device``: where the tensors go; default the device of tensor inputs (cpu for lists and arrays).

    Cost: O(total tokens) in numpy / torch (no per-token Python) plus O(B·L) for the padded tensors; no O(L^2) mask.
    """
    check_int("pad_id", pad_id, low=0, high=INT64_MAX)
    _check_choice("side", side, _SIDES)
    _check_choice("truncation_side", truncation_side, _SIDES)
    if pad_to_multiple_of is not None:
        check_int("pad_to_multiple_of", pad_to_multiple_of, low=1)
    if max_length is not None:
        check_int("max_length", max_length, low=1)
    if not isinstance(truncation, bool):
        raise bad(InputError, "truncation", "a bool", repr(truncation))
    if truncation and max_length is None:
        raise bad(InputError, "max_length", "an int when truncation=True", None)

    rows = _read_sequences(sequences)
    n = len(rows.ids)
    if labels is not None:
        if rows.labels is not None:
            raise bad(LabelError, "labels", "None when the example dicts carry label hints", list(rows.hints))
        rows.labels = _read_labels(labels, rows.ids)
    if prompt_lengths is not None:
        if rows.prompt_lengths is not None:
            raise bad(LabelError, "prompt_lengths", "None when the example dicts carry a prompt length", "both")
        rows.prompt_lengths = _read_prompt_lengths(prompt_lengths, n)
    lens = [len(x) for x in rows.ids]
    if rows.prompt_lengths is not None:
        _check_prompts_fit(rows.prompt_lengths, lens)

    num_cut, cut_front = 0, [0] * n
    if max_length is not None and max(lens) > max_length:
        over = [m for m in lens if m > max_length]
        if not truncation:
            raise bad(
                InputError,
                "max_length",
                f"every sequence to have at most {max_length} tokens (or truncation=True)",
                f"{len(over)} longer sequence(s), the longest {max(over)} tokens",
            )
        num_cut = sum(over) - max_length * len(over)
        keep_first = truncation_side == "right"
        cut_front = [0 if keep_first else max(m - max_length, 0) for m in lens]
        rows.ids = [_cut(x, max_length, keep_first) for x in rows.ids]
        if rows.labels is not None:
            rows.labels = [_cut(x, max_length, keep_first) for x in rows.labels]
        lens = [min(m, max_length) for m in lens]

    device = _target_device(rows, device)
    flat_ids = _concat(rows.ids, device)
    _check_ids(flat_ids, lens)
    longest = max(lens)
    length = longest if pad_to_multiple_of is None else -(-longest // pad_to_multiple_of) * pad_to_multiple_of

    # The layout depends on the lengths only: build it on the host with numpy (one pass, single-threaded).
    lens_np = np.asarray(lens, dtype=np.int64)
    cols = np.arange(length)
    starts = np.zeros_like(lens_np) if side == "right" else length - lens_np
    real = (cols >= starts[:, None]) & (cols < (starts + lens_np)[:, None])
    position_ids = _positions(cols, starts, real, side)
    prompt = None
    if rows.prompt_lengths is not None:
        kept = [min(max(p - c, 0), m) for p, c, m in zip(rows.prompt_lengths, cut_front, lens, strict=True)]
        prompt = span_mask((n, length), np.arange(n), starts, kept)

    # The values go where the inputs are: numpy on the host, or torch on the inputs' device.
    input_ids = _place(real, flat_ids, pad_id)
    if rows.labels is None:
        label_ids = _ignore(input_ids, ~real if prompt is None else ~real | prompt)
    else:
        flat_labels = _concat(rows.labels, device)
        _check_label_values(flat_labels)
        label_ids = _place(real, flat_labels, IGNORE_INDEX)
        if prompt is not None:
            label_ids = _ignore(label_ids, prompt)

    nonempty = lens_np[lens_np > 0]  # a zero-length sequence holds no document: no varlen entry, as in lowering
    cu_seqlens = np.zeros(len(nonempty) + 1, dtype=np.int32)
    np.cumsum(nonempty, out=cu_seqlens[1:])
    real_t = _tensor(real, device)
    return Batch(
        input_ids=_tensor(input_ids, device),
        attention_mask=_tensor(real.astype(np.int64), device),
        position_ids=_tensor(position_ids, device),
        labels=_tensor(label_ids, device),
        mask=causal() & key_padding(real_t),
        seq_lens=tuple((m,) if m else () for m in lens),
        cu_seqlens=_tensor(cu_seqlens, device),
        max_seqlen=longest,
        num_truncated_tokens=num_cut,
        extras=rows.extras,
    )


def _positions(cols: np.ndarray, starts: np.ndarray, real: np.ndarray, side: str) -> np.ndarray:
    """Position ids ``(B, L)``: 0, 1, ... along each row's real tokens, 0 on padding (``cumsum(mask) - 1``, masked)."""
    if side == "right":
        return cols * real
    out = cols - starts[:, None]  # left padding: the real tokens run to the end of the row
    return np.maximum(out, 0, out=out)


def _place(real: np.ndarray, flat: np.ndarray | torch.Tensor, fill: int) -> np.ndarray | torch.Tensor:
    """A ``real.shape`` int64 array of ``fill`` with ``flat`` written, in row-major order, where ``real`` is True."""
    if isinstance(flat, np.ndarray):
        out = np.full(real.shape, fill, dtype=np.int64)
        out[real] = flat
        return out
    out = torch.full(real.shape, fill, dtype=torch.long, device=flat.device)
    return out.masked_scatter_(torch.from_numpy(real).to(flat.device), flat)


def _ignore(labels: np.ndarray | torch.Tensor, ignore: np.ndarray) -> np.ndarray | torch.Tensor:
    if isinstance(labels, np.ndarray):
        out = labels.copy()
        np.copyto(out, IGNORE_INDEX, where=ignore)
        return out
    return labels.masked_fill(torch.from_numpy(ignore).to(labels.device), IGNORE_INDEX)


def _tensor(x: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(x).to(device) if isinstance(x, np.ndarray) else x


@dataclass(frozen=True)
class Collator:
    """``collate_fn`` for ``torch.utils.data.DataLoader``: pads a list of examples with `pad` into a `Batch`.

    Examples may be anything `pad` accepts per sequence: example dicts (``input_ids``, optional ``attention_mask`` and
    label hints ``labels``, ``assistant_masks``, ``completion_mask``, ``prompt_length(s)``), int lists, arrays or
    tensors. ``completion_only=True``: every example must carry a hint that marks its prompt (else `LabelError`
    naming the keys looked for and found). A batch with no target token raises `NoTargetError` unless
    ``allow_empty=True``. ``return_dict=True`` returns ``batch.model_inputs()`` instead (the dict a Hugging Face
    ``Trainer`` passes to the model).

    Example: ``DataLoader(dataset, batch_size=8, collate_fn=Collator(pad_id=tok.pad_id))``.
    """

    pad_id: int
    side: str = "right"
    pad_to_multiple_of: int | None = None
    max_length: int | None = None
    truncation: bool = False
    truncation_side: str = "right"
    return_dict: bool = False
    completion_only: bool = False
    allow_empty: bool = False

    def __post_init__(self) -> None:
        pad([[0]], **self._options())  # validate the options once, at construction
        for name in ("return_dict", "completion_only", "allow_empty"):
            if not isinstance(getattr(self, name), bool):
                raise bad(InputError, name, "a bool", repr(getattr(self, name)))

    def _options(self) -> dict[str, Any]:
        names = ("pad_id", "side", "pad_to_multiple_of", "max_length", "truncation", "truncation_side")
        return {k: getattr(self, k) for k in names}

    def __call__(self, examples: Sequence[Any]) -> Batch | dict[str, Any]:
        examples = list(sequences_data("examples", examples))
        hints = label_hints(examples, completion_only=self.completion_only)
        batch = pad(examples, **self._options())
        check_targets(batch.labels, allow_empty=self.allow_empty, hints=hints)
        return batch.model_inputs() if self.return_dict else batch


# ----------------------------------------------------------------------------------------------------------------------
# Reading the inputs


@dataclass
class _Rows:
    """Sequences read from one input, one 1D int64 numpy array or integer tensor per sequence."""

    ids: list
    labels: list | None = None
    prompt_lengths: list[int] | None = None
    extras: dict = field(default_factory=dict)
    hints: tuple[str, ...] = ()


def _read_sequences(sequences: Any) -> _Rows:
    sequences = sequences_data("sequences", sequences)
    if isinstance(sequences, Mapping):
        return _read_examples(_columns_to_examples(sequences))
    if isinstance(sequences, (torch.Tensor, np.ndarray)):
        if sequences.ndim != 2:
            raise bad(ShapeError, "sequences", "a 2D array or tensor (B, L), or a list of sequences", sequences.shape)
        sequences = list(sequences)
    elif isinstance(sequences, (str, bytes)) or not isinstance(sequences, Sequence):
        raise bad(InputError, "sequences", "a list of token sequences or of example dicts", type(sequences).__name__)
    if len(sequences) == 0:
        raise bad(InputError, "sequences", "at least one sequence", "an empty list")
    if isinstance(sequences[0], Mapping):
        return _read_examples(sequences)
    return _Rows(ids=[_as_row(f"sequences[{i}]", x) for i, x in enumerate(sequences)])


def _columns_to_examples(columns: Mapping) -> list[dict]:
    """``{"input_ids": [[..], [..]], "labels": ...}`` (a tokenizer's output) -> one dict per example."""
    if "input_ids" not in columns:
        raise bad(InputError, "sequences", "a dict of columns with an 'input_ids' key", sorted(columns))
    columns = {key: sequences_data(f"sequences[{key!r}]", col) for key, col in columns.items()}
    n = len(columns["input_ids"])
    for key, col in columns.items():
        if len(col) != n:
            raise bad(ShapeError, f"sequences[{key!r}]", f"{n} entries like 'input_ids'", len(col))
    return [{key: col[i] for key, col in columns.items()} for i in range(n)]


def _read_examples(examples: Sequence[Any]) -> _Rows:
    if len(examples) == 0:
        raise bad(InputError, "sequences", "at least one example", "none")
    for i, ex in enumerate(examples):
        if not isinstance(ex, Mapping) or "input_ids" not in ex:
            raise bad(InputError, f"sequences[{i}]", "an example dict with 'input_ids'", type(ex).__name__)
    hints = label_hints(examples, name="sequences")
    with_labels = bool({"labels", *MASK_HINTS} & set(hints))
    with_prompt = bool(set(PROMPT_HINTS) & set(hints))
    rows = _Rows(ids=[], labels=[] if with_labels else None, prompt_lengths=[] if with_prompt else None, hints=hints)
    extra_keys = [k for k in examples[0] if k not in _EXAMPLE_KEYS]
    rows.extras = {k: [] for k in extra_keys}
    for i, ex in enumerate(examples):
        ids = _as_row(f"sequences[{i}]['input_ids']", ex["input_ids"])
        lab, prompt = example_labels(f"sequences[{i}]", ex, ids, hints)
        lab = _as_row(f"sequences[{i}]['labels']", lab) if with_labels else None
        if lab is not None and len(lab) != len(ids):
            raise bad(ShapeError, f"sequences[{i}]['labels']", f"{len(ids)} labels like its input_ids", len(lab))
        if ex.get("attention_mask") is not None:
            ids, lab = _drop_padding(i, ex["attention_mask"], ids, lab)
        rows.ids.append(ids)
        if with_labels:
            rows.labels.append(lab)
        if with_prompt:
            rows.prompt_lengths.append(prompt)
        for k in extra_keys:
            rows.extras[k].append(ex.get(k))
    return rows


def _drop_padding(i: int, attention_mask: Any, ids: Any, lab: Any) -> tuple[Any, Any]:
    """Keep the positions where an example's own ``attention_mask`` is 1 (it may come padded already)."""
    name = f"sequences[{i}]['attention_mask']"
    m = _as_row(name, attention_mask)
    if len(m) != len(ids):
        raise bad(ShapeError, name, f"{len(ids)} entries like its input_ids", len(m))
    if len(m) == 0 or bool((m == 1).all()):
        return ids, lab
    if not bool(((m == 0) | (m == 1)).all()):
        raise bad(InputError, name, "values 0 (padding) and 1 (real token)", "other values")
    keep = m == 1
    return _take(ids, keep), None if lab is None else _take(lab, keep)


def _take(x: Any, keep: Any) -> Any:
    """``x[keep]`` for a numpy array or tensor ``x`` and a bool numpy array or tensor ``keep``."""
    if isinstance(x, torch.Tensor):
        return x[torch.as_tensor(keep, device=x.device)]
    return x[keep.cpu().numpy() if isinstance(keep, torch.Tensor) else keep]


def _read_labels(labels: Any, ids: list) -> list:
    labels = sequences_data("labels", labels)
    if isinstance(labels, (torch.Tensor, np.ndarray)) and labels.ndim == 2:
        labels = list(labels)
    if isinstance(labels, (str, bytes)) or not isinstance(labels, Sequence):
        raise bad(InputError, "labels", "a list of label sequences", type(labels).__name__)
    if len(labels) != len(ids):
        raise bad(ShapeError, "labels", f"{len(ids)} sequences like the inputs", len(labels))
    out = [_as_row(f"labels[{i}]", x) for i, x in enumerate(labels)]
    for i, (lab, x) in enumerate(zip(out, ids, strict=True)):
        if len(lab) != len(x):
            raise bad(ShapeError, f"labels[{i}]", f"{len(x)} labels like sequences[{i}]", len(lab))
    return out


def _read_prompt_lengths(prompt_lengths: Any, n: int) -> list[int]:
    prompt_lengths = dense_data("prompt_lengths", prompt_lengths)
    if isinstance(prompt_lengths, (torch.Tensor, np.ndarray)):
        if prompt_lengths.ndim != 1:
            raise bad(ShapeError, "prompt_lengths", f"a ({n},) vector", tuple(prompt_lengths.shape))
        if prompt_lengths.dtype == torch.bool or prompt_lengths.dtype == np.bool_:
            raise bad(InputError, "prompt_lengths", "integers", "booleans")
        prompt_lengths = prompt_lengths.tolist()
    if isinstance(prompt_lengths, (str, bytes)) or not isinstance(prompt_lengths, Sequence):
        raise bad(InputError, "prompt_lengths", f"{n} ints", type(prompt_lengths).__name__)
    if len(prompt_lengths) != n:
        raise bad(ShapeError, "prompt_lengths", f"one per sequence ({n})", len(prompt_lengths))
    return [check_int(f"prompt_lengths[{i}]", p, low=0) for i, p in enumerate(prompt_lengths)]


def _check_prompts_fit(prompts: list[int], lens: list[int]) -> None:
    for i, (p, m) in enumerate(zip(prompts, lens, strict=True)):
        if p > m:
            raise bad(InputError, f"prompt_lengths[{i}]", f"at most the sequence length ({m})", p)


def _as_row(name: str, value: Any) -> Any:
    """One sequence as a 1D integer tensor (kept on its device; a sparse one as its dense values) or a 1D int64 numpy
    array."""
    value = dense_data(name, value)
    if isinstance(value, torch.Tensor):
        if value.dim() != 1:
            raise bad(ShapeError, name, "a 1D sequence of token ids", f"shape {tuple(value.shape)}")
        if value.dtype == torch.bool or value.is_floating_point() or value.is_complex():
            if value.numel() == 0:
                return value.long()
            raise bad(InputError, name, "integer token ids", f"dtype {value.dtype}")
        return value
    if isinstance(value, (str, bytes)):
        raise bad(InputError, name, "integer token ids (tokenize text first)", type(value).__name__)
    try:
        arr = value if isinstance(value, np.ndarray) else np.asarray(value)
    except (ValueError, TypeError, OverflowError) as err:  # ragged nesting, objects numpy cannot hold, huge ints
        raise bad(InputError, name, "a flat sequence of integer token ids", f"{type(value).__name__} ({err})") from None
    if arr.ndim != 1:
        raise bad(ShapeError, name, "a 1D sequence of token ids", f"shape {arr.shape}")
    if arr.dtype.kind not in "iu":
        if arr.size == 0:
            return np.empty(0, dtype=np.int64)
        raise bad(InputError, name, "integer token ids", f"dtype {arr.dtype} (e.g. {shown(arr[0], limit=80)})")
    return arr if arr.dtype == np.int64 else arr.astype(np.int64)


def _cut(x: Any, max_length: int, keep_first: bool) -> Any:
    return x[:max_length] if keep_first else x[max(len(x) - max_length, 0) :]


def _target_device(rows: _Rows, device: torch.device | str | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    seen = {x.device for part in (rows.ids, rows.labels or []) for x in part if isinstance(x, torch.Tensor)}
    if len(seen) > 1:
        raise bad(DeviceError, "sequences", "tensors on one device", sorted(str(d) for d in seen))
    return seen.pop() if seen else torch.device("cpu")


def _concat(rows: list, device: torch.device) -> np.ndarray | torch.Tensor:
    """All sequences end to end as one ``(total,)`` int64 buffer (one copy, no per-token Python): a numpy array when
    ``device`` is the CPU, else a tensor on ``device``."""
    if device.type == "cpu":
        return np.concatenate([x.cpu().long().numpy() if isinstance(x, torch.Tensor) else x for x in rows])
    parts = [x.to(device) if isinstance(x, torch.Tensor) else torch.from_numpy(x).to(device) for x in rows]
    return torch.cat(parts).long()


def _check_ids(flat: np.ndarray | torch.Tensor, lens: list[int]) -> None:
    if len(flat) and int(flat.min()) < 0:
        first = int((flat < 0).nonzero()[0][0])
        row = int(np.searchsorted(np.cumsum(lens), first, side="right"))
        raise bad(InputError, f"sequences[{row}]", "token ids >= 0", f"a negative id {int(flat[first])}")


def _check_label_values(flat: np.ndarray | torch.Tensor) -> None:
    if len(flat) and int(flat.min()) < 0:
        wrong = flat[(flat < 0) & (flat != IGNORE_INDEX)]
        if len(wrong):
            raise bad(InputError, "labels", f"ids >= 0 or {IGNORE_INDEX} (ignored)", f"{int(wrong[0])}")


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise bad(InputError, name, " or ".join(repr(c) for c in choices), repr(value))
