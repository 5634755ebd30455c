"""``attnmask demo``: a built-in corpus padded and packed, a report and pictures. Nothing downloads; takes seconds."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

from attnmask.viz import FillReport, draw_histogram, draw_mask, draw_plan, draw_table, save_histogram_png, save_mask_png

__all__ = ["CORPUS", "run_demo"]

# A small corpus written for the demo: sentences of very different lengths, as real data has.
CORPUS = [
    "Hi.",
    "Masks are specs.",
    "Pad or pack?",
    "True means may attend.",
    "Every token counts, so none is dropped without a report.",
    "A causal mask lets each query see itself and the keys before it.",
    "Padding adds tokens that do no work.",
    "Packing puts several documents in one row and keeps them apart with a document mask.",
    "Position ids restart at zero in every packed document.",
    "The first label of each document is ignored so that no target crosses a boundary.",
    "With a key-value cache the queries are the last positions of the row.",
    "A sliding window of four lets a query see at most four keys, itself included.",
    "Chunked attention splits a row into fixed chunks that do not talk to each other.",
    "A prefix language model reads its prompt in both directions and writes causally after it.",
    "Left padding is what generation wants: every prompt ends at the same column.",
    "Right padding is what training usually does.",
    "Fully masked rows return exact zeros, never NaN.",
    "Additive masks use the smallest finite value of the dtype instead of minus infinity, so two of them never "
    "overflow when added.",
    "Block layouts mark each tile of the score matrix as full, partial or empty, so empty tiles are never computed.",
    "Short.",
    "Bytes are tokens here.",
    "A long document can be split into pieces when it does not fit in one row; each piece becomes its own document.",
    "The loss is divided by the number of target tokens in the whole step, not averaged over micro-batches.",
    "Ranks should get the same number of steps and nearly the same number of tokens.",
    "Attention backends differ in speed, never in results.",
    "Ok.",
    "Documents never attend across boundaries.",
    "Best-fit decreasing sorts sequences by length and puts each into the fullest row where it still fits, which "
    "leaves very little room unused.",
    "Streaming packers hold a bounded buffer.",
    "Seven.",
    "The demo corpus is built into the library, so nothing is downloaded.",
    "Pictures help: a mask is easier to check by eye than a tensor of booleans.",
    "Eight bits per token keep the vocabulary tiny.",
    "One idea per test.",
    "Specs compose with and, or and not.",
    "A picture of the packed rows shows where each document starts and ends, and how much padding is left at the end "
    "of every row after packing.",
]


def show_ids(ids: list[int], width: int) -> str:
    """Byte-tokenizer ids as the characters they encode (``?`` for non-ASCII bytes), padded with ``·``."""
    return "".join(chr(t) if 32 <= t < 127 else "?" for t in ids).ljust(width, "·")


def run_demo(out: Path, *, max_length: int = 256) -> int:
    """Print the demo report (padding vs packing of ``CORPUS``) and write ``packed-mask.png`` and ``lengths.png``
    into ``out``; returns 0. Tokenizes with the built-in byte tokenizer, so nothing downloads; about a second."""
    from attnmask.batch import pad
    from attnmask.pack import pack
    from attnmask.tokenizers import get_tokenizer

    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)  # fail before the report if the folder cannot be made
    tok = get_tokenizer("byte")
    sequences = tok(CORPUS)
    lengths = [len(s) for s in sequences]
    print(f"attnmask demo: {len(CORPUS)} sentences, {sum(lengths):,} tokens (built-in UTF-8 byte tokenizer)")

    few = [sequences[i] for i in (1, 0, 2)]
    batch = pad(few, pad_id=tok.pad_id)
    width = batch.shape[1]
    print("\n1. attnmask.pad(sentences, pad_id=256): three sentences, padded on the right")
    for row, ids in enumerate(few):
        ones = "".join(map(str, batch.attention_mask[row].tolist()))
        print(f"   row {row} |{show_ids(ids, width)}|  attention_mask {ones}")
    print(f"   batch.mask = {batch.mask!r}")
    print(f"\n   mask of row 1 ({len(few[1])} real tokens; queries down, keys across, ■ = may attend):")
    print(_indent(draw_mask(batch.mask, width, row=1), 3))

    print(f"\n2. Lengths of the {len(CORPUS)} sentences (tokens)")
    print(_indent(draw_histogram(lengths, bins=8), 3))

    padded = pad(sequences, pad_id=tok.pad_id)
    plan = pack(lengths, max_length)
    packed = plan.collate(sequences, pad_id=tok.pad_id)
    report = FillReport(len(lengths), sum(lengths), padded.shape[1], max_length, plan.stats.rows)
    print(f"\n3. Padding vs packing the whole corpus (attnmask.pack(lengths, {max_length}), best-fit decreasing)")
    print(_indent(draw_table(report.lines()), 1))
    kept = packed.num_tokens == padded.num_tokens == sum(lengths)
    print(f"   every token kept: {'yes' if kept else 'NO'} ({packed.num_tokens:,} in the packed batch)")
    print(_indent(draw_plan(plan.bins, max_length, width=64), 3))

    busiest = max(range(len(packed.seq_lens)), key=lambda r: len(packed.seq_lens[r]))
    docs = packed.seq_lens[busiest]
    print(f"\n4. Packed row {busiest}: mask = causal & document & key_padding, documents of {list(docs)} tokens")
    print(_indent(draw_mask(packed.mask, max_length, row=busiest, max_cells=32), 3))

    if importlib.util.find_spec("matplotlib") is None:
        print(f"\nPictures skipped: matplotlib is not installed (pip install 'attnmask[viz]')  ({_seconds(start)})")
        return 0 if kept else 1
    paths = [
        save_mask_png(
            packed.mask, out / "packed-mask.png", max_length, row=busiest, title=f"packed row {busiest}: {list(docs)}"
        ),
        save_histogram_png(lengths, out / "lengths.png", title=f"{len(lengths)} sentences, tokens per sentence"),
    ]
    print(f"\nPictures written to {out}/: {', '.join(p.name for p in paths)}  ({_seconds(start)})")
    return 0 if kept else 1


def _seconds(start: float) -> str:
    return f"{time.perf_counter() - start:.1f} s"


def _indent(text: str, n: int) -> str:
    return "\n".join(" " * n + line for line in text.splitlines())
