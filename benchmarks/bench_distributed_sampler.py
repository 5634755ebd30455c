"""PYTHONPATH=src python benchmarks/bench_distributed_sampler.py [--sequences 100000] [--max-length 2048] [--worlds 2 8]

Dealing packed rows to ranks: attnmask's `DistributedPackedSampler` against the usual pipeline, TRL's
`pack_dataset(strategy="bfd_split")` followed by torch's `DistributedSampler` over the packed rows (one row per rank
per step), on the same lognormal lengths (as /work/shared/peer-timings/trl_pack.py), in the same process.

Per world size it prints, for each side: seconds to plan one rank's epoch (packing included; the peer's dataset is
built beforehand and not timed), steps per rank, the worst and the mean over steps of max/mean real tokens across
ranks, the straggler waste (share of rank time spent waiting for the rank with the most tokens in the step, taking
time proportional to tokens), and tokens duplicated or lost per epoch. The last column is the speed ratio.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from attnmask.integrations.sampler import DistributedPackedSampler


def lognormal_lengths(n: int, max_length: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(6.0, 1.0, n).astype(int), 1, 4 * max_length)


def balance(step_tokens: np.ndarray) -> dict:
    """``step_tokens``: (steps, world) real tokens of every rank in every step."""
    mean = step_tokens.mean(axis=1)
    ratio = np.where(mean > 0, step_tokens.max(axis=1) / np.maximum(mean, 1e-9), 1.0)
    busiest = step_tokens.max(axis=1).sum() * step_tokens.shape[1]
    return {
        "worst": float(ratio.max()),
        "mean": float(ratio.mean()),
        "waste": float(1 - step_tokens.sum() / busiest) if busiest else 0.0,
    }


def ours(lengths: np.ndarray, max_length: int, world: int) -> dict:
    t = time.perf_counter()
    sampler = DistributedPackedSampler(lengths, max_length, num_replicas=world, rank=0, seed=0)
    steps = list(sampler)
    seconds = time.perf_counter() - t
    per_rank = [steps] + [
        list(DistributedPackedSampler(lengths, max_length, num_replicas=world, rank=r, seed=0)) for r in range(1, world)
    ]
    tokens = np.array([[sum(b - a for row in s[i] for _, a, b in row) for s in per_rank] for i in range(len(steps))])
    seen = tokens.sum()
    return {"seconds": seconds, "steps": len(steps), **balance(tokens), "dup": 0, "lost": int(lengths.sum() - seen)}


def peer(dataset, lengths: np.ndarray, max_length: int, world: int) -> dict:
    from torch.utils.data import DistributedSampler
    from trl import pack_dataset

    t = time.perf_counter()
    packed = pack_dataset(dataset, max_length, strategy="bfd_split")
    row_len = np.array([len(x) for x in packed["input_ids"]])
    order0 = list(DistributedSampler(range(len(row_len)), num_replicas=world, rank=0, shuffle=True, seed=0))
    seconds = time.perf_counter() - t
    orders = [order0] + [
        list(DistributedSampler(range(len(row_len)), num_replicas=world, rank=r, shuffle=True, seed=0))
        for r in range(1, world)
    ]
    tokens = np.array([[row_len[o[i]] for o in orders] for i in range(len(order0))])
    dup = int(tokens.sum() - row_len.sum())  # rows repeated to give every rank the same count
    return {
        "seconds": seconds,
        "steps": len(order0),
        **balance(tokens),
        "dup": dup,
        "lost": int(lengths.sum() - row_len.sum()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequences", type=int, default=100_000)
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 8])
    parser.add_argument("--quick", action="store_true", help="small sizes, a smoke run: 10,000 sequences, 2 ranks")
    args = parser.parse_args()
    if args.quick:
        args.sequences, args.worlds = 10_000, [2]
    from datasets import Dataset, disable_progress_bar

    disable_progress_bar()
    lengths = lognormal_lengths(args.sequences, args.max_length)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    flat = np.arange(offsets[-1]) % 50_000
    dataset = Dataset.from_dict(
        {"input_ids": [flat[offsets[i] : offsets[i + 1]].tolist() for i in range(len(lengths))]}
    )
    print(f"{args.sequences} sequences, {int(lengths.sum())} tokens, max_length {args.max_length}")
    ours(lengths[:1000], args.max_length, 2)  # warm-up of both sides (first-call costs), not reported
    peer(dataset.select(range(1000)), lengths[:1000], args.max_length, 2)
    cols = ("s/epoch plan", 12), ("steps", 6), ("worst", 7), ("mean", 7), ("waste", 7), ("dup tok", 8), ("lost tok", 8)
    print(f"{'world':>5} {'side':<34} " + " ".join(f"{name:>{width}}" for name, width in cols))
    for world in args.worlds:
        a = ours(lengths, args.max_length, world)
        b = peer(dataset, lengths, args.max_length, world)
        for name, r in (("attnmask DistributedPackedSampler", a), ("TRL bfd_split + DistributedSampler", b)):
            print(
                f"{world:>5} {name:<34} {r['seconds']:>12.3f} {r['steps']:>6} {r['worst']:>7.3f} {r['mean']:>7.4f} "
                f"{r['waste']:>7.2%} {r['dup']:>8} {r['lost']:>8}"
            )
        print(
            f"{'':>5} speed-up (peer time / ours): {b['seconds'] / a['seconds']:.1f}x; "
            f"straggler waste ours {a['waste']:.2%} vs peer {b['waste']:.2%}"
        )


if __name__ == "__main__":
    main()
