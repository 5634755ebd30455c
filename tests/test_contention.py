"""The coarse-grained parallel path of "varlen" and "blocksparse" (``backends._workers``): tasks dealt to worker threads
with one intra-op thread each compute what the serial loop computes, outputs and gradients, and leave the caller's
thread settings alone. Correctness only; the timing is benchmarks/bench_limit.py --busy."""

import os
import sys
import threading
import time

import pytest
import torch

import attnmask as am
from attnmask.attention import _prepare_call
from attnmask.backends import _workers as W
from attnmask.backends import blocksparse as BS
from attnmask.backends import varlen as VL
from tests.helpers import assert_matches_reference, grads
from tests.naive import naive_attention

pytestmark = pytest.mark.skipif(W.workers_available() is not None, reason=str(W.workers_available()))


@pytest.fixture
def two_threads():
    """Two intra-op threads in the caller (the test suite runs with one under xdist), restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def serial(monkeypatch):
    """A function that runs ``fn()`` with the parallel path switched off (every task in the caller)."""

    def run(fn):
        with monkeypatch.context() as m:
            m.setattr(W, "_in_caller", lambda device_types, threads: True)
            return fn()

    return run


def spy_threads(monkeypatch, module, names):
    """Intra-op thread counts with which ``module``'s functions ``names`` (wrapped in place) run."""
    seen = set()
    for name in names:
        original = getattr(module, name)

        def wrapped(*args, _original=original, **kwargs):
            seen.add(torch.get_num_threads())
            return _original(*args, **kwargs)

        monkeypatch.setattr(module, name, wrapped)
    return seen


def qkv(L, heads=2, kv_heads=None, dim=16, seed=0, grad=False, batch=1):
    gen = torch.Generator().manual_seed(seed)
    kv_heads = kv_heads or heads
    q = torch.randn(batch, heads, L, dim, generator=gen)
    k, v = (torch.randn(batch, kv_heads, L, dim, generator=gen) for _ in range(2))
    return tuple(t.requires_grad_(grad) for t in (q, k, v))


def reference(q, k, v, spec):
    q64, k64, v64 = (t.detach().double().requires_grad_(t.requires_grad) for t in (q, k, v))
    return naive_attention(q64, k64, v64, spec.to_dense(q.shape[2], k.shape[2]).unsqueeze(1)), (q64, k64, v64)


def test_parallel_map_returns_every_result_in_input_order_from_single_threaded_workers(two_threads):
    seen = []

    def fn(i):
        time.sleep(0.02)  # long enough that the worker wakes up and takes tasks beside the caller
        seen.append((threading.current_thread().name, torch.get_num_threads()))
        return torch.full((3,), float(i)) * 2

    out = W.parallel_map(fn, list(range(7)), weights=[1, 7, 2, 6, 3, 5, 4])
    assert [o.tolist() for o in out] == [[2.0 * i] * 3 for i in range(7)]
    assert {threads for _, threads in seen} == {1}
    assert any(name.startswith("attnmask-worker") for name, _ in seen)
    assert torch.get_num_threads() == 2


def test_tasks_under_the_least_work_run_in_the_caller_with_one_thread(two_threads):
    """Small tasks are not handed to a worker (a hand-over under a busy core costs more than they hold); each runs in
    the caller without a parallel region. An item as large as ``min_work`` alone keeps every thread."""
    where = {}

    def fn(i):
        where[i] = (threading.current_thread().name, torch.get_num_threads())
        return i

    here = threading.current_thread().name
    assert W.parallel_map(fn, range(4), weights=[10, 20, 30, 40], min_work=100) == list(range(4))
    assert set(where.values()) == {(here, 1)}
    where.clear()
    assert W.parallel_map(fn, [0], weights=[100], min_work=100) == [0]
    assert where == {0: (here, 2)}
    where.clear()
    W.parallel_map(fn, [0], weights=[99], min_work=100)
    assert where == {0: (here, 1)}
    assert torch.get_num_threads() == 2


def test_serial_steps_use_one_thread_and_all_threads_the_callers_count(two_threads):
    with W.serial_steps():
        assert torch.get_num_threads() == 1 and W.threads_available() == 2
        with W.all_threads():
            assert torch.get_num_threads() == 2
        assert torch.get_num_threads() == 1
        W.parallel_map(lambda i: None, range(3))  # nested: the caller's count is restored afterwards
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2 and W.threads_available() == 2
    with pytest.raises(RuntimeError), W.serial_steps():
        raise RuntimeError
    assert torch.get_num_threads() == 2
    fresh = []
    with W.serial_steps():
        t = threading.Thread(target=lambda: fresh.append(torch.get_num_threads()))
        t.start()
        t.join()
    assert fresh == [2]  # other threads keep their count


