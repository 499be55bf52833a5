"""`onegen bench inference`: per-answer latency of onegen vs reencode vs pipeline.

Same generator, same forced retrieval schedule, measured side by side in one run (ratios are what to
read: machines are noisy). Random-init weights are fine for speed; the schedule forces `[RQ]` so the
engine does real work.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from ..config import ModelConfig, ScratchConfig, TokenizerConfig, TokenizerTrainConfig, TokensConfig
from ..data import Corpus, Document
from ..engine import Engine
from ..index import Index
from ..model import OneGenModel
from ..retrievers import DenseRetriever
from .common import machine, write_outputs

WORDS = ("velmora brandt caldris ostria founded town region river company painter born north south "
         "harbour mill works bridge valley").split()


def _texts(n: int, words: int, seed: int) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(WORDS), (n, words), generator=g)
    return [" ".join(WORDS[i] for i in row.tolist()) + "." for row in idx]


def _model(seed: int, hidden: int, layers: int, heads: int, texts: list[str], device: str) -> OneGenModel:
    torch.manual_seed(seed)
    cfg = ModelConfig(scratch=ScratchConfig(architecture="llama", hidden_size=hidden, num_layers=layers,
                                            num_heads=heads, max_position_embeddings=8192))
    tok = TokenizerConfig(train=TokenizerTrainConfig(vocab_size=500, min_frequency=1))
    model = OneGenModel.from_config(cfg, tok, TokensConfig(), texts, doc_max_length=64)
    return model.to(device).eval()


def _prompt(model: OneGenModel, n_tokens: int, seed: int) -> str:
    text = _texts(1, n_tokens * 2, seed)[0]
    ids = model.tokenizer(text, add_special_tokens=False)["input_ids"][:n_tokens]
    return model.tokenizer.decode(ids)


def bench_inference(args: argparse.Namespace) -> dict[str, Any]:
    device = args.device
    corpus_texts = _texts(args.corpus_size, 24, 1)
    corpus = Corpus([Document(f"d{i}", t) for i, t in enumerate(corpus_texts)])
    gen = _model(0, args.hidden, args.layers, args.heads, corpus_texts, device)
    retr = _model(1, args.hidden, args.layers, args.heads, corpus_texts, device)
    index = Index.build(gen, corpus, progress=False)
    r_index = Index.build(retr, corpus, progress=False)
    engines = {"onegen": Engine(gen, index, corpus=corpus),
               "reencode": Engine(gen, index, mode="reencode", corpus=corpus),
               "pipeline": Engine(gen, None, mode="pipeline", retriever=DenseRetriever(retr, r_index), corpus=corpus)}
    rows = []
    for qlen in args.query_lengths:
        prompt = _prompt(gen, qlen, qlen)
        for n_ret in args.retrievals:
            every = max(2, (args.new_tokens - 1) // n_ret)  # every retrieval is fed before the end
            kw = {"max_new_tokens": args.new_tokens, "force_query_every": every, "ignore_eos": True,
                  "max_retrievals": n_ret, "top_k": 5}
            row: dict[str, Any] = {"query_tokens": qlen, "retrievals": n_ret, "new_tokens": args.new_tokens}
            for name, eng in engines.items():
                eng.generate([prompt], **kw)  # warm-up
                for k in eng.stats:
                    eng.stats[k] = 0
                times = []
                for _ in range(args.repeats):
                    t0 = time.perf_counter()
                    res = eng.generate([prompt], **kw)[0]
                    if device.startswith("cuda"):
                        torch.cuda.synchronize()
                    times.append(time.perf_counter() - t0)
                row[f"{name}_ms"] = 1000 * statistics.median(times)
                row[f"{name}_extra_tokens"] = (eng.stats["reencode_tokens"] + eng.stats["retriever_tokens"]) // args.repeats
                row[f"{name}_retrievals_done"] = len(res.retrievals)
            row["reencode_over_onegen"] = row["reencode_ms"] / row["onegen_ms"]
            row["pipeline_over_onegen"] = row["pipeline_ms"] / row["onegen_ms"]
            rows.append(row)
            print(_row_line(row), flush=True)
    return {"benchmark": "inference", "rows": rows, "machine": machine(device), "args": vars(args)}


def _row_line(r: dict[str, Any]) -> str:
    return (f"{r['query_tokens']:>6} {r['retrievals']:>4} {r['onegen_ms']:>10.1f} {r['reencode_ms']:>11.1f} "
            f"{r['pipeline_ms']:>11.1f} {r['reencode_over_onegen']:>9.2f}x {r['pipeline_over_onegen']:>9.2f}x "
            f"{r['reencode_extra_tokens']:>9} {r['pipeline_extra_tokens']:>9}")


HEADER = (f"{'query':>6} {'ret':>4} {'onegen ms':>10} {'reencode ms':>11} {'pipeline ms':>11} "
          f"{'reenc/1g':>10} {'pipe/1g':>10} {'reenc+tok':>9} {'pipe+tok':>9}")


def _plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(7, 4))
    for n_ret in sorted({r["retrievals"] for r in rows}):
        sel = [r for r in rows if r["retrievals"] == n_ret]
        xs = [r["query_tokens"] for r in sel]
        ax.plot(xs, [r["reencode_over_onegen"] for r in sel], marker="o", label=f"reencode / onegen, {n_ret} ret")
        ax.plot(xs, [r["pipeline_over_onegen"] for r in sel], marker="s", ls="--", label=f"pipeline / onegen, {n_ret} ret")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set(xscale="log", xlabel="query (prompt) tokens", ylabel="latency ratio (higher = onegen faster)",
           title="Per-answer latency relative to one-pass onegen")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="onegen bench inference", description="per-answer latency: onegen vs "
                                "reencode vs pipeline")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--query-lengths", type=int, nargs="+", default=[64, 256, 1024])
    p.add_argument("--retrievals", type=int, nargs="+", default=[1, 4])
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--corpus-size", type=int, default=500)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    print(HEADER)
    result = bench_inference(args)
    write_outputs(result, args.out, "inference", _plot)
    return 0
