"""Attention plans cached per mask spec: a model that calls ``attention`` once per layer with the same spec object
and shapes lowers the spec (varlen segments, block layout, key band) and picks the ``"auto"`` backend once, not once
per layer.

Layer 3 (attention), under ``attention.py`` and the backends (``attnmask/backends/``), which reach it through
``backends._common.cached(call, key, build)``, ``attention.choose_backend`` and, for repeated calls,
``attention.attention``. Imports only ``masks``.

What an entry holds: a dict ``{key: plan}``, where each backend stores what its ``build(call)`` returned (a
``_VarlenPlan``, a ``BlockLayout`` and its tile groups with the element masks of their PARTIAL tiles, a band plan,
or the reason it cannot serve the call), and ``"auto"`` holds the ``"auto"`` choice with the registry it was made
from, the intra-op thread count its estimates saw (``backends._workers.threads_available()``) and whether other
processes held cores then (``backends._workers.contended()``), with every eligible backend's estimate (neither count
nor load for a choice of the stock rule, which reads neither); with measured tuning on, ``"tuning"`` holds the call's
candidates and tuning key (``attnmask.tuning``).

Key: the spec OBJECT, then the call's signature. The spec's entries live in an attribute of the spec itself
(``masks.PLANS_ATTRIBUTE``), so they die with it: at once, or at the next garbage collection when a plan refers back
to the spec (a ``BlockLayout`` keeps its spec); pickling or copying a spec leaves them behind. Per spec, an LRU of at
most ``ENTRIES_PER_SPEC`` signatures ``(q, k, v shapes and strides, dtype, device, whether a gradient is needed, the
scale and any other scalar field of AttentionCall, which modifier tensors the call carries)``; shapes carry ``B, H,
Hkv, Q, K, D, Dv``. Positions are not in it: only calls at the default positions are cached, and those follow from
``Q`` and ``K``. The score modifier tensors (``sinks``, ``alibi_slopes``, ``(H,)`` each) join it by presence only
(and, for ``sinks``, whether it needs a gradient), not by value: a plan depends on the mask, never on a sink or a
slope, and the ``"auto"`` choice only on which modifiers are present (a backend declares modifiers by name), so a
model whose layers pass their own sinks still plans once per spec. ``softcap`` is a scalar and joins by value.

Validity: the ``_version`` counter of every tensor the spec holds (``MaskSpec.tensors()``), checked on every call; an
in-place write to any of them (``spec_mask[0, 3] = False``) drops all of that spec's entries. Inference-mode tensors
have no version counter: a spec holding them keeps copies of their contents (up to ``SNAPSHOT_MAX_BYTES`` in all),
compared on every call, so that the layers of a model generating under ``torch.inference_mode`` plan once per step.

Repeated calls: ``attention`` keeps with each entry, per kind of call (``remember_call``: the exact types, shapes,
strides, dtypes and devices of q, k, v, whether autograd records the call, the scale and dropout probability as
given), what it needs to rebuild a call of that kind without checking the inputs again; a later call of the same kind
on the same spec finds it (``repeated_call``) while the spec's tensors are unchanged, and gets the entry's plans with
it (``adopt_plans``). A model's second and later layers skip the input checks and the signature: on a decoding step
of 64 keys (B = 1, H = 4, D = 16, no gradient, one thread) ``attention`` took 84 instead of 118 us (stock SDPA 20).
Dropped with the entries.

Not cached (a dict per call object, as before this module): no mask or a tensor mask; a spec with a ``custom``
predicate (its function may read data the spec cannot list); explicit ``q_positions`` / ``kv_positions``; a spec
holding inference-mode tensors of more than ``SNAPSHOT_MAX_BYTES``; an AttentionCall field that is not a scalar
(other than the modifier tensors above). Writes that bypass the version counter (``t.data[...] = x``, through numpy
or DLPack) are not seen: build a new spec then.

Memory: at most ``ENTRIES_PER_SPEC`` entries per live spec, each the size of its plans: O(documents) for varlen
segments, O(B·nQ·nK) bytes for a block layout plus O(partial tiles · block_size²) bools for its PARTIAL tiles' masks
(which a blocksparse forward keeps for its backward anyway), O(1) for a band plan.

Example: the second call finds the plans of the first, keyed by this spec object::

    >>> spec = causal() & document(seq_lens=[3, 5])
    >>> q = k = v = torch.randn(1, 2, 8, 16)
    >>> first = attention(q, k, v, spec)   # plans, picks a backend, caches both on ``spec``
    >>> torch.equal(attention(q, k, v, spec), first)   # one dict lookup and a version check, then runs
    True
"""

from __future__ import annotations

import dataclasses
import threading
from collections import OrderedDict

import torch

from attnmask.masks import PLANS_ATTRIBUTE, MaskSpec

__all__ = [
    "ENTRIES_PER_SPEC",
    "SNAPSHOT_MAX_BYTES",
    "adopt_plans",
    "cached_signatures",
    "call_plans",
    "remember_call",
    "repeated_call",
    "snapshot",
    "unchanged",
]

