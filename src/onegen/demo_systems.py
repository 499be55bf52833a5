"""The demo's systems and their evaluation: which engines answer each task, and how they are scored.

`build_systems` gives a task's table rows: the two OneGen models in one pass, and the OneGen
generator fed by separate retrievers in pipeline mode (BM25 and the un-tuned MiniLM embedder, given
the strongest query we can build: `FocusedRetriever`; the gold documents: `GoldRetriever`), plus the
two-model ablation when it was trained. `evaluate` runs one system over held-out items with the same
retrieval budget and top-k for every system, and returns its metrics and milliseconds per answer.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .data import Corpus
from .engine import Engine
from .index import Index
from .metrics import el_metrics, qa_metrics
from .model import OneGenModel
from .predict import prediction_record, prompts_for
from .retrievers import BM25Retriever, DenseRetriever, HistoryRetriever, SentenceEncoder

TOP_K = 5
MAX_RETRIEVALS = {"qa": 1, "multihop": 2, "el": 4}  # the task's retrieval budget per answer
MAX_NEW_TOKENS = {"qa": 16, "multihop": 24}  # el: the input's length + room for the markup


@dataclass
class System:
    """One row of the table: how answers are produced for one task."""

    name: str
    engine: Engine
    models: str  # what runs, e.g. "1 LM" or "LM + embedder"
    params: int


def _question_of(text: str, questions: list[str]) -> str:
    """The evaluation question a pipeline query text starts with (the longest that matches)."""
    return max((q for q in questions if text.startswith(q)), key=len, default="")


class FocusedRetriever:
    """Pipeline baselines get the strongest query we can give them, not the whole context.

    Pipeline mode hands the retriever the question plus what the writer wrote so far. For QA the
    query is the question at the first retrieval and only the newly written text (the bridge entity)
    at the next ones; for EL it is the last marked mention.
    """

    _MENTION = re.compile(r"\[\s*\[(.+?)\]\s*\]")

    def __init__(self, inner: Any, task: str, questions: list[str]):
        self.inner, self.task, self.questions, self.corpus = inner, task, questions, inner.corpus

    def _query(self, text: str) -> str:
        if self.task == "el":
            found = self._MENTION.findall(text)
            return found[-1].strip() if found else text
        question = _question_of(text, self.questions)
        return text[len(question):].strip() or question or text

    def retrieve(self, texts: list[str], k: int) -> list[tuple[list[str], list[float]]]:
        return self.inner.retrieve([self._query(t) for t in texts], k)

    def count_tokens(self, texts: list[str]) -> int:
        return self.inner.count_tokens([self._query(t) for t in texts])


class GoldRetriever:
    """Pipeline oracle: hop h of a question gets its gold document (the generator's ceiling)."""

    def __init__(self, items: list[Any], corpus: Corpus):
        self.gold = {i.question: [list(h) for h in i.gold_docs] for i in items}
        self.calls: dict[str, int] = {}
        self.corpus = corpus

    def retrieve(self, texts: list[str], k: int) -> list[tuple[list[str], list[float]]]:
        questions = [_question_of(t, list(self.gold)) for t in texts]
        for q in set(questions):  # rows with one question move in lockstep: one hop per call
            self.calls[q] = self.calls.get(q, 0) + 1
        return [(self.gold[q][min(self.calls[q], len(self.gold[q])) - 1][:k], [1.0]) for q in questions]

    def count_tokens(self, texts: list[str]) -> int:
        return 0


def n_params(model: Any) -> int:
    """Parameter count of a OneGen model or a sentence-transformers encoder."""
    module = model.st if isinstance(model, SentenceEncoder) else model
    return sum(p.numel() for p in module.parameters())


def evaluate(system: System, task: str, items: list, gold: list[dict], batch_size: int,
             progress: bool) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Generate for every item with the system's engine; metrics plus ms per answer."""
    from tqdm.auto import tqdm

    kind = "el" if task == "el" else "qa"
    prompts = prompts_for(items, kind)
    m = system.engine.model
    limits = ([len(m.renderer.encode_chunk(i.text)) + 24 for i in items] if task == "el"
              else [MAX_NEW_TOKENS[task]] * len(items))
    preds: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for start in tqdm(range(0, len(items), batch_size), desc=f"{task}: {system.name}", disable=not progress,
                      unit="batch", leave=False):
        stop = start + batch_size
        results = system.engine.generate(prompts[start:stop], max_new_tokens=limits[start:stop], top_k=TOP_K,
                                         max_retrievals=MAX_RETRIEVALS[task], link=task == "el")
        preds += [prediction_record(i, r, kind, m.tokens, m.tokenizer.unk_token)
                  for i, r in zip(items[start:stop], results, strict=True)]
    seconds = time.perf_counter() - t0
    metrics = el_metrics(gold, preds) if task == "el" else qa_metrics(gold, preds, TOP_K)
    metrics["ms_per_answer"] = 1000 * seconds / max(1, len(items))
    return metrics, preds


@dataclass
class Trained:
    """What the evaluation needs: the two OneGen models, the embedder, their indexes, the corpus, and
    with ablations the retrieval-only and generation-only models."""

    onegen: OneGenModel
    tiny: OneGenModel
    embedder: SentenceEncoder
    indexes: dict[str, Index]
    corpus: Corpus
    ret_only: OneGenModel | None = None
    gen_only: OneGenModel | None = None


def load_trained(minilm_run: Path, scratch_run: Path, st_dir: Path, corpus: Corpus, progress: bool,
                 ret_only_run: Path | None = None, gen_only_run: Path | None = None) -> Trained:
    """Load the trained models and the un-tuned embedder; index the corpus with each retriever."""
    device = "cuda" if torch.cuda.is_available() else None
    onegen = OneGenModel.from_pretrained(minilm_run / "model", device=device)
    tiny = OneGenModel.from_pretrained(scratch_run / "model", device=device)
    embedder = SentenceEncoder(st_dir, device=device)
    st_vecs = embedder.embed_documents([d.text for d in corpus.docs], progress=progress)
    indexes = {"onegen": Index.build(onegen, corpus, progress=progress),
               "tiny": Index.build(tiny, corpus, progress=progress),
               "embedder": Index.from_vectors(st_vecs, corpus.ids, embedder.fingerprint())}
    t = Trained(onegen, tiny, embedder, indexes, corpus)
    if ret_only_run is not None and gen_only_run is not None:
        t.ret_only = OneGenModel.from_pretrained(ret_only_run / "model", device=device)
        t.gen_only = OneGenModel.from_pretrained(gen_only_run / "model", device=device)
        indexes["ret_only"] = Index.build(t.ret_only, corpus, progress=progress)
    return t


def build_systems(task: str, items: list, t: Trained) -> list[System]:
    """The table's rows for one task; the first is OneGen with the MiniLM start."""
    questions = [] if task == "el" else [i.question for i in items]
    p_onegen = n_params(t.onegen)

    def pipeline(retriever: Any) -> Engine:
        return Engine(t.onegen, None, "pipeline", retriever, t.corpus)

    systems = [
        System("OneGen · MiniLM start", Engine(t.onegen, t.indexes["onegen"], corpus=t.corpus), "1 LM", p_onegen),
        System("OneGen · from scratch", Engine(t.tiny, t.indexes["tiny"], corpus=t.corpus), "1 LM",
               n_params(t.tiny)),
        System("BM25 → generator", pipeline(FocusedRetriever(BM25Retriever(t.corpus), task, questions)),
               "LM + BM25", p_onegen),
        System("MiniLM embedder → generator",
               pipeline(FocusedRetriever(DenseRetriever(t.embedder, t.indexes["embedder"]), task, questions)),
               "LM + embedder", p_onegen + n_params(t.embedder)),
    ]
    if t.gen_only is not None and t.ret_only is not None:  # the two-model system, trained like OneGen
        two = Engine(t.gen_only, None, "pipeline", HistoryRetriever(t.ret_only, t.indexes["ret_only"]), t.corpus)
        systems.append(System("retrieval-only → generation-only", two, "2 LMs",
                              n_params(t.gen_only) + n_params(t.ret_only)))
    if task == "multihop" or (task == "qa" and t.gen_only is not None):
        # the writer's ceiling: do answers fail at retrieval or at writing?
        systems.append(System("gold docs → generator", pipeline(GoldRetriever(items, t.corpus)), "LM + oracle",
                              p_onegen))
        if t.gen_only is not None:
            systems.append(System("gold docs → generation-only",
                                  Engine(t.gen_only, None, "pipeline", GoldRetriever(items, t.corpus), t.corpus),
                                  "LM + oracle", n_params(t.gen_only)))
    return systems


def by_wording(task: str, gold: list[dict], preds: list[dict], held_out_ids: set[str]) -> dict[str, Any]:
    """Metrics on the items asked in training wordings and on those in held-out wordings, separately."""
    out = {}
    for name, keep in (("training wordings", False), ("held-out wordings", True)):
        pairs = [(g, p) for g, p in zip(gold, preds, strict=True) if (g["id"] in held_out_ids) == keep]
        if pairs:
            g, p = map(list, zip(*pairs, strict=True))
            out[name] = el_metrics(g, p) if task == "el" else qa_metrics(g, p, TOP_K)
    return out
