"""PYTHONPATH=src python benchmarks/bench_context_parallel.py [--length 4096] [--docs 9] [--world 2] [--repeats 3]

Context-parallel attention over one long packed row (document-causal mask, H=8, Hkv=8, D=64, float32), forward and
backward: each rank of a gloo world on this machine (one thread per process) against one process computing the whole
row with `attnmask.attention` (the same spec, backend "auto"), in the same run. Prints the median wall and CPU
milliseconds of a forward + backward per rank for `method="all_gather"` and `method="ring"`, the single-process
figures, and the ratios single / slowest rank (ideal = world size). CPU time is the robust figure on a shared machine
where the ranks compete for cores; wall time adds the waiting for peers. The ranks' outputs are first checked to equal
the single-process output.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import attnmask as am
from attnmask.integrations.context_parallel import (
    context_parallel_attention,
    context_parallel_positions,
    shard_for_context_parallel,
)


def inputs(length: int, docs: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    cuts = sorted(torch.randperm(length - 1, generator=g)[: docs - 1].add(1).tolist())
    seq_lens = [b - a for a, b in zip([0, *cuts], [*cuts, length], strict=True)]
    q, k, v = (torch.randn(1, 8, length, 64, generator=g) for _ in range(3))
    return am.causal() & am.document(seq_lens=seq_lens), q, k, v


def timed(fn, repeats: int) -> tuple[tuple[float, float], torch.Tensor]:
    """Median (wall seconds, CPU seconds of this process) over ``repeats`` calls after one warm-up, and the output."""
    wall, cpu, out = [], [], None
    for _ in range(repeats + 1):
        t, c = time.perf_counter(), time.process_time()
        out = fn()
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return (statistics.median(wall[1:]), statistics.median(cpu[1:])), out


def forward_backward(q, k, v, run):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = run(q, k, v)
    out.sum().backward()
    return out.detach()


def worker(rank: int, world: int, port: int, args, results) -> None:
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=300))
    spec, q, k, v = inputs(args.length, args.docs)
    ql, kl, vl = (shard_for_context_parallel(t, dim=2) for t in (q, k, v))
    out = {}
    for method in ("all_gather", "ring"):

        def run(a, b, c, method=method):
            return context_parallel_attention(a, b, c, spec, seq_len=args.length, method=method)

        dist.barrier()
        out[method] = timed(lambda run=run: forward_backward(ql, kl, vl, run), args.repeats)
    results.put((rank, {m: (t, o.numpy()) for m, (t, o) in out.items()}))  # numpy: no shared-memory handles
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--docs", type=int, default=9)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="small sizes, a smoke run: a 1024-token row, one run")
    args = parser.parse_args()
    if args.quick:
        args.length, args.repeats = 1024, 1
    torch.set_num_threads(1)
    spec, q, k, v = inputs(args.length, args.docs)
    single, ref = timed(lambda: forward_backward(q, k, v, lambda a, b, c: am.attention(a, b, c, spec)), args.repeats)

    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=worker, args=(r, args.world, port, args, results)) for r in range(args.world)]
    for p in procs:
        p.start()
    by_rank = dict(results.get(timeout=600) for _ in procs)
    for p in procs:
        p.join(timeout=30)
    print(f"one row of {args.length} tokens, {args.docs} documents, causal & document, H=8 D=64 float32, fwd+bwd")
    print(f"single process (attnmask.attention, auto): wall {single[0] * 1e3:8.1f} ms, cpu {single[1] * 1e3:8.1f} ms")
    for method in ("all_gather", "ring"):
        per_rank = [by_rank[r][method][0] for r in range(args.world)]
        for r in range(args.world):
            pos = context_parallel_positions(args.length, args.world, r)
            got = torch.from_numpy(by_rank[r][method][1])
            torch.testing.assert_close(got, ref[:, :, pos], atol=1e-4, rtol=1e-4)
        ranks = "  ".join(
            f"rank {r}: wall {w * 1e3:8.1f} ms, cpu {c * 1e3:8.1f} ms" for r, (w, c) in enumerate(per_rank)
        )
        wall_x = single[0] / max(w for w, _ in per_rank)
        cpu_x = single[1] / max(c for _, c in per_rank)
        print(f"{method:<10} world {args.world}: {ranks}   speed-up wall {wall_x:.2f}x, cpu {cpu_x:.2f}x")


if __name__ == "__main__":
    main()
