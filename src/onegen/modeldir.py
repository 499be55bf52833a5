"""The OneGen model directory: what `onegen.json` holds beside the HF weights and tokenizer, read back.

`OneGenModel.save_pretrained` writes the directory; this module names its metadata file, gives the
format version, serialises the special tokens, checks that a path is such a directory and reads its
metadata (a malformed file is a `OneGenError` naming it, never a bare `KeyError`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .config import TokensConfig
from .errors import OneGenError

__all__ = ["FORMAT_VERSION", "ONEGEN_JSON", "check_onegen_dir", "read_meta", "tokens_dict"]

ONEGEN_JSON = "onegen.json"
FORMAT_VERSION = 1


def tokens_dict(tokens: TokensConfig) -> dict[str, Any]:
    """The special token strings as stored in `onegen.json` (and hashed by the fingerprint)."""
    return {"query": tokens.query, "doc": tokens.doc, "open": tokens.open, "close": tokens.close,
            "descriptions": dict(tokens.descriptions), "extra": dict(tokens.extra)}


def check_onegen_dir(path: str | Path) -> None:
    """Raise `OneGenError` unless `path` is a OneGen model directory (written by `save_pretrained` or
    `onegen train`). A plain HF checkpoint loads with `from_pretrained` as a start for training, but its
    query and document tokens were never trained, so indexing or generating with it is a mistake."""
    if not Path(path).exists():
        raise OneGenError("model directory not found; pass a OneGen model directory (RUN/model of "
                          "`onegen train`)", file=str(path))
    if not (Path(path) / ONEGEN_JSON).is_file():
        raise OneGenError(f"not a OneGen model directory (no {ONEGEN_JSON}): a plain checkpoint has never "
                          "learnt the retrieval tokens; fine-tune it first with `onegen train` "
                          f"(model.name_or_path: {path}) and use RUN/model", file=str(path))


def read_meta(path: str) -> dict[str, Any] | None:
    """The `onegen.json` of directory `path`, or None when it has none (a plain HF checkpoint)."""
    meta_path = Path(path) / ONEGEN_JSON
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        _ = meta["tokens"]["query"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise OneGenError(f"malformed onegen.json ({e}); re-save the model with save_pretrained",
                          file=str(meta_path)) from None
    return meta

