"""PYTHONPATH=src python benchmarks/bench_hf_train.py [--rows 128,256,512,1024,4096] [--tokens 8192] [--repeats 5]
[--backend auto] [--log-mean 5.0] [--seqs N] [--threads N] [--clock wall|cpu] [--device cpu|cuda] [--busy] [--quick]

Training-step time of a tiny random-weight Llama on the same sequences, three ways, in the same process:

- ``packed + attnmask``: `DataCollatorForCausalLM(packing=True)` rows, ``attn_implementation="attnmask"`` (documents
  from the packed ``position_ids``; ``attnmask.attention`` picks the backend, no O(L^2) mask where a cheaper exact
  form exists);
- ``padded + sdpa``: the same sequences right-padded to the longest (`DataCollatorForCausalLM()`), transformers'
  sdpa with its own causal + padding mask;
- ``packed + sdpa (dense)``: the same packed rows as the first, transformers' sdpa given the exact 4D bool mask
  ``causal() & document(...) & key_padding(...)`` lowered densely (the correct way to pack with plain sdpa:
  an all-ones 2D mask would attend across documents, transformers PR #46634). Building that mask is part of its
  timed step, as the other two build theirs inside the forward.

Each step gets fresh copies of its input tensors, as a training loop's next batch does: attnmask's integration keeps
a batch's spec (and the plans made on it) while its tensors live unchanged, which a loop that fed the same tensors
again would reuse from the second step on; fresh tensors make each step build its spec and plan once, for all the
layers and the backward (a new batch per step costs that too).

A step is forward + backward + AdamW over all the sequences, loss normalised over their target tokens. Lengths are
lognormal (``--log-mean 5.0``: mean about 180 tokens before clipping), clipped to the row length. Per row length of
``--rows``, sequences are drawn until they hold ``--tokens`` real tokens (or ``--seqs`` of them, when given), so every
size trains on about the same number of tokens. The three losses of the first step are printed as a check (same
tokens, same targets: equal up to float rounding). Per size, the three runs alternate in ``--repeats`` rounds (the
order rotated each round). The speed-up of packed + attnmask over a peer (> 1: attnmask is faster) is the median over
rounds of the peer's step time over attnmask's in the same round: the two steps ran seconds apart, so load on a shared
machine that comes and goes between rounds cancels in the ratio; the best step time of each run is printed beside it.
Per size, the share of attnmask's step spent preparing its calls and choosing their backends (``ChoiceClock``: the
per-call overhead as a training step pays it, once per batch and layer) is printed too. A table of every size
follows, with the command that made it. ``--busy``: every size is measured while another process spins on one
core (``bench_limit.Spinner``, as a DataLoader worker beside a training loop does), all three runs alike.
``--device cuda``: models and batches on the GPU (each step ends in the loss's read-back, so wall time covers its
kernels; not run on a GPU yet).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
import time

import numpy as np
import torch

from attnmask.integrations import hf
from attnmask.loss import masked_cross_entropy
from attnmask.masks import MaskSpec

RUNS = ("packed + attnmask", "padded + sdpa", "packed + sdpa (dense)")


def make_sequences(n: int, max_length: int, seed: int, log_mean: float = 5.0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    lens = np.clip(rng.lognormal(log_mean, 0.7, n).astype(int), 8, max_length)
    return [rng.integers(1, 1000, int(m)).tolist() for m in lens]


def sequences_for(tokens: int, max_length: int, seed: int, log_mean: float) -> list[list[int]]:
    """Lognormal sequences clipped to ``max_length``, the fewest whose lengths add up to at least ``tokens``."""
    rng = np.random.default_rng(seed)
    lens: list[int] = []
    while sum(lens) < tokens:
        lens.append(int(np.clip(rng.lognormal(log_mean, 0.7), 8, max_length)))
    return [rng.integers(1, 1000, m).tolist() for m in lens]


def tiny_llama(impl: str, state: dict | None, device: str = "cpu"):
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=2,
        vocab_size=1000,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation=impl)
    if state is not None:
        model.load_state_dict(state)
    return model.to(device).train()


def step(model, optimizer, inputs: dict, labels: torch.Tensor) -> float:
    inputs = {k: t.clone() if torch.is_tensor(t) else t for k, t in inputs.items()}  # a new batch's tensors
    mask = inputs.get("attention_mask")
    if isinstance(mask, MaskSpec):  # the dense peer: lower the batch's spec to a (B, 1, L, L) bool mask, O(B·L^2)
        ids = inputs["input_ids"]
        inputs = dict(inputs, attention_mask=mask.to_dense(ids.shape[1]).to(ids.device)[:, None])
    logits = model(**inputs, use_cache=False).logits
    loss = masked_cross_entropy(logits, labels)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


class ChoiceClock:
    """Time spent in ``attnmask.attention``'s call preparation and backend choice (``_prepare_call`` and
    ``choose_backend``: validation, the plan cache, the estimates and the plans they build), the per-call overhead of
    issue 15 as a training step pays it: a batch's spec is planned at its first layer, and the other layers and the
    backward find the plans in the cache. ``spent`` accumulates seconds while installed
    (``with ChoiceClock() as c``)."""

    def __init__(self):
        self.spent = 0.0
        self._saved = None

    def _timed(self, fn):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.spent += time.perf_counter() - start

        return timed

    def __enter__(self):
        module = importlib.import_module("attnmask.attention")  # the module (the package exports the function)
        self._saved = (module, module._prepare_call, module.choose_backend)
        module._prepare_call, module.choose_backend = (
            self._timed(module._prepare_call),
            self._timed(module.choose_backend),
        )
        return self

    def __exit__(self, *exc):
        module, prepare, choose = self._saved
        module._prepare_call, module.choose_backend = prepare, choose


def measure(
    seqs: list[list[int]], row_length: int, repeats: int, state: dict, clock=time.perf_counter, device: str = "cpu"
) -> dict:
    """Best step time (seconds) of each of ``RUNS`` on ``seqs`` over ``repeats`` interleaved rounds, the median over
    rounds of each run's time over packed + attnmask's in the same round (``ratio``), the batches' shapes and the first
    step's losses."""
    examples = [{"input_ids": s} for s in seqs]
    packed = hf.DataCollatorForCausalLM(0, packing=True, max_length=row_length, return_batch=True)(examples)
    padded = hf.DataCollatorForCausalLM(0, return_batch=True)(examples)
    runs = {
        RUNS[0]: ("attnmask", {"input_ids": packed.input_ids, "position_ids": packed.position_ids}, packed),
        RUNS[1]: ("sdpa", padded.model_inputs(labels=False), padded),
        RUNS[2]: (
            "sdpa",
            {"input_ids": packed.input_ids, "position_ids": packed.position_ids, "attention_mask": packed.mask},
            packed,
        ),
    }
    runs = {  # on the device (the dense peer's spec stays where it is: step lowers it there)
        name: (impl, {k: t.to(device) if torch.is_tensor(t) else t for k, t in inputs.items()}, batch)
        for name, (impl, inputs, batch) in runs.items()
    }
    labels = {name: batch.labels.to(device) for name, (_, _, batch) in runs.items()}
    models = {name: tiny_llama(impl, state, device) for name, (impl, _, _) in runs.items()}
    optims = {name: torch.optim.AdamW(m.parameters(), lr=1e-4) for name, m in models.items()}
    losses = {name: step(models[name], optims[name], inputs, labels[name]) for name, (_, inputs, _) in runs.items()}
    times: dict[str, list[float]] = {name: [] for name in runs}
    shares: list[float] = []  # the choice's share of each packed + attnmask step (wall time)
    order = list(runs)
    for r in range(repeats):
        for name in order[r % len(order) :] + order[: r % len(order)]:
            _, inputs, _ = runs[name]
            with ChoiceClock() if name == RUNS[0] else contextlib.nullcontext() as choice:
                t, wall = clock(), time.perf_counter()
                step(models[name], optims[name], inputs, labels[name])
                times[name].append(clock() - t)
            if choice is not None:
                shares.append(choice.spent / (time.perf_counter() - wall))
    ours = times[RUNS[0]]
    return {
        "choice": float(np.median(shares)),
        "best": {name: min(ts) for name, ts in times.items()},
        "ratio": {name: float(np.median([t / o for t, o in zip(ts, ours, strict=True)])) for name, ts in times.items()},
        "losses": losses,
        "packed": tuple(packed.input_ids.shape),
        "padded": tuple(padded.input_ids.shape),
    }


