"""Crash safety of `onegen train`: SIGKILL mid-training and mid-checkpoint, then the same command again.

The killed process is a real `onegen train` subprocess. To make the kill land at a chosen point, the
test puts a `sitecustomize.py` (written here, in tmp_path: nothing in the library) on the child's
PYTHONPATH that pauses the child there and says so with a marker file; the test then sends SIGKILL.
The rerun must resume from the last complete checkpoint, ignore and remove the half-written one, and
end with the same weights as an uninterrupted run, bit for bit.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from onegen.config import TrainConfig
from onegen.trainer import CKPT_DIR, STATE_FILE, train

SCRATCH = {"architecture": "llama", "hidden_size": 64, "num_layers": 2, "num_heads": 4, "intermediate_size": 128}
MAX_STEPS, SAVE_EVERY = 6, 2

PAUSE_HOOK = '''
"""Test-only: pause `onegen train` at ONEGEN_TEST_PAUSE (objective:N or save_state:N) so the test can SIGKILL it."""
import os
import time
from pathlib import Path

_where, _, _n = os.environ["ONEGEN_TEST_PAUSE"].partition(":")
_marker = Path(os.environ["ONEGEN_TEST_MARKER"])


def _pause():
    _marker.write_text(str(os.getpid()))
    time.sleep(600)  # SIGKILL arrives here


if _where == "objective":  # the N-th loss computation: in the middle of optimizer step N
    import onegen.losses

    _real_call, _calls = onegen.losses.Objective.__call__, [0]

    def _call(self, *args, **kwargs):
        _calls[0] += 1
        if _calls[0] == int(_n):
            _pause()
        return _real_call(self, *args, **kwargs)

    onegen.losses.Objective.__call__ = _call
elif _where == "save_state":  # inside the checkpoint write of step N: every file half written
    import accelerate

    _real_save = accelerate.Accelerator.save_state

    def _save_state(self, output_dir=None, **kwargs):
        result = _real_save(self, output_dir, **kwargs)
        if Path(output_dir).name == f".step-{_n}.tmp":
            for f in Path(output_dir).rglob("*"):
                if f.is_file():
                    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
            _pause()
        return result

    accelerate.Accelerator.save_state = _save_state
'''


def _config(run_dir: Path, world: dict) -> dict:
    return {"model": {"scratch": SCRATCH}, "tokenizer": {"train": {"vocab_size": 600}},
            "data": {"train": world["train"], "corpus": world["corpus"], "max_length": 256},
            "loss": {"negatives": 2},
            "train": {"max_steps": MAX_STEPS, "save_every": SAVE_EVERY, "batch_size": 4, "lr": 1e-3,
                      "warmup_steps": 2, "progress": False, "precision": "no"},
            "output_dir": str(run_dir)}


@pytest.fixture(scope="module")
def reference(qa_world, tmp_path_factory) -> Path:
    """The uninterrupted run (in-process: the same code as the CLI's)."""
    return train(TrainConfig.from_dict(_config(tmp_path_factory.mktemp("ref") / "run", qa_world)))


def _onegen_train(config: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    exe = Path(sys.executable).with_name("onegen")
    return subprocess.Popen([str(exe), "train", "--config", str(config), "--no-progress"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})


def _kill_at(config: Path, pause: str, tmp_path: Path) -> None:
    """Start `onegen train`, wait until it pauses at `pause`, SIGKILL it."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(PAUSE_HOOK)
    marker = tmp_path / "paused"
    pythonpath = os.pathsep.join(p for p in (str(hook), os.environ.get("PYTHONPATH")) if p)
    proc = _onegen_train(config, {"PYTHONPATH": pythonpath, "ONEGEN_TEST_PAUSE": pause,
                                  "ONEGEN_TEST_MARKER": str(marker)})
    try:
        deadline = time.monotonic() + 180
        while not marker.exists():
            assert proc.poll() is None, f"onegen train ended before {pause}: {proc.communicate()[1]}"
            assert time.monotonic() < deadline, f"onegen train never reached {pause}"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def _resume(config: Path) -> None:
    proc = _onegen_train(config)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err


def _assert_bitwise_equal(a: Path, b: Path) -> None:
    wa, wb = load_file(str(a / "model" / "model.safetensors")), load_file(str(b / "model" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _checkpoints(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / CKPT_DIR).iterdir())


@pytest.mark.parametrize("pause, complete, partial", [
    ("objective:5", ["step-2", "step-4"], None),  # mid-training, in step 5
    ("save_state:4", ["step-2"], ".step-4.tmp"),  # inside the step-4 checkpoint write
], ids=["mid-training", "mid-checkpoint"])
def test_sigkill_then_resume_equals_uninterrupted(reference, qa_world, tmp_path, pause, complete, partial):
    run_dir = tmp_path / "run"
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(_config(run_dir, qa_world)))
    _kill_at(config, pause, tmp_path)

    # what the kill left: complete checkpoints, perhaps a half-written one, no final model
    left = _checkpoints(run_dir)
    assert [n for n in left if not n.startswith(".")] == complete
    assert all((run_dir / CKPT_DIR / n / STATE_FILE).is_file() for n in complete)
    if partial is not None:
        assert partial in left and not (run_dir / CKPT_DIR / partial / STATE_FILE).exists()
    assert not (run_dir / "model").exists()

    _resume(config)  # the same command again
    _assert_bitwise_equal(reference, run_dir)
    got, want = _metrics(run_dir), _metrics(reference)
    assert [r["step"] for r in got] == list(range(1, MAX_STEPS + 1))
    assert [(r["lm_loss"], r["retrieval_loss"], r["lr"]) for r in got] == \
           [(r["lm_loss"], r["retrieval_loss"], r["lr"]) for r in want]
    assert _checkpoints(run_dir) == ["step-4", "step-6"]  # the half-written one is gone
    assert not [p for p in run_dir.rglob(".*")]  # no temporary leftovers anywhere


def test_incomplete_checkpoints_are_ignored_and_removed(reference, qa_world, tmp_path):
    """A checkpoint directory without its state file (a kill while one was being removed or written) is
    never resumed from, and the run cleans it up."""
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    shutil.rmtree(run_dir / "model")
    ckpts = run_dir / CKPT_DIR
    shutil.copytree(ckpts / "step-6", ckpts / ".step-8.tmp")  # half-written: no state file yet
    (ckpts / ".step-8.tmp" / STATE_FILE).unlink()
    (ckpts / "step-6" / STATE_FILE).unlink()  # being deleted: the state file goes first
    cfg = _config(run_dir, qa_world)
    train(TrainConfig.from_dict(cfg))  # resumes from step 4, not from the incomplete step 6
    _assert_bitwise_equal(reference, run_dir)
    assert _checkpoints(run_dir) == ["step-4", "step-6"]
