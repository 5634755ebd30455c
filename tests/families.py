"""The transformers family sweep: every causal, seq2seq and masked LM family of the installed transformers, as a tiny
random-weight float32 model, run under ``attn_implementation="attnmask"`` and compared with each sequence run alone
through the same weights under ``"eager"``. A helper module (not a test file): tests/test_families.py asserts on it,
``python -m tests.families --table`` prints the README's table.

Families are found from the library, not listed by hand: every model type of transformers'
``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``, ``MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES`` and
``MODEL_FOR_MASKED_LM_MAPPING_NAMES``. A family goes through transformers' ``AttentionInterface`` (so that
``attn_implementation="attnmask"`` can change it at all) when the modeling module of its model class, or of one of its
sub-configs' families (multimodal wrappers delegate to a text model), looks its attention function up in
``ALL_ATTENTION_FUNCTIONS``. That is the lookup every ``AttentionInterface`` dispatch goes through; a module without it
keeps its own attention classes, which no registered function reaches.

Every scenario's outcome is one of ``exact`` (logits within ``ATOL`` of each sequence alone at every real position,
generated tokens equal), ``refused`` (an ``AttnmaskError`` subclass was raised), ``WRONG`` (a silent difference),
``CRASH`` (any other exception under attnmask) or ``n/a`` (the eager reference itself fails or transformers refuses
the setting; for padded batches and generation also when eager on the very same batch differs from each sequence
alone, so that the model itself, not its attention, makes the difference, and attnmask equals eager there).
A packed row that differs while attnmask never ran (neither its attention function nor its mask function was called:
the model keeps its own attention, or has none) is ``not reached``, provided `hf.check_packed_inputs` warns that the
model cannot keep the documents apart; otherwise it is ``WRONG`` too. attnmask runs under its own name here
(``IMPLEMENTATION``), registered with call counters around the very functions `hf.register` installs.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import functools
import importlib
import inspect
import io
import logging
import re
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

ATOL = 1e-4
LENGTHS = (5, 9, 3)  # the sequences of every scenario: different lengths, the longest in the middle
NEW_TOKENS = 3  # greedy generation
DECODER_LENGTHS = {"shorter": 4, "equal": 9, "longer": 12}  # decoder inputs against the padded encoder (9)
VOCAB = 160
FIRST_TOKEN = 8  # token ids FIRST_TOKEN..VOCAB-1: clear of every special id (pad 0, bos 1, eos 2, ...)
PAD = 0

SCENARIOS = {
    "causal": ("right-padded", "left-padded", "packed", "packed+cache", "generate"),
    "seq2seq": ("decoder shorter", "decoder equal", "decoder longer", "generate"),
    "encoder": ("right-padded", "left-padded", "packed"),
}
MAPPINGS = {
    "causal": "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
    "seq2seq": "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES",
    "encoder": "MODEL_FOR_MASKED_LM_MAPPING_NAMES",
}


# ----------------------------------------------------------------------------------------------------------------------
# Discovery


@dataclass(frozen=True)
class Family:
    """One (model type, kind) of transformers' auto mappings: ``kind`` is causal, seq2seq or encoder (masked LM)."""

    model_type: str
    kind: str
    class_name: str

    @property
    def id(self) -> str:
        """The test id: the model type, with the kind when the model type is in several mappings."""
        return self.model_type if len(kinds_of(self.model_type)) == 1 else f"{self.model_type} ({self.kind})"


@functools.cache
def _mappings() -> dict[str, dict[str, str]]:
    from transformers.models.auto import modeling_auto

    return {kind: dict(getattr(modeling_auto, name)) for kind, name in MAPPINGS.items()}


def kinds_of(model_type: str) -> list[str]:
    return [f.kind for f in all_families() if f.model_type == model_type]


@functools.cache
def all_families() -> tuple[Family, ...]:
    """Every (model type, kind) of the three mappings, sorted by model type."""
    found, seen = [], set()
    for kind, mapping in _mappings().items():
        for model_type, name in mapping.items():
            if (model_type, name) not in seen:  # bart's masked LM is its seq2seq model: swept once, as seq2seq
                seen.add((model_type, name))
                found.append(Family(model_type, kind, name))
    return tuple(sorted(found, key=lambda f: (f.model_type, list(MAPPINGS).index(f.kind))))


def model_class(family: Family) -> type:
    import transformers

    return getattr(transformers, family.class_name)


def _modeling_source(config_cls: type) -> str:
    """The source of the modeling module next to a configuration class's module ('' when there is none)."""
    name = config_cls.__module__.replace(".configuration_", ".modeling_")
    try:
        return inspect.getsource(importlib.import_module(name))
    except (ImportError, OSError, TypeError):
        return ""


