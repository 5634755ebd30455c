"""Multi-process harness for tests/test_distributed.py: gloo process groups on this machine, with timeouts.

`run_world(world_size, job)` starts `world_size` spawned processes, each of which joins a gloo group on 127.0.0.1 (a
free port found by binding a socket), runs `JOBS[job](rank, world_size)` and sends back its result (plain Python /
numpy values). A worker that fails, or a world that does not finish within the timeout, fails the test instead of
hanging it. Kept in its own module so that spawned workers import little.
"""

from __future__ import annotations

import datetime
import itertools
import os
import queue
import socket
import traceback

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, job: str, results) -> None:
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=60))
        try:
            result = JOBS[job](rank, world_size)
            dist.barrier()  # no rank tears the group down while another is still in a collective
            results.put((rank, "ok", result))
        finally:
            dist.destroy_process_group()
    except BaseException:  # report every failure to the parent instead of dying silently
        results.put((rank, "error", traceback.format_exc()))


def run_world(world_size: int, job: str, timeout: float = 90.0) -> list:
    """Results of `JOBS[job]` on ranks 0..world_size-1; raises on a worker error or on timeout."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, job, results)) for r in range(world_size)]
    for p in procs:
        p.start()
    out: dict[int, object] = {}
    try:
        for _ in range(world_size):
            rank, status, value = results.get(timeout=timeout)
            if status != "ok":
                raise RuntimeError(f"rank {rank} of {world_size} failed:\n{value}")
            out[rank] = value
    except queue.Empty as e:
        raise TimeoutError(f"{job}: world of {world_size} did not finish in {timeout} s") from e
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()
    return [out[r] for r in range(world_size)]


# ----------------------------------------------------------------------------------------------------------------------
# Shared inputs (the parent builds the same ones for the single-process reference)


def attention_cases():
    """(name, spec, seq_len, B, H, Hkv, D) for the context-parallel tests; lengths that 2W does not divide too."""
    import attnmask as am

    return [
        ("document_causal", am.causal() & am.document(seq_lens=[5, 11, 3, 13], length=34), 34, 1, 4, 2, 8),
        ("sliding_window", am.sliding_window(5), 30, 2, 2, 2, 8),
        ("doc_window_rows", am.sliding_window(4) & am.document(seq_lens=[[9, 15], [24]]), 24, 2, 2, 1, 4),
        ("prefix_or_window", am.prefix_lm([7]) | am.sliding_window(3), 26, 1, 2, 1, 4),
        ("chunk_pad_custom", am.chunked(6) & am.key_padding(padding) & am.custom(not_multiple_of_5), 28, 1, 2, 2, 4),
    ]


padding = torch.tensor([[1] * 20 + [0] * 8])


def not_multiple_of_5(b, h, q, k):
    return (q + k) % 5 != 0


def attention_inputs(seq_len, B, H, Hkv, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, seq_len, D, generator=g)
    k = torch.randn(B, Hkv, seq_len, D, generator=g)
    v = torch.randn(B, Hkv, seq_len, D, generator=g)
    grad = torch.randn(B, H, seq_len, D, generator=g)
    return q, k, v, grad


def sampler_lengths(n=2000, seed=0):
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(6.0, 1.0, n).astype(int), 1, 4 * 2048)


def loss_inputs(world_size, seed=0):
    """Logits and labels of a whole optimizer step, and the rows each rank holds (uneven target counts)."""
    g = torch.Generator().manual_seed(seed)
    rows, length, vocab = 2 * world_size, 12, 7
    logits = torch.randn(rows, length, vocab, generator=g)
    labels = torch.randint(0, vocab, (rows, length), generator=g)
    for r in range(rows):  # row r keeps r + 2 targets: ranks hold very different counts
        labels[r, r + 3 :] = -100
    owner = [r % world_size if r < world_size else 0 for r in range(rows)]  # rank 0 holds the extra rows
    return logits, labels, owner


# ----------------------------------------------------------------------------------------------------------------------
# Jobs


def job_attention(rank: int, world_size: int):
    from attnmask.integrations.context_parallel import (
        context_parallel_attention,
        context_parallel_positions,
        shard_for_context_parallel,
    )

    out = {}
    for (name, spec, seq_len, B, H, Hkv, D), method in itertools.product(attention_cases(), ("all_gather", "ring")):
        q, k, v, grad = attention_inputs(seq_len, B, H, Hkv, D)
        ql, kl, vl = (shard_for_context_parallel(t, dim=2).requires_grad_() for t in (q, k, v))
        o = context_parallel_attention(ql, kl, vl, spec, method=method)  # seq_len found by the group
        (o * shard_for_context_parallel(grad, dim=2)).sum().backward()
        out[name, method] = {
            "positions": context_parallel_positions(seq_len).numpy(),
            "out": o.detach().numpy(),
            "dq": ql.grad.numpy(),
            "dk": kl.grad.numpy(),
            "dv": vl.grad.numpy(),
        }
    return out


def job_sampler(rank: int, world_size: int):
    from attnmask.integrations.sampler import DistributedPackedSampler

    sampler = DistributedPackedSampler(sampler_lengths(), 2048, seed=3)  # replicas and rank from the group
    sampler.set_epoch(1)
    steps = [[list(row) for row in step] for step in sampler]
    counts = [torch.zeros(1, dtype=torch.long) for _ in range(world_size)]
    dist.all_gather(counts, torch.tensor([len(steps)]))
    return {"steps": steps, "len": len(sampler), "all_counts": [int(c) for c in counts]}


def job_loss(rank: int, world_size: int):
    from attnmask import masked_cross_entropy
    from attnmask.integrations.ranks import global_num_items

    logits, labels, owner = loss_inputs(world_size)
    mine = [r for r in range(len(owner)) if owner[r] == rank]
    lg, lb = logits[mine].clone().requires_grad_(), labels[mine]
    n = global_num_items(lb)
    local = masked_cross_entropy(lg, lb, num_items=n)
    (local * world_size).backward()  # what DDP then averages over ranks
    total = local.detach().clone()
    dist.all_reduce(total)
    return {"rows": mine, "num_items": int(n), "loss": float(total), "grad": (lg.grad / world_size).numpy()}


def job_flex_forward(rank: int, world_size: int):
    """Forward of PyTorch's context-parallel FlexAttention path and of our ring, without gradients (FlexAttention has
    no CPU backward), on the cases whose zig-zag shards have equal lengths."""
    from attnmask.integrations.context_parallel import (
        context_parallel_attention,
        context_parallel_positions,
        shard_for_context_parallel,
    )

    out = {}
    for name, spec, seq_len, B, H, Hkv, D in attention_cases():
        if len({len(context_parallel_positions(seq_len, world_size, r)) for r in range(world_size)}) > 1:
            continue  # unequal shards: the flex path refuses them
        q, k, v, _ = attention_inputs(seq_len, B, H, Hkv, D)
        ql, kl, vl = (shard_for_context_parallel(t, dim=2) for t in (q, k, v))
        with torch.no_grad():
            out[name] = {m: context_parallel_attention(ql, kl, vl, spec, method=m).numpy() for m in ("flex", "ring")}
    return out


def per_document_case():
    """(spec, seq_len, seq_lens, B, H, Hkv, D): a packed row whose documents 2W divides for W = 2 and 4, and padding."""
    import attnmask as am

    seq_lens = [8, 16, 8]
    return am.causal() & am.document(seq_lens=seq_lens, length=40), 40, seq_lens, 1, 4, 2, 8


def job_per_document(rank: int, world_size: int):
    """The per-document layout: all-gather forward and backward, PyTorch's flex path forward."""
    from attnmask.integrations.context_parallel import context_parallel_attention, shard_for_context_parallel

    spec, seq_len, seq_lens, B, H, Hkv, D = per_document_case()
    q, k, v, grad = attention_inputs(seq_len, B, H, Hkv, D)
    ql, kl, vl = (shard_for_context_parallel(t, dim=2, seq_lens=seq_lens).requires_grad_() for t in (q, k, v))
    o = context_parallel_attention(ql, kl, vl, spec, method="all_gather", seq_lens=seq_lens)
    (o * shard_for_context_parallel(grad, dim=2, seq_lens=seq_lens)).sum().backward()
    with torch.no_grad():
        flex = context_parallel_attention(ql, kl, vl, spec, method="flex", seq_lens=seq_lens, block_size=4)
    grads = {"dq": ql.grad.numpy(), "dk": kl.grad.numpy(), "dv": vl.grad.numpy()}
    return {"out": o.detach().numpy(), "flex": flex.numpy(), **grads}


def job_all(rank: int, world_size: int):
    """Every job in one world, so that each world size pays the process start-up once."""
    jobs = (("attention", job_attention), ("sampler", job_sampler), ("loss", job_loss))
    return {name: fn(rank, world_size) for name, fn in jobs}


def job_pytorch_cp(rank: int, world_size: int):
    """The jobs that run PyTorch's context-parallel FlexAttention path (slow to start: FlexAttention's first call)."""
    return {"flex": job_flex_forward(rank, world_size), "per_document": job_per_document(rank, world_size)}


JOBS = {
    "attention": job_attention,
    "sampler": job_sampler,
    "loss": job_loss,
    "flex": job_flex_forward,
    "pytorch_cp": job_pytorch_cp,
    "all": job_all,
}
