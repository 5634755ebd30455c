"""PYTHONPATH=src python benchmarks/bench_mask.py --batch 8 --length 4096 --repeat 7

Dense causal + left-padding mask ``(8, 1, 4096, 4096)``: attnmask (``to_dense`` bool for SDPA, ``to_additive`` float
for eager) against transformers' ``create_causal_mask`` (``sdpa`` and ``eager`` Llama configs), in one process, runs
interleaved, identical values asserted once. Also shown: attnmask writing into a reused buffer (``out=``, for a
loop whose mask shape repeats, which transformers' API cannot do), and with its opt-in huge-page buffers
(``ATTNMASK_HUGE_PAGES=1``), since page faults of the fresh output dominate on small machines. The same for rows of
packed documents (``causal() & document(seq_lens=...)`` against ``create_causal_mask`` from packed ``position_ids``
without an attention mask, transformers' packed-sequence path). Then a small attention
section: the ``reference`` and ``sdpa`` backends of ``attnmask.attention`` on the same kind of padded batch.
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import time

import torch

import attnmask as am

dense_buffers = importlib.import_module("attnmask._dense")


def left_padded_attention_mask(batch: int, length: int) -> torch.Tensor:
    """Row i has ``i * length * 300 // 4096`` padding tokens on the left (as the peer script, scaled to length)."""
    mask = torch.ones(batch, length, dtype=torch.long)
    for i in range(batch):
        mask[i, : i * length * 300 // 4096] = 0
    return mask


def packed_position_ids(batch: int, length: int, seed: int = 0) -> tuple[torch.Tensor, list[list[int]]]:
    """Rows of packed documents, 1/16 to 1/4 of the row long (the last one cut to fit): ``position_ids`` restarting at
    0 for each document (what transformers reads packed sequences from) and the document lengths per row."""
    gen = torch.Generator().manual_seed(seed)
    lengths = []
    for _ in range(batch):
        row, left = [], length
        while left > 0:
            row.append(min(left, int(torch.randint(length // 16, length // 4 + 1, (1,), generator=gen))))
            left -= row[-1]
        lengths.append(row)
    position_ids = torch.cat([torch.cat([torch.arange(n) for n in row]).view(1, -1) for row in lengths])
    return position_ids, lengths


def hf_mask_builder(
    attn_implementation: str,
    dtype: torch.dtype,
    batch: int,
    length: int,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
):
    from transformers import LlamaConfig
    from transformers.masking_utils import create_causal_mask

    cfg = LlamaConfig(
        hidden_size=8, num_attention_heads=1, num_key_value_heads=1, intermediate_size=8, num_hidden_layers=1
    )
    cfg._attn_implementation = attn_implementation
    embeds = torch.zeros(batch, length, 8, dtype=dtype)
    if position_ids is None:
        position_ids = torch.arange(length).expand(batch, length)

    def build():
        return create_causal_mask(
            config=cfg, inputs_embeds=embeds, attention_mask=attention_mask, past_key_values=None,
            position_ids=position_ids,
        )  # fmt: skip

    return build


def timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process: user + system over all threads, page faults included)."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    del out
    return wall, cpu


def race(contenders: dict, repeat: int) -> dict[str, tuple[float, float]]:
    """Median (wall, CPU) seconds of each contender over ``repeat`` runs, interleaved so noise hits all alike.

    CPU time (user + system, all threads, page faults included) is reported too because wall time on a shared
    machine includes waiting for a core.
    """
    for fn in contenders.values():
        timed(fn)  # warm-up
    samples = {name: [] for name in contenders}
    for _ in range(repeat):
        for name, fn in contenders.items():
            samples[name].append(timed(fn))
    return {name: tuple(statistics.median(x) for x in zip(*ts, strict=True)) for name, ts in samples.items()}


def with_huge_pages(fn):
    def run():
        saved, dense_buffers.USE_HUGE_PAGES = dense_buffers.USE_HUGE_PAGES, True
        try:
            return fn()
        finally:
            dense_buffers.USE_HUGE_PAGES = saved

    return run


def mask_section(batch: int, length: int, repeat: int, packed: bool = False) -> None:
    """Causal + left padding (transformers from the 2D attention mask), or with ``packed`` rows of packed documents
    (transformers from packed ``position_ids``, no attention mask: ``causal() & document(seq_lens=...)``)."""
    if packed:
        position_ids, lengths = packed_position_ids(batch, length)
        spec = am.causal() & am.document(seq_lens=lengths)
        peer = dict(position_ids=position_ids)
        title = f"causal + packed documents ({sum(map(len, lengths))} documents of {length // 16}-{length // 4})"
    else:
        attention_mask = left_padded_attention_mask(batch, length)
        spec = am.causal() & am.key_padding(attention_mask)
        peer = dict(attention_mask=attention_mask)
        title = "causal + left padding"
    shape = (batch, 1, length, length)
    forms = [
        ("sdpa bool", "sdpa", torch.float32, lambda out=None: spec.to_dense(length, out=out).unsqueeze(1)),
        ("eager fp32", "eager", torch.float32, lambda out=None: spec.to_additive(length, dtype=torch.float32, out=out)),
        (
            "eager bf16",
            "eager",
            torch.bfloat16,
            lambda out=None: spec.to_additive(length, dtype=torch.bfloat16, out=out),
        ),
    ]
    print(f"\n## mask ({batch}, 1, {length}, {length}), {title}; median of {repeat} interleaved runs")
    print("ms as wall / CPU; speed-up = transformers time / attnmask time (wall, CPU)")
    print("fresh: a new output every call (as transformers); reused: the caller's buffer via out= (a loop whose")
    print("mask shape repeats); huge pages: fresh output on opt-in huge pages")
    print("| form | transformers | attnmask fresh | speed-up | attnmask reused | speed-up | huge pages | speed-up |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for label, impl, dtype, ours in forms:
        theirs = hf_mask_builder(impl, dtype, batch, length, **peer)
        buffer = torch.empty(
            shape if impl == "eager" else shape[:1] + shape[2:], dtype=torch.bool if impl == "sdpa" else dtype
        )
        want, got, into = theirs(), ours(), ours(buffer)
        for mine in (got, into):
            assert want.shape == mine.shape and want.dtype == mine.dtype and torch.equal(want, mine), label
        del want, got, into
        t = race(
            {
                "hf": theirs,
                "ours": ours,
                "reused": lambda ours=ours, buffer=buffer: ours(buffer),
                "huge": with_huge_pages(ours),
            },
            repeat,
        )
        print(
            f"| {label} | {ms(t['hf'])} | {ms(t['ours'])} | {speedup(t['hf'], t['ours'])} "
            f"| {ms(t['reused'])} | {speedup(t['hf'], t['reused'])} "
            f"| {ms(t['huge'])} | {speedup(t['hf'], t['huge'])} |"
        )


def ms(times: tuple[float, float]) -> str:
    return f"{times[0] * 1e3:.0f} / {times[1] * 1e3:.0f}"


def speedup(base: tuple[float, float], new: tuple[float, float]) -> str:
    return f"{base[0] / new[0]:.2f}x / {base[1] / new[1]:.2f}x"


def attention_section(repeat: int) -> None:
    batch, heads, kv_heads, length, dim = 2, 4, 2, 1024, 64
    attention_mask = left_padded_attention_mask(batch, length)
    spec = am.causal() & am.key_padding(attention_mask)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(batch, heads, length, dim, generator=gen)
    k = torch.randn(batch, kv_heads, length, dim, generator=gen)
    v = torch.randn(batch, kv_heads, length, dim, generator=gen)
    ref = am.attention(q, k, v, spec, backend="reference")
    torch.testing.assert_close(am.attention(q, k, v, spec, backend="sdpa"), ref, atol=1e-4, rtol=1e-4)
    t = race(
        {
            "reference": lambda: am.attention(q, k, v, spec, backend="reference"),
            "sdpa": lambda: am.attention(q, k, v, spec, backend="sdpa"),
            "auto": lambda: am.attention(q, k, v, spec),
        },
        repeat,
    )
    print(f"\n## attention fp32, B={batch} H={heads} Hkv={kv_heads} L={length} D={dim}, causal + left padding")
    print("| backend | ms (wall / CPU) | speed-up vs reference (wall / CPU) |")
    print("|---|---:|---:|")
    for name, times in t.items():
        print(f"| {name} | {ms(times)} | {speedup(t['reference'], times)} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--skip-attention", action="store_true")
    parser.add_argument("--quick", action="store_true", help="small sizes, a smoke run: (4, 1, 1024, 1024), 3 runs")
    args = parser.parse_args()
    if args.quick:
        args.batch, args.length, args.repeat = 4, 1024, 3
    import transformers

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads")
    print(f"command: {__doc__.splitlines()[0]}")
    mask_section(args.batch, args.length, args.repeat)
    mask_section(args.batch, args.length, args.repeat, packed=True)
    if not args.skip_attention:
        attention_section(max(3, args.repeat // 2))


if __name__ == "__main__":
    main()
