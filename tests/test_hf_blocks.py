"""Gemma3 image tokens (``token_type_ids`` -> transformers' ``block_sequence_ids``) through attnmask, against the same
model on transformers' own sdpa mask: tokens of one image attend to each other both ways, the rest causally."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from attnmask import masks as M  # noqa: E402
from attnmask.integrations import hf  # noqa: E402
from tests.hf_models import same_weights  # noqa: E402

IMAGE, BOI, EOI = 299, 297, 298


def model(impl: str = "attnmask", sliding: bool = True) -> torch.nn.Module:
    """A tiny Gemma3 with a one-layer SigLIP tower: 4 tokens per image, layer 0 sliding (window 4) unless
    ``sliding=False``, layer 1 full."""

    def build(impl: str) -> torch.nn.Module:
        text = transformers.Gemma3TextConfig(
            hidden_size=32,
            intermediate_size=64,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            num_hidden_layers=2,
            vocab_size=300,
            sliding_window=4,
            layer_types=["sliding_attention" if sliding else "full_attention", "full_attention"],
        )
        vision = transformers.SiglipVisionConfig(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=28,
            patch_size=14,
        )
        config = transformers.Gemma3Config(
            text_config=text,
            vision_config=vision,
            mm_tokens_per_image=4,
            image_token_index=IMAGE,
            boi_token_index=BOI,
            eoi_token_index=EOI,
        )
        return transformers.Gemma3ForConditionalGeneration._from_config(config, attn_implementation=impl)

    return same_weights(("gemma3", sliding), impl, build)


def with_image(before: list[int], after: list[int]) -> list[int]:
    return before + [BOI] + [IMAGE] * 4 + [EOI] + after


def run(impl: str, ids: torch.Tensor, sliding: bool = True, **kw) -> torch.Tensor:
    n_images = int((ids == IMAGE).sum()) // 4
    pixels = torch.randn(n_images, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        m = model(impl, sliding)
        return m(input_ids=ids, pixel_values=pixels, token_type_ids=(ids == IMAGE).long(), **kw).logits


def test_image_blocks_change_the_logits_and_the_full_layer_builds_no_per_element_mask(monkeypatch):
    ids = torch.tensor([with_image([5, 6], [7, 8, 9])])
    without = model("sdpa")(input_ids=ids).logits
    specs = []
    original = hf.attention
    monkeypatch.setattr(
        hf, "attention", lambda q, k, v, spec, **kw: specs.append(spec) or original(q, k, v, spec, **kw)
    )
    logits = run("attnmask", ids)
    torch.testing.assert_close(logits, run("sdpa", ids), atol=1e-4, rtol=0)
    assert (logits[0, :2] - without[0, :2]).abs().max() < 1e-5  # text before the image: unchanged
    assert not torch.allclose(run("sdpa", ids), without, atol=1e-2)
    blocks = [s for s in specs if any(isinstance(p, M.BidirectionalBlocks) for p in s.walk())]
    assert blocks and all(s.is_structural for s in blocks)


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_batch_with_images_equals_transformers_sdpa(side):
    rows = [with_image([5, 6, 7], [8, 9, 10, 11]), with_image([12], [13]), [14, 15, 16, 17]]
    length = max(map(len, rows))
    ids, mask = [], []
    for r in rows:
        pad = [0] * (length - len(r))
        ids.append(r + pad if side == "right" else pad + r)
        mask.append([1] * len(r) + pad if side == "right" else pad + [1] * len(r))
    ids, mask = torch.tensor(ids), torch.tensor(mask)
    got, want = run("attnmask", ids, attention_mask=mask), run("sdpa", ids, attention_mask=mask)
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], atol=1e-4, rtol=0)


@pytest.mark.parametrize("sliding", [False, True], ids=["full layers", "sliding layer"])
def test_packed_row_with_images_equals_each_document_alone(sliding):
    """On packed rows transformers' sliding-layer predicate looks the image blocks up at the remapped in-document
    positions (its or-overlay sits inside the packed-sequence remap), so its own sdpa is off there (the control below);
    attnmask evaluates the wrapped predicate on columns within each document: each document gets its mask alone."""
    docs = [with_image([5, 6], [7]), with_image([8], [9, 10, 11])]
    ids = torch.tensor([[t for d in docs for t in d]])
    position_ids = torch.tensor([[p for d in docs for p in range(len(d))]])
    got = run("attnmask", ids, sliding=sliding, position_ids=position_ids, use_cache=False)
    want = run("sdpa", ids, sliding=sliding, position_ids=position_ids, use_cache=False)
    if sliding:
        assert (got - want).abs().max() > 1e-2
    else:
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    images = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    start = 0
    for i, d in enumerate(docs):
        one = torch.tensor([d])
        with torch.no_grad():
            m = model("eager", sliding=sliding)
            alone = m(input_ids=one, pixel_values=images[i : i + 1], token_type_ids=(one == IMAGE).long()).logits
        torch.testing.assert_close(got[0, start : start + len(d)], alone[0], atol=1e-4, rtol=0)
        start += len(d)


def test_left_padded_generation_with_images_equals_transformers_sdpa():
    rows = [with_image([5, 6, 7], [8]), with_image([12], [13])]
    length = max(map(len, rows))
    ids = torch.tensor([[0] * (length - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (length - len(r)) + [1] * len(r) for r in rows])
    pixels = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(2))
    kw = dict(
        attention_mask=mask,
        pixel_values=pixels,
        token_type_ids=(ids == IMAGE).long(),
        max_new_tokens=5,
        do_sample=False,
        pad_token_id=0,
    )
    assert model().generate(ids, **kw).tolist() == model("sdpa").generate(ids, **kw).tolist()
