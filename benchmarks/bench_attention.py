"""PYTHONPATH=src:. python benchmarks/bench_attention.py [--threads 1] [--window-heads 1] [--flex] [--quick] [--only X]

Sparse attention backends against their peers, measured in the same process on the same inputs (H=8, D=64, fp32):

1. one packed row of 16K tokens, lognormal document lengths (mean ~550), causal inside documents: attnmask "auto"
   forward, and forward + backward, against the per-document SDPA loop (the ideal: only useful pairs computed) and
   SDPA with a dense document-causal bool mask (what transformers does for packed rows under sdpa; forward, timed once);
2. 2,000 documents of 4-12 tokens in one row: "auto", "native", "banded" and "varlen" forward against the
   per-document SDPA loop, and "auto" forward + backward against "banded" and "varlen" (the loop's backward takes
   tens of seconds);
3. a causal sliding window of 4,096 on a 32K row: "auto" and "blocksparse" forward against SDPA with a dense mask
   (a 1 GiB bool mask, which SDPA expands to a float mask per head: 4 GiB a head, so this scenario runs with
   ``--window-heads 1`` by default; both sides scale linearly in heads) and, with --flex, compiled FlexAttention with
   the same BlockMask (after warm-up).

Prints one table of times and ratios (peer time / attnmask time: > 1 means attnmask is faster) in wall-clock and in
process CPU time (best of a few runs; CPU time is the steadier figure on a shared machine), the ratio of the median
wall times (which includes the runs whose fresh output happened to page-fault), which backend "auto"
picked, and the max abs difference of every output from its peer's. ``--threads`` sets torch's intra-op threads for
both sides (default 1: on a shared 2-core machine, more threads than free cores make timings meaningless).
``--quick`` divides the lengths by 4 (a smoke run, not the acceptance sizes); ``--only`` runs one scenario
(``packed``, ``tiny`` or ``window``).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import attnmask as am


class Timing(tuple):
    """``(wall seconds, process CPU seconds)`` of the best run, then the median wall seconds of all runs."""


def best_time(fn, reps: int):
    """Best wall time, best process CPU time and median wall time of ``reps`` calls after one warm-up call, and the
    last result.

    With one thread, CPU time is what the call costs even when other jobs take turns on the cores."""
    out = fn()
    walls, cpus = [], []
    for _ in range(reps):
        w0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
    return Timing((min(walls), min(cpus), statistics.median(walls))), out


def once(fn):
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    wall = time.perf_counter() - w0
    return Timing((wall, time.process_time() - c0, wall)), out


def dense_sdpa(q, k, v, spec):
    """The peer that materialises the mask: SDPA with ``spec.to_dense`` (mask building included), timed once."""
    return once(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=spec.to_dense(q.shape[2])))


def lognormal_lengths(total: int, gen: torch.Generator) -> list[int]:
    """Document lengths ``max(1, int(exp(N(6, 0.8))))`` until ``total`` tokens, the last one cut to fit."""
    lens: list[int] = []
    while sum(lens) < total:
        lens.append(max(1, int(torch.exp(6.0 + 0.8 * torch.randn((), generator=gen)))))
    lens[-1] -= sum(lens) - total
    return lens


def per_document_loop(q, k, v, lens):
    """The peer: SDPA(is_causal=True) on every document alone, outputs concatenated."""
    outs, start = [], 0
    for n in lens:
        sl = slice(start, start + n)
        outs.append(F.scaled_dot_product_attention(q[:, :, sl], k[:, :, sl], v[:, :, sl], is_causal=True))
        start += n
    return torch.cat(outs, dim=2)


def fwd_bwd(fn, q, k, v, grad_out):
    """Forward and backward of ``fn`` on fresh leaves; returns the gradient of q."""
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    fn(*leaves).backward(grad_out)
    return leaves[0].grad


def auto_name(q, k, v, spec):
    return am.explain(q, k, v, spec).picked


def packed_row(n: int, gen, rows: list):
    lens = lognormal_lengths(n, gen)
    spec = am.causal() & am.document(seq_lens=lens)
    q, k, v = (torch.randn(1, 8, n, 64, generator=gen) for _ in range(3))
    ours = lambda q, k, v: am.attention(q, k, v, spec)  # noqa: E731
    peer = lambda q, k, v: per_document_loop(q, k, v, lens)  # noqa: E731
    picked = auto_name(q, k, v, spec)
    t_ours, o_ours = best_time(lambda: ours(q, k, v), 3)
    t_loop, o_loop = best_time(lambda: peer(q, k, v), 3)
    diff = (o_ours - o_loop).abs().max().item()
    title = f"packed row {n} tokens, {len(lens)} docs"
    rows.append((title, f"auto ({picked}) fwd", t_ours, "per-document SDPA loop", t_loop, diff))
    t_dense, o_dense = dense_sdpa(q, k, v, spec)
    rows.append(
        (title, f"auto ({picked}) fwd", t_ours, "SDPA + dense mask", t_dense, (o_ours - o_dense).abs().max().item())
    )
    del o_dense
    grad_out = torch.randn(o_ours.shape, generator=gen)
    t_ours_b, g_ours = best_time(lambda: fwd_bwd(ours, q, k, v, grad_out), 2)
    t_loop_b, g_loop = best_time(lambda: fwd_bwd(peer, q, k, v, grad_out), 2)
    diff_b = (g_ours - g_loop).abs().max().item()
    rows.append((title, f"auto ({picked}) fwd+bwd", t_ours_b, "per-document SDPA loop", t_loop_b, diff_b))


def tiny_documents(n_docs: int, gen, rows: list):
    lens = torch.randint(4, 13, (n_docs,), generator=gen).tolist()
    n = sum(lens)
    spec = am.causal() & am.document(seq_lens=lens)
    q, k, v = (torch.randn(1, 8, n, 64, generator=gen) for _ in range(3))
    picked = auto_name(q, k, v, spec)
    # Best of 7: each call allocates a fresh 32 MB output, which glibc sometimes maps anew (page faults: +15-20 ms
    # here) and sometimes recycles; both sides allocate their output alike.
    t_ours, o_ours = best_time(lambda: am.attention(q, k, v, spec), 7)
    t_loop, o_loop = best_time(lambda: per_document_loop(q, k, v, lens), 7)
    title = f"{n_docs} docs of 4-12 tokens ({n} tokens)"
    rows.append(
        (title, f"auto ({picked}) fwd", t_ours, "per-document SDPA loop", t_loop, (o_ours - o_loop).abs().max().item())
    )
    for backend in ("native", "banded", "varlen"):
        t_b, o_b = best_time(lambda b=backend: am.attention(q, k, v, spec, backend=b), 7)
        rows.append((title, f"{backend} fwd", t_b, "per-document SDPA loop", t_loop, (o_b - o_loop).abs().max().item()))
    # Forward + backward: the loop's backward takes tens of seconds here (a full-size zero gradient per document
    # slice), so the peers are attnmask's other backends for these inputs.
    grad_out = torch.randn(q.shape, generator=gen)
    fb = {
        b: best_time(lambda b=b: fwd_bwd(lambda *t: am.attention(*t, spec, backend=b), q, k, v, grad_out), 5)
        for b in ("auto", "banded", "varlen")
    }
    for peer in ("banded", "varlen"):
        diff = (fb["auto"][1] - fb[peer][1]).abs().max().item()
        rows.append((title, f"auto ({picked}) fwd+bwd", fb["auto"][0], f"{peer} fwd+bwd", fb[peer][0], diff))


def sliding_window(n: int, window: int, heads: int, gen, rows: list, flex: bool):
    spec = am.sliding_window(window)
    q, k, v = (torch.randn(1, heads, n, 64, generator=gen) for _ in range(3))
    picked = auto_name(q, k, v, spec)
    t_auto, o_auto = best_time(lambda: am.attention(q, k, v, spec), 1)
    t_bs, o_bs = best_time(lambda: am.attention(q, k, v, spec, backend="blocksparse"), 1)
    t_dense, o_dense = dense_sdpa(q, k, v, spec)
    title = f"sliding window {window}, {n} tokens, H={heads}"
    rows.append(
        (title, f"auto ({picked}) fwd", t_auto, "SDPA + dense mask", t_dense, (o_auto - o_dense).abs().max().item())
    )
    rows.append((title, "blocksparse fwd", t_bs, "SDPA + dense mask", t_dense, (o_bs - o_dense).abs().max().item()))
    if flex:
        from torch.nn.attention.flex_attention import flex_attention

        compiled = torch.compile(flex_attention, dynamic=False)
        block_mask = spec.block_layout(n, block_size=128).to_flex()
        t_compile, _ = once(lambda: compiled(q, k, v, block_mask=block_mask))
        print(f"(flex compile + first call: {t_compile[0]:.1f} s)")
        t_flex, o_flex = best_time(lambda: compiled(q, k, v, block_mask=block_mask), 1)
        rows.append(
            (title, "blocksparse fwd", t_bs, "compiled flex_attention", t_flex, (o_bs - o_flex).abs().max().item())
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--flex", action="store_true", help="also time compiled FlexAttention (compiles for ~15 s)")
    parser.add_argument("--quick", action="store_true", help="lengths / 4: a smoke run")
    parser.add_argument(
        "--window-heads",
        type=int,
        default=1,
        help="heads of the sliding-window scenario (dense SDPA expands its mask to (H, L, L) float: 4 GiB per head)",
    )
    parser.add_argument("--only", choices=["packed", "tiny", "window"], help="run this scenario only")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    scale = 4 if args.quick else 1
    gen = torch.Generator().manual_seed(0)
    rows: list = []
    t0 = time.perf_counter()
    if args.only in (None, "packed"):
        packed_row(16384 // scale, gen, rows)
    if args.only in (None, "tiny"):
        tiny_documents(2000 // scale, gen, rows)
    if args.only in (None, "window"):
        sliding_window(32768 // scale, 4096 // scale, args.window_heads, gen, rows, args.flex)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), H=8, D=64, float32")
    print(
        "| scenario | attnmask | wall (cpu) | peer | wall (cpu) | peer / attnmask wall (cpu) | ratio of median walls "
        "| max abs diff |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for title, ours, t_ours, peer, t_peer, diff in rows:
        mine = f"{t_ours[0] * 1e3:.0f} ms ({t_ours[1] * 1e3:.0f})"
        theirs = f"{t_peer[0] * 1e3:.0f} ms ({t_peer[1] * 1e3:.0f})"
        ratio = f"{t_peer[0] / t_ours[0]:.2f}x ({t_peer[1] / max(t_ours[1], 1e-9):.2f}x)"
        median = f"{t_peer[2] / t_ours[2]:.2f}x"
        print(f"| {title} | {ours} | {mine} | {peer} | {theirs} | {ratio} | {median} | {diff:.1e} |")
    print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
