"""PYTHONPATH=src python benchmarks/bench_head_dim.py [--dims 16,32,64,128] [--lengths 256,512,1024]
[--structures docs60,docs180,docs400,window] [--mode fwd,fwdbwd] [--threads 2] [--reps 5] [--dtype float32]
[--save FILE.json] [--quick] | --fit FILE.json...

Does ``"auto"`` pick well at every head size? ``bench_limit.py`` calibrates the estimates at D=64; a model with a
smaller or larger head (transformers' tiny test models: 16; Llama: 128) runs the same pairs at other costs per pair:
the dot products and the value sums scale with D, the exponential and the bookkeeping of each pair do not. Each cell
is a batch of packed rows (``causal() & document(...)``, lognormal documents of mean ``--means`` tokens, clipped to
8..L) or of causal windows of half the row, H=4 query heads against 2 key / value heads, ``--dtype`` (float32 or
bfloat16: a bfloat16 cell's estimates carry the backends' bfloat16 factors, fitted at D = 64), at every D of
``--dims``: every backend ``"auto"`` may pick is timed (median of ``--reps`` interleaved rounds, after one warm-up
call each; forward, and forward + backward), next to its estimate (``backend.cost``). Printed per cell: the fastest
backend, ``"auto"``'s pick (after its stock rule: ``stock`` when it took SDPA without costing), the pick of the
estimates alone (``costs``), and each pick's time over the fastest.

``--fit FILE.json...`` (no timing): each constant of ``FITTED`` (the extra widths of ``_common.pair_width``) at the
value that best explains how its backend's measured time per unit of estimate moves with D (least median of absolute
log errors, each cell's time per unit relative to the same structure's at D=64, where the estimates are calibrated;
one constant at a time, two passes), and how many cells the estimates' picks put within 1.1x of the fastest with the
constants now and fitted.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import json
import math
import os
import random
import re
import statistics
import sys
import time

import numpy as np
import torch

import attnmask as am
from attnmask import tuning
from attnmask.attention import _BACKENDS, _prepare_call, _ranked, _stock
from attnmask.backends import _common, _workers

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_limit  # noqa: E402  (same folder: its replays' CPU kinds)

BACKENDS = ("sdpa", "native", "varlen", "blocksparse", "banded")
FITTED = (  # the constants --fit fits: (backend, name)
    ("native", "_EXTRA_PAIR_WIDTH"),
    ("native", "_TILES_EXTRA_PAIR_WIDTH"),
    ("sdpa", "_EXTRA_PAIR_WIDTH"),
    ("sdpa", "_EXTRA_BF16_FORWARD_PAIR_WIDTH"),
    ("sdpa", "_EXTRA_BF16_PAIR_WIDTH"),
    ("varlen", "_EXTRA_PAIR_WIDTH"),
    ("varlen", "_EXTRA_SMALL_WIDTH"),
    ("varlen", "_EXTRA_BF16_PAIR_WIDTH"),
    ("blocksparse", "_EXTRA_PAIR_WIDTH"),
)


def spec_for(rows: int, length: int, structure: str, seed: int = 0):
    """``"docsM"``: packed documents of lognormal lengths (mean ``M``, sigma 0.7, clipped to 8..length) filling every
    row; ``"window"``: a causal window of half the row."""
    if structure == "window":
        return am.sliding_window(length // 2)
    mean = float(structure.removeprefix("docs"))
    rng = np.random.default_rng(seed)
    ids = torch.empty(rows, length, dtype=torch.long)
    for r in range(rows):
        pos, doc = 0, 0
        while pos < length:
            n = int(np.clip(rng.lognormal(math.log(mean), 0.7), 8, length))
            ids[r, pos : pos + n] = doc
            pos, doc = pos + n, doc + 1
    return am.causal() & am.document(doc_ids=ids)


def make_call(cell: dict, values: bool = True):
    """q, k, v (requires_grad for a backward) and the spec of ``cell``; B·L is 8,192 tokens. ``values`` False: q, k,
    v left uninitialised (an estimate reads only their shapes). The same spec object for the same structure and
    length (the fit costs each cell many times; plans are kept with the spec)."""
    length, dim, grad = cell["length"], cell["dim"], cell["mode"] == "fwdbwd"
    rows = 8192 // length
    gen = torch.Generator().manual_seed(0)
    dtype = getattr(torch, cell.get("dtype", "float32"))  # tables saved before --dtype: float32
    make = (
        functools.partial(torch.randn, generator=gen, dtype=dtype)
        if values
        else functools.partial(torch.empty, dtype=dtype)
    )
    q = make(rows, 4, length, dim).requires_grad_(grad)
    k, v = (make(rows, 2, length, dim).requires_grad_(grad) for _ in range(2))
    return q, k, v, _spec(rows, length, cell["structure"])


@functools.cache
def _spec(rows: int, length: int, structure: str):
    return spec_for(rows, length, structure)


def estimates(cell: dict) -> tuple[dict, str, str]:
    """Every eligible backend's estimate, the estimates' pick and ``"auto"``'s (``"stock"`` when its rule took SDPA),
    at the cell's thread count, idle."""
    q, k, v, spec = make_call(cell, values=False)
    saved = torch.get_num_threads()
    torch.set_num_threads(cell["threads"])
    try:
        with torch.set_grad_enabled(cell["mode"] == "fwdbwd"), _workers.load_as_read(False):
            call = _prepare_call(q, k, v, spec, None, None, None)
            registry = tuple(_BACKENDS.values())
            ranked, _ = _ranked(call, registry)
            est = {b.name: cost for b, cost in ranked if b.name in BACKENDS}
            auto = "stock" if _stock(call, registry) is not None else ranked[0][0].name
    finally:
        torch.set_num_threads(saved)
    return est, min(est, key=est.get), auto


