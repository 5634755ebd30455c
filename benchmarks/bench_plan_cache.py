"""PYTHONPATH=src:. python benchmarks/bench_plan_cache.py [--quick] [--reps 7] [--threads 1]

What the per-spec plan cache (``attnmask.plancache``) saves per ``attention(..., backend="auto")`` call, measured in
one process on the same inputs (H=8, D=64, float32):

(a) one packed row of 16K tokens, lognormal document lengths, ``causal() & document(seq_lens=...)``;
(b) 2,000 documents of 4-12 tokens in one row, same spec form;
(c) a short padded batch, 8 rows of 256 tokens (right padding, 64-256 real), ``causal() & key_padding(mask)``;
(d) end to end, batch (c) through a 4-layer random-weight transformers Llama (hidden 512 = 8 heads of 64) with
    ``attn_implementation="attnmask"``: a forward where the layers share one spec (attnmask.integrations.hf keeps the
    last specs it built, so it plans once per forward) against one where every layer builds its own spec (the memo
    emptied), so each layer plans; timed as the whole forward and as the time inside spec building and ``attention``.
    Skipped without transformers.

Each scenario is timed with a cold cache (a new, equal spec object for every call: what every call paid before the
cache) and a warm one (the same spec object every call, as the layers of one forward share it), as the whole call
and as the planning alone (``choose_backend`` on a prepared call: every backend's ``unsupported`` and ``cost``, or
the cached choice). Cold and warm calls alternate (so both see the same load on a shared machine); prints
best-of-``--reps`` wall and process CPU times, the CPU time saved per call, cold / warm ratios, the backend "auto"
picked, and the max abs difference between the cold and warm outputs (0: the same plan). ``--quick`` divides the
sizes by 4.
"""

from __future__ import annotations

import argparse
import time

import torch

import attnmask as am
from attnmask.attention import _prepare_call, choose_backend
from benchmarks.bench_attention import lognormal_lengths


def packed_row(n: int, gen: torch.Generator):
    lens = lognormal_lengths(n, gen)
    return f"(a) packed row, {n} tokens, {len(lens)} docs", 1, n, lambda: am.causal() & am.document(seq_lens=lens)


def tiny_documents(n_docs: int, gen: torch.Generator):
    lens = torch.randint(4, 13, (n_docs,), generator=gen).tolist()
    title = f"(b) {n_docs} docs of 4-12 tokens ({sum(lens)} tokens)"
    return title, 1, sum(lens), lambda: am.causal() & am.document(seq_lens=lens)


