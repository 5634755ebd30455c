"""Conversations to token ids and assistant-only labels through any tokenizer's chat template.

The template is rendered as it is (no ``{% generation %}`` tags needed); each message's span in the rendered text is
*located*, never guessed from token ids:

1. render the conversation as is (the text that is tokenized), and once more with every message's content wrapped
   in two private-use marker characters (``U+F0000 + 2i`` before message ``i``'s content, ``U+F0001 + 2i`` after);
2. the marked render with its markers deleted must equal the plain render character for character (else the
   markers are moved inside the content's edge whitespace, which ``trim`` / ``strip`` filters remove, and tried
   again; else the conversation is refused with `ChatTemplateError`); the markers then give where each content
   starts and ends in the plain text, and the text between two markers must be the content itself;
3. a trained turn runs from its content's start (or, where the template parsed the start away, as Qwen3 does with
   reasoning, from the end of the assistant header, which is the generation prompt) through the template's
   end-of-turn token (``<|im_end|>``, ``<|eot_id|>``, ``</s>``, ...; found once per template by rendering a probe
   conversation), so tool calls rendered after the content are trained too. Exactly one end-of-turn token must lie
   between the content and the next message, or the conversation is refused;
4. one batched tokenizer call with offsets maps the character spans to tokens: a token is trained when its
   characters overlap a trained span (as transformers' ``return_assistant_tokens_mask`` maps its spans).

A template that has ``{% generation %}`` tags is followed as it is instead (``train_on`` "assistant" or "all", no
per-message flags): one tracked rendering gives the tags' spans, mapped to tokens exactly as
``return_assistant_tokens_mask`` maps them, with a warning when they leave the end-of-turn token out.

Worked example (ChatML)::

    <|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\nHello!<|im_end|>\\n
                                                      ^^^^^^^^^^^^^^^^ trained: content + end-of-turn token

Labels follow Hugging Face (aligned with ``input_ids``, -100 elsewhere; the model shifts). Nothing is cut silently:
conversations longer than ``max_length`` are refused, dropped, truncated or split at turn boundaries, as chosen,
and counted in `ChatStats`, as are conversations left with no trained token. Requires a ``transformers`` tokenizer
(``apply_chat_template`` and a fast tokenizer's offsets), used as given: nothing downloads.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from attnmask._spans import IGNORE_INDEX
from attnmask.errors import ChatTemplateError, InputError, bad

__all__ = ["ChatEncoding", "ChatStats", "encode_chat", "chat_char_spans", "TRAIN_ON", "OVERFLOW"]

log = logging.getLogger("attnmask")

TRAIN_ON = ("assistant", "last", "all")
OVERFLOW = ("error", "drop", "truncate", "split")
_MARK0 = 0xF0000
_MARKS = re.compile("[\U000f0000-\U0010ffff]")
_MAX_MESSAGES = (0x10FFFF - _MARK0) // 2


# ----------------------------------------------------------------------------------------------------------------------
# Results


@dataclass(frozen=True)
class ChatStats:
    """What encoding did to the conversations: nothing is cut or dropped without being counted here.

    Index lists name conversations by their position in the input. ``untrained`` lists conversations that gave a
    row with no trained token (e.g. a conversation with no assistant turn, or one truncated before its first).
    """

    conversations: int
    rows: int
    tokens: int
    trained_tokens: int
    dropped: tuple[int, ...] = ()
    truncated: tuple[int, ...] = ()
    split: tuple[int, ...] = ()
    cut_tokens: int = 0
    untrained: tuple[int, ...] = ()

    def __str__(self) -> str:
        parts = [
            f"{self.conversations:,} conversations -> {self.rows:,} rows, {self.tokens:,} tokens, "
            f"{self.trained_tokens:,} trained"
        ]
        for name in ("dropped", "truncated", "split", "untrained"):
            found = getattr(self, name)
            if found:
                parts.append(f"{name} {len(found):,} (first: {list(found[:5])})")
        if self.cut_tokens:
            parts.append(f"{self.cut_tokens:,} tokens cut")
        return "; ".join(parts)


@dataclass(frozen=True)
class ChatEncoding:
    """Rows ready for `pad`, the packer or a collator: one per kept conversation (or per piece when split).

    ``input_ids``, ``labels`` (-100 outside trained spans) and ``assistant_masks`` (1 on every assistant turn,
    trained or not, as transformers' mask) are lists of int lists of equal lengths; ``source[r]`` is the conversation
    row ``r`` comes from; ``lengths[i]`` is conversation ``i``'s token count before any cut. ``texts`` are the rendered
    conversations (kept only with ``return_texts=True``).
    """

    input_ids: list[list[int]]
    labels: list[list[int]]
    assistant_masks: list[list[int]]
    source: list[int]
    stats: ChatStats
    lengths: list[int]
    texts: list[str] | None = None

    def rows(self) -> list[dict[str, list[int]]]:
        """The rows as example dicts (``input_ids``, ``labels``, ``assistant_masks``) for a collator."""
        return [
            {"input_ids": i, "labels": lab, "assistant_masks": m}
            for i, lab, m in zip(self.input_ids, self.labels, self.assistant_masks, strict=True)
        ]


@dataclass(frozen=True)
class _Template:
    """What is learnt once per tokenizer and template: the assistant header and the end-of-turn strings."""

    header: str | None
    end_of_turn: tuple[str, ...]
    eot_pattern: re.Pattern = field(repr=False)


# ----------------------------------------------------------------------------------------------------------------------
# Public entry point


def encode_chat(
    tokenizer: Any,
    conversations: Sequence[Sequence[Mapping[str, Any]]],
    *,
    train_on: str = "assistant",
    tools: Any = None,
    max_length: int | None = None,
    overflow: str = "error",
    end_of_turn: Sequence[str] | None = None,
    train_key: str = "train",
    return_texts: bool = False,
    report: bool = True,
    **template_kwargs: Any,
) -> ChatEncoding:
    """Token ids, labels and assistant masks of ``conversations`` (lists of ``{"role", "content", ...}`` messages).

    ``train_on``: ``"assistant"`` (every assistant turn: its content and end-of-turn token), ``"last"`` (the final
    assistant turn), ``"all"`` (every token). A message's ``train_key`` field (``"train": True / False``) overrides
    the choice for that message (any role: its content through the next end-of-turn token).
    ``tools``: one list of tool schemas for every conversation, or one per conversation (``None`` entries allowed).
    ``max_length`` with ``overflow``: ``"error"`` (default: refuse), ``"drop"`` (the conversation), ``"truncate"``
    (keep the turns up to the last assistant end-of-turn that fits) or ``"split"`` (cut at assistant turn ends into
    pieces of at most ``max_length`` tokens; a single turn longer than that is dropped); all counted in ``stats``.
    ``end_of_turn``: the strings that end a turn, when the template's own (found by a probe render) are not wanted.
    ``template_kwargs`` go to ``apply_chat_template`` (e.g. ``enable_thinking=False``, ``chat_template=...``).
    ``report``: log ``stats`` on the ``attnmask`` logger (a warning) when anything was cut, dropped or left untrained.

    Raises `ChatTemplateError` (naming the conversation and message) for a template whose rendering cannot be
    located exactly, and `InputError` for malformed messages (multimodal content, unknown options).
    """
    if train_on not in TRAIN_ON:
        raise bad(InputError, "train_on", f"one of {TRAIN_ON}", repr(train_on))
    if overflow not in OVERFLOW:
        raise bad(InputError, "overflow", f"one of {OVERFLOW}", repr(overflow))
    if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1):
        raise bad(InputError, "max_length", "None or an int >= 1", repr(max_length))
    if not hasattr(tokenizer, "apply_chat_template"):
        expected = "a transformers tokenizer (with apply_chat_template)"
        raise bad(InputError, "tokenizer", expected, type(tokenizer).__name__)
    if isinstance(conversations, Mapping) or isinstance(conversations, str):
        expected = "a list of conversations (lists of messages)"
        raise bad(InputError, "conversations", expected, type(conversations).__name__)
    convs = [_check_conversation(c, i, train_key) for i, c in enumerate(conversations)]
    tool_lists = _per_conversation_tools(tools, len(convs))
    template = _learn_template(tokenizer, end_of_turn, template_kwargs)
    flagged = any(m.get(train_key) is not None for c in convs for m in c)
    if train_on in ("assistant", "all") and not flagged and _generation_tagged(tokenizer, template_kwargs):
        texts, spans = _render_tagged(tokenizer, convs, tool_lists, template_kwargs, template, train_on)
    else:
        texts = _render(tokenizer, convs, tool_lists, template_kwargs)
        marked = _render(tokenizer, [_marked(c, _outer(c)) for c in convs], tool_lists, template_kwargs)
        spans = [
            _locate(tokenizer, conv, text, mark, tool_lists[i], template, template_kwargs, i, train_on, train_key)
            for i, (conv, text, mark) in enumerate(zip(convs, texts, marked, strict=True))
        ]
    enc = _assemble(_tokenize(tokenizer, texts), spans, max_length, overflow, texts if return_texts else None)
    s = enc.stats
    if report and (s.dropped or s.truncated or s.split or s.untrained):
        log.warning("attnmask.encode_chat: %s", s)
    return enc


def chat_char_spans(
    tokenizer: Any,
    conversation: Sequence[Mapping[str, Any]],
    *,
    tools: Any = None,
    end_of_turn: Sequence[str] | None = None,
    train_key: str = "train",
    **template_kwargs: Any,
) -> tuple[str, list[tuple[int, int, int, str]]]:
    """The rendered text of one conversation and ``(message index, start, stop, role)`` of each located turn (the
    characters `encode_chat` trains for that message), for inspection and tests."""
    conv = _check_conversation(conversation, 0, train_key)
    template = _learn_template(tokenizer, end_of_turn, template_kwargs)
    text, marked = _render(tokenizer, [conv, _marked(conv, _outer(conv))], [tools, tools], template_kwargs)
    located = _locate(tokenizer, conv, text, marked, tools, template, template_kwargs, 0, "assistant", train_key)
    return text, [(i, a, b, conv[i]["role"]) for i, a, b, _ in located.turns]


# ----------------------------------------------------------------------------------------------------------------------
# Checking the input


def _check_conversation(conv: Any, i: int, train_key: str) -> list[dict]:
    if isinstance(conv, Mapping) and "messages" in conv:
        conv = conv["messages"]
    if isinstance(conv, (str, Mapping)) or not isinstance(conv, Sequence) or not len(conv):
        raise bad(InputError, f"conversations[{i}]", "a non-empty list of messages", _short(conv))
    if len(conv) > _MAX_MESSAGES:
        raise bad(InputError, f"conversations[{i}]", f"at most {_MAX_MESSAGES} messages", len(conv))
    for j, m in enumerate(conv):
        if type(m) is dict and type(m.get("role")) is str and type(m.get("content")) is str and train_key not in m:
            continue  # the common case, checked at the cost of a few type tests
        where = f"conversations[{i}][{j}]"
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str):
            raise bad(InputError, where, "a message dict with a str 'role'", _short(m))
        content = m.get("content")
        if content is not None and not isinstance(content, str):
            raise bad(
                InputError,
                f"{where}['content']",
                "a str or None (multimodal / list-of-parts content is not supported)",
                type(content).__name__,
            )
        flag = m.get(train_key)
        if flag is not None and not isinstance(flag, bool):
            raise bad(InputError, f"{where}[{train_key!r}]", "True, False or absent", repr(flag))
    return [m if type(m) is dict else dict(m) for m in conv]


def _per_conversation_tools(tools: Any, n: int) -> list[Any]:
    if tools is None:
        return [None] * n
    if isinstance(tools, Sequence) and len(tools) == n and all(t is None or isinstance(t, list) for t in tools):
        if n and any(isinstance(t, list) for t in tools):
            return list(tools)
    if isinstance(tools, list):
        return [tools] * n
    raise bad(InputError, "tools", "None, a list of tool schemas, or one such list per conversation", _short(tools))


def _short(x: Any) -> str:
    text = repr(x)
    return text if len(text) <= 80 else text[:77] + "..."


# ----------------------------------------------------------------------------------------------------------------------
# Rendering


def _render(tokenizer, convs: list[list[dict]], tools: list[Any], kwargs: dict) -> list[str]:
    """``apply_chat_template(conv, tools=..., tokenize=False)`` of each conversation: straight through the compiled
    template where `_fast_renderer` vouches for it and the messages hold only plain JSON values, else one
    ``apply_chat_template`` call per run of conversations sharing their tools."""
    fast = _fast_renderer(tokenizer, kwargs)
    out: list[str] = []
    start = 0
    for k in range(1, len(convs) + 1):
        if k < len(convs) and tools[k] is tools[start]:
            continue
        try:
            if fast is not None and _plain(tools[start]) and all(_plain_messages(c) for c in convs[start:k]):
                out.extend(fast(c, tools[start]) for c in convs[start:k])
            else:
                out.extend(
                    tokenizer.apply_chat_template(
                        convs[start:k], tools=tools[start], tokenize=False, add_generation_prompt=False, **kwargs
                    )
                )
        except Exception as e:  # noqa: BLE001 - the template's own errors (raise_exception, jinja) are named here
            culprit = next((j for j in range(len(out), k) if not _renders(tokenizer, convs[j], tools[j], kwargs)), k)
            raise ChatTemplateError(f"conversations[{culprit}]: the chat template raised: {e}") from e
        start = k
    return out


def _renders(tokenizer, conv, tools, kwargs) -> bool:
    try:
        tokenizer.apply_chat_template(conv, tools=tools, tokenize=False, **kwargs)
    except Exception:  # noqa: BLE001 - only whether it fails matters here
        return False
    return True


_FAST: dict[tuple, Any] = {}
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")  # transformers aliases these: not fast


def _fast_renderer(tokenizer, kwargs: dict):
    """``(conv, tools) -> text`` rendering with the tokenizer's compiled template and the variables
    ``apply_chat_template`` passes it (its special tokens, ``kwargs``), skipping the per-call conversion of inputs
    to plain data (done by `_plain_messages` instead); ``None`` when that cannot be vouched for. A probe conversation
    is rendered both ways once per tokenizer, template and ``kwargs``, and must come out identical."""
    template = getattr(tokenizer, "chat_template", None)
    if not isinstance(template, str) or "chat_template" in kwargs or not _plain(kwargs):
        return None
    key = (id(tokenizer), template, repr(sorted(kwargs.items())), repr(tokenizer.special_tokens_map))
    if key in _FAST:
        return _FAST[key]
    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template
    except ImportError:  # pragma: no cover - another transformers layout: the public path is used
        _FAST[key] = None
        return None
    variables = {**tokenizer.special_tokens_map, **kwargs}
    compiled = _compile_jinja_template(template)

    def render(conv: list[dict], tools: Any) -> str:
        messages = [{k: v for k, v in m.items() if v is not None} for m in conv]
        return compiled.render(messages=messages, tools=tools, documents=None, add_generation_prompt=False, **variables)

    probe = [{"role": r, "content": r[0]} for r in ("system", "user", "assistant")]
    try:
        same = render(probe, None) == tokenizer.apply_chat_template(probe, tokenize=False, **kwargs)
    except Exception:  # noqa: BLE001 - a template that fails on the probe is rendered the public way
        same = False
    if len(_FAST) > 64:
        _FAST.clear()
    _FAST[key] = render if same and _plain(variables) else None
    return _FAST[key]


def _plain(value: Any) -> bool:
    """Whether ``value`` is built of exact JSON types only (what a template may safely see)."""
    kind = type(value)
    if value is None or kind in (str, int, float, bool):
        return True
    if kind is dict:
        return all(type(k) is str and _plain(v) for k, v in value.items())
    if kind is list:
        return all(_plain(v) for v in value)
    return False


def _plain_messages(conv: list[dict]) -> bool:
    for m in conv:
        for k, v in m.items():
            if k in _REASONING_FIELDS or not (type(v) is str or v is None or _plain(v)):
                return False
    return True


def _outer(conv: list[dict]) -> list[tuple[int, int] | None]:
    """Marker places around every whole content: ``(a, b)`` puts the markers before ``content[a]`` and
    ``content[b]``."""
    return [None if m.get("content") is None else (0, len(m["content"])) for m in conv]


def _inner(conv: list[dict], skip_empty: bool) -> list[tuple[int, int] | None]:
    """Marker places inside each content's edge whitespace (which ``trim`` / ``strip`` filters remove); none around
    empty contents when ``skip_empty`` (templates that test a content's truth)."""
    out = []
    for m in conv:
        content = m.get("content")
        if content is None or (skip_empty and not content):
            out.append(None)
            continue
        a = len(content) - len(content.lstrip())
        out.append((a, max(a, len(content.rstrip()))))
    return out


def _marked(conv: list[dict], places: list[tuple[int, int] | None]) -> list[dict]:
    """``conv`` with message ``j``'s content wrapped in its markers at ``places[j]``."""
    out = []
    for j, (m, place) in enumerate(zip(conv, places, strict=True)):
        if place is None:
            out.append(m)
            continue
        content, (a, b) = m["content"], place
        wrapped = content[:a] + chr(_MARK0 + 2 * j) + content[a:b] + chr(_MARK0 + 2 * j + 1) + content[b:]
        out.append({**m, "content": wrapped})
    return out


def _learn_template(tokenizer, end_of_turn: Sequence[str] | None, kwargs: dict) -> _Template:
    """The assistant header (generation prompt) and the end-of-turn strings, from probe renders of the template."""
    user = [{"role": "user", "content": "hi"}]
    try:
        without = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=False, **kwargs)
        with_prompt = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True, **kwargs)
    except Exception:  # noqa: BLE001 - a template that refuses the probe: no header known (turns need their markers)
        without = with_prompt = ""
    grows = with_prompt.startswith(without) and len(with_prompt) > len(without)
    header = with_prompt[len(without) :] if grows else None
    if end_of_turn is not None:
        if isinstance(end_of_turn, str) or not all(isinstance(s, str) and s for s in end_of_turn) or not end_of_turn:
            raise bad(InputError, "end_of_turn", "a non-empty list of non-empty strings", _short(end_of_turn))
        found = tuple(end_of_turn)
    else:
        found = _probe_end_of_turn(tokenizer, kwargs)
    pattern = re.compile("|".join(re.escape(s) for s in sorted(set(found), key=len, reverse=True)))
    return _Template(header, found, pattern)


