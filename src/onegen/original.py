"""The paper's own data files, read as they are: its `db.jsonl` and `train.jsonl`.

The paper's repository (github.com/zjunlp/OneGen) trains from three files; this module maps the two
data files onto onegen's records (README, "The paper's files", has the table):

- `db.jsonl` — `{"uid", "messages"}`; the assistant turns hold one representation token (the workflow's
  `info-data-db.repr_token`, our `tokens.doc`) per retrievable sentence. A row with one such token is one
  corpus document with id `uid`; a row with n > 1 gives n documents `uid-0` … `uid-(n-1)`, document k
  being the row's text up to its k-th token (what a causal LM's hidden state at that token sees).
  Representation-token strings are removed from the text: `[RD]` is appended when a document is encoded.
- `train.jsonl` — `{"messages"}`; each assistant turn holding query tokens (`info-data-train.repr_token`,
  our `tokens.query`) carries `positive` (one entry per query token: a uid, a list of uids, or null) and
  `negative` (one list of uids per query token). A uid is `docid` or `docid-sentid`. As in the paper's
  collator, a query token whose positive is null/empty or whose negative list is empty gets no retrieval
  loss (it is still generated); negatives not in the db are dropped, as there; an unknown positive is an error.
- the workflow JSON — mapped onto a `TrainConfig` by `onegen.workflow`.

Nothing here evaluates, imports or unpickles anything named by a file; the paper's pickled
`cache_file_path` files are never read.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import TokensConfig
from .data import Corpus, Document, Retrieval, Sample, _messages, _Row, _rows
from .errors import OneGenError

log = logging.getLogger(__name__)

# -- the data files ------------------------------------------------------------------------------


@dataclass
class PaperCorpus:
    """The db as a native corpus, plus which documents each db uid became (by sentence index)."""

    corpus: Corpus
    sentences: dict[str, list[str]] = field(default_factory=dict)

    def resolve(self, uid: str) -> str | None:
        """The corpus id of a paper uid (`docid` means sentence 0, `docid-k` sentence k); None if absent."""
        if uid in self.corpus:
            return uid
        if uid in self.sentences:
            return self.sentences[uid][0]
        doc, _, sent = uid.rpartition("-")
        if doc in self.sentences and sent.isdigit() and int(sent) < len(self.sentences[doc]):
            return self.sentences[doc][int(sent)]
        return None


def _sentence_texts(row: _Row, doc_token: str) -> list[str]:
    """Document k: all text before the k-th doc token of the assistant turns, doc tokens removed."""
    texts, prefix = [], ""
    for m in _messages(row):
        pieces = m.content.split(doc_token)
        if m.role != "assistant":  # the paper's tokenizer takes representations from assistant turns only
            prefix += "".join(pieces)
            continue
        for piece in pieces[:-1]:
            prefix += piece
            texts.append(prefix.strip())
        prefix += pieces[-1]
    return texts


def read_original_db(path: str | Path, doc_token: str) -> PaperCorpus:
    """Read the paper's `db.jsonl` (`uid`, `messages`) into documents; see the module docstring."""
    docs: list[Document] = []
    sentences: dict[str, list[str]] = {}
    seen: dict[str, int] = {}
    skipped: list[str] = []
    for row in _rows(path):
        uid = str(row.get("uid", (str, int)))
        if not uid:
            raise row.error("must be a non-empty string", "uid")
        if uid in sentences:
            raise row.error(f"duplicate uid '{uid}' (first seen on line {seen[uid]})", "uid")
        texts = _sentence_texts(row, doc_token)
        if not texts:  # the paper's reader drops such rows too (nothing to embed)
            skipped.append(row.where)
            continue
        ids = [uid] if len(texts) == 1 else [f"{uid}-{k}" for k in range(len(texts))]
        for doc_id, text in zip(ids, texts, strict=True):
            if doc_id in seen:
                raise row.error(f"document id '{doc_id}' is also made by line {seen[doc_id]} "
                                "(a uid 'X-k' clashes with sentence k of a row with uid 'X')", "uid")
            seen[doc_id] = row.line
            docs.append(Document(doc_id, text))
        seen[uid] = row.line
        sentences[uid] = ids
    if skipped:
        log.warning("%d db rows hold no '%s' in an assistant turn and were skipped (first: %s)",
                    len(skipped), doc_token, skipped[0])
    if not docs:
        raise OneGenError(f"no row holds the document token '{doc_token}' in an assistant turn; set "
                          "tokens.doc (the workflow's info-data-db.repr_token) to the db's token", file=str(path))
    return PaperCorpus(Corpus(docs, source=str(path)), sentences)


