"""Separate retrievers for the `pipeline` baseline: what a retriever + generator system does.

A retriever has `retrieve(texts, k) -> list[(doc_ids, scores)]`, `count_tokens(texts)` (the tokens
its own model processes, for forward-pass accounting) and `corpus`.
- `DenseRetriever`: a second model embeds the query text — another `OneGenModel` used as an encoder
  (`embed_queries`) or a sentence-transformers model from a local path — over its own index.
- `HistoryRetriever`: a separately trained OneGen-format retriever (e.g. trained with
  `loss.lm_weight: 0`) that re-reads the generator's whole context up to its `[RQ]` in a second forward
  pass — the two-model system one-pass OneGen replaces. It has `retrieve_histories(token_ids, k)`
  instead of text queries, and needs the generator's tokenizer.
- `BM25Retriever`: lexical BM25 (`bm25s`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .data import Corpus


class SentenceEncoder:
    """A sentence-transformers model from a local directory, with the OneGenModel embedding API."""

    def __init__(self, path: str | Path, device: str | None = None):
        from sentence_transformers import SentenceTransformer

        self.path = str(path)
        self.st = SentenceTransformer(self.path, device=device or "cpu", local_files_only=True)
        self.tokenizer = self.st.tokenizer

    def embed_documents(self, texts: list[str], batch_size: int = 32, progress: bool = False) -> torch.Tensor:
        return self.st.encode(texts, batch_size=batch_size, convert_to_tensor=True,
                              show_progress_bar=progress).float().cpu()

    def embed_queries(self, texts: list[str], batch_size: int = 32, progress: bool = False) -> torch.Tensor:
        return self.embed_documents(texts, batch_size, progress)

    def fingerprint(self) -> str:
        import hashlib

        return "st-" + hashlib.sha256(self.path.encode()).hexdigest()[:12]


class DenseRetriever:
    """Embeds query texts with `encoder` and searches `index` (which that encoder built)."""

    def __init__(self, encoder: Any, index: Any, corpus: Corpus | None = None):
        self.encoder, self.index = encoder, index
        self.corpus = corpus if corpus is not None else getattr(index, "corpus", None)

    def retrieve(self, texts: list[str], k: int) -> list[tuple[list[str], list[float]]]:
        vecs = self.encoder.embed_queries(texts)
        scores, idx = self.index.search_tensor(vecs, k)
        return [([self.index.ids[j] for j in idx[r].tolist() if j >= 0], scores[r].tolist())
                for r in range(len(texts))]

    def count_tokens(self, texts: list[str]) -> int:
        return sum(len(self.encoder.tokenizer(t)["input_ids"]) for t in texts)


class HistoryRetriever:
    """A second OneGen model: its hidden state at the generator's `[RQ]`, over the whole context so far.

    Args:
        model: the retriever (a `OneGenModel` with the generator's tokenizer and special tokens).
        index: an `Index` of the corpus built by `model`.
    """

    def __init__(self, model: Any, index: Any, corpus: Corpus | None = None):
        if hasattr(index, "check_model"):
            index.check_model(model)
        self.model, self.index = model, index
        self.corpus = corpus if corpus is not None else getattr(index, "corpus", None)

    def check_generator(self, generator: Any) -> None:
        """The generator's token ids must mean the same to the retriever."""
        if generator.tokenizer.get_vocab() != self.model.tokenizer.get_vocab():
            raise ValueError("HistoryRetriever needs a model with the generator's tokenizer (same vocabulary "
                             "and special tokens); use DenseRetriever for a model with its own tokenizer")

    def retrieve_histories(self, histories: list[list[int]], k: int) -> list[tuple[list[str], list[float]]]:
        vecs = self.model._embed(histories, batch_size=len(histories), progress=False, what="queries")
        scores, idx = self.index.search_tensor(vecs, k)
        return [([self.index.ids[j] for j in idx[r].tolist() if j >= 0], scores[r].tolist())
                for r in range(len(histories))]


class BM25Retriever:
    """Lexical retrieval with BM25 over the corpus texts (titles included)."""

    def __init__(self, corpus: Corpus):
        import bm25s

        self.corpus = corpus
        self._ids = corpus.ids
        texts = [f"{d.title or ''} {d.text}" for d in corpus.docs]
        self._bm25 = bm25s.BM25()
        self._bm25.index(bm25s.tokenize(texts, stopwords="en", show_progress=False), show_progress=False)

    def retrieve(self, texts: list[str], k: int) -> list[tuple[list[str], list[float]]]:
        import bm25s

        k = min(k, len(self._ids))
        docs, scores = self._bm25.retrieve(bm25s.tokenize(texts, stopwords="en", show_progress=False), k=k,
                                           show_progress=False)
        return [([self._ids[j] for j in docs[r].tolist()], [float(s) for s in scores[r].tolist()])
                for r in range(len(texts))]

    def count_tokens(self, texts: list[str]) -> int:
        return 0  # no neural forward pass


def load_encoder(path: str | Path, device: str | None = None) -> Any:
    """A OneGen model directory, or a sentence-transformers directory (a plain HF checkpoint is refused)."""
    p = Path(path)
    if (p / "modules.json").is_file() and not (p / "onegen.json").is_file():
        return SentenceEncoder(p, device)
    from .model import OneGenModel
    from .modeldir import check_onegen_dir

    check_onegen_dir(p)
    return OneGenModel.from_pretrained(p, device=device)
