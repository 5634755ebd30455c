"""Score modifiers carried with the call (softcap, sinks, ALiBi slopes): checked on entry, honoured by the backends
that declare them, refused by the others, equal to transformers' own eager Gemma2 (softcap) and gpt-oss (sinks)
attention, and kept out of the plan cache's key by value."""

from __future__ import annotations

import pytest
import torch

import attnmask as am
from attnmask.attention import _BACKENDS, _prepare_call, choose_backend
from attnmask.errors import BackendError, DeviceError, DTypeError, InputError, ShapeError
from attnmask.plancache import cached_signatures, call_plans
from tests.naive import naive_attention

H = 4
DECLARING = {name: b for name, b in _BACKENDS.items() if "cpu" in b.devices and b.score_mods and b.available() is None}


def qkv(B=1, Q=12, K=12, D=8, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    made = (torch.randn(B, H, Q, D, generator=g), *(torch.randn(B, 2, K, D, generator=g) for _ in range(2)))
    return tuple(t.requires_grad_(requires_grad) for t in made)


# ----------------------------------------------------------------------------------------------------------------------
# Checked on entry: typed errors naming the argument


@pytest.mark.parametrize(
    ("mods", "error", "match"),
    [
        ({"softcap": 0.0}, InputError, "^softcap: expected None or a finite number > 0"),
        ({"softcap": -1.0}, InputError, "^softcap: "),
        ({"softcap": float("inf")}, InputError, "^softcap: "),
        ({"softcap": True}, InputError, "^softcap: "),
        ({"sinks": torch.zeros(3)}, ShapeError, r"^sinks: expected shape \(4,\)"),
        ({"sinks": torch.zeros(1, 4)}, ShapeError, "^sinks: "),
        ({"sinks": torch.zeros(4, dtype=torch.long)}, DTypeError, "^sinks: expected a floating dtype"),
        ({"sinks": torch.tensor([0.0, float("nan"), 0.0, 0.0])}, InputError, "^sinks: expected finite values"),
        ({"sinks": [0.0] * 4}, InputError, "^sinks: expected None or a"),
        ({"alibi_slopes": torch.zeros(5)}, ShapeError, r"^alibi_slopes: expected shape \(4,\)"),
        ({"alibi_slopes": torch.tensor([1.0, float("inf"), 0.0, 0.0])}, InputError, "^alibi_slopes: expected finite"),
        ({"alibi_slopes": torch.ones(4, requires_grad=True)}, InputError, "^alibi_slopes: expected fixed slopes"),
        ({"sinks": torch.zeros(4, device="meta")}, DeviceError, "^sinks: expected q's device"),
    ],
)
def test_bad_modifiers_are_refused_by_name(mods, error, match):
    q, k, v = qkv()
    with pytest.raises(error, match=match):
        am.attention(q, k, v, am.causal(), **mods)


def test_backends_that_do_not_declare_a_modifier_refuse_it_and_auto_avoids_them():
    q, k, v = qkv()
    spec = am.causal() & am.document(seq_lens=[5, 7])
    for name, backend in _BACKENDS.items():
        call = _prepare_call(q, k, v, spec, None, None, None, softcap=2.0)
        if "softcap" not in backend.score_mods:
            assert "does not honour score modifiers softcap" in backend.not_supported_reasons(call)
            with pytest.raises(BackendError, match="softcap"):
                am.attention(q, k, v, spec, backend=name, softcap=2.0)
    assert choose_backend(_prepare_call(q, k, v, spec, None, None, None, softcap=2.0)).name in DECLARING


# ----------------------------------------------------------------------------------------------------------------------
# Semantics every declaring backend shares


@pytest.mark.parametrize("name", list(DECLARING))
def test_with_sinks_a_row_with_no_key_gives_zero_and_zero_gradients(name):
    q, k, v = qkv(B=2, Q=8, K=8, requires_grad=True)
    pad = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1], [1] * 8])
    sinks = torch.randn(H, requires_grad=True)
    out = am.attention(q, k, v, am.causal() & am.key_padding(pad), backend=name, sinks=sinks)
    empty = (pad == 0)[:, None, :, None].expand(out.shape)
    assert torch.equal(out[empty], torch.zeros_like(out[empty]))
    for g in torch.autograd.grad((out * empty).sum(), (q, k, v, sinks)):
        assert torch.equal(g, torch.zeros_like(g))