def _special_tokens(tokenizer) -> list[str]:
    names = set(getattr(tokenizer, "all_special_tokens", []) or [])
    for tok in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        if getattr(tok, "special", False):
            names.add(str(tok))
    return sorted((n for n in names if n), key=len, reverse=True)


def _probe_end_of_turn(tokenizer, kwargs: dict) -> tuple[str, ...]:
    """The first special token after each assistant content of a two-exchange probe conversation."""
    probe = [
        {"role": "user", "content": "probe one"},
        {"role": "assistant", "content": "answer one"},
        {"role": "user", "content": "probe two"},
        {"role": "assistant", "content": "answer two"},
    ]
    specials = _special_tokens(tokenizer)
    if not specials:
        raise ChatTemplateError("end_of_turn: the tokenizer declares no special tokens; pass end_of_turn=[...]")
    pattern = re.compile("|".join(re.escape(s) for s in specials))
    try:
        text = tokenizer.apply_chat_template(_marked(probe, _outer(probe)), tokenize=False, **kwargs)
    except Exception as e:  # noqa: BLE001 - the template's own error, named
        raise ChatTemplateError(
            f"end_of_turn: the template failed on a probe conversation ({e}); pass end_of_turn=[...]"
        ) from e
    found = []
    for j in (1, 3):
        right = text.find(chr(_MARK0 + 2 * j + 1))
        hit = pattern.search(text, right) if right >= 0 else None
        if hit is None:
            raise ChatTemplateError(
                "end_of_turn: no special token follows an assistant message in the template's rendering; "
                "pass end_of_turn=[...] (the strings that end an assistant turn)"
            )
        found.append(hit.group())
    return tuple(dict.fromkeys(found))


