"""The CUDA backends ("cuda_varlen", "flash", "flex") checked on a CPU-only machine.

- Arguments: ``cu_seqlens``, ``max_seqlen``, ``window_size`` and bottom-right alignment, against flash-attn's and
  torch's documented conventions.
- Semantics: our gather, arguments and scatter around ``tests/kernel_emulators.py`` (the kernels' documented
  semantics in plain torch) equal ``tests/naive.py`` in outputs and gradients on random specs, empty rows exactly 0.
- Dispatch: calls whose tensors live on a fake CUDA device (``FakeTensorMode``) are accepted or refused by the
  declarations, and "auto"'s choice by cost among the CUDA backends is the expected one.
- ``benchmarks/device_check.py --dry-run`` runs (as CI does).
"""

import contextlib
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch._subclasses.fake_tensor import FakeTensorMode

import attnmask as am
from attnmask.backends import cuda_costs, cuda_varlen, flash, flex, packed
from attnmask.backends.contract import AttentionCall, Backend
from attnmask.masks import resolve_positions
from tests import kernel_emulators
from tests.naive import naive_attention, naive_dense
from tests.strategies import heads_and_dims

ROOT = Path(__file__).resolve().parents[1]
PACKED_BACKENDS = {"cuda_varlen": cuda_varlen, "flash": flash}


def make_call(q, k, v, spec, scale=None, dropout_p=0.0):
    """An ``AttentionCall`` at default positions, as ``attention()`` builds it (positions on the CPU)."""
    q_pos, kv_pos = resolve_positions(q.shape[2], k.shape[2])
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return AttentionCall(q, k, v, spec, scale, q_pos, kv_pos, dropout_p=dropout_p)


@contextlib.contextmanager
def emulated_kernels():
    """The CUDA kernels replaced by the emulators of their documented semantics."""
    with (
        mock.patch.object(cuda_varlen, "_varlen_attn", lambda: kernel_emulators.varlen_attn),
        mock.patch.object(flash, "_flash_attn_varlen_func", lambda: kernel_emulators.flash_attn_varlen_func),
    ):
        yield


def plan_of(spec, batch, q_len, kv_len, heads=2, kv_heads=2, dim=8):
    q = torch.zeros(batch, heads, q_len, dim)
    k = torch.zeros(batch, kv_heads, kv_len, dim)
    return packed.packed_plan(make_call(q, k, k, spec))


# ---------------------------------------------------------------------------------------------------------------------
# Arguments against the documented conventions


def test_packed_documents_give_cumulative_offsets_and_the_longest_document():
    plan = plan_of(am.causal() & am.document(seq_lens=[2, 4, 3]), 1, 9, 9)
    assert plan.args.cu_seqlens_q.tolist() == plan.args.cu_seqlens_k.tolist() == [0, 2, 6, 9]
    assert plan.args.cu_seqlens_q.dtype == torch.int32
    assert (plan.args.max_seqlen_q, plan.args.max_seqlen_k) == (4, 4)
    assert plan.every_query and plan.every_key


def test_flash_gets_causal_and_an_unbounded_window_and_varlen_attn_gets_causal_as_its_window():
    plan = plan_of(am.causal() & am.document(seq_lens=[2, 4, 3]), 1, 9, 9)
    kwargs = flash.flash_kwargs(plan, 0.5, 0.1)
    assert (kwargs["causal"], kwargs["window_size"], kwargs["softmax_scale"], kwargs["dropout_p"]) == (
        True,
        (-1, -1),
        0.5,
        0.1,
    )
    torch_kwargs = cuda_varlen.varlen_attn_kwargs(plan, 0.5, enable_gqa=False)
    assert (
        torch_kwargs["window_size"] == (-1, 0) and type(torch_kwargs["window_size"]) is tuple
    )  # torch compares tuples


@pytest.mark.parametrize(
    ("causal", "window_size", "expected"),
    [(False, (-1, -1), (-1, -1)), (True, (-1, -1), (-1, 0)), (True, (2, 0), (2, 0))],
)
def test_varlen_window_translates_flash_conventions(causal, window_size, expected):
    assert cuda_varlen.varlen_window(causal, window_size) == expected


