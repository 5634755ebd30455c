"""Chat templates of the major families, written here from their public formats, and a tokenizer built locally.

Each template is written once with ``[[G]]`` / ``[[E]]`` where an assistant turn's trained part starts and ends;
`template(name)` drops them (the stock form, no generation tags) and `template(name, tags=True)` turns them into
``{% generation %}`` / ``{% endgeneration %}`` (the reference transformers' ``return_assistant_tokens_mask`` reads).
The tokenizer (`chat_tokenizer`) is a small byte-level BPE trained in-process on a few sentences, with every family's
control tokens added, so whitespace, words and punctuation are separate pre-tokens (no token straddles a template
boundary) and any unicode text round-trips. Nothing downloads.
"""

from __future__ import annotations

import functools

SPECIAL = [
    "<pad>",
    "<s>",
    "</s>",
    "<bos>",
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|begin_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<start_of_turn>",
    "<end_of_turn>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|end|>",
]
# Added but not special (as in Qwen's tokenizers): text a turn may contain; [INST] so no token straddles it.
PLAIN_ADDED = ["[INST]", "[/INST]", "<think>", "</think>"]
PLAIN_ADDED += ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]

# bos / eos of each family's tokenizer.
FAMILY_TOKENS = {
    "chatml": ("<|endoftext|>", "<|im_end|>"),
    "qwen3": ("<|endoftext|>", "<|im_end|>"),
    "tools": ("<|endoftext|>", "<|im_end|>"),
    "llama3": ("<|begin_of_text|>", "<|eot_id|>"),
    "llama2": ("<s>", "</s>"),
    "mistral": ("<s>", "</s>"),
    "gemma": ("<bos>", "<eos>"),
    "phi3": ("<s>", "<|endoftext|>"),
    "zephyr": ("<s>", "</s>"),
}

_CHATML = r"""
{%- if messages[0].role != 'system' %}{{- '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{%- endif %}
{%- for message in messages %}
{%- if message.role == 'assistant' %}
{{- '<|im_start|>assistant\n' }}[[G]]{{- message.content + '<|im_end|>' }}[[E]]{{- '\n' }}
{%- else %}
{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}
"""

_QWEN3 = r"""
{%- set ns = namespace(last_query=-1) %}
{%- for message in messages %}
{%- if message.role == 'user' %}{%- set ns.last_query = loop.index0 %}{%- endif %}
{%- endfor %}
{%- for message in messages %}
{%- if message.role == 'assistant' %}
{%- set content = message.content %}
{%- set reasoning = '' %}
{%- if '</think>' in content %}
{%- set reasoning = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
{%- set content = content.split('</think>')[-1].lstrip('\n') %}
{%- endif %}
{{- '<|im_start|>assistant\n' }}
{%- if loop.index0 > ns.last_query and (loop.last or reasoning) %}
{%- if reasoning %}[[G]]{{- '<think>\n' + reasoning.strip('\n') + '\n</think>\n\n' }}
{{- content.lstrip('\n') + '<|im_end|>' }}[[E]]
{%- else %}{{- '<think>\n\n</think>\n\n' }}[[G]]{{- content.lstrip('\n') + '<|im_end|>' }}[[E]]{%- endif %}
{%- else %}[[G]]{{- content + '<|im_end|>' }}[[E]]{%- endif %}
{{- '\n' }}
{%- else %}
{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}
{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\n\n</think>\n\n' }}{%- endif %}
{%- endif %}
"""

_TOOLS = r"""
{%- if tools %}
{{- '<|im_start|>system\n' }}
{%- if messages[0].role == 'system' %}{{- messages[0].content + '\n\n' }}{%- endif %}
{{- '# Tools\n\nYou may call one or more functions.\n<tools>' }}
{%- for tool in tools %}{{- '\n' + (tool | tojson) }}{%- endfor %}
{{- '\n</tools><|im_end|>\n' }}
{%- elif messages[0].role == 'system' %}
{{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
{%- endif %}
{%- for message in messages %}
{%- if message.role == 'system' %}
{%- elif message.role == 'assistant' %}
{{- '<|im_start|>assistant\n' }}[[G]]
{%- if message.content %}{{- message.content }}{%- endif %}
{%- for call in message.tool_calls or [] %}
{%- if not loop.first or message.content %}{{- '\n' }}{%- endif %}
{{- '<tool_call>\n{"name": "' + call.function.name + '", "arguments": ' + (call.function.arguments | tojson) }}
{{- '}\n</tool_call>' }}
{%- endfor %}
{{- '<|im_end|>' }}[[E]]{{- '\n' }}
{%- elif message.role == 'tool' %}
{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}
{{- '\n<tool_response>\n' + message.content + '\n</tool_response>' }}
{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\n' }}{%- endif %}
{%- else %}
{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}
"""