# ----------------------------------------------------------------------------------------------------------------------
# Locating the turns of one conversation


@dataclass(frozen=True)
class _Located:
    """Character spans of one rendered conversation: ``turns`` as ``(message, start, stop, trained)``."""

    turns: list[tuple[int, int, int, bool]]
    all_tokens: bool = False
    tagged: bool = False  # spans of {% generation %} tags, mapped to tokens exactly as transformers maps them


_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


def _generation_tagged(tokenizer, kwargs: dict) -> bool:
    template = kwargs.get("chat_template", getattr(tokenizer, "chat_template", None))
    return isinstance(template, str) and _GENERATION_TAG.search(template) is not None


def _render_tagged(tokenizer, convs, tools, kwargs, template: _Template, train_on) -> tuple[list[str], list]:
    """Texts and the spans of the template's own ``{% generation %}`` tags (transformers' tracked rendering), for a
    template that has them: its tags decide what is trained, as ``return_assistant_tokens_mask``. One rendering per
    conversation instead of two."""
    from transformers.utils.chat_template_utils import render_jinja_template

    variables = {**tokenizer.special_tokens_map, **kwargs}
    variables["chat_template"] = tokenizer.get_chat_template(kwargs.get("chat_template"), None)
    texts, located, start = [], [], 0
    for k in range(1, len(convs) + 1):
        if k < len(convs) and tools[k] is tools[start]:
            continue
        chats = [[{key: v for key, v in m.items() if v is not None} for m in c] for c in convs[start:k]]
        rendered, indices = render_jinja_template(
            conversations=chats, tools=tools[start], return_assistant_tokens_mask=True, **variables
        )
        texts.extend(rendered)
        located.extend(_Located([(-1, a, b, True) for a, b in spans], train_on == "all", True) for spans in indices)
        start = k
    ends = tuple(template.end_of_turn)
    spans = [(t, a, b) for t, loc in zip(texts, located, strict=True) for _, a, b, _ in loc.turns]
    if any(not t.endswith(ends, a, b) for t, a, b in spans):
        log.warning(
            "attnmask.encode_chat: the chat template's generation tags leave the end-of-turn token (%s) out of some "
            "assistant spans, so the model may not learn to stop; the tags are followed as they are",
            ", ".join(ends),
        )
    return texts, located


