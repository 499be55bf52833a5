"""HotpotQA and 2WikiMultiHopQA (distractor setting) → corpus, multi-hop training samples, QA items.

Accepted input: the official JSON array (or JSONL) with `_id`, `question`, `answer`, `type`,
`supporting_facts` ([[title, sentence index], ...]) and `context` ([[title, [sentence, ...]], ...]);
2WikiMultiHopQA adds `evidences` ([[subject, relation, object], ...]). The Hugging Face `datasets` export
(`id`, `context: {title: [...], sentences: [[...]]}`, `supporting_facts: {title: [...], sent_id: [...]}`)
is accepted too.

Corpus units are paragraphs (sentences joined) or single sentences (`unit="sentence"`), titled with the
paragraph title. Every context paragraph of every question goes into the corpus, deduplicated.

Hop order, for `gold_docs[h]` and the query tokens of the training sample (see `order_paragraphs`):
1. with `evidences` (2Wiki): by the first evidence triple whose subject is the paragraph's title;
2. `type == "comparison"` (HotpotQA): by where the title first appears in the question;
3. otherwise (bridge): the paragraph that mentions the other's title comes first; failing that the one
   without the answer string comes first; failing that the one whose title the question names;
4. ties and leftovers keep the order in which `supporting_facts` first names them.
In sentence mode every supporting sentence is a hop, in that paragraph order, then by sentence index.
The non-supporting context paragraphs (the distractors; their sentences in sentence mode) are the hard
negatives of every hop.
"""

from __future__ import annotations

import re

from ..config import TokensConfig
from ..metrics import normalize_answer
from .common import Converted, CorpusBuilder, Record, join_sentences, progress_bar

UNITS = ("paragraph", "sentence")
_PAREN = re.compile(r"\s*\([^)]*\)\s*$")


def convert_multihop(records: list[Record], source: str, unit: str = "paragraph", split: str = "both",
                     tokens: TokensConfig | None = None, progress: bool = True) -> Converted:
    """Convert HotpotQA / 2WikiMultiHopQA records (see the module docstring for the rules)."""
    tokens = tokens or TokensConfig()
    out, corpus, seen = Converted(), CorpusBuilder(), {}
    for rec in progress_bar(records, f"converting {source}", progress):
        qid = rec.record_id(("_id", "id"), source)
        if qid in seen:
            raise rec.error(f"duplicate id '{qid}' (first seen in record {seen[qid]})", "_id")
        seen[qid] = rec.index
        context = _context(rec)
        paragraphs = [(title, _add_units(corpus, title, sents, unit)) for title, sents in context]
        units: dict[str, list[str | None]] = {}
        for title, ids in paragraphs:
            units.setdefault(title, ids)  # a title twice in one context: the first paragraph is the one meant
        question = rec.first(("question",), str)
        answer = rec.first(("answer",), (str, int, float), required=False)
        facts = _supporting_facts(rec)
        answer = "" if answer is None else str(answer).strip()
        if not answer or not facts:
            out.skipped["no answer or supporting facts"] += 1
            continue
        gold_titles, sentences = _gold(rec, context, facts, out)
        if not gold_titles:
            out.skipped["no valid supporting facts"] += 1
            continue
        texts: dict[str, str] = {}
        for title, sents in context:
            texts.setdefault(title, join_sentences(sents))
        ordered = order_paragraphs(question, answer, str(rec.obj.get("type") or ""), gold_titles, texts,
                                   _evidences(rec))
        if unit == "paragraph":
            hops = [units[t][0] for t in ordered]
        else:
            hops = [units[t][s] for t in ordered for s in sorted(sentences[t]) if units[t][s] is not None]
        hops = [h for h in hops if h is not None]
        if not hops:
            out.skipped["supporting units are empty"] += 1
            continue
        negatives = list(dict.fromkeys(u for t, us in paragraphs if t not in gold_titles for u in us
                                       if u is not None and u not in hops))
        if split in ("train", "both"):
            content = "".join(f"{tokens.query}{tokens.open}{corpus.rows[h]['text']}{tokens.close}" for h in hops)
            out.add("train", {"id": qid, "messages": [{"role": "user", "content": question},
                                                      {"role": "assistant", "content": content + answer}],
                              "retrievals": [{"positives": [h], "negatives": negatives} for h in hops]})
        if split in ("eval", "both"):
            out.add("eval", {"id": qid, "question": question, "answers": [answer], "gold_docs": [[h] for h in hops]})
    out.files["corpus"] = list(corpus.rows.values())
    return out


def _add_units(corpus: CorpusBuilder, title: str, sentences: list[str], unit: str) -> list[str | None]:
    """Corpus ids of a paragraph: `[paragraph id]`, or one per sentence (None for an empty sentence)."""
    if unit == "paragraph":
        text = join_sentences(sentences)
        return [corpus.add(title, text) if text else None]
    return [corpus.add(title, " ".join(s.split())) if s.strip() else None for s in sentences]


def _column_pairs(rec: Record, raw: dict, field: str, column: str, shape: str) -> list[list]:
    """A Hugging Face column dict {"title": [...], column: [...]} as [title, value] pairs."""
    titles, values = raw.get("title"), raw.get(column)
    if not isinstance(titles, list) or not isinstance(values, list) or len(titles) != len(values):
        raise rec.error(f"expected {{'title': [...], '{column}': {shape}}} of equal lengths", field)
    return [list(pair) for pair in zip(titles, values, strict=True)]


