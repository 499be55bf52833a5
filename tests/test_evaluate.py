"""Tests for onegen.evaluate: end-to-end scoring of JSONL files and file:line errors at the boundary."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from onegen.errors import OneGenError
from onegen.evaluate import evaluate_files, render_metrics_json

TEXT = "Yesterday Orla Venn spoke in Caldris."  # "Orla Venn" = [10, 19), "Caldris" = [29, 36)

QA_GOLD = [
    {"id": "q1", "question": "Who founded Velmora?", "answers": ["Ilsa Brandt"],
     "gold_docs": [["d1"], ["d2"]]},
    {"id": "q2", "messages": [{"role": "user", "content": "Capital?"}], "answers": ["Paris"],
     "gold_docs": [["d3"]]},
]
QA_PRED = [
    {"id": "q1", "output": "...", "answer": "Ilsa Brandt",
     "retrievals": [{"doc_ids": ["d9", "d1", "d5"], "scores": [0.9, 0.8, 0.1]},
                    {"doc_ids": ["d2", "d8", "d6"], "scores": [0.7, 0.1, 0.0]}]},
    {"id": "q2", "output": "...", "answer": "London",
     "retrievals": [{"doc_ids": ["d4", "d5", "d3"], "scores": [0.5, 0.4, 0.3]}]},
]


def _write(path: Path, rows: list) -> Path:
    lines = [(r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows]  # str rows: raw text
    path.write_text("".join(lines), encoding="utf-8")
    return path


def _qa_files(tmp_path: Path, gold: list = QA_GOLD, pred: list = QA_PRED) -> tuple[Path, Path]:
    return _write(tmp_path / "gold.jsonl", gold), _write(tmp_path / "pred.jsonl", pred)


def test_qa_default_k_is_longest_topk(tmp_path):
    gold, pred = _qa_files(tmp_path)
    m = evaluate_files("qa", gold, pred)
    # top-3 lists -> k = 3. Pairs (hit@1, hit@3): q1 hop1 (0, 1), q1 hop2 (1, 1), q2 hop1 (0, 1)
    assert m["em"] == 0.5 and m["f1"] == 0.5 and m["n"] == 2
    assert m["recall@1"] == pytest.approx(1 / 3)
    assert m["recall@k"] == m["recall@3"] == 1.0
    assert m["hop1_recall@1"] == 0.0 and m["hop1_recall@3"] == m["hop1_recall@k"] == 1.0
    assert m["hop2_recall@1"] == 1.0


def test_qa_explicit_k(tmp_path):
    gold, pred = _qa_files(tmp_path)
    m = evaluate_files("qa", gold, pred, k=2)
    # q2's gold d3 is third, so it misses at k = 2: hop1 hits@2 = q1 1, q2 0
    assert m["hop1_recall@2"] == 0.5 and "recall@3" not in m
    with pytest.raises(OneGenError, match="k must be at least 1"):
        evaluate_files("qa", gold, pred, k=0)


def test_qa_default_k_without_retrievals_is_one(tmp_path):
    gold = [{"id": "q1", "answers": ["a"], "gold_docs": [["d1"]]}]
    gold_path, pred_path = _qa_files(tmp_path, gold, [{"id": "q1", "answer": "a"}])
    m = evaluate_files("qa", gold_path, pred_path)
    assert m["recall@1"] == 0.0 and "recall@k" in m and m["em"] == 1.0


def test_el_end_to_end(tmp_path):
    gold = _write(tmp_path / "gold.jsonl", [
        {"id": "e1", "text": TEXT, "entities": [{"start": 10, "end": 19, "id": "d42"},
                                                {"start": 29, "end": 36, "id": "d7"}]}])
    pred = _write(tmp_path / "pred.jsonl", [
        {"id": "e1", "output": "...", "answer": "",
         "entities": [{"start": 10, "end": 18, "id": "d42"},  # partial overlap: not a match
                      {"start": 29, "end": 36, "id": "d7"}]}])
    m = evaluate_files("el", gold, pred)
    # correct 1 of 2 predicted, 1 of 2 gold
    assert m == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "n": 1}


def test_render_metrics_json_one_sorted_line():
    text = render_metrics_json({"n": 2, "em": 0.5, "recall@1": 1 / 3})
    assert "\n" not in text
    assert list(json.loads(text)) == ["em", "n", "recall@1"]


# ----------------------------------------------------------------------------- errors


def test_malformed_line_names_file_and_line(tmp_path):
    gold, pred = _qa_files(tmp_path, [QA_GOLD[0], '{"id": "q2", "answers": [', QA_GOLD[1]])
    with pytest.raises(OneGenError, match=r"gold\.jsonl:2") as e:
        evaluate_files("qa", gold, pred)
    assert e.value.line == 2


def test_duplicate_gold_id(tmp_path):
    gold, pred = _qa_files(tmp_path, [QA_GOLD[0], QA_GOLD[1], QA_GOLD[0]])
    with pytest.raises(OneGenError, match=r"gold\.jsonl:3 field 'id'.*duplicate id 'q1'.*line 1"):
        evaluate_files("qa", gold, pred)


def test_duplicate_pred_id(tmp_path):
    gold, pred = _qa_files(tmp_path, pred=[QA_PRED[0], QA_PRED[1], QA_PRED[1]])
    with pytest.raises(OneGenError, match=r"pred\.jsonl:3 field 'id'.*duplicate"):
        evaluate_files("qa", gold, pred)


def test_unknown_pred_id(tmp_path):
    stray = dict(QA_PRED[1], id="q99")
    gold, pred = _qa_files(tmp_path, pred=[QA_PRED[0], QA_PRED[1], stray])
    with pytest.raises(OneGenError, match=r"pred\.jsonl:3 field 'id'.*'q99' is not in the gold file"):
        evaluate_files("qa", gold, pred)


def test_missing_predictions_lists_count_and_ids(tmp_path):
    gold_rows = [{"id": f"q{i}", "answers": ["a"]} for i in range(8)]
    gold, pred = _qa_files(tmp_path, gold_rows, [{"id": "q0", "answer": "a"}])
    with pytest.raises(OneGenError) as e:
        evaluate_files("qa", gold, pred)
    msg = str(e.value)
    assert "7 of 8 gold items have no prediction" in msg
    assert "q1, q2, q3, q4, q5, ..." in msg and "q6" not in msg
    assert "onegen generate" in msg and str(gold) in msg


@pytest.mark.parametrize(("row", "field"), [
    ({"id": "q1", "question": "?"}, "answers"),
    ({"id": "q1", "answers": "Paris"}, "answers"),
    ({"id": "q1", "answers": []}, "answers"),
    ({"id": "q1", "answers": ["a"], "gold_docs": ["d1"]}, "gold_docs"),  # must be one list per hop
    ({"id": "q1", "answers": ["a"], "gold_docs": [["d1"], [None]]}, "gold_docs[1]"),
    ({"id": 7.5, "answers": ["a"]}, "id"),
    ({"id": True, "answers": ["a"]}, "id"),
])
def test_bad_qa_gold_field(tmp_path, row, field):
    gold, pred = _qa_files(tmp_path, [row], [{"id": "q1", "answer": "a"}])
    with pytest.raises(OneGenError, match=r"gold\.jsonl:1") as e:
        evaluate_files("qa", gold, pred)
    assert e.value.field == field


@pytest.mark.parametrize(("row", "field"), [
    ({"id": "q1"}, "answer"),
    ({"id": "q1", "answer": "a", "retrievals": {"doc_ids": []}}, "retrievals"),
    ({"id": "q1", "answer": "a", "retrievals": [{"scores": [1.0]}]}, "retrievals[0]"),
    ({"id": "q1", "answer": "a", "retrievals": [{"doc_ids": [3.0]}]}, "retrievals[0].doc_ids"),
])
def test_bad_qa_pred_field(tmp_path, row, field):
    gold, pred = _qa_files(tmp_path, [{"id": "q1", "answers": ["a"]}], [row])
    with pytest.raises(OneGenError, match=r"pred\.jsonl:1") as e:
        evaluate_files("qa", gold, pred)
    assert e.value.field == field


@pytest.mark.parametrize(("entity", "field"), [
    ({"start": 30, "end": 40, "id": "d7"}, "entities[0]"),  # past the end of the text
    ({"start": 19, "end": 10, "id": "d7"}, "entities[0]"),  # start after end
    ({"start": 5, "end": 5, "id": "d7"}, "entities[0]"),  # empty span
    ({"start": "10", "end": 19, "id": "d7"}, "entities[0].start"),
    ({"start": True, "end": 19, "id": "d7"}, "entities[0].start"),
    ({"start": 10, "end": 19}, "entities[0].id"),
])
def test_bad_el_gold_entity(tmp_path, entity, field):
    gold = _write(tmp_path / "gold.jsonl", [{"id": "e1", "text": TEXT, "entities": [entity]}])
    pred = _write(tmp_path / "pred.jsonl", [{"id": "e1", "entities": []}])
    with pytest.raises(OneGenError, match=r"gold\.jsonl:1") as e:
        evaluate_files("el", gold, pred)
    assert e.value.field == field


def test_what_generate_reads_eval_scores(tmp_path):
    """Integer ids, answers and doc ids (read as strings by `onegen generate`) and empty hops."""
    gold, pred = _qa_files(tmp_path, [{"id": 7, "question": "Q?", "answers": [1901], "gold_docs": [[], [3]]}],
                           [{"id": "7", "answer": "1901", "retrievals": [{"doc_ids": ["3"]}, {"doc_ids": ["3"]}]}])
    m = evaluate_files("qa", gold, pred)
    assert m["em"] == 1.0 and m["recall@1"] == 1.0 and "hop1_recall@1" not in m and m["hop2_recall@1"] == 1.0
    gold = _write(tmp_path / "gold.jsonl", [{"id": 1, "text": TEXT, "entities": [{"start": 10, "end": 19, "id": 42}]}])
    pred = _write(tmp_path / "pred.jsonl", [{"id": "1", "entities": [{"start": 10, "end": 19, "id": "42"}]}])
    assert evaluate_files("el", gold, pred)["f1"] == 1.0


def test_nested_and_overlapping_entities_are_scored_one_by_one(tmp_path):
    text = "New York City is big."
    gold = _write(tmp_path / "gold.jsonl", [{"id": "e", "text": text, "entities": [
        {"start": 0, "end": 13, "id": "nyc"}, {"start": 0, "end": 8, "id": "ny"}]}])
    pred = _write(tmp_path / "pred.jsonl", [{"id": "e", "entities": [
        {"start": 0, "end": 8, "id": "ny"}, {"start": 4, "end": 13, "id": "yc"}]}])
    m = evaluate_files("el", gold, pred)
    assert m["precision"] == 0.5 and m["recall"] == 0.5


def test_el_needs_text_and_pred_entities(tmp_path):
    gold = _write(tmp_path / "gold.jsonl", [{"id": "e1", "entities": []}])
    pred = _write(tmp_path / "pred.jsonl", [{"id": "e1", "entities": []}])
    with pytest.raises(OneGenError, match="field 'text'"):
        evaluate_files("el", gold, pred)
    gold = _write(tmp_path / "gold.jsonl", [{"id": "e1", "text": TEXT, "entities": []}])
    pred = _write(tmp_path / "pred.jsonl", [{"id": "e1", "answer": "x"}])
    with pytest.raises(OneGenError, match=r"pred\.jsonl:1 field 'entities'.*--task el"):
        evaluate_files("el", gold, pred)


def test_unknown_task_and_missing_file(tmp_path):
    gold, pred = _qa_files(tmp_path)
    with pytest.raises(OneGenError, match="unknown task"):
        evaluate_files("summarise", gold, pred)
    with pytest.raises(OneGenError, match="file not found"):
        evaluate_files("qa", gold, tmp_path / "nope.jsonl")
