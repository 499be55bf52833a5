"""`onegen bench inference`: one-pass decoding speed, retrieval overhead, latency and memory (issue 5).

Random-init Llama-shaped models (`--size tiny|1b|7b`; weights do not matter for speed) with the
forced retrieval schedule (`[RQ]` every `--every` generated tokens, eos ignored), so the engine does
its real work. Two parts, each measuring everything it compares side by side in one run:

- `throughput` (items 1, 2, 3a): batches of `--batches` rows whose prompts differ in length, so rows
  retrieve at different steps, over a `--index-rows` random index searched exactly on the device
  (1 M x 4096 fp16 on CUDA); per engine (`--engine fast|compiled|generic|both|all`; `compiled` is the
  fast path with its decode step through `torch.compile`, fusing the element-wise kernels before the
  graph capture, at a compilation cost paid in the warm-up): generated tok/s against the
  weights-only HBM ceiling (batch x bandwidth / weight bytes) and one that counts the KV cache too,
  and the overhead against plain decoding of the very same token stream (`onepass.replay`).
- `latency` (items 3b, 3c): one answer at a time, onegen vs reencode vs pipeline (a second model of
  the same shape embeds the query text), for `--query-lengths` x `--answers` x `--retrievals`, with
  the ideal ratio from re-timing each baseline's extra pass alone; peak memory per mode (the
  pipeline's second model is loaded only after the onegen and reencode runs, so theirs excludes it).

Prints tables; writes `inference.json` and `inference.png` under `--out`.
"""

from __future__ import annotations

import argparse
import gc
import statistics
from collections.abc import Callable
from typing import Any

import torch

from ..argtypes import POSITIVE, Parser
from ..data import Corpus, Document
from ..engine import Engine
from ..fastpath import FastDecoder
from ..index import Index
from ..model import OneGenModel
from ..retrievers import DenseRetriever
from .common import common_args, machine, median_time, memory_bandwidth, table, write_outputs, write_partial
from .onepass import BigIndex, PoolCorpus, Recorder, latency, prompt_text, texts, throughput
from .train import build_model

SIZES = {"tiny": "1b-mini", "1b": "1b", "7b": "7b"}  # -> bench.train.SHAPES
# option -> (CPU default, CUDA default)
DEFAULTS = {"size": ("tiny", "7b"), "dtype": ("float32", "bfloat16"), "batches": ([1, 4], [1, 8, 32, 64]),
            "prompt_tokens": (48, 512), "new_tokens": (32, 256), "every": (8, 64), "index_rows": (20_000, 1_000_000),
            "query_lengths": ([32, 128], [128, 1024, 4096]), "answers": ([8, 16], [16, 128]),
            "retrievals": ([1, 2], [1, 4]), "doc_tokens": (16, 64), "corpus_size": (64, 256), "repeats": (1, 2),
            "chunk_rows": (None, None)}


def model_for(args: argparse.Namespace, seed: int) -> OneGenModel:
    """A random-init model of `--size`, documents cut at `--doc-tokens`, prompts never truncated."""
    m = build_model(SIZES[args.size], args.device, getattr(torch, args.dtype), seed)
    return OneGenModel(m.hf_model, m.tokenizer, m.tokens, max_length=1 << 16, doc_max_length=args.doc_tokens).eval()


def engine_kinds(args: argparse.Namespace) -> list[str]:
    return {"both": ["fast", "generic"], "all": ["fast", "compiled", "generic"]}.get(args.engine, [args.engine])


