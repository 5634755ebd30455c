"""torch.distributed support: zig-zag sharding, context-parallel attention, global token counts, the packed sampler.

Multi-process tests start real gloo worlds of 2 and 4 processes on this machine (tests/dist_workers.py; one world per
size for the whole module, with timeouts) and compare every rank's result with a single-process reference:
tests/naive.py's float64 attention on the whole row, and a cross entropy over the whole optimizer step.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import attnmask as am
from attnmask.errors import BackendError, InputError, ShapeError
from attnmask.integrations.context_parallel import (
    context_parallel_attention,
    context_parallel_method,
    context_parallel_positions,
    context_parallel_slices,
    shard_for_context_parallel,
)
from attnmask.integrations.ranks import global_num_items
from attnmask.integrations.sampler import DistributedPackedSampler
from tests.dist_workers import (
    attention_cases,
    attention_inputs,
    free_port,
    loss_inputs,
    per_document_case,
    run_world,
    sampler_lengths,
)
from tests.naive import naive_attention, naive_dense


def reference_attention(spec, seq_len, B, H, Hkv, D):
    """Output and q/k/v gradients of the whole row in one process, float64, by the textbook formula."""
    q, k, v, grad = attention_inputs(seq_len, B, H, Hkv, D)
    q, k, v = (t.double().requires_grad_() for t in (q, k, v))
    allowed = naive_dense(spec, seq_len, seq_len).unsqueeze(1)
    out = naive_attention(q, k, v, allowed)
    (out * grad.double()).sum().backward()
    return out.detach(), q.grad, k.grad, v.grad


def step_tokens(step):
    return sum(stop - start for row in step for _, start, stop in row)


# ---------------------------------------------------------------------------------------------------------------------
# Zig-zag sharding (one process)


@given(st.integers(0, 200), st.integers(1, 8))
def test_zigzag_positions_partition_the_row(seq_len, world):
    parts = [context_parallel_positions(seq_len, world, r) for r in range(world)]
    assert torch.equal(torch.sort(torch.cat(parts)).values, torch.arange(seq_len))
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 2


def test_zigzag_gives_every_rank_an_early_and_a_late_chunk():
    assert context_parallel_positions(16, 2, 0).tolist() == [0, 1, 2, 3, 12, 13, 14, 15]
    assert context_parallel_positions(16, 2, 1).tolist() == [4, 5, 6, 7, 8, 9, 10, 11]
    assert context_parallel_positions(8, 4, 3).tolist() == [3, 4]


def test_causal_work_is_equal_on_every_rank_when_2w_divides_the_row():
    seq_len, world = 64, 4
    work = [
        int(am.causal().to_dense(16, 64, q_positions=context_parallel_positions(seq_len, world, r)).sum())
        for r in range(world)
    ]
    assert len(set(work)) == 1


def test_shard_selects_the_rank_positions_along_dim():
    x = torch.arange(2 * 3 * 10 * 4).view(2, 3, 10, 4)
    for r in range(2):
        pos = context_parallel_positions(10, 2, r)
        assert torch.equal(shard_for_context_parallel(x, dim=2, world_size=2, rank=r), x.index_select(2, pos))


# ---------------------------------------------------------------------------------------------------------------------
# Slicing a spec to a rank's queries


@st.composite
def structural_spec(draw, length, depth=2):
    if depth == 0 or draw(st.booleans()):
        kind = draw(st.sampled_from(["causal", "window", "local", "chunk", "prefix", "doc", "pad", "full"]))
        if kind == "causal":
            return am.causal()
        if kind == "window":
            return am.sliding_window(draw(st.integers(1, length)))
        if kind == "local":
            return am.local_window(draw(st.integers(0, length)), draw(st.integers(0, length)))
        if kind == "chunk":
            return am.chunked(draw(st.integers(1, length)))
        if kind == "prefix":
            return am.prefix_lm([draw(st.integers(0, length))])
        if kind == "doc":
            lens, left = [], draw(st.integers(0, length))
            while left > 0:
                lens.append(draw(st.integers(1, left)))
                left -= lens[-1]
            return am.document(seq_lens=[lens], length=length)
        if kind == "pad":
            return am.key_padding(torch.tensor([[draw(st.integers(0, 1)) for _ in range(length)]]))
        return am.full()
    left = draw(structural_spec(length, depth - 1))
    right = draw(structural_spec(length, depth - 1))
    return left & right if draw(st.booleans()) else left | right


@given(st.data(), st.integers(1, 24), st.integers(1, 4))
def test_slices_keep_every_key_the_spec_allows(data, seq_len, world):
    _check_slices(data.draw(structural_spec(seq_len)), seq_len, world, data.draw(st.integers(0, world - 1)))


@given(st.data(), st.integers(1, 24), st.integers(2, 4))
def test_local_window_slices_keep_every_key(data, seq_len, world):
    spec = am.local_window(data.draw(st.integers(0, seq_len)), data.draw(st.integers(0, seq_len)))
    _check_slices(spec, seq_len, world, data.draw(st.integers(0, world - 1)))


def _check_slices(spec, seq_len, world, rank):
    """Every key a query of a rank's slices may attend lies in the slice's key range, and the slice's mask is the
    spec's there."""
    full = naive_dense(spec, seq_len, seq_len, batch=1)[0]
    for piece in context_parallel_slices(spec, seq_len, world, rank):
        rows = full[piece.q_start : piece.q_stop]
        assert not rows[:, : piece.kv_start].any() and not rows[:, piece.kv_stop :].any(), repr(spec)
        if piece.q_stop > piece.q_start and piece.kv_stop > piece.kv_start:
            assert torch.equal(piece.to_dense()[0], rows[:, piece.kv_start : piece.kv_stop])