def test_serial_steps_change_nothing_with_the_workers_switched_off(two_threads, monkeypatch):
    monkeypatch.setattr(W, "ENABLED", False)
    with W.serial_steps():
        assert torch.get_num_threads() == 2


def test_items_too_large_to_share_out_run_in_the_caller_first(two_threads):
    where = {}

    def fn(i):
        where[i] = (threading.current_thread().name, torch.get_num_threads())
        return i

    # 2 threads: 6 > (6 + 3 + 1 + 1) / 2 and then 3 > (3 + 1 + 1) / 2: items 1 and 3 run alone with both threads.
    assert W.parallel_map(fn, range(5), weights=[1, 6, 1, 3, 0]) == list(range(5))
    caller = (threading.current_thread().name, 2)
    assert where[1] == where[3] == caller
    assert {where[i][1] for i in (0, 2, 4)} == {1}
    assert [W._too_big([0, 1], [5, 5], 2), W._too_big([0, 1, 2], [9, 4, 4], 2), W._too_big([0], [1], 2)] == [0, 1, 1]


def test_parallel_map_leaves_the_callers_and_new_threads_counts_alone(two_threads):
    W.parallel_map(lambda i: torch.randn(64, 64) @ torch.randn(64, 64), range(4))
    assert torch.get_num_threads() == 2
    fresh = []
    t = threading.Thread(target=lambda: fresh.append(torch.get_num_threads()))
    t.start()
    t.join()
    assert fresh == [2]


def test_parallel_map_runs_in_the_caller_with_one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        names = W.parallel_map(lambda i: threading.current_thread().name, range(3))
    finally:
        torch.set_num_threads(before)
    assert set(names) == {threading.current_thread().name}


def test_parallel_map_stays_in_the_caller_under_thread_local_modes_and_transforms(two_threads):
    from torch.utils._python_dispatch import TorchDispatchMode

    class Passthrough(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    here = threading.current_thread().name
    with Passthrough():
        assert set(W.parallel_map(lambda i: threading.current_thread().name, range(3))) == {here}
    names = []
    torch.func.vmap(lambda x: names.extend(W.parallel_map(lambda i: threading.current_thread().name, range(3))) or x)(
        torch.ones(2)
    )
    assert set(names) == {here}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert set(W.parallel_map(lambda i: threading.current_thread().name, range(3))) == {here}


def test_parallel_map_raises_the_tasks_error(two_threads):
    def fn(i):
        if i == 3:
            raise ValueError("task 3")
        return i

    with pytest.raises(ValueError, match="task 3"):
        W.parallel_map(fn, range(6))


def test_parallel_map_carries_grad_and_inference_mode(two_threads):
    x = torch.ones(2, requires_grad=True)
    with torch.no_grad():
        assert not any(y.requires_grad for y in W.parallel_map(lambda i: x * i, range(3)))
    assert all(y.requires_grad for y in W.parallel_map(lambda i: x * i, range(3)))
    with torch.inference_mode():
        assert all(y.is_inference() for y in W.parallel_map(lambda i: torch.ones(1) * i, range(3)))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_parallel_map_works_in_a_forked_child(two_threads, monkeypatch):
    W.parallel_map(lambda i: i, range(3))  # the parent's pool exists
    monkeypatch.setattr(W, "_load", [W.LoadSample(1.0, 1.0, 1.0, 2), 2])  # the parent's load baseline
    pid = os.fork()
    if pid == 0:  # the child: a fresh pool, the same results, no load baseline of the parent's
        ok = W.parallel_map(lambda i: torch.ones(2) * i, range(4))[3].tolist() == [3.0, 3.0]
        ok = ok and W._load == [None, None]
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_workers_compute_exp_and_log_once_before_their_first_task(two_threads, monkeypatch):
    """A thread's first exp after the process forked measured off by up to 2e-4 relative: a new worker computes one
    on a throw-away tensor before any task (RESULTS.md, issue 15), on its own one intra-op thread: on the caller's
    count it started an OpenMP team of its own, and with more OpenMP threads than CPUs every small parallel op of
    the process then ran ~8x slower for as long as it lived."""
    warmed = []
    threads = lambda: (threading.current_thread().name, torch.get_num_threads())  # noqa: E731
    monkeypatch.setattr(W, "_warm_up", lambda: warmed.append(threads()))
    W._forget_pool()  # new worker threads
    names = W.parallel_map(lambda i: (time.sleep(0.02), threading.current_thread().name)[1], range(4))
    workers = {n for n in names if n != threading.current_thread().name}
    assert workers and workers <= {name for name, _ in warmed}
    if isinstance(W._thread_count_setters(), tuple):  # the counts can be set per thread here
        assert {count for _, count in warmed} == {1}


def check_parallel_path(q, k, v, spec, backend, serial, in_worker):
    """``backend``'s parallel path (outputs, gradients) equals its serial loop and the float64 naive reference, and
    the spied kernels ran with one intra-op thread (in a worker or the caller) for the one and with two (each call
    split across the caller's threads) for the other."""
    out = am.attention(q, k, v, spec, backend=backend)
    got = grads(out, (q, k, v))
    want_out = serial(lambda: am.attention(q, k, v, spec, backend=backend))
    want = grads(want_out, (q, k, v))
    assert in_worker == {1, 2}
    torch.testing.assert_close(out, want_out, atol=1e-6, rtol=1e-5)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)
    ref, ref_inputs = reference(q, k, v, spec)
    assert_matches_reference(out, ref)
    for g, w in zip(got, grads(ref, ref_inputs), strict=True):
        assert_matches_reference(g, w)