def _locate(tokenizer, conv, text, marked, tools, template: _Template, kwargs, i, train_on, train_key) -> _Located:
    """The turns of conversation ``i`` (plain render ``text``, ``marked``: rendered with outer markers)."""
    if _MARKS.search(text):
        raise ChatTemplateError(
            f"conversations[{i}]: contains characters of Unicode planes 15-16 (U+F0000 and above), "
            "which attnmask uses as markers; remove them"
        )
    wanted = _wanted(conv, train_on, train_key)
    places = _outer(conv)
    if _MARKS.sub("", marked) != text:
        marked, places = _relocate(tokenizer, conv, text, tools, kwargs, i, wanted)
    return _Located(_turns(conv, marked, text, places, wanted, template, i), all_tokens=train_on == "all")


def _relocate(tokenizer, conv, text, tools, kwargs, i, wanted: dict[int, bool]) -> tuple[str, list]:
    """A marked render for a template that transforms contents' edges: markers inside the edge whitespace (then none
    around empty contents); the left marker of each located message is then moved as early as the rendering stays
    exact, so that the leading whitespace the template keeps stays in the turn."""

    def render(places):
        marked = _render(tokenizer, [_marked(conv, places)], [tools], kwargs)[0]
        return marked if _MARKS.sub("", marked) == text else None

    for skip_empty in (False, True):
        places = _inner(conv, skip_empty)
        marked = render(places)
        if marked is not None:
            break
    else:
        raise ChatTemplateError(
            f"conversations[{i}][{_first_changed(tokenizer, conv, text, tools, kwargs)}]: the template renders "
            "this message's content transformed, so its span cannot be located exactly"
        )
    for j, place in enumerate(places):
        if place is None or j not in wanted:
            continue
        for a in range(place[0]):
            candidate = places[:j] + [(a, place[1])] + places[j + 1 :]
            found = render(candidate)
            if found is not None:
                places, marked = candidate, found
                break
    return marked, places