def test_a_sliding_window_of_w_keys_is_flash_window_w_minus_one_to_zero():
    plan = plan_of(am.sliding_window(3) & am.document(seq_lens=[5, 4]), 1, 9, 9)
    assert plan.args.window_size == (2, 0) and plan.args.causal
    assert cuda_varlen.varlen_attn_kwargs(plan, 1.0, False)["window_size"] == (2, 0)


def test_decoding_keeps_only_sequences_with_queries_and_aligns_them_bottom_right():
    plan = plan_of(am.causal() & am.document(seq_lens=[2, 4, 3]), 1, 2, 9)
    assert plan.args.cu_seqlens_q.tolist() == [0, 2]
    assert plan.args.cu_seqlens_k.tolist() == [0, 3]
    assert plan.args.indices_q.tolist() == [0, 1] and plan.args.indices_k.tolist() == [6, 7, 8]


def test_a_one_row_spec_is_repeated_for_every_row_of_the_batch():
    plan = plan_of(am.causal() & am.document(seq_lens=[2, 3], length=6), 2, 6, 6)
    assert plan.args.cu_seqlens_q.tolist() == [0, 2, 5, 7, 10]
    assert plan.args.indices_q.tolist() == [0, 1, 2, 3, 4, 6, 7, 8, 9, 10]
    assert plan.q_slot.tolist() == [1, 2, 3, 4, 5, 0, 6, 7, 8, 9, 10, 0]
    assert not plan.every_query


def test_left_padding_under_causal_keeps_only_the_real_tokens():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    plan = plan_of(am.causal() & am.key_padding(mask), 2, 5, 5)
    assert plan.args.cu_seqlens_k.tolist() == [0, 3, 8]
    assert plan.args.indices_k.tolist() == [2, 3, 4, 5, 6, 7, 8, 9]


@pytest.mark.parametrize(
    "spec",
    [
        am.causal() & am.key_padding(torch.tensor([[1, 1, 1, 0, 0]])),  # right padding: padding queries see keys
        am.key_padding(torch.tensor([[0, 1, 1, 1, 1]])),  # no causal: padding queries see every real key
    ],
)
def test_specs_whose_padding_queries_see_keys_are_refused(spec):
    assert "padding queries attend" in plan_of(spec, 1, 5, 5)


@pytest.mark.parametrize(
    "spec",
    [am.chunked(4) & am.key_padding([[1] * 6 + [0] * 2]), am.prefix_lm([3]), am.causal() | am.sliding_window(2)],
)
def test_specs_without_a_varlen_form_are_refused(spec):
    assert isinstance(plan_of(spec, 1, 8, 8), str)


def test_heads_are_padded_to_a_multiple_of_eight_and_refused_past_256():
    small = make_call(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 6), am.causal())
    assert packed.head_width(small) == 8
    wide = make_call(torch.zeros(1, 1, 4, 264), torch.zeros(1, 1, 4, 264), torch.zeros(1, 1, 4, 264), am.causal())
    assert "head dims up to 256" in packed.packed_unsupported(wide)


# ---------------------------------------------------------------------------------------------------------------------
# Gather + arguments + emulated kernel + scatter == naive attention


