"""Fuzzing the boundary: readers and the renderer on arbitrary input.

Readers (`onegen.io.iter_jsonl`, `onegen.data.read_*`) given any bytes, or any JSON values in the
shapes of our records, either parse or raise `OneGenError` with file:line: never another exception.
Samples the reader accepts, with any text (special-token strings included), any number of
retrievals and any length limit, render with the invariants intact under every truncation policy.
(tests/test_render.py fuzzes the renderer on samples built in memory; this goes through the files.)
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from onegen.data import Corpus, Document, read_corpus, read_el_items, read_qa_items, read_samples
from onegen.errors import OneGenError
from onegen.io import iter_jsonl
from onegen.render import Renderer
from onegen.tokens import GEN, IGNORE_INDEX, RET

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                       HealthCheck.too_slow])
CORPUS = Corpus([Document(f"d{i}", f"Document number {i}.") for i in range(4)], source="corpus.jsonl")


def _write(data: bytes) -> Path:
    f = tempfile.NamedTemporaryFile("wb", suffix=".jsonl", delete=False)
    with f:
        f.write(data)
    return Path(f.name)


def _parse_or_user_error(fn, data: bytes):
    """Run a reader on `data` as a file: its result, or None when it raised OneGenError (naming the file)."""
    path = _write(data)
    try:
        return fn(path)
    except OneGenError as e:
        assert e.file == str(path) and "\n" not in str(e)
        assert e.line is None or 1 <= e.line <= data.count(b"\n") + 1
        return None
    finally:
        path.unlink()


# -- values -------------------------------------------------------------------------------------

_LEAF = (st.none() | st.booleans() | st.integers(-3, 60) | st.floats(allow_nan=True, allow_infinity=True)
         | st.text(max_size=8) | st.sampled_from(["d0", "d1", "d404", "user", "assistant", "[RQ]", "", "x\ud800"]))
_JSON = st.recursive(_LEAF, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                                           max_size=3), max_leaves=8)


def _maybe(value):
    return st.one_of(value, _JSON)


_MESSAGE = st.fixed_dictionaries({}, optional={"role": _maybe(st.sampled_from(["system", "user", "assistant"])),
                                               "content": _maybe(st.text(max_size=20))})
_RETRIEVAL = st.fixed_dictionaries({}, optional={"positives": _maybe(st.lists(st.sampled_from(["d0", "d1", "d9"]),
                                                                               max_size=2)),
                                                 "negatives": _maybe(st.lists(st.sampled_from(["d2", "d404"])))})
_ENTITY = st.fixed_dictionaries({}, optional={"start": _maybe(st.integers(-2, 30)), "end": _maybe(st.integers(-2, 30)),
                                              "id": _maybe(st.sampled_from(["d0", "d3", "d404"]))})
_RECORD = st.fixed_dictionaries({}, optional={
    "id": _maybe(st.sampled_from(["a", "b", "c"])), "text": _maybe(st.text(max_size=30)),
    "title": _JSON, "messages": _maybe(st.lists(_MESSAGE, max_size=3)),
    "retrievals": _maybe(st.lists(_RETRIEVAL, max_size=2)), "entities": _maybe(st.lists(_ENTITY, max_size=3)),
    "question": _maybe(st.text(max_size=10)), "answers": _maybe(st.lists(st.text(max_size=5), max_size=2)),
    "gold_docs": _maybe(st.lists(st.lists(st.sampled_from(["d0", "d404"]), max_size=2), max_size=2))})


def _lines(records: list) -> bytes:
    # a raw string may hold lone surrogates: their bytes are not valid UTF-8, which readers must report
    return "".join(r if isinstance(r, str) else json.dumps(r) + "\n" for r in records).encode("utf-8", "surrogatepass")


_READERS = {
    "iter_jsonl": lambda p: list(iter_jsonl(p)),
    "corpus": read_corpus,
    "samples": lambda p: read_samples(p, "[RQ]", CORPUS, close_token="</paragraph>", open_token="<paragraph>"),
    "samples-no-corpus": lambda p: read_samples(p, "[RQ]", None, require_corpus=False),
    "el": lambda p: read_el_items(p, CORPUS),
    "qa": lambda p: read_qa_items(p, CORPUS),
}


@pytest.mark.parametrize("reader", sorted(_READERS))
@FUZZ
@given(data=st.binary(max_size=200))
def test_readers_on_arbitrary_bytes(reader, data):
    _parse_or_user_error(_READERS[reader], data)


@pytest.mark.parametrize("reader", sorted(_READERS))
@FUZZ
@given(records=st.lists(st.one_of(_RECORD, _JSON, st.sampled_from(["\n", "{\n", "\ufeff{}\n", "\r\n"])),
                        min_size=0, max_size=4))
def test_readers_on_json_values(reader, records):
    _parse_or_user_error(_READERS[reader], _lines(records))


@pytest.mark.parametrize("text", ["[" * 100_000, '{"a":' * 50_000, "1" * 100_000, '{"a": ' + "1" * 5000 + "}",
                                  '{"id": "a", "text": "x\\ud800"}', '{"id": "a", "text": "\\uDFFF"}'],
                         ids=["deep-array", "deep-object", "huge-int", "huge-int-value", "lone-surrogate",
                              "lone-low-surrogate"])
def test_pathological_lines(text):
    """Each would raise RecursionError / ValueError in json, or pass a string no tokenizer accepts."""
    data = b'{"id": "ok", "text": "fine"}\n' + text.encode() + b"\n"
    with pytest.raises(OneGenError, match=r":2: "):
        read_corpus(_write(data))


def test_surrogate_pair_escape_is_a_character(tmp_path):
    (tmp_path / "c.jsonl").write_text('{"id": "a", "text": "smile \\ud83d\\ude00"}\n')
    assert read_corpus(tmp_path / "c.jsonl")["a"].text == "smile \U0001f600"


# -- the renderer on samples read from files ----------------------------------------------------

_SPECIAL = ["[RQ]", "[RD]", "<paragraph>", "</paragraph>", "</s>", "<s>", "<pad>", "<unk>", "\n", "User:"]
_TEXT = st.lists(st.one_of(st.text(alphabet="abc xyz.?é漢😀", max_size=6), st.sampled_from(_SPECIAL)),
                 max_size=6).map("".join)


@st.composite
def _sample_rows(draw) -> dict:
    """A sample row whose text may hold any special-token string; retrievals usually match the query count."""
    messages = [{"role": "user", "content": draw(_TEXT)}]
    for _ in range(draw(st.integers(1, 2))):
        parts = []
        for kind in draw(st.lists(st.sampled_from(["text", "insert", "link"]), max_size=4)):
            if kind == "text":
                parts.append(draw(_TEXT))
            else:
                parts.append("[RQ]" + (f"<paragraph>{draw(_TEXT)}</paragraph>" if kind == "insert" else ""))
        messages.append({"role": "assistant", "content": "".join(parts)})
        if draw(st.booleans()):
            messages.append({"role": "user", "content": draw(_TEXT)})
    n = sum(m["content"].count("[RQ]") for m in messages if m["role"] == "assistant")
    n += draw(st.sampled_from([0, 0, 0, 1, -1]))  # now and then a count that does not match
    retrievals = [{"positives": [f"d{k % 4}"], "negatives": [f"d{(k + 1) % 4}"]} for k in range(max(n, 0))]
    return {"id": "s", "messages": messages, "retrievals": retrievals}


@pytest.fixture(scope="module")
def renderers(tiny_tokenizer, tokens) -> dict[str, Renderer]:
    return {p: Renderer(tiny_tokenizer, tokens, max_length=512, on_truncation=p) for p in ("shorten", "drop", "error")}


@settings(FUZZ, max_examples=150)  # about 40% of the rows pass the reader and reach the renderer
@given(row=_sample_rows(), policy=st.sampled_from(["shorten", "drop", "error"]), max_length=st.integers(4, 160))
def test_render_samples_read_from_files(renderers, row, policy, max_length):
    samples = _parse_or_user_error(
        lambda p: read_samples(p, "[RQ]", CORPUS, close_token="</paragraph>", open_token="<paragraph>"), _lines([row]))
    if samples is None:
        return
    (sample,) = samples
    base = renderers[policy]
    renderer = Renderer(base.tokenizer, base.tokens, max_length=max_length, on_truncation=policy)
    try:
        full = base.render(sample)
    except OneGenError:  # e.g. a query token inside a paragraph: a user error, with file:line
        return
    assert len(full.ret_positions) == len(sample.retrievals)
    try:
        r = renderer.render(sample)
    except OneGenError as e:
        assert policy == "error" and sample.source in str(e)
        return
    if r is None:
        assert policy == "drop"
        return
    assert len(r) <= max_length and r.input_ids == full.input_ids[:len(r)]
    for tid, label, role in zip(r.input_ids, r.lm_labels, r.roles, strict=True):  # labels only on GEN and RET
        assert label == IGNORE_INDEX or (role in (GEN, RET) and label == tid)
    # every RET position has its retrieval entry; no query token is left without one
    assert r.ret_positions == [t for t, role in enumerate(r.roles) if role == RET]
    assert all(r.input_ids[p] == base.ids.query for p in r.ret_positions)
    assert r.retrievals == sample.retrievals[:len(r.ret_positions)]
    assert r.ret_positions == [p for p in full.ret_positions if p < len(r)]
    if policy != "shorten":
        assert r.retrievals == sample.retrievals  # drop and error never lose a retrieval