_LLAMA3 = r"""
{{- bos_token }}
{%- if messages[0].role == 'system' %}{%- set system = messages[0].content | trim %}{%- set messages = messages[1:] %}
{%- else %}{%- set system = '' %}{%- endif %}
{{- '<|start_header_id|>system<|end_header_id|>\n\n' }}
{{- 'Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n' }}
{{- system + '<|eot_id|>' }}
{%- for message in messages %}
{%- if message.role == 'assistant' %}
{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}[[G]]{{- message.content | trim + '<|eot_id|>' }}[[E]]
{%- else %}
{{- '<|start_header_id|>' + message.role + '<|end_header_id|>\n\n' + message.content | trim + '<|eot_id|>' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}
"""

_LLAMA2 = r"""
{%- if messages[0].role == 'system' %}{%- set system = messages[0].content %}{%- set messages = messages[1:] %}
{%- else %}{%- set system = none %}{%- endif %}
{%- for message in messages %}
{%- if message.role == 'user' %}
{{- bos_token }}
{%- if loop.first and system is not none %}
{{- '[INST] <<SYS>>\n' + system + '\n<</SYS>>\n\n' + message.content.strip() + ' [/INST]' }}
{%- else %}{{- '[INST] ' + message.content.strip() + ' [/INST]' }}{%- endif %}
{%- elif message.role == 'assistant' %}
{{- ' ' }}[[G]]{{- message.content.strip() + ' ' + eos_token }}[[E]]
{%- endif %}
{%- endfor %}
"""

_MISTRAL = r"""
{{- bos_token }}
{%- if messages[0].role == 'system' %}{%- set system = messages[0].content + '\n\n' %}{%- set messages = messages[1:] %}
{%- else %}{%- set system = '' %}{%- endif %}
{%- for message in messages %}
{%- if message.role == 'user' %}
{{- '[INST] ' + (system if loop.first else '') + message.content + '[/INST]' }}
{%- elif message.role == 'assistant' %}
[[G]]{{- message.content + eos_token }}[[E]]
{%- endif %}
{%- endfor %}
"""

_GEMMA = r"""
{{- bos_token }}
{%- if messages[0].role == 'system' %}{%- set prefix = messages[0].content | trim + '\n\n' %}
{%- set turns = messages[1:] %}
{%- else %}{%- set prefix = '' %}{%- set turns = messages %}{%- endif %}
{%- for message in turns %}
{%- set role = 'model' if message.role == 'assistant' else message.role %}
{{- '<start_of_turn>' + role + '\n' + (prefix if loop.first else '') }}
{%- if message.role == 'assistant' %}[[G]]{{- message.content | trim + '<end_of_turn>' }}[[E]]{{- '\n' }}
{%- else %}{{- message.content | trim + '<end_of_turn>\n' }}{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<start_of_turn>model\n' }}{%- endif %}
"""

_PHI3 = r"""
{%- for message in messages %}
{%- if message.role == 'assistant' %}
{{- '<|assistant|>\n' }}[[G]]{{- message.content + '<|end|>' }}[[E]]{{- '\n' }}
{%- else %}{{- '<|' + message.role + '|>\n' + message.content + '<|end|>\n' }}{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|assistant|>\n' }}{%- else %}{{- eos_token }}{%- endif %}
"""

_ZEPHYR = r"""
{%- for message in messages %}
{%- if message.role == 'assistant' %}
{{- '<|assistant|>\n' }}[[G]]{{- message.content + eos_token }}[[E]]{{- '\n' }}
{%- else %}{{- '<|' + message.role + '|>\n' + message.content + eos_token + '\n' }}{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|assistant|>\n' }}{%- endif %}
"""

_TEMPLATES = {
    "chatml": _CHATML,
    "qwen3": _QWEN3,
    "tools": _TOOLS,
    "llama3": _LLAMA3,
    "llama2": _LLAMA2,
    "mistral": _MISTRAL,
    "gemma": _GEMMA,
    "phi3": _PHI3,
    "zephyr": _ZEPHYR,
}
FAMILIES = tuple(_TEMPLATES)

_CORPUS = [
    "The quick brown fox jumps over the lazy dog. What is two plus two? Two plus two is four.",
    "You are a helpful assistant. Hello! How can I help you today? Please tell me about the weather.",
    "system user assistant tool function name arguments result answer question reasoning think",
    "Les élèves étudient le français. 日本語のテキスト。 Emoji 🙂 and numbers 0123456789.",
]


def template(name: str, tags: bool = False) -> str:
    """The family's template, stock (no generation tags) or with ``{% generation %}`` tags around what is trained."""
    text = _TEMPLATES[name].strip()
    text = text.replace("[[G]]", "{% generation %}" if tags else "")
    return text.replace("[[E]]", "{% endgeneration %}" if tags else "")


@functools.lru_cache(maxsize=1)
def _trained_backend_json() -> str:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"\s|[A-Za-z]+|[0-9]|[^\sA-Za-z0-9]+"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=SPECIAL + ["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    from tokenizers import AddedToken

    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in PLAIN_ADDED])
    return tok.to_str()


def chat_tokenizer(family: str = "chatml", tags: bool = False):
    """A transformers fast tokenizer over the local BPE, with ``family``'s bos / eos and chat template."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    bos, eos = FAMILY_TOKENS[family]
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_trained_backend_json()), bos_token=bos, eos_token=eos, pad_token="<pad>"
    )
    tok.chat_template = template(family, tags=tags)
    return tok