def _sub_config_classes(config_cls: type) -> list[type]:
    """The classes of a config class's sub-configs: those of its default instance (``AutoConfig`` entries resolve to
    a family only there), else the declared ones."""
    try:
        config = config_cls()
        found = [getattr(config, key) for key in getattr(config, "sub_configs", {})]
        return [type(c) for c in found if c is not None]
    except Exception:  # defaults that do not validate (gemma4_assistant): the declared classes
        declared = getattr(config_cls, "sub_configs", {}).values()
        return [c for c in declared if isinstance(c, type) and "auto" not in c.__module__]


def uses_attention_interface(family: Family) -> bool:
    """Whether the family's attention goes through ``ALL_ATTENTION_FUNCTIONS`` (see the module docstring): in the
    model class's own module or in that of any sub-config's family (followed recursively)."""
    cls = model_class(family)
    if "ALL_ATTENTION_FUNCTIONS" in inspect.getsource(sys.modules[cls.__module__]):
        return True
    seen, todo = set(), [cls.config_class]
    while todo:
        config_cls = todo.pop()
        if config_cls in seen:
            continue
        seen.add(config_cls)
        if "ALL_ATTENTION_FUNCTIONS" in _modeling_source(config_cls):
            return True
        todo += _sub_config_classes(config_cls)
    return False


# ----------------------------------------------------------------------------------------------------------------------
# A tiny config, shrunk generically from the family's defaults

HEADS, KV_HEADS, HEAD_DIM = 4, 2, 8
HIDDEN = HEADS * HEAD_DIM
# attribute -> tiny value, set wherever a config (or sub-config) has the attribute
SIZES = {
    **dict.fromkeys(
        ["hidden_size", "d_model", "n_embd", "embed_dim", "dim", "n_embed", "word_embed_proj_dim", "text_hidden_size"],
        HIDDEN,
    ),
    **dict.fromkeys(
        ["num_attention_heads", "n_head", "num_heads", "encoder_attention_heads", "decoder_attention_heads", "n_heads"],
        HEADS,
    ),
    **dict.fromkeys(["head_dim", "d_kv", "kv_channels", "attention_head_dim", "attention_head_size"], HEAD_DIM),
    **dict.fromkeys(
        [
            "intermediate_size",
            "ffn_dim",
            "encoder_ffn_dim",
            "decoder_ffn_dim",
            "d_ff",
            "n_inner",
            "moe_intermediate_size",
            "shared_expert_intermediate_size",
            "intermediate_size_mlp",
            "expert_intermediate_size",
            "ffn_hidden_size",
        ],
        2 * HIDDEN,
    ),
    **dict.fromkeys(["num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts"], 4),
    **dict.fromkeys(["num_experts_per_tok", "moe_topk", "top_k", "num_selected_experts"], 2),
    **dict.fromkeys(["n_group", "topk_group", "n_shared_experts", "num_shared_experts"], 1),
    **dict.fromkeys(["sliding_window", "attention_window", "attention_chunk_size", "local_attention"], 4),
    **dict.fromkeys(["q_lora_rank", "kv_lora_rank"], 16),
    # state-space and linear-attention layers of hybrid models
    **dict.fromkeys(["mamba_d_ssm", "mamba_expand_dim"], 2 * HIDDEN),
    **dict.fromkeys(["mamba_n_heads", "mamba_num_heads"], 8),
    **dict.fromkeys(["mamba_d_state", "ssm_state_size", "state_size", "mamba_d_head", "mamba_head_dim"], 8),
    **dict.fromkeys(["mamba_chunk_size", "linear_head_dim"], 8),
    **dict.fromkeys(["moe_shared_expert_intermediate_size", "shared_intermediate_size"], 2 * HIDDEN),
    "encoder_hash_byte_group_vocab": 64,
    # other towers and tables that would dominate the model (audio convolutions, entity and glyph vocabularies, ...)
    **dict.fromkeys(["src_vocab_size", "tgt_vocab_size", "decoder_vocab_size"], VOCAB),
    **dict.fromkeys(["entity_vocab_size", "shape_vocab_size", "pronunciation_vocab_size"], 64),
    **dict.fromkeys(["entity_emb_size", "shape_embed_dim", "pronunciation_embed_dim", "num_latents"], 16),
    **dict.fromkeys(["d_latents", "lru_width"], HIDDEN),
    **dict.fromkeys(["dim_ff"], 2 * HIDDEN),
    **dict.fromkeys(["dim_head"], HEAD_DIM),
    "rotary_dim": HEAD_DIM // 2,  # partial rotary (CodeGen, GPT-J): a part of a head
    "mamba_headdim": 8,
    "num_filters": 2,
    **dict.fromkeys(["embedding_size", "intra_bottleneck_size", "true_hidden_size"], HIDDEN),
    **dict.fromkeys(["qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim"], HEAD_DIM),
    "vocab_size": VOCAB,
    "vocab_size_per_layer_input": VOCAB,  # Gemma 3n / 4 per-layer embeddings
    "hidden_size_per_layer_input": HEAD_DIM,
    "initializer_range": 0.2,  # scores far from 0, so that a wrong mask shows in the logits
}
# Sizes set even where the default is None ("derived from the others"): their derivation would use the full sizes
DERIVED = {"head_dim", "vocab_size", "num_experts_per_tok", "n_routed_experts"}
KV_HEAD_NAMES = ["num_key_value_heads", "num_kv_heads", "n_kv_heads", "multi_query_group_num"]
LAYER_NAMES = ["num_hidden_layers", "n_layer", "num_layers", "encoder_layers", "decoder_layers", "num_decoder_layers"]
MAX_POSITIONS = ["max_position_embeddings", "n_positions", "max_seq_len", "n_ctx", "max_sequence_length"]
SPECIAL_IDS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "decoder_start_token_id": 1, "sep_token_id": 2}
SPECIAL_IDS |= {"cls_token_id": 1, "mask_token_id": 3, "unk_token_id": 3}


