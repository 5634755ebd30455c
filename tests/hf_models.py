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
