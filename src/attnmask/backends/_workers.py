"""Coarse-grained parallel work for the backends that issue many small torch calls ("varlen", "blocksparse").

Layer 3 (attention); imports nothing of attnmask.

Why: torch splits every operator across its intra-op threads (OpenMP), and each operator ends at a barrier that waits
for the slowest thread. A backend that makes hundreds of small calls (one SDPA per document, one flash call per tile
group) then waits hundreds of times; when another process holds one of the cores (DataLoader workers beside a
training loop) every wait lasts a scheduler time slice, and such a backend measured 4-15x slower against 1.5-2.5x for
one large SDPA call (``benchmarks/RESULTS.md``, issue 15). Here the calls are dealt instead to the caller and
``torch.get_num_threads() - 1`` worker threads, each running its share with **one** intra-op thread, pulling the next
task when done (largest first): no barrier between tasks, a worker whose core is taken simply takes fewer tasks, and
the caller waits only for tasks a worker has started. torch releases the GIL inside its kernels, so the workers
compute in parallel.

Small calls (rows of ~1,000 tokens) need more: a task handed to another thread costs a wake-up and a GIL hand-over
around every torch call, and with a core taken each can last a time slice, so tasks averaging under ``min_work``
(``MIN_TASK_WORK`` multiply-adds, ~1 ms) run in the caller with one intra-op thread, and a backend's many small
bookkeeping ops (gathers, masks, assembly) run in a :func:`serial_steps` block, with one intra-op thread too, only
its large calls split across every thread (:func:`all_threads`, or a task too large to share). A call then opens
about as many parallel regions as stock SDPA does: one per large kernel. Measured on rows of 1,024 tokens with one
of 2 cores busy: "banded" 130-184 -> 12-14 ms, "varlen" 34-212 -> 13-30 ms (``benchmarks/RESULTS.md``, "Contention
on small rows").

How a worker gets one intra-op thread without touching the caller's setting: ``torch.set_num_threads`` is not
per-thread (it also resets the default of threads started later and oneMKL's global count), so each worker sets its
own OpenMP thread count (``omp_set_num_threads`` is per thread) and oneMKL's thread-local one
(``mkl_set_num_threads_local``), both through ctypes, once, and checks that ``torch.get_num_threads()`` then reads 1.
Where that is not possible (another parallel backend than OpenMP, no such symbols, a torch without oneMKL symbols
while it uses oneMKL) :func:`parallel_map` runs its tasks one after the other in the caller, as before.

Cores other processes hold: a parallel region split across a core that another process keeps busy waits for it (a
scheduler time slice per region, issue 15), and its share on that core advances at half speed, while one thread on
a free core does not wait at all; only a very large region still gains from every thread (measured: the threshold
``REGION_WORK``). So while other processes held cores of this process's CPU set over the last 0.1-1 s
(:func:`free_cores`, from ``/proc/stat`` less this process's own CPU time: one read of ~30 us at most every 0.1 s),
a parallel region of less than
``REGION_WORK`` multiply-adds gets at most the free cores (:func:`region_threads`), and :func:`parallel_map` hands
tasks to workers only when they average ``busy_min_work``: dealt tasks balance themselves (a worker whose core is
taken takes fewer), where a region's equal shares wait for the slowest. With one of 2 cores taken, a 1K row then
computes on the free core with one intra-op thread, and an 8K row keeps both threads in its large tasks. Not adapted:
under ``torch.use_deterministic_algorithms(True)`` (a thread count may change a reduction's rounding), while
``torch.compile`` traces, where ``/proc/stat`` is unreadable (not Linux), or with ``ATTNMASK_ADAPT_THREADS=0`` (or
``ADAPT = False`` here).

``ATTNMASK_WORKERS=0`` in the environment (or ``ENABLED = False`` here) keeps every task in the caller, each split
across every intra-op thread, and :func:`serial_steps` changes nothing: the code before issue 15's fix (and no
adaptation to other processes' load).

Thread-local state travels with the tasks: grad mode and inference mode are set in the worker as in the caller, so
autograd records the graph built in a worker (its backward runs wherever ``backward`` is called). Calls under
autocast, ``torch.compile`` tracing, a dispatch or function mode (fake tensors), a functorch transform (``vmap``,
``torch.func.grad``), or off the CPU run in the caller: that state is the calling thread's.

Worked example::

    >>> parallel_map(lambda i: torch.ones(3) * i, [0, 1, 2], weights=[1.0, 5.0, 2.0])   # results in input order
    [tensor([0., 0., 0.]), tensor([1., 1., 1.]), tensor([2., 2., 2.])]
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import torch

__all__ = [
    "LoadSample",
    "MIN_TASK_WORK",
    "REGION_WORK",
    "all_threads",
    "configured_threads",
    "expected_speedup",
    "free_cores",
    "free_from",
    "graph_in",
    "load_as_read",
    "on_free_cores",
    "parallel_map",
    "read_load",
    "region_threads",
    "serial_steps",
    "speedup_bound",
    "threads_available",
    "workers_active",
    "workers_available",
]

T = TypeVar("T")
R = TypeVar("R")

ENABLED = os.environ.get("ATTNMASK_WORKERS", "1") != "0"
ADAPT = os.environ.get("ATTNMASK_ADAPT_THREADS", "1") != "0"  # small regions follow the free cores (free_cores)


class _ThreadState(threading.local):
    """What one thread's work runs under, each attribute read by the planning several times a choice: class defaults,
    so that a thread that never set one reads it without the failed look-up ``getattr(local, name, default)`` pays
    (~0.4 us against ~0.06)."""

    worker = False  # this thread is one of the pool's
    budget: int | None = None  # threads_available inside serial_steps
    configured: int | None = None  # the intra-op count serial_steps configured
    contended: bool | None = None  # the load as read for a choice (load_as_read)


_local = _ThreadState()
_broken: list[str] = []  # why a worker did not end up with one intra-op thread (then parallel_map stays serial)
_pool_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_pool_size = 0
# Least average work (multiply-adds) of tasks worth dealing to workers (parallel_map's min_work for work in those
# units): ~1 ms of one core's SDPA (~5e10 a second at 1,024 tokens), so that a scheduler time slice lost per
# hand-over is small next to the work moved.
MIN_TASK_WORK = 5e7


@functools.cache
def _thread_count_setters() -> tuple[Callable[[int], int | None], ...] | str:
    """The calls that set the calling thread's own intra-op thread count (OpenMP's, and oneMKL's thread-local one
    when torch uses it; oneMKL's returns its previous local count, 0 meaning "the global one"), or why there are
    none."""
    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return "torch's intra-op threads are not OpenMP here"
    try:
        omp = ctypes.CDLL(None).omp_set_num_threads  # the OpenMP runtime torch loaded (symbols are global)
    except (AttributeError, OSError):
        return "no omp_set_num_threads symbol in this process"
    omp.argtypes, omp.restype = [ctypes.c_int], None
    setters = [omp]
    if torch.backends.mkl.is_available():
        path = os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so")
        try:
            mkl = ctypes.CDLL(path).MKL_Set_Num_Threads_Local  # the C interface (int by value)
        except (AttributeError, OSError):
            return "torch uses oneMKL but its thread-local thread count is not reachable"
        mkl.argtypes, mkl.restype = [ctypes.c_int], ctypes.c_int
        setters.append(mkl)
    return tuple(setters)


# A thread's first exp in torch's CPU kernels after the process forked (a DataLoader starting its workers) measured
# off by up to 2e-4 relative (torch 2.13.0+cpu; the same call right after it is exact): a portable blocksparse forward
# returned one query group wrong in 4-5 of 25 processes (RESULTS.md, issue 15, "native's threads"). Each worker
# computes these once on a throw-away tensor before any task: 0 of 20 then.
_WARM_UP_ELEMENTS = 16384


def _warm_up() -> None:
    scratch = torch.zeros(_WARM_UP_ELEMENTS)
    scratch.exp_().log_()


def _init_worker() -> None:
    torch.get_num_threads()  # torch's per-thread lazy set-up first (it would reset the count below)
    for setter in _thread_count_setters():
        setter(1)
    # Warmed up on its one thread, which runs the tasks: on the caller's count the worker started a second OpenMP
    # team, and with more OpenMP threads than CPUs the runtime (GNU libgomp) stops spinning between parallel regions,
    # so every small parallel op of the whole process then paid a futex wake-up: copying 0.5 MB in the main thread
    # took 0.65-0.77 ms instead of 0.08 for as long as the process lived (RESULTS.md, issue 15, "A worker's
    # warm-up slowed every small op").
    _warm_up()
    _local.worker = True
    if torch.get_num_threads() != 1:
        _broken.append(f"a worker thread still reads {torch.get_num_threads()} intra-op threads")


class _thread_counts:  # noqa: N801 (used as a function: ``with _thread_counts(1, 2): ...``)
    """Inside the block the calling thread computes with ``count`` intra-op threads (OpenMP's and oneMKL's
    per-thread counts) and :func:`parallel_map` called from it uses ``budget`` threads; both restored on exit.
    Other threads and threads started later keep theirs. Where the counts cannot be set per thread
    (:func:`workers_available` says why) only the budget changes; while ``torch.compile`` traces, nothing.
    (A class, not a generator: it is entered around every SDPA call of a backend, a few microseconds each.)"""

    __slots__ = ("count", "budget", "before", "outer", "previous")  # outer: (budget, configured) of the block around

    def __init__(self, count: int, budget: int):
        self.count, self.budget, self.previous = count, budget, None

    def __enter__(self) -> None:
        self.outer = (_local.budget, _local.configured)
        if torch.compiler.is_compiling():
            self.outer = _UNSET
            return
        setters = _thread_count_setters()
        self.before = torch.get_num_threads()
        if self.count != self.before and not isinstance(setters, str) and not _broken:
            self.previous = [setter(self.count) for setter in setters]
        _local.budget = self.budget
        if self.outer[1] is None:
            _local.configured = self.before

    def __exit__(self, *exc) -> None:
        if self.outer is _UNSET:
            return
        _local.budget, _local.configured = self.outer
        if self.previous is not None:
            setters = _thread_count_setters()
            setters[0](self.before)
            for setter, was in zip(setters[1:], self.previous[1:], strict=True):
                setter(was)


_UNSET = object()


def threads_available() -> int:
    """Intra-op threads the calling thread's work may use: ``torch.get_num_threads()``, or what it was when the
    innermost :func:`serial_steps` block began."""
    budget = _local.budget
    return torch.get_num_threads() if budget is None else budget


# Multiply-adds of a parallel region that, while other processes hold cores, still gains from every thread: below it a
# region gets the free cores only (region_threads). Measured with one of 2 cores busy
# (benchmarks/bench_threads_busy.py; RESULTS.md, issue 15, "Cores other processes hold"), unmasked SDPA (B=1, H=4,
# D=64) on all threads against one thread on the free core, in one process: 1.02-2.09x slower at 1.3e8-4.8e9
# multiply-adds (rows of 512-3,072), 1.13x at 8.6e9 (4,096), 0.94x at 1.9e10 (6,144) and 0.89x at 3.4e10 (8,192).
# The threshold sits between the last two sizes that disagree.
REGION_WORK = 1.3e10


def region_threads(work: float | None = None, share_work: float = REGION_WORK) -> int:
    """Intra-op threads for one parallel region of ``work`` multiply-adds (``None``: unknown, taken as small):
    :func:`threads_available`, but at most the cores other processes left free (:func:`free_cores`) when ``work`` is
    under ``share_work`` (``REGION_WORK``, SDPA's; a region whose threads pull their items, as the native kernel's,
    gains from a shared core at less; see the module docstring; not in a worker, under deterministic algorithms or
    tracing)."""
    threads = threads_available()
    if threads < 2 or (work is not None and work >= share_work) or not (ADAPT and ENABLED):
        return threads
    if _local.worker or torch.are_deterministic_algorithms_enabled():
        return threads
    if torch.compiler.is_compiling():
        return threads
    free = free_cores()
    return threads if free is None else max(1, min(threads, free))


def contended() -> bool:
    """Whether other processes hold cores this process's threads would use: :func:`region_threads` of a small region
    gives fewer than :func:`threads_available` threads. The cost estimates then apply their backends' busy factors
    (``_common.ModeFactors``), and ``"auto"`` keys its cached choice by it. ``False`` wherever the threads do not
    follow the load (one thread, adaptation off, in a worker, deterministic algorithms, tracing, no /proc/stat).
    Inside :func:`load_as_read`, the answer read once for the block."""
    fixed = _local.contended
    if fixed is not None:
        return fixed
    return region_threads() < threads_available()


class load_as_read:  # noqa: N801 (used like a function, as torch.no_grad)
    """Within the block, this thread's :func:`contended` answers ``busy``: ``"auto"`` reads the load once per choice,
    so that every estimate it compares (and every floor) sees the same load, and the dozen estimates of a choice do
    not each ask again (~5-10 us a question, more right after a kernel). ``with load_as_read(busy): ...`` (a class,
    not a generator: entering and leaving cost ~0.5 us against ~2.5)."""

    __slots__ = ("busy", "previous")

    def __init__(self, busy: bool):
        self.busy, self.previous = busy, None

    def __enter__(self) -> None:
        self.previous = _local.contended
        _local.contended = self.busy

    def __exit__(self, *exc) -> None:
        _local.contended = self.previous


# How the load of other processes is measured (free_cores): over at least SAMPLE_SECONDS (/proc/stat counts in ticks
# of 10 ms, so a shorter interval is mostly rounding), from a baseline at most STALE_SECONDS old (an older one is
# replaced and the previous decision kept: the decision follows the last second, not an average since the last call).
SAMPLE_SECONDS = 0.1
STALE_SECONDS = 1.0


def _clock_ticks() -> int:
    """Ticks per second of ``/proc/stat``'s counters (``USER_HZ``, 100 on Linux)."""
    try:
        return int(os.sysconf("SC_CLK_TCK"))
    except (AttributeError, ValueError, OSError):
        return 100


