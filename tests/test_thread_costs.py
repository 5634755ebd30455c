"""Thread-aware CPU cost estimates: ``_workers.expected_speedup`` mirrors what ``parallel_map`` does with the threads,
each backend's estimate moves with ``_workers.threads_available()`` as its run path uses the threads, and ``"auto"``'s
cached pick follows a change of the thread count."""

import importlib
import importlib.util
import threading
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attnmask as am
from attnmask.backends import _workers as W
from attnmask.backends import banded as BD
from attnmask.backends import blocksparse as BS
from attnmask.backends import native as NT
from attnmask.backends import sdpa as SD
from attnmask.backends import varlen as VL
from tests.helpers import bench_limit

A = importlib.import_module("attnmask.attention")  # the module; `attnmask.attention` is the function


@pytest.fixture
def threads(monkeypatch):
    """``set(n)``: the estimates (and ``choose_backend``) see ``n`` threads, through the patched module function."""

    def set_threads(n: int) -> None:
        monkeypatch.setattr(W, "threads_available", lambda: n)

    return set_threads


def call_for(spec, length=1024, heads=4, dim=64, batch=1, dtype=torch.float32):
    q = torch.zeros(batch, heads, length, dim, dtype=dtype)
    k = torch.zeros(batch, heads, length, dim, dtype=dtype)
    return A._prepare_call(q, k, k, spec, None, None, None)


def cost_at(backend, call, n: int, monkeypatch) -> float:
    with monkeypatch.context() as m:
        m.setattr(W, "threads_available", lambda: n)
        return backend.BACKEND.cost(call)


# ---------------------------------------------------------------------------------------------------------------------
# expected_speedup: worked examples


def test_expected_speedup_worked_examples():
    assert W.expected_speedup([6, 3, 1, 1], 2) == pytest.approx(2.0)  # 6, 3 split (4.5), the 1s one per thread (1)
    assert W.expected_speedup([6, 3, 1, 1], 2, min_work=4) == pytest.approx(11 / 8)  # 3 and the 1s on one thread
    assert W.expected_speedup([1, 1, 1, 1], 2) == pytest.approx(2.0)  # dealt two and two
    assert W.expected_speedup([1, 1, 1, 1], 2, efficiency=0.5) == pytest.approx(1.5)
    assert W.expected_speedup([5], 2, efficiency=0.25) == pytest.approx(1.25)  # one item: split across both
    assert W.expected_speedup([5], 4, min_work=10) == 1.0  # one small item: one thread


def test_expected_speedup_is_one_on_one_thread_or_no_work():
    assert W.expected_speedup([3, 2, 1], 1) == 1.0
    assert W.expected_speedup([], 4) == 1.0
    assert W.expected_speedup([0, 0], 2) == 1.0


def test_a_pool_that_never_splits_an_item_gains_nothing_on_one_item():
    assert W.expected_speedup([8], 4, share_big=False) == 1.0  # the native kernel's first thread takes it all
    assert W.expected_speedup([6, 3, 1, 1], 2, share_big=False) == pytest.approx(11 / 6)  # 6 | 3 + 1 + 1


def test_handovers_can_make_small_dealt_tasks_slower_than_one_thread():
    assert W.expected_speedup([1.0] * 8, 2, handover=1.0) == pytest.approx(8 / (4 + 8))
    assert W.expected_speedup([100.0] * 8, 2, handover=1.0) == pytest.approx(800 / (400 + 8))
    assert W.expected_speedup([6, 3], 2, handover=100.0) == pytest.approx(2.0)  # split in the caller: none dealt


@settings(max_examples=60, deadline=None)
@given(
    weights=st.lists(st.floats(0.01, 100.0), min_size=1, max_size=12),
    n=st.integers(2, 8),
    min_work=st.sampled_from([0.0, 1.0, 20.0, 1e3]),
)
def test_expected_speedup_lies_between_one_and_the_thread_count(weights, n, min_work):
    gain = W.expected_speedup(weights, n, min_work)
    assert 1.0 - 1e-9 <= gain <= n + 1e-9
    assert W.expected_speedup(weights, n, min_work, efficiency=0.0) == pytest.approx(1.0)