def _busy_core():
    """``bench_limit.Spinner``: another process spinning on one core for the block (same folder)."""
    import bench_limit  # noqa: PLC0415  (only with --busy: it imports the whole limit benchmark)

    return bench_limit.Spinner()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", default=None, help="comma-separated row lengths (packed rows), e.g. 128,256,4096")
    parser.add_argument("--max-length", type=int, default=1024, help="one row length (when --rows is not given)")
    parser.add_argument("--tokens", type=int, default=8192, help="real tokens per batch (drawn until reached)")
    parser.add_argument("--seqs", type=int, default=None, help="a fixed number of sequences instead of --tokens")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--log-mean", type=float, default=5.0, help="mean of log(length): 5.0 gives ~190 tokens, 3.5 gives ~40"
    )
    parser.add_argument("--backend", default="auto", help="attnmask.attention backend of the attnmask run")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall time, or this process's CPU time (with --threads 1: the step's own work, not the time other "
        "processes of a shared machine held the core)",
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--busy", action="store_true", help="measure while another process spins on one core")
    parser.add_argument(
        "--quick", action="store_true", help="small sizes, a smoke run: 16 sequences, rows of 256, 2 rounds"
    )
    args = parser.parse_args()
    if args.quick:
        args.seqs, args.rows, args.repeats = 16, "256", 2
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    rows = [int(r) for r in args.rows.split(",")] if args.rows else [args.max_length]
    clock = time.process_time if args.clock == "cpu" else time.perf_counter

    hf.register(backend=args.backend)
    state = tiny_llama("sdpa", None).state_dict()
    print(
        f"torch {torch.__version__} on {args.device}, {torch.get_num_threads()} threads, {args.clock} clock, "
        f"attnmask backend {args.backend!r}, {'one core busy (another process spinning), ' if args.busy else ''}"
        f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}"
    )
    summary = []
    for length in rows:
        if args.seqs is not None:
            seqs = make_sequences(args.seqs, length, args.seed, args.log_mean)
        else:
            seqs = sequences_for(args.tokens, length, args.seed, args.log_mean)
        with _busy_core() if args.busy else contextlib.nullcontext():
            result = measure(seqs, length, args.repeats, state, clock, args.device)
        best, real = result["best"], sum(map(len, seqs))
        print(
            f"\nrows of {length}: {len(seqs)} sequences, {real} real tokens (mean {real / len(seqs):.0f}, longest "
            f"{max(map(len, seqs))}); packed {result['packed']}, padded {result['padded']}"
        )
        print("first-step losses (should agree): " + ", ".join(f"{k}: {v:.5f}" for k, v in result["losses"].items()))
        print(f"attnmask's preparation and choice of backends: {result['choice']:.1%} of its step (median)")
        print(f"| run | ms/step (best of {args.repeats}) | real tokens/s | attnmask speed-up (median of rounds) |")
        print("|---|---:|---:|---:|")
        for name in RUNS:
            ms = best[name]
            print(f"| {name} | {ms * 1e3:.1f} | {real / ms:,.0f} | {result['ratio'][name]:.2f}x |")
        summary.append((length, result, real))

    print(
        f"\nspeed-up of packed + attnmask (> 1: faster): median over {args.repeats} interleaved rounds of the peer's "
        "step time over attnmask's in the same round (in brackets: ratio of the best step times)"
    )
    print(
        "| row length | packed | padded | real tokens | attnmask ms | vs packed + sdpa (dense) | vs padded + sdpa "
        "| choice share |"
    )
    print("|---:|---|---|---:|---:|---:|---:|---:|")
    for length, result, real in summary:
        best, ratio = result["best"], result["ratio"]
        ours = best[RUNS[0]]
        print(
            f"| {length} | {result['packed'][0]} x {result['packed'][1]} | {result['padded'][0]} x "
            f"{result['padded'][1]} | {real} | {ours * 1e3:.1f} | "
            f"{ratio[RUNS[2]]:.2f}x ({best[RUNS[2]] / ours:.2f}x) | "
            f"{ratio[RUNS[1]]:.2f}x ({best[RUNS[1]] / ours:.2f}x) | {result['choice']:.1%} |"
        )
    print("\ncommand: PYTHONPATH=src python benchmarks/bench_hf_train.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