VARLEN_SPECS = {
    "documents": lambda: am.causal() & am.document(seq_lens=[70, 40, 90, 40, 9, 5, 5, 12, 29]),
    "documents, window": lambda: am.sliding_window(24) & am.document(seq_lens=[60, 40, 50, 70, 80]),
    "one long row, window": lambda: am.sliding_window(40),  # one task: its query blocks are the tasks then
    "left padding": lambda: am.causal() & am.key_padding(torch.arange(300) >= torch.tensor([[50], [0], [20], [30]])),
}


@pytest.mark.parametrize("name", VARLEN_SPECS)
def test_varlen_parallel_path_matches_the_serial_loop_and_the_reference(two_threads, serial, monkeypatch, name):
    monkeypatch.setattr(VL, "MIN_TASK_WORK", 0.0)  # these small documents would otherwise all run in the caller
    monkeypatch.setattr(VL, "_IDLE_MIN_WORK", 0.0)
    in_worker = spy_threads(monkeypatch, VL.F, ["scaled_dot_product_attention"])
    spec = VARLEN_SPECS[name]()
    L = 300
    q, k, v = qkv(L, heads=4, kv_heads=2, grad=True, batch=spec.batch_size or 1)
    check_parallel_path(q, k, v, spec, "varlen", serial, in_worker)


BLOCK_SPECS = {
    "window": lambda: am.sliding_window(40),  # query groups share keys: dk, dv added by several tasks
    "chunked": lambda: am.causal() & am.chunked(64),
    "prefix": lambda: am.prefix_lm(50),
}


@pytest.mark.parametrize("flash", [True, False], ids=["cpu flash kernel", "portable loop"])
@pytest.mark.parametrize("name", BLOCK_SPECS)
def test_blocksparse_parallel_path_matches_the_serial_loop_and_the_reference(
    two_threads, serial, monkeypatch, name, flash
):
    monkeypatch.setattr(BS, "USE_CPU_FLASH", flash)
    # group by group, so that every group's kernel is the spied one (stacks against groups: tests/test_sparse.py)
    monkeypatch.setattr(BS, "STACK_GROUPS", False)
    kernels = ["_flash_group_forward", "_flash_group_backward"]
    if not flash:
        kernels = ["_online_softmax", "_torch_group_backward"]
    in_worker = spy_threads(monkeypatch, BS, kernels)
    spec = BLOCK_SPECS[name]()
    L = 320
    q, k, v = qkv(L, heads=4, kv_heads=2, grad=True)
    check_parallel_path(q, k, v, spec, "blocksparse", serial, in_worker)


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_blocksparse_stacks_run_as_tasks_and_match_the_serial_loop_and_the_reference(
    two_threads, serial, monkeypatch, kv_heads
):
    """The forward's stacks (pieces dealt as tasks) on the parallel path against the serial loop and the reference."""
    in_worker = spy_threads(monkeypatch, BS, ["_stacked_view", "_flash_group_backward"])
    q, k, v = qkv(640, heads=4, kv_heads=kv_heads, grad=True)
    spec = am.sliding_window(40)
    call = _prepare_call(q, k, v, spec, None, None, None)
    assert BS.cached(call, "blocksparse", BS._layout_groups)[4], "the case must exercise a stack"
    check_parallel_path(q, k, v, spec, "blocksparse", serial, in_worker)


def test_varlen_backward_differentiates_each_group_with_one_thread(two_threads, monkeypatch):
    monkeypatch.setattr(VL, "MIN_TASK_WORK", 0.0)
    seen, original = set(), torch.autograd.grad

    def grad(*args, **kwargs):
        seen.add(torch.get_num_threads())
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", grad)
    spec = VARLEN_SPECS["documents"]()
    q, k, v = qkv(300, grad=True)
    out = am.attention(q, k, v, spec, backend="varlen")
    (out * out).sum().backward(retain_graph=True)
    assert seen == {1}
    want, inputs = reference(q, k, v, spec)
    (want * want).sum().backward()
    for got, ref in zip((q, k, v), inputs, strict=True):
        assert_matches_reference(got.grad, ref.grad)
    (out * out).sum().backward()  # a second backward through the retained graph adds the same gradients again
    for got, ref in zip((q, k, v), inputs, strict=True):
        assert_matches_reference(got.grad, 2 * ref.grad)


