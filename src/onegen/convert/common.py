"""What every converter shares: reading JSON / JSONL records with their origin, a deduplicating corpus
builder with stable ids, and the result that gets written.

Records carry where they came from (`file:line` for JSONL, `file[i]` for a JSON array), so a converter
can name the record and field at fault. Document ids are content hashes: the same title and text get
the same id in every run and in every file converted, so corpora of separate splits merge cleanly.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import OneGenError
from ..io import iter_jsonl

SPLITS = ("train", "eval", "both")


class Record:
    """One input object and its origin; `error` builds a `OneGenError` naming both and the field."""

    def __init__(self, obj: dict[str, Any], file: str, line: int | None, index: int):
        self.obj, self.file, self.line, self.index = obj, file, line, index

    def error(self, message: str, field: str | None = None) -> OneGenError:
        file = self.file if self.line is not None else f"{self.file}[{self.index}]"
        return OneGenError(message, file=file, line=self.line, field=field)

    def first(self, keys: tuple[str, ...], kind: type | tuple[type, ...], required: bool = True) -> Any:
        """The value of the first of `keys` present (and not null), checked against `kind`."""
        for key in keys:
            if self.obj.get(key) is not None:
                value = self.obj[key]
                if not isinstance(value, kind) or isinstance(value, bool):
                    want = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
                    raise self.error(f"expected {want}, got {type(value).__name__}", key)
                return value
        if required:
            raise self.error("missing required field" + (f" (or {', '.join(keys[1:])})" if keys[1:] else ""),
                             keys[0])
        return None

    def record_id(self, keys: tuple[str, ...], prefix: str) -> str:
        value = self.first(keys, (str, int), required=False)
        return str(value) if value not in (None, "") else f"{prefix}-{self.index}"


def read_records(path: str | Path) -> list[Record]:
    """Read a JSON array of objects, or JSONL (one object per line); errors name file:line or file[i]."""
    path = Path(path)
    if not path.is_file():
        raise OneGenError("file not found", file=str(path))
    with open(path, "rb") as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    if not head.startswith(b"["):
        return [Record(obj, str(path), line, i) for i, (line, obj) in enumerate(iter_jsonl(path))]
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError as e:
        raise OneGenError(f"not valid UTF-8 ({e.reason} at byte {e.start})", file=str(path)) from None
    except json.JSONDecodeError as e:
        raise OneGenError(f"malformed JSON ({e.msg})", file=str(path), line=e.lineno) from None
    records = []
    for i, obj in enumerate(data):
        if not isinstance(obj, dict):
            raise OneGenError(f"expected a JSON object, got {type(obj).__name__}", file=f"{path}[{i}]")
        records.append(Record(obj, str(path), None, i))
    return records


def doc_id(title: str | None, text: str) -> str:
    """A stable id from content: `d` + 16 hex digits of SHA-1 over title and text."""
    digest = hashlib.sha1(f"{title or ''}\n{text}".encode()).hexdigest()
    return "d" + digest[:16]


class CorpusBuilder:
    """Documents in first-seen order; adding the same title and text again returns the same id."""

    def __init__(self) -> None:
        self.rows: dict[str, dict[str, Any]] = {}

    def add(self, title: str | None, text: str, id: str | None = None) -> str:
        doc = id or doc_id(title, text)
        if doc not in self.rows:
            self.rows[doc] = {"id": doc, "text": text, **({"title": title} if title else {})}
        return doc

    def __len__(self) -> int:
        return len(self.rows)


def join_sentences(sentences: list[str]) -> str:
    """Join sentences with one space unless one side already has whitespace (HotpotQA keeps a leading
    space on every sentence after the first; 2WikiMultiHopQA does not)."""
    out = ""
    for s in sentences:
        if out and not out[-1].isspace() and s and not s[0].isspace():
            out += " "
        out += s
    return " ".join(out.split())


def progress_bar(items: list[Any], desc: str, progress: bool) -> Iterator[Any]:
    from tqdm.auto import tqdm

    # disable=None: shown on a terminal only, so logs and tests stay clean
    return iter(tqdm(items, desc=desc, unit="rec", disable=None if progress else True, mininterval=0.5))


@dataclass
class Converted:
    """What a converter produced: rows per output file (`corpus`, `train`, `eval`, ...) and counts of
    what it skipped and why."""

    files: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    skipped: Counter = field(default_factory=Counter)

    def add(self, name: str, row: dict[str, Any]) -> None:
        self.files.setdefault(name, []).append(row)