def greedy_makespan_speedup(weights, threads, min_work, efficiency, share_big, handover):
    """The model of ``expected_speedup`` restated item by item: the largest items that hold more than a fair share of
    the work left run split (``share_big``), the rest averaging under ``min_work`` run one after another, else each
    goes to the least loaded of ``min(threads, count)`` threads (the first on a tie) plus a hand-over each."""
    total = sum(weights)
    if total <= 0 or threads < 2:
        return 1.0

    def alone(w):
        return w / (1 + ((threads if w >= min_work else 1) - 1) * efficiency)

    if share_big and len(weights) < 2:
        return total / alone(total)
    left, split, rest = total, [], sorted(weights, reverse=True)
    while share_big and rest and rest[0] * threads > left:
        left -= rest[0]
        split.append(rest.pop(0))
    time = sum(alone(w) for w in split)
    if share_big and (len(rest) < 2 or sum(rest) < min_work * len(rest)):
        return total / (time + sum(alone(w) for w in rest))
    loads = [0.0] * min(threads, len(rest))
    for w in rest:
        least = min(range(len(loads)), key=lambda i: (loads[i], i))
        loads[least] += w
    ideal = sum(rest) / max(loads)
    return total / (time + sum(rest) / (1 + (ideal - 1) * efficiency) + handover * len(rest))


@settings(max_examples=300, deadline=None)
@given(
    weights=st.lists(st.one_of(st.floats(0.01, 100.0), st.sampled_from([1.0, 2.0, 5.0])), min_size=1, max_size=40),
    n=st.integers(2, 5),
    min_work=st.sampled_from([0.0, 1.0, 20.0]),
    efficiency=st.sampled_from([1.0, 0.85, 0.3]),
    share_big=st.booleans(),
    handover=st.sampled_from([0.0, 0.5]),
)
def test_expected_speedup_is_the_greedy_deal_item_by_item(weights, n, min_work, efficiency, share_big, handover):
    """Ties included (repeated weights): the deal by sorted values and the two-thread shortcut give the model's
    makespan exactly."""
    expected = greedy_makespan_speedup(weights, n, min_work, efficiency, share_big, handover)
    got = W.expected_speedup(weights, n, min_work, efficiency, share_big=share_big, handover=handover)
    assert got == pytest.approx(expected, rel=1e-12)


# ---------------------------------------------------------------------------------------------------------------------
# expected_speedup agrees with what parallel_map does (which items run split in the caller, one-threaded, or dealt)

needs_workers = pytest.mark.skipif(W.workers_available() is not None, reason=str(W.workers_available()))


def recorded_run(weights, n: int, min_work: float, dealt: bool) -> tuple[float, bool]:
    """Run ``parallel_map`` on ``n`` intra-op threads with a recording task and compute, from what each item saw, the
    speed-up the model's arithmetic gives: items that ran with ``n`` intra-op threads split (``w / n``), the others,
    when a worker took any, as a greedy deal over ``min(n, their count)`` threads, else one after the other. Returns
    it and whether a worker took any. ``dealt``: the items are expected to be dealt, so a one-threaded item in the
    caller waits (up to 5 s) until a worker has taken one (a worker slow to wake does not change the record)."""
    caller = threading.get_ident()
    seen, taken = {}, threading.Event()

    def task(i):
        in_worker = threading.get_ident() != caller
        seen[i] = (torch.get_num_threads(), in_worker)
        if in_worker:
            taken.set()
        elif dealt and torch.get_num_threads() == 1:
            taken.wait(5.0)
        return i

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        assert W.parallel_map(task, list(range(len(weights))), weights, min_work=min_work) == list(range(len(weights)))
    finally:
        torch.set_num_threads(before)
    split = [w for i, w in enumerate(weights) if seen[i][0] == n]
    one = [w for i, w in enumerate(weights) if seen[i][0] != n]
    in_workers = any(in_worker for _, in_worker in seen.values())
    if not in_workers:
        time_taken = sum(split) / n + sum(one)
    else:
        loads = [0.0] * min(n, len(one))
        for w in sorted(one, reverse=True):
            loads[loads.index(min(loads))] += w
        time_taken = sum(split) / n + max(loads)
    return sum(weights) / time_taken, in_workers