def test_local_window_slices_reach_both_ways():
    early, late = context_parallel_slices(am.local_window(2, 1), 16, 2, 0)
    assert (early.kv_start, early.kv_stop) == (0, 5)  # queries 0-3 reach keys up to 4
    assert (late.kv_start, late.kv_stop) == (10, 16)  # queries 12-15 reach back to key 10


def test_causal_slices_stop_at_the_last_query():
    early, late = context_parallel_slices(am.causal() & am.document(seq_lens=[10, 6]), 16, 2, 0)
    assert (early.q_start, early.q_stop, early.kv_start, early.kv_stop) == (0, 4, 0, 4)
    assert (late.q_start, late.q_stop, late.kv_start, late.kv_stop) == (12, 16, 10, 16)


# ---------------------------------------------------------------------------------------------------------------------
# Context-parallel attention


METHODS = ["all_gather", "ring"]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", attention_cases(), ids=lambda c: c[0])
def test_context_parallel_attention_in_one_process_equals_naive(case, method):
    name, spec, seq_len, B, H, Hkv, D = case
    q, k, v, grad = attention_inputs(seq_len, B, H, Hkv, D)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    pos = context_parallel_positions(seq_len, 1, 0)
    out = context_parallel_attention(q, k, v, spec, method=method)
    (out * grad).sum().backward()
    ref, dq, dk, dv = reference_attention(spec, seq_len, B, H, Hkv, D)
    torch.testing.assert_close(out.double(), ref[:, :, pos], atol=1e-5, rtol=1e-5)
    for got, want in ((q.grad, dq), (k.grad, dk), (v.grad, dv)):
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module", params=[2, 4], ids=lambda w: f"world{w}")
def world(request):
    """Results of every job on each rank of one gloo world of 2 or 4 processes."""
    return request.param, run_world(request.param, "all")


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", attention_cases(), ids=lambda c: c[0])
def test_context_parallel_attention_equals_single_process_forward_and_backward(world, case, method):
    world_size, results = world
    name, spec, seq_len, B, H, Hkv, D = case
    ref, dq, dk, dv = reference_attention(spec, seq_len, B, H, Hkv, D)
    for rank, res in enumerate(results):
        got = res["attention"][name, method]
        pos = torch.as_tensor(got["positions"])
        assert torch.equal(pos, context_parallel_positions(seq_len, world_size, rank))
        for key, want in (("out", ref), ("dq", dq), ("dk", dk), ("dv", dv)):
            torch.testing.assert_close(
                torch.as_tensor(got[key]).double(), want[:, :, pos], atol=1e-5, rtol=1e-5, msg=f"rank {rank} {key}"
            )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", METHODS)