def _per_layer_names(config: Any, n: int) -> list[str]:
    """The config's attributes that list one entry per layer (``layer_types``, ``no_rope_layers``, hybrid patterns as
    strings such as ``"M-M*"``, ...): lists and tuples of exactly ``n`` entries, and strings of ``n`` characters from
    an alphabet of at most 4 (``"gelu_new"`` of an 8-layer T5 is a name, not a pattern)."""
    found = []
    for name, value in vars(config).items():
        if name.startswith("_") or name in SPECIAL_IDS or n < 2:
            continue
        if isinstance(value, (list, tuple)) and len(value) == n:
            found.append(name)
        elif isinstance(value, str) and len(value) == n and len(set(value)) <= 4:
            found.append(name)
    return found


def _kept_layers(config: Any, n: int, names: list[str]) -> list[int]:
    """The first layer of every distinct combination of per-layer entries (so every layer type survives), at least
    two layers."""
    keep, seen = [], set()
    for i in range(n):
        key = tuple(repr(getattr(config, name)[i]) for name in names)
        if key not in seen:
            seen.add(key)
            keep.append(i)
    for i in range(n):
        if len(keep) >= 2:
            break
        if i not in keep:
            keep.append(i)
    return sorted(keep)


def _get(config: Any, name: str) -> Any:
    """The attribute, or None where the config has none or refuses to give one global value (per-layer configs)."""
    try:
        return getattr(config, name, None)
    except Exception:
        return None


def _put(config: Any, name: str, value: Any) -> None:
    """Set the attribute unless it is a read-only property (derived from the others, which are shrunk instead)."""
    try:
        setattr(config, name, value)
    except AttributeError:
        pass


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _shrink(config: Any) -> None:
    """Shrink one config in place (sub-configs are shrunk by the caller)."""
    for name, value in SIZES.items():
        current = _get(config, name)
        if _is_number(current) or (current is None and name in DERIVED and name in vars(config)):
            _put(config, name, value)
    for name in KV_HEAD_NAMES:  # multi-head latent attention (kv_lora_rank) expands keys to every head
        current = _get(config, name)
        if isinstance(current, int) or (current is None and name in vars(config)):
            _put(config, name, HEADS if hasattr(config, "kv_lora_rank") else KV_HEADS)
    for name in MAX_POSITIONS:
        if isinstance(_get(config, name), int) and _get(config, name) > 512:
            _put(config, name, 512)
    for name, value in SPECIAL_IDS.items():
        if isinstance(_get(config, name), (int, list)):
            _put(config, name, value)
    layers = [name for name in LAYER_NAMES if isinstance(_get(config, name), int)]
    n = max((_get(config, name) for name in layers), default=0)
    if n:
        per_layer = _per_layer_names(config, n)
        keep = _kept_layers(config, n, per_layer)
        for name in per_layer:
            value = _get(config, name)
            kept = [value[i] for i in keep]
            _put(config, name, "".join(kept) if isinstance(value, str) else type(value)(kept))
        for name in layers:
            _put(config, name, min(_get(config, name), len(keep)) if _get(config, name) < n else len(keep))