def test_varlen_with_dropout_stays_reproducible_under_threads(two_threads):
    spec = am.causal() & am.document(seq_lens=[70, 40, 90, 100])
    q, k, v = qkv(300)
    outs = []
    for _ in range(2):
        torch.manual_seed(3)
        outs.append(am.attention(q, k, v, spec, backend="varlen", dropout_p=0.3))
    assert torch.equal(outs[0], outs[1])


BANDED_SPECS = {
    "tiny documents": lambda: am.causal() & am.document(seq_lens=[9, 30, 17, 4, 25, 31, 12, 22, 8, 19, 13, 10]),
    "window": lambda: am.sliding_window(24),
    "chunked": lambda: am.causal() & am.chunked(32),
    "padded rows, window": lambda: (
        am.sliding_window(16) & am.key_padding(torch.arange(200) >= torch.tensor([[0], [37]]))
    ),
}


@pytest.mark.parametrize("name", BANDED_SPECS)
def test_banded_runs_its_small_ops_with_one_thread_and_its_sdpa_call_with_all(two_threads, monkeypatch, name):
    """Under two threads "banded" opens one parallel region per row (its large SDPA call), the padding, masks and
    assembly none; outputs and gradients (GQA, per-row specs) equal the workers-off path and the reference."""
    from attnmask.backends import banded as BD

    kernels = spy_threads(monkeypatch, BD, ["_padded"])
    sdpa = spy_threads(monkeypatch, BD.F, ["scaled_dot_product_attention"])
    spec = BANDED_SPECS[name]()
    q, k, v = qkv(200, heads=4, kv_heads=2, grad=True, batch=spec.batch_size or 1)
    out = am.attention(q, k, v, spec, backend="banded")
    differentiated = spy_threads(monkeypatch, torch.autograd, ["grad"])
    got = grads(out, (q, k, v))
    assert kernels == {1} and sdpa == {2} and torch.get_num_threads() == 2
    assert differentiated == {1, 2}  # the backward of the small ops with one thread, SDPA's (and the caller's) with two
    with monkeypatch.context() as m:
        m.setattr(W, "ENABLED", False)
        kernels.clear()
        want_out = am.attention(q, k, v, spec, backend="banded")
        assert kernels == {2}
    torch.testing.assert_close(out, want_out, atol=1e-6, rtol=1e-5)
    for g, w in zip(got, grads(want_out, (q, k, v)), strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)
    ref, ref_inputs = reference(q, k, v, spec)
    assert_matches_reference(out, ref)
    for g, w in zip(got, grads(ref, ref_inputs), strict=True):
        assert_matches_reference(g, w)


def spy_where(monkeypatch, module, name):
    """``(thread name, intra-op threads)`` of every call of ``module.name`` (wrapped in place)."""
    seen, original = set(), getattr(module, name)

    def spied(*args, **kwargs):
        seen.add((threading.current_thread().name, torch.get_num_threads()))
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, spied)
    return seen


def test_small_varlen_documents_run_in_the_caller_with_one_thread(two_threads, monkeypatch):
    """Documents far under ``MIN_TASK_WORK`` each: every SDPA call and tiny-document product in the caller with one
    intra-op thread (no parallel region, no hand-over); outputs and gradients those of the reference."""
    sdpa = spy_where(monkeypatch, VL.F, "scaled_dot_product_attention")
    small = spy_where(monkeypatch, VL, "_tiny_products")
    spec = VARLEN_SPECS["documents"]()
    q, k, v = qkv(300, heads=4, kv_heads=2, grad=True)
    out = am.attention(q, k, v, spec, backend="varlen")
    got = grads(out, (q, k, v))
    here = (threading.current_thread().name, 1)
    assert sdpa == {here} and small == {here}
    ref, ref_inputs = reference(q, k, v, spec)
    assert_matches_reference(out, ref)
    for g, w in zip(got, grads(ref, ref_inputs), strict=True):
        assert_matches_reference(g, w)


def test_a_varlen_document_too_large_to_share_gets_every_thread_for_its_sdpa_call_only(two_threads, monkeypatch):
    """A long document beside small ones runs its one SDPA call across both threads (as stock SDPA would), its
    copies with one; the small documents' calls run with one."""
    monkeypatch.setattr(VL, "MIN_TASK_WORK", 1e6)
    monkeypatch.setattr(VL, "_IDLE_MIN_WORK", 1e6)
    sdpa = spy_where(monkeypatch, VL.F, "scaled_dot_product_attention")
    copies = spy_where(monkeypatch, VL, "_stack_segments")
    spec = am.causal() & am.document(seq_lens=[200, 40, 50, 10])
    q, k, v = qkv(300, heads=4, kv_heads=2)
    out = am.attention(q, k, v, spec, backend="varlen")
    here = threading.current_thread().name
    assert (here, 2) in sdpa and (here, 1) in sdpa  # the long document's call, and the small ones'
    assert {threads for _, threads in copies} == {1}
    assert_matches_reference(out, reference(q, k, v, spec)[0])