def test_padding_queries_get_exact_zeros_and_no_gradient(method, dtype):
    spec = am.causal() & am.document(seq_lens=[5], length=8)
    q, k, v, _ = attention_inputs(8, 1, 2, 2, 4)
    q, k, v = (t.to(dtype).requires_grad_() for t in (q, k, v))
    out = context_parallel_attention(q, k, v, spec, method=method)
    assert out.dtype == dtype
    out.float().sum().backward()
    pad = context_parallel_positions(8, 1, 0) >= 5
    assert torch.equal(out[:, :, pad], torch.zeros_like(out[:, :, pad]))
    assert torch.equal(q.grad[:, :, pad], torch.zeros_like(q.grad[:, :, pad]))
    assert torch.isfinite(k.grad).all() and torch.isfinite(v.grad).all()


def _local(seq_len, world_size, rank):
    return len(context_parallel_positions(seq_len, world_size, rank))


def test_on_two_gloo_ranks_pytorchs_flex_path_equals_our_ring_and_one_process():
    """One world of 2 processes (FlexAttention's first call is slow to start): the zig-zag cases whose shards have
    equal length, flex against ring and the single-process reference, forward (no CPU backward); the per-document
    layout, all-gather forward and backward and flex forward against the reference."""
    world_size, results = 2, run_world(2, "pytorch_cp", timeout=240)
    cases = {c[0]: c for c in attention_cases() if len({_local(c[2], world_size, r) for r in range(world_size)}) == 1}
    assert cases, "no case whose shards have equal length"
    spec, seq_len, seq_lens, B, H, Hkv, D = per_document_case()
    doc_ref = reference_attention(spec, seq_len, B, H, Hkv, D)
    for rank, res in enumerate(results):
        assert set(res["flex"]) == set(cases)
        for name, (_, case_spec, case_len, *dims) in cases.items():
            ref = reference_attention(case_spec, case_len, *dims)[0]
            got = res["flex"][name]
            torch.testing.assert_close(torch.as_tensor(got["flex"]), torch.as_tensor(got["ring"]), atol=1e-5, rtol=1e-5)
            want = ref[:, :, context_parallel_positions(case_len, world_size, rank)]
            torch.testing.assert_close(torch.as_tensor(got["flex"]).double(), want, atol=1e-5, rtol=1e-5)
        pos = context_parallel_positions(seq_len, world_size, rank, seq_lens=seq_lens)
        got = res["per_document"]
        for key, want in zip(("out", "flex", "dq", "dk", "dv"), (doc_ref[0], *doc_ref), strict=True):
            torch.testing.assert_close(
                torch.as_tensor(got[key]).double(), want[:, :, pos], atol=1e-5, rtol=1e-5, msg=f"rank {rank} {key}"
            )


def test_auto_picks_our_ring_for_cpu_training_and_says_why():
    q, k, v, _ = attention_inputs(8, 1, 2, 2, 4)
    method, reason = context_parallel_method(q.requires_grad_(), k, v, 8, 2)
    assert method == "ring" and "no CPU backward" in reason
    with pytest.raises(BackendError, match="no CPU backward"):
        context_parallel_attention(q, k, v, am.causal(), method="flex")
    with torch.no_grad():
        assert context_parallel_method(q, k, v, 8, 2) == ("flex", None)
        assert context_parallel_method(q, k, v, 10, 2) == ("flex", None)  # shards [0, 2) + [7, 10) and [2, 7): 5 each
        method, reason = context_parallel_method(q, k, v, 9, 2)  # shards [0, 2) + [6, 9) and [2, 6): 5 and 4
        assert method == "ring" and "unequal length [5, 4]" in reason


