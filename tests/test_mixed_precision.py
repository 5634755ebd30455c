"""Mixed precision: under autocast every backend gets what SDPA gets and returns SDPA's dtype."""

import pytest
import torch
import torch.nn.functional as F

import attnmask as am
from attnmask.errors import DTypeError
from tests.naive import naive_attention

LOW = [torch.bfloat16, torch.float16]
TOL = {torch.bfloat16: 3e-2, torch.float16: 3e-3}


def _mixed_inputs(low):
    """What a model hands over under autocast: q and k left in float32 by rotary embeddings, v in the low dtype."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 12, 16, generator=g)
    k = torch.randn(2, 2, 12, 16, generator=g)
    v = torch.randn(2, 2, 12, 16, generator=g).to(low)
    return q, k, v


def _supporting_backends(q, k, v, spec):
    """Every backend ``"auto"`` may pick on this CPU that accepts the call once autocast's casts are applied."""
    seen = am.explain(*(t.to(v.dtype) for t in (q, k, v)), spec)
    return [
        name
        for name, cost, eligible in zip(seen.backends, seen.costs, seen.auto_eligible, strict=True)
        if cost is not None and eligible
    ]


SPECS = {
    "causal": lambda: am.causal(),
    "packed": lambda: am.causal() & am.document(seq_lens=[[5, 7], [3, 9]]),
    "padded": lambda: am.causal() & am.key_padding(torch.tensor([[1] * 12, [0] * 4 + [1] * 8]).bool()),
}


@pytest.mark.parametrize("low", LOW, ids=str)
@pytest.mark.parametrize("spec_name", sorted(SPECS))
def test_every_backend_under_cpu_autocast_returns_what_sdpa_returns(low, spec_name):
    q, k, v = _mixed_inputs(low)
    spec = SPECS[spec_name]()
    dense = spec.to_dense(12).unsqueeze(1)
    with torch.autocast("cpu", dtype=low):
        want = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=dense)
    oracle = naive_attention(q.to(low).double(), k.to(low).double(), v.double(), dense)
    backends = _supporting_backends(q, k, v, spec)
    assert {"reference", "sdpa"} <= set(backends)
    for name in [*backends, "auto"]:
        with torch.autocast("cpu", dtype=low):
            got = am.attention(q, k, v, spec, backend=name)
        assert got.dtype == want.dtype == low, name
        torch.testing.assert_close(got.double(), oracle, atol=TOL[low], rtol=TOL[low], msg=name)


def test_backends_compute_in_float32_inside_even_though_autocast_would_lower_their_matmuls():
    # The reference computes in float32 on bfloat16 inputs; left under autocast its matmuls would drop to bfloat16.
    q, k, v = _mixed_inputs(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = am.attention(q, k, v, am.causal(), backend="reference")
    want = am.attention(q.bfloat16(), k.bfloat16(), v, am.causal(), backend="reference")
    assert torch.equal(got, want)


def test_float64_inputs_are_not_cast_by_autocast():
    q, k, v = (torch.randn(1, 2, 5, 8, dtype=torch.float64) for _ in range(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = am.attention(q, k, v, am.causal())
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, naive_attention(q, k, v, am.causal().to_dense(5).unsqueeze(1)))


def test_gradients_flow_back_to_the_float32_inputs_under_autocast():
    q, k, v = (t.detach().requires_grad_() for t in _mixed_inputs(torch.bfloat16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = am.attention(q, k, v, am.causal())
    out.float().sum().backward()
    assert q.grad.dtype == k.grad.dtype == torch.float32 and v.grad.dtype == torch.bfloat16
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


def test_mixed_dtypes_outside_autocast_are_refused_as_sdpa_refuses_them():
    q, k, v = _mixed_inputs(torch.bfloat16)
    with pytest.raises(DTypeError, match="v: expected q's dtype"):
        am.attention(q, k, v, am.causal())


def test_explain_under_autocast_sees_the_dtype_the_backend_gets():
    q, k, v = _mixed_inputs(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        seen = am.explain(q, k, v, am.causal())
    assert seen.picked is not None
