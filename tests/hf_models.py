"""Tiny random-weight transformers models built from configs, shared by the Hugging Face tests (nothing downloads)."""

from __future__ import annotations

import torch
import transformers

from attnmask.integrations import hf

VOCAB = 300
WINDOW = 4  # smaller than the sequences below, so the sliding-window layers matter
COMMON = dict(
    hidden_size=32,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=64,
    num_hidden_layers=2,
    vocab_size=VOCAB,
)


def _config(family: str):
    if family == "llama":
        return transformers.LlamaConfig(**COMMON)
    if family == "mistral":
        return transformers.MistralConfig(sliding_window=WINDOW, **COMMON)
    if family == "qwen2":  # layer 0 full attention, layer 1 sliding window
        return transformers.Qwen2Config(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1, **COMMON)
    raise AssertionError(family)


FAMILIES = ["llama", "mistral", "qwen2"]
_MODELS: dict[tuple[str, str], torch.nn.Module] = {}


def model(family: str, impl: str = "attnmask") -> torch.nn.Module:
    """The family's tiny model (same weights for every implementation), float32, eval mode."""
    if (family, impl) not in _MODELS:
        hf.register()
        torch.manual_seed(0)
        m = transformers.AutoModelForCausalLM.from_config(_config(family), attn_implementation=impl).eval()
        if impl != "attnmask":
            m.load_state_dict(model(family).state_dict())
        _MODELS[family, impl] = m
    return _MODELS[family, impl]


_SHARED: dict[tuple, torch.nn.Module] = {}


def same_weights(key: tuple, impl: str, build) -> torch.nn.Module:
    """``build(impl)`` (a model with ``attn_implementation=impl``) in eval mode, holding the weights of the attnmask
    model of the same ``key`` (built first, seed 0), so that implementations are compared on one set of weights."""
    if (key, impl) not in _SHARED:
        hf.register()
        torch.manual_seed(0)
        m = build(impl).eval()
        if impl != "attnmask":
            m.load_state_dict(same_weights(key, "attnmask", build).state_dict())
        _SHARED[key, impl] = m
    return _SHARED[key, impl]


def alone(family: str, ids: list[int]) -> torch.Tensor:
    """Logits ``(len(ids), VOCAB)`` of one sequence run by itself through transformers' eager attention."""
    with torch.no_grad():
        return model(family, "eager")(torch.tensor([ids])).logits[0]


def tokens(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (n,), generator=g).tolist()


def packed_batch(rows: list[list[list[int]]], length: int) -> dict[str, torch.Tensor]:
    """Rows of documents packed end to end, right-padded with 0 to ``length``; positions restart per document."""
    ids, pos, mask = [], [], []
    for docs in rows:
        r_ids = [t for d in docs for t in d]
        r_pos = [p for d in docs for p in range(len(d))]
        pad = length - len(r_ids)
        ids.append(r_ids + [0] * pad)
        pos.append(r_pos + [0] * pad)
        mask.append([1] * len(r_ids) + [0] * pad)
    return {"input_ids": torch.tensor(ids), "position_ids": torch.tensor(pos), "attention_mask": torch.tensor(mask)}


def padded_batch(seqs: list[list[int]], side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequences padded with 0 on ``side`` ("right" or "left") to the longest: ``(input_ids, attention_mask)``."""
    length = max(map(len, seqs))
    ids, mask = [], []
    for s in seqs:
        pad = length - len(s)
        ids.append(s + [0] * pad if side == "right" else [0] * pad + s)
        mask.append([1] * len(s) + [0] * pad if side == "right" else [0] * pad + [1] * len(s))
    return torch.tensor(ids), torch.tensor(mask)
