"""The generic engine path (any HF causal LM; the fast path covers Llama-like decoders only) with rows
retrieving at different steps: its shared KV cache as 0.2.0 kept it (every paragraph a run of holes in
every other row, every paragraph step run at the paragraph's width for all rows), with the compaction
alone, and with the compaction plus the split of mixed steps — side by side in one run, same prompts,
same forced schedule; the tokens are checked identical.

    python benchmarks/bench_generic_cache.py [--device cpu|cuda] [--size tiny|1b] [--batches 8 32]

Prints a table, writes benchmarks/results/generic_cache.json and generic_cache.png.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

import onegen.steppers as stepping
from onegen.bench.common import common_args, machine, sync, table, write_outputs
from onegen.bench.inference import SIZES
from onegen.bench.onepass import BigIndex, PoolCorpus, prompt_text, texts
from onegen.bench.train import build_model
from onegen.engine import Engine

VARIANTS = {  # name -> (COMPACT_SLACK, SPLIT_MIN)
    "holes kept (0.2.0)": (10**12, 10**12),
    "compaction": (stepping.COMPACT_SLACK, 10**12),
    "compaction + split": (stepping.COMPACT_SLACK, stepping.SPLIT_MIN),
}
COLUMNS = [("batch", "batch", "d"), ("variant", "variant", ""), ("seconds", "s / batch", ".2f"),
           ("tok_s", "tok/s", ".0f"), ("speedup", "x", ".2f"), ("columns", "cache cols", "d"),
           ("longest", "longest row", "d"), ("compactions", "compactions", "d"), ("splits", "splits", "d"),
           ("same_tokens", "same tokens", "")]


def run(args: argparse.Namespace) -> dict:
    dtype = getattr(torch, args.dtype)
    model = build_model(SIZES[args.size], args.device, dtype, args.seed).eval()
    index = BigIndex(args.index_rows, model.hidden_size, args.device)
    corpus = PoolCorpus(texts(64, args.doc_words, 2))
    kw = {"max_new_tokens": args.new_tokens, "force_query_every": args.every, "ignore_eos": True,
          "max_retrievals": args.new_tokens // args.every, "top_k": 5}
    rows = []
    defaults = (stepping.COMPACT_SLACK, stepping.SPLIT_MIN)
    try:
        for batch in args.batches:
            prompts = [prompt_text(model, args.prompt_tokens + 3 * i, seed=i) for i in range(batch)]
            tokens = None
            for name, (slack, split) in VARIANTS.items():
                stepping.COMPACT_SLACK, stepping.SPLIT_MIN = slack, split
                eng = Engine(model, index, corpus=corpus, fast=False, search_wait=0)  # one insert per step, as measured
                steppers = []
                new_stepper = eng.new_stepper
                eng.new_stepper = lambda *a, f=new_stepper, s=steppers: s.append(f(*a)) or s[-1]
                eng.generate(prompts, **kw)  # warm-up
                times = []
                for _ in range(args.repeats):
                    sync(args.device)
                    t0 = time.perf_counter()
                    res = eng.generate(prompts, **kw)
                    sync(args.device)
                    times.append(time.perf_counter() - t0)
                ids = [r.token_ids for r in res]
                tokens = tokens or ids
                st = steppers[-1]
                row = {"batch": batch, "variant": name, "seconds": statistics.median(times),
                       "tok_s": sum(r.n_generated for r in res) / statistics.median(times),
                       "columns": st.mask.shape[1], "longest": int(st.lengths.max()),
                       "compactions": st.compactions, "splits": st.splits, "same_tokens": ids == tokens}
                row["speedup"] = next(r["seconds"] for r in rows + [row] if r["batch"] == batch) / row["seconds"]
                rows.append(row)
                print(table([row], COLUMNS).splitlines()[1], flush=True)
    finally:
        stepping.COMPACT_SLACK, stepping.SPLIT_MIN = defaults
    return {"benchmark": "generic_cache", "rows": rows, "machine": machine(args.device), "args": vars(args)}


def plot(result: dict):
    import matplotlib.pyplot as plt

    rows = result["rows"]
    batches = sorted({r["batch"] for r in rows})
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    for k, name in enumerate(VARIANTS):
        sel = [next(r for r in rows if r["batch"] == b and r["variant"] == name) for b in batches]
        xs = [i + 0.27 * (k - 1) for i in range(len(batches))]
        ax[0].bar(xs, [r["tok_s"] for r in sel], 0.27, label=name)
        ax[1].bar(xs, [r["columns"] for r in sel], 0.27, label=name)
    labels = [f"batch {b}" for b in batches]
    ax[0].set(xticks=range(len(batches)), xticklabels=labels, ylabel="generated tokens / s",
              title="Generic path, staggered retrievals")
    ax[1].set(xticks=range(len(batches)), xticklabels=labels, ylabel="columns", title="KV cache width at the end")
    ax[0].legend(fontsize=7)
    return fig


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common_args(p)
    p.add_argument("--size", choices=sorted(SIZES), default="tiny")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--batches", type=int, nargs="+", default=[8, 32])
    p.add_argument("--prompt-tokens", type=int, default=48)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--every", type=int, default=32, help="[RQ] every N generated tokens")
    p.add_argument("--doc-words", type=int, default=48, help="words per inserted document")
    p.add_argument("--index-rows", type=int, default=2000)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    print(table([], COLUMNS))
    write_outputs(run(args), args.out, "generic_cache", plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
