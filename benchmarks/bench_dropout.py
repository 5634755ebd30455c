"""PYTHONPATH=src:. python benchmarks/bench_dropout.py [--threads 1] [--quick] [--rows 2] [--length 4096] [--p 0.1]

Attention dropout on packed rows, forward + backward, against its peers in the same process on the same inputs
(``--rows`` rows of ``--length`` tokens, lognormal document lengths (mean ~550), causal inside documents, H=8, D=64,
float32, ``dropout_p=--p``):

- attnmask: ``am.attention(q, k, v, causal() & document(...), dropout_p=p)`` with ``backend="auto"`` (which picks a
  backend that has dropout: per-document ``varlen`` here);
- SDPA with a dense document-causal bool mask and ``dropout_p`` (what transformers' sdpa does for packed rows given
  a 4D mask, and what attnmask's transformers integration did before ``attention`` had dropout); building the mask
  is part of its time;
- a per-document SDPA loop with ``dropout_p`` (only useful pairs computed, one kernel call per document).

Also printed: attnmask with ``dropout_p=0`` on the same inputs, so the cost of dropout itself shows. Outputs under
dropout are random draws, so instead of a max abs difference the table checks that the mean over all outputs of
attnmask and the dense peer agree (unbiased dropout: both estimate the no-dropout output) and reports the no-dropout
max abs difference of attnmask against the dense peer. Prints a table of best-of-``--reps`` wall and process CPU
times (rounds interleave the four, so other load on a shared machine hits all alike) and ratios (peer / attnmask:
> 1 means attnmask is faster). ``--quick``: rows of 1024 tokens (a smoke run).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from bench_attention import lognormal_lengths  # same folder: the document lengths of bench_attention

import attnmask as am
from attnmask.attention import _prepare_call, choose_backend


def interleaved_best(fns: dict, reps: int) -> tuple[dict, dict]:
    """Best wall and best process CPU seconds of each of ``fns`` over ``reps`` rounds that call every function once
    (after one warm-up round), and each one's last result: a burst of other load on a shared machine then hits every
    side alike instead of one."""
    times = {name: [] for name in fns}
    outs = {name: fn() for name, fn in fns.items()}
    for _ in range(reps):
        for name, fn in fns.items():
            w0, c0 = time.perf_counter(), time.process_time()
            outs[name] = fn()
            times[name].append((time.perf_counter() - w0, time.process_time() - c0))
    best = {name: (min(t[0] for t in ts), min(t[1] for t in ts)) for name, ts in times.items()}
    return best, outs


def dense_sdpa(q, k, v, spec, p):
    """Peer: SDPA with the spec's dense bool mask ``(B, 1, L, L)`` (built here) and ``dropout_p``."""
    mask = spec.to_dense(q.shape[2]).unsqueeze(1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)


def per_document_loop(q, k, v, row_lens, p):
    """Peer: SDPA(is_causal=True, dropout_p) on every document of every row alone, outputs concatenated."""
    rows = []
    for r, lens in enumerate(row_lens):
        outs, start = [], 0
        for n in lens:
            sl = slice(start, start + n)
            qs, ks, vs = q[r : r + 1, :, sl], k[r : r + 1, :, sl], v[r : r + 1, :, sl]
            outs.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, dropout_p=p))
            start += n
        rows.append(torch.cat(outs, dim=2))
    return torch.cat(rows)


def fwd_bwd(fn, q, k, v, grad_out):
    """Forward and backward of ``fn`` on fresh leaves; returns the output (detached)."""
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves)
    out.backward(grad_out)
    return out.detach()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="rows of 1024 tokens: a smoke run")
    parser.add_argument("--rows", type=int, default=2)
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--p", type=float, default=0.1, help="attention dropout probability")
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    length = 1024 if args.quick else args.length
    gen = torch.Generator().manual_seed(0)
    row_lens = [lognormal_lengths(length, gen) for _ in range(args.rows)]
    ids = torch.tensor([[d for d, n in enumerate(lens) for _ in range(n)] for lens in row_lens])
    spec = am.causal() & am.document(doc_ids=ids)
    q, k, v = (torch.randn(args.rows, 8, length, 64, generator=gen) for _ in range(3))
    grad_out = torch.randn(q.shape, generator=gen)
    p = args.p
    picked = choose_backend(_prepare_call(q, k, v, spec, None, None, None, p)).name

    t0 = time.perf_counter()
    torch.manual_seed(0)
    step = lambda fn: lambda: fwd_bwd(fn, q, k, v, grad_out)  # noqa: E731
    best, outs = interleaved_best(
        {
            "ours": step(lambda *t: am.attention(*t, spec, dropout_p=p)),
            "zero": step(lambda *t: am.attention(*t, spec)),
            "dense": step(lambda *t: dense_sdpa(*t, spec, p)),
            "loop": step(lambda *t: per_document_loop(*t, row_lens, p)),
        },
        args.reps,
    )
    t_ours, t_zero, t_dense, t_loop = best["ours"], best["zero"], best["dense"], best["loop"]
    o_ours, o_zero, o_dense = outs["ours"], outs["zero"], outs["dense"]
    exact_dense = dense_sdpa(q, k, v, spec, 0.0)
    zero_diff = (o_zero - exact_dense).abs().max().item()
    mean_gap = abs(o_ours.mean().item() - o_dense.mean().item())

    docs = sum(len(lens) for lens in row_lens)
    title = f"{args.rows} x {length} tokens, {docs} docs, p={p}"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), H=8, D=64, float32, forward + backward")
    print("| scenario | attnmask | wall (cpu) | peer | wall (cpu) | peer / attnmask wall (cpu) |")
    print("|---|---|---|---|---|---|")
    rows = [
        (f"auto ({picked}), dropout", t_ours, "SDPA + dense mask, dropout", t_dense),
        (f"auto ({picked}), dropout", t_ours, "per-document SDPA loop, dropout", t_loop),
        (f"auto ({picked}), dropout", t_ours, "attnmask auto, dropout_p=0", t_zero),
    ]
    for ours, t_o, peer, t_p in rows:
        mine = f"{t_o[0] * 1e3:.0f} ms ({t_o[1] * 1e3:.0f})"
        theirs = f"{t_p[0] * 1e3:.0f} ms ({t_p[1] * 1e3:.0f})"
        ratio = f"{t_p[0] / t_o[0]:.2f}x ({t_p[1] / max(t_o[1], 1e-9):.2f}x)"
        print(f"| {title} | {ours} | {mine} | {peer} | {theirs} | {ratio} |")
    print(
        f"checks: dropout_p=0 max abs diff vs dense SDPA {zero_diff:.1e}; |mean(out) attnmask - dense| {mean_gap:.1e}"
    )
    print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