def release() -> None:
    """Give back memory of objects the caller has just deleted (engines and decoders hold cycles)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def bench_throughput(gen: OneGenModel, args: argparse.Namespace, bandwidth: float, rows: list[dict[str, Any]],
                     save: Callable[[], None]) -> None:
    """Items 1, 2, 3(a): rows appended to `rows` one by one (`save` after each)."""
    index = BigIndex(args.index_rows, gen.hidden_size, args.device, args.index_backend, args.seed, args.chunk_rows)
    corpus = PoolCorpus(texts(64, args.doc_tokens, 2))
    query = torch.randn(1, gen.hidden_size, device=args.device)
    search_ms = 1000 * median_time(lambda: index.search_tensor(query, 5), 5, args.device)
    for kind in engine_kinds(args):
        fast: Any = False
        if kind in ("fast", "compiled"):  # cache, compilation and graphs for every batch size before timing
            fast = FastDecoder(gen, compile=kind == "compiled")
            n_ret = max(1, args.new_tokens // args.every)
            fast.warmup(tuple(args.batches), max_len=args.prompt_tokens + max(args.batches) + 64 + args.new_tokens
                        + n_ret * (args.doc_tokens + 2))
        engine = Engine(gen, index, corpus=corpus, fast=fast)
        for batch in args.batches:
            if kind == "generic" and batch > args.generic_max_batch:
                continue
            # the first --search-wait policy at every batch, the others side by side at the largest
            for wait in args.search_wait if batch == max(args.batches) else args.search_wait[:1]:
                engine.search_wait = wait
                rows.append(throughput(engine, kind, batch, args, bandwidth, search_ms))
                print(table([rows[-1]], THROUGHPUT_COLUMNS).splitlines()[1], flush=True)
                save()
        del engine, fast
        release()


def bench_latency(gen: OneGenModel, args: argparse.Namespace, out: list[dict[str, Any]], save: Callable[[], None]
                  ) -> dict[str, float]:
    """Items 3(b), 3(c): rows appended to `out` (`save` after each stage); returns each mode's peak memory."""
    corpus = Corpus([Document(f"d{i}", t) for i, t in enumerate(texts(args.corpus_size, args.doc_tokens, 1))])
    index = Index.build(gen, corpus, progress=False)
    prompts = {q: prompt_text(gen, q, seed=q) for q in args.query_lengths}
    fast: Any = args.engine != "generic"
    if fast:  # one decoder for all configurations, sized for the longest, graphs captured up front
        fast = FastDecoder(gen, compile=args.engine == "compiled")
        fast.warmup((1,), max_len=max(args.query_lengths) + 64 + max(args.answers)
                    + max(args.retrievals) * (args.doc_tokens + 2))
    engines = {"onegen": Engine(gen, index, corpus=corpus, fast=fast),
               "reencode": Engine(gen, index, mode="reencode", corpus=corpus, fast=fast)}
    configs = [(q, a, r) for q in args.query_lengths for a in args.answers for r in args.retrievals]
    peaks: dict[str, float] = {}
    rows = {c: latency(engines, prompts[c[0]], c[1], c[2], args, peaks) for c in configs}
    out += rows.values()  # completed in place by the pipeline runs below
    save()
    # the pipeline's second model only now: the peaks above must not include it
    retr = model_for(args, seed=1)
    pipe = {"pipeline": Engine(gen, None, mode="pipeline", corpus=corpus, fast=fast,
                               retriever=Recorder(DenseRetriever(retr, Index.build(retr, corpus, progress=False))))}
    for c in configs:
        rows[c].update({k: v for k, v in latency(pipe, prompts[c[0]], c[1], c[2], args, peaks).items()
                        if k.startswith("pipeline")})
        r = rows[c]
        r["pipeline_ratio"] = r["onegen_ms"] / r["pipeline_ms"]
        r["pipeline_ideal"] = r["onegen_ms"] / (r["onegen_ms"] + r["pipeline_extra_ms"])
        r["pipeline_gap"] = r["pipeline_ratio"] / r["pipeline_ideal"] - 1
        print(table([r], LATENCY_COLUMNS).splitlines()[1], flush=True)
        save()
    del engines, pipe, retr, fast
    release()
    return peaks