def test_graph_in_differentiates_inside_its_block_and_equals_plain_autograd(two_threads):
    counts = []

    def fn(a, b):
        counts.append(torch.get_num_threads())
        return (a * b).sin().cumsum(-1)

    x, y = torch.randn(3, 50, requires_grad=True), torch.randn(3, 50)
    out = W.graph_in(W.serial_steps, fn, x, y)
    assert counts == [1] and torch.get_num_threads() == 2 and not y.requires_grad
    weight = torch.randn(3, 50)
    (gx,) = torch.autograd.grad(out, x, weight, retain_graph=True)
    torch.testing.assert_close(gx, torch.autograd.grad(fn(x, y), x, weight)[0], atol=0, rtol=0)
    (out * weight).sum().backward()
    (out * weight).sum().backward()  # the recorded graph is kept for a second backward
    torch.testing.assert_close(x.grad, 2 * gx)
    with torch.no_grad():
        assert W.graph_in(W.serial_steps, fn, x, y).grad_fn is None
    assert counts[-1] == 1


# ----------------------------------------------------------------------------------------------------------------------
# Cores other processes hold: free_cores / threads_available (adaptation is off in the suite: tests/conftest.py)


def load(at, busy, ours, cpus=2):
    return W.LoadSample(at=at, busy=busy, ours=ours, cpus=cpus)


def test_free_from_counts_the_cores_other_processes_kept_busy():
    before = load(10.0, 100.0, 5.0)
    assert W.free_from(before, load(10.2, 100.35, 5.15)) == 1  # others: (0.35 - 0.15) / 0.2 = 1.0 core
    assert W.free_from(before, load(10.2, 100.4, 5.32)) == 2  # others 0.4 core: a core counts taken from 0.5
    assert W.free_from(before, load(10.2, 100.4, 5.28)) == 1  # others 0.6 core
    assert W.free_from(before, load(10.2, 100.1, 5.3)) == 2  # our own time counted in ticks may exceed the total
    assert W.free_from(before, load(10.2, 100.8, 5.0)) == 0  # both cores taken
    assert W.free_from(before, load(10.0, 100.0, 5.0)) == 2  # no time passed: nothing known against the cores
    assert W.free_from(load(0.0, 0.0, 0.0, cpus=8), load(0.5, 2.0, 0.5, cpus=8)) == 5  # 3 of 8 taken


def test_read_load_reads_this_machine():
    sample = W.read_load()
    if sample is None:
        pytest.skip("no /proc/stat or CPU affinity here")
    assert sample.cpus == len(os.sched_getaffinity(0)) and sample.busy > 0 and sample.ours > 0
    x = torch.randn(300, 300)
    for _ in range(30):
        x = (x @ x).tanh()
    later = W.read_load()
    assert later.at > sample.at and later.busy >= sample.busy and later.ours > sample.ours


class ScriptedLoad:
    """Stands in for ``time.monotonic`` and ``read_load`` in ``_workers``: readings from a script of
    ``(seconds, other processes' busy cores over the step)``, this process idle."""

    def __init__(self, monkeypatch, cpus=2):
        self.now, self.busy, self.reads, self.cpus = 100.0, 0.0, 0, cpus
        monkeypatch.setattr(W, "time", self)
        monkeypatch.setattr(W, "read_load", self.read)
        monkeypatch.setattr(W, "_load", [None, None])
        monkeypatch.setattr(W, "_told", [])
        monkeypatch.setattr(W, "ADAPT", True)

    def monotonic(self):
        return self.now

    def advance(self, seconds, others):
        self.now += seconds
        self.busy += seconds * others

    def read(self):
        self.reads += 1
        return W.LoadSample(self.now, self.busy, 0.0, self.cpus)


