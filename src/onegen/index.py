"""Document index: cosine top-k search over `[RD]` vectors, saved to and loaded from INDEX_DIR.

Backends follow one small protocol (`add`, `search`, `save`, `load`): `flat` is exact torch search
(CPU or CUDA, scanned in row chunks so memory stays bounded, optional fp16/bf16 storage on CUDA);
`flat-int8` scans int8 codes (a quarter of fp32's bytes, half of fp16's) and re-ranks a shortlist
with the full-precision rows, so its scores are exact and its top-k is exact unless a true neighbour
misses the shortlist (recall@10 >= 0.99 in tests and benchmarks);
`faiss-flat`, `faiss-hnsw` and `faiss-ivf` use FAISS inner product on L2-normalised vectors (faiss is
imported only when one of them is used).

Guarantees:
- Scores are cosine similarities, best first; a search asks for k and gets `min(k, N)` columns. An
  approximate backend that finds fewer than that fills the rest with index -1 and score -inf.
- `ids[i]` is the document of row i of the vectors; ids are unique.
- An INDEX_DIR holds `index.json` (fingerprint, backend, dim, count, format_version, backend options),
  `ids.json`, `vectors.npy` (float32, L2-normalised, read with `allow_pickle=False`: loading never
  runs code) and, for faiss backends, `faiss.index` (rebuilt from the vectors when absent). It is
  written atomically, so an interrupted build leaves no directory.
- An index records the fingerprint of the model that built it and refuses another model.
- Under `torch.distributed` (e.g. `torchrun`), `Index.build` embeds a strided shard of the corpus per
  rank and all-gathers the vectors in corpus order: every rank gets the same index as one process.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from .data import Corpus, as_corpus, read_corpus
from .errors import OneGenError
from .io import atomic_path, write_jsonl_atomic

FORMAT_VERSION = 1
INDEX_JSON, IDS_JSON, VECTORS_NPY, FAISS_FILE = "index.json", "ids.json", "vectors.npy", "faiss.index"
DOCS_JSONL = "docs.jsonl"  # the documents' texts, inserted by the engine
BACKENDS = ("flat", "flat-int8", "faiss-flat", "faiss-hnsw", "faiss-ivf")
_OPTIONS = {"flat": {"device", "dtype", "chunk_rows"}, "flat-int8": {"device", "dtype", "chunk_rows", "rerank"},
            "faiss-flat": set(),
            "faiss-hnsw": {"M", "ef_search", "ef_construction"}, "faiss-ivf": {"nlist", "nprobe"}}
_RUNTIME_OPTIONS = {"device", "dtype"}  # where this process searches, not what the index is: never saved
_MAX_BLOCK = 1 << 24  # flat search: at most this many scores (Q_block x chunk_rows) alive at once
_AUTO_QUERY_BLOCK = 1024  # flat search with automatic chunks: queries searched together
_CPU_CHUNK_ROWS = 16384  # automatic chunks on CPU (64 queries x 16,384 fp32 scores: 4 MB, in cache)
_REBUILD = "rebuild it with `onegen index`"


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


def _normalize(x: torch.Tensor) -> torch.Tensor:
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
        rows = _normalize(vectors).to(self.device, self.dtype)
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
        q = _normalize(queries).to(self.device, self.dtype)
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
        x = np.ascontiguousarray(_normalize(vectors).cpu().numpy())
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
        scores, indices = self.index.search(np.ascontiguousarray(_normalize(queries).cpu().numpy()), k)
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
                              f"rebuild it from {VECTORS_NPY}, or {_REBUILD}", file=str(path)) from None
        if (index.ntotal, index.d) != tuple(vectors.shape) or index.metric_type != self.faiss.METRIC_INNER_PRODUCT:
            raise OneGenError(f"the faiss index does not match {VECTORS_NPY} ({index.ntotal}x{index.d}, "
                              f"expected {vectors.shape[0]}x{vectors.shape[1]} inner product); {_REBUILD}",
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
        from .quantized import FlatInt8Backend

        return FlatInt8Backend(**options)
    return FaissBackend(name, **options)


@dataclass(frozen=True)
class SearchResult:
    """Neighbours per query, best first: document `ids[q][j]` has cosine similarity `scores[q][j]`."""

    ids: list[list[str]]
    scores: list[list[float]]


class Index:
    """Document ids aligned with their L2-normalised vectors, searchable through a backend.

    Build with `Index.build` (a OneGen model embeds the corpus) or `Index.from_vectors` (any
    embedder); `save` / `Index.load` round-trip it through an INDEX_DIR.
    """

    def __init__(self, backend: Backend, backend_name: str, backend_options: dict[str, Any],
                 vectors: torch.Tensor, ids: list[str], fingerprint: str, path: Path | None = None):
        assert vectors.ndim == 2 and vectors.shape[0] == len(ids), "ids must align with vector rows"
        self.backend, self.backend_name, self.backend_options = backend, backend_name, backend_options
        self.vectors = vectors  # (N, D) float32 CPU, unit rows; row i is document ids[i]
        self._ids = ids
        self.fingerprint = fingerprint
        self.path = path
        self.corpus: Corpus | None = None  # the documents' texts (what the engine inserts), when known
        self.rank = 0  # the rank that built it in a sharded build (only rank 0 should save)

    @classmethod
    def build(cls, model: Any, corpus: Corpus | Iterable[Any], backend: str = "flat", batch_size: int = 32,
              progress: bool = True, max_tokens: int | None = None, shard: bool = True,
              **backend_options: Any) -> Index:
        """Embed every document of `corpus` with `model` (`OneGenModel`) and index the vectors.

        Documents run in length-sorted batches of `batch_size`, or of up to `max_tokens` padded tokens.
        Under `torch.distributed` (initialised, or started by `torchrun`: then a process group is
        made for the build and closed after), each rank embeds documents rank, rank + world, ... and
        the vectors are all-gathered in corpus order; `index.rank` tells which rank should save.
        `shard=False` embeds the whole corpus in this process even then.
        """
        corpus = as_corpus(corpus)
        if not corpus.docs:
            raise OneGenError("the corpus is empty: nothing to index", file=corpus.source or None)
        make_backend(backend, **backend_options)  # bad options fail before the slow embedding
        texts = [d.text for d in corpus.docs]
        kwargs: dict[str, Any] = {"batch_size": batch_size}
        if max_tokens is not None:
            kwargs["max_tokens"] = max_tokens
        from .sharding import gather_strided, process_group

        group = process_group(getattr(model, "device", None)) if shard else contextlib.nullcontext((0, 1))
        with group as (rank, world):
            vectors = model.embed_documents(texts[rank::world], progress=progress and rank == 0, **kwargs)
            if world > 1:
                vectors = gather_strided(vectors, len(texts), world)
        index = cls.from_vectors(vectors, corpus.ids, model.fingerprint(), backend, **backend_options)
        index.corpus, index.rank = corpus, rank
        return index

    @classmethod
    def from_vectors(cls, vectors: torch.Tensor | np.ndarray, ids: list[str], fingerprint: str,
                     backend: str = "flat", **backend_options: Any) -> Index:
        """Index (N, D) vectors made by any embedder; `fingerprint` names that embedder."""
        vectors = _normalize(torch.as_tensor(vectors).detach()).cpu()
        ids = [str(i) for i in ids]
        _check_rows(vectors, ids, where=None)
        store = make_backend(backend, **backend_options)
        store.add(vectors)
        return cls(store, backend, backend_options, vectors, ids, fingerprint)

    @property
    def ids(self) -> list[str]:
        """Document id of each row (do not mutate)."""
        return self._ids

    @property
    def dim(self) -> int:
        return self.vectors.shape[1]

    def __len__(self) -> int:
        return len(self._ids)

    @property
    def scan_bytes(self) -> int:
        """Bytes one search reads, about (0 when the backend does not say): the engine's cost model."""
        return int(getattr(self.backend, "scan_bytes", 0))

    def check_model(self, model: Any) -> None:
        """Raise `OneGenError` unless `model` is the one that built this index (same fingerprint)."""
        _check_fingerprint(self.fingerprint, model, self.path)

    def search_tensor(self, vectors: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k rows for (Q, D) query vectors: scores (Q, min(k, N)) float32 and indices int64, on CPU."""
        if k < 1:
            raise OneGenError(f"top-k must be >= 1, got {k}")
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise OneGenError(f"query vectors have shape {tuple(vectors.shape)}, but this index holds "
                              f"{self.dim}-dimensional vectors; the retriever and the index must match")
        return self.backend.search(vectors.detach(), k)

    def search(self, vectors: torch.Tensor | np.ndarray, k: int) -> SearchResult:
        """Top-k documents for each of the (Q, D) query vectors (a (D,) vector is one query)."""
        vectors = torch.as_tensor(vectors)
        scores, indices = self.search_tensor(vectors[None] if vectors.ndim == 1 else vectors, k)
        found = (indices >= 0).sum(1).tolist()  # a -1 (nothing found) only ever pads the end of a row
        return SearchResult([[self._ids[i] for i in row[:n]] for row, n in zip(indices.tolist(), found, strict=True)],
                            [row[:n] for row, n in zip(scores.tolist(), found, strict=True)])

    def save(self, directory: str | Path) -> Path:
        """Write the index to `directory` atomically (replacing an index there); returns the path."""
        directory = Path(directory)
        if directory.exists() and (not directory.is_dir() or (any(directory.iterdir())
                                                              and not (directory / INDEX_JSON).is_file())):
            raise OneGenError("exists and is not an onegen index; choose another output directory",
                              file=str(directory))
        meta = {"format_version": FORMAT_VERSION, "fingerprint": self.fingerprint, "backend": self.backend_name,
                "dim": self.dim, "count": len(self),
                "backend_options": {k: v for k, v in self.backend_options.items() if k not in _RUNTIME_OPTIONS}}
        with atomic_path(directory) as tmp:
            tmp.mkdir()
            np.save(tmp / VECTORS_NPY, self.vectors.numpy(), allow_pickle=False)
            (tmp / IDS_JSON).write_text(json.dumps(self._ids, ensure_ascii=False), encoding="utf-8")
            self.backend.save(tmp)
            if self.corpus is not None:
                write_jsonl_atomic(tmp / DOCS_JSONL, ({"id": d.id, "text": d.text, **({"title": d.title} if d.title
                                                      else {})} for d in self.corpus.docs))
            (tmp / INDEX_JSON).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        return directory

    @classmethod
    def load(cls, directory: str | Path, model: Any = None, **backend_options: Any) -> Index:
        """Read an INDEX_DIR; with `model`, refuse it unless that model built it.

        `backend_options` override the saved ones (e.g. `nprobe=64`, `ef_search=128`, `device="cuda"`).
        """
        directory = Path(directory)
        if not directory.is_dir():
            raise OneGenError(f"index directory not found; {_REBUILD}", file=str(directory))
        meta = _read_meta(directory / INDEX_JSON)
        ids = _read_json(directory / IDS_JSON, list)
        vectors = _read_vectors(directory / VECTORS_NPY)
        if tuple(vectors.shape) != (meta["count"], meta["dim"]):
            raise OneGenError(f"holds {tuple(vectors.shape)} vectors, but {INDEX_JSON} says "
                              f"{meta['count']}x{meta['dim']}; {_REBUILD}", file=str(directory / VECTORS_NPY))
        _check_rows(vectors, ids, where=directory / IDS_JSON)
        if model is not None:  # before the backend loads: a large index should fail fast
            _check_fingerprint(meta["fingerprint"], model, directory)
        options = {**meta["backend_options"], **backend_options}
        store = make_backend(meta["backend"], **options)
        store.load(directory, vectors)
        index = cls(store, meta["backend"], options, vectors, ids, meta["fingerprint"], path=directory)
        if (directory / DOCS_JSONL).is_file():
            index.corpus = read_corpus(directory / DOCS_JSONL)
        return index


def _check_fingerprint(index_fp: str, model: Any, path: Path | None) -> None:
    model_fp = model.fingerprint()
    if model_fp != index_fp and model_fp.startswith("v2-") and len(index_fp) == 16:
        model_fp = model.fingerprint(version=1)  # an index of onegen <= 0.2
    if model_fp != index_fp:
        where = path if path is not None else "(in memory)"
        raise OneGenError(f"index {where} was built by model {index_fp}, not {model_fp}; {_REBUILD}")


def _check_rows(vectors: torch.Tensor, ids: list[str], where: Path | None) -> None:
    """Ids unique and one per vector row; vectors finite and non-empty."""
    file = None if where is None else str(where)
    if vectors.ndim != 2 or vectors.shape[0] == 0 or vectors.shape[1] == 0:
        raise OneGenError(f"expected a non-empty (N, D) matrix of vectors, got shape {tuple(vectors.shape)}", file=file)
    if vectors.shape[0] != len(ids):
        raise OneGenError(f"{len(ids)} ids for {vectors.shape[0]} vectors; they must align one to one", file=file)
    if not all(isinstance(i, str) for i in ids):
        raise OneGenError("document ids must be strings", file=file)
    if len(set(ids)) != len(ids):
        dup = next(i for i, n in Counter(ids).items() if n > 1)
        raise OneGenError(f"duplicate document id {dup!r}; ids must be unique", file=file)
    if not torch.isfinite(vectors).all():
        raise OneGenError("vectors contain NaN or infinity; the embedding model is broken", file=file)


def _corrupt(path: Path, what: str) -> OneGenError:
    return OneGenError(f"{what}; the index is missing or corrupt, {_REBUILD}", file=str(path))


def _read_json(path: Path, expect: type) -> Any:
    if not path.is_file():
        raise _corrupt(path, "file not found")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _corrupt(path, f"not valid JSON ({e})") from None
    if not isinstance(value, expect):
        raise _corrupt(path, f"expected a JSON {'object' if expect is dict else expect.__name__}")
    return value


def _read_meta(path: Path) -> dict[str, Any]:
    meta = _read_json(path, dict)
    types = {"format_version": int, "fingerprint": str, "backend": str, "dim": int, "count": int,
             "backend_options": dict}
    for key, typ in types.items():
        if not isinstance(meta.get(key), typ):
            raise _corrupt(path, f"field {key!r} is missing or not a {typ.__name__}")
    if meta["backend"] not in BACKENDS:
        raise _corrupt(path, f"unknown backend {meta['backend']!r}")
    if meta["format_version"] > FORMAT_VERSION:
        raise OneGenError(f"index format {meta['format_version']} is newer than this onegen reads "
                          f"({FORMAT_VERSION}); upgrade onegen or {_REBUILD}", file=str(path))
    return meta


def _read_vectors(path: Path) -> torch.Tensor:
    if not path.is_file():
        raise _corrupt(path, "file not found")
    try:
        array = np.load(path, allow_pickle=False)  # an object array would need pickle: refused, never run
    except (ValueError, OSError, EOFError) as e:
        raise _corrupt(path, f"not a plain .npy array ({e})") from None
    if not isinstance(array, np.ndarray) or array.dtype != np.float32 or array.ndim != 2:
        raise _corrupt(path, "expected a 2-D float32 array")
    return torch.from_numpy(array)
