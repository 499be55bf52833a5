"""Evaluation metrics for question answering and entity linking.

Pure functions over plain dicts and strings; nothing here reads files or imports the rest of onegen.
Guarantees:
- answer matching uses SQuAD normalisation (lowercase, no punctuation, no articles a/an/the, single
  spaces) after Unicode NFKC (composed accents, fullwidth letters: tokenizers that normalise text
  decode it so), and EM / F1 take the best score over all gold answers;
- retrieval recall is "any acceptable document in the top k", averaged over (item, hop) pairs, and a
  hop with no retrieval counts as a miss (a hop with no gold documents is not scored);
- F1 follows SQuAD v2 on empty answers: an answer that normalises to nothing agrees only with a gold
  answer that does too (v1.1's script gives F1 0 there, while its EM gives 1);
- entity linking is micro-averaged with strong match: same start, same end and same id;
- every rate is a plain Python `float` in [0, 1], an empty denominator gives 0.0, and `n` is an `int`.
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections import Counter
from collections.abc import Sequence
from typing import Any

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(s: str) -> str:
    """Normalise an answer the SQuAD way (lowercase, drop punctuation and articles, collapse spaces),
    after Unicode NFKC."""
    s = unicodedata.normalize("NFKC", s).lower()
    s = "".join(ch for ch in s if ch not in _PUNCTUATION)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def exact_match(pred: str, golds: Sequence[str]) -> float:
    """1.0 if `pred` equals any gold answer after normalisation, else 0.0 (also for no golds)."""
    norm_pred = normalize_answer(pred)
    return float(any(norm_pred == normalize_answer(g) for g in golds))


def _token_f1(pred_tokens: list[str], gold_tokens: list[str]) -> float:
    # SQuAD v2 convention: two empty answers agree; one empty answer agrees with nothing.
    if not pred_tokens or not gold_tokens:
        return float(pred_tokens == gold_tokens)
    common = Counter(pred_tokens) & Counter(gold_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(pred_tokens)
    recall = num_same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def f1_score(pred: str, golds: Sequence[str]) -> float:
    """SQuAD token F1 of `pred` against the best-matching gold answer (0.0 for no golds)."""
    pred_tokens = normalize_answer(pred).split()
    return max((_token_f1(pred_tokens, normalize_answer(g).split()) for g in golds), default=0.0)


def recall_at_k(retrieved_ids: Sequence[str], gold_ids: Sequence[str], k: int) -> float:
    """1.0 if any of `gold_ids` is among the first `k` of `retrieved_ids`, else 0.0."""
    top = set(retrieved_ids[:k])
    return float(any(g in top for g in gold_ids))


def _mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values)) if values else 0.0


def _by_id(preds: Sequence[dict[str, Any]], items: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Index predictions by id; every item must have one."""
    pred_by_id = {p["id"]: p for p in preds}
    missing = [it["id"] for it in items if it["id"] not in pred_by_id]
    if missing:
        raise ValueError(f"{len(missing)} item(s) have no prediction, e.g. {missing[:3]}")
    return pred_by_id


def _hop_hits(item: dict[str, Any], pred: dict[str, Any], k: int) -> list[tuple[int, tuple[float, float]]]:
    """(hop, (hit@1, hit@k)) for each gold hop of one item with gold documents; hop h (from 0) is
    scored on retrievals[h]."""
    retrievals = pred.get("retrievals") or []
    hits = []
    for hop, gold_ids in enumerate(item.get("gold_docs") or []):
        if not gold_ids:
            continue
        doc_ids = retrievals[hop]["doc_ids"] if hop < len(retrievals) else []
        hits.append((hop, (recall_at_k(doc_ids, gold_ids, 1), recall_at_k(doc_ids, gold_ids, k))))
    return hits


def _recall_keys(prefix: str, hits: list[tuple[float, float]], k: int) -> dict[str, float]:
    at1 = _mean([h1 for h1, _ in hits])
    atk = _mean([hk for _, hk in hits])
    return {f"{prefix}recall@1": at1, f"{prefix}recall@k": atk, f"{prefix}recall@{k}": atk}


def qa_metrics(items: Sequence[dict[str, Any]], preds: Sequence[dict[str, Any]], k: int) -> dict[str, Any]:
    """Answer and retrieval metrics for QA (single- and multi-hop).

    Args:
        items: evaluation items with `id`, `answers` (list of str) and optional `gold_docs` (one list
            of acceptable doc ids per hop).
        preds: predictions with `id`, `answer` and `retrievals` (list of `{doc_ids, scores}` in the
            order they happened); matched to items by id, one per item.
        k: the cut-off of `recall@k` (>= 1).

    Returns:
        `em`, `f1` (means over items), `n` (item count) and, when any item has `gold_docs`,
        `recall@1`, `recall@k` and `recall@{k}` averaged over all (item, hop) pairs, plus
        `hop{h}_recall@1`, `hop{h}_recall@k`, `hop{h}_recall@{k}` over the items that have hop h.

    Raises:
        ValueError: `k < 1`, or an item has no prediction.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    pred_by_id = _by_id(preds, items)
    ems, f1s, all_hits = [], [], []
    per_hop: list[list[tuple[float, float]]] = []
    for item in items:
        pred = pred_by_id[item["id"]]
        ems.append(exact_match(pred["answer"], item["answers"]))
        f1s.append(f1_score(pred["answer"], item["answers"]))
        for hop, hit in _hop_hits(item, pred, k):
            while hop >= len(per_hop):
                per_hop.append([])
            per_hop[hop].append(hit)
            all_hits.append(hit)
    metrics: dict[str, Any] = {"em": _mean(ems), "f1": _mean(f1s), "n": len(items)}
    if all_hits:
        metrics.update(_recall_keys("", all_hits, k))
        for hop, hits in enumerate(per_hop, start=1):
            if hits:
                metrics.update(_recall_keys(f"hop{hop}_", hits, k))
    return metrics


def _spans(entities: Sequence[dict[str, Any]]) -> set[tuple[int, int, str]]:
    return {(int(e["start"]), int(e["end"]), str(e["id"])) for e in entities}


def el_metrics(items: Sequence[dict[str, Any]], preds: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Micro precision, recall and F1 of entity linking with strong match.

    A predicted entity is correct only if a gold entity of the same item has the same `start`, `end`
    and `id`; overlapping spans and right-span-wrong-id count as wrong. Duplicate entities within an
    item count once.

    Args:
        items: evaluation items with `id` and `entities` (list of `{start, end, id}`).
        preds: predictions with `id` and `entities`, matched to items by id, one per item.

    Returns:
        `precision`, `recall`, `f1` (0.0 when a denominator is zero) and `n` (item count).

    Raises:
        ValueError: an item has no prediction.
    """
    pred_by_id = _by_id(preds, items)
    n_correct = n_pred = n_gold = 0
    for item in items:
        gold = _spans(item["entities"])
        predicted = _spans(pred_by_id[item["id"]].get("entities") or [])
        n_correct += len(gold & predicted)
        n_pred += len(predicted)
        n_gold += len(gold)
    precision = n_correct / n_pred if n_pred else 0.0
    recall = n_correct / n_gold if n_gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": float(precision), "recall": float(recall), "f1": float(f1), "n": len(items)}