def _uid_list(row: _Row, value: Any, key: str) -> list[str]:
    if value is None:
        return []
    items = value if isinstance(value, list) else [value]
    if not all(isinstance(v, (str, int)) and not isinstance(v, bool) for v in items):
        raise row.error("expected a uid, a list of uids, or null", key)
    return [str(v) for v in items]


def _turn_retrievals(row: _Row, msg: dict[str, Any], i: int, n_queries: int, db: PaperCorpus | None,
                     dropped: list[str]) -> list[Retrieval]:
    """The retrieval entries of assistant turn i; an entry with no positives gets no retrieval loss."""
    base = f"messages[{i}]"
    if n_queries == 0 and not msg.get("positive") and not msg.get("negative"):
        return []
    positive, negative = msg.get("positive"), msg.get("negative")
    for key, value in (("positive", positive), ("negative", negative)):
        if not isinstance(value, list) or len(value) != n_queries:
            got = f"{len(value)} entries" if isinstance(value, list) else f"{type(value).__name__}"
            raise row.error(f"expected a list with one entry per query token ({n_queries} in this turn), got {got}",
                            f"{base}.{key}")
    out = []
    for k, (pos, neg) in enumerate(zip(positive, negative, strict=True)):
        if neg is not None and not isinstance(neg, list):
            raise row.error("expected a list of uids (the paper's negative is a list of lists)", f"{base}.negative[{k}]")
        pos_uids = _uid_list(row, pos, f"{base}.positive[{k}]")
        neg_uids = _uid_list(row, neg, f"{base}.negative[{k}]")
        if not pos_uids or not neg_uids:  # the paper's collator trains no retrieval for this token
            out.append(Retrieval(()))
            continue
        if db is None:
            raise row.error("the sample has positives but no db was given (set data.corpus: the db.jsonl)",
                            f"{base}.positive[{k}]")
        positives = []
        for uid in pos_uids:
            doc_id = db.resolve(uid)
            if doc_id is None:
                raise row.error(f"uid '{uid}' is not in the db {db.corpus.source}", f"{base}.positive[{k}]")
            positives.append(doc_id)
        negatives = [d for d in map(db.resolve, neg_uids) if d is not None]
        if len(negatives) < len(neg_uids):
            dropped.append(f"{row.where} {base}.negative[{k}]")
        out.append(Retrieval(tuple(dict.fromkeys(positives)), tuple(negatives)))
    return out


def read_original_train(path: str | Path, tokens: TokensConfig, db: PaperCorpus | None) -> list[Sample]:
    """Read the paper's `train.jsonl` into native samples (one retrieval entry per query token)."""
    samples, dropped = [], []
    for row in _rows(path):
        messages = _messages(row)
        retrievals: list[Retrieval] = []
        for i, (msg, raw) in enumerate(zip(messages, row.obj["messages"], strict=True)):
            if msg.role == "assistant":
                retrievals += _turn_retrievals(row, raw, i, msg.content.count(tokens.query), db, dropped)
            elif "positive" in raw or "negative" in raw:
                raise row.error("only assistant turns carry positive / negative", f"messages[{i}]")
        for i, m in enumerate(messages):
            if m.content.count(tokens.open) != m.content.count(tokens.close):
                raise row.error(f"unbalanced {tokens.open} / {tokens.close}", f"messages[{i}].content")
        sample_id = row.obj.get("id")
        sample_id = str(sample_id) if isinstance(sample_id, (str, int)) else f"line-{row.line}"
        samples.append(Sample(sample_id, messages, tuple(retrievals), row.where))
    if dropped:
        log.warning("%d negative lists name uids that are not in the db; those uids were dropped, as the "
                    "paper's collator does (first: %s)", len(dropped), dropped[0])
    untargeted = sum(1 for s in samples for r in s.retrievals if not r.positives)
    if untargeted:
        log.info("%d query tokens have no positive or no negative: generated, but no retrieval loss", untargeted)
    return samples


def read_original(train: str | Path, db: str | Path | None, tokens: TokensConfig) -> tuple[Corpus | None,
                                                                                           list[Sample]]:
    """The corpus and samples of `data.format: onegen-original`."""
    paper = read_original_db(db, tokens.doc) if db else None
    samples = read_original_train(train, tokens, paper)
    return (paper.corpus if paper else None), samples
