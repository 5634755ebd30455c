"""PYTHONPATH=src:. python benchmarks/bench_dropout.py [--threads 1] [--quick] [--only attention|hf] [--p 0.1] [...]

Two scenarios, each against its peers in the same process on the same inputs.

1. ``attention``: attention dropout on packed rows, forward + backward (``--rows`` rows of ``--length`` tokens,
   lognormal document lengths (mean ~550), causal inside documents, H=8, D=64, float32, ``dropout_p=--p``):

   - attnmask: ``am.attention(q, k, v, causal() & document(...), dropout_p=p)`` with ``backend="auto"`` (which
     picks a backend that has dropout: per-document ``varlen`` here);
   - SDPA with a dense document-causal bool mask and ``dropout_p`` (what transformers' sdpa does for packed rows
     given a 4D mask, and what attnmask's transformers integration did before ``attention`` had dropout); building
     the mask is part of its time;
   - a per-document SDPA loop with ``dropout_p`` (only useful pairs computed, one kernel call per document);
   - attnmask with ``dropout_p=0`` on the same inputs, so the cost of dropout itself shows.

   Outputs under dropout are random draws, so instead of a max abs difference the run checks that the means over all
   outputs of attnmask and the dense peer agree (unbiased dropout: both estimate the no-dropout output) and reports
   the no-dropout max abs difference of attnmask against the dense peer.
2. ``hf``: a training step (forward + backward + AdamW) of ``bench_hf_train.py``'s tiny random-weight Llama with
   ``attention_dropout=--p`` on its packed rows (``--hf-seqs`` lognormal sequences, rows of ``--hf-length``):
   ``attn_implementation="attnmask"`` against transformers' sdpa given the exact dense 4D mask (built in the step),
   and attnmask without dropout.

Times are the best of ``--reps`` rounds that interleave the runs of a scenario (other load on a shared machine then
hits all alike), wall and process CPU; ratios are peer / attnmask (> 1: attnmask faster). ``--quick``: rows of 1024
tokens and 16 sequences in rows of 256 (a smoke run).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from bench_attention import lognormal_lengths  # same folder: the document lengths of bench_attention

import attnmask as am


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
    parser.add_argument("--hf-seqs", type=int, default=48)
    parser.add_argument("--hf-length", type=int, default=1024)
    parser.add_argument("--only", choices=["attention", "hf"], help="run this scenario only")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.quick:
        args.length, args.hf_seqs, args.hf_length = 1024, 16, 256
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), float32, dropout_p={args.p}")
    if args.only in (None, "attention"):
        attention_scenario(args)
    if args.only in (None, "hf"):
        hf_scenario(args)


def attention_scenario(args) -> None:
    length = args.length
    gen = torch.Generator().manual_seed(0)
    row_lens = [lognormal_lengths(length, gen) for _ in range(args.rows)]
    ids = torch.tensor([[d for d, n in enumerate(lens) for _ in range(n)] for lens in row_lens])
    spec = am.causal() & am.document(doc_ids=ids)
    q, k, v = (torch.randn(args.rows, 8, length, 64, generator=gen) for _ in range(3))
    grad_out = torch.randn(q.shape, generator=gen)
    p = args.p
    picked = am.explain(q, k, v, spec, dropout_p=p).picked

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
    print("\nattention, H=8, D=64, forward + backward")
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


def with_attention_dropout(model, p: float):
    """``model`` with every attention layer's (and the config's) ``attention_dropout`` set to ``p``."""
    model.config.attention_dropout = p
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = p
    return model


def hf_scenario(args) -> None:
    from bench_hf_train import make_sequences, step, tiny_llama  # same folder: its model, data and training step

    from attnmask.integrations import hf

    hf.register()
    seqs = make_sequences(args.hf_seqs, args.hf_length, 0)
    collate = hf.DataCollatorForCausalLM(0, packing=True, max_length=args.hf_length, return_batch=True)
    packed = collate([{"input_ids": s} for s in seqs])
    plain = {"input_ids": packed.input_ids, "position_ids": packed.position_ids}
    runs = {  # name: (attn_implementation, inputs, attention_dropout)
        "packed + attnmask": ("attnmask", plain, args.p),
        "packed + sdpa (dense 4D mask)": ("sdpa", dict(plain, attention_mask=packed.mask), args.p),
        "packed + attnmask, no dropout": ("attnmask", plain, 0.0),
    }
    state = tiny_llama("sdpa", None).state_dict()
    models = {name: with_attention_dropout(tiny_llama(impl, state), p) for name, (impl, _, p) in runs.items()}
    optims = {name: torch.optim.AdamW(m.parameters(), lr=1e-4) for name, m in models.items()}
    torch.manual_seed(0)
    best, losses = interleaved_best(
        {
            name: (lambda name=name, inputs=inputs: step(models[name], optims[name], inputs, packed.labels))
            for name, (_, inputs, _) in runs.items()
        },
        args.reps,
    )
    real = sum(map(len, seqs))
    ours = best["packed + attnmask"]
    print(
        f"\nhf training step: {len(seqs)} sequences, {real} real tokens, packed {tuple(packed.input_ids.shape)}; "
        "last losses " + ", ".join(f"{v:.4f}" for v in losses.values())
    )
    print("| run | attention_dropout | ms/step wall (cpu) | real tokens/s | step time / attnmask's wall (cpu) |")
    print("|---|---:|---:|---:|---:|")
    for name, (_, _, p) in runs.items():
        t = best[name]
        ratio = f"{t[0] / ours[0]:.2f}x ({t[1] / max(ours[1], 1e-9):.2f}x)"
        print(f"| {name} | {p} | {t[0] * 1e3:.0f} ({t[1] * 1e3:.0f}) | {real / t[0]:,.0f} | {ratio} |")


if __name__ == "__main__":
    main()