@pytest.mark.parametrize("name", [n for n in DECLARING if "alibi" in DECLARING[n].score_mods])
def test_alibi_is_relative_so_documents_at_any_offset_match_alone(name):
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625])
    q, k, v = qkv(Q=12, K=12)
    packed = am.attention(q, k, v, am.causal() & am.document(seq_lens=[5, 7]), backend=name, alibi_slopes=slopes)
    second = am.attention(q[:, :, 5:], k[:, :, 5:], v[:, :, 5:], am.causal(), backend=name, alibi_slopes=slopes)
    torch.testing.assert_close(packed[:, :, 5:], second, atol=1e-6, rtol=1e-5)


def test_alibi_follows_explicit_positions():
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625])
    q, k, v = qkv(Q=3, K=10)
    q_pos = torch.tensor([2, 5, 9])
    got = am.attention(q, k, v, am.causal(), q_positions=q_pos, alibi_slopes=slopes, backend="reference")
    allowed = q_pos[:, None] >= torch.arange(10)[None]
    want = naive_attention(q, k, v, allowed, alibi_slopes=slopes, q_positions=q_pos)
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=1e-5)


def test_sinks_take_weight_from_the_keys():
    q, k, v = qkv()
    v = torch.ones_like(v)  # the output is then the weight the keys get
    out = am.attention(q, k, v, am.causal(), sinks=torch.tensor([-50.0, 0.0, 1.0, 50.0]), backend="reference")
    assert torch.allclose(out[0, 0], torch.ones(12, 8)) and torch.allclose(out[0, 3], torch.zeros(12, 8), atol=1e-6)
    assert bool((out[0, 1:3] < 1).all() and (out[0, 1:3] > 0).all())


# ----------------------------------------------------------------------------------------------------------------------
# Against transformers' own eager attention


def _module(heads: int, kv_heads: int, head_dim: int, sinks=None):
    m = torch.nn.Module()
    m.num_key_value_groups, m.head_dim, m.training = heads // kv_heads, head_dim, False
    if sinks is not None:
        m.sinks = sinks
    return m


def _additive(allowed: torch.Tensor) -> torch.Tensor:
    return torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)


@pytest.mark.parametrize("name", [n for n in DECLARING if "softcap" in DECLARING[n].score_mods])
def test_softcap_equals_gemma2_eager(name):
    gemma2 = pytest.importorskip("transformers.models.gemma2.modeling_gemma2")
    q, k, v = qkv(B=2, Q=10, K=10, seed=3)
    q = q * 4  # scores of several units: the cap bites
    spec = am.causal() & am.sliding_window(4)
    allowed = spec.to_dense(10, 10)[:, None]
    want, _ = gemma2.eager_attention_forward(
        _module(H, 2, 8), q, k, v, _additive(allowed), scaling=8**-0.5, softcap=1.5
    )
    got = am.attention(q, k, v, spec, softcap=1.5, backend=name).transpose(1, 2)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    plain = am.attention(q, k, v, spec, backend="reference").transpose(1, 2)
    assert (plain - want).abs().max() > 1e-2  # the cap matters here


