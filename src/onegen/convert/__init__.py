"""Converters from public dataset formats into onegen's native files (`onegen data convert`).

| source   | input                                         | writes                                   |
|----------|-----------------------------------------------|------------------------------------------|
| hotpotqa | HotpotQA distractor JSON / JSONL              | corpus, train (multi-hop), eval          |
| 2wiki    | 2WikiMultiHopQA JSON / JSONL                  | corpus, train (multi-hop), eval          |
| selfrag  | Self-RAG eval files (`ctxs`) or training data | corpus, train, eval                      |
| aida     | AIDA-CoNLL TSV or EL JSON / JSONL             | corpus (entities), train, dev, eval (EL) |

Each module says which shapes it accepts and the rules it follows. Everything is read and checked first,
so bad input stops with one line naming the file, line (or record index) and field before anything is
written; then every file is written atomically, with `convert.json` holding counts and skips.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ..config import TokensConfig
from ..errors import OneGenError
from ..io import write_json_atomic, write_jsonl_atomic
from .common import SPLITS, read_records

SOURCES = ("hotpotqa", "2wiki", "selfrag", "aida")
log = logging.getLogger(__name__)


def convert(source: str, input_path: str | Path, out_dir: str | Path, unit: str | None = None,
            split: str = "both", entities: str | Path | None = None, tokens: TokensConfig | None = None,
            progress: bool = True) -> dict[str, Any]:
    """Convert `input_path` (a `source` dataset file) into native files in `out_dir`.

    Args:
        source: `hotpotqa`, `2wiki`, `selfrag` or `aida`.
        input_path: the dataset file.
        out_dir: directory for `corpus.jsonl`, `train.jsonl`, `eval.jsonl` (AIDA: also `dev.jsonl`)
            and `convert.json`; created if missing.
        unit: corpus unit for hotpotqa / 2wiki (`paragraph`, default, or `sentence`); item unit for
            aida (`document`, default, or `sentence`).
        split: which files to make of the records: `train`, `eval` or `both` (AIDA-CoNLL's own
            train / testa / testb parts take precedence).
        entities: aida only: a JSONL of entity descriptions (`id` or `title`, `text`) for the corpus.
        tokens: the special token strings for training samples (default: onegen's).
        progress: show a progress bar on a terminal.

    Returns:
        `{"files": {name: path}, "counts": {name: rows}, "skipped": {reason: count}}`.
    """
    if source not in SOURCES:
        raise OneGenError(f"unknown source {source!r}; choose one of {', '.join(SOURCES)}")
    if split not in SPLITS:
        raise OneGenError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    if entities is not None and source != "aida":
        raise OneGenError("--entities only applies to --from aida")
    if source == "aida":
        from .aida import UNITS, convert_aida

        _check_unit(unit, UNITS, source)
        result = convert_aida(input_path, unit or UNITS[0], split, entities, progress)
    elif source == "selfrag":
        from .selfrag import convert_selfrag

        _check_unit(unit, (), source)
        result = convert_selfrag(read_records(input_path), split, tokens, progress)
    else:
        from .multihop import UNITS, convert_multihop

        _check_unit(unit, UNITS, source)
        result = convert_multihop(read_records(input_path), source, unit or UNITS[0], split, tokens, progress)
    if not result.files.get("corpus"):
        raise OneGenError("no documents found: is this a " + source + " file?", file=str(input_path))
    out = Path(out_dir)
    info: dict[str, Any] = {"source": source, "input": str(input_path), "unit": unit, "split": split,
                            "files": {}, "counts": {}, "skipped": dict(result.skipped)}
    for name, rows in result.files.items():
        path = out / f"{name}.jsonl"
        write_jsonl_atomic(path, rows)
        info["files"][name], info["counts"][name] = str(path), len(rows)
    write_json_atomic(out / "convert.json", info)
    for reason, n in result.skipped.items():
        log.info("%s: skipped %d: %s", input_path, n, reason)
    return info


def _check_unit(unit: str | None, allowed: tuple[str, ...], source: str) -> None:
    if unit is not None and unit not in allowed:
        choices = f"choose one of {', '.join(allowed)}" if allowed else "it takes no --unit"
        raise OneGenError(f"--unit {unit} does not apply to --from {source}; {choices}")


__all__ = ["SOURCES", "convert"]