def _configs(config: Any) -> list[Any]:
    """The config and its sub-configs, recursively."""
    found, todo = [], [config]
    while todo:
        c = todo.pop()
        if any(c is f for f in found):
            continue
        found.append(c)
        todo += [getattr(c, key) for key in getattr(c, "sub_configs", {}) if getattr(c, key, None) is not None]
    return found


# Per-family overrides, applied after the generic shrink, each with the reason the generic shrink fails.
OVERRIDES: dict[str, Callable[[Any], None]] = {
    # attention layers placed by period / offset or indices: the first two layers would hold none
    "jamba": lambda c: _set(c, attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1),
    "bamba": lambda c: _set(c, attn_layer_indices=[1]),
    # block types repeat a 3-layer cycle (recurrent, recurrent, attention): keep one cycle
    "recurrent_gemma": lambda c: _set(c, num_hidden_layers=3),
    # layer types are derived at init from the default 32-layer layout: give the two kept layers' types
    "lfm2_moe": lambda c: _set(c, layer_types=["conv", "full_attention"], num_dense_layers=1),
    # the default layout has no attention layer at all
    "granitemoehybrid": lambda c: _set(c, layer_types=["linear_attention", "full_attention"]),
    # state-space heads must tile the expanded width (heads x head_dim = expand x hidden)
    "mamba2": lambda c: _set(c, num_heads=8, n_groups=1),
    # RWKV's time-mixing width
    "rwkv": lambda c: _set(c, attention_hidden_size=HIDDEN),
    # no special ids by default, and the model compares input_ids with pad_token_id
    "esm": lambda c: _set(c, pad_token_id=PAD, mask_token_id=3),
}


def _set(config: Any, **values: Any) -> None:
    for name, value in values.items():
        setattr(config, name, value)


def tiny_config(family: Family) -> Any:
    """The family's config class defaults, shrunk (``SIZES``, 2 layers or one per distinct layer type)."""
    config = model_class(family).config_class()
    for c in _configs(config):
        _shrink(c)
    if family.model_type in OVERRIDES:
        OVERRIDES[family.model_type](config)
    return config


@contextlib.contextmanager
def _quiet():
    """transformers' warnings and log lines while building many models (not the sweep's results)."""
    tf_logger = logging.getLogger("transformers")
    level = tf_logger.level
    tf_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with contextlib.redirect_stdout(io.StringIO()):
                yield
    finally:
        tf_logger.setLevel(level)


def build(family: Family, impl: str = "eager") -> torch.nn.Module:
    """The family's tiny model, float32, seed 0, eval mode."""
    config = tiny_config(family)
    torch.manual_seed(0)
    with _quiet():
        model = model_class(family)._from_config(config, attn_implementation=impl, dtype=torch.float32)
    return model.eval()


# ----------------------------------------------------------------------------------------------------------------------
# Scenarios


@dataclass(frozen=True)
class Outcome:
    """One scenario's result: ``status`` (exact, refused, WRONG, CRASH, n/a) and what was seen."""

    status: str
    detail: str = ""

    def __str__(self) -> str:
        return self.status if not self.detail else f"{self.status} ({self.detail})"


@dataclass(frozen=True)
class Result:
    """A family's sweep: ``not_built`` (why no tiny model exists) or one ``Outcome`` per scenario."""

    family: Family
    outcomes: dict[str, Outcome] = dataclasses.field(default_factory=dict)
    kind: str = ""  # the scenarios run: the family's kind, but causal for a seq2seq mapping's decoder-only model
    through: bool = True  # whether its attention goes through AttentionInterface
    not_built: str = ""
    seconds: float = 0.0


class _Unsupported(Exception):
    """The eager reference fails, or transformers refuses the setting: the scenario is n/a."""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:160] if text else ''}"


def _accepted(model: torch.nn.Module, inputs: dict) -> dict:
    """The inputs the model's forward takes (all of them when it takes ``**kwargs``), as the ``Trainer`` passes
    only the columns of the forward's signature."""
    params = inspect.signature(model.forward).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return inputs
    return {k: v for k, v in inputs.items() if k in params}


def _logits(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**_accepted(model, inputs)).logits