@needs_workers
@pytest.mark.parametrize(
    "weights, min_work, dealt",
    [
        ([6.0, 3.0, 1.0, 1.0], 0.0, True),  # two too big to share, split; the 1s dealt
        ([6.0, 3.0, 1.0, 1.0], 4.0, False),  # 6 split, 3 too big but small (one thread), the 1s too small to deal
        ([2.0, 2.0, 2.0, 2.0], 0.0, True),  # none too big: all dealt
        ([2.0, 2.0, 2.0, 2.0], 3.0, False),  # averaging under min_work: one thread each, in the caller
        ([10.0, 1.0], 0.0, False),  # the large one split, then one left: in the caller
        ([9.0], 0.0, False),  # one item: split
    ],
)
def test_expected_speedup_agrees_with_what_parallel_map_does(weights, min_work, dealt):
    speedup, in_workers = recorded_run(weights, 2, min_work, dealt)
    assert in_workers == dealt
    assert W.expected_speedup(weights, 2, min_work) == pytest.approx(speedup)


# ---------------------------------------------------------------------------------------------------------------------
# Each backend's estimate at 1 and 2 threads


def test_sdpa_estimate_divides_by_its_thread_gain(monkeypatch):
    call = call_for(am.causal() & am.document(seq_lens=[512, 512]))
    monkeypatch.setattr(SD, "_THREAD_EFFICIENCY", 0.5)
    assert cost_at(SD, call, 2, monkeypatch) == pytest.approx(cost_at(SD, call, 1, monkeypatch) / 1.5)
    assert cost_at(SD, call, 4, monkeypatch) == pytest.approx(cost_at(SD, call, 1, monkeypatch) / 2.5)


def test_sdpa_one_query_uses_at_most_its_head_items(monkeypatch):
    q, k = torch.zeros(1, 2, 1, 64), torch.zeros(1, 2, 4096, 64)
    call = A._prepare_call(q, k, k, am.causal() & am.sliding_window(2048), None, None, None)
    monkeypatch.setattr(SD, "_THREAD_EFFICIENCY", 1.0)
    assert cost_at(SD, call, 8, monkeypatch) == pytest.approx(cost_at(SD, call, 1, monkeypatch) / 2)  # B·H = 2 items


