"""AIDA-CoNLL (and EL data in the same shapes) → entity-linking items and an entity corpus.

Accepted input:
- the AIDA-YAGO2 TSV (`AIDA-YAGO2-dataset.tsv`): `-DOCSTART- (947testa CRICKET)` opens a document, a
  blank line ends a sentence, one token per line; a mention's tokens carry tab-separated columns
  `token, B|I, full mention, YAGO2 entity or --NME--[, Wikipedia URL, Wikipedia id[, Freebase mid]]`.
  Text is rebuilt as tokens joined by spaces and sentences by newlines; offsets index that text.
  Documents whose id holds `testa` go to `dev.jsonl`, `testb` to `eval.jsonl` (the split papers report),
  the rest to `train.jsonl`.
- JSON / JSONL records `{"id"?, "text", "entities" | "mentions": [{"start", "end"} or {"offset",
  "length"}, with "id" | "entity" | "wikipedia_title" | "title"]}`; these go to the files `split` names.

The entity id is the Wikipedia title with underscores (from the URL, else the decoded YAGO2 name),
e.g. `Germany`, `Leeds_United_A.F.C.`; mentions without an entity (`--NME--`) are skipped and counted.
The corpus has one document per entity: its title and, as text, the description from `entities_file`
(JSONL with `id` | `title` | `wikipedia_title` and `text`, a string or a list of paragraphs, of which the
first non-empty one is used) or else the title itself.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from ..errors import OneGenError
from ..io import iter_jsonl
from .common import Converted, Record, progress_bar, read_records

UNITS = ("document", "sentence")
NO_ENTITY = "--NME--"
_YAGO_ESCAPE = re.compile(r"\\u([0-9a-fA-F]{4})")
_ENTITY_KEYS = ("id", "entity", "wikipedia_title", "title", "entity_id")


def is_tsv(path: str | Path) -> bool:
    if not Path(path).is_file():
        raise OneGenError("file not found", file=str(path))
    with open(path, "rb") as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    return not head.startswith((b"{", b"["))


def convert_aida(path: str | Path, unit: str = "document", split: str = "both",
                 entities_file: str | Path | None = None, progress: bool = True) -> Converted:
    """Convert an AIDA TSV or EL JSON(L) file (see the module docstring)."""
    out = Converted()
    if is_tsv(path):
        docs = _read_tsv(path, out)
    else:
        docs = [_json_doc(rec) for rec in read_records(path)]
    descriptions = _descriptions(entities_file) if entities_file else {}
    names: dict[str, str] = {}
    seen: dict[str, str] = {}
    for doc in progress_bar(docs, "converting aida", progress):
        for item in _units(doc, unit):
            if item["id"] in seen:
                raise OneGenError(f"duplicate document id '{item['id']}' (first at {seen[item['id']]})",
                                  file=doc["where"])
            seen[item["id"]] = doc["where"]
            for e in item["entities"]:
                names.setdefault(e["id"], e.pop("name"))
            for name in _targets(doc["part"], split):
                out.add(name, item)
    out.files["corpus"] = [{"id": eid, "title": title, "text": descriptions.get(eid) or title}
                           for eid, title in names.items()]
    return out


def _targets(part: str, split: str) -> list[str]:
    if part in ("testa", "testb", "train"):
        return [{"testa": "dev", "testb": "eval", "train": "train"}[part]]
    return ["train", "eval"] if split == "both" else [split]


def entity_id(url: str | None, yago: str | None) -> str | None:
    """The Wikipedia title (underscored) of a mention's entity, or None for `--NME--`."""
    if url and "/wiki/" in url:
        return unquote(url.split("/wiki/", 1)[1]).replace(" ", "_")
    if yago and yago != NO_ENTITY:
        return _YAGO_ESCAPE.sub(lambda m: chr(int(m.group(1), 16)), yago).replace(" ", "_")
    return None


def _part(doc_id: str) -> str:
    return "testa" if "testa" in doc_id else "testb" if "testb" in doc_id else "train"


