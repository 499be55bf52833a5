"""Index.build batching and sharding: a token-budget build equals the default one, and `onegen index`
under `torchrun --nproc_per_node 2` (gloo on CPU) embeds a strided shard per rank, gathers the vectors
in corpus order and writes the index once, equal to a one-process build."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import torch

from onegen.index import Index
from onegen.model import OneGenModel
from onegen.sharding import process_group


def _free_port() -> int:
    with socket.socket() as s:  # torchrun's --master_port 0 hangs; pick a free port instead
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sharded_build_equals_single_process(tiny_model_dir, qa_world, corpus, tmp_path):
    out = tmp_path / "idx"
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [str(torchrun), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           "-m", "onegen.cli", "index", "--model", str(tiny_model_dir), "--corpus", qa_world["corpus"],
           "--out", str(out), "--batch-size", "3"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=env,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    assert proc.returncode == 0, stderr[-3000:]
    assert stdout.count("indexed") == 1  # one rank wrote and reported it
    sharded = Index.load(out)
    model = OneGenModel.from_pretrained(tiny_model_dir)
    single = Index.build(model, corpus, progress=False, batch_size=7)
    assert sharded.ids == single.ids == corpus.ids
    torch.testing.assert_close(sharded.vectors, single.vectors, atol=1e-5, rtol=1e-5)
    sharded.check_model(model)


def test_without_torchrun_the_build_is_one_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with process_group() as (rank, world):
        assert (rank, world) == (0, 1)


def test_token_budget_build_equals_default_build(tiny_model, corpus):
    default = Index.build(tiny_model, corpus, progress=False)
    budget = Index.build(tiny_model, corpus, progress=False, max_tokens=64)
    assert budget.ids == default.ids
    torch.testing.assert_close(budget.vectors, default.vectors, atol=1e-5, rtol=1e-5)
