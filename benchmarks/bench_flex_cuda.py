"""PYTHONPATH=src:. python benchmarks/bench_flex_cuda.py [--rounds 5] [--reps 10] [--out F.md] [--dry-run] [--quick]
[--profile CALLS]

Where the time of ``attention(..., backend="flex")`` goes on a GPU, against the stock FlexAttention call, in one
process with the methods interleaved round by round (the scenarios of ``benchmarks/device_check.py``: packed
documents of mixed lengths, tiny documents and a sliding window of 1,024 at 16K tokens; bfloat16, H = 8, Hkv = 2,
D = 128, forward + backward):

- ``attention flex``: ``attnmask.attention(q, k, v, spec, backend="flex")``, the public call (validation, the plan
  cache, the cached ``BlockMask``);
- ``attention auto``: the same with ``backend="auto"``;
- ``attention cuda_varlen``: where this torch and GPU serve it;
- ``kernel + our BlockMask``: compiled ``flex_attention`` called directly with ``BlockLayout.to_flex()``'s mask, built
  once before timing (the kernel alone, with our predicate);
- ``kernel + create_block_mask``: the same kernel with ``create_block_mask`` on the hand-written predicate (the stock
  way), also built once before timing.

Three figures per method, each the median over rounds: ``synced`` (one call between two synchronisations, CUDA
events: the host's launch time counts when the GPU waits for it), ``queued`` (``--reps`` calls back to back, one
synchronisation: the host's time hides behind the GPU's) and ``host`` (the host's milliseconds to launch one call).
Before timing, each method runs once under ``torch.cuda.set_sync_debug_mode("warn")``: the table's ``syncs`` column
counts the host synchronisations torch reported for one call (forward + backward). And a NaN is written into one key
of the scenario's middle: each ``attention`` method must return NaN at exactly the queries that may see that key
(``spec.to_dense``) and the output of the clean inputs elsewhere (``nan check``).
``--dry-run``: on the CPU, forward only, tiny shapes (checks the harness; no sync counts there).
``--profile CALLS``: after each scenario's timings, ``CALLS`` calls of ``attention flex`` under ``cProfile``, and a
table of the host functions with the most own time per call (where the host's milliseconds over the kernel's go:
validation, the plan cache, the finite scan's read-back, autograd).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT)]

import torch  # noqa: E402

import attnmask as am  # noqa: E402
from attnmask.backends import cuda_varlen, flex  # noqa: E402
from attnmask.lowering import block_layout  # noqa: E402
from benchmarks.device_check import TIMING_HEADS, scenario_spec, scenarios, stock_mask_mod  # noqa: E402


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def methods_for(s, spec, device, backward: bool) -> dict:
    """Name -> ``f(q, k, v)`` for the scenario; the block masks are built here, before any timing."""
    from torch.nn.attention.flex_attention import create_block_mask

    compiled = flex._flex()
    ours = block_layout(spec, s.length, s.length, flex.BLOCK_SIZE).to_flex().to(device)
    stock = create_block_mask(stock_mask_mod(s, device), None, None, s.length, s.length, device=device)
    out = {
        "attention flex": lambda q, k, v: am.attention(q, k, v, spec, backend="flex"),
        "attention auto": lambda q, k, v: am.attention(q, k, v, spec),
        "kernel + our BlockMask": lambda q, k, v: compiled(q, k, v, block_mask=ours, enable_gqa=True),
        "kernel + create_block_mask": lambda q, k, v: compiled(q, k, v, block_mask=stock, enable_gqa=True),
    }
    if device.type == "cuda" and cuda_varlen.cuda_varlen_available() is None:
        out["attention cuda_varlen"] = lambda q, k, v: am.attention(q, k, v, spec, backend="cuda_varlen")
    return out


def one_call(fn, q, k, v, dout, backward: bool):
    out = fn(q, k, v)
    if backward:
        torch.autograd.backward(out, dout)
        for t in (q, k, v):
            t.grad = None


def measure(fn, q, k, v, dout, backward: bool, reps: int, device) -> tuple[float, float, float]:
    """(synced ms, queued ms per call, host ms per call) of one round."""
    _sync(device)
    if device.type == "cuda":
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        one_call(fn, q, k, v, dout, backward)
        stop.record()
        _sync(device)
        synced = start.elapsed_time(stop)
    else:
        t0 = time.perf_counter()
        one_call(fn, q, k, v, dout, backward)
        synced = (time.perf_counter() - t0) * 1e3
    _sync(device)
    t0 = time.perf_counter()
    host = 0.0
    for _ in range(reps):
        h0 = time.perf_counter()
        one_call(fn, q, k, v, dout, backward)
        host += time.perf_counter() - h0
    _sync(device)
    queued = (time.perf_counter() - t0) * 1e3 / reps
    return synced, queued, host * 1e3 / reps


def count_syncs(fn, q, k, v, dout, backward: bool, device) -> int | None:
    """Host synchronisations torch reports for one call (``None`` off CUDA)."""
    if device.type != "cuda":
        return None
    _sync(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            one_call(fn, q, k, v, dout, backward)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    _sync(device)
    found = [w for w in caught if "synchroniz" in str(w.message)]
    for w in found[:3]:
        print(f"    sync: {w.filename}:{w.lineno}: {str(w.message)[:100]}", flush=True)
    return len(found)


def profile_host(fn, q, k, v, dout, backward: bool, calls: int, device, top: int = 15) -> list[str]:
    """Markdown rows: the ``top`` functions by own host time over ``calls`` calls of ``fn`` under ``cProfile`` (after
    a synchronisation; one more at the end, so the queued kernels do not spill into the next table), per call."""
    import cProfile
    import pstats

    _sync(device)
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        one_call(fn, q, k, v, dout, backward)
    _sync(device)
    profiler.disable()
    entries = pstats.Stats(profiler).stats  # (file, line, name) -> (primitive calls, calls, own s, cumulative s, _)
    rows = sorted(entries.items(), key=lambda item: -item[1][2])[:top]
    lines = ["| function | calls per call | own µs per call | cumulative µs per call |", "|---|---:|---:|---:|"]
    for (file, line, name), (_, count, own, total, _) in rows:
        where = f"{Path(file).name}:{line}({name})" if line else name
        lines.append(f"| `{where}` | {count / calls:g} | {own / calls * 1e6:.1f} | {total / calls * 1e6:.1f} |")
    return lines


def nan_check(name, fn, q, k, v, spec, length) -> str:
    """``ok`` when a NaN in key ``length // 2 + 1`` gives NaN at exactly the queries that may see it and the clean
    output elsewhere, else what differed; ``-`` for the kernels called directly (not ``attention``)."""
    if not name.startswith("attention"):
        return "-"
    key = length // 2 + 1
    dirty = v.detach().clone()
    dirty[:, :, key] = float("nan")
    with torch.no_grad():
        clean = fn(q.detach(), k.detach(), v.detach())
        got = fn(q.detach(), k.detach(), dirty)
    sees = spec.to_dense(length, device=q.device)[0, :, key]  # (Q,)
    nan_rows = got.isnan().any(-1)  # (B, H, Q)
    if not torch.equal(nan_rows, sees.expand_as(nan_rows)):
        return f"NaN at {int(nan_rows.sum())} query rows, {int(sees.sum()) * nan_rows.shape[1]} expected"
    if not torch.equal(got[:, :, ~sees], clean[:, :, ~sees]):
        return "the queries that cannot see the NaN changed"
    return "ok"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown table here")
    parser.add_argument("--dry-run", action="store_true", help="on the CPU, forward only, tiny shapes")
    parser.add_argument("--quick", action="store_true", help="2 rounds x 3 calls; without a GPU, the dry run")
    parser.add_argument("--profile", type=int, default=0, metavar="CALLS", help="cProfile attention flex's host time")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.reps, args.dry_run = 2, 3, args.dry_run or not torch.cuda.is_available()
    device = torch.device("cpu" if args.dry_run or not torch.cuda.is_available() else "cuda")
    torch._dynamo.config.recompile_limit = 64  # every scenario's variants stay compiled (flex refuses past the limit)
    torch._dynamo.config.accumulated_recompile_limit = 512
    backward = device.type == "cuda"
    H, Hkv, D = TIMING_HEADS[device.type]
    head = (
        "| scenario | method | synced ms | queued ms | host ms | queued / kernel + create_block_mask | syncs "
        "| nan check |"
    )
    lines = [
        f"bench_flex_cuda {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, torch {torch.__version__}, "
        f"{torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}, bfloat16, H={H}, Hkv={Hkv}, D={D}, "
        f"{'forward + backward' if backward else 'forward'}, {args.rounds} rounds x {args.reps} calls",
        "",
        head,
        "|---|---|---|---|---|---|---|---|",
    ]
    profiles: list[str] = []
    for s in scenarios(quick=True, dry_run=args.dry_run):
        gen = torch.Generator(device=device).manual_seed(1)
        shapes = [(1, H, s.length, D), (1, Hkv, s.length, D), (1, Hkv, s.length, D)]
        q, k, v = (
            torch.randn(sh, generator=gen, device=device, dtype=torch.bfloat16).requires_grad_(backward)
            for sh in shapes
        )
        dout = torch.randn(1, H, s.length, D, generator=gen, device=device, dtype=torch.bfloat16)
        spec = scenario_spec(s, device)
        methods = methods_for(s, spec, device, backward)
        for fn in methods.values():  # warm-up: compiles, fills the plan cache
            one_call(fn, q, k, v, dout, backward)
            one_call(fn, q, k, v, dout, backward)
        syncs = {name: count_syncs(fn, q, k, v, dout, backward, device) for name, fn in methods.items()}
        nans = {name: nan_check(name, fn, q, k, v, spec, s.length) for name, fn in methods.items()}
        results = {name: [] for name in methods}
        for _ in range(args.rounds):
            for name, fn in methods.items():
                results[name].append(measure(fn, q, k, v, dout, backward, args.reps, device))
        base = statistics.median(r[1] for r in results["kernel + create_block_mask"])
        for name, rows in results.items():
            synced, queued, host = (statistics.median(r[i] for r in rows) for i in range(3))
            line = (
                f"| {s.title} | {name} | {synced:.3f} | {queued:.3f} | {host:.3f} | {queued / base:.2f}x "
                f"| {'-' if syncs[name] is None else syncs[name]} | {nans[name]} |"
            )
            lines.append(line)
            print(line, flush=True)
        if args.profile > 0:
            title = f"host profile, {s.title}, attention flex, {args.profile} calls:"
            table = profile_host(methods["attention flex"], q, k, v, dout, backward, args.profile, device)
            profiles += ["", title, "", *table]
            print("\n".join(["", title, *table]), flush=True)
    shown = f"--rounds {args.rounds} --reps {args.reps}" + (f" --profile {args.profile}" if args.profile else "")
    lines += [*profiles, "", f"`PYTHONPATH=src:. python benchmarks/bench_flex_cuda.py {shown}`"]
    text = "\n".join(lines)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