def _read_tsv(path: str | Path, out: Converted) -> list[dict[str, Any]]:
    """Documents as {id, part, where, sentences: [[(token, start?, mention info)]]} from the TSV."""
    docs: list[dict[str, Any]] = []
    doc: dict[str, Any] | None = None
    sentence: list[str] = []
    spans: list[dict[str, Any]] = []
    open_span: dict[str, Any] | None = None

    def end_sentence() -> None:
        nonlocal sentence, spans, open_span
        if doc is not None and sentence:
            doc["sentences"].append((sentence, spans))
        sentence, spans, open_span = [], [], None

    with open(path, encoding="utf-8-sig", errors="strict") as f:
        try:
            lines = f.read().splitlines()
        except UnicodeDecodeError as e:
            raise OneGenError(f"not valid UTF-8 ({e.reason} at byte {e.start})", file=str(path)) from None
    for lineno, line in enumerate(lines, start=1):
        if line.startswith("-DOCSTART-"):
            end_sentence()
            m = re.match(r"-DOCSTART-\s*\((.*)\)\s*$", line)
            doc_id = m.group(1).strip() if m else f"doc-{len(docs)}"
            doc = {"id": doc_id, "part": _part(doc_id), "where": f"{path}:{lineno}", "sentences": []}
            docs.append(doc)
            continue
        if not line.strip():
            end_sentence()
            continue
        if doc is None:
            raise OneGenError("token before the first -DOCSTART- line (is this an AIDA-CoNLL TSV?)",
                              file=str(path), line=lineno)
        cols = line.split("\t")
        sentence.append(cols[0])
        if len(cols) == 1:
            open_span = None
            continue
        tag = cols[1]
        if tag not in ("B", "I") or len(cols) < 4:
            raise OneGenError("expected 'token<TAB>B|I<TAB>mention<TAB>entity[<TAB>url ...]' "
                              f"(got {len(cols)} column(s), tag {tag!r})", file=str(path), line=lineno,
                              field="column 2" if tag not in ("B", "I") else "column 4")
        if tag == "I":
            if open_span is None:
                raise OneGenError("'I' token without a 'B' token before it", file=str(path), line=lineno,
                                  field="column 2")
            open_span["last"] = len(sentence) - 1
            continue
        eid = entity_id(cols[4] if len(cols) > 4 else None, cols[3])
        open_span = {"first": len(sentence) - 1, "last": len(sentence) - 1, "id": eid}
        if eid is None:
            out.skipped["mentions without an entity (--NME--)"] += 1
        spans.append(open_span)
    end_sentence()
    if not docs:
        raise OneGenError("no -DOCSTART- line: not an AIDA-CoNLL TSV (or JSON / JSONL EL items)", file=str(path))
    return docs


def _units(doc: dict[str, Any], unit: str) -> list[dict[str, Any]]:
    """EL items of a document: the whole document, or one per sentence."""
    if "text" in doc:  # from JSON: already text + entities
        return [{"id": doc["id"], "text": doc["text"], "entities": [dict(e) for e in doc["entities"]]}]
    groups = [doc["sentences"]] if unit == "document" else [[s] for s in doc["sentences"]]
    items = []
    for k, group in enumerate(groups):
        text, entities = "", []
        for tokens, spans in group:
            if text:
                text += "\n"
            starts = []
            for i, tok in enumerate(tokens):
                if i:
                    text += " "
                starts.append(len(text))
                text += tok
            for s in spans:
                if s["id"] is not None:
                    last = s["last"]
                    entities.append({"start": starts[s["first"]], "end": starts[last] + len(tokens[last]),
                                     "id": s["id"], "name": s["id"].replace("_", " ")})
        items.append({"id": doc["id"] if unit == "document" else f"{doc['id']}#{k}", "text": text,
                      "entities": entities})
    return items


def _json_doc(rec: Record) -> dict[str, Any]:
    text = rec.first(("text",), str)
    raw = rec.first(("entities", "mentions"), list, required=False) or []
    key = "entities" if "entities" in rec.obj else "mentions"
    entities = []
    for i, e in enumerate(raw):
        where = f"{key}[{i}]"
        if not isinstance(e, dict):
            raise rec.error("expected an object with start/end (or offset/length) and an entity id", where)
        if "start" in e:
            start, end = e.get("start"), e.get("end")
        else:
            start = e.get("offset")
            end = start + e["length"] if isinstance(start, int) and isinstance(e.get("length"), int) else None
        if not isinstance(start, int) or not isinstance(end, int) or not 0 <= start < end <= len(text):
            raise rec.error(f"span must be integer offsets inside the text (length {len(text)}), got "
                            f"start={start!r}, end={end!r}", where)
        eid = next((e[k] for k in _ENTITY_KEYS if isinstance(e.get(k), (str, int)) and e.get(k) != ""), None)
        if eid is None or eid == NO_ENTITY:
            if eid is None and not any(k in e for k in _ENTITY_KEYS):
                raise rec.error(f"missing the entity (one of {', '.join(_ENTITY_KEYS)})", where)
            continue
        eid = entity_id(str(eid) if str(eid).startswith("http") else None, str(eid))
        entities.append({"start": start, "end": end, "id": eid, "name": str(eid).replace("_", " ")})
    entities.sort(key=lambda x: x["start"])
    for a, b in zip(entities, entities[1:], strict=False):
        if b["start"] < a["end"]:
            raise rec.error(f"entity spans overlap: [{a['start']},{a['end']}) and [{b['start']},{b['end']})", key)
    where = f"{rec.file}:{rec.line}" if rec.line is not None else f"{rec.file}[{rec.index}]"
    return {"id": rec.record_id(("id", "_id", "doc_id"), "el"), "part": "",
            "where": where, "text": text, "entities": entities}


def _descriptions(path: str | Path) -> dict[str, str]:
    """Entity id → description text, from a JSONL of {id|title|wikipedia_title, text}."""
    out = {}
    for line, obj in iter_jsonl(path):
        key = next((obj[k] for k in ("id", "wikipedia_title", "title") if isinstance(obj.get(k), str)), None)
        text = obj.get("text")
        if isinstance(text, list) and key is not None:  # KILT: paragraphs, the first one being the title
            text = next((t for t in text if isinstance(t, str) and t.strip() and t.strip() != key.strip()), None)
        if key is None or not isinstance(text, str):
            raise OneGenError("expected an entity 'id' (or 'title' / 'wikipedia_title') and a 'text'",
                              file=str(path), line=line)
        out.setdefault(key.replace(" ", "_"), " ".join(text.split()))
    return out
