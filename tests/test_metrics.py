"""Tests for onegen.metrics: hand-computed SQuAD EM/F1, per-hop recall and strong-match EL scores."""

from __future__ import annotations

import pytest

from onegen.metrics import (
    el_metrics,
    exact_match,
    f1_score,
    normalize_answer,
    qa_metrics,
    recall_at_k,
)


def test_normalize_answer_squad_rules():
    assert normalize_answer("  The Cat, sat -- on AN old mat!  ") == "cat sat on old mat"
    # articles are removed only as whole words
    assert normalize_answer("Theatre and Anna") == "theatre and anna"


def test_exact_match_takes_any_gold():
    assert exact_match("the Ilsa Brandt.", ["Someone", "ilsa brandt"]) == 1.0
    assert exact_match("Ilsa", ["Ilsa Brandt"]) == 0.0
    assert exact_match("anything", []) == 0.0


def test_f1_hand_computed():
    # "the cat sat" -> [cat, sat]; "a cat sat down" -> [cat, sat, down]
    # common = 2, precision = 2/2 = 1, recall = 2/3, F1 = 2*1*(2/3) / (1 + 2/3) = 4/5
    assert f1_score("the cat sat", ["a cat sat down"]) == pytest.approx(0.8)
    # best gold wins: exact match with the second gold
    assert f1_score("the cat sat", ["dog", "cat sat"]) == 1.0
    # repeated tokens count by multiplicity: [x, x] vs [x] -> common 1, P = 1/2, R = 1, F1 = 2/3
    assert f1_score("x x", ["x"]) == pytest.approx(2 / 3)


def test_f1_edge_cases():
    assert f1_score("dog", ["cat"]) == 0.0
    assert f1_score("the", ["a"]) == 1.0  # both normalise to empty
    assert f1_score("", ["cat"]) == 0.0
    assert f1_score("cat", []) == 0.0
    assert isinstance(f1_score("cat", ["cat"]), float)


def test_recall_at_k():
    assert recall_at_k(["d9", "d1", "d2"], ["d1"], 1) == 0.0
    assert recall_at_k(["d9", "d1", "d2"], ["d1"], 2) == 1.0
    assert recall_at_k(["d9", "d1"], ["d5", "d9"], 1) == 1.0  # any acceptable doc counts
    assert recall_at_k([], ["d1"], 5) == 0.0


def _multihop_fixture():
    items = [
        {"id": "q1", "answers": ["Ilsa Brandt"], "gold_docs": [["d1"], ["d2"]]},
        {"id": "q2", "answers": ["Paris"], "gold_docs": [["d3"]]},
        {"id": "q3", "answers": ["x"]},  # no retrieval gold: scored for EM/F1 only
    ]
    preds = [  # in a different order than the items: matching is by id
        {"id": "q3", "answer": "x y", "retrievals": []},
        {"id": "q1", "answer": "ilsa brandt.",
         "retrievals": [{"doc_ids": ["d9", "d1"], "scores": [0.9, 0.8]},
                        {"doc_ids": ["d2", "d8"], "scores": [0.7, 0.1]}]},
        {"id": "q2", "answer": "London", "retrievals": [{"doc_ids": ["d3", "d4"], "scores": [0.5, 0.4]}]},
    ]
    return items, preds


def test_qa_metrics_multihop_hand_computed():
    items, preds = _multihop_fixture()
    m = qa_metrics(items, preds, k=2)
    # EM: q1 1, q2 0, q3 0 -> 1/3.  F1: q1 1, q2 0, q3 ([x, y] vs [x]: P 1/2, R 1 -> 2/3) -> (5/3)/3
    assert m["em"] == pytest.approx(1 / 3)
    assert m["f1"] == pytest.approx(5 / 9)
    # (item, hop) pairs (hit@1, hit@2): q1 hop1 (0, 1), q1 hop2 (1, 1), q2 hop1 (1, 1)
    assert m["recall@1"] == pytest.approx(2 / 3)
    assert m["recall@k"] == m["recall@2"] == 1.0
    assert m["hop1_recall@1"] == pytest.approx(0.5)
    assert m["hop1_recall@k"] == m["hop1_recall@2"] == 1.0
    assert m["hop2_recall@1"] == m["hop2_recall@k"] == m["hop2_recall@2"] == 1.0
    assert "hop3_recall@1" not in m
    assert m["n"] == 3
    assert all(type(v) is float for key, v in m.items() if key != "n")


