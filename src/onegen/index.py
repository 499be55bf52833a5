"""Document index: cosine top-k search over `[RD]` vectors, saved to and loaded from INDEX_DIR.

`Index` keeps document ids aligned with their vectors and searches them through a backend
(`onegen.backends`: `flat`, `flat-int8`, `faiss-flat`, `faiss-hnsw`, `faiss-ivf`); this module owns
the INDEX_DIR format.

Guarantees:
- Scores are cosine similarities, best first; a search asks for k and gets `min(k, N)` columns. An
  approximate backend that finds fewer than that fills the rest with index -1 and score -inf (`search`
  drops them).
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
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .backends import BACKENDS, REBUILD, RUNTIME_OPTIONS, VECTORS_NPY, Backend, make_backend, unit_rows
from .data import Corpus, as_corpus, read_corpus
from .errors import OneGenError
from .io import atomic_path, write_jsonl_atomic

FORMAT_VERSION = 1
INDEX_JSON, IDS_JSON = "index.json", "ids.json"  # with VECTORS_NPY and a backend's own files
DOCS_JSONL = "docs.jsonl"  # the documents' texts, inserted by the engine


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
        vectors = unit_rows(torch.as_tensor(vectors).detach()).cpu()
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
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise OneGenError(f"top-k must be an integer >= 1, got {k!r}")
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise OneGenError(f"query vectors have shape {tuple(vectors.shape)}, but this index holds "
                              f"{self.dim}-dimensional vectors; the retriever and the index must match")
        if vectors.is_floating_point() and not bool(torch.isfinite(vectors).all()):
            raise OneGenError("a query vector holds NaN or infinite values (a diverged model?)")
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
                "backend_options": {k: v for k, v in self.backend_options.items() if k not in RUNTIME_OPTIONS}}
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
            raise OneGenError(f"index directory not found; {REBUILD}", file=str(directory))
        meta = _read_meta(directory / INDEX_JSON)
        ids = _read_json(directory / IDS_JSON, list)
        vectors = _read_vectors(directory / VECTORS_NPY)
        if tuple(vectors.shape) != (meta["count"], meta["dim"]):
            raise OneGenError(f"holds {tuple(vectors.shape)} vectors, but {INDEX_JSON} says "
                              f"{meta['count']}x{meta['dim']}; {REBUILD}", file=str(directory / VECTORS_NPY))
        if not torch.isfinite(vectors).all():
            raise _corrupt(directory / VECTORS_NPY, "it holds NaN or infinite values")
        _check_rows(vectors, ids, where=directory / IDS_JSON)
        if model is not None:  # before the backend loads: a large index should fail fast
            _check_fingerprint(meta["fingerprint"], model, directory)
        options = {**meta["backend_options"], **backend_options}
        store = make_backend(meta["backend"], **options)
        store.load(directory, vectors)
        index = cls(store, meta["backend"], options, vectors, ids, meta["fingerprint"], path=directory)
        if (directory / DOCS_JSONL).is_file():
            index.corpus = read_corpus(directory / DOCS_JSONL)
            missing = [i for i in ids if i not in index.corpus]
            if missing:
                raise OneGenError(f"holds no text for {len(missing)} of the indexed ids (e.g. {missing[:3]}); "
                                  f"{REBUILD}", file=str(directory / DOCS_JSONL))
        return index


def _check_fingerprint(index_fp: str, model: Any, path: Path | None) -> None:
    model_fp = model.fingerprint()
    if model_fp != index_fp and model_fp.startswith("v2-") and len(index_fp) == 16:
        model_fp = model.fingerprint(version=1)  # an index of onegen <= 0.2
    if model_fp != index_fp:
        where = path if path is not None else "(in memory)"
        raise OneGenError(f"index {where} was built by model {index_fp}, not {model_fp}; {REBUILD}")


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
    return OneGenError(f"{what}; the index is missing or corrupt, {REBUILD}", file=str(path))


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
        if not isinstance(meta.get(key), typ) or isinstance(meta.get(key), bool):
            raise _corrupt(path, f"field {key!r} is missing or not a {typ.__name__}")
    if meta["backend"] not in BACKENDS:
        raise _corrupt(path, f"unknown backend {meta['backend']!r}")
    if meta["format_version"] > FORMAT_VERSION:
        raise OneGenError(f"index format {meta['format_version']} is newer than this onegen reads "
                          f"({FORMAT_VERSION}); upgrade onegen or {REBUILD}", file=str(path))
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