def padded_batch(rows: int, length: int, gen: torch.Generator):
    real = torch.randint(length // 4, length + 1, (rows,), generator=gen)
    mask = torch.arange(length) < real[:, None]
    return f"(c) padded batch {rows} x {length}", rows, length, lambda: am.causal() & am.key_padding(mask)


def measure(scenario, reps: int, gen: torch.Generator) -> list:
    """Rows ``(title, what, cold timing, warm timing, picked, diff)`` of one scenario."""
    title, batch, length, make_spec = scenario
    q, k, v = (torch.randn(batch, 8, length, 64, generator=gen) for _ in range(3))
    fresh = iter([make_spec() for _ in range(2 * (reps + 1))])  # built beforehand: only planning differs
    shared = make_spec()

    def plan_only(spec):
        return choose_backend(_prepare_call(q, k, v, spec, None, None, None))

    (t_cold, out_cold), (t_warm, out_warm) = interleaved(
        lambda: am.attention(q, k, v, next(fresh)), lambda: am.attention(q, k, v, shared), reps
    )
    (p_cold, picked), (p_warm, _) = interleaved(lambda: plan_only(next(fresh)), lambda: plan_only(shared), reps)
    diff = (out_cold - out_warm).abs().max().item()
    return [
        (title, "attention(auto) call", t_cold, t_warm, picked.name, diff),
        (title, "planning alone", p_cold, p_warm, picked.name, None),
    ]


def transformers_forward(layers: int, reps: int, gen: torch.Generator) -> list:
    """Scenario (d): rows ``(title, what, per-layer-spec timing, shared-spec timing, picked, diff)``."""
    try:
        import transformers
    except ImportError:
        print("(d) skipped: transformers is not installed")
        return []
    from attnmask.integrations import hf

    hf.register()
    cfg = transformers.LlamaConfig(
        hidden_size=512, num_attention_heads=8, num_key_value_heads=8, intermediate_size=1024,
        num_hidden_layers=layers, vocab_size=300,
    )  # fmt: skip
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="attnmask").eval()
    real = torch.randint(64, 257, (8,), generator=gen)
    inputs = dict(
        input_ids=torch.randint(0, 300, (8, 256), generator=gen), attention_mask=torch.arange(256) < real[:, None]
    )
    shared_memo = hf._recent_specs
    per_layer = hf._RecentSpecs(size=0)  # keeps nothing: a fresh spec object per layer, so every layer plans
    inside = [0.0, 0.0]  # wall and CPU seconds spent building specs and in attention during the last forward

    def timed(fn):
        def wrapper(*args, **kwargs):
            w0, c0 = time.perf_counter(), time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                inside[0] += time.perf_counter() - w0
                inside[1] += time.process_time() - c0

        return wrapper

    def forward(memo):
        inside[:] = [0.0, 0.0]
        hf._recent_specs = memo
        try:
            # a new mask tensor per forward, as each training step brings: the spec is built once per forward
            logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"].clone()).logits
        finally:
            hf._recent_specs = shared_memo
        return logits, tuple(inside)

    originals = hf.attention, hf._shared_spec
    hf.attention, hf._shared_spec = timed(hf.attention), timed(hf._shared_spec)
    try:
        with torch.no_grad():
            (t_fresh, (out_fresh, in_fresh)), (t_shared, (out_shared, in_shared)) = interleaved(
                lambda: forward(per_layer), lambda: forward(shared_memo), reps
            )
            # the attention share of the forward: best of a few more alternating forwards
            shares = [[forward(memo)[1] for memo in (per_layer, shared_memo)] for _ in range(reps)]
    finally:
        hf.attention, hf._shared_spec = originals
    a_fresh, a_shared = (tuple(min(s[i][j] for s in shares) for j in range(2)) for i in range(2))
    diff = (out_shared - out_fresh).abs().max().item()
    title = f"(d) transformers Llama, {layers} layers, batch (c)"
    return [
        (title, "model forward", t_fresh, t_shared, "auto", diff),
        (title, "spec building + attention calls of one forward", a_fresh, a_shared, "auto", None),
    ]


def interleaved(cold, warm, reps: int):
    """``((best wall, best CPU seconds), last result)`` of ``cold`` and of ``warm``, called alternately ``reps`` times
    after one warm-up call each, so that both see the same load on a shared machine."""
    results = [cold(), warm()]
    times: list[list] = [[], []]
    for _ in range(reps):
        for i, fn in enumerate((cold, warm)):
            w0, c0 = time.perf_counter(), time.process_time()
            results[i] = fn()
            times[i].append((time.perf_counter() - w0, time.process_time() - c0))
    return [((min(w for w, _ in t), min(c for _, c in t)), out) for t, out in zip(times, results, strict=True)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="sizes / 4: a smoke run")
    parser.add_argument("--reps", type=int, default=7, help="timed calls per measurement (best is reported)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    scale = 4 if args.quick else 1
    gen = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    scenarios = [packed_row(16384 // scale, gen), tiny_documents(2000 // scale, gen), padded_batch(8, 256, gen)]
    rows = [row for scenario in scenarios for row in measure(scenario, args.reps, gen)]
    rows += transformers_forward(2 if args.quick else 4, max(args.reps // 2, 1), gen)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), H=8, D=64, float32, best of {args.reps}")
    print(
        "| scenario | timed | auto picks | cold: new spec each call, wall (cpu) | warm: same spec, wall (cpu) "
        "| saved per call, cpu | cold / warm wall (cpu) | cold vs warm max abs diff |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for title, what, cold, warm, picked, diff in rows:
        saved = f"{(cold[1] - warm[1]) * 1e3:.2f} ms"
        ratio = f"{cold[0] / warm[0]:.2f}x ({cold[1] / max(warm[1], 1e-9):.2f}x)"
        print(
            f"| {title} | {what} | {picked} | {_ms(cold)} | {_ms(warm)} | {saved} | {ratio} | "
            f"{'' if diff is None else f'{diff:.1e}'} |"
        )
    print(f"total {time.perf_counter() - t0:.0f} s")


def _ms(t) -> str:
    return f"{t[0] * 1e3:.3f} ms ({t[1] * 1e3:.3f})"


if __name__ == "__main__":
    main()