def _wanted(conv: list[dict], train_on: str, train_key: str) -> dict[int, bool]:
    """Message index -> trained, for every message whose span is needed (every assistant turn, flagged messages)."""
    assistants = [j for j, m in enumerate(conv) if m["role"] == "assistant"]
    out = {j: train_on in ("assistant", "all") for j in assistants}
    if train_on == "last" and assistants:
        out[assistants[-1]] = True
    for j, m in enumerate(conv):
        flag = m.get(train_key)
        if flag is not None:
            out[j] = flag
    return out


def _first_changed(tokenizer, conv, text, tools, kwargs) -> int:
    """The first message whose marked content makes the rendering differ from the plain one (for error messages)."""
    marked = _render(tokenizer, [_marked(conv, _outer(conv))], [tools], kwargs)[0]
    plain_pos, last_mark = 0, 0
    for ch in marked:
        if _MARK0 <= ord(ch):
            last_mark = (ord(ch) - _MARK0) // 2
            continue
        if plain_pos >= len(text) or text[plain_pos] != ch:
            return last_mark
        plain_pos += 1
    return last_mark


def _turns(conv, marked: str, plain: str, places, wanted: dict[int, bool], template: _Template, i: int) -> list:
    """``(message, start, stop, trained)`` character spans in ``plain``, from the marker positions in ``marked``.
    Where both markers of a message arrived, the text between them must be its content (as marked at ``places``)."""
    n = len(conv)
    left: dict[int, int] = {}
    right: dict[int, int] = {}
    first = [len(plain)] * (n + 1)  # first / last marker position of each message
    last = [0] * (n + 1)
    for count, hit in enumerate(_MARKS.finditer(marked)):
        code = ord(hit.group()) - _MARK0
        j, pos = code // 2, hit.start() - count
        where = right if code % 2 else left
        if j in where and j in wanted:
            raise ChatTemplateError(f"conversations[{i}][{j}]: the template renders this message's content twice")
        where.setdefault(j, pos)
        first[j], last[j] = min(first[j], pos), max(last[j], pos)
    for j in range(n - 1, -1, -1):  # first[j]: the earliest marker of message j or any later one
        first[j] = min(first[j], first[j + 1])
    for j in range(1, n):  # last[j]: the latest marker of message j or any earlier one
        last[j] = max(last[j], last[j - 1])
    for j in left.keys() & right.keys():
        a, b = places[j]
        if plain[left[j] : right[j]] != conv[j]["content"][a:b]:
            raise ChatTemplateError(
                f"conversations[{i}][{j}]: the template renders this message's content transformed, so its span "
                "cannot be located exactly"
            )
    turns = []
    for j, trained in sorted(wanted.items()):
        where = f"conversations[{i}][{j}]"
        lo, hi = (last[j - 1] if j else 0), first[j + 1]
        if j in left and j in right and not lo <= left[j] <= right[j] <= hi:
            raise ChatTemplateError(f"{where}: the template renders the messages out of order")
        start = left[j] if j in left else _after_header(plain, template, lo, right.get(j, hi), where)
        hits = template.eot_pattern.findall(plain, right.get(j, start), hi)
        if len(hits) != 1:
            what = "no end-of-turn token" if not hits else f"{len(hits)} end-of-turn tokens ({template.end_of_turn})"
            raise ChatTemplateError(
                f"{where}: {what} between this message's content and the next message; "
                "its turn cannot be located exactly (pass end_of_turn=[...] if the template ends turns differently)"
            )
        stop = template.eot_pattern.search(plain, right.get(j, start), hi).end()
        turns.append((j, start, stop, trained))
    return turns


