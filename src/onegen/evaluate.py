"""Score a predictions file against a gold evaluation file (`onegen eval`).

Both files are JSONL and are validated here, at the boundary: a bad record raises `OneGenError`
naming file:line and the field at fault, and nothing is scored until both files are known good.
Guarantees:
- every gold item has exactly one prediction and every prediction has a gold item (matched by `id`);
- gold ids and prediction ids are unique (strings, or integers read as strings, as `onegen generate`
  reads them; doc ids, entity ids and answers likewise);
- for `el`, every gold entity span lies inside its text (0 <= start < end <= len(text));
- `k` for QA defaults to the longest top-k list found in the predictions (at least 1).
The metrics themselves live in `onegen.metrics`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

from .errors import OneGenError
from .io import read_jsonl
from .metrics import el_metrics, qa_metrics

TASKS = ("qa", "el")
_SHOW_MISSING = 5  # ids listed in the "missing predictions" error

Checker = Callable[[dict[str, Any], str, int], None]


def evaluate_files(task: str, gold_path: str | os.PathLike, pred_path: str | os.PathLike,
                   k: int | None = None) -> dict[str, Any]:
    """Validate a gold file and a predictions file, then compute the task's metrics.

    Args:
        task: `qa` (answers and retrieval recall) or `el` (entity linking).
        gold_path: evaluation input JSONL (the file given to `onegen generate --input`).
        pred_path: predictions JSONL written by `onegen generate`.
        k: recall cut-off for `qa`; default: the longest `doc_ids` list in the predictions (min 1).

    Returns:
        The metrics dict of `onegen.metrics.qa_metrics` or `onegen.metrics.el_metrics`.

    Raises:
        OneGenError: unknown task, bad `k`, a malformed record (with file:line and field), duplicate
            ids, a prediction for an unknown id, or gold items without a prediction.
    """
    if task not in TASKS:
        raise OneGenError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}", field="task")
    if k is not None and k < 1:
        raise OneGenError(f"k must be at least 1, got {k}", field="k")
    gold = _read_records(gold_path, _check_gold_qa if task == "qa" else _check_gold_el)
    preds = _read_records(pred_path, _check_pred_qa if task == "qa" else _check_pred_el)
    _check_pairing(gold, preds, str(gold_path), str(pred_path))
    if task == "el":  # predicted spans must lie inside the gold item's text
        lengths = {obj["id"]: len(obj["text"]) for _, obj in gold}
        for line, obj in preds:
            for i, ent in enumerate(obj["entities"]):
                if ent["end"] > lengths[obj["id"]]:
                    raise _fail(f"span [{ent['start']}, {ent['end']}) ends past the gold text (length "
                                f"{lengths[obj['id']]})", str(pred_path), line, f"entities[{i}]")
    items = [obj for _, obj in gold]
    pred_objs = [obj for _, obj in preds]
    if task == "qa":
        return qa_metrics(items, pred_objs, k if k is not None else _default_k(pred_objs))
    return el_metrics(items, pred_objs)


def render_metrics_json(metrics: dict[str, Any]) -> str:
    """Render metrics as ONE line of JSON with sorted keys (no trailing newline)."""
    return json.dumps(metrics, sort_keys=True, ensure_ascii=False)


def _default_k(preds: list[dict[str, Any]]) -> int:
    lengths = [len(r["doc_ids"]) for p in preds for r in p.get("retrievals") or []]
    return max([1, *lengths])


# ----------------------------------------------------------------------------- reading and pairing


def _read_records(path: str | os.PathLike, check: Checker) -> list[tuple[int, dict[str, Any]]]:
    """Read a JSONL file, check each record's `id` (unique string) and its task fields."""
    file = str(path)
    rows = read_jsonl(path)
    first_line: dict[str, int] = {}
    for line, obj in rows:
        rid = obj["id"] = _as_str(obj.get("id"))
        if not isinstance(rid, str) or not rid:
            raise OneGenError("missing or non-string 'id' (every record needs a unique string id)",
                              file=file, line=line, field="id")
        if rid in first_line:
            raise OneGenError(f"duplicate id {rid!r} (first seen on line {first_line[rid]}); ids must be "
                              "unique", file=file, line=line, field="id")
        first_line[rid] = line
        check(obj, file, line)
    return rows


def _check_pairing(gold: list[tuple[int, dict[str, Any]]], preds: list[tuple[int, dict[str, Any]]],
                   gold_file: str, pred_file: str) -> None:
    """Every prediction names a gold item, and every gold item has a prediction."""
    gold_ids = {obj["id"] for _, obj in gold}
    for line, obj in preds:
        if obj["id"] not in gold_ids:
            raise OneGenError(f"prediction id {obj['id']!r} is not in the gold file {gold_file}; were the "
                              "predictions generated from a different input file?",
                              file=pred_file, line=line, field="id")
    pred_ids = {obj["id"] for _, obj in preds}
    missing = [obj["id"] for _, obj in gold if obj["id"] not in pred_ids]
    if missing:
        shown = ", ".join(missing[:_SHOW_MISSING]) + (", ..." if len(missing) > _SHOW_MISSING else "")
        raise OneGenError(f"{len(missing)} of {len(gold)} gold items have no prediction (ids: {shown}); run "
                          f"`onegen generate` with --input {gold_file} to predict every item",
                          file=pred_file)


