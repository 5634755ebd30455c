"""Attention dropout: on the probabilities after the softmax, scaled by 1/(1-p), unbiased, never across the mask.

The structural tests use the values ``v = I`` (one value per key, ``Dv = K``): the output row of a query is then its
probability row itself, after dropout, so each entry can be checked to be either 0 or the no-dropout probability
scaled by ``1 / (1 - p)``.
"""

import copy
import importlib

import pytest
import torch

import attnmask as am
from attnmask.backends import REGISTRY, varlen
from attnmask.errors import BackendError, InputError
from tests.naive import naive_attention

A = importlib.import_module("attnmask.attention")  # the module; `attnmask.attention` is the function
# The registered backends that run on the CPU here (the C kernel's build aside: test_native fails without it),
# and those of them that declare attention dropout.
CPU_BACKENDS = [b.name for b in REGISTRY if "cpu" in b.devices and b.auto]
DROPOUT_BACKENDS = [name for name in CPU_BACKENDS if A._BACKENDS[name].dropout]
P = 0.3


def doc_ids(*lens: int, padding: int = 0) -> torch.Tensor:
    """``(1, L)`` document ids of documents of ``lens`` tokens followed by ``padding`` positions in no document."""
    return torch.tensor([[i for i, n in enumerate(lens) for _ in range(n)] + [-1] * padding])


# (spec, Q, K): each one reaches a different path of varlen_attention (tiny documents go through batched matmuls,
# longer ones through SDPA with is_causal, a window shorter than its document by query blocks, a bidirectional
# document, and queries that are the last Q of K keys through a banded mask).
CASES = {
    "tiny documents and padding": (am.causal() & am.document(doc_ids=doc_ids(3, 5, 4, padding=2)), 14, 14),
    "long documents": (am.causal() & am.document(seq_lens=[40, 37]), 77, 77),
    "window inside a long document": (am.sliding_window(8) & am.document(seq_lens=[70, 10]), 80, 80),
    "bidirectional documents": (am.full() & am.document(seq_lens=[36, 5]), 41, 41),
    "queries after a cache": (am.causal() & am.document(seq_lens=[30, 50]), 20, 80),
}


def qkv(batch, q_len, kv_len, value_dim=8, heads=4, kv_heads=2, seed=0, requires_grad=False):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, q_len, 8, generator=gen)
    k = torch.randn(batch, kv_heads, kv_len, 8, generator=gen)
    v = torch.randn(batch, kv_heads, kv_len, value_dim, generator=gen)
    return [t.requires_grad_(requires_grad) for t in (q, k, v)]


