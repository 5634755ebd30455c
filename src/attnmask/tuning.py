"""Measured choice of the ``"auto"`` backend (opt-in): time the close candidates once per kind of call, keep the
fastest.

Layer 3 (attention), under ``attention.py``, which consults it in ``choose_backend``; imports ``masks``, ``errors``
and ``backends.contract``.

``"auto"`` picks by estimated cost (each backend's ``cost``), a model whose constants were fitted on two CPUs
(``benchmarks/bench_limit.py --fit``). On another CPU, or while other processes hold cores, the estimates can miss
the fastest backend by 1.1-1.6x (``benchmarks/RESULTS.md``). With tuning on, ``"auto"`` times the backends whose
estimates lie within ``spread`` of the cheapest, once per kind of call, and runs the fastest from then on. The
result is the same (every backend computes the same attention); only the time changes.

- **A kind of call** (the key): device, dtype, whether a gradient is needed, ``B``, ``H``, ``Hkv``, ``D``, ``Dv``;
  ``Q`` and ``K`` rounded up to a power of two; the spec's structure (its parts' types and scalar fields, not the
  data of its tensors); the candidates in the estimates' order, each with its estimate's ratio to the cheapest in
  steps of a factor sqrt(2); the thread count the estimates saw and whether other processes held cores. The batches
  of one training run (new documents each step, rows of one length) thus share a few keys, each tuned once.
- **When.** A key's first call only records it, so a call that never recurs pays nothing; its second call is timed:
  each candidate runs once to warm up (plans built, a kernel compiled), then ``rounds`` times, interleaved (more, up
  to ``4 * rounds``, while a candidate has run less than 20 ms in all), and the median counts. A call that needs a
  gradient is timed forward + backward, on detached copies of ``q``, ``k``, ``v`` (and ``sinks``) against a
  constant upstream gradient: the caller's graph and ``.grad`` are untouched. The fastest wins if it beats the
  estimates' pick by more than ``margin``; otherwise the estimates' pick stays.
- **Not tuned** (the estimates decide): calls with ``dropout_p > 0`` (trial runs would draw from torch's RNG and
  shift the caller's random stream), calls under ``torch.use_deterministic_algorithms(True)`` (a choice by timing
  could differ between runs, and backends differ in the last bits of their results), calls while ``torch.compile``
  traces, a functorch transform (``vmap``, ``torch.func.grad``) or a dispatch or function mode is active, or a CUDA
  graph is captured, calls with a single candidate, ``"auto"``'s small-rows shortcut to stock SDPA, and calls made
  from inside a trial.
- **Off by default** for the same reason, as ``torch.backends.cudnn.benchmark``: two runs of one program may time
  their candidates differently, pick different backends and so differ in the last bits.
- **Memory.** A candidate whose scratch (``Backend.scratch_bytes``: "sdpa"'s dense mask, "reference"'s scores)
  passes the estimates' pick's by more than ``TRIAL_SCRATCH_BYTES`` (256 MiB) is not timed: on rows of 16K a
  dense bool mask alone is 256 MiB per row.
- **A candidate that raises** in a trial is dropped from that key and logged (logger ``attnmask``, warning).
- **Cost:** once per key, ``1 + rounds`` to ``1 + 4 * rounds`` runs of each candidate (forward + backward with a
  gradient) and their transient memory, as large as one such call's. Results live in this process (at most
  ``KEPT`` keys, the least recently used forgotten first); :func:`clear` forgets them, :func:`results` lists them.
- **Kept across processes** with ``cache`` (``autotune(cache=path)``, ``ATTNMASK_AUTOTUNE_CACHE=path``): a JSON file
  of the measured choices of CPU calls, read at the first tuned call and rewritten (merged with what other processes
  wrote meanwhile, replaced atomically) after each measurement, so the next run (or the other ranks of a job on
  the same machine) uses them without timing. A file written on another machine or by another version of attnmask
  or torch (CPU model, core count, versions: recorded in it) is not used, and one that cannot be read is logged and
  ignored, never fatal. Not kept: CUDA choices (the key names no GPU model), and keys whose spec holds a ``custom``
  predicate (a function is known by its code object, which has no stable name across processes).

Switch it on with :func:`autotune` (a function and a context manager) or, for the whole process, the environment
variable ``ATTNMASK_AUTOTUNE=1`` read at import (``0`` or unset: off). Example::

    with attnmask.autotune():
        for batch in loader:
            loss = model(**batch).loss   # the layers' attention calls: the first repeat of each kind is timed
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import platform
import statistics
import tempfile
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

import torch

from attnmask.backends.contract import AttentionCall, Backend
from attnmask.errors import InputError, bad
from attnmask.masks import MaskSpec

__all__ = ["KEPT", "TRIAL_SCRATCH_BYTES", "Settings", "TunedChoice", "autotune", "clear", "results", "settings"]

KEPT = 256
"""Keys whose measured choice is kept (and as many keys seen once), least recently used forgotten first."""

TRIAL_SCRATCH_BYTES = 1 << 28
"""A candidate whose ``Backend.scratch_bytes`` (a dense mask, materialised scores) passes the estimates' pick's by
more than this (256 MiB) is not timed: a trial must not allocate what the call itself never would."""

_log = logging.getLogger("attnmask")


@dataclass(frozen=True)
class Settings:
    """How ``"auto"`` tunes: ``enabled``; at most ``candidates`` backends, those whose estimate is at most ``spread``
    times the cheapest; ``rounds`` timed runs after one warm-up (more, up to ``4 * rounds``, while a candidate has
    run less than 20 ms in all); the fastest by median time replaces the estimates' pick when it is faster by more
    than the fraction ``margin``."""

    enabled: bool = False
    candidates: int = 4
    spread: float = 3.0
    rounds: int = 3
    margin: float = 0.03
    cache: str | None = None
    """A JSON file that keeps the measured choices of CPU calls across processes (module docstring), or ``None``."""

    def __post_init__(self) -> None:
        if not isinstance(self.enabled, bool):
            raise bad(InputError, "enabled", "True or False", repr(self.enabled))
        if self.cache is not None:
            if not isinstance(self.cache, (str, os.PathLike)) or not os.fspath(self.cache):
                raise bad(InputError, "cache", "None or a file path", repr(self.cache))
            object.__setattr__(self, "cache", os.fspath(self.cache))
        for name, low in (("candidates", 2), ("rounds", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise bad(InputError, name, f"an int >= {low}", repr(value))
        if isinstance(self.spread, bool) or not isinstance(self.spread, (int, float)) or not 1 < self.spread < math.inf:
            raise bad(InputError, "spread", "a finite number > 1", repr(self.spread))
        if isinstance(self.margin, bool) or not isinstance(self.margin, (int, float)) or not 0 <= self.margin < 1:
            raise bad(InputError, "margin", "a number in [0, 1)", repr(self.margin))


@dataclass(frozen=True)
class TunedChoice:
    """What tuning measured for one key: the estimates' pick, the backend that runs, and each candidate's median
    time in milliseconds (forward, or forward + backward when the key needs a gradient), fastest first; a candidate
    that raised is absent."""

    key: tuple
    estimated: str
    picked: str
    times_ms: tuple[tuple[str, float], ...]


_ON = ("1", "true", "yes", "on")
_OFF = ("", "0", "false", "no", "off")


def _from_environment() -> Settings:
    value = os.environ.get("ATTNMASK_AUTOTUNE", "")
    if value.strip().lower() not in _ON + _OFF:
        raise bad(InputError, "ATTNMASK_AUTOTUNE", f"one of {_ON + _OFF[1:]} or unset", repr(value))
    return Settings(enabled=value.strip().lower() in _ON, cache=os.environ.get("ATTNMASK_AUTOTUNE_CACHE") or None)


_settings = _from_environment()
_lock = threading.Lock()
_seen: OrderedDict = OrderedDict()  # key -> None: seen once, not yet tuned
_tuned: OrderedDict = OrderedDict()  # key -> TunedChoice
_trial = threading.local()  # .active: a trial runs on this thread (its own attention calls are not tuned)
_stored: dict = {"path": None, "choices": {}}  # the cache file read last: repr(key) -> its record


def settings() -> Settings:
    """The settings in force."""
    return _settings


class autotune:  # noqa: N801 (used like a function, as torch.no_grad)
    """Turn measured tuning of ``"auto"`` on (or, with ``enabled=False``, off) for this process, from now on; used in
    a ``with`` statement, the settings before it come back at its end. The settings are process-wide, not
    per-thread. Arguments as :class:`Settings`; invalid ones raise ``InputError`` naming them."""

    def __init__(
        self,
        enabled: bool = True,
        *,
        candidates: int = 4,
        spread: float = 3.0,
        rounds: int = 3,
        margin: float = 0.03,
        cache: str | os.PathLike | None = None,
    ) -> None:
        global _settings
        new = Settings(enabled, candidates, spread, rounds, margin, cache)
        self._previous, _settings = _settings, new

    def __enter__(self) -> Settings:
        return _settings

    def __exit__(self, *exc) -> None:
        global _settings
        _settings = self._previous


def clear() -> None:
    """Forget every measured choice and every key seen once held in this process (a cache file's choices are read
    again at the next tuned call: delete the file to forget them)."""
    with _lock:
        _seen.clear()
        _tuned.clear()
        _stored.update(path=None, choices={})


def results() -> tuple[TunedChoice, ...]:
    """The measured choices held now, oldest first."""
    with _lock:
        return tuple(_tuned.values())


def candidates(
    call: AttentionCall, ranked: list[tuple[Backend, float]], spread: float, limit: int
) -> list[tuple[Backend, float]]:
    """The first ``limit`` of ``ranked`` (eligible backends and their estimates, cheapest first) whose estimate is at
    most ``spread`` times the cheapest's and whose scratch memory passes the cheapest's by at most
    ``TRIAL_SCRATCH_BYTES``."""
    if not ranked:
        return []
    best = ranked[0][1]
    room = ranked[0][0].scratch_bytes(call) + TRIAL_SCRATCH_BYTES
    close = [(b, c) for b, c in ranked if c <= spread * best]
    return [(b, c) for i, (b, c) in enumerate(close) if i == 0 or b.scratch_bytes(call) <= room][:limit]


def tuning_key(call: AttentionCall, close: list[tuple[Backend, float]], threads: int, busy: bool) -> tuple:
    """The kind of ``call`` (module docstring): what a measured choice is shared by."""
    q, k, v = call.q, call.k, call.v
    best = close[0][1]
    ratios = tuple((b.name, _half_octaves(c, best)) for b, c in close)
    shape = (q.shape[0], q.shape[1], k.shape[1], _pow2(q.shape[2]), _pow2(k.shape[2]), q.shape[3], v.shape[3])
    return (q.device.type, q.dtype, call.needs_grad, shape, _structure(call), ratios, threads, busy)


def lookup(key: tuple) -> TunedChoice | None:
    """The measured choice for ``key``, if any: held in this process, or in the settings' cache file."""
    with _lock:
        choice = _tuned.get(key)
        if choice is not None:
            _tuned.move_to_end(key)
            return choice
    return _from_cache(key, _settings.cache)


