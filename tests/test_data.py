"""Tests of onegen.data readers: good files parse, bad input raises OneGenError naming file:line and field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import CONTRACT_DOC, CONTRACT_SAMPLE, write_jsonl

from onegen.data import (
    Corpus,
    Document,
    read_corpus,
    read_el_items,
    read_eval_items,
    read_qa_items,
    read_samples,
)
from onegen.errors import OneGenError

RQ, OPEN, CLOSE = "[RQ]", "<paragraph>", "</paragraph>"
DOCS = [CONTRACT_DOC, {"id": "d3", "text": "Kerrin Brandt was a baker."}, {"id": "d9", "text": "Velmora Falls."}]


@pytest.fixture
def corpus() -> Corpus:
    return Corpus([Document(d["id"], d["text"], d.get("title")) for d in DOCS])


def _sample(**changes) -> dict:
    return {**json.loads(json.dumps(CONTRACT_SAMPLE)), **changes}


def _read(path: Path, corpus: Corpus | None):
    return read_samples(path, RQ, corpus, close_token=CLOSE, open_token=OPEN)


def _error(fn, *args) -> OneGenError:
    with pytest.raises(OneGenError) as e:
        fn(*args)
    return e.value


# -- good input ----------------------------------------------------------------------------------

def test_contract_examples_parse(tmp_path, corpus):
    c = read_corpus(write_jsonl(tmp_path / "corpus.jsonl", DOCS))
    assert c.ids == ["d17", "d3", "d9"] and c["d17"].title == "Velmora" and c["d3"].title is None
    s = _read(write_jsonl(tmp_path / "train.jsonl", [CONTRACT_SAMPLE]), c)
    assert len(s) == 1 and s[0].retrievals[0].positives == ("d17",)
    assert s[0].retrievals[0].negatives == ("d3", "d9")
    assert s[0].source == f"{tmp_path / 'train.jsonl'}:1"


def test_negatives_optional_and_plain_samples(tmp_path, corpus):
    plain = {"id": "p", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    s = _read(write_jsonl(tmp_path / "t.jsonl", [_sample(retrievals=[{"positives": ["d17"]}]), plain]), corpus)
    assert s[0].retrievals[0].negatives == () and s[1].retrievals == ()
    assert _read(write_jsonl(tmp_path / "p.jsonl", [plain]), None)[0].id == "p"  # no corpus needed


def test_bom_crlf_and_blank_lines_accepted(tmp_path, corpus):
    path = tmp_path / "t.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(CONTRACT_SAMPLE).encode() + b"\r\n\r\n"
                     + json.dumps(_sample(id="q2")).encode() + b"\r\n")
    s = _read(path, corpus)
    assert [x.id for x in s] == ["q1", "q2"]
    assert s[1].source.endswith(":3")  # blank lines still count
    cpath = tmp_path / "c.jsonl"
    cpath.write_bytes(b"\xef\xbb\xbf" + b"\r\n".join(json.dumps(d).encode() for d in DOCS) + b"\r\n")
    assert read_corpus(cpath).ids == ["d17", "d3", "d9"]


def test_integer_ids_become_strings(tmp_path):
    c = read_corpus(write_jsonl(tmp_path / "c.jsonl", [{"id": 7, "text": "x"}]))
    assert c.ids == ["7"]


# -- bad input: every error names file:line and the field ----------------------------------------

def _assert_where(err: OneGenError, path: Path, line: int | None, field: str | None = None) -> None:
    assert err.file == str(path)
    assert err.line == line
    text = str(err)
    assert "\n" not in text
    if line is not None:
        assert f"{path}:{line}" in text
    if field is not None:
        assert err.field == field and field in text


def test_malformed_json_line(tmp_path, corpus):
    path = write_jsonl(tmp_path / "t.jsonl", [CONTRACT_SAMPLE, '{"id": "q2", "messages": [', _sample(id="q3")])
    err = _error(_read, path, corpus)
    _assert_where(err, path, 2)
    assert "malformed JSON" in str(err)


def test_line_not_an_object(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [CONTRACT_DOC, "[1, 2]"])
    _assert_where(_error(read_corpus, path), path, 2)


def test_bad_utf8(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_bytes(json.dumps(CONTRACT_DOC).encode() + b"\n" + b'{"id": "x", "text": "\xff"}\n')
    _assert_where(_error(read_corpus, path), path, 2)


@pytest.mark.parametrize("name", ["corpus", "train"])
def test_empty_file(tmp_path, corpus, name):
    path = tmp_path / f"{name}.jsonl"
    path.write_text("\n  \n")
    err = _error(read_corpus, path) if name == "corpus" else _error(_read, path, corpus)
    _assert_where(err, path, None)
    assert "empty" in str(err)


def test_missing_file(tmp_path):
    path = tmp_path / "nope.jsonl"
    err = _error(read_corpus, path)
    assert err.file == str(path) and "not found" in str(err)


@pytest.mark.parametrize("row, field", [
    ({"text": "x"}, "id"),
    ({"id": "d1"}, "text"),
    ({"id": "d1", "text": 5}, "text"),
    ({"id": ["d1"], "text": "x"}, "id"),
    ({"id": "", "text": "x"}, "id"),
    ({"id": "d1", "text": "x", "title": 3}, "title"),
])
def test_corpus_field_errors(tmp_path, row, field):
    path = write_jsonl(tmp_path / "c.jsonl", [CONTRACT_DOC, row])
    _assert_where(_error(read_corpus, path), path, 2, field)


def test_duplicate_document_id(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [*DOCS, {"id": "d3", "text": "again"}])
    err = _error(read_corpus, path)
    _assert_where(err, path, 4, "id")
    assert "duplicate" in str(err) and "line 2" in str(err)


def test_duplicate_sample_id(tmp_path, corpus):
    path = write_jsonl(tmp_path / "t.jsonl", [CONTRACT_SAMPLE, CONTRACT_SAMPLE])
    _assert_where(_error(_read, path, corpus), path, 2, "id")


@pytest.mark.parametrize("changes, field", [
    ({"messages": None}, "messages"),
    ({"messages": "hello"}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": ["hi"]}, "messages[0]"),
    ({"messages": [{"role": "bot", "content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "user"}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
    ({"retrievals": {"positives": ["d17"]}}, "retrievals"),
    ({"retrievals": ["d17"]}, "retrievals[0]"),
    ({"retrievals": [{"negatives": ["d3"]}]}, "retrievals[0].positives"),
    ({"retrievals": [{"positives": []}]}, "retrievals[0].positives"),
    ({"retrievals": [{"positives": "d17"}]}, "retrievals[0].positives"),
    ({"retrievals": [{"positives": ["d17"], "negatives": [1.5]}]}, "retrievals[0].negatives"),
])
def test_sample_field_errors(tmp_path, corpus, changes, field):
    path = write_jsonl(tmp_path / "t.jsonl", [CONTRACT_SAMPLE, _sample(id="q2", **changes)])
    _assert_where(_error(_read, path, corpus), path, 2, field)


@pytest.mark.parametrize("content, retrievals", [
    (f"{RQ}{OPEN}a{CLOSE} then {RQ}{OPEN}b{CLOSE} done", [{"positives": ["d17"]}]),  # 2 tokens, 1 entry
    ("no query token here", [{"positives": ["d17"]}]),  # 0 tokens, 1 entry
    (f"{RQ}{OPEN}a{CLOSE}x", []),  # 1 token, 0 entries
])
def test_query_token_retrieval_count_mismatch(tmp_path, corpus, content, retrievals):
    row = _sample(id="q2", retrievals=retrievals,
                  messages=[{"role": "user", "content": "q"}, {"role": "assistant", "content": content}])
    path = write_jsonl(tmp_path / "t.jsonl", [CONTRACT_SAMPLE, row])
    err = _error(_read, path, corpus)
    _assert_where(err, path, 2, "retrievals")
    assert "query token" in str(err)


def test_query_tokens_in_user_turns_do_not_count(tmp_path, corpus):
    row = _sample(messages=[{"role": "user", "content": f"what is {RQ}?"}, CONTRACT_SAMPLE["messages"][1]])
    assert len(_read(write_jsonl(tmp_path / "t.jsonl", [row]), corpus)[0].retrievals) == 1


@pytest.mark.parametrize("retrievals, field", [
    ([{"positives": ["d404"]}], "retrievals[0].positives"),
    ([{"positives": ["d17"], "negatives": ["d3", "nope"]}], "retrievals[0].negatives"),
])
def test_unknown_document_id(tmp_path, corpus, retrievals, field):
    path = write_jsonl(tmp_path / "t.jsonl", [_sample(retrievals=retrievals)])
    err = _error(_read, path, corpus)
    _assert_where(err, path, 1, field)
    assert "not in the corpus" in str(err)


def test_retrievals_without_corpus(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [CONTRACT_SAMPLE])
    _assert_where(_error(_read, path, None), path, 1, "retrievals")


def test_retrievals_without_corpus_when_not_required(tmp_path):
    """For display (`onegen data show`): no corpus, so document ids are not checked."""
    path = write_jsonl(tmp_path / "t.jsonl", [_sample(retrievals=[{"positives": ["d404"]}])])
    assert read_samples(path, RQ, None, require_corpus=False)[0].retrievals[0].positives == ("d404",)
    with pytest.raises(OneGenError):  # the count of query tokens is still checked
        read_samples(write_jsonl(tmp_path / "u.jsonl", [_sample(retrievals=[])]), RQ, None, require_corpus=False)


def test_unbalanced_paragraph(tmp_path, corpus):
    row = _sample(messages=[{"role": "user", "content": "q"},
                            {"role": "assistant", "content": f"{RQ}{OPEN}never closed"}])
    path = write_jsonl(tmp_path / "t.jsonl", [row])
    _assert_where(_error(_read, path, corpus), path, 1, "messages[1].content")


# -- evaluation items ----------------------------------------------------------------------------

EL_TEXT = "Yesterday Orla Venn spoke in Caldris."  # "Orla Venn" = [10, 19), "Caldris" = [29, 36)


def test_el_items_parse_sorted(tmp_path):
    c = Corpus([Document("d42", "Orla Venn"), Document("d7", "Caldris")])
    path = write_jsonl(tmp_path / "el.jsonl", [{"id": "e3", "text": EL_TEXT, "entities": [
        {"start": 29, "end": 36, "id": "d7"}, {"start": 10, "end": 19, "id": "d42"}]}])
    item = read_el_items(path, c)[0]
    assert [(e.start, e.end, e.id) for e in item.entities] == [(10, 19, "d42"), (29, 36, "d7")]


@pytest.mark.parametrize("entities, field", [
    ([{"start": 10, "end": 99, "id": "d42"}], "entities[0]"),
    ([{"start": -1, "end": 3, "id": "d42"}], "entities[0]"),
    ([{"start": 5, "end": 5, "id": "d42"}], "entities[0]"),
    ([{"start": "10", "end": 19, "id": "d42"}], "entities[0].start"),
    ([{"start": 10, "end": 19.0, "id": "d42"}], "entities[0].end"),
    ([{"start": 10, "end": 19}], "entities[0].id"),
    ([{"start": 10, "end": 19, "id": "d404"}], "entities[0].id"),
    ([{"start": 10, "end": 19, "id": "d42"}, {"start": 15, "end": 22, "id": "d7"}], "entities"),
    ([7], "entities[0]"),
    ({"start": 10}, "entities"),
])
def test_el_item_errors(tmp_path, entities, field):
    c = Corpus([Document("d42", "Orla Venn"), Document("d7", "Caldris")])
    ok = {"id": "e1", "text": EL_TEXT, "entities": []}
    path = write_jsonl(tmp_path / "el.jsonl", [ok, {"id": "e2", "text": EL_TEXT, "entities": entities}])
    _assert_where(_error(read_el_items, path, c), path, 2, field)


def test_qa_items(tmp_path, corpus):
    rows = [{"id": "q9", "question": "Who founded Velmora?", "answers": ["Ilsa Brandt"], "gold_docs": [["d17"]]},
            {"id": "q10", "messages": [{"role": "user", "content": "Hi?"}], "answers": []}]
    items = read_qa_items(write_jsonl(tmp_path / "qa.jsonl", rows), corpus)
    assert items[0].question == "Who founded Velmora?" and items[0].gold_docs == (("d17",),)
    assert items[1].question == "Hi?"


@pytest.mark.parametrize("row, field", [
    ({"id": "q", "answers": ["x"]}, "question"),
    ({"id": "q", "question": "?", "answers": "x"}, "answers"),
    ({"id": "q", "question": "?", "gold_docs": [["d404"]]}, "gold_docs[0]"),
    ({"id": "q", "question": "?", "gold_docs": ["d17"]}, "gold_docs[0]"),
])
def test_qa_item_errors(tmp_path, corpus, row, field):
    path = write_jsonl(tmp_path / "qa.jsonl", [row])
    _assert_where(_error(read_qa_items, path, corpus), path, 1, field)


def test_nested_gold_spans_are_evaluation_input_but_not_training_data():
    path = Path(__file__).parent / "data" / "bad" / "el_overlap.jsonl"
    assert [len(i.entities) for i in read_eval_items(path, "el")] == [2, 2]
    with pytest.raises(OneGenError, match="el_overlap.jsonl:2 field 'entities'.*overlap"):
        read_el_items(path)


def test_documents_without_text_are_read_with_a_warning(tmp_path, caplog):
    path = write_jsonl(tmp_path / "corpus.jsonl", [{"id": "a", "text": "Velmora"}, {"id": "b", "text": " "}])
    with caplog.at_level("WARNING"):
        assert [d.id for d in read_corpus(path).docs] == ["a", "b"]
    assert "1 documents have no text" in caplog.text and "corpus.jsonl:2" in caplog.text