def _after_header(plain: str, template: _Template, lo: int, hi: int, where: str) -> int:
    """End of the assistant header (the generation prompt, or its longest prefix ending at a line or special token)
    first found in ``plain[lo:hi]``: where a turn starts when the template parsed its content's start away."""
    header = template.header
    if header:
        cuts = sorted({len(header)} | {m.end() for m in re.finditer(r"\n|" + template.eot_pattern.pattern, header)})
        for cut in reversed(cuts):
            found = plain.find(header[:cut], lo, hi)
            if cut and found >= 0:
                return found + cut
    raise ChatTemplateError(
        f"{where}: the template does not render this message's content as given and no assistant header "
        "(generation prompt) was found before it, so its start cannot be located"
    )


# ----------------------------------------------------------------------------------------------------------------------
# Tokens


def _tokenize(tokenizer, texts: list[str]) -> list[Any]:
    """One batched call of the Rust tokenizer: an ``Encoding`` (ids, character offsets) per text."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if not getattr(tokenizer, "is_fast", False) or not hasattr(backend, "encode_batch"):
        raise bad(InputError, "tokenizer", "a fast tokenizer (character offsets are needed)", type(tokenizer).__name__)
    return backend.encode_batch(texts, add_special_tokens=False)


def _token_ranges(encoding, spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Token ranges ``[first, stop)`` of the tokens whose characters overlap each character span ``[a, b)``: from the
    token holding the span's first character to the one holding its last (as transformers maps its generation
    spans); from the offsets where a character belongs to no token (offsets trimmed of whitespace)."""
    out = []
    for a, b in spans:
        first, last = encoding.char_to_token(a), encoding.char_to_token(b - 1)
        if first is None or last is None:
            return _ranges_from_offsets(np.asarray(encoding.offsets, dtype=np.int64).reshape(-1, 2), spans)
        out.append((first, last + 1))
    return out


