"""Predictions for evaluation files: evaluation items in, prediction records out (CONTRACT format)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from .data import ELItem, QAItem, read_eval_items
from .engine import Engine, GenerationResult
from .errors import OneGenError
from .io import write_jsonl_atomic
from .tasks import el_prompt, extract_entities


def prompts_for(items: list[QAItem] | list[ELItem], task: str) -> list[list]:
    if task == "el":
        return [el_prompt(i.text) for i in items]  # type: ignore[union-attr]
    return [list(i.messages) for i in items]  # type: ignore[union-attr]


def prediction_record(item: QAItem | ELItem, result: GenerationResult, task: str, tokens,
                      unk: str | None = None) -> dict[str, Any]:
    rec: dict[str, Any] = {"id": item.id, "output": result.text, "answer": result.answer,
                           "retrievals": [{"doc_ids": e.doc_ids, "scores": [round(s, 6) for s in e.scores]}
                                          for e in result.retrievals]}
    if task == "el":
        ents = []
        for m in extract_entities(item.text, result.text, tokens, unk):  # type: ignore[union-attr]
            if m.retrieval < len(result.retrievals) and result.retrievals[m.retrieval].doc_ids:
                ents.append({"start": m.start, "end": m.end, "id": result.retrievals[m.retrieval].doc_ids[0]})
        rec["entities"] = ents
    return rec


def default_limits(engine: Engine, items: list, task: str) -> list[int]:
    """New tokens per item when none is given: 64 for QA; for EL (the text is written out again with its
    mentions marked and a query token after each) twice the text's tokens + 32."""
    if task != "el":
        return [DEFAULT_QA_TOKENS] * len(items)
    tok = engine.model.tokenizer
    return [2 * len(tok(i.text, add_special_tokens=False)["input_ids"]) + 32 for i in items]


DEFAULT_QA_TOKENS = 64


def run_engine(engine: Engine, items: list, task: str, batch_size: int = 8, max_new_tokens: int | None = None,
               top_k: int = 5, max_retrievals: int = 4, progress: bool = True) -> list[dict[str, Any]]:
    """Generate for every item, in batches, with a progress bar; returns prediction records.
    `max_new_tokens` None: `default_limits`."""
    from tqdm.auto import tqdm

    prompts = prompts_for(items, task)
    _check_prompt_lengths(engine, items, prompts, task)
    records = []
    limits = default_limits(engine, items, task) if max_new_tokens is None else [max_new_tokens] * len(items)
    for start in tqdm(range(0, len(items), batch_size), desc=f"generating ({engine.mode})", disable=not progress,
                      unit="batch"):
        chunk = items[start:start + batch_size]
        results = engine.generate(prompts[start:start + batch_size], max_new_tokens=limits[start:start + batch_size],
                                  top_k=top_k,
                                  max_retrievals=max_retrievals if task != "el" else 10_000, link=task == "el")
        records += [prediction_record(i, r, task, engine.model.tokens, engine.model.tokenizer.unk_token)
                    for i, r in zip(chunk, results, strict=False)]
    return records


def _check_prompt_lengths(engine: Engine, items: list, prompts: list[list], task: str) -> None:
    """Every prompt renders and fits the model's positions: a clear error naming the item before any
    generation (the engine would fail mid-run)."""
    limit = engine.model.max_positions
    for item, prompt in zip(items, prompts, strict=True):
        try:
            n = len(engine.model.renderer.encode_prompt(prompt))
        except OneGenError as e:  # a chat template that refuses it
            raise OneGenError(e.message, file=item.source or None, field=e.field) from None
        if limit is not None and n > limit:
            field = "text" if task == "el" else ("messages" if len(prompt) > 1 else "question")
            raise OneGenError(f"the prompt is {n} tokens; the model takes at most {limit} positions (its config's "
                              "max_position_embeddings): shorten this item", file=item.source or None, field=field)


def _engine(*args: Any, **kwargs: Any) -> Engine:
    """An Engine; a model the fast path cannot run when `--fast` asked for it is a user error."""
    from .fastpath import FastPathUnsupported

    try:
        return Engine(*args, **kwargs)
    except FastPathUnsupported as e:
        raise OneGenError(f"--fast: {e.message}; use --no-fast or leave the option out") from None


def predict_file(model_dir: str, index_dir: str, input_path: str, out_path: str, task: str = "qa",
                 mode: str = "onegen", retriever: str | None = None, batch_size: int = 8,
                 max_new_tokens: int | None = None,
                 top_k: int = 5, max_retrievals: int = 4, device: str | None = None,
                 fast: bool | None = None) -> dict[str, Any]:
    """`onegen generate`: read items, run the engine, write predictions atomically; returns stats.

    `fast`: the engine's fast decode path (None: when on CUDA and supported; True: required)."""
    from .index import Index
    from .model import OneGenModel
    from .modeldir import check_onegen_dir
    from .retrievers import BM25Retriever, DenseRetriever, load_encoder

    for name, value, low in (("batch_size", batch_size, 1), ("max_new_tokens", max_new_tokens or 1, 1),
                             ("top_k", top_k, 1), ("max_retrievals", max_retrievals, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise OneGenError(f"{name} must be an integer >= {low}, got {value!r}")
    if Path(out_path).exists() and Path(input_path).exists() and Path(out_path).samefile(input_path):
        raise OneGenError("the output would overwrite the input file; write the predictions elsewhere",
                          file=str(out_path))
    items = read_eval_items(input_path, task)  # 1. inputs first (cheap): a bad file fails before any loading
    check_onegen_dir(model_dir)
    if mode == "pipeline" and not retriever:
        raise OneGenError("--mode pipeline needs --retriever (a model directory, or 'bm25')")
    index = Index.load(index_dir)
    if index.corpus is None:
        raise OneGenError(f"the index at {index_dir} holds no document texts; rebuild it with onegen index")
    items = read_eval_items(input_path, task, index.corpus)  # gold ids must name documents of this index
    model = OneGenModel.from_pretrained(model_dir, device=device)  # 2. then the models
    if mode == "pipeline":
        if retriever == "bm25":
            ret: Any = BM25Retriever(index.corpus)
        else:
            encoder = load_encoder(retriever, device)
            index.check_model(encoder)
            ret = DenseRetriever(encoder, index)
        engine = _engine(model, None, mode="pipeline", retriever=ret, corpus=index.corpus, fast=fast)
    else:
        index.check_model(model)
        engine = _engine(model, index, mode=mode, fast=fast)
    t0 = time.perf_counter()
    records = run_engine(engine, items, task, batch_size, max_new_tokens, top_k, max_retrievals)
    write_jsonl_atomic(Path(out_path), records)
    s = engine.stats
    return {"n": len(records), "seconds": time.perf_counter() - t0, "generator_tokens": s["generator_tokens"],
            "extra_query_tokens": s["reencode_tokens"] + s["retriever_tokens"]}
