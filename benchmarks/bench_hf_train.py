"""PYTHONPATH=src python benchmarks/bench_hf_train.py [--seqs 48] [--max-length 1024] [--repeats 5] [--backend auto]
[--log-mean 5.0]

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

A step is forward + backward + AdamW over all the sequences, loss normalised over their target tokens. Lengths are
lognormal (mean about 180 tokens, some longer than 1000). The three losses of the first step are printed as a
check (same tokens, same targets: equal up to float rounding). Reports the best step time over ``--repeats``
interleaved rounds (the least disturbed by other load on a shared machine), real tokens per second and the speed-up
of packed + attnmask over each peer.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from attnmask.integrations import hf
from attnmask.loss import masked_cross_entropy
from attnmask.masks import MaskSpec


def make_sequences(n: int, max_length: int, seed: int, log_mean: float = 5.0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    lens = np.clip(rng.lognormal(log_mean, 0.7, n).astype(int), 8, max_length)
    return [rng.integers(1, 1000, int(m)).tolist() for m in lens]


def tiny_llama(impl: str, state: dict | None):
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
    return model.train()


def step(model, optimizer, inputs: dict, labels: torch.Tensor) -> float:
    mask = inputs.get("attention_mask")
    if isinstance(mask, MaskSpec):  # the dense peer: lower the batch's spec to a (B, 1, L, L) bool mask, O(B·L^2)
        inputs = dict(inputs, attention_mask=mask.to_dense(inputs["input_ids"].shape[1])[:, None])
    logits = model(**inputs, use_cache=False).logits
    loss = masked_cross_entropy(logits, labels)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seqs", type=int, default=48)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--log-mean", type=float, default=5.0, help="mean of log(length): 5.0 gives ~190 tokens, 3.5 gives ~40"
    )
    parser.add_argument("--backend", default="auto", help="attnmask.attention backend of the attnmask run")
    parser.add_argument(
        "--quick", action="store_true", help="small sizes, a smoke run: 16 sequences, rows of 256, 2 rounds"
    )
    args = parser.parse_args()
    if args.quick:
        args.seqs, args.max_length, args.repeats = 16, 256, 2

    hf.register(backend=args.backend)
    seqs = make_sequences(args.seqs, args.max_length, args.seed, args.log_mean)
    examples = [{"input_ids": s} for s in seqs]
    packed = hf.DataCollatorForCausalLM(0, packing=True, max_length=args.max_length, return_batch=True)(examples)
    padded = hf.DataCollatorForCausalLM(0, return_batch=True)(examples)

    runs = {
        "packed + attnmask": ("attnmask", {"input_ids": packed.input_ids, "position_ids": packed.position_ids}, packed),
        "padded + sdpa": ("sdpa", padded.model_inputs(labels=False), padded),
        "packed + sdpa (dense)": (
            "sdpa",
            {"input_ids": packed.input_ids, "position_ids": packed.position_ids, "attention_mask": packed.mask},
            packed,
        ),
    }
    state = tiny_llama("sdpa", None).state_dict()
    models = {name: tiny_llama(impl, state) for name, (impl, _, _) in runs.items()}
    optims = {name: torch.optim.AdamW(m.parameters(), lr=1e-4) for name, m in models.items()}

    losses = {name: step(models[name], optims[name], inputs, batch.labels) for name, (_, inputs, batch) in runs.items()}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, (_, inputs, batch) in runs.items():
            t = time.perf_counter()
            step(models[name], optims[name], inputs, batch.labels)
            times[name].append(time.perf_counter() - t)

    real = sum(map(len, seqs))
    print(
        f"{len(seqs)} sequences, {real} real tokens (mean {real / len(seqs):.0f}, longest {max(map(len, seqs))}); "
        f"packed {tuple(packed.input_ids.shape)}, padded {tuple(padded.input_ids.shape)}; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, attnmask backend {args.backend!r}"
    )
    print("first-step losses (should agree): " + ", ".join(f"{k}: {v:.5f}" for k, v in losses.items()))
    ours = min(times["packed + attnmask"])
    header = f"| run | tokens in batch | ms/step (best of {args.repeats}) | real tokens/s | attnmask speed-up |"
    print("\n" + header)
    print("|---|---:|---:|---:|---:|")
    for name, (_, _, batch) in runs.items():
        med = min(times[name])
        print(f"| {name} | {batch.input_ids.numel()} | {med * 1e3:.0f} | {real / med:,.0f} | {med / ours:.2f}x |")


if __name__ == "__main__":
    main()
