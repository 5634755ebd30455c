"""``benchmarks/bench_limit.py`` runs (its smallest setting, as CI does) and counts allowed pairs exactly."""

from __future__ import annotations

import importlib.util
import re
import subprocess
from pathlib import Path

import pytest
import torch

import attnmask as am
import attnmask.backends.native as native
from tests.helpers import bench_limit as load_bench

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "bench_limit.py"


def test_dry_run_prints_a_row_per_structure_and_the_command(capsys):
    bench = load_bench()
    bench.main(["--dry-run", "--mode", "fwd,fwdbwd", "--only", "causal,tiny,decode Q=8"])
    out = capsys.readouterr().out
    for name in ("| causal |", "| causal + left padding |", "| documents: tiny (8-32) |", "| decode Q=8, K=512 |"):
        assert out.count(name) == 2, name  # forward, forward + backward
    assert "auto / ideal" in out and "reproduce: PYTHONPATH=src python benchmarks/bench_limit.py --dry-run" in out
    # rows of another size than the README's say so (``attnmask bench --quick`` runs rows of 1,024)
    assert "note: the README's limit figures (rows within the bound, auto within 1.1x of the fastest) are for" in out


def test_busy_serial_run_prints_slowdowns_of_both_paths(capsys):
    bench = load_bench()
    bench.main(["--dry-run", "--busy", "--serial", "--threads", "2", "--only", "chunked"])
    out = capsys.readouterr().out
    busy = out[out.index("one core busy") :]
    assert "blocksparse 1-by-1" in busy and busy.count("| causal chunked 32 |") == 1
    assert "backend cells slow no more than 1.1x unmasked SDPA's slowdown (paired by round)" in busy


def test_allowed_fraction_matches_dense_count():
    bench = load_bench()
    for case in bench.cases(96, 160):
        dense = case.spec.to_dense(case.q_len, case.kv_len)
        expected = float(dense.expand(case.batch, -1, -1).double().mean())
        assert abs(bench.allowed_fraction(case) - expected) < 1e-12, case.name
    causal = bench.Case("causal", am.causal(), 1, 1000, 1000, 1000)
    assert bench.allowed_fraction(causal) == 1001 / 2000


def test_cases_cover_the_issue_structures():
    names = " / ".join(c.name for c in load_bench().cases(8192, 32768))
    parts = ("left padding", "right padding", "few long", "~4", "tiny", "window 256", "window 1024", "window 4096")
    parts += ("chunked 1024", "prefix-LM 2048", "+ documents", "Q=1,", "Q=16, K=32768")
    for part in parts:
        assert part in names, part


def test_fit_reads_its_own_tables_and_replays_autos_choice(capsys, tmp_path):
    bench = load_bench()
    bench.main(["--dry-run", "--only", "tiny,window 8", "--units"])
    table = tmp_path / "limit.txt"
    table.write_text(capsys.readouterr().out)
    cells = bench.parse_tables(str(table), 8192, 32768)  # the sizes come from the table's first line
    assert {c.q_len for c, *_ in cells} == {256} and {"sdpa", "native"} <= {name for *_, name, _ in cells}
    own = native._PAIR_COST
    bench.main(["--fit", str(table)])
    out = capsys.readouterr().out
    assert "| native | _PAIR_COST |" in out and "now: " in out and "native factor alone: " in out
    assert native._PAIR_COST == own  # the fit replays picks under its factors, then puts the modules' own back