def test_the_finite_scan_runs_on_the_free_cores(two_threads, monkeypatch):
    """``attention``'s finite scan (``_all_finite``) sums on torch's threads while no other process holds a core, on
    the free ones while one does (a small region: ``all_threads``), and leaves the caller's count as it was; a sum
    below torch's grain size, which no thread count splits, sets none."""
    A = sys.modules["attnmask.attention"]  # the package's ``attention`` is the function
    seen = []
    monkeypatch.setattr(A, "math", type("M", (), {"isfinite": lambda x: seen.append(torch.get_num_threads()) or True}))
    clock = ScriptedLoad(monkeypatch)
    t = torch.ones(256, A._ONE_THREAD_ELEMENTS // 256)
    clock.advance(0.2, 0.0)
    assert A._all_finite(t, t) and seen == [2, 2]
    clock.advance(0.2, 1.0)
    assert A._all_finite(t) and seen == [2, 2, 1]
    assert torch.get_num_threads() == 2
    assert A._all_finite(torch.ones(4, 4)) and seen == [2, 2, 1, 2]  # under the same load, small: the caller's


def test_free_cores_follows_the_load_of_the_last_interval(monkeypatch):
    clock = ScriptedLoad(monkeypatch)
    assert W.free_cores() is None and clock.reads == 1  # the first reading is only a baseline
    clock.advance(0.05, 1.0)
    assert W.free_cores() is None and clock.reads == 1  # under SAMPLE_SECONDS since the baseline: not read again
    clock.advance(0.1, 1.0)
    assert W.free_cores() == 1 and clock.reads == 2
    clock.advance(0.2, 0.0)
    assert W.free_cores() == 2
    clock.advance(0.3, 2.0)
    assert W.free_cores() == 0
    clock.advance(5.0, 0.0)  # a stale baseline: replaced, the previous decision kept until the next interval
    assert W.free_cores() == 0
    clock.advance(0.2, 1.0)
    assert W.free_cores() == 1


def test_small_regions_get_at_most_the_free_cores(two_threads, monkeypatch, caplog):
    """While another process holds one of two cores, a parallel region under ``REGION_WORK`` gets one thread (the
    free core), a larger one both; ``parallel_map`` keeps tasks averaging under ``busy_min_work`` in the caller, and
    deals larger ones to the workers as before."""
    clock = ScriptedLoad(monkeypatch)
    assert W.region_threads() == 2  # nothing measured yet
    clock.advance(0.2, 1.0)
    with caplog.at_level("INFO", logger="attnmask"):
        assert W.region_threads() == 1 and W.region_threads(W.REGION_WORK) == 2
        assert W.region_threads(1e9) == 1 and W.region_threads(1e9, share_work=8e8) == 2  # a region pulling items
    assert "other processes held 1 of 2 CPUs: backends use 1 of 2 threads" in caplog.text
    caplog.clear()
    with caplog.at_level("INFO", logger="attnmask"):  # later changes at DEBUG: a load that comes and goes is quiet
        clock.advance(0.2, 0.0)
        assert W.region_threads() == 2
        clock.advance(0.2, 1.0)
        assert W.region_threads() == 1
    assert caplog.text == ""
    with caplog.at_level("DEBUG", logger="attnmask"):
        clock.advance(0.2, 0.0)
        assert W.region_threads() == 2
    assert "backends use 2 of 2 threads" in caplog.text
    assert W._told == [True]  # one mark, however often the load comes and goes
    clock.advance(0.2, 1.0)
    assert W.threads_available() == 2
    with W.serial_steps():
        assert torch.get_num_threads() == 1 and W.threads_available() == 2
        with W.all_threads(1e6):
            assert torch.get_num_threads() == 1 and W.threads_available() == 2
        with W.all_threads(W.REGION_WORK):
            assert torch.get_num_threads() == 2
    with W.all_threads():
        assert torch.get_num_threads() == 1 and W.threads_available() == 2
    assert torch.get_num_threads() == 2
    where = {}

    def fn(i):
        time.sleep(0.02)
        where[i] = (threading.current_thread().name, torch.get_num_threads())
        return i

    here = threading.current_thread().name
    assert W.parallel_map(fn, range(4), weights=[1e7] * 4, busy_min_work=5e7) == list(range(4))
    assert set(where.values()) == {(here, 1)}
    where.clear()
    W.parallel_map(fn, range(4), weights=[1e7] * 4)  # no busy_min_work: dealt as when idle
    assert any(name.startswith("attnmask-worker") for name, _ in where.values())
    where.clear()
    W.parallel_map(fn, range(3), weights=[1.5 * W.REGION_WORK, 1e8, 1e8], busy_min_work=5e7)  # a large one: 2
    assert where[0] == (here, 2) and {threads for _, threads in where.values()} == {1, 2}
    torch.use_deterministic_algorithms(True)
    try:
        assert W.region_threads() == 2  # a thread count may change a reduction's rounding: not adapted
    finally:
        torch.use_deterministic_algorithms(False)
    monkeypatch.setattr(W, "ADAPT", False)
    assert W.region_threads() == 2
    clock.advance(0.2, 0.0)
    monkeypatch.setattr(W, "ADAPT", True)
    assert W.region_threads() == 2


def test_under_a_taken_core_the_largest_item_runs_beside_the_workers(two_threads, monkeypatch):
    """With one of two cores taken, the largest item (more than a fair share: idle, it and every item after it would
    run one by one in the caller) gets the free core in the caller while a worker takes the rest at the same time:
    the largest item sees the others start before it ends. An error in it is raised once the workers stopped."""
    clock = ScriptedLoad(monkeypatch)
    W.free_cores()
    clock.advance(0.2, 1.0)
    here = threading.current_thread().name
    started, where = threading.Event(), {}

    def fn(i):
        where[i] = (threading.current_thread().name, torch.get_num_threads())
        if i == 0:
            where["others started first"] = started.wait(timeout=10)
        else:
            started.set()
        return i

    weights = [8e9, 2e9, 1e9]
    assert W._too_big([0, 1, 2], weights, 2) == 3  # idle: all three in the caller, one after the other
    assert W.parallel_map(fn, range(3), weights=weights) == [0, 1, 2]
    assert where[0] == (here, 1) and where["others started first"]
    assert any(name.startswith("attnmask-worker") for name, _ in (where[1], where[2]))
    finished, begun = [], threading.Event()

    def failing(i):
        if i == 0:
            begun.wait(timeout=10)  # a worker's task is running when the largest fails
            raise RuntimeError("largest")
        begun.set()
        time.sleep(0.2)
        finished.append(i)

    with pytest.raises(RuntimeError, match="largest"):
        W.parallel_map(failing, range(3), weights=weights)
    assert finished == [1]  # the running task was waited for; none started after the error


ADAPTED = {
    "varlen": lambda: am.causal() & am.document(seq_lens=[170, 40, 90]),
    "blocksparse": lambda: am.sliding_window(40),
    "banded": lambda: am.causal() & am.document(seq_lens=[9, 30, 17, 4, 25, 31, 12, 22, 8, 19, 13, 10]),
    "native": lambda: am.causal() & am.document(seq_lens=[9, 30, 17, 4, 25, 31, 12, 22, 8, 19, 13, 10]),
}


@pytest.mark.parametrize("backend", ADAPTED)
def test_backends_compute_on_the_free_cores_only(two_threads, monkeypatch, backend):
    """With one of two cores held by another process, a backend's kernels, forward and backward, run with one
    intra-op thread (the free core: no parallel region waits for the taken one), and compute what they compute on
    both cores, and what the reference computes."""
    from attnmask.backends import banded as BD
    from attnmask.backends import native as NT

    if backend == "native" and NT.native_available() is not None:
        pytest.skip(NT.native_available())
    spec = ADAPTED[backend]()
    q, k, v = qkv(200, heads=4, kv_heads=2, grad=True)
    monkeypatch.setattr(VL, "MIN_TASK_WORK", 0.0)  # else these small documents run on one thread anyway
    want_out = am.attention(q, k, v, spec, backend=backend)
    want = grads(want_out, (q, k, v))
    clock = ScriptedLoad(monkeypatch)
    W.free_cores()
    clock.advance(0.2, 1.0)  # another process held one core
    spies = [
        spy_threads(monkeypatch, torch.nn.functional, ["scaled_dot_product_attention"]),
        spy_threads(monkeypatch, BS, ["_flash_group_forward", "_flash_group_backward", "unit_stride"]),
        spy_threads(monkeypatch, BD, ["_padded"]),
        set(),
    ]
    real = NT._call
    monkeypatch.setattr(NT, "_call", lambda *args, **kw: spies[-1].add(args[-1]) or real(*args, **kw))
    out = am.attention(q, k, v, spec, backend=backend)
    got = grads(out, (q, k, v))
    assert set().union(*spies) == {1} and torch.get_num_threads() == 2
    torch.testing.assert_close(out, want_out, atol=1e-6, rtol=1e-5)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)
    ref, ref_inputs = reference(q, k, v, spec)
    assert_matches_reference(out, ref)