def _tokens(n: int, seed: int, vocab: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(FIRST_TOKEN, vocab, (n,), generator=g).tolist()


def _padded(seqs: list[list[int]], side: str) -> dict:
    """``input_ids`` and ``attention_mask`` padded with PAD on ``side``; left padding also gets ``position_ids``."""
    length = max(map(len, seqs))
    ids, mask = [], []
    for s in seqs:
        pad = [PAD] * (length - len(s))
        ids.append(s + pad if side == "right" else pad + s)
        ones = [1] * len(s)
        mask.append(ones + [0] * len(pad) if side == "right" else [0] * len(pad) + ones)
    out = {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask)}
    if side == "left":
        out["position_ids"] = (out["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    return out


def _real(logits: torch.Tensor, mask: torch.Tensor, row: int) -> torch.Tensor:
    return logits[row][mask[row].bool()]


@dataclass
class _Case:
    """What a family's scenarios share: the two models (same weights), the sequences and their eager references."""

    ours: torch.nn.Module
    eager: torch.nn.Module
    seqs: list[list[int]]
    vocab: int
    alone: dict = dataclasses.field(default_factory=dict)

    def reference(self, key: Any, compute: Callable[[], Any]) -> Any:
        if key not in self.alone:
            try:
                self.alone[key] = compute()
            except Exception as exc:  # the reference itself fails: the scenario is n/a
                raise _Unsupported(f"eager reference: {_first_line(exc)}") from exc
        return self.alone[key]


def _compare(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    return max(float((g - w).abs().max()) if g.numel() else 0.0 for g, w in zip(got, want, strict=True))


IMPLEMENTATION = "attnmask-sweep"
_CALLS: collections.Counter = collections.Counter()  # calls of attnmask's attention and mask functions


@functools.cache
def implementation() -> str:
    """attnmask's attention and mask functions registered as ``IMPLEMENTATION``, each call counted in ``_CALLS``."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    from attnmask.integrations import hf

    name = hf.register(IMPLEMENTATION)

    def attention(*args, **kwargs):
        _CALLS["attention"] += 1
        return hf.attention_forward(*args, **kwargs)

    def mask(*args, **kwargs):
        _CALLS["mask"] += 1
        return hf.build_mask_info(*args, **kwargs)

    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, mask)
    return name


def _judge(
    case: _Case,
    run: Callable[[torch.nn.Module], Any],
    reference: Callable[[], Any],
    diff,
    fallback: bool,
    warned: Callable[[], bool] | None = None,
):
    """Run one scenario under attnmask and classify it (see the module docstring).

    ``run(model)`` -> the scenario's output; ``reference()`` -> each sequence alone (eager); ``diff(got, want)`` ->
    (max abs difference, description or ''). ``fallback``: a difference that eager on the same batch shows too is
    the model's own (n/a), when attnmask equals eager there. ``warned()``: whether attnmask warns of the batch (packed
    rows): then a difference made while attnmask never ran is ``not reached``."""
    from attnmask.errors import AttnmaskError

    try:
        want = reference()
    except _Unsupported as exc:
        return Outcome("n/a", str(exc))
    calls = sum(_CALLS.values())
    try:
        got = run(case.ours)
    except AttnmaskError as exc:
        return Outcome("refused", _first_line(exc))
    except Exception as exc:
        try:
            run(case.eager)
        except Exception as eager_exc:
            if type(eager_exc) is type(exc):
                return Outcome("n/a", f"eager fails the same way: {_first_line(eager_exc)}")
        return Outcome("CRASH", _first_line(exc))
    reached = sum(_CALLS.values()) > calls
    worst, what = diff(got, want)
    if worst <= ATOL and not what:
        return Outcome("exact")
    if not reached and warned is not None and warned():
        return Outcome("not reached", "attnmask never runs in this model; hf.check_packed_inputs warns")
    if fallback:
        try:
            same_batch = run(case.eager)
        except Exception as exc:
            return Outcome("WRONG", f"{what or f'max diff {worst:.3g}'}; eager on the batch fails: {_first_line(exc)}")
        eager_worst, eager_what = diff(same_batch, want)
        ours_vs_eager, mismatch = diff(got, same_batch)
        if (eager_worst > ATOL or eager_what) and ours_vs_eager <= ATOL and not mismatch:
            return Outcome("n/a", f"the model itself: eager on the same batch differs from alone ({eager_worst:.3g})")
    return Outcome("WRONG", what or f"max abs diff {worst:.3g}")


def _logit_diff(got: list[torch.Tensor], want: list[torch.Tensor]) -> tuple[float, str]:
    if any(g.shape != w.shape for g, w in zip(got, want, strict=True)):
        return float("inf"), f"shapes {[tuple(g.shape) for g in got]} vs {[tuple(w.shape) for w in want]}"
    worst = _compare(got, want)
    return worst, "" if worst == worst else "NaN in the logits"


def _padded_scenario(case: _Case, side: str) -> Outcome:
    batch = _padded(case.seqs, side)

    def run(model):
        logits = _logits(model, batch)
        return [_real(logits, batch["attention_mask"], r) for r in range(len(case.seqs))]

    def reference():
        return [
            case.reference(("alone", i), lambda s=s: _logits(case.eager, _one(s))[0]) for i, s in enumerate(case.seqs)
        ]

    return _judge(case, run, reference, _logit_diff, fallback=True)


def _one(seq: list[int]) -> dict:
    return {"input_ids": torch.tensor([seq])}


def _packed_scenario(case: _Case, use_cache: bool) -> Outcome:
    from attnmask.integrations import hf

    total = sum(map(len, case.seqs))
    batch = hf.DataCollatorForCausalLM(PAD, packing=True, max_length=total)(case.seqs)
    batch.pop("labels")
    batch["use_cache"] = use_cache
    # the collator orders documents its own way (best fit decreasing): find them from the restarting positions
    starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist() + [total]
    order = [case.seqs.index(batch["input_ids"][0, a:b].tolist()) for a, b in zip(starts, starts[1:], strict=False)]

    def run(model):
        logits = _logits(model, batch)[0]
        return [logits[a:b] for a, b in zip(starts, starts[1:], strict=False)]

    def reference():
        alone = [
            case.reference(("alone", i), lambda s=s: _logits(case.eager, _one(s))[0]) for i, s in enumerate(case.seqs)
        ]
        return [alone[i] for i in order]

    def warned() -> bool:
        log = logging.getLogger("attnmask")
        level, log.level = log.level, logging.CRITICAL  # the warning is what is asked for, not to be printed
        try:
            return not hf.check_packed_inputs(case.ours, batch)
        finally:
            log.setLevel(level)

    return _judge(case, run, reference, _logit_diff, fallback=False, warned=warned)


def _generate(model: torch.nn.Module, inputs: dict) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per row: greedy tokens ``(NEW_TOKENS,)`` and their scores ``(NEW_TOKENS, V)``."""
    config = model.config
    start = getattr(config, "decoder_start_token_id", None)
    extra = {"decoder_start_token_id": 1 if start is None else start} if config.is_encoder_decoder else {}
    with torch.no_grad():
        out = model.generate(
            **inputs,
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
            pad_token_id=PAD,
            output_scores=True,
            return_dict_in_generate=True,
            **extra,
        )
    new, scores = out.sequences[:, -NEW_TOKENS:], torch.stack(out.scores, dim=1)
    return [(new[r], scores[r]) for r in range(new.shape[0])]


def _generation_diff(got, want) -> tuple[float, str]:
    rows = [r for r, ((t, _), (u, _)) in enumerate(zip(got, want, strict=True)) if t.tolist() != u.tolist()]
    if rows:
        return float("inf"), f"generated tokens differ in rows {rows} of {len(want)}"
    return max(float((s - u).nan_to_num(0, 0, 0).abs().max()) for (_, s), (_, u) in zip(got, want, strict=True)), ""


def _generate_scenario(case: _Case, encoder_decoder: bool) -> Outcome:
    batch = _padded(case.seqs, "right" if encoder_decoder else "left")
    batch.pop("position_ids", None)

    def reference():
        return [
            case.reference(("generate", i), lambda s=s: _generate(case.eager, _one(s))[0])
            for i, s in enumerate(case.seqs)
        ]

    return _judge(case, lambda model: _generate(model, batch), reference, _generation_diff, fallback=True)


def _seq2seq_scenario(case: _Case, decoder_length: int) -> Outcome:
    batch = _padded(case.seqs, "right")
    decoder = [_tokens(decoder_length, 100 + i, case.vocab) for i in range(len(case.seqs))]
    batch["decoder_input_ids"] = torch.tensor(decoder)

    def run(model):
        return list(_logits(model, batch))

    def reference():
        return [
            case.reference(
                ("pair", i, decoder_length),
                lambda s=s, d=d: _logits(
                    case.eager, {"input_ids": torch.tensor([s]), "decoder_input_ids": torch.tensor([d])}
                )[0],
            )
            for i, (s, d) in enumerate(zip(case.seqs, decoder, strict=True))
        ]

    return _judge(case, run, reference, _logit_diff, fallback=True)


def _scenario(case: _Case, kind: str, name: str) -> Outcome:
    if name in ("right-padded", "left-padded"):
        return _padded_scenario(case, name.split("-")[0])
    if name in ("packed", "packed+cache"):
        return _packed_scenario(case, use_cache=name == "packed+cache")
    if name == "generate":
        return _generate_scenario(case, encoder_decoder=kind == "seq2seq")
    return _seq2seq_scenario(case, DECODER_LENGTHS[name.split()[1]])


def _vocab(model: torch.nn.Module) -> int:
    embeddings = model.get_input_embeddings()
    return min(VOCAB, getattr(embeddings, "num_embeddings", VOCAB))


def _smoke(family: Family, case: _Case) -> None:
    inputs = _one(case.seqs[0])
    if case.eager.config.is_encoder_decoder:
        inputs["decoder_input_ids"] = torch.tensor([case.seqs[2]])
    _logits(case.eager, inputs)


def sweep_family(family: Family, through: bool = True, impl: str | None = None) -> Result:
    """Build the family's tiny model twice (attnmask, eager; same weights) and run every scenario of its kind, on one
    intra-op thread (tiny models gain nothing from more; on shared cores they lose). ``impl``: the attention
    implementation under test instead of attnmask's (the classifier's own tests give broken ones)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _sweep_family(family, through, impl)
    finally:
        torch.set_num_threads(threads)


def _sweep_family(family: Family, through: bool, impl: str | None) -> Result:

    start = time.perf_counter()
    name = implementation() if impl is None else impl
    try:
        eager = build(family, "eager")
    except Exception as exc:
        return Result(family, not_built=_first_line(exc), seconds=time.perf_counter() - start, through=through)
    try:
        ours = build(family, name)
        ours.load_state_dict(eager.state_dict())
    except Exception as exc:
        outcome = Outcome("n/a", f"transformers refuses attn_implementation={name!r}: {_first_line(exc)}")
        outcomes = dict.fromkeys(SCENARIOS[family.kind], outcome)
        return Result(family, outcomes, family.kind, seconds=time.perf_counter() - start, through=through)
    vocab = _vocab(eager)
    case = _Case(ours, eager, [_tokens(n, i, vocab) for i, n in enumerate(LENGTHS)], vocab)
    try:  # the tiny model must run one plain sequence under eager, else its config is what fails
        with _quiet():
            _smoke(family, case)
    except Exception as exc:
        return Result(
            family, not_built=f"eager forward: {_first_line(exc)}", seconds=time.perf_counter() - start, through=through
        )
    kind = family.kind
    if kind == "seq2seq" and not getattr(eager.config, "is_encoder_decoder", False):
        kind = "causal"  # audio-to-text models of the seq2seq mapping whose text model is a decoder-only LM
    outcomes = {}
    with _quiet():
        for scenario in SCENARIOS[kind]:
            outcomes[scenario] = _scenario(case, kind, scenario)
    return Result(family, outcomes, kind, seconds=time.perf_counter() - start, through=through)


@functools.cache
def attention_families() -> tuple[tuple[Family, ...], tuple[Family, ...]]:
    """(families whose attention goes through ``AttentionInterface``, the others)."""
    through, others = [], []
    with _quiet():
        for family in all_families():
            (through if uses_attention_interface(family) else others).append(family)
    return tuple(through), tuple(others)


# ----------------------------------------------------------------------------------------------------------------------
# The README's table

SEVERITY = ("WRONG", "CRASH", "not reached", "refused", "n/a", "exact")
COLUMNS = {  # table column -> the scenarios it sums up, per kind
    "padded": {
        "causal": ("right-padded", "left-padded"),
        "encoder": ("right-padded", "left-padded"),
        "seq2seq": ("decoder shorter", "decoder equal", "decoder longer"),
    },
    "packed": {"causal": ("packed", "packed+cache"), "encoder": ("packed",), "seq2seq": ()},
    "generation": {"causal": ("generate",), "encoder": (), "seq2seq": ("generate",)},
}


def family_status(result: Result) -> str:
    """``not built``, or the worst scenario status (``exact`` when every scenario that applies is exact)."""
    if result.not_built:
        return "not built"
    statuses = {o.status for o in result.outcomes.values()}
    return min(statuses - {"n/a"} or statuses, key=SEVERITY.index)


def _cell(outcomes: list[Outcome]) -> str:
    if not outcomes:
        return "—"
    return " / ".join(sorted({o.status for o in outcomes}, key=SEVERITY.index))


def _note(outcome: Outcome) -> str:
    """The table's note: no measured numbers (they would tie the README to one machine's rounding)."""
    if outcome.status == "WRONG":
        return "silently differs from each sequence alone"
    return re.sub(r" \([-+.e0-9inf]+\)$", "", outcome.detail).replace("|", "/")[:110]


def _notes(result: Result) -> str:
    if result.not_built:
        return f"not built: {result.not_built.replace('|', '/')[:110]}"
    by_note: dict[str, list[str]] = {}
    for scenario, outcome in result.outcomes.items():
        if outcome.status != "exact":
            by_note.setdefault(f"{outcome.status}: {_note(outcome)}", []).append(scenario)
    if len(by_note) == 1 and len(next(iter(by_note.values()))) == len(result.outcomes):
        return next(iter(by_note))
    return "; ".join(f"{', '.join(scenarios)}: {note}" for note, scenarios in by_note.items())


def failure(result: Result, width: int = 90) -> str:
    """The family's WRONG and CRASH scenarios in a few words, for ``KNOWN_FAILURES`` ('' when there are none)."""
    by_what: dict[str, list[str]] = {}
    for scenario, outcome in result.outcomes.items():
        if outcome.status == "WRONG":
            numbers = re.findall(r"diff ([-+.e0-9inf]+)", outcome.detail)
            what = f"WRONG ({float(numbers[0]):.2g})" if numbers else "WRONG (generated tokens differ)"
        elif outcome.status == "CRASH":
            what = f"CRASH ({outcome.detail})"
        else:
            continue
        by_what.setdefault(what, []).append(scenario)
    if len(by_what) == 1 and len(next(iter(by_what.values()))) == len(result.outcomes):
        text = f"every scenario: {next(iter(by_what))}"
    else:
        text = "; ".join(f"{', '.join(scenarios)}: {what}" for what, scenarios in by_what.items())
    return text if len(text) <= width else text[: width - 3] + "..."


def counts(results: list[Result]) -> dict[str, int]:
    """Families per status (`family_status`)."""
    found = {status: 0 for status in (*SEVERITY, "not built")}
    for result in results:
        found[family_status(result)] += 1
    return found


def table(results: list[Result]) -> str:
    """The README's "Model families" table: the counts lines, then one row per family."""
    import transformers

    through = counts([r for r in results if r.through])
    outside = counts([r for r in results if not r.through])
    n_outside = sum(outside.values())
    lines = [
        f"transformers {transformers.__version__}: {len(results)} causal, seq2seq and masked-LM families. "
        f"Through `AttentionInterface` ({len(results) - n_outside}): **{through['exact']} exact, "
        f"{through['refused']} refused, {through['not built']} not built** by a generic tiny config, "
        f"{through['WRONG']} WRONG, {through['CRASH']} CRASH, {through['n/a']} n/a. **{n_outside} not through "
        f"`AttentionInterface`** (attnmask's mask function still reaches them): {outside['exact']} exact, "
        f"{outside['refused']} refused, {outside['not reached']} not reached (attnmask never runs in them; "
        f"`hf.check_packed_inputs` warns of their packed rows), {outside['not built']} not built, "
        f"{outside['WRONG']} WRONG, {outside['CRASH']} CRASH, {outside['n/a']} n/a.",
        "",
        "| family | kind | padded | packed | generation | notes |",
        "|---|---|---|---|---|---|",
    ]
    for result in results:
        if result.not_built:
            cells = ["—"] * 3
        else:
            cells = [_cell([result.outcomes[s] for s in COLUMNS[c][result.kind]]) for c in COLUMNS]
        kind = result.kind or result.family.kind
        kind = kind if result.through else f"{kind}, no AttentionInterface"
        lines.append(f"| {' | '.join([result.family.id, kind, *cells, _notes(result)])} |")
    return "\n".join(lines)


def sweep(families=None, *, progress: Callable[[Result], None] | None = None) -> list[Result]:
    """Every family (or ``families``) through attnmask, in the order of `all_families`."""
    through = set(attention_families()[0])
    results = []
    for family in all_families() if families is None else families:
        results.append(sweep_family(family, through=family in through))
        if progress is not None:
            progress(results[-1])
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.families", description=__doc__.splitlines()[0])
    parser.add_argument("--table", action="store_true", help="print the README's markdown table")
    parser.add_argument("--known", action="store_true", help="print KNOWN_FAILURES entries for tests/test_families.py")
    parser.add_argument("--only", nargs="*", help="model types to sweep")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    families = [f for f in all_families() if not args.only or f.model_type in args.only]

    def progress(result: Result) -> None:  # one line per family; on stderr when the table or list is asked for
        status = (
            result.not_built
            and f"not built: {result.not_built}"
            or "; ".join(f"{k}: {v}" for k, v in result.outcomes.items())
        )
        out = sys.stderr if args.table or args.known else sys.stdout
        print(f"{result.family.id:32s} {result.seconds:6.2f}s  {status}", file=out, flush=True)

    start = time.perf_counter()
    results = sweep(families, progress=progress)
    if args.table:
        print(table(results))
    if args.known:
        print("\n".join(f'    "{r.family.id}": "{failure(r, 109 - len(r.family.id))}",' for r in results if failure(r)))
    print(f"{len(results)} families in {time.perf_counter() - start:.1f}s", file=sys.stderr)


if __name__ == "__main__":
    main()