def choose(
    call: AttentionCall, ranked: list[tuple[Backend, float]], threads: int, busy: bool, memo: dict | None = None
) -> Backend:
    """The backend to run ``call`` with, given ``ranked`` (the eligible backends and their estimates, cheapest first,
    ties in registry order: the first is the estimates' pick): that pick when tuning is off or does not apply, the
    measured choice of the call's key once it is known, after timing the candidates on the key's second call.
    ``memo``: the call's plans (``plancache.call_plans``), where the candidates and the key are kept under
    ``"tuning"`` so that a repeated spec and shape skip working them out."""
    settings_now = _settings
    pick = ranked[0][0]
    if not settings_now.enabled or not _tunable(call):
        return pick
    kept = None if memo is None else memo.get("tuning")
    if kept is not None and kept[0] is settings_now and kept[1] is ranked and kept[2:4] == (threads, busy):
        close, key = kept[4], kept[5]
    else:
        close = candidates(call, ranked, settings_now.spread, settings_now.candidates)
        key = tuning_key(call, close, threads, busy) if len(close) > 1 else None
        if memo is not None:
            memo["tuning"] = (settings_now, ranked, threads, busy, close, key)
    if key is None:
        return pick
    choice = lookup(key)
    if choice is not None:
        return _by_name(close, choice.picked, pick)
    with _lock:
        first = key not in _seen
        _seen[key] = None
        _seen.move_to_end(key)
        if len(_seen) > KEPT:
            _seen.popitem(last=False)
    if first:
        return pick
    choice = _measure(call, key, [b for b, _ in close], settings_now)
    with _lock:
        _seen.pop(key, None)
        _remember(choice)
        if settings_now.cache is not None:
            _write_cache(settings_now.cache, choice)
    return _by_name(close, choice.picked, pick)


