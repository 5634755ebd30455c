"""PYTHONPATH=src:. python benchmarks/bench_hf_overhead.py [--threads 1] [--repeats 200] [--layers 8] [--quick]

The per-call cost of attnmask's transformers attention function (``hf.attention_forward``, run once per layer)
against transformers' own sdpa attention, on a tiny random-weight Llama whose attention itself costs almost nothing
(hidden 32, 4 heads, 16 tokens), so that the difference is the Python work around the kernel: building the mask
spec, checking keywords, and the other per-call checks.

Each forward is timed interleaved (attnmask, sdpa, attnmask, ...) in one process; the table prints the median
forward time of each, their ratio, and the extra time per attention call ``(attnmask - sdpa) / layers`` in µs.
Scenarios: one unpadded row, a right-padded batch (2D ``attention_mask``), a packed row (``position_ids`` restart,
``use_cache=False``, no mask: what attnmask's collators produce).

A second table times the search for packed ``position_ids`` on the call stack (``hf.enclosing_position_ids``), which
runs on calls that carry no document boundaries: a tiny GPT-BigCode (its attention gets no ``position_ids``) on a
padded batch with a KV cache, with the search on and off (``hf._FRAMES_SEARCHED = 0``), interleaved.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time

import torch


def build(layers: int, impl: str, state: dict | None) -> torch.nn.Module:
    import transformers

    config = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=layers,
        vocab_size=128,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM._from_config(config, attn_implementation=impl).eval()
    if state is not None:
        model.load_state_dict(state)
    return model


def scenarios() -> dict[str, dict]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 128, (2, 16), generator=g)
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, 10:] = 0
    packed_pos = torch.tensor([list(range(5)) + list(range(7)) + list(range(4))])
    return {
        "one row": {"input_ids": ids[:1], "use_cache": False},
        "padded batch": {"input_ids": ids, "attention_mask": mask, "use_cache": False},
        "packed row": {"input_ids": ids[:1], "position_ids": packed_pos, "use_cache": False},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--quick", action="store_true", help="a smoke run: 2 layers, 20 forwards each")
    args = parser.parse_args()
    if args.quick:
        args.layers, args.repeats = 2, 20
    torch.set_num_threads(args.threads)

    from attnmask.integrations import hf

    hf.register()
    ours = build(args.layers, "attnmask", None)
    theirs = build(args.layers, "sdpa", ours.state_dict())
    print(f"reproduce: PYTHONPATH=src:. python {shlex.join(sys.argv)}")
    print(f"tiny Llama, {args.layers} layers, {args.repeats} interleaved forwards each, {args.threads} thread(s)\n")
    print("| scenario | sdpa ms | attnmask ms | ratio | extra µs per attention call |")
    print("|---|---|---|---|---|")
    with torch.no_grad():
        for name, inputs in scenarios().items():
            real = inputs.get("attention_mask", torch.ones_like(inputs["input_ids"])).bool()
            torch.testing.assert_close(ours(**inputs).logits[real], theirs(**inputs).logits[real], atol=1e-4, rtol=0)
            times: dict[str, list[float]] = {"ours": [], "theirs": []}
            for _ in range(args.repeats):
                for key, model in (("ours", ours), ("theirs", theirs)):
                    start = time.perf_counter()
                    model(**inputs)
                    times[key].append(time.perf_counter() - start)
            a, b = statistics.median(times["ours"]), statistics.median(times["theirs"])
            extra = (a - b) / args.layers * 1e6
            print(f"| {name} | {b * 1e3:.3f} | {a * 1e3:.3f} | {a / b:.2f}x | {extra:.0f} |")
    stack_search(args.layers, args.repeats)


def stack_search(layers: int, repeats: int) -> None:
    import transformers

    from attnmask.integrations import hf

    config = transformers.GPTBigCodeConfig(n_embd=32, n_head=4, n_layer=layers, n_positions=64, vocab_size=128)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="attnmask").eval()
    inputs = scenarios()["padded batch"] | {"use_cache": True}
    depth = hf._FRAMES_SEARCHED
    times: dict[int, list[float]] = {depth: [], 0: []}
    with torch.no_grad():
        for _ in range(repeats):
            for searched in (depth, 0):
                hf._FRAMES_SEARCHED = searched
                start = time.perf_counter()
                model(**inputs)
                times[searched].append(time.perf_counter() - start)
    hf._FRAMES_SEARCHED = depth
    inside = _time_inside_search(model, inputs, repeats)
    on, off = statistics.median(times[depth]), statistics.median(times[0])
    print(f"\nstack search for packed position_ids, tiny GPT-BigCode, {layers} layers, padded batch with a KV cache\n")
    print("| search off ms | search on ms | ratio | µs per call (difference) | µs per search (timed inside) |")
    print("|---|---|---|---|---|")
    print(f"| {off * 1e3:.3f} | {on * 1e3:.3f} | {on / off:.3f}x | {(on - off) / layers * 1e6:.1f} | {inside:.1f} |")


def _time_inside_search(model: torch.nn.Module, inputs: dict, repeats: int) -> float:
    """Median µs of one ``hf.enclosing_position_ids`` call, timed around the function during real forwards."""
    from attnmask.integrations import hf

    search, spent = hf.enclosing_position_ids, []

    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return search(*args, **kwargs)
        finally:
            spent.append(time.perf_counter() - start)

    hf.enclosing_position_ids = timed
    try:
        with torch.no_grad():
            for _ in range(repeats):
                model(**inputs)
    finally:
        hf.enclosing_position_ids = search
    return statistics.median(spent) * 1e6


if __name__ == "__main__":
    main()