ENTRIES_PER_SPEC = 8
"""Call signatures (shapes, dtype, device, grad) kept per spec, least recently used dropped first."""

# The fields of AttentionCall the signature captures otherwise; every other field joins it by value (a scalar) or makes
# the call uncacheable (anything else).
_MODIFIER_TENSORS = ("sinks", "alibi_slopes")  # by presence (and the sinks' grad), never by value
_KNOWN_FIELDS = frozenset({"q", "k", "v", "mask", "q_positions", "kv_positions", "positions_given", *_MODIFIER_TENSORS})
_SCALARS = (bool, int, float, str)

_lock = threading.Lock()


@dataclasses.dataclass(eq=False)
class _SpecPlans:
    """A spec's cached plans: the tensors it holds, their versions when the entries were made (or, for inference-mode
    tensors, which have no version counter, copies of their contents then: ``snapshots``), the LRU of entries."""

    tensors: tuple[torch.Tensor, ...]
    versions: list[int]  # lists throughout: a list comprehension costs less than tuple() of a generator
    entries: OrderedDict = dataclasses.field(default_factory=OrderedDict)
    snapshots: list[torch.Tensor] | None = None
    calls: dict = dataclasses.field(default_factory=dict)  # remember_call's: a call key -> (signature, fields)

    def state(self) -> list:
        """What must be unchanged for the entries to hold: the versions, or the tensors' current contents compared
        with the snapshots (``unchanged``; ``[False]`` once one differs)."""
        if self.snapshots is None:
            return [t._version for t in self.tensors]
        return self.versions if unchanged(self.tensors, self.snapshots) else [False]

    def renew(self) -> None:
        """Drop the entries (and the calls remembered with them) and record the tensors' state now."""
        self.entries.clear()
        self.calls.clear()
        if self.snapshots is None:
            self.versions = [t._version for t in self.tensors]
        else:
            self.snapshots = snapshot(self.tensors)


# A spec holding inference-mode tensors (``torch.inference_mode``: generation, evaluation) is cached by the contents
# of those tensors, copied when its plans are made and compared on every call, where they take at most this many
# bytes (a padding mask of 8 x 16K int64 is 1 MiB; comparing it ~0.1 ms, where planning a call takes 0.3-1 ms and a
# model replans it at every layer without the cache); larger ones are not cached.
SNAPSHOT_MAX_BYTES = 2 << 20


def snapshot(tensors) -> list[torch.Tensor] | None:
    """Copies of ``tensors``' contents, to tell later whether inference-mode tensors (no version counter) changed in
    place (``unchanged``); ``None`` where they take more than ``SNAPSHOT_MAX_BYTES`` in all. Also the integration's
    spec memo (``integrations.hf``) keys its inference-mode inputs by them."""
    if sum(t.numel() * t.element_size() for t in tensors) > SNAPSHOT_MAX_BYTES:
        return None
    return [t.clone() for t in tensors]


def unchanged(tensors, snapshots: list[torch.Tensor]) -> bool:
    """Whether ``tensors`` still hold the contents of their ``snapshot`` (one ``torch.equal`` each)."""
    return all(torch.equal(t, s) for t, s in zip(tensors, snapshots, strict=True))


_UNCACHEABLE = _SpecPlans((), [])  # stored on specs never cached (custom predicate, large inference-mode tensors)


# Where a call object keeps what call_plans found for it (a frozen dataclass's ``__dict__``, as
# ``functools.cached_property`` uses it): (grad mode, spec record, its tensors' versions, the dict). One choice asks
# 7-10 times (each estimate and floor reads its plans); the signature is the costly part.
_FOUND = "_attnmask_found_plans"


def call_plans(call) -> dict:
    """The dict of plans of ``call`` (an ``AttentionCall``): shared by every call with the same spec object and
    signature while the spec's tensors are unchanged, else private to this call object (kept on it, dying with it).
    A shared one is remembered on the call object for as long as the grad mode and the spec's tensors' versions are
    those it was found under."""
    grad = torch.is_grad_enabled()
    found = call.__dict__.get(_FOUND)
    if found is not None:
        grad_then, record, versions, entry = found
        if record is _UNCACHEABLE or record.snapshots is not None and grad_then == grad:
            return entry  # (contents compared once per call object: nothing runs between its asks)
        if grad_then == grad and [t._version for t in record.tensors] == versions:
            return entry
    signature = _signature(call)
    record = _record(call.mask) if signature is not None else _UNCACHEABLE
    if record is _UNCACHEABLE:  # setdefault: concurrent first asks get one dict
        return call.__dict__.setdefault(_FOUND, (grad, _UNCACHEABLE, None, {}))[3]
    entry, versions = _shared_entry(record, signature)
    call.__dict__[_FOUND] = (grad, record, versions, entry)
    return entry


