"""`onegen bench index`: corpus embedding throughput and exact search speed / recall.

Embedding: a corpus whose document lengths are long-tailed (lognormal, clipped to 16-1024 tokens
times `--scale`) embedded three ways by the same model: `naive` (fixed batches in corpus order,
padded to each batch's longest), `sorted` (fixed batches in length order: `OneGenModel._embed`) and
`budget` (length order, batches of up to `--max-tokens` padded tokens: `_embed(max_tokens=)`).
Reported: docs/s, real-token MFU = 2 * N * real tokens / time / peak (N: the decoder body's
parameters; no LM head is run), padding overhead, and the largest difference from the naive vectors.

Search: N x D random unit vectors, Q queries, top-k, through `flat` (fp32; fp16 on CUDA) and
`flat-int8`: ms per batch of queries, the bandwidth that time implies for one pass over the stored
matrix (and its fraction of the machine's), and recall@k against exact fp32 search.
"""

from __future__ import annotations

import argparse
import gc
from typing import Any

import torch

from ..argtypes import POSITIVE, POSITIVE_FLOAT, Parser
from ..backends import make_backend
from ..padding import pad_right
from .common import (
    common_args,
    machine,
    median_time,
    memory_bandwidth,
    peak_flops,
    table,
    write_outputs,
    write_partial,
)
from .train import build_model


def doc_lengths(n: int, scale: float, seed: int) -> list[int]:
    """Long-tailed document lengths: lognormal (median 128 tokens) clipped to [16, 1024], times `scale`."""
    g = torch.Generator().manual_seed(seed)
    raw = torch.exp(torch.randn(n, generator=g) * 0.9 + torch.log(torch.tensor(128.0)))
    lo, hi = max(2, round(16 * scale)), max(3, round(1024 * scale))
    return (raw * scale).round().clamp(lo, hi).long().tolist()


def _naive_embed(model, seqs: list[list[int]], batch_size: int) -> torch.Tensor:
    """Fixed batches in corpus order, each padded to its longest: what indexing without bucketing does."""
    out = []
    for start in range(0, len(seqs), batch_size):
        ids, mask = pad_right(seqs[start:start + batch_size], model.ids.pad, model.device)
        hidden, _ = model.hidden_states(ids, mask)
        out.append(hidden[torch.arange(ids.shape[0], device=ids.device), mask.sum(1) - 1].float().cpu())
    return torch.cat(out)


def bench_embedding(args: argparse.Namespace, peak: float, on_row=None) -> list[dict[str, Any]]:
    """Embed the same long-tailed documents three ways: onegen's token budget first (the target row),
    length-sorted batches, then naive padding (slowest, so a time limit cuts it, not the rest);
    `on_row(rows)` after each."""
    dtype = getattr(torch, args.dtype)
    model = build_model(args.model, args.device, dtype, args.seed).eval()
    lm = model.hf_model
    n_body = sum(p.numel() for p in lm.parameters()) - lm.get_input_embeddings().weight.numel()
    if lm.get_output_embeddings() is not None and lm.get_output_embeddings().weight is not lm.get_input_embeddings().weight:
        n_body -= lm.get_output_embeddings().weight.numel()
    g = torch.Generator().manual_seed(args.seed)
    vocab = lm.get_input_embeddings().weight.shape[0]
    seqs = [torch.randint(10, vocab, (n - 1,), generator=g).tolist() + [model.ids.doc]
            for n in doc_lengths(args.docs, args.scale, args.seed)]
    real = sum(len(s) for s in seqs)
    ways = {"budget": lambda: model._embed(seqs, args.batch_size, False, "documents", max_tokens=args.max_tokens),
            "sorted": lambda: model._embed(seqs, args.batch_size, False, "documents"),
            "naive": lambda: _naive_embed(model, seqs, args.batch_size)}
    rows, vectors = [], {}
    for name, fn in ways.items():
        with torch.no_grad():
            vectors[name] = fn()
            seconds = median_time(fn, args.repeats, args.device, warmup=0)
        rows.append({"part": "embed", "method": name, "docs": len(seqs), "real_tokens": real,
                     "docs_s": len(seqs) / seconds, "tok_s": real / seconds, "seconds": seconds,
                     "mfu": 2 * n_body * real / seconds / peak, "max_abs_diff_vs_naive": None})
        if name == "naive":
            for row in rows:
                row["max_abs_diff_vs_naive"] = float((vectors[row["method"]] - vectors["naive"]).abs().max())
        print(table([rows[-1]], EMBED_COLUMNS).splitlines()[1], flush=True)
        if on_row is not None:
            on_row(rows)
    return rows