_TICKS = _clock_ticks()
_log = logging.getLogger("attnmask")


@dataclass(frozen=True)
class LoadSample:
    """One reading of the CPU counters: ``at`` (``time.monotonic()`` seconds), ``busy`` (seconds the CPUs of this
    process's set spent not idle, since boot, all processes), ``ours`` (this process's CPU seconds, all its threads),
    ``cpus`` (how many CPUs the set holds)."""

    at: float
    busy: float
    ours: float
    cpus: int


def read_load() -> LoadSample | None:
    """The counters now, or ``None`` where they cannot be read (no ``/proc/stat``, no CPU affinity: not Linux)."""
    try:
        cpus = os.sched_getaffinity(0)
        with open("/proc/stat", "rb") as stat:
            lines = stat.read().splitlines()
    except (AttributeError, OSError):
        return None
    busy = 0
    try:
        for line in lines:
            if not line.startswith(b"cpu") or line[3:4] == b" ":
                continue
            fields = line.split()
            if int(fields[0][3:]) in cpus:  # user nice system idle iowait irq softirq steal (guest: within user)
                busy += sum(int(x) for x in fields[1:9]) - int(fields[4]) - int(fields[5])
    except (ValueError, IndexError):  # not the format this reads
        return None
    return LoadSample(time.monotonic(), busy / _TICKS, time.process_time(), len(cpus))


