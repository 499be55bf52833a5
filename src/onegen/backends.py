"""Search backends: cosine top-k stores of vectors behind one small protocol, made by name.

Backends follow one protocol (`add`, `search`, `save`, `load`): `flat` is exact torch search (CPU or
CUDA, scanned in row chunks so memory stays bounded, optional fp16/bf16 storage on CUDA); `flat-int8`
scans int8 codes (a quarter of fp32's bytes, half of fp16's) and re-ranks a shortlist with the
full-precision rows, so its scores are exact and its top-k is exact unless a true neighbour misses
the shortlist (recall@10 >= 0.99 in tests and benchmarks); `faiss-flat`, `faiss-hnsw` and `faiss-ivf`
use FAISS inner product on L2-normalised vectors (faiss is imported only when one of them is used).

Guarantees:
- Scores are cosine similarities, best first; a search asks for k and gets `min(k, N)` columns. An
  approximate backend that finds fewer than that fills the rest with index -1 and score -inf.
- `make_backend` checks a backend's options before anything is built; `RUNTIME_OPTIONS` are where a
  process searches (device, dtype), never what an index is.
- A backend's state is its vectors: `load` restores it from `VECTORS_NPY`'s rows when a directory
  holds nothing of its own (`flat` and `flat-int8` never do; `FAISS_FILE` is a cache).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from .errors import OneGenError
from .quantized import int8_dot, quantize_int8

VECTORS_NPY, FAISS_FILE = "vectors.npy", "faiss.index"  # in an INDEX_DIR: the rows (written by Index), faiss's cache
BACKENDS = ("flat", "flat-int8", "faiss-flat", "faiss-hnsw", "faiss-ivf")
_OPTIONS = {"flat": {"device", "dtype", "chunk_rows"}, "flat-int8": {"device", "dtype", "chunk_rows", "rerank"},
            "faiss-flat": set(),
            "faiss-hnsw": {"M", "ef_search", "ef_construction"}, "faiss-ivf": {"nlist", "nprobe"}}
RUNTIME_OPTIONS = {"device", "dtype"}  # where this process searches, not what the index is: never saved
_MAX_BLOCK = 1 << 24  # flat search: at most this many scores (Q_block x chunk_rows) alive at once
_AUTO_QUERY_BLOCK = 1024  # flat search with automatic chunks: queries searched together
_CPU_CHUNK_ROWS = 16384  # automatic chunks on CPU (64 queries x 16,384 fp32 scores: 4 MB, in cache)
REBUILD = "rebuild it with `onegen index`"  # the remedy every index error names


class Backend(Protocol):
    """A cosine top-k store of vectors; row i of what was added is index i."""

    def add(self, vectors: torch.Tensor) -> None:
        """Append (N, D) vectors (normalised here, so any scale works)."""

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k per query: scores (Q, min(k, N)) float32 and indices (Q, min(k, N)) int64, on CPU."""

    def save(self, directory: Path) -> None:
        """Write backend-specific files (if any) into an existing directory."""

    def load(self, directory: Path, vectors: torch.Tensor) -> None:
        """Restore from `directory`, or from the saved `vectors` (N, D) when it holds nothing of ours."""

    # optional: `scan_bytes` (int property), about the bytes one search reads; the engine's decision of
    # when to search the queries of rows retrieving at different steps together relies on it (0: at once)


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit L2 norm, float32 (cosine = dot product)."""
    return F.normalize(x.float(), dim=-1)


def _empty(q: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.full((q, k), -math.inf), torch.full((q, k), -1, dtype=torch.long)


class FlatBackend:
    """Exact cosine search with torch; the matrix is scanned `chunk_rows` rows at a time.

    `chunk_rows=None` (the default) picks the chunks per device (`auto_chunk_rows`): on a GPU as many
    rows as keep `_MAX_BLOCK` scores alive (one query scans 16 M rows at once, 64 queries 262,144), so a
    search is a few large matrix products rather than many small kernels (launches bound it there); on
    a CPU 16,384 rows, whose scores stay in cache (measured faster than one big product)."""

    def __init__(self, *, device: str | torch.device | None = None, dtype: torch.dtype | str = torch.float32,
                 chunk_rows: int | None = None):
        self.device = torch.device(device or "cpu")
        self.dtype = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
        self.chunk_rows = None if chunk_rows is None else int(chunk_rows)
        if self.chunk_rows is not None and self.chunk_rows < 1:
            raise OneGenError(f"chunk_rows must be >= 1, got {chunk_rows}")
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise OneGenError("the flat index was asked for device cuda, but CUDA is not available")
        if self.dtype != torch.float32 and (self.device.type != "cuda"
                                            or self.dtype not in (torch.float16, torch.bfloat16)):
            raise OneGenError(f"flat index storage is float32, or float16/bfloat16 on CUDA; got {dtype} on {self.device}")
        self.matrix: torch.Tensor | None = None  # (N, D) unit rows in `dtype` on `device`

    def add(self, vectors: torch.Tensor) -> None:
        rows = unit_rows(vectors).to(self.device, self.dtype)
        self.matrix = rows if self.matrix is None else torch.cat([self.matrix, rows])

    @property
    def scan_bytes(self) -> int:
        """Bytes one search reads (all of the matrix), whatever the number of queries."""
        return 0 if self.matrix is None else self.matrix.numel() * self.matrix.element_size()

    @torch.no_grad()
    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = 0 if self.matrix is None else self.matrix.shape[0]
        k = min(k, n)
        if k == 0 or queries.shape[0] == 0:
            return _empty(queries.shape[0], k)
        q = unit_rows(queries).to(self.device, self.dtype)
        block = max(1, _MAX_BLOCK // self.chunk_rows) if self.chunk_rows else _AUTO_QUERY_BLOCK
        parts = [self._topk(q[i:i + block], k) for i in range(0, q.shape[0], block)]
        return torch.cat([s for s, _ in parts]).cpu(), torch.cat([i for _, i in parts]).cpu()

    def _topk(self, q: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.matrix is not None
        m = self.matrix
        rows = self.chunk_rows or auto_chunk_rows(self.device.type, q.shape[0])
        chunks = ((start, (q @ m[start:start + rows].T).float())  # (B, chunk)
                  for start in range(0, m.shape[0], rows))
        return running_topk(chunks, k, q.shape[0], self.device)

    def save(self, directory: Path) -> None:
        pass  # vectors.npy, written by Index, is the whole state

    def load(self, directory: Path, vectors: torch.Tensor) -> None:
        self.add(vectors)


def auto_chunk_rows(device_type: str, n_queries: int) -> int:
    """Rows per flat-search chunk when none is set: budget-sized on accelerators, cache-sized on CPU."""
    if device_type == "cpu":
        return _CPU_CHUNK_ROWS
    return max(1, _MAX_BLOCK // max(1, n_queries))


def running_topk(chunks: Iterable[tuple[int, torch.Tensor]], k: int, n_queries: int,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k over row chunks given as (first row, scores (B, chunk) float32): each chunk's best k merged
    with the best so far, so only k candidates per query are ever kept."""
    best_s = torch.empty((n_queries, 0), device=device)
    best_i = torch.empty((n_queries, 0), dtype=torch.long, device=device)
    for start, scores in chunks:
        s, i = scores.topk(min(k, scores.shape[1]), dim=1)
        cand_s, cand_i = torch.cat([best_s, s], 1), torch.cat([best_i, i + start], 1)
        best_s, pos = cand_s.topk(min(k, cand_s.shape[1]), dim=1)
        best_i = cand_i.gather(1, pos)
    return best_s, best_i