def bench_inference(args: argparse.Namespace) -> dict[str, Any]:
    bandwidth, bw_src = memory_bandwidth(args.device)
    gen = model_for(args, seed=0)
    w_bytes = gen.weight_bytes()
    rows: list[dict[str, Any]] = []

    def result() -> dict[str, Any]:
        return {"benchmark": "inference", "partial": False, "rows": rows, "bandwidth": bandwidth,
                "bandwidth_source": bw_src, "weight_bytes": w_bytes, "summary": summary(rows),
                "machine": machine(args.device), "args": vars(args)}

    def save_partial() -> None:  # a time limit that stops the run still leaves what was measured
        write_partial(result(), args.out, "inference")

    if args.skip != "throughput":  # the headline numbers first
        print(table([], THROUGHPUT_COLUMNS))
        bench_throughput(gen, args, bandwidth, rows, save_partial)
        release()
    if args.skip != "latency":
        # peak memory counts what each mode itself holds: anything else still resident is left out
        leftover = torch.cuda.memory_allocated() - w_bytes if args.device.startswith("cuda") else 0
        print(table([], LATENCY_COLUMNS))
        peaks = bench_latency(gen, args, rows, save_partial)
        release()
        memory = [{"part": "memory", "mode": mode, "peak_gb": (peak - leftover) / 1e9, "weights_gb": w_bytes / 1e9,
                   "leftover_gb": leftover / 1e9,
                   "over_pipeline": (peak - leftover) / (peaks["pipeline"] - leftover) if peaks.get("pipeline") else None}
                  for mode, peak in peaks.items()]
        print(table([], MEMORY_COLUMNS))
        print("\n".join(table(memory, MEMORY_COLUMNS).splitlines()[1:]), flush=True)
        rows += memory
    return result()


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's numbers, where measured: fast batch-1 tok/s, batch-64 fraction of ceiling, overheads,
    worst distance from the ideal ratio, memory ratio."""
    out: dict[str, Any] = {}
    tp = [r for r in rows if r["part"] == "throughput"]
    first = tp[0]["search_wait"] if tp else None
    for r in tp:
        key = f"{r['engine']}_b{r['batch']}" + ("" if r["search_wait"] == first else f"_wait{r['search_wait']}")
        out[f"{key}_tok_s"] = r["tok_s"]
        out[f"{key}_of_ceiling"] = r["tok_s"] / r["ceiling_tok_s"]
        out[f"{key}_overhead"] = r["overhead"]
    lat = [r for r in rows if r["part"] == "latency"]
    for mode in ("reencode", "pipeline"):
        done = [r for r in lat if f"{mode}_gap" in r]
        if done:
            out[f"{mode}_worst_gap_from_ideal"] = max(abs(r[f"{mode}_gap"]) for r in done)
            out[f"{mode}_median_ratio"] = statistics.median(r[f"{mode}_ratio"] for r in done)
    mem = {r["mode"]: r for r in rows if r["part"] == "memory"}
    if "onegen" in mem and mem["onegen"]["over_pipeline"] is not None:
        out["memory_onegen_over_pipeline"] = mem["onegen"]["over_pipeline"]
    return out


THROUGHPUT_COLUMNS = [("engine", "engine", ""), ("batch", "batch", "d"), ("search_wait", "wait", ""),
                      ("tok_s", "tok/s", ".1f"),
                      ("ceiling_tok_s", "HBM ceil", ".0f"), ("ceiling_kv_tok_s", "ceil+KV", ".0f"),
                      ("plain_tok_s", "plain tok/s", ".1f"), ("overhead", "overhead", "+.3f"),
                      ("searches", "searches", ".0f"), ("queries_per_search", "q/search", ".1f"),
                      ("search_ms", "search ms", ".2f"),
                      ("search_share", "search %", ".3f")]
LATENCY_COLUMNS = [("query_tokens", "query", "d"), ("new_tokens", "answer", "d"), ("retrievals", "ret", "d"),
                   ("onegen_ms", "onegen ms", ".1f"), ("reencode_ms", "reenc ms", ".1f"),
                   ("pipeline_ms", "pipe ms", ".1f"), ("reencode_ratio", "1g/reenc", ".3f"),
                   ("reencode_ideal", "ideal", ".3f"), ("pipeline_ratio", "1g/pipe", ".3f"),
                   ("pipeline_ideal", "ideal", ".3f")]
MEMORY_COLUMNS = [("mode", "mode", ""), ("peak_gb", "peak GB", ".2f"), ("weights_gb", "gen GB", ".2f"),
                  ("leftover_gb", "left out", ".2f"),
                  ("over_pipeline", "/pipeline", ".3f")]


def _plot(result: dict[str, Any]) -> Any:
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    tp = [r for r in rows if r["part"] == "throughput"]
    first = tp[0]["search_wait"] if tp else None
    for eng in sorted({r["engine"] for r in tp}):
        sel = [r for r in tp if r["engine"] == eng and r["search_wait"] == first]
        ax[0].plot([r["batch"] for r in sel], [r["tok_s"] for r in sel], marker="o", label=f"{eng} (onegen)")
        ax[0].plot([r["batch"] for r in sel], [r["plain_tok_s"] for r in sel], ls=":", label=f"{eng} plain replay")
    if tp:
        ref = sorted({r["batch"]: r for r in tp}.values(), key=lambda r: r["batch"])
        ax[0].plot([r["batch"] for r in ref], [r["ceiling_tok_s"] for r in ref], color="grey", ls="--", label="HBM ceiling")
        ax[0].plot([r["batch"] for r in ref], [r["ceiling_kv_tok_s"] for r in ref], color="grey", ls="-.",
                   label="ceiling incl. KV")
    ax[0].set(xscale="log", yscale="log", xlabel="batch", ylabel="generated tokens / s",
              title="Decoding with retrieval" + ("" if tp else " (not run)"))
    if tp:
        ax[0].legend(fontsize=7)
    lat = [r for r in rows if r["part"] == "latency"]
    for mode, marker in (("reencode", "o"), ("pipeline", "s")):
        for (a, n), color in zip(sorted({(r["new_tokens"], r["retrievals"]) for r in lat}), "bgrcmyk", strict=False):
            sel = [r for r in lat if (r["new_tokens"], r["retrievals"]) == (a, n) and f"{mode}_ratio" in r]
            if sel:
                xs = [r["query_tokens"] for r in sel]
                ax[1].plot(xs, [r[f"{mode}_ratio"] for r in sel], marker=marker, color=color,
                           label=f"{mode} {a} tok {n} ret")
                ax[1].plot(xs, [r[f"{mode}_ideal"] for r in sel], ls=":", color=color)
    ax[1].set(xscale="log", xlabel="query (prompt) tokens", ylabel="t_onegen / t_baseline (dotted: ideal)",
              title="Per-answer latency vs the ideal ratio" + ("" if lat else " (not run)"))
    if lat:
        ax[1].legend(fontsize=6)
    mem = [r for r in rows if r["part"] == "memory"]
    ax[2].bar([r["mode"] for r in mem], [r["peak_gb"] for r in mem], color="tab:green")
    ax[2].set(ylabel="peak memory (GB)", title="Peak memory per mode" + ("" if mem else " (not run)"))
    return fig


def _wait(text: str) -> int | str:
    if text == "auto":
        return text
    if text.isdigit():
        return int(text)
    raise argparse.ArgumentTypeError(f"'auto' or a number of steps >= 0, got {text!r}")


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="onegen bench inference", description="one-pass decoding: tok/s vs the HBM "
                                "ceiling, retrieval overhead vs plain decoding, latency vs reencode/pipeline, memory")
    common_args(p)
    p.add_argument("--size", choices=sorted(SIZES), default=None, help="model shape (CPU tiny, CUDA 7b)")
    p.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (CUDA default)")
    p.add_argument("--engine", choices=["fast", "compiled", "generic", "both", "all"], default="fast",
                   help="decode path: the fast one (compact forward, slot cache, CUDA graphs), the fast one "
                        "compiled (torch.compile), HF's; both = fast + generic, all = the three")
    p.add_argument("--generic-max-batch", type=POSITIVE, default=8, help="largest batch the generic path runs")
    p.add_argument("--skip", choices=["throughput", "latency"], default=None)
    p.add_argument("--batches", type=POSITIVE, nargs="+", default=None, help="throughput (CPU 1 4, CUDA 1 8 32 64)")
    p.add_argument("--prompt-tokens", type=POSITIVE, default=None, help="throughput prompts (CPU 48, CUDA 512)")
    p.add_argument("--new-tokens", type=POSITIVE, default=None, help="throughput answers (CPU 32, CUDA 256)")
    p.add_argument("--every", type=POSITIVE, default=None, help="[RQ] every N generated tokens (CPU 8, CUDA 64)")
    p.add_argument("--index-rows", type=POSITIVE, default=None, help="throughput index size (CPU 20000, CUDA 1000000)")
    p.add_argument("--index-backend", choices=["flat", "flat-int8"], default="flat")
    p.add_argument("--search-wait", type=_wait, nargs="+", default=["auto", 0],
                   help="engine search_wait policies: the first at every batch, the others side by side at the "
                        "largest (default: auto 0)")
    p.add_argument("--chunk-rows", type=POSITIVE, default=None, help="rows per search chunk (default: sized to the queries of each search)")
    p.add_argument("--query-lengths", type=POSITIVE, nargs="+", default=None, help="latency (CPU 32 128, CUDA 128 1024 4096)")
    p.add_argument("--answers", type=POSITIVE, nargs="+", default=None, help="latency answer tokens (CPU 8 16, CUDA 16 128)")
    p.add_argument("--retrievals", type=POSITIVE, nargs="+", default=None, help="latency retrievals (1 2 CPU, 1 4 CUDA)")
    p.add_argument("--doc-tokens", type=POSITIVE, default=None, help="inserted document length (CPU 16, CUDA 64)")
    p.add_argument("--corpus-size", type=POSITIVE, default=None, help="latency index documents (CPU 64, CUDA 256)")
    p.add_argument("--repeats", type=POSITIVE, default=None, help="timed runs per measurement (CPU 1, CUDA 2)")
    args = p.parse_args(argv)
    gpu = args.device.startswith("cuda")
    for key, (cpu_value, gpu_value) in DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, gpu_value if gpu else cpu_value)
    torch.manual_seed(args.seed)
    result = bench_inference(args)
    print("summary: " + ", ".join(f"{k} {v:.4g}" for k, v in result["summary"].items()))
    write_outputs(result, args.out, "inference", _plot)
    return 0
