"""Tests for onegen.bench: the two training steps compute the same loss and gradients (so the benchmark
compares equal work), the synthetic batch has the recipe's shape, and each bench command writes its files."""

from __future__ import annotations

import json
from functools import partial

import pytest
import torch

from onegen.bench import main as bench_main
from onegen.bench.index import doc_lengths
from onegen.bench.train import PAPER_BATCH, build_model, collate, make_batch, naive_loss, onegen_loss
from onegen.config import LossConfig
from onegen.hfparts import set_checkpointing

LOSS = LossConfig(negatives=PAPER_BATCH["negatives"], in_batch_negatives=False)


@pytest.fixture(scope="module")
def mini():
    return build_model("1b-mini", "cpu", torch.float32, seed=0).train()


def test_batch_has_the_recipe_shape(mini):
    batch = make_batch(mini, scale=0.1, seed=3)
    assert len(batch.answers) == 2 and all(len(a.ret_positions) == 2 for a in batch.answers)
    assert len(batch.docs) == 2 * 2 * 7 and all(d[-1] == mini.ids.doc for d in batch.docs.values())
    assert all(30 <= len(a) <= 90 for a in batch.answers) and all(4 <= len(d) <= 20 for d in batch.docs.values())
    assert batch.max_length == 120
    assert all(a.input_ids[p] == mini.ids.query for a in batch.answers for p in a.ret_positions)
    collated = collate(mini, batch, LOSS)
    assert collated["doc_input_ids"].shape[0] == 28 and collated["doc_input_ids"].shape[1] < batch.max_length


@pytest.mark.parametrize("checkpointing", [False, True])
def test_naive_and_onegen_steps_compute_the_same_loss_and_gradients(mini, checkpointing):
    batch = make_batch(mini, scale=0.05, seed=1)
    if checkpointing:
        set_checkpointing(mini.hf_model, True)
    try:
        grads = []
        for step in (naive_loss, partial(onegen_loss, pack=False), onegen_loss):  # paper, per-kind padding, packed
            mini.zero_grad(set_to_none=True)
            loss = step(mini, batch, LOSS)
            loss.backward()
            grads.append((loss.detach(), {n: p.grad.clone() for n, p in mini.named_parameters()}))
    finally:
        set_checkpointing(mini.hf_model, False)
    (l1, g1), *others = grads
    assert l1 > 1.0  # a real loss (CE over a 2048 vocabulary + InfoNCE), not zero
    for l2, g2 in others:
        torch.testing.assert_close(l1, l2, rtol=1e-5, atol=1e-5)
        assert g1.keys() == g2.keys()
        for name in g1:  # InfoNCE at temperature 0.02 amplifies rounding: compare relative to the gradient's norm
            assert (g1[name] - g2[name]).norm() <= 1e-4 * g1[name].norm(), name


def test_doc_lengths_are_long_tailed_and_clipped():
    lengths = doc_lengths(4000, 1.0, seed=0)
    assert min(lengths) == 16 and max(lengths) == 1024
    assert sorted(lengths)[2000] < sum(lengths) / len(lengths)  # mean above median: a long right tail


def test_bench_train_and_index_write_their_files(tmp_path):
    assert bench_main(["train", "--models", "1b-mini", "--scale", "0.04", "--checkpointing", "0",
                       "--repeats", "1", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "train.json").read_text())
    (row,) = result["rows"]
    assert row["naive_tok_s"] > 0 and row["onegen_tok_s"] > 0 and row["loss_diff"] < 1e-4
    assert row["padded_tokens_naive"] > row["real_tokens"]
    assert bench_main(["index", "--docs", "30", "--scale", "0.05", "--rows", "3000", "--dim", "32",
                       "--max-tokens", "256", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "index.json").read_text())
    embed = {r["method"]: r for r in result["rows"] if r["part"] == "embed"}
    assert embed.keys() == {"naive", "sorted", "budget"}
    assert all(r["max_abs_diff_vs_naive"] < 1e-4 for r in embed.values())
    search = [r for r in result["rows"] if r["part"] == "search"]
    assert [r["method"] for r in search] == ["flat", "flat-int8"] and search[0]["recall"] == 1.0
    assert (tmp_path / "train.png").stat().st_size > 0 and (tmp_path / "index.png").stat().st_size > 0


def test_unknown_bench_is_refused(capsys):
    assert bench_main(["nothing"]) == 2


def test_generic_cache_script_runs_and_its_variants_agree(tmp_path):
    """benchmarks/bench_generic_cache.py (a script, not under `onegen bench`): it still runs against the
    current modules, and its three cache variants give the same tokens."""
    import json
    import runpy
    import sys
    from pathlib import Path

    script = Path(__file__).parents[1] / "benchmarks" / "bench_generic_cache.py"
    argv = sys.argv
    sys.argv = [str(script), "--batches", "2", "--new-tokens", "16", "--every", "8", "--repeats", "1",
                "--out", str(tmp_path)]
    try:
        with pytest.raises(SystemExit) as done:
            runpy.run_path(str(script), run_name="__main__")
    finally:
        sys.argv = argv
    assert done.value.code in (0, None)
    rows = json.loads((tmp_path / "generic_cache.json").read_text())["rows"]
    assert len(rows) == 3 and all(r["same_tokens"] for r in rows)
