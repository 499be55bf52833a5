"""Tests for `onegen bench inference`: the plain-decoding baseline replays exactly what the engine fed,
the command writes every part, and the bench imports without the packages the GPU image lacks."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from onegen.bench import main as bench_main
from onegen.bench.onepass import BigIndex, PoolCorpus, prompt_text, replay, segments, texts
from onegen.bench.train import build_model
from onegen.data import Message
from onegen.engine import Engine
from onegen.model import OneGenModel


@pytest.fixture(scope="module")
def tiny() -> OneGenModel:
    m = build_model("1b-mini", "cpu", torch.float32, seed=0)
    return OneGenModel(m.hf_model, m.tokenizer, m.tokens, max_length=4096, doc_max_length=12).eval()


@pytest.mark.parametrize("fast", [True, False])
def test_replay_feeds_what_the_engine_fed(tiny, fast):
    index = BigIndex(500, tiny.hidden_size, "cpu", seed=1)
    engine = Engine(tiny, index, corpus=PoolCorpus(texts(8, 12, 2)), fast=fast)
    prompts = [prompt_text(tiny, 20 + 3 * i, seed=i) for i in range(3)]  # different phases
    res = engine.generate(prompts, max_new_tokens=[14, 9, 14], force_query_every=5, ignore_eos=True,
                          max_retrievals=2)
    assert {e.position for r in res for e in r.retrievals} and all(r.n_inserted for r in res)
    prompt_ids = [tiny.renderer.encode_prompt([Message("user", p)]) for p in prompts]
    for p, r in zip(prompt_ids, res, strict=True):
        parts = segments(p, r.token_ids, tiny.ids.open, tiny.ids.close)
        assert sum(parts, []) == p + r.token_ids[:-1]  # everything but the last token, in order
        assert len(parts) == 1 + r.n_generated - 1 + len(r.retrievals)  # paragraphs whole, tokens alone
    steps = replay(engine, prompt_ids, [r.token_ids for r in res])
    assert steps == engine.stats["forwards"]


def test_big_index_finds_its_own_rows():
    index = BigIndex(3000, 16, "cpu", seed=0, chunk_rows=1000)
    assert len(index.ids) == 3000 and index.bytes == 3000 * 16 * 4
    rows = index.backend.matrix[[5, 2999]]
    _, found = index.search_tensor(rows * 3.0, 1)
    assert found[:, 0].tolist() == [5, 2999]
    int8 = BigIndex(3000, 16, "cpu", backend="flat-int8", seed=0)
    assert int8.search_tensor(torch.randn(2, 16), 4)[1].shape == (2, 4)
    assert PoolCorpus(["a", "b"])["d3"].text == "b"


def test_bench_inference_writes_every_part(tmp_path):
    assert bench_main(["inference", "--engine", "both", "--batches", "1", "2", "--prompt-tokens", "12",
                       "--new-tokens", "10", "--every", "4", "--index-rows", "2000", "--query-lengths", "16",
                       "--answers", "6", "--retrievals", "1", "2", "--doc-tokens", "8", "--corpus-size", "12",
                       "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "inference.json").read_text())
    parts = {}
    for r in result["rows"]:
        parts.setdefault(r["part"], []).append(r)
    tp = {(r["engine"], r["batch"]): r for r in parts["throughput"]}
    assert tp.keys() == {("fast", 1), ("fast", 2), ("generic", 1), ("generic", 2)}
    assert all(r["searches"] >= 2 and r["tok_s"] > 0 and r["plain_s"] > 0 and r["ceiling_tok_s"] > 0
               for r in tp.values())
    assert [(r["query_tokens"] >= 16, r["new_tokens"], r["retrievals"]) for r in parts["latency"]] == \
        [(True, 6, 1), (True, 6, 2)]
    for r in parts["latency"]:  # every mode really retrieved; ratios and ideals are computed
        assert r["onegen_retrievals_done"] == r["reencode_retrievals_done"] == r["pipeline_retrievals_done"] \
            == r["retrievals"]
        assert 0 < r["reencode_ideal"] < 1 and 0 < r["pipeline_ideal"] < 1 and r["reencode_extra_ms"] > 0
    assert {r["mode"] for r in parts["memory"]} == {"onegen", "reencode", "pipeline"}
    assert "fast_b1_overhead" in result["summary"] and "memory_onegen_over_pipeline" in result["summary"]
    assert (tmp_path / "inference.png").stat().st_size > 0


def test_bench_imports_without_packages_the_gpu_image_lacks():
    """The GPU image has no faiss and no bm25s: `onegen bench` must not need them to start."""
    code = ("import sys\n"
            "for name in ('faiss', 'bm25s'): sys.modules[name] = None\n"
            "import onegen.bench.inference, onegen.bench.train, onegen.bench.index, onegen.commands\n"
            "from onegen.cli import main\n"
            "sys.exit(main(['bench', 'inference', '--help']))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "--index-rows" in out.stdout


def test_cli_index_max_tokens_and_generate_fast(tiny_model_dir, qa_world, tmp_path):
    """`onegen index --max-tokens` gives the default's vectors; `onegen generate --fast` the same predictions
    as `--no-fast` (the fast path runs eagerly on CPU)."""
    import numpy as np

    from onegen.cli import main

    base = ["index", "--model", str(tiny_model_dir), "--corpus", qa_world["corpus"]]
    assert main([*base, "--out", str(tmp_path / "a")]) == 0
    assert main([*base, "--out", str(tmp_path / "b"), "--max-tokens", "96"]) == 0
    a, b = (np.load(tmp_path / d / "vectors.npy") for d in "ab")
    np.testing.assert_allclose(a, b, atol=1e-5)
    with pytest.raises(SystemExit) as refused:  # checked when the arguments are parsed
        main([*base, "--out", str(tmp_path / "c"), "--max-tokens", "0"])
    assert refused.value.code == 2
    items = tmp_path / "eval.jsonl"
    items.write_text("".join(open(qa_world["eval"]).readlines()[:4]))
    preds = {}
    for flag in ("--fast", "--no-fast"):
        out = tmp_path / f"pred{flag}.jsonl"
        assert main(["generate", "--model", str(tiny_model_dir), "--index", str(tmp_path / "a"), "--input",
                     str(items), "--out", str(out), "--max-new-tokens", "12", flag]) == 0
        preds[flag] = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(preds["--fast"]) == 4
    assert [p["output"] for p in preds["--fast"]] == [p["output"] for p in preds["--no-fast"]]
    assert [[r["doc_ids"] for r in p["retrievals"]] for p in preds["--fast"]] == \
        [[r["doc_ids"] for r in p["retrievals"]] for p in preds["--no-fast"]]