@pytest.mark.parametrize("case", attention_cases(), ids=lambda c: c[0])
def test_pytorch_flex_path_in_one_process_equals_naive_forward(case):
    name, spec, seq_len, B, H, Hkv, D = case
    q, k, v, _ = attention_inputs(seq_len, B, H, Hkv, D)
    with torch.no_grad():
        out = context_parallel_attention(q, k, v, spec, method="auto", block_size=8)
    ref = reference_attention(spec, seq_len, B, H, Hkv, D)[0]
    torch.testing.assert_close(out.double(), ref[:, :, context_parallel_positions(seq_len, 1, 0)], atol=1e-5, rtol=1e-5)


def test_per_document_layout_is_the_head_tail_of_every_document():
    assert context_parallel_positions(16, 2, 0, seq_lens=[4, 8, 4]).tolist() == [0, 3, 4, 5, 10, 11, 12, 15]
    assert context_parallel_positions(16, 2, 1, seq_lens=[4, 8, 4]).tolist() == [1, 2, 6, 7, 8, 9, 13, 14]
    # a document of 5 in chunks [0, 1) [1, 2) [2, 3) [3, 5), then 2 positions past it in chunks [], [5], [], [6]
    assert context_parallel_positions(7, 2, 0, seq_lens=[5]).tolist() == [0, 3, 4, 6]
    assert context_parallel_positions(7, 2, 1, seq_lens=[5]).tolist() == [1, 2, 5]
    balancer = pytest.importorskip("torch.distributed.tensor.experimental._context_parallel")
    lens, world_size = [8, 16, 24], 2
    indices = balancer._PerDocumentHeadTailLoadBalancer([lens], world_size, "cpu")._generate_indices()[0]
    starts = [0, 8, 24]
    for rank in range(world_size):  # PyTorch's indices hold, document by document, each rank's head and tail chunks
        theirs = torch.cat(
            [
                indices[o + 2 * rank * (n // 4) : o + 2 * (rank + 1) * (n // 4)]
                for o, n in zip(starts, lens, strict=True)
            ]
        )
        assert torch.equal(context_parallel_positions(48, world_size, rank, seq_lens=lens), theirs)


@pytest.mark.parametrize("method", ["all_gather", "auto"])
def test_per_document_layout_in_one_process_equals_naive(method):
    spec, seq_len, seq_lens, B, H, Hkv, D = per_document_case()
    q, k, v, grad = attention_inputs(seq_len, B, H, Hkv, D)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = context_parallel_attention(q, k, v, spec, method=method, seq_lens=seq_lens)
    (out * grad).sum().backward()
    ref, dq, dk, dv = reference_attention(spec, seq_len, B, H, Hkv, D)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    for got, want in ((q.grad, dq), (k.grad, dk), (v.grad, dv)):
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def test_ring_refuses_the_per_document_layout():
    spec, seq_len, seq_lens, B, H, Hkv, D = per_document_case()
    q, k, v, _ = attention_inputs(seq_len, B, H, Hkv, D)
    with pytest.raises(BackendError, match="ring"):
        context_parallel_attention(q, k, v, spec, method="ring", seq_lens=seq_lens)


def test_shard_length_that_does_not_match_the_row_is_a_shape_error():
    q = torch.zeros(1, 2, 5, 4)
    with pytest.raises(ShapeError, match="q_local"):
        context_parallel_attention(q, q, q, am.causal(), seq_len=6)


def test_unknown_method_is_an_input_error():
    q = torch.zeros(1, 2, 4, 4)
    with pytest.raises(InputError, match="method"):
        context_parallel_attention(q, q, q, am.causal(), method="tree")


# ---------------------------------------------------------------------------------------------------------------------
# Loss normalisation across ranks


def single_process_loss(world_size):
    logits, labels, _ = loss_inputs(world_size)
    logits = logits.clone().requires_grad_()
    n = int((labels[:, 1:] != -100).sum())
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), reduction="sum") / n
    loss.backward()
    return float(loss.detach()), n, logits.grad