def time_cell(cell: dict, reps: int) -> dict:
    q, k, v, spec = make_call(cell)
    grad = cell["mode"] == "fwdbwd"
    est, _, _ = estimates(cell)

    def run(name):
        out = am.attention(q, k, v, spec, backend=name)
        if grad:
            out.sum().backward()

    names, order = list(est), random.Random(0)
    for name in names:
        run(name)
    times: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(reps):
        order.shuffle(names)  # a new order each round: a rotated one keeps each backend's predecessor
        for name in names:
            t = time.perf_counter()
            run(name)
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) * 1e3 for name, ts in times.items()}


def describe(cell: dict, ms: dict) -> str:
    est, costs, auto = estimates(cell)
    best = min(ms, key=ms.get)
    chosen = "sdpa" if auto == "stock" else auto
    return (
        f"| {cell['structure']} | {cell['length']} | {cell['dim']} | {cell['mode']} | {best} | {auto} "
        f"{ms[chosen] / ms[best]:.2f} | {costs} {ms[costs] / ms[best]:.2f} | "
        + " ".join(f"{n} {ms[n]:.1f}" for n in ms)
        + " |"
    )


def picks_within(cells: list[dict], factor: float = 1.1) -> tuple[int, int]:
    """How many cells the estimates' pick (not the stock rule) and ``"auto"``'s put within ``factor`` of the fastest."""
    costs_ok = auto_ok = 0
    for cell in cells:
        ms = cell["ms"]
        _, costs, auto = estimates(cell)
        best = min(ms.values())
        costs_ok += ms[costs] <= factor * best
        auto_ok += ms["sdpa" if auto == "stock" else auto] <= factor * best
    return costs_ok, auto_ok


def _module(name: str):
    return importlib.import_module(f"attnmask.backends.{name}")


class patched:  # noqa: N801 (used as a function: ``with patched({("native", "_EXTRA_PAIR_WIDTH"): 0.0}): ...``)
    """The module constants ``values`` (``(backend, constant) -> value``) set for the block, restored after it."""

    def __init__(self, values: dict):
        self.values, self.saved = values, {}

    def __enter__(self):
        for (name, constant), value in self.values.items():
            module = _module(name)
            self.saved[name, constant] = getattr(module, constant)
            setattr(module, constant, value)

    def __exit__(self, *exc):
        for (name, constant), value in self.saved.items():
            setattr(_module(name), constant, value)


def width_error(cells: list[dict], name: str) -> float:
    """Backend ``name``'s median over cells of |log| of its time per unit of estimate over the same structure's at
    D=64 (its constants as they are now)."""
    per_unit: dict[tuple, dict] = {}
    for cell in cells:
        if name in cell["ms"]:
            est, _, _ = estimates(cell)
            key = (cell["structure"], cell["length"], cell["mode"], cell["threads"], cell.get("dtype", "float32"))
            per_unit.setdefault(key, {})[cell["dim"]] = cell["ms"][name] / est[name]
    errors = [abs(math.log(u / d[64])) for d in per_unit.values() if 64 in d for dim, u in d.items() if dim != 64]
    return statistics.median(errors) if errors else math.inf


def cpu_kind(path: str) -> tuple[bool, bool] | None:
    """``(AMX bfloat16 tiles, AVX512-BF16)`` of the CPU a saved file was timed on (its ``cpu`` entry, written since
    2026-12-04), or ``None`` for an older file."""
    found = re.search(r"AMX bfloat16 tiles: (\w+), AVX512-BF16: (\w+)", json.load(open(path)).get("cpu", ""))
    return None if found is None else (found.group(1) == "True", found.group(2) == "True")