@st.composite
def varlen_case(draw):
    """A spec of the varlen form over B rows of K keys, the last Q of them queries, with GQA and odd head dims."""
    batch, kv_len = draw(st.integers(1, 3)), draw(st.integers(1, 12))
    q_len = draw(st.integers(1, kv_len))
    rule = draw(st.sampled_from(["causal", "full", "window"]))
    base = {"causal": am.causal(), "full": am.full()}.get(rule) or am.sliding_window(draw(st.integers(1, kv_len + 1)))
    layout = draw(st.sampled_from(["documents", "left_padding", "right_padding", "one_sequence", "chunks"]))
    if layout == "documents":
        rows = []
        for _ in range(batch):
            lens, left = [], draw(st.integers(0, kv_len))
            while left > 0:
                lens.append(draw(st.integers(1, left)))
                left -= lens[-1]
            rows.append(lens)
        spec = base & am.document(seq_lens=rows, length=kv_len)
    elif layout == "one_sequence":
        spec = base
    elif layout == "chunks":  # one sequence per chunk, rows shifted by their own offsets
        offsets = [draw(st.integers(0, kv_len)) for _ in range(batch)]
        spec = base & am.chunked(draw(st.integers(1, kv_len + 1)), offsets)
    else:
        real = [draw(st.integers(0, kv_len)) for _ in range(batch)]
        left = layout == "left_padding"
        mask = torch.tensor([[int((i >= kv_len - n) if left else (i < n)) for i in range(kv_len)] for n in real])
        spec = base & am.key_padding(mask)
    return dict(spec=spec, **draw(heads_and_dims(batch, q_len, kv_len)))


