"""Tokenizers: the built-in UTF-8 byte tokenizer (the default; nothing downloads) and an adaptor for Hugging Face ones.

Both offer the same small interface, which is all `pad`, the packer and the CLI use:
``encode(text, add_bos=False, add_eos=False) -> list[int]``, ``decode(ids) -> str``,
``tok(texts) -> list[list[int]]``, and ``vocab_size``, ``pad_id``, ``bos_id``, ``eos_id``.

    >>> tok = get_tokenizer("byte")
    >>> tok.encode("hé", add_eos=True)
    [104, 195, 169, 258]
    >>> batch = pad(tok(["a cat", "hi"]), pad_id=tok.pad_id)

`get_tokenizer` also takes a ``tokenizer.json`` file or a tokenizer directory on disk (read with the optional
``tokenizers`` / ``transformers`` packages, imported lazily, never from a hub) or a tokenizer object.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from attnmask._checks import dense_data
from attnmask.errors import InputError, bad

__all__ = ["ByteTokenizer", "HFTokenizer", "get_tokenizer"]

# Conventional spellings of special tokens, looked up in a bare `tokenizers.Tokenizer`'s vocabulary when it does not
# say which ids it uses (a transformers tokenizer says so itself). Explicit ids given to `get_tokenizer` win.
_CONVENTIONAL = {
    "pad": ("<pad>", "[PAD]", "<|pad|>"),
    "bos": ("<s>", "<bos>", "<|begin_of_text|>", "<|startoftext|>"),
    "eos": ("</s>", "<eos>", "<|endoftext|>", "<|end_of_text|>"),
}


def _check_texts(texts: Any) -> list[str]:
    if isinstance(texts, str) or not isinstance(texts, Sequence):
        raise bad(InputError, "texts", "a list of strings (use encode() for one text)", type(texts).__name__)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise bad(InputError, f"texts[{i}]", "a str", type(t).__name__)
    return list(texts)


def _ids_list(ids: Any) -> list[int]:
    ids = dense_data("ids", ids)
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    if not isinstance(ids, Iterable) or isinstance(ids, (str, bytes)):
        raise bad(InputError, "ids", "a sequence of int token ids", type(ids).__name__)
    ids = list(ids)
    for x in ids:
        if isinstance(x, bool) or not isinstance(x, int):
            raise bad(InputError, "ids", "int token ids", repr(x))
    return ids


@dataclass(frozen=True)
class ByteTokenizer:
    """UTF-8 bytes as tokens: ids 0-255 are the bytes, 256 = pad, 257 = bos, 258 = eos (``vocab_size`` 259).

    Any text round-trips exactly: ``decode(encode(t)) == t``. ``"hé"`` -> ``[104, 195, 169]``.
    """

    pad_id: ClassVar[int] = 256
    bos_id: ClassVar[int] = 257
    eos_id: ClassVar[int] = 258
    vocab_size: ClassVar[int] = 259

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """The UTF-8 bytes of ``text`` as ids, with bos / eos added when asked."""
        if not isinstance(text, str):
            raise bad(InputError, "text", "a str", type(text).__name__)
        return [self.bos_id] * add_bos + list(text.encode("utf-8")) + [self.eos_id] * add_eos

    def __call__(self, texts: Sequence[str], *, add_bos: bool = False, add_eos: bool = False) -> list[list[int]]:
        """``encode`` each text: one id list per text, ready for `pad`."""
        return [self.encode(t, add_bos=add_bos, add_eos=add_eos) for t in _check_texts(texts)]

    def decode(self, ids: Any, *, skip_special_tokens: bool = True) -> str:
        """Text of ``ids`` (list, array or 1D tensor). Invalid UTF-8 becomes U+FFFD; special ids are dropped, or shown
        as ``<pad>``, ``<bos>``, ``<eos>`` with ``skip_special_tokens=False``."""
        ids = _ids_list(ids)
        names = {self.pad_id: "<pad>", self.bos_id: "<bos>", self.eos_id: "<eos>"}
        out, run = [], bytearray()
        for x in ids:
            if 0 <= x < 256:
                run.append(x)
                continue
            if x not in names:
                raise bad(InputError, "ids", f"ids in [0, {self.vocab_size})", x)
            if not skip_special_tokens:
                out.append(run.decode("utf-8", errors="replace") + names[x])
                run = bytearray()
        out.append(run.decode("utf-8", errors="replace"))
        return "".join(out)


@dataclass(frozen=True, eq=False)
class HFTokenizer:
    """Adaptor giving a Hugging Face tokenizer (a ``transformers`` tokenizer or a ``tokenizers.Tokenizer``) the
    interface of `ByteTokenizer`. Build it with `get_tokenizer`.

    ``encode`` never adds the tokenizer's own special tokens; ``add_bos`` / ``add_eos`` add ``bos_id`` / ``eos_id``.
    ``pad_id`` falls back to ``eos_id`` when the tokenizer has no pad token (safe: attnmask masks labels by position,
    so a real EOS keeps its label); it is ``None`` when there is neither.
    """

    tokenizer: Any
    vocab_size: int
    pad_id: int | None
    bos_id: int | None
    eos_id: int | None

    @property
    def _is_transformers(self) -> bool:
        return hasattr(self.tokenizer, "convert_tokens_to_ids")

    def __call__(self, texts: Sequence[str], *, add_bos: bool = False, add_eos: bool = False) -> list[list[int]]:
        texts = _check_texts(texts)
        if self._is_transformers:
            rows = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        else:
            rows = [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]
        head = [self._special("bos_id")] if add_bos else []
        tail = [self._special("eos_id")] if add_eos else []
        return [head + list(r) + tail for r in rows]

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise bad(InputError, "text", "a str", type(text).__name__)
        return self([text], add_bos=add_bos, add_eos=add_eos)[0]

    def decode(self, ids: Any, *, skip_special_tokens: bool = True) -> str:
        ids = _ids_list(ids)
        for x in ids:
            if not 0 <= x < self.vocab_size:
                raise bad(InputError, "ids", f"ids in [0, {self.vocab_size})", x)
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def _special(self, name: str) -> int:
        value = getattr(self, name)
        if value is None:
            raise bad(InputError, name, f"an id (the tokenizer has none; pass {name}= to get_tokenizer)", None)
        return value


def get_tokenizer(
    tokenizer: Any = "byte", *, pad_id: int | None = None, bos_id: int | None = None, eos_id: int | None = None
) -> ByteTokenizer | HFTokenizer:
    """A tokenizer from a name, a path on disk or an object; nothing is downloaded.

    - ``"byte"`` (default) or ``None``: the built-in `ByteTokenizer` (its special ids are fixed).
    - a path to a ``tokenizer.json`` file (needs ``tokenizers``) or to a tokenizer directory (read with
      ``transformers.AutoTokenizer(local_files_only=True)`` when installed, else its ``tokenizer.json``).
    - a ``transformers`` tokenizer or a ``tokenizers.Tokenizer`` object; a `ByteTokenizer` / `HFTokenizer` is
      returned as is.

    ``pad_id`` / ``bos_id`` / ``eos_id`` override the ids the tokenizer declares for a Hugging Face tokenizer.
    """
    if tokenizer is None or (isinstance(tokenizer, str) and tokenizer == "byte"):
        if (pad_id, bos_id, eos_id) != (None, None, None):
            raise bad(InputError, "pad_id/bos_id/eos_id", "None for the byte tokenizer (fixed ids 256-258)", "an id")
        return ByteTokenizer()
    if isinstance(tokenizer, (ByteTokenizer, HFTokenizer)):
        return tokenizer
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = _load_from_disk(os.fspath(tokenizer))
    if not (hasattr(tokenizer, "decode") and (hasattr(tokenizer, "encode_batch") or callable(tokenizer))):
        raise bad(
            InputError,
            "tokenizer",
            "'byte', a tokenizer.json path, a tokenizer directory, or a Hugging Face tokenizer object",
            type(tokenizer).__name__,
        )
    return _adapt(tokenizer, pad_id=pad_id, bos_id=bos_id, eos_id=eos_id)


def _load_from_disk(path: str) -> Any:
    if os.path.isfile(path):
        from tokenizers import Tokenizer

        try:
            return Tokenizer.from_file(path)
        except Exception as e:  # the tokenizers library raises its own exception types on a file it cannot parse
            reason = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
            raise bad(InputError, "tokenizer", "a readable tokenizer.json file", f"{path!r} ({reason})") from None
    if not os.path.isdir(path):
        raise bad(InputError, "tokenizer", "'byte', a tokenizer.json file or a tokenizer directory", f"{path!r}")
    json_file = os.path.join(path, "tokenizer.json")
    try:
        from transformers import AutoTokenizer
    except ImportError:
        if not os.path.isfile(json_file):
            expected = "a directory with tokenizer.json (transformers is not installed)"
            raise bad(InputError, "tokenizer", expected, path) from None
        return _load_from_disk(json_file)
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError):
        if os.path.isfile(json_file):
            return _load_from_disk(json_file)
        raise


def _adapt(tok: Any, *, pad_id: int | None, bos_id: int | None, eos_id: int | None) -> HFTokenizer:
    if hasattr(tok, "convert_tokens_to_ids"):  # transformers
        declared = {k: getattr(tok, f"{k}_token_id", None) for k in ("pad", "bos", "eos")}
        vocab_size = len(tok)
    else:  # tokenizers.Tokenizer
        padding = getattr(tok, "padding", None) or {}
        declared = {k: _find_conventional(tok, k) for k in ("pad", "bos", "eos")}
        if "pad_id" in padding:
            declared["pad"] = padding["pad_id"]
        vocab_size = tok.get_vocab_size(with_added_tokens=True)
    eos = eos_id if eos_id is not None else declared["eos"]
    pad = pad_id if pad_id is not None else declared["pad"] if declared["pad"] is not None else eos
    bos = bos_id if bos_id is not None else declared["bos"]
    for name, value in (("pad_id", pad), ("bos_id", bos), ("eos_id", eos)):
        if value is not None and not (isinstance(value, int) and 0 <= value < vocab_size):
            raise bad(InputError, name, f"an id in [0, {vocab_size})", repr(value))
    return HFTokenizer(tok, vocab_size, pad, bos, eos)


def _find_conventional(tok: Any, kind: str) -> int | None:
    for token in _CONVENTIONAL[kind]:
        found = tok.token_to_id(token)
        if found is not None:
            return found
    return None