# ----------------------------------------------------------------------------- field checks


def _fail(message: str, file: str, line: int, field: str) -> OneGenError:
    return OneGenError(message, file=file, line=line, field=field)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _as_str(value: Any) -> Any:
    """An integer id or answer as the string `onegen generate` reads it; anything else unchanged."""
    return str(value) if _is_int(value) else value


def _str_list(value: Any, file: str, line: int, field: str, *, non_empty: bool) -> list[str]:
    """`value` checked to be a list of strings (integers become strings)."""
    value = [_as_str(v) for v in value] if isinstance(value, list) else value
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _fail("expected a list of strings", file, line, field)
    if non_empty and not value:
        raise _fail("expected at least one string", file, line, field)
    return value


def _check_gold_qa(obj: dict[str, Any], file: str, line: int) -> None:
    if "answers" not in obj:
        raise _fail("missing 'answers' (a list of acceptable answer strings); is this a QA evaluation "
                    "file?", file, line, "answers")
    obj["answers"] = _str_list(obj["answers"], file, line, "answers", non_empty=True)
    gold_docs = obj.get("gold_docs")
    if gold_docs is None:
        return
    if not isinstance(gold_docs, list) or not all(isinstance(hop, list) for hop in gold_docs):
        raise _fail('expected one list of acceptable doc ids per hop, e.g. [["d17"], ["d4", "d5"]]',
                    file, line, "gold_docs")
    for hop, doc_ids in enumerate(gold_docs):  # an empty hop has no gold: it is not scored
        gold_docs[hop] = _str_list(doc_ids, file, line, f"gold_docs[{hop}]", non_empty=False)


def _check_entities(entities: Any, file: str, line: int, text: str | None) -> None:
    """Entities are `{start, end, id}` with int offsets; with `text`, spans must lie inside it.

    Spans may overlap or nest (strong match scores each (start, end, id) on its own)."""
    if not isinstance(entities, list):
        raise _fail("expected a list of {start, end, id} objects", file, line, "entities")
    for i, ent in enumerate(entities):
        where = f"entities[{i}]"
        if not isinstance(ent, dict):
            raise _fail("expected an object {start, end, id}", file, line, where)
        for key in ("start", "end"):
            if not _is_int(ent.get(key)):
                raise _fail("expected an integer character offset", file, line, f"{where}.{key}")
        ent["id"] = _as_str(ent.get("id"))
        if not isinstance(ent["id"], str):
            raise _fail("expected a string document id", file, line, f"{where}.id")
        limit = len(text) if text is not None else ent["end"]
        if not 0 <= ent["start"] < ent["end"] <= limit:
            inside = f"inside the text (length {len(text)})" if text is not None else "a span"
            raise _fail(f"span [{ent['start']}, {ent['end']}) is not {inside}; need 0 <= start < end"
                        f"{' <= len(text)' if text is not None else ''}, end exclusive", file, line, where)


def _check_gold_el(obj: dict[str, Any], file: str, line: int) -> None:
    text = obj.get("text")
    if not isinstance(text, str):
        raise _fail("missing or non-string 'text'; is this an entity-linking evaluation file?",
                    file, line, "text")
    if "entities" not in obj:
        raise _fail("missing 'entities' (a list of {start, end, id})", file, line, "entities")
    _check_entities(obj["entities"], file, line, text)


def _check_pred_qa(obj: dict[str, Any], file: str, line: int) -> None:
    if not isinstance(obj.get("answer"), str):
        raise _fail("missing or non-string 'answer'; was this file written by `onegen generate --task qa`?",
                    file, line, "answer")
    retrievals = obj.get("retrievals")
    if retrievals is None:
        return
    if not isinstance(retrievals, list):
        raise _fail("expected a list of {doc_ids, scores} objects", file, line, "retrievals")
    for i, ret in enumerate(retrievals):
        if not isinstance(ret, dict) or "doc_ids" not in ret:
            raise _fail("expected an object with 'doc_ids'", file, line, f"retrievals[{i}]")
        ret["doc_ids"] = _str_list(ret["doc_ids"], file, line, f"retrievals[{i}].doc_ids", non_empty=False)


def _check_pred_el(obj: dict[str, Any], file: str, line: int) -> None:
    if "entities" not in obj:
        raise _fail("missing 'entities'; was this file written by `onegen generate --task el`?",
                    file, line, "entities")
    _check_entities(obj["entities"], file, line, text=None)
