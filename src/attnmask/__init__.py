"""attnmask: variable-length sequences into transformers, correctly and fast.

Padding, packing, attention masks (as composable specs), position ids, labels, and attention that honours the mask on
every backend. See the README for a tour.
"""

from attnmask.attention import Explanation, attention, explain
from attnmask.batch import Batch, Collator, pad
from attnmask.chat import ChatEncoding, ChatStats, encode_chat
from attnmask.errors import (
    AttnmaskError,
    BackendError,
    ChatTemplateError,
    DeviceError,
    DTypeError,
    InputError,
    LabelError,
    NoTargetError,
    ShapeError,
    SpecError,
)
from attnmask.expr import ExprError, parse_spec
from attnmask.generation import decode_spec, greedy_generate, left_pad_prompts, position_ids_from_mask
from attnmask.loss import count_target_tokens, masked_cross_entropy
from attnmask.lowering import BlockLayout, VarlenArgs, block_layout, varlen_args
from attnmask.masks import (
    MaskSpec,
    bidirectional_blocks,
    causal,
    chunked,
    custom,
    document,
    document_prefix_lm,
    from_mask_mod,
    full,
    key_filter,
    key_padding,
    local_window,
    prefix_lm,
    sliding_window,
)
from attnmask.pack import PackingCollator, PackPlan, PackStats, collate_rows, pack, pack_stream
from attnmask.tokenizers import ByteTokenizer, get_tokenizer
from attnmask.tuning import autotune
from attnmask.viz import draw_mask

__version__ = "0.1.0"

__all__ = [
    "AttnmaskError",
    "BackendError",
    "Batch",
    "ByteTokenizer",
    "ChatEncoding",
    "ChatStats",
    "ChatTemplateError",
    "Collator",
    "BlockLayout",
    "DTypeError",
    "Explanation",
    "DeviceError",
    "ExprError",
    "InputError",
    "LabelError",
    "MaskSpec",
    "NoTargetError",
    "PackPlan",
    "PackStats",
    "PackingCollator",
    "ShapeError",
    "SpecError",
    "attention",
    "autotune",
    "VarlenArgs",
    "block_layout",
    "causal",
    "chunked",
    "bidirectional_blocks",
    "key_filter",
    "document_prefix_lm",
    "from_mask_mod",
    "count_target_tokens",
    "custom",
    "decode_spec",
    "document",
    "draw_mask",
    "encode_chat",
    "explain",
    "full",
    "get_tokenizer",
    "greedy_generate",
    "key_padding",
    "left_pad_prompts",
    "local_window",
    "masked_cross_entropy",
    "pack",
    "pack_stream",
    "collate_rows",
    "pad",
    "parse_spec",
    "position_ids_from_mask",
    "prefix_lm",
    "sliding_window",
    "varlen_args",
]
