"""PYTHONPATH=src:. python benchmarks/bench_modifiers.py [--length 16384] [--threads 1] [--reps 3] [--quick]

What score modifiers cost on the ``native`` kernel: one packed row of ``--length`` tokens (lognormal document lengths,
mean ~550, as ``bench_attention.py``), causal inside documents, H=4, D=64, float32, through
``am.attention(..., backend="native")``, forward alone and forward + backward:

- plain attention (the baseline);
- ``softcap=30.0`` (Gemma2's value; one vectorised tanh per pair, and one more with its derivative in the backward);
- ``sinks`` (gpt-oss; one term per query row in the forward, one vectorised pass over the rows for their gradient);
- ``alibi_slopes`` (one multiply-add per pair);
- all three together.

The variants run interleaved in the same process on the same inputs, best of ``--reps`` rounds (wall and process
CPU); the ratio is variant / plain (target: at most 1.2). The outputs are checked against ``backend="reference"`` on
the first document. ``--quick``: a 4,096-token row.
"""

from __future__ import annotations

import argparse

import torch
from bench_attention import lognormal_lengths  # same folder: the document lengths of bench_attention
from bench_dropout import interleaved_best  # same folder: best wall and CPU times over interleaved rounds

import attnmask as am


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=16384)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    length = 4096 if args.quick else args.length
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    lens = lognormal_lengths(length, gen)
    spec = am.causal() & am.document(seq_lens=lens)
    H, D = 4, 64
    q, k, v = (torch.randn(1, H, length, D, generator=gen) for _ in range(3))
    sinks = torch.randn(H, generator=gen)
    slopes = 2.0 ** (-8.0 * torch.arange(1, H + 1) / H)
    variants = {
        "plain": {},
        "softcap 30": {"softcap": 30.0},
        "sinks": {"sinks": sinks},
        "alibi": {"alibi_slopes": slopes},
        "all three": {"softcap": 30.0, "sinks": sinks, "alibi_slopes": slopes},
    }
    first = lens[0]
    for name, mods in variants.items():  # the figures are of exact attention
        got = am.attention(q, k, v, spec, backend="native", **mods)[:, :, :first]
        want = am.attention(*(t[:, :, :first] for t in (q, k, v)), am.causal(), backend="reference", **mods)
        assert torch.allclose(got, want, atol=1e-5), name

    def forward(mods):
        def run():
            with torch.no_grad():
                return am.attention(q, k, v, spec, backend="native", **mods)

        return run

    def training(mods):
        qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
        mods = {n: t.clone().requires_grad_() if n == "sinks" else t for n, t in mods.items()}

        def step():
            am.attention(qg, kg, vg, spec, backend="native", **mods).sum().backward()

        return step

    print(
        f"packed row of {length} tokens, {len(lens)} documents (mean {length / len(lens):.0f}), H={H}, D={D}, "
        f"float32, native kernel, {args.threads} thread(s), best of {args.reps}"
    )
    print(f"{'variant':<12} {'forward ms (cpu)':>18} {'ratio':>7} {'fwd+bwd ms (cpu)':>18} {'ratio':>7}")
    fwd, _ = interleaved_best({n: forward(m) for n, m in variants.items()}, args.reps)
    bwd, _ = interleaved_best({n: training(m) for n, m in variants.items()}, args.reps)
    for name in variants:
        f, b = fwd[name], bwd[name]
        print(
            f"{name:<12} {f[0] * 1e3:>8.1f} ({f[1] * 1e3:>7.1f}) {f[1] / fwd['plain'][1]:>6.2f}x "
            f"{b[0] * 1e3:>8.1f} ({b[1] * 1e3:>7.1f}) {b[1] / bwd['plain'][1]:>6.2f}x"
        )
    print("ratios: process CPU time of the variant / plain")
    print("command: PYTHONPATH=src:. python benchmarks/bench_modifiers.py")


if __name__ == "__main__":
    main()