@pytest.mark.parametrize("name", [n for n in DECLARING if "sinks" in DECLARING[n].score_mods])
def test_sinks_equal_gpt_oss_eager_with_their_gradient(name):
    gpt_oss = pytest.importorskip("transformers.models.gpt_oss.modeling_gpt_oss")
    q, k, v = qkv(B=2, Q=10, K=10, seed=4, requires_grad=True)
    spec = am.causal() & am.document(seq_lens=[4, 6])
    allowed = spec.to_dense(10, 10)[:, None]
    sinks = torch.nn.Parameter(torch.tensor([-1.0, 0.5, 2.0, 0.0]))
    want, _ = gpt_oss.eager_attention_forward(_module(H, 2, 8, sinks), q, k, v, _additive(allowed), scaling=8**-0.5)
    got = am.attention(q, k, v, spec, sinks=sinks, backend=name).transpose(1, 2)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    weight = torch.randn(want.shape, generator=torch.Generator().manual_seed(1))
    for g, w in zip(
        torch.autograd.grad((got * weight).sum(), (q, k, v, sinks)),
        torch.autograd.grad((want * weight).sum(), (q, k, v, sinks)),
        strict=True,
    ):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)


# ----------------------------------------------------------------------------------------------------------------------
# The plan cache keys modifier tensors by presence, never by value


def test_new_sinks_per_layer_reuse_the_specs_plans_and_never_a_plain_calls_backend():
    q, k, v = qkv(Q=40, K=40)
    spec = am.causal() & am.document(seq_lens=[10, 30])
    choose_backend(_prepare_call(q, k, v, spec, None, None, None))
    layers = [torch.randn(H) for _ in range(4)]
    chosen = {choose_backend(_prepare_call(q, k, v, spec, None, None, None, sinks=s)).name for s in layers}
    assert cached_signatures(spec) == 2  # one plain, one with sinks: not one per layer
    assert len(chosen) == 1 and "sinks" in _BACKENDS[chosen.pop()].score_mods


def test_calls_with_and_without_a_modifier_never_share_a_cache_entry():
    q, k, v = qkv(Q=40, K=40)
    spec = am.causal() & am.document(seq_lens=[10, 30])
    plain = call_plans(_prepare_call(q, k, v, spec, None, None, None))
    assert call_plans(_prepare_call(q, k, v, spec, None, None, None)) is plain
    for mods in ({"sinks": torch.zeros(H)}, {"alibi_slopes": torch.ones(H)}, {"softcap": 3.0}):
        assert call_plans(_prepare_call(q, k, v, spec, None, None, None, **mods)) is not plain, mods
    sinks = torch.zeros(H, requires_grad=True)  # a gradient through the sinks: a backend with a backward
    assert call_plans(_prepare_call(q, k, v, spec, None, None, None, sinks=sinks)) is not call_plans(
        _prepare_call(q, k, v, spec, None, None, None, sinks=sinks.detach())
    )


def test_explain_shows_which_backends_honour_the_modifiers():
    q, k, v = qkv()
    text = str(am.explain(q, k, v, am.causal(), sinks=torch.zeros(H), alibi_slopes=torch.ones(H)))
    assert "does not honour score modifiers alibi, sinks" in text


def test_the_native_kernels_own_entry_checks_the_modifiers_too():
    from attnmask.backends.native import native_available, segment_attention

    if native_available() is not None:
        pytest.skip(native_available())
    q, k, v = qkv()
    segs = torch.tensor([[0, 0, 12, 0, 12, 0]])
    with pytest.raises(ShapeError, match=r"^sinks: expected shape \(4,\)"):
        segment_attention(q, k, v, segs, causal=True, sinks=torch.zeros(2))  # the kernel would read past its end
    with pytest.raises(InputError, match="^softcap: "):
        segment_attention(q, k, v, segs, causal=True, softcap=0.0)
    got = segment_attention(q, k, v, segs, causal=True, softcap=2.0, sinks=torch.ones(H))
    want = naive_attention(q, k, v, torch.ones(12, 12, dtype=torch.bool).tril(), softcap=2.0, sinks=torch.ones(H))
    torch.testing.assert_close(got.double(), want, atol=2e-6, rtol=1e-5)