def _ranges_like_transformers(encoding, spans: list[tuple[int, int]], n: int) -> list[tuple[int, int]]:
    """Token ranges of generation-tag spans exactly as ``apply_chat_template(return_assistant_tokens_mask=True)``
    maps them (including its quirks: it stops at a span whose start has no token, and a span whose last character
    has no token, or lies in token 0, runs to the end)."""
    out = []
    for a, b in spans:
        first, last = encoding.char_to_token(a), encoding.char_to_token(b - 1)
        if first is None:
            break
        out.append((first, last + 1 if last else n))
    return out


def _ranges_from_offsets(offsets: np.ndarray, spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """`_token_ranges` from ``(n, 2)`` offsets: a token overlaps ``[a, b)`` when ``s < b`` and ``e > a`` (a token with
    no characters counts as covering its position)."""
    s = offsets[:, 0]
    e = np.maximum(offsets[:, 1], s + 1)
    out = []
    for a, b in spans:
        hit = np.flatnonzero((s < b) & (e > a))
        out.append((int(hit[0]), int(hit[-1]) + 1) if len(hit) else (int(np.searchsorted(s, a)),) * 2)
    return out


def _assemble(encodings, located: list[_Located], max_length, overflow, texts) -> ChatEncoding:
    out_ids, out_labels, out_masks, source, lengths = [], [], [], [], []
    dropped, truncated, split, untrained = [], [], [], []
    cut = trained_tokens = 0
    for i, (encoding, loc) in enumerate(zip(encodings, located, strict=True)):
        ids = encoding.ids
        n = len(ids)
        spans = [(a, b) for _, a, b, _ in loc.turns]
        ranges = _ranges_like_transformers(encoding, spans, n) if loc.tagged else _token_ranges(encoding, spans)
        labels = list(ids) if loc.all_tokens else [IGNORE_INDEX] * n
        assistant = [0] * n
        for (_, _, _, trained), (first, stop) in zip(loc.turns, ranges, strict=True):
            assistant[first:stop] = [1] * (stop - first)
            if trained and not loc.all_tokens:
                labels[first:stop] = ids[first:stop]
        pieces = [(0, n)]
        if max_length is not None and n > max_length:
            pieces = _cut(n, sorted({stop for _, stop in ranges}), max_length, overflow, i)
            cut += n - sum(b - a for a, b in pieces)
            (dropped if not pieces else truncated if overflow == "truncate" else split).append(i)
        lengths.append(n)
        for a, b in pieces:
            piece = labels if (a, b) == (0, n) else labels[a:b]
            out_ids.append(ids if (a, b) == (0, n) else ids[a:b])
            out_labels.append(piece)
            out_masks.append(assistant if (a, b) == (0, n) else assistant[a:b])
            source.append(i)
            count = len(piece) - piece.count(IGNORE_INDEX)
            trained_tokens += count
            if not count:
                untrained.append(i)
    stats = ChatStats(
        conversations=len(encodings),
        rows=len(out_ids),
        tokens=sum(len(r) for r in out_ids),
        trained_tokens=trained_tokens,
        dropped=tuple(dropped),
        truncated=tuple(truncated),
        split=tuple(split),
        cut_tokens=cut,
        untrained=tuple(dict.fromkeys(untrained)),
    )
    return ChatEncoding(out_ids, out_labels, out_masks, source, stats, lengths, texts)


def _cut(n: int, ends: list[int], max_length: int, overflow: str, i: int) -> list[tuple[int, int]]:
    """Token ranges kept of a conversation of ``n`` tokens longer than ``max_length``; ``ends`` are the token indices
    just after each located turn (the turn boundaries)."""
    if overflow == "error":
        raise bad(
            InputError,
            f"conversations[{i}]",
            f"at most max_length={max_length} tokens (or choose overflow='drop' | 'truncate' | 'split')",
            f"{n} tokens",
        )
    if overflow == "drop":
        return []
    if overflow == "truncate":
        fit = [e for e in ends if 0 < e <= max_length]
        return [(0, fit[-1])] if fit else []
    pieces, start, fits = [], 0, None  # fits: the last boundary within max_length of start
    for e in [e for e in ends if 0 < e < n] + [n]:
        if e - start > max_length and fits is not None:
            pieces.append((start, fits))
            start, fits = fits, None
        if e - start > max_length:  # one turn alone is longer than max_length: dropped, counted in cut_tokens
            start = e
            continue
        fits = e
    if fits is not None:
        pieces.append((start, fits))
    return pieces