def on_files_cpu(paths: list[str]):
    """The estimates as the CPU the files were timed on makes them (``bench_limit.on_cpu_kind``) when they all
    name the same kind; else this machine's, with a note."""
    kinds = {cpu_kind(p) for p in paths}
    if len(kinds) == 1 and None not in kinds:
        return bench_limit.on_cpu_kind(*kinds.pop())
    print("(files of several or unrecorded CPU kinds: evaluated with this machine's flags and constants)")
    return contextlib.nullcontext()


def fit(paths: list[str], rounds: int = 2) -> None:
    """Each constant of ``FITTED`` in turn, on a grid, the others held (``rounds`` passes: a backend's constants
    share its cells), under the files' CPU kind (``on_files_cpu``)."""
    with on_files_cpu(paths):
        _fit(paths, rounds)


def _fit(paths: list[str], rounds: int) -> None:
    cells = [cell for path in paths for cell in json.load(open(path))["cells"]]
    print(f"{len(cells)} cells from {', '.join(paths)}")
    print(f"picks within 1.1x of the fastest now (estimates / auto): {picks_within(cells)} of {len(cells)}")
    values = {key: getattr(_module(key[0]), key[1]) for key in FITTED}
    grid = (0.0, 8.0, 16.0, 32.0, 48.0, 64.0, 96.0, 128.0, 192.0, 256.0, 384.0, 512.0, 768.0, 1024.0, 1536.0)
    for _ in range(rounds):
        for key in FITTED:
            scored = []
            for w in grid:
                with patched({**values, key: w}):
                    scored.append((width_error(cells, key[0]), w))
            with patched(values):
                now = width_error(cells, key[0])
            best_error, best = min(scored)
            print(
                f"{key[0]}.{key[1]}: {values[key]:g} (median abs log error {now:.3f}) -> {best:g} ({best_error:.3f}); "
                + ", ".join(f"{w:g}: {e:.3f}" for e, w in scored)
            )
            values[key] = best
    with patched(values):
        print(f"picks within 1.1x with the fitted constants (estimates / auto): {picks_within(cells)} of {len(cells)}")
    print("fitted: " + ", ".join(f"{name}.{constant} = {value:g}" for (name, constant), value in values.items()))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dims", default="16,32,64,128")
    parser.add_argument("--lengths", default="256,512,1024")
    parser.add_argument("--structures", default="docs60,docs180,docs400,window")
    parser.add_argument("--mode", default="fwd,fwdbwd")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument(
        "--quick", action="store_true", help="a smoke run: documents of ~180 tokens on rows of 512, D = 16 and 64"
    )
    parser.add_argument("--save", help="write the timed cells to this JSON file (for --fit)")
    parser.add_argument("--fit", nargs="+", metavar="FILE", help="fit _EXTRA_PAIR_WIDTH to saved cells; no timing")
    args = parser.parse_args(argv)
    if args.fit:
        fit(args.fit)
        return
    if args.quick:
        args.structures, args.lengths, args.dims, args.reps = "docs180", "512", "16,64", 3
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.dtype}, H=4 / 2 key-value heads, "
        f"8,192 tokens a batch; load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}"
    )
    cpu = (
        f"{tuning._machine()['cpu']}, AMX bfloat16 tiles: {_common.cpu_has_amx_bf16()}, "
        f"AVX512-BF16: {_common.cpu_has_avx512_bf16()}"
    )
    print("| structure | L | D | mode | fastest | auto / fastest | costs / fastest | ms |")
    print("|---|---:|---:|---|---|---|---|---|")
    cells = []
    for structure in args.structures.split(","):
        for length in map(int, args.lengths.split(",")):
            for dim in map(int, args.dims.split(",")):
                for mode in args.mode.split(","):
                    cell = dict(
                        structure=structure, length=length, dim=dim, mode=mode, threads=args.threads, dtype=args.dtype
                    )
                    cell["ms"] = time_cell(cell, args.reps)
                    cells.append(cell)
                    print(describe(cell, cell["ms"]), flush=True)
                    if args.save:  # after every cell: a long run interrupted keeps what it measured
                        with open(args.save, "w") as f:
                            json.dump({"argv": sys.argv[1:], "load": os.getloadavg(), "cpu": cpu, "cells": cells}, f)
    costs_ok, auto_ok = picks_within(cells)
    print(f"\nwithin 1.1x of the fastest: estimates {costs_ok} of {len(cells)}, auto {auto_ok} of {len(cells)}")
    shown = sys.argv[1:] if argv is None else argv
    print("\ncommand: PYTHONPATH=src python benchmarks/bench_head_dim.py " + " ".join(shown))


if __name__ == "__main__":
    main()
