"""Coarse-grained parallel work for the backends that issue many small torch calls ("varlen", "blocksparse").

Layer 3 (attention); imports nothing of attnmask.

Why: torch splits every operator across its intra-op threads (OpenMP), and each operator ends at a barrier that waits
for the slowest thread. A backend that makes hundreds of small calls (one SDPA per document, one flash call per tile
group) then waits hundreds of times; when another process holds one of the cores (DataLoader workers beside a
training loop) every wait lasts a scheduler time slice, and such a backend measured 4-15x slower against 1.5-2.5x for
one large SDPA call (``benchmarks/RESULTS.md``, issue 15). Here the calls are dealt instead to
``torch.get_num_threads()`` worker threads, each running its share with **one** intra-op thread, pulling the next
task when done (largest first): no barrier between tasks, and a worker whose core is taken simply takes fewer tasks.
torch releases the GIL inside its kernels, so the workers compute in parallel.

How a worker gets one intra-op thread without touching the caller's setting: ``torch.set_num_threads`` is not
per-thread (it also resets the default of threads started later and oneMKL's global count), so each worker sets its
own OpenMP thread count (``omp_set_num_threads`` is per thread) and oneMKL's thread-local one
(``mkl_set_num_threads_local``), both through ctypes, once, and checks that ``torch.get_num_threads()`` then reads 1.
Where that is not possible (another parallel backend than OpenMP, no such symbols, a torch without oneMKL symbols
while it uses oneMKL) :func:`parallel_map` runs its tasks one after the other in the caller, as before.

``ATTNMASK_WORKERS=0`` in the environment (or ``ENABLED = False`` here) keeps every task in the caller.

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
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

__all__ = ["parallel_map", "workers_active", "workers_available"]

T = TypeVar("T")
R = TypeVar("R")

ENABLED = os.environ.get("ATTNMASK_WORKERS", "1") != "0"
_local = threading.local()  # .worker: this thread is one of the pool's
_broken: list[str] = []  # why a worker did not end up with one intra-op thread (then parallel_map stays serial)
_pool_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_pool_size = 0


@functools.cache
def _single_thread_setters() -> tuple[Callable[[], None], ...] | str:
    """The calls that give the calling thread one intra-op thread (OpenMP, and oneMKL when torch uses it), or why
    there are none."""
    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return "torch's intra-op threads are not OpenMP here"
    try:
        omp = ctypes.CDLL(None).omp_set_num_threads  # the OpenMP runtime torch loaded (symbols are global)
    except (AttributeError, OSError):
        return "no omp_set_num_threads symbol in this process"
    omp.argtypes, omp.restype = [ctypes.c_int], None
    setters = [functools.partial(omp, 1)]
    if torch.backends.mkl.is_available():
        path = os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so")
        try:
            mkl = ctypes.CDLL(path).MKL_Set_Num_Threads_Local  # the C interface (int by value)
        except (AttributeError, OSError):
            return "torch uses oneMKL but its thread-local thread count is not reachable"
        mkl.argtypes, mkl.restype = [ctypes.c_int], ctypes.c_int
        setters.append(functools.partial(mkl, 1))
    return tuple(setters)


def _init_worker() -> None:
    torch.get_num_threads()  # torch's per-thread lazy set-up first (it would reset the count below)
    for setter in _single_thread_setters():
        setter()
    _local.worker = True
    if torch.get_num_threads() != 1:
        _broken.append(f"a worker thread still reads {torch.get_num_threads()} intra-op threads")


def workers_available() -> str | None:
    """``None`` when worker threads with one intra-op thread each can be made here, else why not."""
    setters = _single_thread_setters()
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
    """In a forked child the pool's threads do not exist: start a new pool on first use."""
    global _pool, _pool_size, _pool_lock
    _pool, _pool_size, _pool_lock = None, 0, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def _in_caller(device_types: set[str]) -> bool:
    """Whether tasks must run in the calling thread: switched off, one intra-op thread, already a worker, autocast,
    tracing, a dispatch or function mode or a functorch transform on (all thread-local), a device other than the CPU,
    or no way to make single-threaded workers."""
    if not ENABLED or torch.get_num_threads() < 2 or getattr(_local, "worker", False) or device_types != {"cpu"}:
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
    """Whether :func:`parallel_map` would deal tasks to workers for a call on ``device`` now."""
    return not _in_caller({device})


def _too_big(order: list[int], weights: Sequence[float], threads: int) -> int:
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
    fn: Callable[[T], R], items: Sequence[T], weights: Sequence[float] | None = None, *, device: str = "cpu"
) -> list[R]:
    """``[fn(item) for item in items]``, computed by up to ``torch.get_num_threads()`` worker threads with one
    intra-op thread each, items dealt largest ``weights`` first to whichever worker is free. Items too large to share
    out (:func:`_too_big`) run first, in the caller, each split across all intra-op threads.

    Runs in the caller instead (same results) where :func:`_in_caller` says so, or for fewer than two items. The
    first exception raised by ``fn`` is raised here once every worker has stopped. ``fn`` must be safe to run
    concurrently: it may write to disjoint parts of shared tensors, not accumulate into the same ones.
    """
    n = len(items)
    threads = torch.get_num_threads()
    if n < 2 or _in_caller({device}):
        return [fn(item) for item in items]
    order = sorted(range(n), key=lambda i: -weights[i]) if weights is not None else list(range(n))
    results: list = [None] * n
    big = _too_big(order, weights, threads) if weights is not None else 0
    for i in order[:big]:  # one large call each, split across every intra-op thread, as SDPA runs it
        results[i] = fn(items[i])
    order = order[big:]
    if len(order) < 2:
        for i in order:
            results[i] = fn(items[i])
        return results
    grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()
    next_lock, state = threading.Lock(), {"at": 0, "error": None}

    def work() -> None:
        with torch.inference_mode(inference), torch.set_grad_enabled(grad):
            while True:
                with next_lock:
                    if state["at"] >= len(order) or state["error"] is not None:
                        return
                    i = order[state["at"]]
                    state["at"] += 1
                try:
                    results[i] = fn(items[i])
                except BaseException as err:  # re-raised in the caller
                    with next_lock:
                        state["error"] = state["error"] or err
                    return

    futures = [_executor(threads).submit(work) for _ in range(min(threads, len(order)))]
    for f in futures:
        f.result()
    if state["error"] is not None:
        raise state["error"]
    return results