@pytest.mark.parametrize("kind", ["amx", "none"])
def test_a_replay_sees_the_cpu_its_tables_were_measured_on(tmp_path, kind):
    """``--fit`` evaluates tables under their own CPU's flags and constants (``as_measured_on``): a table of a CPU
    with AMX tiles replays with the Xeon's fitted hand-over and blocksparse charges whatever this machine is, one
    without with the EPYC's; tables of both kinds together keep this machine's; everything is restored after."""
    from attnmask.backends import _common, blocksparse, varlen

    bench = load_bench()
    first = "torch 2.13.0+cpu, 2 thread(s), rows of 1024, decode against 4096 keys, H=4, D=64, load 1 1 1"
    paths = {}
    for name in ("amx", "none"):
        paths[name] = tmp_path / f"{name}.txt"
        paths[name].write_text(f"{first}, bfloat16 tiles: {name}, AVX512-BF16: {'yes' if name == 'amx' else 'no'}\n")
    before = (_common.cpu_has_amx_bf16(), _common.cpu_has_avx512_bf16(), blocksparse._HANDOVER_COST)
    charges = (blocksparse._GROUP_COST, blocksparse._CALL_COST)
    with bench.as_measured_on([str(paths[kind])]):
        assert _common.cpu_has_amx_bf16() is (kind == "amx") and _common.cpu_has_avx512_bf16() is (kind == "amx")
        expected = _common.HANDOVER_COST_AMX if kind == "amx" else _common.HANDOVER_COST_OTHER
        assert blocksparse._HANDOVER_COST == varlen._HANDOVER_COST == expected
        at = 0 if kind == "amx" else 1
        assert (blocksparse._GROUP_COST, blocksparse._CALL_COST, blocksparse._BACKWARD_OVERHEAD_SHARE) == (
            blocksparse._GROUP_COSTS[at],
            blocksparse._CALL_COSTS[at],
            blocksparse._BACKWARD_OVERHEAD_SHARES[at],
        )
    with bench.as_measured_on([str(paths["amx"]), str(paths["none"])]):
        assert (_common.cpu_has_amx_bf16(), _common.cpu_has_avx512_bf16(), blocksparse._HANDOVER_COST) == before
    assert (_common.cpu_has_amx_bf16(), _common.cpu_has_avx512_bf16(), blocksparse._HANDOVER_COST) == before
    assert varlen._HANDOVER_COST == before[2] and (blocksparse._GROUP_COST, blocksparse._CALL_COST) == charges


def test_offline_estimates_do_not_see_this_machines_load(monkeypatch):
    """Replayed picks must not change with the load of the machine replaying them: inside ``at_threads`` no core is
    taken (the busy factors apply only where a caller says so), and the load reader is put back afterwards."""
    bench = load_bench()
    workers = importlib.import_module("attnmask.backends._workers")
    monkeypatch.setattr(workers, "ADAPT", True)
    case = next(c for c in bench.cases(256, 512) if c.name.startswith("sliding window"))
    args = bench.argparse.Namespace(heads=4, dim=64)
    idle = bench.estimate(case, torch.float32, "banded", 2, args, grad=True)
    monkeypatch.setattr(workers, "free_cores", lambda: 1)  # another process holds one of the two cores
    assert bench.estimate(case, torch.float32, "banded", 2, args, grad=True) == idle
    assert workers.free_cores() == 1


def test_agreement_counts_rows_whose_fastest_holds_in_the_other_run():
    bench = load_bench()
    first = {("a",): {"x": 1.0, "y": 1.05}, ("b",): {"x": 1.0, "y": 2.0}, ("c",): {"x": 1.0, "y": 1.5}}
    second = {("a",): {"x": 1.2, "y": 1.0}, ("b",): {"x": 1.0, "y": 2.0}, ("c",): {"x": 1.5, "y": 1.0}}
    rows, one, two, off = bench.agreement(first, second)
    # a: x was fastest first, 1.2x the fastest second; y fastest second, 1.05x first. c: off both ways
    assert (rows, one, two) == (3, 1, 2)
    assert [(key, fa, fb) for key, fa, fb, *_ in off] == [(("a",), "x", "y"), (("c",), "x", "y")]
    assert bench.agreement(first, {("b",): {"z": 1.0}})[0] == 0  # no backend timed in both: no verdict


def test_agree_compares_two_saved_tables(capsys, tmp_path):
    bench = load_bench()
    paths = []
    for i in range(2):
        bench.main(["--dry-run", "--only", "tiny,window 8"])
        paths.append(tmp_path / f"limit{i}.txt")
        paths[-1].write_text(capsys.readouterr().out)
    bench.main(["--fit", *map(str, paths), "--agree"])
    out = capsys.readouterr().out
    assert "within 1.1x of the fastest of" in out and "of 2 rows; the other way:" in out
    with pytest.raises(SystemExit):
        bench.main(["--fit", str(paths[0]), "--agree"])


