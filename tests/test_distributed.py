"""`onegen train` under `torchrun --nproc_per_node 2` on CPU (gloo): completes, shards data, gathers
negatives across ranks, and writes one model."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from onegen.config import TrainConfig
from onegen.model import OneGenModel
from onegen.trainer import train


def _free_port() -> int:
    with socket.socket() as s:  # torchrun's --master_port 0 hangs; pick a free port instead
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_processes(qa_world, tmp_path):
    cfg = {
        "model": {"scratch": {"architecture": "llama", "hidden_size": 64, "num_layers": 2, "num_heads": 4}},
        "tokenizer": {"train": {"vocab_size": 600}},
        "data": {"train": qa_world["train"], "corpus": qa_world["corpus"], "max_length": 256},
        "loss": {"negatives": 2, "gather_across_ranks": True},
        "train": {"max_steps": 3, "batch_size": 4, "lr": 1e-3, "save_every": 2, "precision": "no",
                  "schedule": "linear", "warmup_steps": 0},
        "output_dir": str(tmp_path / "run"),
    }
    config_path = tmp_path / "c.yaml"
    config_path.write_text(yaml.safe_dump(cfg))
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [str(torchrun), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           "-m", "onegen.cli", "train", "--config", str(config_path), "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=env,
                            start_new_session=True)  # its own process group: a hang takes the workers down too
    try:
        _, stderr = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    assert proc.returncode == 0, stderr[-3000:]
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 3
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]  # written once, by the main process
    assert all(r["retrieval_loss"] > 0 for r in rows)
    assert (run / "checkpoints" / "step-2").is_dir()
    model = OneGenModel.from_pretrained(run / "model")
    assert model.embed_queries(["Who founded Velmora?"]).shape == (1, 64)
    # one process with the same global batch: the same learning-rate schedule (stepped once per step,
    # not once per process) and, at step 1 (same initial weights), the same LM loss (summed over ranks)
    single = {**cfg, "train": {**cfg["train"], "batch_size": 8}, "output_dir": str(tmp_path / "single")}
    one = train(TrainConfig.from_dict(single), progress=False)
    ref = [json.loads(line) for line in (one / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in rows] == pytest.approx([r["lr"] for r in ref]) == [1e-3, 1e-3 * 2 / 3, 1e-3 / 3]
    assert rows[0]["lm_loss"] == pytest.approx(ref[0]["lm_loss"], rel=1e-4)