def test_qa_metrics_missing_retrieval_is_a_miss():
    items = [{"id": "q1", "answers": ["a b"], "gold_docs": [["d1"], ["d2"]]}]
    preds = [{"id": "q1", "answer": "a b", "retrievals": [{"doc_ids": ["d1"], "scores": [1.0]}]}]
    m = qa_metrics(items, preds, k=5)
    assert m["hop1_recall@5"] == 1.0
    assert m["hop2_recall@1"] == m["hop2_recall@5"] == 0.0
    assert m["recall@1"] == m["recall@k"] == 0.5


def test_qa_metrics_without_gold_docs_has_no_recall_keys():
    m = qa_metrics([{"id": "q1", "answers": ["a"]}], [{"id": "q1", "answer": "b"}], k=1)
    assert m == {"em": 0.0, "f1": 0.0, "n": 1}


def test_qa_metrics_rejects_bad_k_and_missing_prediction():
    items, preds = _multihop_fixture()
    with pytest.raises(ValueError, match="k must be"):
        qa_metrics(items, preds, k=0)
    with pytest.raises(ValueError, match="q2"):
        qa_metrics(items, [p for p in preds if p["id"] != "q2"], k=1)


TEXT = "Yesterday Orla Venn spoke in Caldris."  # "Orla Venn" = [10, 19), "Caldris" = [29, 36)


def test_el_metrics_strong_match_hand_computed():
    assert TEXT[10:19] == "Orla Venn" and TEXT[29:36] == "Caldris"
    items = [
        {"id": "e1", "text": TEXT, "entities": [{"start": 10, "end": 19, "id": "d42"},
                                                {"start": 29, "end": 36, "id": "d7"}]},
        {"id": "e2", "text": "Nothing here.", "entities": []},
    ]
    preds = [
        {"id": "e1", "entities": [{"start": 10, "end": 19, "id": "d42"},  # correct
                                  {"start": 10, "end": 14, "id": "d42"},  # partial overlap: wrong
                                  {"start": 29, "end": 36, "id": "d8"}]},  # right span, wrong id
        {"id": "e2", "entities": []},
    ]
    m = el_metrics(items, preds)
    # correct 1, predicted 3, gold 2: P = 1/3, R = 1/2, F1 = 2*(1/6) / (5/6) = 2/5
    assert m["precision"] == pytest.approx(1 / 3)
    assert m["recall"] == pytest.approx(0.5)
    assert m["f1"] == pytest.approx(0.4)
    assert m["n"] == 2


def test_el_metrics_empty_denominators_are_zero():
    items = [{"id": "e1", "text": "abc", "entities": []}]
    m = el_metrics(items, [{"id": "e1", "entities": []}])
    assert m == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "n": 1}
    # predictions but nothing right: precision 0 / 1, recall 0 / 0
    m = el_metrics(items, [{"id": "e1", "entities": [{"start": 0, "end": 1, "id": "d1"}]}])
    assert m["precision"] == m["recall"] == m["f1"] == 0.0


def test_answers_match_across_unicode_forms():
    """A tokenizer that normalises text decodes composed accents and ASCII letters: NFD or fullwidth gold
    answers still match."""
    assert exact_match("C\u00e9innein", ["Ce\u0301innein"]) == 1.0
    assert exact_match("Folbeim", ["\uff26olbeim"]) == 1.0
    assert f1_score("Céinnein Folbeim", ["Ce\u0301innein"]) == pytest.approx(2 / 3)