def test_floor_blocks_hold_every_allowed_pair_and_are_timed(capsys):
    bench = load_bench()
    gen = torch.Generator().manual_seed(0)
    for case in bench.cases(96, 160):
        qkv = bench.inputs(case, 2, 8, torch.float32, False, gen)
        blocks = bench.cover_blocks(case, qkv)
        inside = torch.zeros(case.batch, case.q_len, case.kv_len, dtype=torch.bool)
        for b, q0, q1, k0, k1 in blocks:
            assert not inside[b, q0:q1, k0:k1].any(), (case.name, "blocks overlap")
            inside[b, q0:q1, k0:k1] = True
        dense = case.spec.to_dense(case.q_len, case.kv_len).expand(case.batch, -1, -1)
        assert not (dense & ~inside).any(), case.name
        covered = bench.covered_fraction(blocks, case)
        assert covered == float(inside.double().mean()) and covered >= bench.allowed_fraction(case), case.name
    bench.main(["--dry-run", "--only", "chunked"])
    out = capsys.readouterr().out
    assert "| covered | floor ms |" in out and "| auto / floor |" in out
    line = next(x for x in out.splitlines() if x.startswith("| causal chunked"))
    assert float(line.split("|")[4]) > 0 and float(line.split("|")[5]) > 0  # covered, floor ms: measured, not "-"


def test_traffic_moves_the_calls_bytes_and_holds_a_row_its_bound_cannot_pass(capsys):
    """The traffic call reads q, k, v (with a backward also two output-sized tensors) and writes the output (and dq,
    dk, dv); a row whose traffic alone passes its bound is held to the bound over the traffic, still within 1.1x of
    the fastest backend; any other row is judged as before."""
    bench = load_bench()
    q, k, v = (torch.randn(1, 2, 16, 8) for _ in range(3))
    for grad in (False, True):
        run, reads, writes = bench.traffic_fn((q, k, v), grad), [], []
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(torch.Tensor, "sum", lambda t, *a, seen=reads, **kw: seen.append(tuple(t.shape)))
            mp.setattr(torch.Tensor, "fill_", lambda t, x, seen=writes: seen.append(tuple(t.shape)))
            assert run(q, k, v) is None
        assert reads == [(1, 2, 16, 8)] * (5 if grad else 3) and writes == [(1, 2, 16, 8)] * (4 if grad else 1)
    case = bench.Case("tiny", am.causal(), 1, 64, 64, 8)  # a run of 8: bound 2.0

    def ok(auto, best, traffic):
        med = {("idle", bench.REFERENCE): 1.0, ("idle", "native"): auto, ("idle", "varlen"): best}
        if traffic is not None:
            med["idle", bench.TRAFFIC] = traffic
        m = {"med": med, "fraction": 0.01, "costs": {"native": 1.0, "varlen": 1.0}, "picked": "native", "covered": None}
        args = bench.argparse.Namespace(units=False, tuned=False)
        return bench.row(case, m, ["native", "varlen"], args, False).rstrip(" |").rsplit("|", 1)[1].strip()

    assert ok(0.019, 0.019, 0.03) == "yes"  # within the bound of the ideal (0.01 x 2)
    assert ok(0.05, 0.05, 0.03) == "yes (traffic)"  # traffic 3x the ideal, auto 1.67x the traffic
    assert ok(0.07, 0.07, 0.03) == "**no** (traffic)"  # auto 2.33x the traffic
    assert ok(0.05, 0.04, 0.03) == "**no**"  # 1.25x the fastest: not excused by the traffic
    assert ok(0.05, 0.05, 0.015) == "**no**"  # traffic 1.5x the ideal: the bound is reachable
    assert ok(0.05, 0.05, None) == "**no**"
    bench.main(["--dry-run", "--only", "tiny"])
    out = capsys.readouterr().out
    assert "| traffic / ideal | auto / traffic |" in out
    line = next(x for x in out.splitlines() if x.startswith("| documents: tiny"))
    header = next(x for x in out.splitlines() if x.startswith("| structure | allowed"))
    at = [c.strip() for c in header.split("|")].index("traffic / ideal")
    assert float(line.split("|")[at]) > 0  # timed, not "-"


