"""The measurements behind `onegen bench inference` (issue 5, items 1-3), as functions.

- `throughput`: one engine decoding a batch with the forced retrieval schedule over a large random
  index (search included), against *plain decoding of the very same token stream*: `replay` feeds
  each row's recorded prompt, generated tokens and inserted paragraphs through the same stepper
  (fast or generic), step for step as the engine did, and picks tokens the same way (one batched
  argmax, one transfer) but has no retrieval logic and no search. The difference is what retrieving
  costs onegen.
- `latency`: one answer at a time, onegen vs reencode vs pipeline; the extra pass of each baseline
  (re-encoding the context / the retriever embedding the query text) is re-run alone on the inputs
  recorded during the run, giving the ideal ratio `t_onegen / (t_onegen + t_extra)` to compare the
  measured `t_onegen / t_mode` with.
- `big_index`: N random unit vectors searched exactly by the `flat` backend (fp16 on CUDA) or
  `flat-int8`, with `PoolCorpus` giving every id one of a few texts to insert.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from ..backends import make_backend
from ..data import Document, Message
from ..engine import Engine, GenerationResult
from ..model import OneGenModel
from .common import PeakHeap, sync

WORDS = "velmora brandt caldris ostria founded town region river company painter born north south".split()


def texts(n: int, words: int, seed: int) -> list[str]:
    """`n` texts of `words` random words (the benchmark tokenizer's own vocabulary)."""
    g = torch.Generator().manual_seed(seed)
    return [" ".join(WORDS[i] for i in row.tolist()) + "." for row in torch.randint(len(WORDS), (n, words), generator=g)]


def prompt_text(model: OneGenModel, n_tokens: int, seed: int) -> str:
    """A user message of about `n_tokens` tokens."""
    ids = model.tokenizer(texts(1, n_tokens * 2, seed)[0], add_special_tokens=False)["input_ids"][:n_tokens]
    return model.tokenizer.decode(ids)


def timed(fn: Callable[[], Any], device: str) -> tuple[float, Any]:
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


class PoolCorpus:
    """Documents for ids `d0 .. d{N-1}` without storing N texts: id i gets text i mod len(pool)."""

    def __init__(self, pool: list[str]):
        self.pool = pool

    def __getitem__(self, doc_id: str) -> Document:
        return Document(doc_id, self.pool[int(doc_id[1:]) % len(self.pool)])


class BigIndex:
    """What the engine needs of an index (`ids`, `search_tensor`) over `rows` random unit vectors,
    made on the device chunk by chunk (1 M x 4096 fp16 is 8 GB; no CPU copy)."""

    def __init__(self, rows: int, dim: int, device: str, backend: str = "flat", seed: int = 0,
                 chunk_rows: int | None = None):
        dtype = "float16" if device.startswith("cuda") else "float32"
        self.backend = make_backend(backend, device=device, dtype=dtype, chunk_rows=chunk_rows)
        g = torch.Generator(device=device).manual_seed(seed)
        if backend == "flat":  # fill the matrix in place: add() would hold an fp32 copy of all of it
            matrix = torch.empty((rows, dim), device=device, dtype=getattr(torch, dtype))
            for s in range(0, rows, 65536):
                part = torch.randn((min(65536, rows - s), dim), generator=g, device=device)
                matrix[s:s + part.shape[0]] = torch.nn.functional.normalize(part, dim=-1)
            self.backend.matrix = matrix
        else:
            for s in range(0, rows, 65536):
                self.backend.add(torch.randn((min(65536, rows - s), dim), generator=g, device=device))
        self.ids = [f"d{i}" for i in range(rows)]
        self.bytes = rows * dim * (1 if backend == "flat-int8" else torch.finfo(getattr(torch, dtype)).bits // 8)

    @property
    def scan_bytes(self) -> int:
        return self.backend.scan_bytes

    def search_tensor(self, vectors: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.backend.search(vectors, k)


def segments(prompt: list[int], stream: list[int], open_id: int, close_id: int) -> list[list[int]]:
    """What the engine fed a row, step by step: the prompt, each generated token alone, each inserted
    paragraph (`<paragraph>` .. `</paragraph>`: never generated) whole; a row's last token is never fed."""
    out, j = [prompt], 0
    while j < len(stream):
        if stream[j] == open_id:
            end = stream.index(close_id, j) + 1
            out.append(stream[j:end])
            j = end
        else:
            out.append([stream[j]])
            j += 1
    return out[:-1]


@torch.no_grad()
def replay(engine: Engine, prompts: list[list[int]], streams: list[list[int]]) -> int:
    """Plain decoding of recorded token streams through `engine`'s own stepper (no retrieval, no search);
    returns the number of forward steps (the engine's own count for the same rows)."""
    m = engine.model
    feeds = [segments(p, s, m.ids.open, m.ids.close) for p, s in zip(prompts, streams, strict=True)]
    stepper = engine.new_stepper(len(prompts), max(len(p) + len(s) for p, s in zip(prompts, streams, strict=True)))
    steps = max(len(f) for f in feeds)
    for step in range(steps):
        _, logits = stepper.step([f[step] if step < len(f) else [] for f in feeds], [])
        logits.argmax(-1).tolist()  # a plain decoder picks its tokens too: one batched argmax, one transfer
    return steps


def throughput(engine: Engine, name: str, batch: int, args: argparse.Namespace, bandwidth: float,
               search_ms: float) -> dict[str, Any]:
    """Items 1, 2, 3(a): `batch` rows (prompts of different lengths: they retrieve at different steps)."""
    m, dev = engine.model, args.device
    prompts = [prompt_text(m, args.prompt_tokens + i, seed=i) for i in range(batch)]
    n_ret = max(1, args.new_tokens // args.every)
    kw = {"max_new_tokens": args.new_tokens, "force_query_every": args.every, "ignore_eos": True,
          "max_retrievals": n_ret, "top_k": 5}
    engine.generate(prompts, **kw)  # warm-up: graphs, allocator, kernels
    engine.stats = dict.fromkeys(engine.stats, 0)
    runs = [timed(lambda: engine.generate(prompts, **kw), dev) for _ in range(args.repeats)]
    t_onegen, results = statistics.median(t for t, _ in runs), runs[-1][1]
    prompt_ids = [m.renderer.encode_prompt([Message("user", p)]) for p in prompts]
    streams = [r.token_ids for r in results]
    replay(engine, prompt_ids, streams)  # warm-up
    t_plain = statistics.median(timed(lambda: replay(engine, prompt_ids, streams), dev)[0] for _ in range(args.repeats))
    generated = sum(r.n_generated for r in results)
    inserted = sum(r.n_inserted for r in results)
    searches, queries = engine.stats["searches"] / args.repeats, engine.stats["queries"] / args.repeats
    w_bytes = m.weight_bytes()
    context = statistics.mean(len(p) + len(s) / 2 for p, s in zip(prompt_ids, streams, strict=True))
    return {"part": "throughput", "engine": name, "batch": batch, "search_wait": engine.search_wait,
            "prompt_tokens": statistics.mean(map(len, prompt_ids)), "new_tokens": args.new_tokens,
            "retrievals_per_row": statistics.mean(len(r.retrievals) for r in results), "searches": searches,
            "queries_per_search": queries / max(searches, 1), "onegen_s": t_onegen, "plain_s": t_plain,
            "overhead": t_onegen / t_plain - 1,
            "tok_s": generated / t_onegen, "processed_tok_s": (generated + inserted) / t_onegen,
            "plain_tok_s": generated / t_plain,
            "ceiling_tok_s": batch * bandwidth / w_bytes,  # weights read once per step (the ceiling)
            "ceiling_kv_tok_s": batch * bandwidth / (w_bytes + batch * context * m.kv_bytes_per_token()),
            "search_ms": search_ms, "search_share": searches * search_ms / 1000 / t_onegen}


class Recorder:
    """A retriever that records the texts it was asked about (the pipeline's extra pass, to re-time)."""

    def __init__(self, inner: Any):
        self.inner, self.calls = inner, []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def retrieve(self, texts: list[str], k: int) -> list[tuple[list[str], list[float]]]:
        self.calls.append(list(texts))
        return self.inner.retrieve(texts, k)


def extra_pass_seconds(mode: str, engine: Engine, prompt: list[int], result: GenerationResult, device: str) -> float:
    """The baseline's extra pass alone, on what it processed in the run: reencode re-reads the context
    up to each `[RQ]`; the pipeline's retriever embeds each query text."""
    if mode == "reencode":
        hists = [prompt + result.token_ids[: e.position + 1] for e in result.retrievals]
        work = [lambda h=h: engine.model._embed([h], batch_size=1, progress=False, what="queries") for h in hists]
    elif mode == "pipeline":
        rec = engine.retriever
        work = [lambda t=t: rec.inner.encoder.embed_queries(t) for t in rec.calls]
    else:
        return 0.0
    return sum(timed(w, device)[0] for w in work)


def latency(engines: dict[str, Engine], prompt: str, new_tokens: int, n_ret: int, args: argparse.Namespace,
            peaks: dict[str, float]) -> dict[str, Any]:
    """Item 3(b) for one (query length, answer length, retrievals): per-answer latency of each mode."""
    m = next(iter(engines.values())).model
    ids = m.renderer.encode_prompt([Message("user", prompt)])
    every = max(2, (new_tokens - 1) // n_ret)  # every retrieval is fed before the end
    kw = {"max_new_tokens": new_tokens, "force_query_every": every, "ignore_eos": True, "max_retrievals": n_ret,
          "top_k": 5}
    row: dict[str, Any] = {"part": "latency", "query_tokens": len(ids), "new_tokens": new_tokens, "retrievals": n_ret}
    for mode, eng in engines.items():
        def run(e: Engine = eng) -> GenerationResult:
            if isinstance(e.retriever, Recorder):
                e.retriever.calls.clear()  # keep the last run's query texts
            return e.generate([prompt], **kw)[0]

        run()  # warm-up
        with _Peak(args.device) as peak:
            runs = [timed(run, args.device) for _ in range(args.repeats)]
        peaks[mode] = max(peaks.get(mode, 0.0), peak.bytes)
        res = runs[-1][1]
        row[f"{mode}_ms"] = 1000 * statistics.median(t for t, _ in runs)
        row[f"{mode}_retrievals_done"] = len(res.retrievals)
        row[f"{mode}_extra_ms"] = 1000 * extra_pass_seconds(mode, eng, ids, res, args.device)
    for mode in engines:
        if mode != "onegen" and "onegen_ms" in row:
            row[f"{mode}_ratio"] = row["onegen_ms"] / row[f"{mode}_ms"]  # < 1: the baseline is slower
            row[f"{mode}_ideal"] = row["onegen_ms"] / (row["onegen_ms"] + row[f"{mode}_extra_ms"])
            row[f"{mode}_gap"] = row[f"{mode}_ratio"] / row[f"{mode}_ideal"] - 1
    return row


class _Peak:
    """Peak memory while the block runs: the CUDA allocator's peak (everything allocated, weights
    included), or on CPU the sampled heap peak (`common.PeakHeap`, approximate)."""

    def __init__(self, device: str):
        self.device, self.bytes = device, 0.0

    def __enter__(self) -> _Peak:
        if self.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        else:
            self._heap = PeakHeap().__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.startswith("cuda"):
            self.bytes = float(torch.cuda.max_memory_allocated())
        else:
            self._heap.__exit__(*exc)
            self.bytes = float(self._heap.peak)
