"""Self-RAG files → corpus, QA items and training samples.

Two kinds of record are accepted (JSON array or JSONL), told apart per record:

- evaluation records (the `eval_data/*.jsonl` of Self-RAG, e.g. PopQA, TriviaQA): a question in
  `question` (or `instruction`, with `input` appended), answers in `answers` / `golds` / `answer` /
  `output` / `possible_answers` (a list, a string, or a string holding a list), and retrieved passages
  in `ctxs` ([{"id"?, "title", "text", "hasanswer"?}]). The passages go into the corpus; the
  passages that hold an answer (`hasanswer`, else: a normalised answer occurs in the normalised text)
  are the acceptable hop-1 documents (`gold_docs`, left out when none does). With a training split, a
  record with such a passage also becomes a sample `[RQ]<paragraph>first such passage</paragraph>answer`
  whose positives are those passages and whose negatives are the other passages.
- training records (`selfrag_train_data`): `instruction` (+ `input`) and an `output` with reflection
  tokens, e.g. `[Retrieval]<paragraph>…</paragraph>[Relevant]Answer.[Fully supported][Utility:5]`. Each
  paragraph becomes a corpus document and a retrieval (`[RQ]<paragraph>…</paragraph>`), reflection
  tokens are removed, and a paragraph judged `[Irrelevant]` is dropped with its query. An output with no
  paragraph is a plain generation sample. These records only make training samples.
"""

from __future__ import annotations

import ast
import json
import re
from typing import Any

from ..config import TokensConfig
from ..metrics import normalize_answer
from .common import Converted, CorpusBuilder, Record, progress_bar

REFLECTION = re.compile(r"\[(?:No Retrieval|Retrieval|Relevant|Irrelevant|Fully supported|Partially supported|"
                        r"No support / Contradictory|Continue to Use Evidence|Utility:\d)\]")
_PARAGRAPH = re.compile(r"(?:\[Retrieval\])?<paragraph>(.*?)</paragraph>(\s*\[Irrelevant\])?", re.S)
_ANSWER_KEYS = ("answers", "golds", "answer", "output", "possible_answers")


def convert_selfrag(records: list[Record], split: str = "both", tokens: TokensConfig | None = None,
                    progress: bool = True) -> Converted:
    """Convert Self-RAG evaluation and training records (see the module docstring)."""
    tokens = tokens or TokensConfig()
    out, corpus, seen = Converted(), CorpusBuilder(), {}
    for rec in progress_bar(records, "converting selfrag", progress):
        rid = rec.record_id(("id", "_id", "q_id", "question_id"), "selfrag")
        if rid in seen:
            raise rec.error(f"duplicate id '{rid}' (first seen in record {seen[rid]})", "id")
        seen[rid] = rec.index
        if rec.obj.get("ctxs") is not None:
            _eval_record(rec, rid, corpus, out, split, tokens)
        elif isinstance(rec.obj.get("output"), str):
            if split in ("train", "both"):
                out.add("train", _train_record(rec, rid, corpus, tokens))
        else:
            raise rec.error("neither 'ctxs' (an evaluation record) nor an 'output' string (a training "
                            "record)", "ctxs")
    out.files["corpus"] = list(corpus.rows.values())
    return out


def _question(rec: Record) -> str:
    question = rec.first(("question", "instruction"), str)
    extra = rec.obj.get("input") if "question" not in rec.obj else None
    if isinstance(extra, str) and extra.strip():
        question = f"{question}\n\n{extra.strip()}"
    return question


def _answers(rec: Record) -> list[str]:
    for key in _ANSWER_KEYS:
        value = rec.obj.get(key)
        if value is None:
            continue
        if isinstance(value, str) and key == "possible_answers" and value.lstrip().startswith("["):
            try:  # PopQA keeps its answers as the text of a list
                value = json.loads(value)
            except json.JSONDecodeError:
                try:
                    value = ast.literal_eval(value)
                except (ValueError, SyntaxError):
                    raise rec.error("could not parse the list of answers", key) from None
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, (str, int, float)) for v in value):
            raise rec.error("expected a string or a list of strings", key)
        return [str(v).strip() for v in value if str(v).strip()]
    return []


def _eval_record(rec: Record, rid: str, corpus: CorpusBuilder, out: Converted, split: str,
                 tokens: TokensConfig) -> None:
    question, answers = _question(rec), _answers(rec)
    ctxs = rec.first(("ctxs",), list)
    ids, has = [], []
    normed = [normalize_answer(a) for a in answers if normalize_answer(a)]
    for i, c in enumerate(ctxs):
        if not isinstance(c, dict) or not isinstance(c.get("text"), str):
            raise rec.error("expected an object with a 'text' string", f"ctxs[{i}]")
        title = c.get("title") if isinstance(c.get("title"), str) else None
        text = " ".join(c["text"].split())
        if not text:
            continue
        ids.append(corpus.add(title, text))
        if "hasanswer" in c:
            has.append(bool(c["hasanswer"]))
        else:
            has.append(any(a in normalize_answer(text) for a in normed))
    gold = list(dict.fromkeys(d for d, h in zip(ids, has, strict=True) if h))
    if not answers:
        out.skipped["no answers"] += 1
        return
    if split in ("eval", "both"):
        out.add("eval", {"id": rid, "question": question, "answers": answers,
                         **({"gold_docs": [gold]} if gold else {})})
    if split in ("train", "both"):
        if not gold:
            out.skipped["no passage holds the answer (no training sample)"] += 1
            return
        negatives = [d for d in dict.fromkeys(ids) if d not in gold]
        content = f"{tokens.query}{tokens.open}{corpus.rows[gold[0]]['text']}{tokens.close}{answers[0]}"
        out.add("train", {"id": rid, "messages": [{"role": "user", "content": question},
                                                  {"role": "assistant", "content": content}],
                          "retrievals": [{"positives": gold, "negatives": negatives}]})


def _train_record(rec: Record, rid: str, corpus: CorpusBuilder, tokens: TokensConfig) -> dict[str, Any]:
    question, output = _question(rec), rec.first(("output",), str)
    pieces, retrievals, pos, text_run = [], [], 0, ""
    for m in _PARAGRAPH.finditer(output):
        text_run += output[pos:m.start()]
        pos = m.end()
        text = " ".join(m.group(1).split())
        if m.group(2) or not text:  # judged irrelevant (or empty): drop the retrieval; the text around
            text_run += "[Irrelevant]"  # it stays one run, so a dropped paragraph between words is a space
            continue
        doc = corpus.add(None, text)
        pieces += [_strip_reflection(text_run), f"{tokens.query}{tokens.open}{text}{tokens.close}"]
        text_run = ""
        retrievals.append({"positives": [doc]})
    pieces.append(_strip_reflection(text_run + output[pos:]))
    content = "".join(pieces).strip()
    if not content:
        raise rec.error("nothing left after removing reflection tokens", "output")
    return {"id": rid, "messages": [{"role": "user", "content": question},
                                    {"role": "assistant", "content": content}],
            **({"retrievals": retrievals} if retrievals else {})}


def _strip_reflection(text: str) -> str:
    """`text` without reflection tokens; a run of them between two words becomes one space (Self-RAG
    writes "...in Paris.[Fully supported][Continue to Use Evidence]It was built...")."""
    def gap(m: re.Match[str]) -> str:
        inside = 0 < m.start() and m.end() < len(text)
        return " " if inside and not text[m.start() - 1].isspace() and not text[m.end()].isspace() else ""

    return _REFLECTION_RUN.sub(gap, text)


_REFLECTION_RUN = re.compile(f"(?:{REFLECTION.pattern})+")