def test_blocksparse_ab_times_this_checkout_against_a_revision(capsys):
    if subprocess.run(["git", "rev-parse", "HEAD"], cwd=SCRIPT.parents[1], capture_output=True).returncode:
        pytest.skip("not a git checkout: no revision to compare with")
    spec = importlib.util.spec_from_file_location("bench_blocksparse_ab", SCRIPT.parent / "bench_blocksparse_ab.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    args = ["--base", "HEAD", "--length", "256", "--reps", "1", "--only", "chunked", "--mode", "fwd,fwdbwd"]
    module.main([*args, "--min-ms", "1"])
    out = capsys.readouterr().out
    assert out.count("| causal chunked 32 |") == 2 and "reproduce: " in out


def test_stacks_bench_times_blocksparse_with_and_without_stacks_and_restores_the_flag(capsys, monkeypatch):
    load_bench()  # bench_stacks imports bench_limit
    from attnmask.backends import blocksparse

    spec = importlib.util.spec_from_file_location("bench_stacks", SCRIPT.with_name("bench_stacks.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    seen = []
    original = blocksparse._stacks
    monkeypatch.setattr(blocksparse, "_stacks", lambda *a: seen.append(original(*a)) or seen[-1])
    args = ["--length", "512", "--reps", "2", "--only", "sliding window 32", "--mode", "fwd,fwdbwd"]
    module.main([*args, "--min-ms", "1"])
    out = capsys.readouterr().out
    assert out.count("| sliding window 32 |") == 2
    assert "reproduce: PYTHONPATH=src python benchmarks/bench_stacks.py" in out
    assert any(seen), "the window must be stacked"
    assert blocksparse.STACK_GROUPS is True


def test_threads_busy_bench_prints_a_row_per_size(capsys):
    load_bench()  # bench_threads_busy imports bench_limit's Spinner
    spec = importlib.util.spec_from_file_location("bench_threads_busy", SCRIPT.with_name("bench_threads_busy.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--rows", "64", "--rounds", "1", "--threads", "2"])
    out = capsys.readouterr().out
    assert "| 64 | 2.1e+06 |" in out and "reproduce: PYTHONPATH=src python benchmarks/bench_threads_busy.py" in out


def test_native_busy_bench_times_native_both_ways_and_restores_its_threshold(capsys):
    load_bench()  # bench_native_busy imports bench_limit
    spec = importlib.util.spec_from_file_location("bench_native_busy", SCRIPT.with_name("bench_native_busy.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    own = native._BUSY_SHARE_WORK
    module.main(["--length", "256", "--only", "documents: tiny", "--rounds", "1", "--min-ms", "0"])
    out = capsys.readouterr().out
    assert out.count("| documents: tiny (8-32) |") == 3
    assert "| native, team kept |" in out and "unmasked sdpa, " in out
    assert "reproduce: PYTHONPATH=src python benchmarks/bench_native_busy.py --length 256" in out
    assert native._BUSY_SHARE_WORK == own


def test_small_rows_bench_times_the_stock_and_the_costed_batches(capsys):
    """bench_small_rows: the packed and padded batches take the stock path, many documents a row the costs."""
    spec = importlib.util.spec_from_file_location("bench_small_rows", SCRIPT.with_name("bench_small_rows.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()
    try:
        module.main(["--rows", "2", "--length", "128", "--reps", "1", "--dim", "16"])  # past _STOCK_TINY_WORK
    finally:
        torch.set_num_threads(threads)  # the script sets its own
    out = capsys.readouterr().out
    for batch, path in (("packed documents", "stock"), ("padded rows", "stock"), ("many documents", "costs")):
        assert out.count(f"| {batch} |") == 2, batch
        assert re.search(rf"\| {batch} \| fwd \| \w+ \({path}\) \|", out), batch
    row = next(line for line in out.splitlines() if line.startswith("| many documents | fwd |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert len(cells) == 13  # ... planning, overhead, picked fresh, choice, choice / stock, two ratios
    assert abs(float(cells[4]) - float(cells[8]) - float(cells[9])) <= 0.011  # choice = auto fresh - picked fresh
    assert "command: PYTHONPATH=src python benchmarks/bench_small_rows.py --rows 2" in out