def test_global_num_items_is_the_step_count_summed_over_ranks(world):
    world_size, results = world
    _, n, _ = single_process_loss(world_size)
    assert [res["loss"]["num_items"] for res in results] == [n] * world_size


def test_loss_normalised_by_the_global_count_equals_the_single_process_loss(world):
    world_size, results = world
    loss, _, grad = single_process_loss(world_size)
    for res in results:
        assert res["loss"]["loss"] == pytest.approx(loss, rel=1e-6)
        rows = res["loss"]["rows"]
        torch.testing.assert_close(torch.as_tensor(res["loss"]["grad"]), grad[rows], atol=1e-7, rtol=1e-5)


def test_global_num_items_counts_shifted_targets_over_micro_batches():
    a = torch.tensor([[1, 2, -100, 4]])  # targets after the shift: 2, -100, 4 -> 2
    b = torch.tensor([[-100, 5, 6], [7, -100, -100]])  # 5, 6 and nothing -> 2
    assert int(global_num_items(a)) == 2 and int(global_num_items([a, b])) == 4


# ---------------------------------------------------------------------------------------------------------------------
# The packed sampler


def rank_steps(sampler_kwargs, lengths, max_length, world_size):
    samplers = [
        DistributedPackedSampler(lengths, max_length, num_replicas=world_size, rank=r, **sampler_kwargs)
        for r in range(world_size)
    ]
    return samplers, [list(s) for s in samplers]


def assert_covers_exactly_once(per_rank, lengths):
    seen = [np.zeros(n, dtype=np.int64) for n in lengths]
    for steps in per_rank:
        for step in steps:
            for row in step:
                for index, start, stop in row:
                    seen[index][start:stop] += 1
    assert all((s == 1).all() for s in seen)


def test_sampler_ranks_in_a_world_run_equal_steps_and_cover_the_data_once(world):
    world_size, results = world
    counts = [res["sampler"]["len"] for res in results]
    assert len(set(counts)) == 1 and results[0]["sampler"]["all_counts"] == counts
    assert [len(res["sampler"]["steps"]) for res in results] == counts
    assert_covers_exactly_once([res["sampler"]["steps"] for res in results], sampler_lengths())


def test_sampler_ranks_in_a_world_get_nearly_equal_real_tokens_per_step(world):
    world_size, results = world
    per_rank = [res["sampler"]["steps"] for res in results]
    for t in range(len(per_rank[0])):
        tokens = [step_tokens(steps[t]) for steps in per_rank]
        assert max(tokens) / np.mean(tokens) <= 1.05, (t, tokens)


@pytest.mark.parametrize("world_size,rows_per_step", [(2, 1), (3, 1), (4, 2), (8, 1)])
def test_sampler_balances_lognormal_lengths_within_five_percent(world_size, rows_per_step):
    lengths = sampler_lengths()
    samplers, per_rank = rank_steps({"rows_per_step": rows_per_step}, lengths, 2048, world_size)
    assert len({len(steps) for steps in per_rank}) == 1
    assert_covers_exactly_once(per_rank, lengths)
    worst = max(
        max(step_tokens(s[t]) for s in per_rank) / np.mean([step_tokens(s[t]) for s in per_rank])
        for t in range(len(per_rank[0]))
    )
    assert worst <= 1.05
    assert samplers[0].stats.imbalance == pytest.approx(worst)
    assert all(len(step) == rows_per_step for steps in per_rank for step in steps)
    assert all(sum(b - a for _, a, b in row) <= 2048 for steps in per_rank for step in steps for row in step)