def identity_values(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``(B, Hkv, K, K)`` values ``v = I``: attention's output is then its probability matrix ``(B, H, Q, K)``."""
    eye = torch.eye(k.shape[2], dtype=k.dtype)
    return eye.expand(k.shape[0], k.shape[1], -1, -1).contiguous()


def allowed(spec, q_len, kv_len) -> torch.Tensor:
    """``(1, 1, Q, K)`` bool, the spec's dense mask (tests only)."""
    return spec.to_dense(q_len, kv_len).unsqueeze(1)


# ----------------------------------------------------------------------------------------------------------------------
# dropout_p = 0 is the code without dropout


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_zero_dropout_is_bit_for_bit_the_call_without_it_and_draws_no_random_numbers(backend):
    spec, Q, K = CASES["tiny documents and padding"]
    q, k, v = qkv(2, Q, K)
    without = am.attention(q, k, v, spec, backend=backend)
    state = torch.get_rng_state()
    with_zero = am.attention(q, k, v, spec, backend=backend, dropout_p=0.0)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(with_zero, without)
    assert torch.equal(am.attention(q, k, v, spec, backend=backend, dropout_p=0), without)


# ----------------------------------------------------------------------------------------------------------------------
# What dropout does to the probabilities


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend", DROPOUT_BACKENDS)
def test_each_probability_is_dropped_or_scaled_by_one_over_one_minus_p(backend, case):
    spec, Q, K = CASES[case]
    q, k, _ = qkv(3, Q, K)
    v = identity_values(q, k)
    probs = am.attention(q, k, v, spec, backend=backend)
    torch.manual_seed(0)
    dropped = am.attention(q, k, v, spec, backend=backend, dropout_p=P)
    kept = dropped != 0
    torch.testing.assert_close(dropped[kept], probs[kept] / (1 - P), rtol=1e-5, atol=1e-7)
    assert not (kept & (probs == 0)).any(), "dropout gave weight to a key the mask denies"
    live = probs > 0
    n, drop_rate = int(live.sum()), float((live & ~kept).sum()) / float(live.sum())
    assert abs(drop_rate - P) < 5 * (P * (1 - P) / n) ** 0.5, (drop_rate, n)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend", DROPOUT_BACKENDS)
def test_outputs_averaged_over_many_draws_approach_the_output_without_dropout(backend, case):
    spec, Q, K = CASES[case]
    draws = 300  # independent dropout masks: one per row of a batch of copies of the same inputs
    q, k, v = (t.expand(draws, -1, -1, -1) for t in qkv(1, Q, K))
    exact = am.attention(q[:1], k[:1], v[:1], spec, backend=backend)
    torch.manual_seed(1)
    samples = am.attention(q, k, v, spec, backend=backend, dropout_p=0.5).double()
    mean, sem = samples.mean(0), samples.std(0) / draws**0.5
    assert (samples - exact.double()).abs().amax() > 0.5, "dropout changed nothing"
    z = (mean - exact[0].double()).abs() / (sem + 1e-9)
    assert float(z.amax()) < 6.0, f"the average is biased: largest z-score {float(z.amax()):.1f}"


@pytest.mark.parametrize("backend", DROPOUT_BACKENDS)
def test_a_seed_reproduces_the_dropout_of_a_backend(backend):
    spec, Q, K = CASES["long documents"]
    q, k, v = qkv(1, Q, K)
    torch.manual_seed(5)
    first = am.attention(q, k, v, spec, backend=backend, dropout_p=P)
    torch.manual_seed(5)
    again = am.attention(q, k, v, spec, backend=backend, dropout_p=P)
    other = am.attention(q, k, v, spec, backend=backend, dropout_p=P)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


@pytest.mark.parametrize("backend", DROPOUT_BACKENDS)
def test_gradients_flow_through_the_same_dropped_probabilities_as_the_output(backend):
    spec, Q, K = CASES["tiny documents and padding"]
    q, k, v = qkv(2, Q, K, requires_grad=True)
    torch.manual_seed(2)
    out = am.attention(q, k, v, spec, backend=backend, dropout_p=P)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    (grad_v,) = torch.autograd.grad((out * weight).sum(), v)
    torch.manual_seed(2)  # the same draw, read out with v = I: the dropped probabilities (B, H, Q, K)
    dropped = am.attention(q.detach(), k.detach(), identity_values(q, k), spec, backend=backend, dropout_p=P)
    torch.testing.assert_close(out, dropped @ v.detach().repeat_interleave(2, dim=1), rtol=1e-5, atol=1e-6)
    want = (dropped.transpose(-1, -2) @ weight).unflatten(1, (2, 2)).sum(2)  # two query heads share a key head
    torch.testing.assert_close(grad_v, want, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------------
# The mask still holds: empty rows, other documents


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dropout_p", [0.0, 0.5])
@pytest.mark.parametrize("backend", DROPOUT_BACKENDS)
def test_rows_with_no_key_are_exactly_zero_with_finite_gradients(backend, dropout_p, dtype):
    spec, Q, K = CASES["tiny documents and padding"]  # the last two queries are padding: in no document
    q, k, v = (t.to(dtype).requires_grad_() for t in qkv(2, Q, K))
    torch.manual_seed(4)
    out = am.attention(q, k, v, spec, backend=backend, dropout_p=dropout_p)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert torch.equal(out[:, :, -2:], torch.zeros_like(out[:, :, -2:]))
    grad_q, grad_k, grad_v = torch.autograd.grad(out.float().square().sum(), (q, k, v))
    assert all(torch.isfinite(g).all() for g in (grad_q, grad_k, grad_v))
    assert torch.equal(grad_q[:, :, -2:], torch.zeros_like(grad_q[:, :, -2:]))


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend", DROPOUT_BACKENDS)
def test_dropout_never_lets_a_query_read_another_documents_values(backend, case):
    spec, Q, K = CASES[case]
    q, k, v = qkv(2, Q, K)
    ids = spec.parts[1].doc_ids[0]  # every case is (rule) & document(...)
    queries_doc = ids[K - Q :]
    for d in queries_doc.unique().tolist():
        if d < 0:
            continue
        poisoned = v.masked_fill((ids != d)[:, None], 1e6)
        torch.manual_seed(d)
        out = am.attention(q, k, poisoned, spec, backend=backend, dropout_p=0.5)
        bound = v[:, :, ids == d].abs().amax() / (1 - 0.5)
        assert out[:, :, queries_doc == d].abs().amax() <= bound + 1e-4, f"document {d} read a poisoned value"


def test_reference_dropout_applies_to_a_bool_tensor_mask_too():
    q, k, _ = qkv(1, 6, 6)
    mask = torch.tensor([[1, 0, 1, 0, 1, 0]], dtype=torch.bool).expand(6, 6)  # keys 1, 3, 5 hidden from everyone
    v = identity_values(q, k)
    torch.manual_seed(6)
    dropped = am.attention(q, k, v, mask, backend="reference", dropout_p=0.5)
    exact = naive_attention(q, k, v, mask).float()
    assert torch.equal(dropped[..., 1::2], torch.zeros_like(dropped[..., 1::2]))
    kept = dropped != 0
    torch.testing.assert_close(dropped[kept], 2 * exact[kept])
    assert 0 < int(kept.sum()) < int((exact > 0).sum())


# ----------------------------------------------------------------------------------------------------------------------
# Backends without dropout


def call_with_dropout(spec, length, dropout_p):
    q = torch.empty(1, 8, length, 64)
    return A._prepare_call(q, q, q, spec, None, None, None, dropout_p)


@pytest.mark.parametrize("backend", [name for name in CPU_BACKENDS if name not in DROPOUT_BACKENDS])
def test_a_backend_without_dropout_named_explicitly_raises_a_backend_error(backend):
    spec, Q, K = CASES["long documents"]
    q, k, v = qkv(1, Q, K)
    with torch.no_grad(), pytest.raises(BackendError, match="dropout"):
        am.attention(q, k, v, spec, backend=backend, dropout_p=0.1)


@pytest.mark.parametrize(
    "spec, length, picked_without_dropout",
    [
        (am.causal() & am.document(seq_lens=[7, 5, 9, 3, 8, 6] * 60), 2280, {"native", "banded"}),
        (am.sliding_window(512) | am.prefix_lm(64), 8192, {"blocksparse"}),
    ],
    ids=["tiny documents", "window with prefix"],
)
def test_auto_never_picks_a_backend_without_dropout_for_a_dropout_call(spec, length, picked_without_dropout):
    assert A.choose_backend(call_with_dropout(spec, length, 0.0)).name in picked_without_dropout
    assert A.choose_backend(call_with_dropout(spec, length, 0.1)).name in DROPOUT_BACKENDS


def test_packed_documents_with_dropout_run_per_document_under_auto():
    spec = am.causal() & am.document(seq_lens=[700, 1300, 20, 2076])
    assert A.choose_backend(call_with_dropout(spec, 4096, 0.1)).name == "varlen"


@pytest.mark.parametrize("dropout_p", [-0.1, 1.0, 1.5, float("nan"), True, "0.1", torch.tensor(0.1), None])
def test_a_bad_dropout_p_raises_an_input_error_naming_it(dropout_p):
    q, k, v = qkv(1, 4, 4)
    with pytest.raises(InputError, match="dropout_p"):
        am.attention(q, k, v, am.causal(), dropout_p=dropout_p)


def test_varlen_attention_itself_checks_dropout_p():
    q, k, v = qkv(1, 6, 6)
    segments = [[0, 0, 6, 0, 6, 0]]
    with pytest.raises(InputError, match="dropout_p"):
        varlen.varlen_attention(q, k, v, segments, causal=True, dropout_p=1.0)


# ----------------------------------------------------------------------------------------------------------------------
# transformers: attention_dropout reaches attention() and packed rows stay per document


@pytest.fixture(scope="module")
def llama_with_dropout():
    """A tiny random-weight Llama (``tests.hf_models`` sizes) with ``attention_dropout=0.1``; tests that train it
    work on a copy."""
    transformers = pytest.importorskip("transformers")
    from attnmask.integrations import hf
    from tests.hf_models import COMMON

    hf.register()
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(attention_dropout=0.1, **COMMON)
    return transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="attnmask")


def packed_rows(max_length: int = 512):
    """Rows of ``max_length`` tokens packed with documents of 5 to 300 tokens (cut to fit) and some padding; rows of
    512 (three) are long enough that "auto" runs them per document rather than through SDPA with a dense mask."""
    from attnmask.integrations.hf import DataCollatorForCausalLM

    gen = torch.Generator().manual_seed(0)
    lens = (9, 130, 14, 200, 5, 220, 170, 300, 60, 250, 40, 33)
    docs = [torch.randint(1, 300, (n,), generator=gen).tolist() for n in lens]
    return DataCollatorForCausalLM(pad_id=0, packing=True, max_length=max_length)(docs)


@pytest.fixture
def no_dense_masks(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("an O(L^2) mask was built")

    monkeypatch.setattr(am.MaskSpec, "to_dense", refuse)


def test_hf_llama_trains_with_attention_dropout_on_packed_rows_without_a_dense_mask(
    monkeypatch, no_dense_masks, llama_with_dropout
):
    model = copy.deepcopy(llama_with_dropout).train()
    batch = packed_rows()
    assert batch["input_ids"].shape == (3, 512)
    seen = []
    run_varlen = varlen.varlen_attention

    def spy(*args, **kwargs):
        seen.append(kwargs["dropout_p"])
        return run_varlen(*args, **kwargs)

    monkeypatch.setattr(varlen, "varlen_attention", spy)
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = model(**batch).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    opt.step()
    assert seen == [0.1, 0.1]  # both layers ran per document, with dropout
    assert all(not torch.equal(a, b.detach()) for a, b in zip(before, model.parameters(), strict=True))


def test_hf_attention_dropout_acts_in_training_only(llama_with_dropout):
    model = llama_with_dropout
    batch = {k: v for k, v in packed_rows(64).items() if k != "labels"}

    def logits(seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        with torch.no_grad():
            return model(**batch).logits

    model.train()
    assert torch.equal(logits(0), logits(0))
    assert not torch.allclose(logits(0), logits(1))
    model.eval()
    assert torch.equal(logits(0), logits(1))