def test_varlen_backward_runs_its_small_ops_with_one_thread(two_threads):
    """The backward of "varlen"'s gathers, masks and assembly runs in a ``serial_steps`` block as its forward does
    (``graph_in``): no op of it opens a parallel region (each would wait for a core another process holds)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Threads(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is not torch.ops.aten.detach.default:  # the engine's, storing each leaf's .grad (no compute)
                self.seen.add(torch.get_num_threads())
            return func(*args, **(kwargs or {}))

    spec = VARLEN_SPECS["documents"]()
    q, k, v = qkv(300, heads=4, kv_heads=2, grad=True)
    out = am.attention(q, k, v, spec, backend="varlen")
    grad = torch.ones_like(out)
    with Threads() as mode:
        out.backward(grad)
    assert mode.seen == {1}
    ref, ref_inputs = reference(q, k, v, spec)
    ref.backward(torch.ones_like(ref))
    for got, want in zip((q, k, v), ref_inputs, strict=True):
        assert_matches_reference(got.grad, want.grad)


def test_sdpa_forward_computes_on_the_free_cores_and_keeps_torchs_threads_with_a_gradient(two_threads, monkeypatch):
    spec = am.sliding_window(24)
    q, k, v = qkv(200, heads=4, kv_heads=2)
    want = am.attention(q, k, v, spec, backend="sdpa")
    clock = ScriptedLoad(monkeypatch)
    W.free_cores()
    clock.advance(0.2, 1.0)  # another process held one core
    seen = spy_threads(monkeypatch, torch.nn.functional, ["scaled_dot_product_attention"])
    torch.testing.assert_close(am.attention(q, k, v, spec, backend="sdpa"), want)
    assert seen == {1}
    seen.clear()
    q.requires_grad_()
    out = am.attention(q, k, v, spec, backend="sdpa")
    assert seen == {2}
    torch.testing.assert_close(out, want)


@pytest.mark.parametrize(
    "spec",
    [am.sliding_window(512), am.causal() & am.chunked(512), am.prefix_lm(300)],
    ids=["window", "chunks", "prefix-LM"],
)
def test_sdpa_sizes_a_splits_region_by_the_work_of_its_calls(monkeypatch, spec):
    """A call ``sdpa`` runs as several calls without a mask asks for its threads with the work those calls compute
    together (``_split_parts``), not the dense call's: a window of 512 on a row of 8,192 computes a tenth of the
    dense pairs, so under contention its calls take the free cores (RESULTS.md, issue 15, "A split's calls on the free
    cores"). A call that is no split asks with its dense work."""
    import contextlib

    from attnmask.backends import sdpa as SD

    asked = []
    monkeypatch.setattr(SD._workers, "all_threads", lambda work=None: asked.append(work) or contextlib.nullcontext())
    monkeypatch.setattr(SD, "_run", lambda call: None)
    q = torch.zeros(1, 2, 2048, 16)
    dense = 2 * 2048 * 2048 * 32
    call = _prepare_call(q, q, q, spec, None, None, None)
    share, calls = SD._split_parts(call)
    SD.run(call)
    assert asked == [pytest.approx(dense * share)] and share < 0.7 and calls >= 1
    asked.clear()
    SD.run(_prepare_call(q, q, q, am.causal() & am.document(seq_lens=[1000, 1048]), None, None, None))
    assert asked == [dense]


@pytest.mark.parametrize(
    "spec",
    [am.sliding_window(512), am.causal() & am.key_padding(torch.arange(2048) < 1500), am.prefix_lm(300)],
    ids=["window", "padding", "prefix-LM"],
)
def test_sdpa_runs_a_split_with_a_gradient_in_a_region_of_its_own_work(monkeypatch, spec):
    """With a gradient, the fused splits' forward and their own backward each run inside ``all_threads`` of the work
    their calls compute together, so that under a busy core they take the free cores (rows of 1,024 with a backward:
    `sdpa` on padded rows, a window of 512 and prefix-LM slowed 4.6-6.7x, now 2.0-2.6x, unmasked SDPA 2.5-4.0x;
    RESULTS.md, issue 15, "A split's calls on the free cores"), and compute what they computed before."""

    from attnmask.backends import sdpa as SD

    q, k, v = (torch.randn(1, 2, 2048, 16, requires_grad=True) for _ in range(3))
    want = am.attention(q, k, v, spec, backend="sdpa")
    want_grads = grads(want, (q, k, v))
    asked = []
    real = SD._workers.all_threads
    monkeypatch.setattr(SD._workers, "all_threads", lambda work=None: asked.append(work) or real(work))
    out = am.attention(q, k, v, spec, backend="sdpa")
    got = grads(out, (q, k, v))
    work = SD._split_work(_prepare_call(q, k, v, spec, None, None, None))
    assert work < 2 * 2048 * 2048 * 32 and asked.count(pytest.approx(work)) == 2
    torch.testing.assert_close(out, want)
    for g, w in zip(got, want_grads, strict=True):
        torch.testing.assert_close(g, w)


def test_read_load_gives_none_where_the_counters_cannot_be_read(monkeypatch):
    import io

    monkeypatch.setattr(W, "open", lambda *a, **k: io.BytesIO(b"cpu  1 2 3\ncpuX 1 2 3 4 5 6 7 8\n"), raising=False)
    assert W.read_load() is None  # not the format it reads
    monkeypatch.setattr(W, "open", lambda *a, **k: io.BytesIO(b"cpu  9 9 9 9\ncpu0 10 0 5 100 7 1 1 1 0 0\n"))
    if hasattr(os, "sched_getaffinity") and 0 in os.sched_getaffinity(0):
        assert W.read_load().busy == 18 / W._TICKS  # user + nice + system + irq + softirq + steal of cpu0
    monkeypatch.delattr(W.os, "sched_getaffinity", raising=False)
    assert W.read_load() is None  # not Linux
    monkeypatch.setattr(W, "_load", [None, None])
    assert W.free_cores() is None and W.free_cores() is None