def test_native_forward_gains_on_query_blocks_its_backward_on_whole_segments(monkeypatch):
    monkeypatch.setattr(NT, "_THREAD_EFFICIENCY", 1.0)
    monkeypatch.setattr(W, "contended", lambda: False)  # no busy factor, whatever the machine's load
    one = call_for(am.sliding_window(64))  # one segment: the forward cuts it into 32 blocks x 4 heads, 16 pulls
    one_thread, two = cost_at(NT, one, 1, monkeypatch), cost_at(NT, one, 2, monkeypatch)
    assert two == pytest.approx(NT._CALL_COST + (one_thread - NT._CALL_COST) / 2, rel=0.02)
    many = call_for(am.causal() & am.document(seq_lens=[32] * 32))  # 128 equal items, 16 pulls: not cut
    one_thread, two = cost_at(NT, many, 1, monkeypatch), cost_at(NT, many, 2, monkeypatch)
    assert two == pytest.approx(NT._CALL_COST + (one_thread - NT._CALL_COST) / 2)
    # with a gradient, the backward's items are whole segments, one a key/value head, taken one at a time when few:
    # the 4 heads of one segment on 2 threads halve its backward too (its runs at the forward's bytes here: the
    # backward's own bytes per key are test_native.py's)
    monkeypatch.setattr(NT, "_BACKWARD_KEY_BYTES", NT._FORWARD_KEY_BYTES)
    q = torch.zeros(1, 4, 1024, 64, requires_grad=True)
    graded = A._prepare_call(q, q.detach(), q.detach(), am.sliding_window(64), None, None, None)
    factor = NT.MODES.of(torch.float32, "cpu", needs_grad=True)
    one_thread, forward_two = cost_at(NT, one, 1, monkeypatch), cost_at(NT, one, 2, monkeypatch)
    backward_two = NT._CALL_COST + (one_thread - NT._CALL_COST) / 2
    assert cost_at(NT, graded, 2, monkeypatch) == pytest.approx(forward_two + backward_two * (factor - 1))


def test_varlen_small_tasks_stay_on_one_thread_large_ones_share(monkeypatch):
    monkeypatch.setattr(VL, "_THREAD_EFFICIENCY", 1.0)
    small = call_for(am.causal() & am.document(seq_lens=[40] * 4), length=160)  # a group under MIN_TASK_WORK / 8
    assert cost_at(VL, small, 2, monkeypatch) == pytest.approx(cost_at(VL, small, 1, monkeypatch))
    # idle, a group from MIN_TASK_WORK / 8 gets both threads; while another process holds a core, from MIN_TASK_WORK
    mid = call_for(am.causal() & am.document(seq_lens=[64] * 16))  # one group of 16 x 64 x 64 pairs: 33.5M
    assert cost_at(VL, mid, 2, monkeypatch) < 0.8 * cost_at(VL, mid, 1, monkeypatch)
    monkeypatch.setattr(W, "contended", lambda: True)
    monkeypatch.setattr(VL, "MODES", VL.ModeFactors())  # no busy factor: the threads alone
    assert cost_at(VL, mid, 2, monkeypatch) == pytest.approx(cost_at(VL, mid, 1, monkeypatch))
    monkeypatch.setattr(W, "contended", lambda: False)
    assert cost_at(VL, small, 2, monkeypatch) == pytest.approx(cost_at(VL, small, 1, monkeypatch))
    lens = [1024, 1024, 1000, 1000, 1040, 1008]  # three groups of stacked documents, each >= MIN_TASK_WORK
    large = call_for(am.causal() & am.document(seq_lens=lens), length=sum(lens))
    assert cost_at(VL, large, 2, monkeypatch) < 0.8 * cost_at(VL, large, 1, monkeypatch)


@pytest.mark.parametrize("dim", [16, 64, 128])
def test_varlen_charges_a_hand_over_in_estimate_units_at_every_head_size(monkeypatch, dim):
    """A hand-over is a fixed time: in the tasks' weights (H·(D + Dv) a pair) it weighs ``_HANDOVER_COST`` times the
    width over the width a pair is charged at: at D = 64 (the calibration) the constant itself, at D = 16 less (a pair
    is charged more than its width there), at D = 128 more."""
    lens = [400, 100, 300, 200, 250, 260, 190, 12, 12, 20]  # groups SDPA runs and tiny ones
    call = call_for(am.causal() & am.document(seq_lens=lens), length=sum(lens), dim=dim)
    plan = VL.varlen_plan(call)
    width = 2 * dim
    big, tiny = VL._task_weights(plan.segments.tolist(), plan.window, 4 * width)
    small_width, sdpa_width = VL._charged_widths(width)
    seen = []
    original = W.expected_speedup

    def spy(weights, threads, min_work=0.0, efficiency=1.0, **kwargs):
        seen.append((sorted(weights), kwargs.get("handover")))
        return original(weights, threads, min_work, efficiency, **kwargs)

    monkeypatch.setattr(W, "expected_speedup", spy)
    monkeypatch.setattr(W, "contended", lambda: False)
    cost_at(VL, call, 2, monkeypatch)
    expected = [(sorted(big), VL._HANDOVER_COST * width / sdpa_width)]
    expected += [(sorted(tiny), VL._HANDOVER_COST * width / small_width)]
    assert seen == [(w, pytest.approx(h)) for w, h in expected]
    if dim == 64:
        assert [h for _, h in seen] == pytest.approx([VL._HANDOVER_COST] * 2)
    else:
        assert all((h < VL._HANDOVER_COST) == (dim < 64) for _, h in seen)