def _shared_entry(record: _SpecPlans, signature: tuple) -> tuple[dict, list[int]]:
    """The spec's entry for ``signature`` (made, or moved to the LRU's end) and its tensors' versions now."""
    with _lock:
        versions = record.state()
        if versions != record.versions:
            record.renew()
            versions = record.versions
        entry = record.entries.get(signature)
        if entry is None:
            entry = record.entries[signature] = {}
            if len(record.entries) > ENTRIES_PER_SPEC:
                record.entries.popitem(last=False)
        else:
            record.entries.move_to_end(signature)
        return entry, versions


def remember_call(call, key: tuple, fields: object) -> None:
    """Keep ``fields`` (what ``attention`` needs to rebuild ``call`` without validating it again) under ``key`` on
    ``call``'s spec, with the signature of ``call``'s plans, for ``repeated_call``. ``key`` must determine every check
    ``call`` passed and its signature (shapes, strides, dtypes, devices, whether a gradient is needed, its scalar
    arguments). Nothing is kept for a call whose plans are not shared (see ``call_plans``); at most
    ``ENTRIES_PER_SPEC`` keys per spec (the oldest dropped first)."""
    call_plans(call)
    found = call.__dict__.get(_FOUND)
    if found is None or found[1] is _UNCACHEABLE:
        return
    record = found[1]
    with _lock:
        record.calls[key] = (_signature(call), fields)
        if len(record.calls) > ENTRIES_PER_SPEC:
            del record.calls[next(iter(record.calls))]


def repeated_call(spec: MaskSpec, key: tuple) -> tuple[object, tuple] | None:
    """What ``remember_call`` kept under ``key`` on ``spec`` and the plans marker for the call rebuilt from it
    (``adopt_plans``), or ``None``: nothing kept, the spec's tensors changed since (version or, for inference-mode
    tensors, contents: every remembered call is then dropped with the plans), or the plans were dropped from the LRU.
    About a microsecond where ``call_plans`` on a new call object computes the signature first."""
    record = spec.__dict__.get(PLANS_ATTRIBUTE)
    if record is None or record is _UNCACHEABLE:
        return None
    kept = record.calls.get(key)
    if kept is None:
        return None
    signature, fields = kept
    with _lock:
        versions = record.state()
        if versions != record.versions:
            return None
        entry = record.entries.get(signature)
    if entry is None:
        return None
    return fields, (torch.is_grad_enabled(), record, versions, entry)


def adopt_plans(call, found: tuple) -> None:
    """Give ``call`` (a new call object rebuilt from ``repeated_call``'s fields) the plans ``found`` there, as
    ``call_plans`` would have found them."""
    call.__dict__[_FOUND] = found


def cached_signatures(spec: MaskSpec) -> int:
    """How many call signatures have plans cached on ``spec`` (0 to ``ENTRIES_PER_SPEC``)."""
    record = spec.__dict__.get(PLANS_ATTRIBUTE)
    return 0 if record is None else len(record.entries)


def _signature(call) -> tuple | None:
    """What a cached plan may depend on besides the spec, or ``None`` when the call's plans are not shared."""
    spec = call.mask
    if not isinstance(spec, MaskSpec) or call.positions_given:
        return None
    extra = []
    for name in _extra_fields(type(call)):
        value = getattr(call, name)
        if value is not None and not isinstance(value, _SCALARS):
            return None
        extra.append(value)
    for name in _MODIFIER_TENSORS:
        value = getattr(call, name, None)
        extra.append(None if value is None else (name, value.requires_grad and torch.is_grad_enabled()))
    q, k, v = call.q, call.k, call.v
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    return (q.shape, k.shape, v.shape, q.stride(), k.stride(), v.stride(), q.dtype, q.device, needs_grad, *extra)


_extra_by_type: dict[type, tuple[str, ...]] = {}


def _extra_fields(call_type: type) -> tuple[str, ...]:
    """Fields of the call's dataclass beyond the known ones (the scale, e.g. a dropout probability): they join the
    signature."""
    names = _extra_by_type.get(call_type)
    if names is None:
        names = tuple(f.name for f in dataclasses.fields(call_type) if f.name not in _KNOWN_FIELDS)
        _extra_by_type[call_type] = names
    return names


def _record(spec: MaskSpec) -> _SpecPlans:
    """The spec's record, made on first use (``_UNCACHEABLE`` for a spec whose plans cannot be trusted later)."""
    record = spec.__dict__.get(PLANS_ATTRIBUTE)
    if record is None:
        tensors = spec.tensors()
        if not spec.is_structural:
            record = _UNCACHEABLE
        elif any(t.is_inference() for t in tensors):  # no version counters: the contents, where they are small
            copies = snapshot(tensors)
            record = _UNCACHEABLE if copies is None else _SpecPlans(tensors, [], snapshots=copies)
        else:
            record = _SpecPlans(tensors, [t._version for t in tensors])
        with _lock:
            record = spec.__dict__.setdefault(PLANS_ATTRIBUTE, record)
    return record