def free_from(before: LoadSample, after: LoadSample) -> int:
    """Cores of the set other processes left free between two readings: the set's size less the cores they kept
    busy (all busy time less this process's own), rounded to the nearest core (a core taken half the time or more
    counts as taken). Example: 2 CPUs, 0.2 s apart, 0.35 s busy of which 0.15 s ours: others held 1.0 core -> 1."""
    seconds = after.at - before.at
    others = max(0.0, (after.busy - before.busy) - (after.ours - before.ours)) / seconds if seconds > 0 else 0.0
    return max(0, int(after.cpus - others + 0.5))


_load: list = [None, None]  # [the baseline LoadSample, the free cores decided last (None: not yet)]
_told: list = []  # the first drop of the thread count was logged at INFO (the later changes go to DEBUG)


def free_cores() -> int | None:
    """Cores of this process's CPU set that other processes left free over the last 0.1-1 s, or ``None`` before the
    first decision or where that cannot be measured (:func:`read_load`). Reads ``/proc/stat`` at most every
    ``SAMPLE_SECONDS``; between reads it returns the previous decision. Logged (logger ``attnmask``) when it changes
    the thread count the backends use: the first drop at INFO, every later change at DEBUG (a load that comes and
    goes would otherwise log up to ten lines a second)."""
    baseline, decided = _load
    now = time.monotonic()
    if baseline is not None and now - baseline.at < SAMPLE_SECONDS:
        return decided
    sample = read_load()
    if sample is None:
        return None
    if baseline is not None and sample.at - baseline.at <= STALE_SECONDS and sample.cpus == baseline.cpus:
        free = free_from(baseline, sample)
        threads = torch.get_num_threads()
        if min(threads, max(1, free)) != min(threads, max(1, threads if decided is None else decided)):
            use = min(threads, max(1, free))
            level = logging.DEBUG  # after the first drop: a load that comes and goes is not news
            if use < threads and not _told:
                level = logging.INFO
                _told.append(True)
            _log.log(
                level,
                "other processes held %d of %d CPUs: backends use %d of %d threads",
                sample.cpus - free,
                sample.cpus,
                use,
                threads,
            )
        decided = free
    _load[:] = [sample, decided]
    return decided