def test_blocksparse_estimate_mirrors_its_group_tasks(monkeypatch):
    call = call_for(am.causal() & am.chunked(128))
    weights = [w * BS._PAIR_COST for w in BS._task_weights(call)]
    groups = len(weights)
    monkeypatch.setattr(BS, "_THREAD_EFFICIENCY", 1.0)
    monkeypatch.setattr(BS, "_HANDOVER_COST", 0.0)
    serial = groups * BS._GROUP_COST + BS._CALL_COST
    one, two = cost_at(BS, call, 1, monkeypatch), cost_at(BS, call, 2, monkeypatch)
    assert two == pytest.approx(serial + (one - serial) / W.expected_speedup(weights, 2))
    assert two < one
    monkeypatch.setattr(BS, "_THREAD_EFFICIENCY", 0.0)
    monkeypatch.setattr(BS, "_HANDOVER_COST", 1e7)  # tiny dealt groups: two threads cost more than one
    assert cost_at(BS, call, 2, monkeypatch) > cost_at(BS, call, 1, monkeypatch)


def spy_weights(monkeypatch, module) -> list:
    """The ``weights`` of every ``parallel_map`` call ``module`` makes (the calls still run)."""
    seen = []
    original = module.parallel_map

    def spy(fn, items, weights=None, **kwargs):
        seen.append(sorted(weights))
        return original(fn, items, weights, **kwargs)

    monkeypatch.setattr(module, "parallel_map", spy)
    return seen


def test_blocksparse_estimate_cuts_its_stacks_for_the_threads_of_each_call(monkeypatch):
    """The plan is kept with the spec; the pieces are cut for the threads at hand, not those of the first estimate."""
    call = call_for(am.sliding_window(128))  # one stack of 14 groups: 2 pieces of at most 8, or one per thread
    tasks = []
    for threads in (1, 2, 4, 1):
        monkeypatch.setattr(W, "threads_available", lambda threads=threads: threads)
        tasks.append(len(BS._task_weights(call)))
    assert tasks == [4, 4, 6, 4]  # two groups alone, and the stack in 2, 2, 4, 2 pieces
    cost_at(BS, call, 4, monkeypatch)  # the spec's plans now kept
    fresh = call_for(am.sliding_window(128))  # another spec object: nothing kept
    assert cost_at(BS, call, 2, monkeypatch) == cost_at(BS, fresh, 2, monkeypatch)


@pytest.mark.parametrize(
    "spec, stacked",
    [
        (am.causal() & am.chunked(128), False),
        (am.sliding_window(128), True),  # the stacks' pieces are the tasks, found from the plan alone
        (am.sliding_window(512), True),
        (am.local_window(100, 60), True),
        (am.causal() & am.document(seq_lens=[40] * 25 + [24]), False),  # tiles alike by their classes, not by masks
    ],
    ids=["chunked", "window-128", "window-512", "both-ways", "documents"],
)
@pytest.mark.parametrize("threads", [1, 2])
def test_blocksparse_estimate_deals_the_groups_its_run_deals(monkeypatch, spec, stacked, threads):
    monkeypatch.setattr(W, "threads_available", lambda: threads)
    q = torch.randn(1, 4, 1024, 64)
    seen = spy_weights(monkeypatch, BS)
    with torch.no_grad():
        am.attention(q, q, q, spec, backend="blocksparse")
    estimated = BS._task_weights(call_for(spec))
    assert seen == [sorted(estimated)]
    groups = len(BS._layout_plan(call_for(spec)))
    assert (len(estimated) < groups) == stacked


