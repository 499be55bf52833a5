"""File input/output: JSONL reading with file:line errors, and atomic writes.

Every write goes to a temporary file in the target's directory and is renamed over the target, so an
interrupted write leaves the previous file (or none) and never half a file. What is renamed into place
has the usual permissions (0666/0777 less the umask), whatever the writer's temporary files had. A directory replaces the
previous one by an atomic exchange (Linux `renameat2`), so even a kill at that moment leaves one whole
directory; where the exchange is not available, the old one is moved aside first. A write that fails
(disk full, no permission) is a one-line `OneGenError` naming the target.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import shutil
import socket
import sys
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from .errors import OneGenError


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield `(line_number, object)` for each non-blank line of a JSONL file.

    Accepts a UTF-8 BOM and CRLF line ends. Raises `OneGenError` naming file:line for a missing
    file, bad UTF-8, malformed JSON, or a line that is not a JSON object.
    """
    path = Path(path)
    if not path.is_file():
        raise OneGenError("file not found (expected a JSONL file: one JSON object per line)", file=str(path))
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise OneGenError(f"not valid UTF-8 ({e.reason} at byte {e.start})", file=str(path),
                                  line=lineno) from None
            text = text.strip()
            if not text:
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                raise OneGenError(f"malformed JSON ({e.msg} at column {e.colno}); each line must be one "
                                  "complete JSON object", file=str(path), line=lineno) from None
            except (RecursionError, ValueError) as e:  # nested too deeply; an integer of > 4300 digits
                raise OneGenError(f"JSON that cannot be read ({str(e)[:120]})", file=str(path),
                                  line=lineno) from None
            if not isinstance(obj, dict):
                raise OneGenError(f"expected a JSON object, got {type(obj).__name__}", file=str(path),
                                  line=lineno)
            if ("\\ud" in text or "\\uD" in text) and _has_lone_surrogate(obj):
                raise OneGenError("a string holds a lone UTF-16 surrogate escape (\\ud800-\\udfff), which is "
                                  "not a character; write the text as UTF-8", file=str(path), line=lineno)
            yield lineno, obj


def _has_lone_surrogate(obj: Any) -> bool:
    """Whether a parsed JSON value holds a string that is not valid Unicode (tokenizers reject it)."""
    try:
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def read_jsonl(path: str | os.PathLike, *, allow_empty: bool = False) -> list[tuple[int, dict[str, Any]]]:
    """Read a whole JSONL file as `(line_number, object)` pairs; an empty file is an error by default."""
    rows = list(iter_jsonl(path))
    if not rows and not allow_empty:
        raise OneGenError("file is empty (expected at least one JSON object)", file=str(path))
    return rows


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Give a temporary path next to `path`; on success rename it over `path`, on error remove it.

    Works for a file or a directory written at the temporary path. An `OSError` while writing or
    renaming becomes a `OneGenError` naming `path`; the previous `path` is then left as it was.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale(path)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.{_WRITER}-{os.getpid()}.", suffix=".tmp",
                                    dir=path.parent)) / "x"
    except OSError as e:
        raise OneGenError(f"cannot write here ({e.strerror or e})", file=str(path)) from None
    try:
        yield tmp
        normalize_permissions(tmp)
        if path.is_dir() and tmp.is_dir():
            if not _exchange(tmp, path):  # exchanged: tmp now holds the old directory, removed below
                old = path.with_name(f".{path.name}.old-{os.getpid()}")
                os.replace(path, old)
                os.replace(tmp, path)
                shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except OSError as e:
        raise OneGenError(f"writing failed ({e.strerror or e}); the previous file, if any, is unchanged",
                          file=str(path)) from None
    finally:
        shutil.rmtree(tmp.parent, ignore_errors=True)


_WRITER = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:32] or "host"  # this machine, in temp names


def _remove_stale(path: Path) -> None:
    """Remove what writers of `path` on this machine killed mid-write left beside it
    (`.NAME.HOST-PID.XXXXXXXX.tmp`, `.NAME.old-PID`), when that process is gone. A live writer's is left
    alone, as is anything written from another machine (a shared directory: its pids mean nothing here)
    or belonging to another target (`NAME.2.json`'s temporaries do not match `NAME`'s pattern)."""
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(?:{re.escape(_WRITER)}-(\d+)\.[a-z0-9_]{{8}}\.tmp"
                         rf"|old-(\d+))")
    try:
        entries = list(path.parent.iterdir())
    except OSError:
        return
    for entry in entries:
        m = pattern.fullmatch(entry.name)
        if m and not _alive(int(m.group(1) or m.group(2))):
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists (another user's), or cannot tell: keep
    return True


def normalize_permissions(path: str | os.PathLike) -> None:
    """Give `path` (and, for a directory, everything in it) the permissions a plain `open()` or `mkdir`
    would: 0o666 / 0o777 less the umask. Writers that go through a private temporary file (mkstemp,
    safetensors) leave 0600, which other users of a shared run directory cannot read."""
    mask = _umask()
    path = Path(path)
    paths = [path, *path.rglob("*")] if path.is_dir() else [path]
    for p in paths:
        if p.is_symlink() or not (p.is_file() or p.is_dir()):
            continue
        mode = p.stat().st_mode & 0o7777
        os.chmod(p, (mode | (0o777 if p.is_dir() else 0o666)) & ~mask)


def _umask() -> int:
    """The process umask, read without changing it where Linux shows it (os.umask can only swap it)."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        with open("/proc/self/status", encoding="ascii") as f:
            return int(next(line for line in f if line.startswith("Umask:")).split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux `renameat2(RENAME_EXCHANGE)`); False where that is unsupported."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None) if sys.platform == "linux" else None
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM):  # old kernel or file system
        return False
    raise OSError(err, os.strerror(err), str(b))


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write a text file atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write a JSON file atomically (pretty-printed)."""
    write_text_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def write_jsonl_atomic(path: str | os.PathLike, rows: Iterable[dict[str, Any]]) -> None:
    """Write a JSONL file atomically."""
    write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