def bench_search(args: argparse.Namespace, bandwidth: float) -> list[dict[str, Any]]:
    device = args.device
    g = torch.Generator(device=device).manual_seed(args.seed)
    gen_dtype = torch.float16 if device.startswith("cuda") else torch.float32  # 1M x 4096: 8 GB, not 16
    vectors = torch.randn(args.rows, args.dim, generator=g, device=device, dtype=gen_dtype)
    queries = torch.randn(args.queries, args.dim, generator=g, device=device)
    exact = make_backend("flat", device=device, chunk_rows=args.chunk_rows)
    exact.add(vectors)
    _, truth = exact.search(queries, args.k)
    store_dtype = "float16" if device.startswith("cuda") else "float32"
    configs = [("flat", "float32", {}), ("flat-int8", store_dtype, {"rerank": args.rerank})]
    if device.startswith("cuda"):
        configs.insert(1, ("flat", "float16", {}))
    rows = []
    for name, dt, extra in configs:
        if name == "flat" and dt == "float32":
            store = exact
        else:
            store = make_backend(name, device=device, dtype=dt, chunk_rows=args.chunk_rows, **extra)
            store.add(vectors)
        seconds = median_time(lambda s=store: s.search(queries, args.k), args.repeats + 2, device)
        _, found = store.search(queries, args.k)
        scanned = args.rows * args.dim * (1 if name == "flat-int8" else torch.finfo(getattr(torch, dt)).bits // 8)
        hits = sum(len(set(f) & set(t)) for f, t in zip(found.tolist(), truth.tolist(), strict=True))
        rows.append({"part": "search", "method": name, "dtype": "int8" if name == "flat-int8" else dt,
                     "rows": args.rows, "dim": args.dim, "queries": args.queries, "ms": 1000 * seconds,
                     "gb_s": scanned / seconds / 1e9, "bw_frac": scanned / seconds / bandwidth,
                     "recall": hits / truth.numel()})
        print(table([rows[-1]], SEARCH_COLUMNS).splitlines()[1], flush=True)
        if store is not exact:
            del store
        gc.collect()
    return rows


EMBED_COLUMNS = [("method", "embedding", ""), ("docs", "docs", "d"), ("real_tokens", "real tok", "d"),
                 ("docs_s", "docs/s", ".1f"), ("tok_s", "real tok/s", ".0f"), ("mfu", "MFU", ".3f"),
                 ("max_abs_diff_vs_naive", "max|dv|", ".1e")]
SEARCH_COLUMNS = [("method", "search", ""), ("dtype", "dtype", ""), ("rows", "rows", "d"), ("dim", "dim", "d"),
                  ("queries", "queries", "d"), ("ms", "ms", ".2f"), ("gb_s", "GB/s", ".1f"),
                  ("bw_frac", "of bw", ".2f"), ("recall", "recall@k", ".4f")]


def _plot(result: dict[str, Any]) -> Any:
    import matplotlib.pyplot as plt

    emb = [r for r in result["rows"] if r["part"] == "embed"]
    srch = [r for r in result["rows"] if r["part"] == "search"]
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    ax[0].bar([r["method"] for r in emb], [r["docs_s"] for r in emb], color="tab:blue")
    ax[0].set(ylabel="documents / s", title="Corpus embedding (long-tailed lengths)")
    ax[1].bar([f"{r['method']}\n{r['dtype']}" for r in srch], [r["ms"] for r in srch], color="tab:orange")
    for i, r in enumerate(srch):
        ax[1].annotate(f"recall {r['recall']:.3f}", (i, r["ms"]), ha="center", va="bottom", fontsize=8)
    ax[1].set(ylabel="ms per query batch", title="Exact top-k search")
    return fig


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="onegen bench index", description="corpus embedding (naive / sorted / "
                                "token-budget batches) and exact search (fp32/fp16 vs int8)")
    common_args(p)
    p.add_argument("--model", default=None, help="model shape for embedding (CPU 7b-mini, CUDA 7b)")
    p.add_argument("--docs", type=POSITIVE, default=None, help="documents to embed (CPU 400, CUDA 4000)")
    p.add_argument("--scale", type=POSITIVE_FLOAT, default=None, help="document length scale (CPU 0.25, CUDA 1)")
    p.add_argument("--batch-size", type=POSITIVE, default=32)
    p.add_argument("--max-tokens", type=POSITIVE, default=None, help="token budget per batch (CPU 4096, CUDA 65536)")
    p.add_argument("--dtype", default=None, help="model dtype (CPU float32, CUDA bfloat16)")
    p.add_argument("--rows", type=POSITIVE, default=None, help="search: stored vectors (CPU 200000, CUDA 1000000)")
    p.add_argument("--dim", type=POSITIVE, default=None, help="search: dimension (CPU 256, CUDA 4096)")
    p.add_argument("--queries", type=POSITIVE, default=64)
    p.add_argument("--k", type=POSITIVE, default=10)
    p.add_argument("--rerank", type=POSITIVE, default=4, help="flat-int8 shortlist = rerank x k")
    p.add_argument("--chunk-rows", type=POSITIVE, default=None,
                   help="rows per search chunk (default: sized to the query batch; flat-int8 65536)")
    p.add_argument("--repeats", type=POSITIVE, default=None, help="timed runs (CPU 1, CUDA 3)")
    p.add_argument("--skip", choices=["embed", "search"], default=None)
    args = p.parse_args(argv)
    gpu = args.device.startswith("cuda")
    for key, cpu_value, gpu_value in [("model", "7b-mini", "7b"), ("docs", 400, 4000), ("scale", 0.25, 1.0),
                                      ("max_tokens", 4096, 65536), ("dtype", "float32", "bfloat16"),
                                      ("rows", 200_000, 1_000_000), ("dim", 256, 4096), ("repeats", 1, 3)]:
        if getattr(args, key) is None:
            setattr(args, key, gpu_value if gpu else cpu_value)
    torch.manual_seed(args.seed)
    peak, peak_src = peak_flops(args.device, getattr(torch, args.dtype))
    bandwidth, bw_src = memory_bandwidth(args.device)
    rows: list[dict[str, Any]] = []

    def result() -> dict[str, Any]:
        return {"benchmark": "index", "partial": False, "rows": rows, "peak_flops": peak, "peak_source": peak_src,
                "bandwidth": bandwidth, "bandwidth_source": bw_src, "machine": machine(args.device), "args": vars(args)}

    if args.skip != "search":  # first: seconds on a GPU, and a time limit then still leaves it in index.json
        print(table([], SEARCH_COLUMNS))
        rows += bench_search(args, bandwidth)
        write_partial(result(), args.out, "index")
    if args.skip != "embed":
        print(table([], EMBED_COLUMNS))
        searched = list(rows)
        rows += bench_embedding(args, peak, lambda done: write_partial({**result(), "rows": searched + done},
                                                                    args.out, "index"))
    write_outputs(result(), args.out, "index", _plot)
    return 0