@pytest.mark.parametrize(
    "spec, length",
    [
        (am.causal() & am.document(seq_lens=[300, 300, 200, 24, 24, 16, 160]), 1024),  # groups and tiny groups
        (am.sliding_window(256), 2048),  # one document, a window shorter than it: query blocks
    ],
)
def test_varlen_estimate_deals_the_tasks_its_run_deals(monkeypatch, spec, length):
    q = torch.randn(1, 4, length, 64)
    seen = spy_weights(monkeypatch, VL)
    with torch.no_grad():
        am.attention(q, q, q, spec, backend="varlen")
    plan = VL.varlen_plan(call_for(spec, length=length))
    big, tiny = VL._task_weights(plan.segments.tolist(), plan.window, 4 * 128)
    assert sorted(big) in seen and (not tiny or sorted(tiny) in seen)


def test_banded_only_its_sdpa_call_gains(monkeypatch):
    call = call_for(am.causal() & am.document(seq_lens=[16] * 64))
    plan = BD._cached_plan(call)
    pairs, tiles, serial = BD._parts(call, plan.block_size, plan.width)
    in_sdpa = pairs + tiles  # float32: no AMX pair factor
    monkeypatch.setattr(BD, "_THREAD_EFFICIENCY", 1.0)
    assert cost_at(BD, call, 1, monkeypatch) == pytest.approx(in_sdpa + serial)
    assert cost_at(BD, call, 2, monkeypatch) == pytest.approx(in_sdpa / 2 + serial)


def test_estimates_read_the_threads_through_the_workers_module(monkeypatch):
    """The contention-aware ``threads_available`` (patched here) is what the estimates see, not torch's setting."""
    monkeypatch.setattr(SD, "_THREAD_EFFICIENCY", 0.5)
    call = call_for(am.prefix_lm(256))
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert cost_at(SD, call, 2, monkeypatch) < cost_at(SD, call, 1, monkeypatch)
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------------------------------
# The cached "auto" pick follows the thread count


def test_cached_auto_pick_follows_a_change_of_thread_count(monkeypatch, threads):
    monkeypatch.setattr(SD, "_THREAD_EFFICIENCY", 1.0)  # SDPA twice as fast on two threads
    monkeypatch.setattr(BS, "_THREAD_EFFICIENCY", 0.0)  # blocksparse no faster
    real = torch.ones(1, 1024, dtype=torch.long)
    real[:, -64:] = 0
    spec = am.prefix_lm(256) & am.key_padding(real)  # SDPA's masked call (no prefix split past the padding)
    call = call_for(spec)
    threads(1)
    one = A.choose_backend(call).name
    threads(2)
    two = A.choose_backend(call_for(spec)).name  # same spec object and signature: the cached plans
    assert (one, two) == ("blocksparse", "sdpa")
    threads(1)
    assert A.choose_backend(call_for(spec)).name == "blocksparse"
    assert am.explain(torch.zeros(1, 4, 1024, 64), *[torch.zeros(1, 4, 1024, 64)] * 2, spec).picked == "blocksparse"


# ---------------------------------------------------------------------------------------------------------------------
# bench_limit --fit: the efficiencies come from the 1- and 2-thread tables; the offline picks see the table's threads


