"""Records and their readers: corpus documents, training samples, QA and entity-linking items.

Files are parsed and validated here, at the boundary; every error names file:line and the field.
Inside the library, records are trusted. Readers never modify their input files.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import OneGenError
from .io import read_jsonl

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Document:
    id: str
    text: str
    title: str | None = None


@dataclass(frozen=True)
class Message:
    role: str
    content: str


@dataclass(frozen=True)
class Retrieval:
    """The documents one query token should find: positives, and optional hard negatives."""

    positives: tuple[str, ...]
    negatives: tuple[str, ...] = ()


@dataclass(frozen=True)
class Sample:
    """A training conversation; the k-th query token in assistant turns belongs to `retrievals[k]`."""

    id: str
    messages: tuple[Message, ...]
    retrievals: tuple[Retrieval, ...] = ()
    source: str = ""  # file:line, for error messages downstream


@dataclass(frozen=True)
class Entity:
    start: int
    end: int
    id: str


@dataclass(frozen=True)
class ELItem:
    """Entity-linking item: text with character spans (end exclusive) linked to corpus ids."""

    id: str
    text: str
    entities: tuple[Entity, ...] = ()
    source: str = ""


@dataclass(frozen=True)
class QAItem:
    """Evaluation item for single- and multi-hop QA; `gold_docs[h]` lists the acceptable docs of hop h."""

    id: str
    messages: tuple[Message, ...]
    answers: tuple[str, ...] = ()
    gold_docs: tuple[tuple[str, ...], ...] = ()
    source: str = ""

    @property
    def question(self) -> str:
        return next((m.content for m in reversed(self.messages) if m.role == "user"), "")


@dataclass
class Corpus:
    """Documents in file order, with lookup by id."""

    docs: list[Document] = field(default_factory=list)
    source: str = ""

    def __post_init__(self) -> None:
        self.by_id = {d.id: i for i, d in enumerate(self.docs)}

    def __len__(self) -> int:
        return len(self.docs)

    def __contains__(self, doc_id: str) -> bool:
        return doc_id in self.by_id

    def __getitem__(self, doc_id: str) -> Document:
        return self.docs[self.by_id[doc_id]]

    @property
    def ids(self) -> list[str]:
        return [d.id for d in self.docs]


# -- field helpers -------------------------------------------------------------------------------

class _Row:
    """A JSON object with its origin, so field errors can name file:line and the field."""

    def __init__(self, obj: dict[str, Any], file: str, line: int):
        self.obj, self.file, self.line = obj, file, line

    def error(self, message: str, field: str | None = None) -> OneGenError:
        return OneGenError(message, file=self.file, line=self.line, field=field)

    def get(self, key: str, kind: type | tuple[type, ...], required: bool = True, default: Any = None) -> Any:
        if key not in self.obj or self.obj[key] is None:
            if required:
                raise self.error("missing required field", key)
            return default
        value = self.obj[key]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            want = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            raise self.error(f"expected {want}, got {type(value).__name__}", key)
        return value

    def id(self) -> str:
        value = self.get("id", (str, int))
        value = str(value)
        if not value:
            raise self.error("must be a non-empty string", "id")
        return value

    def str_list(self, value: Any, key: str) -> tuple[str, ...]:
        if not isinstance(value, list) or not all(isinstance(v, (str, int)) and not isinstance(v, bool)
                                                  for v in value):
            raise self.error("expected a list of strings", key)
        return tuple(str(v) for v in value)

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


def _rows(path: str | Path) -> Iterable[_Row]:
    for line, obj in read_jsonl(path):
        yield _Row(obj, str(path), line)


def _check_unique(row: _Row, seen: dict[str, int], value: str) -> None:
    if value in seen:
        raise row.error(f"duplicate id '{value}' (first seen on line {seen[value]})", "id")
    seen[value] = row.line


def _messages(row: _Row) -> tuple[Message, ...]:
    raw = row.get("messages", list)
    if not raw:
        raise row.error("must hold at least one message", "messages")
    out = []
    for i, m in enumerate(raw):
        key = f"messages[{i}]"
        if not isinstance(m, dict):
            raise row.error("expected an object with 'role' and 'content'", key)
        role, content = m.get("role"), m.get("content")
        for name in ("role", "content"):
            if name not in m:
                raise row.error(f"missing required field '{name}'", f"{key}.{name}")
        if role not in ROLES:
            raise row.error(f"role must be one of {', '.join(ROLES)}, got {role!r}", f"{key}.role")
        if not isinstance(content, str):
            raise row.error("expected a string", f"{key}.content")
        out.append(Message(role, content))
    return tuple(out)


def as_corpus(docs: Any) -> Corpus:
    """`docs` as a Corpus: a Corpus as it is, or a list of `Document`s or `{"id", "text", "title"?}` dicts
    (ids unique strings, texts strings); anything else is refused with what is expected."""
    if isinstance(docs, Corpus):
        return docs
    expected = "a Corpus (onegen.data.read_corpus) or a list of Documents or {id, text, title} dicts"
    if isinstance(docs, (str, bytes, dict)) or not hasattr(docs, "__iter__"):
        raise OneGenError(f"expected {expected}, got {type(docs).__name__}")
    out, seen = [], set()
    for i, d in enumerate(docs):
        if isinstance(d, dict) and isinstance(d.get("id"), int) and not isinstance(d.get("id"), bool):
            d = {**d, "id": str(d["id"])}  # an integer id, as read_corpus reads it
        if isinstance(d, dict) and isinstance(d.get("id"), str) and isinstance(d.get("text"), str) \
                and isinstance(d.get("title", ""), (str, type(None))):
            d = Document(d["id"], d["text"], d.get("title"))
        if not isinstance(d, Document):
            raise OneGenError(f"expected {expected}; item {i} is {type(d).__name__} {str(d)[:40]!r}",
                              field=f"[{i}]")
        if d.id in seen:
            raise OneGenError(f"duplicate document id {d.id!r}; ids must be unique", field=f"[{i}].id")
        seen.add(d.id)
        out.append(d)
    return Corpus(out)


# -- readers -------------------------------------------------------------------------------------

def read_corpus(path: str | Path) -> Corpus:
    """Read a corpus JSONL (`id`, `text`, optional `title`); ids must be unique; documents without text
    are warned about."""
    docs, seen, blank = [], {}, []
    for row in _rows(path):
        doc_id = row.id()
        _check_unique(row, seen, doc_id)
        text = row.get("text", str)
        title = row.get("title", str, required=False)
        docs.append(Document(doc_id, text, title))
        if not text.strip():
            blank.append(row.where)
    if blank:
        log.warning("%d documents have no text (%s%s): each is indexed as its [RD] token alone, so all of them "
                    "get the same vector", len(blank), ", ".join(blank[:3]), ", ..." if len(blank) > 3 else "")
    return Corpus(docs, source=str(path))


def read_samples(path: str | Path, query_token: str, corpus: Corpus | None = None,
                 close_token: str | None = None, open_token: str | None = None,
                 require_corpus: bool = True) -> list[Sample]:
    """Read native training samples and check query tokens against retrieval entries and the corpus.

    With `require_corpus=False` and no corpus (e.g. to display samples), document ids are not checked."""
    samples, seen = [], {}
    for row in _rows(path):
        sample_id = row.id()
        _check_unique(row, seen, sample_id)
        messages = _messages(row)
        retrievals = _retrievals(row)
        n_queries = sum(m.content.count(query_token) for m in messages if m.role == "assistant")
        if n_queries != len(retrievals):
            raise row.error(f"{n_queries} query token(s) '{query_token}' in assistant turns but "
                            f"{len(retrievals)} retrieval entr{'y' if len(retrievals) == 1 else 'ies'}; "
                            "the k-th query token needs retrievals[k]", "retrievals")
        if open_token and close_token:
            for i, m in enumerate(messages):
                if not _paragraphs_balanced(m.content, open_token, close_token):
                    raise row.error(f"unbalanced {open_token} / {close_token} (each paragraph opens, then "
                                    "closes, never nested)", f"messages[{i}].content")
        if retrievals and corpus is None and require_corpus:
            raise row.error("sample has retrievals but no corpus was given (set data.corpus)", "retrievals")
        for k, r in enumerate(retrievals if corpus is not None else ()):
            for kind in ("positives", "negatives"):
                for doc_id in getattr(r, kind):
                    if doc_id not in corpus:  # type: ignore[operator]
                        raise row.error(f"document id '{doc_id}' is not in the corpus {corpus.source}",
                                        f"retrievals[{k}].{kind}")
        samples.append(Sample(sample_id, messages, retrievals, row.where))
    return samples


def _paragraphs_balanced(text: str, open_token: str, close_token: str) -> bool:
    """Whether the paragraph markers of `text` alternate open, close, open, ... and end closed."""
    marks = sorted([(i, True) for i in _find_all(text, open_token)] + [(i, False) for i in _find_all(text, close_token)])
    return len(marks) % 2 == 0 and all(is_open == (k % 2 == 0) for k, (_, is_open) in enumerate(marks))


def _find_all(text: str, token: str) -> list[int]:
    out, i = [], text.find(token)
    while i >= 0:
        out.append(i)
        i = text.find(token, i + len(token))
    return out


def _retrievals(row: _Row) -> tuple[Retrieval, ...]:
    raw = row.get("retrievals", list, required=False, default=[])
    out = []
    for k, r in enumerate(raw):
        key = f"retrievals[{k}]"
        if not isinstance(r, dict):
            raise row.error("expected an object with 'positives'", key)
        if "positives" not in r:
            raise row.error("missing required field", f"{key}.positives")
        positives = row.str_list(r["positives"], f"{key}.positives")
        if not positives:
            raise row.error("needs at least one positive document id", f"{key}.positives")
        negatives = row.str_list(r.get("negatives") or [], f"{key}.negatives")
        out.append(Retrieval(positives, negatives))
    return tuple(out)


def read_el_items(path: str | Path, corpus: Corpus | None = None, allow_overlaps: bool = False) -> list[ELItem]:
    """Read entity-linking items; spans must lie inside the text and name corpus ids, and (unless
    `allow_overlaps`: evaluation input, whose gold spans generation does not read) not overlap: a
    training conversation cannot mark nested mentions."""
    items, seen = [], {}
    for row in _rows(path):
        item_id = row.id()
        _check_unique(row, seen, item_id)
        text = row.get("text", str)
        raw = row.get("entities", list, required=False, default=[])
        entities = []
        for i, e in enumerate(raw):
            key = f"entities[{i}]"
            if not isinstance(e, dict):
                raise row.error("expected an object with start, end, id", key)
            for f in ("start", "end"):
                if not isinstance(e.get(f), int) or isinstance(e.get(f), bool):
                    raise row.error("expected an integer character offset", f"{key}.{f}")
            if not isinstance(e.get("id"), (str, int)):
                raise row.error("missing or not a string", f"{key}.id")
            start, end, eid = e["start"], e["end"], str(e["id"])
            if not 0 <= start < end <= len(text):
                raise row.error(f"span [{start}, {end}) is not inside the text (length {len(text)})", key)
            if corpus is not None and eid not in corpus:
                raise row.error(f"entity id '{eid}' is not in the corpus {corpus.source}", f"{key}.id")
            entities.append(Entity(start, end, eid))
        entities.sort(key=lambda x: x.start)
        for a, b in zip(entities, entities[1:], strict=False):
            if b.start < a.end and not allow_overlaps:
                raise row.error(f"entity spans overlap: [{a.start},{a.end}) and [{b.start},{b.end})", "entities")
        items.append(ELItem(item_id, text, tuple(entities), row.where))
    return items


def read_qa_items(path: str | Path, corpus: Corpus | None = None) -> list[QAItem]:
    """Read QA evaluation items (`question` or `messages`, `answers`, optional `gold_docs`)."""
    items, seen = [], {}
    for row in _rows(path):
        item_id = row.id()
        _check_unique(row, seen, item_id)
        if "messages" in row.obj:
            messages = _messages(row)
        else:
            messages = (Message("user", row.get("question", str)),)
        answers = row.str_list(row.get("answers", list, required=False, default=[]), "answers")
        gold = row.get("gold_docs", list, required=False, default=[])
        gold_docs = tuple(row.str_list(g, f"gold_docs[{h}]") for h, g in enumerate(gold))
        if corpus is not None:
            for h, hop in enumerate(gold_docs):
                for doc_id in hop:
                    if doc_id not in corpus:
                        raise row.error(f"document id '{doc_id}' is not in the corpus {corpus.source}",
                                        f"gold_docs[{h}]")
        items.append(QAItem(item_id, messages, answers, gold_docs, row.where))
    return items


def read_eval_items(path: str | Path, task: str, corpus: Corpus | None = None) -> list[QAItem] | list[ELItem]:
    """Read evaluation items for `task` (qa or el)."""
    if task == "el":
        return read_el_items(path, corpus, allow_overlaps=True)
    return read_qa_items(path, corpus)
