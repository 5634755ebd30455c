"""A tiny expression language for mask specs, e.g. ``causal & sliding_window(4)``, parsed by a grammar of our own.

Nothing is ever evaluated as Python (no ``eval``, no attribute access, no strings): the text is split into tokens and
parsed by recursive descent into calls of the mask constructors listed in ``PRIMITIVES``; anything else is an
``ExprError`` that names the column. Grammar (``~`` binds tighter than ``&``, which binds tighter than ``|``)::

    expr    := and ("|" and)*
    and     := unary ("&" unary)*
    unary   := "~" unary | atom
    atom    := NAME ["(" [arg ("," arg)* [","]] ")"] | "(" expr ")"
    arg     := [NAME "="] value
    value   := ["-"] INT | "[" [value ("," value)* [","]] "]"

Names: ``full``, ``causal`` (bare or with ``()``), ``sliding_window(w)``, ``local_window(before, after)``,
``chunked(size)``, ``prefix_lm(n)`` or ``prefix_lm([n, ...])``, ``document([lens])`` or ``document([[lens], ...])``
or ``document(doc_ids=[...])``, ``key_padding([1, 1, 0])`` or ``key_padding([[...], ...])``. Keyword arguments: the
parameter names of those constructors (``window=``, ``before=``, ``after=``, ``size=``, ``offsets=``,
``prefix_lens=``, ``seq_lens=``, ``doc_ids=``, ``length=``, ``attention_mask=``).

    >>> parse_spec("causal & document([3, 5, 4])")
    causal() & document(seq_lens=[3, 5, 4])
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from attnmask import masks
from attnmask.errors import AttnmaskError, ExprError, SpecError

__all__ = ["ExprError", "PRIMITIVES", "parse_spec", "tokenize"]

# Integer literals and document lengths above this are refused: an expression is for drawing and testing masks, and
# ``document([10**12])`` would otherwise allocate a huge tensor.
MAX_INT = 1 << 24
# Longest expression, in characters (a few hundred primitives, or documents of thousands of lengths).
MAX_LENGTH = 20_000
# Deepest nesting of "(", "~" and "[" together: the parser is recursive, and a spec nests at most
# ``masks.MAX_DEPTH`` levels.
MAX_NESTING = 50


@dataclass(frozen=True)
class Primitive:
    """One name the language knows: the constructor, its parameters in order, and how many are required."""

    build: Callable[..., masks.MaskSpec]
    params: tuple[str, ...]
    required: int


PRIMITIVES: dict[str, Primitive] = {
    "full": Primitive(masks.full, (), 0),
    "causal": Primitive(masks.causal, (), 0),
    "sliding_window": Primitive(masks.sliding_window, ("window",), 1),
    "local_window": Primitive(masks.local_window, ("before", "after"), 2),
    "chunked": Primitive(masks.chunked, ("size", "offsets"), 1),
    "prefix_lm": Primitive(masks.prefix_lm, ("prefix_lens",), 1),
    "document": Primitive(masks.document, ("seq_lens", "doc_ids", "length"), 0),
    "key_padding": Primitive(masks.key_padding, ("attention_mask",), 1),
}


# ----------------------------------------------------------------------------------------------------------------------
# Tokens


@dataclass(frozen=True)
class Token:
    kind: str  # "name", "int", "op" (one of & | ~ ( ) [ ] , = -), "end"
    text: str
    column: int  # 1-based


_OPS = set("&|~()[],=-")


def tokenize(text: str, *, strict: bool = True) -> list[Token]:
    """Split an expression into tokens; any character outside the language is an ``ExprError`` at its column.

    With ``strict=False`` the first such character ends the list as a ``"bad"`` token instead, so that a parser
    reports whichever error comes first in reading order.
    """
    if not isinstance(text, str):
        raise SpecError(f"expression: expected a str, got {type(text).__name__}")
    if len(text) > MAX_LENGTH:
        raise ExprError(f"expression of {len(text):,} characters is longer than the limit {MAX_LENGTH:,}", text, 1)
    out, i = [], 0
    while i < len(text):
        ch = text[i]
        if ch in " \t":
            i += 1
        elif ch in _OPS:
            out.append(Token("op", ch, i + 1))
            i += 1
        elif ch.isascii() and ch.isdigit():
            j = i
            while j < len(text) and text[j].isascii() and text[j].isdigit():
                j += 1
            out.append(Token("int", text[i:j], i + 1))
            i = j
        elif ch.isascii() and (ch.isalpha() or ch == "_"):
            j = i
            while j < len(text) and text[j].isascii() and (text[j].isalnum() or text[j] == "_"):
                j += 1
            out.append(Token("name", text[i:j], i + 1))
            i = j
        else:
            if strict:
                raise ExprError(_bad_character(ch), text, i + 1)
            out.append(Token("bad", ch, i + 1))
            break
    out.append(Token("end", "", len(text) + 1))
    return out


def _bad_character(ch: str) -> str:
    if ch in "'\"":
        return "strings are not part of the language"
    if ch == ".":
        return "attribute access ('.') is not part of the language"
    return f"unexpected character {ch!r}"


# ----------------------------------------------------------------------------------------------------------------------
# Parser


class _Parser:
    def __init__(self, text: str):
        self.text = text
        self.tokens = tokenize(text, strict=False)
        self.pos = 0
        self.depth = 0  # open "(", "~" and "[" around the current token

    def enter(self) -> None:
        """Step into a "(", "~" or "[" (the current token); past ``MAX_NESTING`` levels, an ``ExprError``."""
        if self.depth >= MAX_NESTING:
            raise self.error(f"nested deeper than the limit of {MAX_NESTING} levels of '(', '~' and '['")
        self.depth += 1

    @property
    def tok(self) -> Token:
        tok = self.tokens[self.pos]
        if tok.kind == "bad":
            raise ExprError(_bad_character(tok.text), self.text, tok.column)
        return tok

    def error(self, message: str, tok: Token | None = None, hint: str | None = None) -> ExprError:
        return ExprError(message, self.text, (tok or self.tok).column, hint)

    def take(self, text: str | None = None, kind: str = "op") -> Token:
        tok = self.tok
        if tok.kind != kind or (text is not None and tok.text != text):
            want = repr(text) if text is not None else f"a {kind}"
            raise self.error(f"expected {want}, found {_describe(tok)}")
        self.pos += 1
        return tok

    def at(self, text: str) -> bool:
        return self.tok.kind == "op" and self.tok.text == text

    # expr := and ("|" and)*
    def expr(self) -> masks.MaskSpec:
        parts = [self.conj()]
        while self.at("|"):
            self.pos += 1
            parts.append(self.conj())
        return _balanced(operator.or_, parts)

    # and := unary ("&" unary)*
    def conj(self) -> masks.MaskSpec:
        parts = [self.unary()]
        while self.at("&"):
            self.pos += 1
            parts.append(self.unary())
        return _balanced(operator.and_, parts)

    # unary := "~" unary | atom
    def unary(self) -> masks.MaskSpec:
        if self.at("~"):
            tok = self.tok
            self.enter()
            self.pos += 1
            part = self.unary()
            self.depth -= 1
            try:
                return ~part
            except AttnmaskError as e:  # nested deeper than masks.MAX_DEPTH
                raise self.error(str(e), tok) from None
        return self.atom()

    # atom := NAME ["(" args ")"] | "(" expr ")"
    def atom(self) -> masks.MaskSpec:
        if self.at("("):
            tok = self.tok
            self.enter()
            self.pos += 1
            try:
                spec = self.expr()
            except ExprError:
                raise
            except AttnmaskError as e:  # e.g. row counts that do not match, nested deeper than masks.MAX_DEPTH
                raise self.error(str(e), tok) from None
            self.take(")")
            self.depth -= 1
            return spec
        tok = self.tok
        if tok.kind != "name":
            raise self.error(f"expected a mask name or '(', found {_describe(tok)}")
        self.pos += 1
        prim = PRIMITIVES.get(tok.text)
        if prim is None:
            raise self.error(f"unknown name {tok.text!r}", tok, f"known names: {', '.join(PRIMITIVES)}")
        args: list[Any] = []
        kwargs: dict[str, Any] = {}
        if self.at("("):
            self.pos += 1
            self.arguments(tok.text, prim, args, kwargs)
            self.take(")")
        return self.call(tok, prim, args, kwargs)

    def arguments(self, name: str, prim: Primitive, args: list, kwargs: dict) -> None:
        while not self.at(")"):
            if (
                self.tok.kind == "name"
                and self.tokens[self.pos + 1].kind == "op"
                and self.tokens[self.pos + 1].text == "="
            ):
                key = self.tok
                if key.text not in prim.params:
                    allowed = ", ".join(prim.params) or "none"
                    raise self.error(f"{name}() has no argument {key.text!r} (arguments: {allowed})", key)
                if key.text in kwargs:
                    raise self.error(f"argument {key.text!r} given twice", key)
                self.pos += 2
                kwargs[key.text] = self.value()
            else:
                if kwargs:
                    raise self.error("a positional argument cannot follow a keyword argument")
                args.append((self.tok, self.value()))
            if not self.at(","):
                break
            self.pos += 1

    def call(self, tok: Token, prim: Primitive, args: list, kwargs: dict) -> masks.MaskSpec:
        if len(args) > len(prim.params):
            extra = args[len(prim.params)][0]
            raise self.error(f"{tok.text}() takes at most {len(prim.params)} argument(s), got {len(args)}", extra)
        named = {prim.params[i]: value for i, (_, value) in enumerate(args)}
        for key in kwargs:
            if key in named:
                raise self.error(f"argument {key!r} of {tok.text}() given twice", tok)
        named.update(kwargs)
        missing = [p for p in prim.params[: prim.required] if p not in named]
        if missing:
            example = f"{tok.text}(4)" if prim.required == 1 else tok.text
            raise self.error(f"{tok.text} needs argument {missing[0]!r}, e.g. {example}", tok)
        if tok.text == "document" and "seq_lens" not in named and "doc_ids" not in named:
            raise self.error("document needs lengths, e.g. document([3, 5, 4])", tok)
        _check_sizes(self, tok, named)
        try:
            return prim.build(**named)
        except AttnmaskError as e:
            raise self.error(f"{tok.text}: {e}", tok) from None
        except (TypeError, ValueError, RuntimeError) as e:  # e.g. ragged nested lists given to torch
            raise self.error(f"{tok.text}: invalid arguments ({e})", tok) from None

    # value := ["-"] INT | "[" values "]"
    def value(self) -> Any:
        tok = self.tok
        if self.at("-") or tok.kind == "int":
            sign = 1
            if self.at("-"):
                self.pos += 1
                sign = -1
            num = self.take(kind="int")
            if len(num.text.lstrip("0")) > len(str(MAX_INT)):  # before int(): Python refuses 4,300+ digits
                raise self.error(f"integer of {len(num.text):,} digits is larger than the limit {MAX_INT}", num)
            n = int(num.text)
            if n > MAX_INT:
                raise self.error(f"integer {num.text} is larger than the limit {MAX_INT}", num)
            return sign * n
        if self.at("["):
            self.enter()
            self.pos += 1
            items = []
            while not self.at("]"):
                items.append(self.value())
                if not self.at(","):
                    break
                self.pos += 1
            self.take("]")
            self.depth -= 1
            return items
        if tok.kind == "name":
            raise self.error(f"expected an integer or a list, found name {tok.text!r} (arguments are literals)")
        raise self.error(f"expected an integer or a list, found {_describe(tok)}")


def _balanced(op: Callable[[Any, Any], masks.MaskSpec], parts: list[masks.MaskSpec]) -> masks.MaskSpec:
    """``parts[0] op parts[1] op ...`` combined as a balanced tree: ``&`` and ``|`` flatten, so the spec is the same
    as left to right, but each combination copies O(n) parts only O(log n) times instead of n times."""
    while len(parts) > 1:
        parts = [op(parts[i], parts[i + 1]) if i + 1 < len(parts) else parts[i] for i in range(0, len(parts), 2)]
    return parts[0]


def _check_sizes(parser: _Parser, tok: Token, named: dict) -> None:
    """Refuse document lengths whose total exceeds ``MAX_INT`` (they would allocate that many positions)."""
    lens = named.get("seq_lens")
    if lens is None:
        return
    flat = _flatten(lens)
    if any(isinstance(x, int) and x < 0 for x in flat):
        raise parser.error("document: lengths must be >= 0", tok)
    rows = lens if any(isinstance(x, list) for x in lens) else [lens]
    total = max((sum(_flatten(r)) for r in rows), default=0)
    if total > MAX_INT or (isinstance(named.get("length"), int) and named["length"] > MAX_INT):
        raise parser.error(f"document: a row longer than the limit {MAX_INT}", tok)


def _flatten(value: Any) -> list:
    if isinstance(value, list):
        return [x for v in value for x in _flatten(v)]
    return [value]


def _describe(tok: Token) -> str:
    if tok.kind == "end":
        return "the end of the expression"
    return f"{tok.kind} {tok.text!r}" if tok.kind != "op" else repr(tok.text)


def parse_spec(text: str) -> masks.MaskSpec:
    """Parse a mask expression into a ``MaskSpec``; raises ``ExprError`` (a ``SpecError``) with the column.

    ``parse_spec("causal & ~sliding_window(2)")`` equals ``causal() & ~sliding_window(2)``. Nothing is evaluated as
    Python: only the names in ``PRIMITIVES`` can be called, with integer and list literals.
    """
    parser = _Parser(text)
    if parser.tok.kind == "end":
        raise parser.error("empty expression")
    try:
        spec = parser.expr()
    except ExprError:
        raise
    except AttnmaskError as e:  # combining parts: row counts that do not match, nesting past masks.MAX_DEPTH
        raise ExprError(str(e), text, 1) from None
    if parser.tok.kind != "end":
        raise parser.error(f"unexpected {_describe(parser.tok)} after a complete expression")
    return spec