def random_qkv(case, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    B, H, Hkv = case["batch"], case["heads"], case["kv_heads"]
    Q, K, D, Dv = case["q_len"], case["kv_len"], case["head_dim"], case["value_dim"]
    shapes = [(B, H, Q, D), (B, Hkv, K, D), (B, Hkv, K, Dv)]
    return [torch.randn(s, generator=gen, dtype=dtype).requires_grad_() for s in shapes]


def assert_equals_naive(got, call, spec, q_len, kv_len, batch):
    """``got`` (float64, from ``call``'s q, k, v) equals float64 textbook attention, and so do its gradients in q, k
    and v against one random upstream gradient; returns the allowed pairs ``(B, 1, Q, K)`` and ``got``'s gradients."""
    q, k, v = call.q, call.k, call.v
    allowed = naive_dense(spec, q_len, kv_len, batch).unsqueeze(1)
    want = naive_attention(q, k, v, allowed, scale=call.scale)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
    weight = torch.randn(got.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    got_grads = torch.autograd.grad((got * weight).sum(), (q, k, v))
    want_grads = torch.autograd.grad((want * weight).sum(), (q, k, v))
    for name, g, w in zip("qkv", got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, atol=1e-10, rtol=1e-10, msg=f"d{name}")
    return allowed, got_grads


@pytest.mark.parametrize("name", PACKED_BACKENDS)
@given(case=varlen_case())
def test_packed_backends_around_the_emulated_kernel_equal_naive_attention(name, case):
    backend = PACKED_BACKENDS[name].BACKEND
    q, k, v = random_qkv(case)
    call = make_call(q, k, v, case["spec"])
    reason = backend.unsupported(call)
    if reason is not None:
        assert "padding queries attend" in reason  # the only refusal of a spec of this form
        return
    with emulated_kernels():
        got = backend.run(call)
    allowed, got_grads = assert_equals_naive(got, call, case["spec"], case["q_len"], case["kv_len"], case["batch"])
    empty = ~allowed.any(-1)  # (B, 1, Q)
    assert bool((got.masked_select(empty[..., None]) == 0).all())
    assert bool((got_grads[0].masked_select(empty[..., None]) == 0).all())


def test_a_batch_with_no_real_token_gives_zeros_and_zero_gradients():
    case = dict(batch=2, heads=2, kv_heads=1, q_len=3, kv_len=3, head_dim=8, value_dim=8)
    q, k, v = random_qkv(case)
    call = make_call(q, k, v, am.causal() & am.key_padding(torch.zeros(2, 3, dtype=torch.long)))
    with emulated_kernels():
        out = cuda_varlen.BACKEND.run(call)
    assert torch.equal(out, torch.zeros_like(out))
    for g in torch.autograd.grad(out.sum(), (q, k, v)):
        assert torch.equal(g, torch.zeros_like(g))


def test_flash_passes_dropout_to_the_kernel():
    case = dict(batch=1, heads=2, kv_heads=2, q_len=64, kv_len=64, head_dim=8, value_dim=8)
    q, k, v = random_qkv(case)
    spec = am.causal() & am.document(seq_lens=[40, 24])
    with emulated_kernels(), torch.no_grad():
        plain = flash.BACKEND.run(make_call(q, k, v, spec))
        dropped = flash.BACKEND.run(make_call(q, k, v, spec, dropout_p=0.5))
    assert not torch.allclose(plain, dropped)


@given(
    lens=st.lists(st.tuples(st.integers(1, 300), st.integers(0, 300)), min_size=1, max_size=4),
    causal=st.booleans(),
    window=st.none() | st.integers(1, 400),
)
def test_cost_estimates_count_the_allowed_pairs_of_each_sequence_plus_one_tile_per_query_block(lens, causal, window):
    lens_q = torch.tensor([q for q, _ in lens])
    lens_k = lens_q + torch.tensor([extra for _, extra in lens])  # the queries are the last tokens of each sequence
    causal = causal or window is not None
    allowed = 0
    for lq, lk in zip(lens_q.tolist(), lens_k.tolist(), strict=True):
        for i in range(lk - lq, lk):
            seen = range(lk) if not causal else range(max(0, i - window + 1) if window else 0, i + 1)
            allowed += len(seen)
    tiles = sum(-(-lq // cuda_costs.TILE_Q) for lq in lens_q.tolist()) * cuda_costs.TILE_Q * cuda_costs.TILE_K
    assert cuda_costs.sequence_pairs(lens_q, lens_k, causal, window) == allowed + tiles


# ---------------------------------------------------------------------------------------------------------------------
# Dispatch of calls on a (fake) CUDA device


def sdpa_on_cuda() -> Backend:
    """The declaration the "sdpa" backend needs on CUDA (its module belongs to the registry): every device, every mask,
    dropout, backward, costed by ``cuda_costs.sdpa_cost`` there."""
    return Backend("sdpa", lambda call: None, cuda_costs.sdpa_cost, devices=frozenset({"cpu", "cuda"}), dropout=True)


def cuda_candidates() -> list[Backend]:
    """The CUDA backends as a GPU with flash-attn would see them (their environment checks answered yes)."""
    ready = [dataclasses.replace(m.BACKEND, available=lambda: None) for m in (cuda_varlen, flash, flex)]
    return [sdpa_on_cuda(), *ready]


def auto_pick(call) -> str:
    fits = [b for b in cuda_candidates() if not b.not_supported_reasons(call)]
    return min(fits, key=lambda b: b.cost(call)).name


FAKE = FakeTensorMode(allow_non_fake_inputs=True)


def cuda_call(spec, length, q_len=None, heads=8, kv_heads=2, dim=128, dtype=torch.bfloat16, grad=False, dropout=0.0):
    """A call whose q, k, v are fake tensors on a CUDA device (metadata only: shapes, dtype, device)."""
    q_len = length if q_len is None else q_len
    with FAKE:
        q = torch.empty(1, heads, q_len, dim, device="cuda", dtype=dtype)
        k = torch.empty(1, kv_heads, length, dim, device="cuda", dtype=dtype)
    call = make_call(q, k, k, spec, dropout_p=dropout)
    if grad:  # autograd on fake CUDA tensors needs a CUDA build: a stand-in carries the metadata the checks read
        meta = SimpleNamespace(shape=q.shape, dtype=q.dtype, device=q.device, requires_grad=True, stride=q.stride)
        return dataclasses.replace(call, q=meta)
    return call


MIXED = [4096, 1500, 700, 3000, 5000, 2088]  # 16,384 tokens of mixed lengths


def test_cuda_calls_are_refused_by_the_cpu_only_declarations_and_accepted_by_the_cuda_ones():
    call = cuda_call(am.causal() & am.document(seq_lens=MIXED), 16384)
    assert cuda_varlen.BACKEND.devices == flash.BACKEND.devices == frozenset({"cuda"})
    for backend in cuda_candidates():
        assert backend.not_supported_reasons(call) == [], backend.name


@pytest.mark.parametrize("length", [16384, 131072])
def test_auto_on_cuda_runs_packed_documents_through_a_kernel_that_skips_other_documents(length):
    lens = [length // 16] * 4 + [length // 32] * 8 + [length // 128] * 64  # mixed lengths filling the row
    call = cuda_call(am.causal() & am.document(seq_lens=lens), length)
    picked = auto_pick(call)
    assert picked in {"cuda_varlen", "flash", "flex"}
    costs = {b.name: b.cost(call) for b in cuda_candidates()}
    assert costs["sdpa"] > 10 * costs[picked]  # dense SDPA computes every pair of the row


def test_cuda_varlen_and_flex_estimates_count_the_same_pairs_on_long_documents():
    call = cuda_call(am.causal() & am.document(seq_lens=[2048] * 8), 16384)
    varlen, flex_ = cuda_varlen.BACKEND.cost(call), flex.BACKEND.cost(call)
    assert 0.8 < varlen / flex_ < 1.25  # same kernel class, same pairs: the estimates differ only in their constants


def test_auto_on_cuda_keeps_sdpa_for_plain_causal_and_full_attention():
    assert auto_pick(cuda_call(am.causal(), 4096)) == "sdpa"
    assert auto_pick(cuda_call(am.full(), 4096)) == "sdpa"


@pytest.mark.parametrize("spec", [am.chunked(512), am.sliding_window(1024) | am.prefix_lm(64), am.prefix_lm(100)])
def test_auto_on_cuda_runs_structures_without_a_varlen_form_through_flex_not_a_dense_mask(spec):
    assert auto_pick(cuda_call(spec, 16384)) == "flex"


def test_auto_on_cuda_picks_flex_for_float32_packed_documents():
    call = cuda_call(am.causal() & am.document(seq_lens=MIXED), 16384, dtype=torch.float32)
    assert "computes bfloat16, float16, not float32" in cuda_varlen.BACKEND.not_supported_reasons(call)
    assert auto_pick(call) == "flex"


def test_dropout_on_cuda_leaves_flash_and_sdpa():
    call = cuda_call(am.causal() & am.document(seq_lens=MIXED), 16384, dropout=0.1)
    fits = {b.name for b in cuda_candidates() if not b.not_supported_reasons(call)}
    assert fits == {"sdpa", "flash"}


def test_flex_on_cuda_refuses_head_dims_below_16_and_trains():
    assert "head dims >= 16" in flex.BACKEND.not_supported_reasons(cuda_call(am.causal(), 256, dim=8))[0]
    assert flex.BACKEND.not_supported_reasons(cuda_call(am.causal(), 256, grad=True)) == []


def test_cuda_backends_without_their_environment_say_why():
    call = cuda_call(am.causal() & am.document(seq_lens=MIXED), 16384)
    for module, available in ((flash, flash.flash_available), (cuda_varlen, cuda_varlen.cuda_varlen_available)):
        if available() is None:
            continue  # this machine serves it
        assert module.BACKEND.not_supported_reasons(call) == [available()]


def test_on_cpu_flex_is_never_auto_and_the_cuda_only_backends_refuse():
    q = torch.zeros(1, 2, 64, 16)
    call = make_call(q, q, q, am.causal() & am.document(seq_lens=[30, 34]))
    assert flex.BACKEND.cost(call) == float("inf")
    for module in (cuda_varlen, flash):
        assert module.BACKEND.not_supported_reasons(call)[0] == "runs on cuda, not cpu"


def test_cuda_varlen_runs_through_the_real_varlen_attn_signature_on_fake_cuda_tensors():
    with FAKE:
        q = torch.empty(2, 4, 64, 64, device="cuda", dtype=torch.bfloat16)
        k = torch.empty(2, 2, 64, 64, device="cuda", dtype=torch.bfloat16)
    call = make_call(q, k, k, am.causal() & am.document(seq_lens=[[10, 30, 24], [64]]))
    assert cuda_varlen.BACKEND.unsupported(call) is None
    with FAKE:
        out = cuda_varlen.BACKEND.run(call)  # torch's own varlen_attn, through its registered fake kernel
    assert (tuple(out.shape), out.dtype, out.device.type) == ((2, 4, 64, 64), torch.bfloat16, "cuda")


# ---------------------------------------------------------------------------------------------------------------------
# flex on CPU (forward only; compiling takes seconds, so one case)


def test_flex_forward_on_cpu_decodes_with_gqa_a_custom_predicate_and_empty_rows():
    q, k, v = torch.randn(2, 4, 40, 16), torch.randn(2, 2, 200, 16), torch.randn(2, 2, 200, 16)
    pad = torch.ones(2, 200, dtype=torch.long)
    pad[1, :190] = 0  # row 1: only the last 10 keys are real
    spec = am.causal() & am.key_padding(pad) & am.custom(lambda b, h, qi, ki: (qi - ki) % 3 != 1, name="not_1_mod_3")
    call = make_call(q, k, v, spec)
    assert flex.BACKEND.not_supported_reasons(call) == []
    out = flex.BACKEND.run(call)
    allowed = naive_dense(spec, 40, 200, 2).unsqueeze(1)
    torch.testing.assert_close(out.double(), naive_attention(q, k, v, allowed), atol=2e-5, rtol=1e-4)
    empty = ~allowed.any(-1).expand(2, 4, 40)
    assert bool((out[empty] == 0).all()) and bool(empty.any())


# ---------------------------------------------------------------------------------------------------------------------
# torch's varlen_attn across versions


def test_cuda_varlen_names_the_keywords_an_older_varlen_attn_lacks():
    def first_varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
        raise AssertionError("never called")

    def wrapped(*args, **kwargs):
        raise AssertionError("never called")

    assert cuda_varlen.missing_keywords(first_varlen_attn) == ("scale", "window_size", "enable_gqa")
    assert cuda_varlen.missing_keywords(wrapped) == ()
    from torch.nn.attention.varlen import varlen_attn  # this torch's, which takes all three

    assert cuda_varlen.missing_keywords(varlen_attn) == ()
    fake = SimpleNamespace(varlen_attn=first_varlen_attn)
    cuda_varlen.cuda_varlen_available.cache_clear()
    try:
        with mock.patch.dict(sys.modules, {"torch.nn.attention.varlen": fake}):
            reason = cuda_varlen.cuda_varlen_available()
    finally:
        cuda_varlen.cuda_varlen_available.cache_clear()
    assert reason == f"torch {torch.__version__}'s varlen_attn has no scale, window_size keyword"


def varlen_attn_without_gqa(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, -1)):
    """torch 2.11's ``varlen_attn`` signature (no ``enable_gqa``): equal key and query heads only."""
    assert query.shape[1] == key.shape[1] == value.shape[1], "no enable_gqa: heads must match"
    return kernel_emulators.varlen_attn(
        query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale=scale, window_size=window_size
    )


@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_cuda_varlen_repeats_key_heads_for_a_varlen_attn_without_enable_gqa(kv_heads):
    case = dict(batch=2, heads=4, kv_heads=kv_heads, q_len=40, kv_len=48, head_dim=8, value_dim=6)
    q, k, v = random_qkv(case)
    spec = am.causal() & am.document(seq_lens=[[10, 30, 8], [48]])
    call = make_call(q, k, v, spec)
    with mock.patch.object(cuda_varlen, "_varlen_attn", lambda: varlen_attn_without_gqa):
        got = cuda_varlen.BACKEND.run(call)
    assert_equals_naive(got, call, spec, 40, 48, 2)


# ---------------------------------------------------------------------------------------------------------------------
# The device check's dry run


def run_benchmark(script: str, *args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    """``benchmarks/<script> args...`` in a fresh interpreter with this checkout's ``src`` and tests importable."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(ROOT)]))
    command = [sys.executable, str(ROOT / "benchmarks" / script), *args]
    return subprocess.run(command, env=env, cwd=ROOT, timeout=timeout, capture_output=True, text=True)


def test_device_check_dry_run_passes(tmp_path):
    out = tmp_path / "device_check.json"
    done = run_benchmark("device_check.py", "--dry-run", "--out", str(out))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "FAIL" not in done.stdout and "PASS" in done.stdout
    assert out.exists() and out.with_suffix(".md").exists()


def test_bench_flex_cuda_dry_run_runs(tmp_path):
    """The GPU benchmark's harness on the CPU (forward only, tiny shapes): every method timed, the NaN check passes."""
    out = tmp_path / "flex.md"
    args = ("--dry-run", "--rounds", "1", "--reps", "1", "--profile", "2", "--out", str(out))
    done = run_benchmark("bench_flex_cuda.py", *args, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    text = out.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| ") and "| attention " in line]
    assert len(rows) == 6 and all(line.endswith("| ok |") for line in rows), text
    # --profile: per scenario, the host functions of attention(backend="flex"), attnmask's own among them
    assert text.count("host profile, ") == 3 and text.count("| function | calls per call |") == 3, text
    assert "attention.py:" in text and "--profile 2`" in text, text


def test_device_check_fits_varlen_pair_from_saved_runs(tmp_path):
    def report(constants, ratios):
        rows = [{"scenario": f"s{i}", "ps_per_unit": {"cuda_varlen": r, "flex": 1.0}} for i, r in enumerate(ratios)]
        rows.append({"scenario": "no flex", "ps_per_unit": {"cuda_varlen": 9.0}})  # not a ratio: left out
        return {"date": "d", "timings": rows, **({"constants": constants} if constants else {})}

    files = []
    for n, (constants, ratios) in enumerate([({"VARLEN_PAIR": 0.5}, [2.0, 8.0]), (None, [2.0])]):
        files.append(tmp_path / f"run{n}.json")
        files[-1].write_text(json.dumps(report(constants, ratios)))
    done = run_benchmark("device_check.py", "--fit", *map(str, files), timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    # 0.5 * 2, 0.5 * 8 and 1.0 * 2 (no constants saved): geometric mean of 1, 4 and 2
    assert f"VARLEN_PAIR = 2 (now {cuda_costs.VARLEN_PAIR})" in done.stdout


# ---------------------------------------------------------------------------------------------------------------------
# FlexAttention at torch's recompile limit


def test_flex_refuses_a_new_shape_once_torch_holds_its_recompile_limit_of_variants(monkeypatch):
    """Past ``torch._dynamo.config.recompile_limit`` compiled variants torch would run a new shape uncompiled
    (materialising the scores): a signature flex has not run is refused then, one it ran is not, and ``"auto"``
    takes another CUDA backend."""
    monkeypatch.setattr(flex, "_RAN", set())
    call = cuda_call(am.sliding_window(1024), 16384)
    assert auto_pick(call) == "flex"
    monkeypatch.setattr(flex, "_compiled_variants", lambda: torch._dynamo.config.recompile_limit - 1)
    assert flex.flex_unsupported(call) is None
    monkeypatch.setattr(flex, "_compiled_variants", lambda: torch._dynamo.config.recompile_limit)
    reason = flex.flex_unsupported(call)
    assert reason is not None and "recompile limit" in reason and "materialising" in reason
    assert auto_pick(call) == "cuda_varlen"
    flex._RAN.add(flex._compile_signature(call))  # as flex_run records a signature it ran
    assert flex.flex_unsupported(call) is None
    other = cuda_call(am.sliding_window(1024), 8192)  # another shape: still refused
    assert "recompile limit" in flex.flex_unsupported(other)
    monkeypatch.setattr(flex, "_compiled_variants", lambda: None)  # a torch that does not say: not refused
    assert flex.flex_unsupported(other) is None


def test_flex_counts_torchs_compiled_variants_and_records_what_it_ran(monkeypatch):
    held = flex._compiled_variants()
    assert isinstance(held, int) and held >= 0
    monkeypatch.setattr(flex, "_RAN", set())
    monkeypatch.setattr(flex, "_flex", lambda: flex._eager_flex)  # no compile: the bookkeeping only
    q, k, v = (torch.randn(1, 2, 40, 16) for _ in range(3))
    call = make_call(q, k, v, am.causal())
    flex.flex_run(call)
    assert flex._RAN == {flex._compile_signature(call)}
    assert flex._compiled_variants() == held  # nothing compiled