def _remember(choice: TunedChoice) -> None:
    """Hold ``choice`` (under ``_lock``), forgetting the least recently used beyond ``KEPT``."""
    _tuned[choice.key] = choice
    if len(_tuned) > KEPT:
        _tuned.popitem(last=False)


# ----------------------------------------------------------------------------------------------------------------------
# The cache file: {"format": 1, "machine": {...}, "choices": {repr(key): {"estimated", "picked", "times_ms"}}}

CACHE_FORMAT = 1


@functools.cache
def _machine() -> dict:
    """What a cache file's choices were measured on: versions, CPU model, cores (a choice holds only there)."""
    import attnmask  # the package, complete by the time a call is tuned

    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as info:
            model = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), model)
    except OSError:
        pass
    return {"attnmask": attnmask.__version__, "torch": torch.__version__, "cpu": model, "cores": os.cpu_count()}


def _cache_key(key: tuple) -> str | None:
    """``key`` as the cache file names it, or ``None`` when it is not kept (module docstring)."""
    text = repr(key)
    return text if key[0] == "cpu" and " at 0x" not in text else None


def _read_cache(path: str) -> dict:
    """The choices a cache file holds for this machine (``{}`` when absent, unreadable or another machine's)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as err:
        _log.warning("attnmask.autotune: cannot read the tuning cache %s (%s); measuring anew", path, err)
        return {}
    if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT or not isinstance(data.get("choices"), dict):
        _log.warning("attnmask.autotune: %s is not a tuning cache of format %d; measuring anew", path, CACHE_FORMAT)
        return {}
    if data.get("machine") != _machine():
        _log.info("attnmask.autotune: the tuning cache %s was written on %s; measuring anew", path, data.get("machine"))
        return {}
    return data["choices"]


def _from_cache(key: tuple, path: str | None) -> TunedChoice | None:
    """The choice the cache file at ``path`` holds for ``key`` (read once per path), held from then on."""
    name = _cache_key(key) if path is not None else None
    if name is None:
        return None
    with _lock:
        if _stored["path"] != path:
            _stored.update(path=path, choices=_read_cache(path))
        record = _stored["choices"].get(name)
        try:
            times = tuple((str(n), float(ms)) for n, ms in record["times_ms"])
            choice = TunedChoice(key, str(record["estimated"]), str(record["picked"]), times)
        except (TypeError, KeyError, ValueError):  # no record, or one this version does not read
            return None
        _remember(choice)
        return choice


def _write_cache(path: str, choice: TunedChoice) -> None:
    """Add ``choice`` to the cache file (under ``_lock``): merged with what the file holds now (other processes may
    have written), written to a temporary file beside it and moved over it in one step. A failure is logged."""
    name = _cache_key(choice.key)
    if name is None:
        return
    record = {"estimated": choice.estimated, "picked": choice.picked, "times_ms": [list(t) for t in choice.times_ms]}
    choices = {**_read_cache(path), name: record}
    _stored.update(path=path, choices=choices)
    data = {"format": CACHE_FORMAT, "machine": _machine(), "choices": choices}
    temporary = None
    try:
        folder = os.path.dirname(os.path.abspath(path))
        with tempfile.NamedTemporaryFile("w", dir=folder, suffix=".tmp", delete=False, encoding="utf-8") as f:
            temporary = f.name
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(temporary, path)
    except OSError as err:
        if temporary is not None and os.path.exists(temporary):
            os.unlink(temporary)
        _log.warning("attnmask.autotune: cannot write the tuning cache %s (%s)", path, err)


def _by_name(close: list[tuple[Backend, float]], name: str, default: Backend) -> Backend:
    return next((b for b, _ in close if b.name == name), default)


def _tunable(call: AttentionCall) -> bool:
    if call.dropout_p > 0 or getattr(_trial, "active", False) or torch.are_deterministic_algorithms_enabled():
        return False
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return False  # traced, or transformed (vmap, torch.func.grad): a trial's time or backward means nothing there
    if torch._C._len_torch_dispatch_stack() or torch._C._len_torch_function_stack():
        return False  # a dispatch or function mode (fake tensors, a profiler's mode): not real kernels to time
    return not (call.q.device.type == "cuda" and torch.cuda.is_current_stream_capturing())


def _measure(call: AttentionCall, key: tuple, backends: list[Backend], settings_now: Settings) -> TunedChoice:
    """Time each of ``backends`` on ``call`` (module docstring) and return the choice; the first is the estimates'
    pick."""
    grad_out = None
    if call.needs_grad:
        grad_out = torch.full(
            (call.batch, call.heads, call.q_len, call.value_dim), 0.5, dtype=call.q.dtype, device=call.q.device
        )
    timed: dict[str, list[float]] = {}
    alive = list(backends)
    _trial.active = True
    try:
        for b in list(alive):
            if _timed(b, call, grad_out) is None:
                alive.remove(b)
        r = 0
        while alive and (r < settings_now.rounds or (r < _MAX_ROUNDS * settings_now.rounds and _short(timed))):
            for b in alive[r % len(alive) :] + alive[: r % len(alive)]:
                seconds = _timed(b, call, grad_out)
                if seconds is None:
                    alive.remove(b)
                    timed.pop(b.name, None)
                else:
                    timed.setdefault(b.name, []).append(seconds)
            r += 1
    finally:
        _trial.active = False
    median = {name: statistics.median(times) for name, times in timed.items()}
    estimated = backends[0].name
    picked = estimated
    if median:
        fastest = min(median, key=median.__getitem__)
        if estimated not in median or median[fastest] < (1 - settings_now.margin) * median[estimated]:
            picked = fastest
    times = tuple(sorted(((n, s * 1e3) for n, s in median.items()), key=lambda item: item[1]))
    choice = TunedChoice(key, estimated, picked, times)
    _log.debug("attnmask.autotune: %s picks %s (estimates: %s), times %s", key[:5], picked, estimated, times)
    return choice


_MAX_ROUNDS = 4  # short calls: up to this many times ``rounds``, until each candidate has run _ENOUGH_S in all
_ENOUGH_S = 0.02


def _short(timed: dict[str, list[float]]) -> bool:
    """Whether some candidate has run less than ``_ENOUGH_S`` in all (its median would rest on a few short runs)."""
    return any(sum(times) < _ENOUGH_S for times in timed.values())


def _timed(backend: Backend, call: AttentionCall, grad_out: torch.Tensor | None) -> float | None:
    """Seconds of one run of ``backend`` on ``call`` (forward + backward when ``grad_out`` is given), or ``None``
    when it raised (logged)."""
    try:
        _synchronize(call.q.device)
        start = time.perf_counter()
        if grad_out is None:
            with torch.no_grad():
                backend.run(call)
        else:
            trial = _detached(call)
            with torch.enable_grad():
                backend.run(trial).backward(grad_out)
        _synchronize(call.q.device)
        return time.perf_counter() - start
    except Exception as error:  # a candidate's failure must not fail a call that tuning merely observes
        _log.warning(
            "attnmask.autotune: backend %r raised in a timed trial and is not a candidate: %r", backend.name, error
        )
        return None


def _detached(call: AttentionCall) -> AttentionCall:
    """``call`` on copies of its inputs that share storage but no graph, each requiring a gradient as before."""

    def copy(t):
        return None if t is None else t.detach().requires_grad_(t.requires_grad)

    return dataclasses.replace(call, q=copy(call.q), k=copy(call.k), v=copy(call.v), sinks=copy(call.sinks))


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def _half_octaves(cost: float, best: float) -> int:
    """``cost / best`` in steps of sqrt(2) (0 for the cheapest; costs are positive and finite)."""
    if not (best > 0 and math.isfinite(cost) and math.isfinite(best)):
        return 0
    return round(2 * math.log2(cost / best))


def _structure(call: AttentionCall) -> tuple:
    """The mask's structure: per part of a spec its type and scalar fields (a tensor by its dtype and number of
    dimensions, a function by its code), or a tensor mask's shape."""
    mask = call.mask
    if isinstance(mask, torch.Tensor):
        return ("tensor", tuple(mask.shape))
    if not isinstance(mask, MaskSpec):
        return ("none",)
    return (*mask.structure(_field_key), call.positions_given)


def _field_key(value):
    if isinstance(value, (int, float, str, bool, type(None))):
        return value
    if isinstance(value, torch.Tensor):
        return (value.dtype, value.dim())
    if isinstance(value, (tuple, list)):  # a combinator's parts (walked on their own) or data (documents' lengths)
        return "sequence"
    code = getattr(value, "__code__", None)
    return code if code is not None else type(value).__qualname__