@given(
    st.lists(st.integers(0, 40), min_size=0, max_size=40),
    st.integers(1, 32),
    st.integers(1, 5),
    st.integers(1, 3),
)
def test_sampler_covers_every_token_once_with_equal_steps_for_any_lengths(lengths, max_length, world_size, per_step):
    samplers, per_rank = rank_steps({"rows_per_step": per_step}, lengths, max_length, world_size)
    assert len({len(steps) for steps in per_rank}) == 1
    assert_covers_exactly_once(per_rank, lengths)
    assert all(sum(b - a for _, a, b in row) <= max_length for steps in per_rank for step in steps for row in step)
    assert samplers[0].stats.tokens == sum(lengths)


def test_sampler_order_is_fixed_by_seed_and_epoch():
    lengths = sampler_lengths(300)
    a = DistributedPackedSampler(lengths, 512, num_replicas=2, rank=1, seed=5)
    b = DistributedPackedSampler(lengths, 512, num_replicas=2, rank=1, seed=5)
    a.set_epoch(2)
    b.set_epoch(2)
    assert list(a) == list(b)
    b.set_epoch(3)
    assert list(a) != list(b)


def test_sampler_epochs_reshuffle_rows_but_keep_the_packing():
    lengths = sampler_lengths(300)
    samplers, _ = rank_steps({"seed": 1}, lengths, 512, 2)
    rows = []
    for epoch in (0, 1):
        for s in samplers:
            s.set_epoch(epoch)
        rows.append(sorted(tuple(row) for s in samplers for step in s for row in step))
    assert rows[0] == rows[1]


def test_sampler_deals_exactly_the_rows_of_attnmask_pack_when_they_balance():
    lengths = [8, 5, 3, 7, 1, 6, 2, 4, 4]  # bfd: four full rows of 10
    _, per_rank = rank_steps({}, lengths, 10, 2)
    dealt = sorted(sorted(row) for steps in per_rank for step in steps for row in step)
    assert dealt == sorted(sorted(row) for row in am.pack(lengths, 10).bins)


def test_sampler_collate_makes_one_document_per_segment():
    sequences = [list(range(10, 10 + n)) for n in [6, 5, 4, 3, 2, 1]]
    sampler = DistributedPackedSampler([len(s) for s in sequences], 8, num_replicas=4, rank=0, shuffle=False)
    for rank in range(4):
        (rows,) = sampler.steps_for_rank(rank)
        batch = sampler.collate(rows, sequences, pad_id=0)
        row, at = rows[0], 0
        for index, start, stop in row:
            n = stop - start
            assert batch.input_ids[0, at : at + n].tolist() == sequences[index][start:stop]
            assert batch.position_ids[0, at : at + n].tolist() == list(range(n))
            assert batch.labels[0, at] == -100
            at += n
        assert batch.seq_lens == (tuple(stop - start for _, start, stop in row),)
        assert (batch.labels[0, at:] == -100).all() and (batch.attention_mask[0, at:] == 0).all()


def test_sampler_collate_of_an_empty_row_is_padding_without_targets():
    sampler = DistributedPackedSampler([1, 1], 8, num_replicas=4, rank=0, shuffle=False)
    empty = [rows for r in range(4) for (rows,) in [sampler.steps_for_rank(r)] if not rows[0]]
    batch = sampler.collate(empty[0], [[5], [6]], pad_id=0)
    assert batch.input_ids.shape == (1, 8) and not batch.attention_mask.any() and (batch.labels == -100).all()


