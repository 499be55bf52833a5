"""The run directory's persistence: checkpoints (atomic, resumable, damaged ones set aside) and the
metrics log (appended; a resume drops what came after its checkpoint).

Layout: `checkpoints/step-N/` (accelerate state + `trainer_state.json`, written as `.step-N.tmp` then
renamed: a directory without the state file is incomplete and removed), `metrics.jsonl`.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
from pathlib import Path

from .errors import OneGenError
from .io import normalize_permissions

log = logging.getLogger(__name__)

CKPT_DIR = "checkpoints"
STATE_FILE = "trainer_state.json"


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """The checkpoints with a state file, oldest first."""
    ckpts = [p for p in (run_dir / CKPT_DIR).glob("step-*")
             if p.name[5:].isdigit() and (p / STATE_FILE).is_file()]
    return sorted(ckpts, key=lambda p: int(p.name.split("-")[1]))


def resume(accelerator, run_dir: Path) -> int:
    """Load the newest checkpoint that can be read; returns its step (0: none, a fresh start).

    An unreadable one (truncated or corrupt files) is skipped with a warning and moved aside as
    `unreadable-step-N` (kept, never resumed from again) once an older one has loaded."""
    bad: list[tuple[Path, str]] = []
    for ckpt in reversed(complete_checkpoints(run_dir)):
        try:
            step = int(json.loads((ckpt / STATE_FILE).read_text())["step"])
            accelerator.load_state(str(ckpt))  # torch files are read with weights_only=True
        except Exception as e:  # whatever a damaged file raises, the checkpoint is unusable
            if isinstance(e, pickle.UnpicklingError) and "weights only" in str(e).lower():
                raise OneGenError("a checkpoint file holds objects other than tensors and is not unpickled; "
                                  "delete the checkpoint or set train.resume false", file=str(ckpt)) from None
            reason = " ".join(f"{type(e).__name__}: {e}".split())[:200]
            log.warning("checkpoint %s cannot be read (%s); trying the one before it", ckpt, reason)
            bad.append((ckpt, reason))
            continue
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            for path, _ in bad:
                _set_aside(path)
            log.warning("resuming from %s (step %d)", ckpt, step)
        return step
    if bad:
        raise OneGenError(f"none of the {len(bad)} checkpoints can be read (the newest: {bad[0][1]}); to start "
                          "over, delete "
                          f"{run_dir / CKPT_DIR} or set train.resume false (--train.resume false)",
                          file=str(bad[0][0]))
    return 0


def _set_aside(ckpt: Path) -> None:
    """Rename an unreadable checkpoint out of the `step-*` names (kept for inspection)."""
    target, n = ckpt.with_name(f"unreadable-{ckpt.name}"), 1
    while target.exists():
        n += 1
        target = ckpt.with_name(f"unreadable-{ckpt.name}-{n}")
    ckpt.rename(target)
    log.warning("moved the unreadable checkpoint %s to %s", ckpt, target)


def _remove_checkpoint(path: Path) -> None:
    """Delete a checkpoint, its state file first: one killed half-way never looks complete."""
    (path / STATE_FILE).unlink(missing_ok=True)
    shutil.rmtree(path, ignore_errors=True)


def remove_incomplete_checkpoints(run_dir: Path) -> None:
    """Remove what a killed run left half-written: `.step-N.tmp` dirs and checkpoints without a state file."""
    for p in (run_dir / CKPT_DIR).glob("*step-*"):
        if p.is_dir() and (p.name.startswith(".") or not (p / STATE_FILE).is_file()):
            log.info("removing incomplete checkpoint %s", p)
            shutil.rmtree(p, ignore_errors=True)


def load_history(path: Path, upto: int) -> list[dict]:
    """The records of steps up to `upto`; a line a killed run left half-written is skipped."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return [r for r in rows if isinstance(r, dict) and isinstance(r.get("step"), int) and r["step"] <= upto]


def append_records(path: Path, history: list[dict], logged: int, sync: bool) -> int:
    """Append the records not yet in the file (a log grows by its new lines, not rewritten whole: that
    was O(steps) per write); `sync` at checkpoints, so the log holds every step a resume starts after.
    Returns how many records the file holds."""
    if logged < len(history):
        with open(path, "a", encoding="utf-8") as f:
            f.write("".join(json.dumps(r) + "\n" for r in history[logged:]))
            f.flush()
            if sync:
                os.fsync(f.fileno())
    return len(history)


def save_checkpoint(accelerator, run_dir: Path, step: int, keep: int) -> None:
    """Save the full training state into `checkpoints/step-N`, atomically (temp dir, then rename)."""
    final = run_dir / CKPT_DIR / f"step-{step}"
    tmp = run_dir / CKPT_DIR / f".step-{step}.tmp"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps({"step": step}))
        normalize_permissions(tmp)  # safetensors writes its files 0600
        if final.exists():
            _remove_checkpoint(final)
        tmp.rename(final)
        for old in complete_checkpoints(run_dir)[:-keep] if keep > 0 else []:
            _remove_checkpoint(old)
    accelerator.wait_for_everyone()