def synthetic_table(bench, threads: int, sdpa_ms: dict) -> str:
    """A saved ``bench_limit`` table (its own format) of rows of 256 tokens timed at ``threads`` threads, with only
    "sdpa" timed: ``sdpa_ms`` ``{structure: ms}``."""
    lines = [
        f"torch x, {threads} thread(s), rows of 256, decode against 512 keys, H=4, D=64, load 0",
        "",
        f"**forward, float32, {threads} thread(s)** (ms)",
        "",
        "| structure | allowed | ideal ms | covered | floor ms | sdpa | auto picks | auto / ideal |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [f"| {name} | 0.5 | 1.0 | - | - | {ms} | sdpa | 1.0 |" for name, ms in sdpa_ms.items()]
    return "\n".join(lines) + "\n"


def test_fit_recovers_the_efficiency_the_tables_were_made_with(tmp_path, capsys):
    bench = bench_limit()
    names = [c.name for c in bench.cases(256, 512) if c.name.startswith(("causal +", "prefix", "causal chunked"))]
    one = {name: 10.0 + i for i, name in enumerate(names)}
    paths = []
    for threads, table in ((1, one), (2, {name: ms / 1.6 for name, ms in one.items()})):  # efficiency 0.6
        paths.append(tmp_path / f"t{threads}.txt")
        paths[-1].write_text(synthetic_table(bench, threads, table))
    own = SD._THREAD_EFFICIENCY
    bench.main(["--fit", *map(str, paths)])
    out = capsys.readouterr().out
    assert f"| sdpa | _THREAD_EFFICIENCY | {own:.2f} | 0.60 | {len(names)} |" in out
    assert "sdpa 1.60 (estimates " in out  # the measured gain next to the estimated one
    assert SD._THREAD_EFFICIENCY == own  # the modules keep their own constants


def test_offline_picks_see_the_tables_thread_count_not_this_machines():
    bench = bench_limit()
    own, before = W.threads_available, torch.get_num_threads()
    with bench.at_threads(3):
        assert W.threads_available() == 3 and torch.get_num_threads() == 3
    assert W.threads_available is own and torch.get_num_threads() == before


def test_the_handover_benchmark_deals_its_tasks_and_prints_the_cost_per_task(capsys, monkeypatch):
    """``benchmarks/bench_handover.py``: the dealt run goes through ``parallel_map`` with every task, the serial one
    does not, and each row gives the time per task beyond a perfect split in microseconds and estimate units."""
    if W.workers_available() is not None:
        pytest.skip(W.workers_available())
    path = Path(__file__).parents[1] / "benchmarks" / "bench_handover.py"
    script = importlib.util.spec_from_file_location("bench_handover", path)
    bench = importlib.util.module_from_spec(script)
    script.loader.exec_module(bench)
    dealt = []
    deal = W.parallel_map

    def counting(fn, items, *args, **kwargs):
        dealt.append(len(items))
        return deal(fn, items, *args, **kwargs)

    monkeypatch.setattr(W, "parallel_map", counting)
    before = torch.get_num_threads()
    try:
        bench.main(["--rows", "1,32", "--tasks", "3", "--rounds", "2"])
    finally:
        torch.set_num_threads(before)
    out = capsys.readouterr().out
    rows = [line.split("|") for line in out.splitlines() if line.startswith(("| 1 |", "| 32 |"))]
    assert [r[2].strip() for r in rows] == ["3", "3"] and set(dealt) == {3}
    assert all(float(r[6]) == float(r[6]) and float(r[7]) == float(r[7]) for r in rows)  # numbers, not NaN
    assert f"_HANDOVER_COST = {BS._HANDOVER_COST:.3g}" in out and "reproduce: " in out


def test_blocksparse_charges_per_tile_and_per_call_follow_the_cpu_kind(monkeypatch):
    """``blocksparse``'s charge per query tile and per call and their backward's share are its CPU kind's
    (``_common.per_cpu_kind``: 4e6, none and all of it with AMX tiles; 2e6, 2e7 and 0.4 without), and the call's
    charge counts once a call in both the estimate and its floor: in the forward's mode factor, and with a gradient
    that factor plus the share of what the backward adds."""
    from attnmask.backends import _common

    assert (BS._GROUP_COST, BS._CALL_COST, BS._BACKWARD_OVERHEAD_SHARE) == (
        _common.per_cpu_kind(BS._GROUP_COSTS),
        _common.per_cpu_kind(BS._CALL_COSTS),
        _common.per_cpu_kind(BS._BACKWARD_OVERHEAD_SHARES),
    )
    assert BS._GROUP_COSTS == (4e6, 2e6) and BS._CALL_COSTS == (0.0, 2e7)
    assert BS._BACKWARD_OVERHEAD_SHARES == (1.0, 0.4)
    monkeypatch.setattr(BS, "_BACKWARD_OVERHEAD_SHARE", 0.25)
    monkeypatch.setattr(_common, "cpu_has_amx_bf16", lambda: True)
    assert _common.per_cpu_kind((1.0, 2.0)) == 1.0
    monkeypatch.setattr(_common, "cpu_has_amx_bf16", lambda: False)
    assert _common.per_cpu_kind((1.0, 2.0)) == 2.0
    spec = am.causal() & am.document(seq_lens=[[300, 212], [512]])
    for grad in (False, True):
        q, k, v = (torch.randn(2, 4, 512, 32, requires_grad=grad) for _ in range(3))
        with torch.set_grad_enabled(grad), W.load_as_read(False):  # idle: no busy factor
            full = BS.mode_factor(BS.MODES, A._prepare_call(q, k, v, spec, None, None, None))
            factor = 1.0 + (full - 1.0) * 0.25  # the float32 forward's factor is 1
            seen = []
            for charge in (0.0, 5e7):
                monkeypatch.setattr(BS, "_CALL_COST", charge)
                call = A._prepare_call(q, k, v, spec, None, None, None)  # a new call: nothing cached
                seen.append((BS.cost(call), BS.floor(call)))
        assert 1.0 < factor < full if grad else factor == full == 1.0
        assert seen[1][0] - seen[0][0] == pytest.approx(5e7 * factor)
        assert seen[1][1] - seen[0][1] == pytest.approx(5e7 * factor)
        assert all(floor <= cost for cost, floor in seen)


def test_every_declared_cpu_kind_constant_holds_its_kinds_value():
    """Each CPU estimate module's ``CPU_KIND_VALUES`` names constants it holds at this CPU's kind's value
    (``_common.per_cpu_kind``): the declaration the replays set per table is the one the estimates read."""
    from attnmask.backends import _common

    declared = 0
    for module in (SD, NT, VL, BS, BD):
        for name, values in getattr(module, "CPU_KIND_VALUES", {}).items():
            assert len(values) == 2 and getattr(module, name) == _common.per_cpu_kind(values), (module.__name__, name)
            declared += 1
    assert declared == 20 and VL.CPU_KIND_VALUES["_HANDOVER_COST"] == BS.CPU_KIND_VALUES["_HANDOVER_COST"]


def test_the_hand_over_of_a_dealt_task_follows_the_cpu_kind(monkeypatch):
    """A task dealt to a worker costs the Xeon's fitted 3.2e6 units on a CPU with AMX tiles and the AMD EPYC's
    measured 2.6e5 otherwise (``_common.handover_cost``); both modules dealing worker tasks hold this CPU's."""
    from attnmask.backends import _common

    assert BS._HANDOVER_COST == VL._HANDOVER_COST == _common.handover_cost()
    monkeypatch.setattr(_common, "cpu_has_amx_bf16", lambda: True)
    assert _common.handover_cost() == _common.HANDOVER_COST_AMX == 3.2e6
    monkeypatch.setattr(_common, "cpu_has_amx_bf16", lambda: False)
    assert _common.handover_cost() == _common.HANDOVER_COST_OTHER == 2.6e5