def serial_steps():
    """A block of many small torch calls (a backend's gathers, masks, assembly) computed with one intra-op thread:
    none of them opens a parallel region, so none waits for a thread whose core another process holds (each such
    wait lasts a scheduler time slice: issue 15). :func:`parallel_map` and :func:`all_threads` inside it still use
    the threads the caller had. Changes nothing when the workers are switched off (``ATTNMASK_WORKERS=0``, the
    code before issue 15's fix). ``with serial_steps(): ...``"""
    budget = threads_available()
    return _thread_counts(1 if ENABLED else budget, budget)


def all_threads(work: float | None = None):
    """Inside a :func:`serial_steps` block: one large call (an SDPA over the whole row, ``work`` multiply-adds)
    split across all the caller's intra-op threads again, one parallel region as stock SDPA runs it; fewer while
    other processes hold cores and ``work`` is under ``REGION_WORK`` (:func:`region_threads`). Outside one: a
    backend's whole call, its small ops with those threads, a :func:`parallel_map` inside it with the caller's.
    ``with all_threads(work): ...``"""
    return _thread_counts(region_threads(work), threads_available())


def on_free_cores(fn: Callable[..., R]) -> Callable[..., R]:
    """``fn`` (a backend's forward or backward) run inside :func:`all_threads`: its small torch calls on the free
    cores only while other processes hold cores, decided when it runs (the backward again when it runs); a
    :func:`parallel_map` inside it deals its tasks as the caller's threads allow."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        with all_threads():
            return fn(*args, **kwargs)

    return run


def graph_in(mode: Callable, fn: Callable[..., torch.Tensor], *inputs: torch.Tensor) -> torch.Tensor:
    """``fn(*inputs)`` (one tensor) computed inside ``with mode():`` (:func:`serial_steps` or :func:`all_threads`),
    and its backward too: autograd would run the backward of its ops on every intra-op thread, one parallel region
    each, whatever block the forward ran in. Only where the workers could run (:func:`workers_active`: no functorch
    transform, mode or tracing) and a gradient is being recorded; otherwise plain ``fn`` inside ``mode()``. The
    result is not differentiable twice (a second-order gradient raises)."""
    recording = torch.is_grad_enabled() and any(t.requires_grad for t in inputs)
    if not recording or _in_caller({t.device.type for t in inputs}, configured_threads()):
        with mode():
            return fn(*inputs)
    return _GraphIn.apply(mode, fn, *inputs)


class _GraphIn(torch.autograd.Function):
    """:func:`graph_in`'s node: ``fn``'s graph recorded on detached copies of the inputs (leaves), differentiated
    inside ``mode()`` by ``torch.autograd.grad`` (kept for a second backward, ``retain_graph=True``)."""

    @staticmethod
    def forward(ctx, mode, fn, *inputs):
        leaves = [t.detach().requires_grad_(t.requires_grad) for t in inputs]
        with torch.enable_grad(), mode():
            out = fn(*leaves)
        ctx.mode, ctx.graph = mode, (out, leaves)
        return out.detach()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        out, leaves = ctx.graph
        wanted = [t for t in leaves if t.requires_grad]
        with ctx.mode():
            got = iter(torch.autograd.grad(out, wanted, grad, retain_graph=True, allow_unused=True))
        return (None, None, *(next(got) if t.requires_grad else None for t in leaves))


def workers_available() -> str | None:
    """``None`` when worker threads with one intra-op thread each can be made here, else why not."""
    setters = _thread_count_setters()
    return setters if isinstance(setters, str) else _broken[0] if _broken else None


def _executor(size: int) -> ThreadPoolExecutor:
    global _pool, _pool_size
    with _pool_lock:
        if _pool is None or _pool_size < size:
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool, _pool_size = ThreadPoolExecutor(size, "attnmask-worker", initializer=_init_worker), size
        return _pool


def _forget_pool() -> None:
    """In a forked child the pool's threads do not exist: start a new pool on first use. The load baseline is the
    parent's (its CPU time is not the child's): measure afresh."""
    global _pool, _pool_size, _pool_lock
    _pool, _pool_size, _pool_lock = None, 0, threading.Lock()
    _load[:] = [None, None]


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def configured_threads() -> int:
    """The intra-op threads set for the caller (``torch.get_num_threads()`` outside every block of this module), before
    any block or the free cores lowered them: whether worker threads could take part in this call at all."""
    configured = _local.configured
    return torch.get_num_threads() if configured is None else configured


def _in_caller(device_types: set[str], threads: int) -> bool:
    """Whether tasks must run in the calling thread: switched off, ``threads`` under 2, already a worker, autocast,
    tracing, a dispatch or function mode or a functorch transform on (all thread-local), a device other than the CPU,
    or no way to make single-threaded workers."""
    if not ENABLED or threads < 2 or _local.worker or device_types != {"cpu"}:
        return True
    if torch.is_autocast_enabled("cpu") or torch.compiler.is_compiling():
        return True
    # Modes and transforms live on the calling thread's stack (fake tensors, vmap, torch.func.grad): not in a worker.
    if torch._C._len_torch_dispatch_stack() or torch._C._len_torch_function_stack():
        return True
    if torch._C._are_functorch_transforms_active():
        return True
    return workers_available() is not None


def workers_active(device: str = "cpu") -> bool:
    """Whether :func:`parallel_map` could deal tasks to workers for a call on ``device`` here (at the thread count set
    for the caller: with cores taken by other processes it may still run them in the caller, :func:`free_cores`)."""
    return not _in_caller({device}, configured_threads())


def _too_big(order: Sequence[int], weights: Sequence[float], threads: int) -> int:
    """How many of the largest items (``order``: largest first) hold more than a fair share (``1 / threads``) of the
    work left with them: one worker holding such an item alone would finish last, every other one idle, so they run
    in the caller with all intra-op threads. Example, 2 threads and weights 6, 3, 1, 1: 6 > 11 / 2, then 3 <= 5 / 2
    is false too (3 > 2.5), then 1 <= 2 / 2: the first two run in the caller."""
    left = float(sum(weights[i] for i in order))
    for count, i in enumerate(order):
        if weights[i] * threads <= left:
            return count
        left -= weights[i]
    return len(order)


def parallel_map(
    fn: Callable[[T], R],
    items: Sequence[T],
    weights: Sequence[float] | None = None,
    *,
    device: str = "cpu",
    min_work: float = 0.0,
    busy_min_work: float | None = None,
) -> list[R]:
    """``[fn(item) for item in items]``, computed by the caller and up to ``threads_available() - 1`` worker
    threads, each with one intra-op thread, items dealt largest ``weights`` first to whichever is free.

    ``weights``: each item's work (any unit). Items too large to share out (:func:`_too_big`) run first, in the
    caller, each split across all intra-op threads. The rest go to the workers only when they average at least
    ``min_work`` (same unit; ``MIN_TASK_WORK`` for work in multiply-adds); smaller ones run in the caller with one
    intra-op thread: a task handed to another thread costs a wake-up and GIL hand-overs around every torch call, and
    under a busy core each lasts up to a scheduler time slice (issue 15), more than such a task's work. The caller takes
    tasks too and waits only for the tasks a worker has started: a worker slow to wake costs nothing.

    While other processes hold cores (:func:`free_cores`) the least average is ``busy_min_work`` where larger (the
    weights are then multiply-adds), and an item run in the caller gets the threads :func:`region_threads` gives
    its weight: the free cores only, unless it is a region of at least ``REGION_WORK``. A largest item too large to
    share out that gets fewer threads than idle runs in the caller on them while the workers take the rest at the
    same time (instead of every large item first, one after the other): 8K rows of four documents of 4096, 2048,
    1024 and 1024 tokens, one of 2 cores taken, "varlen" 274 -> 230 ms (RESULTS.md, issue 15).

    Runs in the caller instead (same results) where :func:`_in_caller` says so, or for fewer than two items. The
    first exception raised by ``fn`` is raised here once every started task has stopped. ``fn`` must be safe to run
    concurrently: it may write to disjoint parts of shared tensors, not accumulate into the same ones.
    """
    n = len(items)
    threads = threads_available()
    if busy_min_work is not None and region_threads() < threads:
        min_work = max(min_work, busy_min_work)

    def alone(i: int):
        """Item ``i`` in the caller: split across every intra-op thread (one large call, as SDPA runs it; the free
        cores only, under ``REGION_WORK`` while others hold cores), or with one thread when its work is under
        ``min_work`` (the workers on)."""
        work = None if weights is None else weights[i]
        count = region_threads(work) if work is None or work >= min_work or not ENABLED else 1
        with _thread_counts(count, count):
            return fn(items[i])

    if n < 2 or _in_caller({device}, threads):
        return [alone(i) for i in range(n)]
    order = sorted(range(n), key=lambda i: -weights[i]) if weights is not None else list(range(n))
    results: list = [None] * n
    big = _too_big(order, weights, threads) if weights is not None else 0
    # While other processes hold cores, a large item gets the free cores only (region_threads): the largest then runs
    # in the caller while the workers take the rest on the other cores, instead of every large one before them.
    beside = region_threads(weights[order[0]]) if big else threads
    if beside < threads and sum(weights[i] for i in order[1:]) >= min_work * (n - 1):
        heads, order = order[:1], order[1:]
    else:
        beside, heads = threads, []
        for i in order[:big]:
            results[i] = alone(i)
        order = order[big:]
        if len(order) < 2 or (weights is not None and sum(weights[i] for i in order) < min_work * len(order)):
            for i in order:
                results[i] = alone(i)
            return results
    grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()
    state = {"at": 0, "running": 0, "error": None}
    changed = threading.Condition()

    def take() -> int | None:
        with changed:
            if state["at"] >= len(order) or state["error"] is not None:
                return None
            state["at"] += 1
            state["running"] += 1
            return order[state["at"] - 1]

    def work() -> None:
        while (i := take()) is not None:
            try:
                results[i] = fn(items[i])
            except BaseException as err:  # re-raised in the caller
                with changed:
                    state["error"] = state["error"] or err
            finally:
                with changed:
                    state["running"] -= 1
                    changed.notify_all()

    def in_worker() -> None:
        with torch.inference_mode(inference), torch.set_grad_enabled(grad):
            work()

    pool = _executor(threads - 1)
    helpers = min(threads - beside, len(order)) if heads else min(threads - 1, len(order) - 1)
    for _ in range(helpers):
        pool.submit(in_worker)
    if heads:
        try:
            results[heads[0]] = alone(heads[0])
        except BaseException as err:  # raised below, once the workers' tasks have stopped
            with changed:
                state["error"] = state["error"] or err
    with _thread_counts(1, 1):
        work()
    with changed:
        changed.wait_for(lambda: state["running"] == 0)
    if state["error"] is not None:
        raise state["error"]
    return results


def expected_speedup(
    weights: Sequence[float],
    threads: int,
    min_work: float = 0.0,
    efficiency: float = 1.0,
    *,
    share_big: bool = True,
    handover: float = 0.0,
) -> float:
    """How many times faster :func:`parallel_map` computes items of these ``weights`` (each item's time on one
    thread) with ``threads`` intra-op threads than with one: the cost estimates' model of what it does with them.

    Mirrors its policy: with ``share_big``, items too large to share (:func:`_too_big`) run alone in the caller, each
    split across ``threads`` (one with less than ``min_work`` on one thread); the rest are dealt, largest first, to
    ``min(threads, items)`` single-threaded workers (the caller among them) when they average at least ``min_work``,
    else run alone too. Dealt items take the makespan of that greedy deal. ``share_big=False`` deals every item so,
    whatever its size (``min_work`` unread): a pool that never splits an item, as the native kernel's threads.
    ``efficiency`` (0 to 1): the share of a core each added thread contributes (memory bandwidth, GIL hand-overs,
    OpenMP barriers); an ideal speed-up ``s`` counts ``1 + (s - 1) · efficiency``. ``handover`` (weight units): what
    each dealt item costs on top (a wake-up and a GIL hand-over around each of its torch calls), counted in full: the
    hand-overs queue on the one GIL, so small dealt items can make the result below 1. Pure; the workers are assumed
    active (``workers_active``).

    Worked example, 2 threads, weights 6, 3, 1, 1, no ``min_work``, efficiency 1: 6 and 3 are too big to share
    (``_too_big``) and run split across both threads (4.5 time units), the two 1s go one to each thread (1 unit):
    11 / 5.5 = 2.0. With ``min_work=4`` the 3 and the 1s run on one thread: 11 / (3 + 3 + 2) = 1.375.
    """
    total = float(sum(weights))
    if total <= 0 or threads < 2 or not weights:
        return 1.0

    def alone(weight: float) -> float:
        count = threads if weight >= min_work else 1
        return weight / (1 + (count - 1) * efficiency)

    if share_big and len(weights) < 2:
        return total / alone(total)
    ordered = sorted(map(float, weights), reverse=True)  # the values largest first, as parallel_map deals them
    big = _too_big(range(len(ordered)), ordered, threads) if share_big else 0
    time = sum(alone(w) for w in ordered[:big])
    rest = ordered[big:]
    if share_big and (len(rest) < 2 or sum(rest) < min_work * len(rest)):
        return total / (time + sum(alone(w) for w in rest))
    if min(threads, len(rest)) == 2:  # the same deal, without a list search per item (the estimates' common case)
        first = second = 0.0
        for w in rest:
            if first <= second:
                first += w
            else:
                second += w
        loads = [first, second]
    else:
        loads = [0.0] * min(threads, len(rest))
        for w in rest:  # largest first to the least loaded: the thread that is free first takes the next
            loads[loads.index(min(loads))] += w
    ideal = sum(rest) / max(loads)
    return total / (time + sum(rest) / (1 + (ideal - 1) * efficiency) + handover * len(rest))


def speedup_bound(threads: int, efficiency: float = 1.0) -> float:
    """The most :func:`expected_speedup` returns for ``threads`` and ``efficiency``, whatever the weights, ``min_work``
    and ``handover``: no item runs more than ``1 + (threads - 1) · efficiency`` times faster (1 below two threads).
    The estimates' floors (``Backend.floor``) divide by it."""
    return 1.0 + (threads - 1) * efficiency if threads >= 2 else 1.0