def _context(rec: Record) -> list[tuple[str, list[str]]]:
    raw = rec.first(("context",), (list, dict))
    if isinstance(raw, dict):  # Hugging Face datasets: {"title": [...], "sentences": [[...], ...]}
        raw = _column_pairs(rec, raw, "context", "sentences", "[[...], ...]")
    out = []
    for i, pair in enumerate(raw):
        key = f"context[{i}]"
        if not isinstance(pair, list) or len(pair) != 2 or not isinstance(pair[0], str):
            raise rec.error("expected [title, [sentence, ...]]", key)
        title, sents = pair[0], pair[1]
        if isinstance(sents, str):
            sents = [sents]
        if not isinstance(sents, list) or not all(isinstance(s, str) for s in sents):
            raise rec.error("expected a list of sentence strings", f"{key}[1]")
        out.append((title, sents))
    return out


def _supporting_facts(rec: Record) -> list[tuple[str, int]]:
    raw = rec.first(("supporting_facts",), (list, dict), required=False)
    if raw is None:
        return []
    if isinstance(raw, dict):  # Hugging Face datasets: {"title": [...], "sent_id": [...]}
        raw = _column_pairs(rec, raw, "supporting_facts", "sent_id", "[...]")
    out = []
    for i, fact in enumerate(raw):
        if (not isinstance(fact, list) or len(fact) != 2 or not isinstance(fact[0], str)
                or not isinstance(fact[1], int) or isinstance(fact[1], bool)):
            raise rec.error("expected [title, sentence index]", f"supporting_facts[{i}]")
        out.append((fact[0], fact[1]))
    return out


def _evidences(rec: Record) -> list[str]:
    """Subjects of the evidence triples (2WikiMultiHopQA), in order."""
    raw = rec.obj.get("evidences") or []
    if not isinstance(raw, list):
        raise rec.error("expected a list of [subject, relation, object] triples", "evidences")
    subjects = []
    for i, triple in enumerate(raw):
        if not isinstance(triple, list) or not triple or not isinstance(triple[0], str):
            raise rec.error("expected [subject, relation, object]", f"evidences[{i}]")
        subjects.append(triple[0])
    return subjects


def _gold(rec: Record, context: list[tuple[str, list[str]]], facts: list[tuple[str, int]],
          out: Converted) -> tuple[list[str], dict[str, set[int]]]:
    """Supporting titles (first-mention order) and their sentence indices; facts naming a title not in
    the context or a sentence out of range are skipped and counted (the official data has a few)."""
    n_sents = {}
    for title, sents in context:
        n_sents.setdefault(title, len(sents))
    titles: list[str] = []
    sentences: dict[str, set[int]] = {}
    for title, idx in facts:
        if title not in n_sents or not 0 <= idx < n_sents[title]:
            out.skipped["single supporting facts (not records) naming a title or sentence not in the context"] += 1
            continue
        if title not in sentences:
            titles.append(title)
            sentences[title] = set()
        sentences[title].add(idx)
    return titles, sentences


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def _name(title: str) -> str:
    """A title as it appears in running text: lower case, without a trailing '(film)'-style qualifier."""
    return _norm(_PAREN.sub("", title)) or _norm(title)


def _find(name: str, text: str) -> int:
    """Where `name` first occurs in `text` as whole words, or -1 (plain `find`: no regex to compile)."""
    i = text.find(name)
    while i >= 0:
        end = i + len(name)
        if (i == 0 or not text[i - 1].isalnum()) and (end == len(text) or not text[end].isalnum()):
            return i
        i = text.find(name, i + 1)
    return -1


def order_paragraphs(question: str, answer: str, qtype: str, titles: list[str], texts: dict[str, str],
                     evidence_subjects: list[str] | None = None) -> list[str]:
    """The hop order of the supporting paragraphs `titles` (given in supporting-facts order)."""
    rank = {t: i for i, t in enumerate(titles)}
    if evidence_subjects:
        subjects = [_name(s) for s in evidence_subjects]
        first = {t: next((i for i, s in enumerate(subjects) if s == _name(t)), len(subjects)) for t in titles}
        return sorted(titles, key=lambda t: (first[t], rank[t]))
    q = _norm(question)
    if qtype == "comparison":
        pos = {t: _find(_name(t), q) for t in titles}
        return sorted(titles, key=lambda t: (pos[t] < 0, pos[t], rank[t]))
    if len(titles) != 2:
        return titles
    a, b = titles
    a_mentions_b, b_mentions_a = _find(_name(b), _norm(texts[a])) >= 0, _find(_name(a), _norm(texts[b])) >= 0
    if a_mentions_b != b_mentions_a:
        return [a, b] if a_mentions_b else [b, a]
    ans = normalize_answer(answer)
    if ans and ans not in ("yes", "no"):
        a_has, b_has = ans in normalize_answer(texts[a]), ans in normalize_answer(texts[b])
        if a_has != b_has:
            return [b, a] if a_has else [a, b]
    a_named, b_named = _find(_name(a), q) >= 0, _find(_name(b), q) >= 0
    if a_named != b_named:
        return [a, b] if a_named else [b, a]
    return titles