def test_sampler_with_fewer_tokens_than_rows_gives_empty_rows_and_counts_them():
    samplers, per_rank = rank_steps({}, [3, 2], 8, 4)
    assert [len(steps) for steps in per_rank] == [1, 1, 1, 1]
    assert_covers_exactly_once(per_rank, [3, 2])
    assert samplers[0].stats.empty_rows == 0  # 5 tokens cut over 4 rows rather than leaving one empty
    samplers, per_rank = rank_steps({}, [1, 1], 8, 4)
    assert samplers[0].stats.empty_rows == 2


def test_sampler_drop_last_drops_only_the_rebalanced_rows_and_reports_them():
    lengths = [10, 10, 10, 4]
    samplers, per_rank = rank_steps({"drop_last": True}, lengths, 10, 2)
    stats = samplers[0].stats
    assert [len(s) for s in per_rank] == [1, 1]
    assert stats.dropped_tokens == 14 and stats.dropped_sequences == 2
    assert stats.tokens + stats.dropped_tokens == sum(lengths)


def test_sampler_worked_example_from_the_docstring():
    _, per_rank = rank_steps({"shuffle": False}, [6, 5, 4, 3, 2], 10, 2)
    rows = sorted(sorted(i for i, _, _ in steps[0][0]) for steps in per_rank)
    assert rows == [[0, 2], [1, 3, 4]]


def test_sampler_bad_arguments_raise_typed_errors_naming_them():
    with pytest.raises(InputError, match="lengths"):
        DistributedPackedSampler([3, -1], 8, num_replicas=1, rank=0)
    with pytest.raises(InputError, match="max_length"):
        DistributedPackedSampler([3], 0, num_replicas=1, rank=0)
    with pytest.raises(InputError, match="rank"):
        DistributedPackedSampler([3], 8, num_replicas=2, rank=2)


def test_sampler_serves_a_dataloader_one_step_per_item():
    class Steps(torch.utils.data.Dataset):
        def __getitem__(self, rows):
            return sum(stop - start for row in rows for _, start, stop in row)

    sampler = DistributedPackedSampler([5, 4, 3, 7, 6], 8, num_replicas=2, rank=1, rows_per_step=2)
    loader = torch.utils.data.DataLoader(Steps(), sampler=sampler, batch_size=None)
    assert list(loader) == [step_tokens(step) for step in sampler]


def test_sampler_without_a_process_group_is_one_process():
    s = DistributedPackedSampler([5, 4, 3], 8)
    assert (s.num_replicas, s.rank) == (1, 0)
    assert_covers_exactly_once([list(s)], [5, 4, 3])


# ---------------------------------------------------------------------------------------------------------------------
# The DDP example


def run_example(*args, out, launcher=()):
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root / "src"), str(root)]), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, *launcher, str(root / "examples" / "ddp_train.py"), *args, "--out", str(out)]
    done = subprocess.run(cmd, env=env, cwd=root, timeout=240, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return json.loads(out.read_text())


@pytest.mark.slow
def test_ddp_example_per_step_loss_equals_a_single_process_run(tmp_path):
    port = str(free_port())
    torchrun = ("-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2", "--master-addr", "127.0.0.1")
    torchrun += ("--master-port", port)
    ddp = run_example("--steps", "3", out=tmp_path / "ddp.json", launcher=torchrun)
    single = run_example("--steps", "3", "--reference-world", "2", out=tmp_path / "single.json")
    assert ddp["world_size"] == 2 and single["world_size"] == 1
    assert len(ddp["losses"]) == 3
    assert ddp["losses"] == pytest.approx(single["losses"], rel=1e-5)
    assert ddp["losses"][2] != pytest.approx(ddp["losses"][0], rel=1e-6)  # the model did train


def test_attnmask_distributed_is_a_namespace_over_the_integrations():
    import attnmask.distributed as namespace
    from attnmask.integrations import context_parallel, ranks, sampler

    homes = {"global_num_items": ranks, "DistributedPackedSampler": sampler, "SamplerStats": sampler}
    for name in namespace.__all__:
        assert getattr(namespace, name) is getattr(homes.get(name, context_parallel), name), name