class FlatInt8Backend:
    """`flat-int8`: an int8 scan and a full-precision re-rank; options as `FlatBackend`, plus `rerank`.

    The scan reads one byte per vector element, which is what bounds exact search on a GPU (memory
    bandwidth); it keeps the best `rerank * k` rows per query by approximate score, and the re-rank
    scores them exactly. Rows are stored twice: int8 codes with a per-row scale (what the scan reads)
    and the unit rows in `dtype` on `device` (what the re-rank reads). The codes are re-made from the
    vectors on load (quantization is deterministic), so an index directory holds nothing extra.
    """

    def __init__(self, *, device: str | torch.device | None = None, dtype: torch.dtype | str = torch.float32,
                 chunk_rows: int | None = None, rerank: int = 4):
        chunk_rows = chunk_rows or 65536  # the int8 scan keeps fixed chunks (its own temporaries per chunk)
        self.exact = FlatBackend(device=device, dtype=dtype, chunk_rows=chunk_rows)  # the re-rank rows
        self.device, self.chunk_rows = self.exact.device, self.exact.chunk_rows
        self.rerank = int(rerank)
        if self.rerank < 1:
            raise OneGenError(f"rerank must be >= 1 (shortlist = rerank x k), got {rerank}")
        self.codes: torch.Tensor | None = None  # (N, D) int8 on `device`
        self.scales: torch.Tensor | None = None  # (N,) float32 on `device`

    def add(self, vectors: torch.Tensor) -> None:
        self.exact.add(vectors)
        parts = [quantize_int8(unit_rows(vectors[i:i + self.chunk_rows]))  # chunked: bounded temporaries
                 for i in range(0, vectors.shape[0], self.chunk_rows)]
        codes = torch.cat([c for c, _ in parts]).to(self.device)
        scales = torch.cat([s for _, s in parts]).to(self.device)
        self.codes = codes if self.codes is None else torch.cat([self.codes, codes])
        self.scales = scales if self.scales is None else torch.cat([self.scales, scales])

    @property
    def scan_bytes(self) -> int:
        """Bytes one search reads: the codes and scales (the shortlist's re-rank reads next to nothing)."""
        return 0 if self.codes is None or self.scales is None else self.codes.numel() + 4 * self.scales.numel()

    @torch.no_grad()
    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = 0 if self.codes is None else self.codes.shape[0]
        k = min(k, n)
        if k == 0 or queries.shape[0] == 0:
            return _empty(queries.shape[0], k)
        q = unit_rows(queries).to(self.device)
        q8, _ = quantize_int8(q)  # a query's own scale does not change its ranking: not needed
        short = min(n, self.rerank * k)
        block = max(1, _MAX_BLOCK // (short * q.shape[1]))
        parts = [self._search_block(q[i:i + block], q8[i:i + block], k, short) for i in range(0, q.shape[0], block)]
        return torch.cat([s for s, _ in parts]).cpu(), torch.cat([i for _, i in parts]).cpu()

    def _search_block(self, q: torch.Tensor, q8: torch.Tensor, k: int, short: int
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.codes is not None and self.scales is not None and self.exact.matrix is not None
        codes, scales = self.codes, self.scales
        chunks = ((start, int8_dot(q8, codes[start:start + self.chunk_rows]).float()
                   * scales[start:start + self.chunk_rows])  # (B, chunk) approximate scores
                  for start in range(0, codes.shape[0], self.chunk_rows))
        _, best_i = running_topk(chunks, short, q.shape[0], self.device)
        rows = self.exact.matrix[best_i]  # (B, short, D): the shortlist in full precision
        exact = torch.einsum("bd,bcd->bc", q.to(rows.dtype), rows).float()
        scores, pos = exact.topk(k, dim=1)
        return scores, best_i.gather(1, pos)

    def save(self, directory: Path) -> None:
        pass  # the codes are re-made from vectors.npy on load (quantization is deterministic)

    def load(self, directory: Path, vectors: torch.Tensor) -> None:
        self.add(vectors)


def _import_faiss() -> Any:
    try:
        import faiss
    except ImportError:
        raise OneGenError("faiss index backends need faiss: `pip install faiss-cpu`, or use --backend flat") from None
    return faiss


class FaissBackend:
    """FAISS inner product on unit vectors: exact (`faiss-flat`), HNSW graph or IVF clusters."""

    def __init__(self, name: str, *, M: int = 32, ef_search: int = 64, ef_construction: int = 40,
                 nlist: int | None = None, nprobe: int = 16):
        self.name, self.M, self.ef_search, self.ef_construction = name, M, ef_search, ef_construction
        self.nlist, self.nprobe = nlist, nprobe
        self.faiss = _import_faiss()
        self.index: Any = None

    def _new_index(self, dim: int, n: int) -> Any:
        faiss = self.faiss
        if self.name == "faiss-flat":
            return faiss.IndexFlatIP(dim)
        if self.name == "faiss-hnsw":
            index = faiss.IndexHNSWFlat(dim, self.M, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = self.ef_construction
            return index
        # sqrt(N) lists, but no fewer than the 39 training points per centroid k-means asks for
        nlist = self.nlist or max(1, min(round(math.sqrt(n)), n // 39, 65536))
        if not 1 <= nlist <= n:
            raise OneGenError(f"faiss-ivf needs 1 <= nlist <= number of vectors ({n}), got {nlist}")
        return faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)

    def add(self, vectors: torch.Tensor) -> None:
        x = np.ascontiguousarray(unit_rows(vectors).cpu().numpy())
        if self.index is None:
            self.index = self._new_index(x.shape[1], x.shape[0])
        if not self.index.is_trained:
            self.index.train(x)
        self.index.add(x)

    @property
    def scan_bytes(self) -> int:
        """Bytes one search reads, about: all vectors (flat), the probed lists (IVF), ef x M (HNSW)."""
        if self.index is None:
            return 0
        row = self.index.d * 4
        if self.name == "faiss-flat":
            return self.index.ntotal * row
        if self.name == "faiss-ivf":
            return self.index.ntotal * row * min(self.nprobe, self.index.nlist) // self.index.nlist
        return min(self.index.ntotal, self.ef_search * self.M) * row

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        k = min(k, 0 if self.index is None else self.index.ntotal)
        if k == 0 or queries.shape[0] == 0:
            return _empty(queries.shape[0], k)
        if self.name == "faiss-hnsw":
            self.index.hnsw.efSearch = max(self.ef_search, k)
        elif self.name == "faiss-ivf":
            self.index.nprobe = min(self.nprobe, self.index.nlist)
        scores, indices = self.index.search(np.ascontiguousarray(unit_rows(queries).cpu().numpy()), k)
        scores, indices = torch.from_numpy(scores), torch.from_numpy(indices).long()
        return scores.masked_fill(indices < 0, -math.inf), indices

    def save(self, directory: Path) -> None:
        self.faiss.write_index(self.index, str(directory / FAISS_FILE))

    def load(self, directory: Path, vectors: torch.Tensor) -> None:
        path = directory / FAISS_FILE
        if not path.is_file():
            self.add(vectors)  # the vectors are the source of truth; the native file is a cache
            return
        try:
            index = self.faiss.read_index(str(path))
        except RuntimeError as e:
            raise OneGenError(f"cannot read the faiss index ({str(e).splitlines()[0]}); delete it to "
                              f"rebuild it from {VECTORS_NPY}, or {REBUILD}", file=str(path)) from None
        if (index.ntotal, index.d) != tuple(vectors.shape) or index.metric_type != self.faiss.METRIC_INNER_PRODUCT:
            raise OneGenError(f"the faiss index does not match {VECTORS_NPY} ({index.ntotal}x{index.d}, "
                              f"expected {vectors.shape[0]}x{vectors.shape[1]} inner product); {REBUILD}",
                              file=str(path))
        self.index = index


def make_backend(name: str, **options: Any) -> Backend:
    """A new, empty backend by name (one of `BACKENDS`), with its options checked."""
    if name not in _OPTIONS:
        raise OneGenError(f"unknown index backend {name!r}; choose one of {', '.join(BACKENDS)}")
    unknown = sorted(set(options) - _OPTIONS[name])
    if unknown:
        allowed = ", ".join(sorted(_OPTIONS[name])) or "none"
        raise OneGenError(f"index backend {name} has no option {unknown[0]!r} (its options: {allowed})")
    if name == "flat":
        return FlatBackend(**options)
    if name == "flat-int8":
        return FlatInt8Backend(**options)
    return FaissBackend(name, **options)
