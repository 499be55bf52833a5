"""Tests of the training loop (onegen.trainer) and `onegen train`: resume, accumulation, falling losses,
bad input through the CLI, the run directory's files, and tiny checkpoints of many architectures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conftest import write_jsonl
from safetensors.torch import load_file

from onegen.cli import main
from onegen.config import TrainConfig
from onegen.trainer import CKPT_DIR, train

SCRATCH = {"architecture": "llama", "hidden_size": 64, "num_layers": 2, "num_heads": 4, "intermediate_size": 128}


def _config(tmp_path: Path, world: dict, name: str = "run", **sections: Any) -> dict:
    """A from-scratch training config (as a dict) with `sections` merged over the defaults."""
    cfg: dict[str, Any] = {
        "model": {"scratch": SCRATCH},
        "tokenizer": {"train": {"vocab_size": 600}},
        "data": {"train": world["train"], "corpus": world["corpus"], "max_length": 256},
        "loss": {"negatives": 2},
        "train": {"max_steps": 3, "batch_size": 4, "lr": 1e-3, "progress": False, "precision": "no"},
        "output_dir": str(tmp_path / name),
    }
    for key, value in sections.items():
        if isinstance(value, dict):
            cfg[key] = {**cfg.get(key, {}), **value}
        else:
            cfg[key] = value
    return cfg


def _write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def _run(cfg: dict) -> Path:
    return train(TrainConfig.from_dict(cfg))


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "model" / "model.safetensors"))


def _assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=k)


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# -- (a) exact resume ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def six_steps(qa_world, tmp_path_factory) -> Path:
    """The uninterrupted reference: 6 steps, a checkpoint every 3, cosine schedule with warmup."""
    tmp = tmp_path_factory.mktemp("six")
    return _run(_config(tmp, qa_world, train={"max_steps": 6, "save_every": 3, "warmup_steps": 2}))


def test_resume_after_interruption_equals_uninterrupted(six_steps, qa_world, tmp_path, monkeypatch):
    cfg = _config(tmp_path, qa_world, train={"max_steps": 6, "save_every": 3, "warmup_steps": 2})
    import onegen.trainer as train_module

    calls = {"n": 0}
    real = train_module.Objective.__call__

    def crash_in_step_5(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt  # as if the machine went away in step 5
        return real(self, *args, **kwargs)

    monkeypatch.setattr(train_module.Objective, "__call__", crash_in_step_5)
    with pytest.raises(KeyboardInterrupt):
        _run(cfg)
    monkeypatch.undo()
    run_dir = Path(cfg["output_dir"])
    assert (run_dir / CKPT_DIR / "step-3").is_dir() and not (run_dir / "model").exists()
    assert [r["step"] for r in _metrics(run_dir)] == [1, 2, 3]  # flushed with the checkpoint
    _run(cfg)  # the same command again: resumes from step 3
    _assert_same_weights(_weights(six_steps), _weights(run_dir))
    assert [r["step"] for r in _metrics(run_dir)] == [1, 2, 3, 4, 5, 6]
    assert [r["lr"] for r in _metrics(run_dir)] == pytest.approx([r["lr"] for r in _metrics(six_steps)])


def test_continue_with_more_steps_equals_uninterrupted(qa_world, tmp_path):
    """max_steps 3 (checkpointed at its last step), then max_steps 6 in the same run directory."""
    steady = {"save_every": 3, "schedule": "constant"}  # a schedule that does not depend on max_steps
    a = _run(_config(tmp_path, qa_world, name="a", train={**steady, "max_steps": 6}))
    b = _config(tmp_path, qa_world, name="b", train={**steady, "max_steps": 3})
    _run(b)
    assert (Path(b["output_dir"]) / CKPT_DIR / "step-3").is_dir()
    b["train"]["max_steps"] = 6
    _run(b)
    _assert_same_weights(_weights(a), _weights(Path(b["output_dir"])))
    ckpts = sorted(p.name for p in (Path(b["output_dir"]) / CKPT_DIR).iterdir())
    assert ckpts == ["step-3", "step-6"]  # keep_checkpoints: 2, no temporary leftovers


def test_resume_false_starts_over(six_steps, qa_world, tmp_path):
    import shutil

    run_dir = tmp_path / "copy"
    shutil.copytree(six_steps, run_dir)
    cfg = _config(tmp_path, qa_world, name="copy", train={"max_steps": 6, "save_every": 3, "warmup_steps": 2,
                                                          "resume": False})
    _run(cfg)
    _assert_same_weights(_weights(six_steps), _weights(run_dir))  # same seed, from scratch: same result
    assert [r["step"] for r in _metrics(run_dir)] == [1, 2, 3, 4, 5, 6]


# -- (b) gradient accumulation -------------------------------------------------------------------

@pytest.fixture
def sgd(monkeypatch):
    """Plain SGD instead of AdamW: Adam's update is invariant to the gradient's scale, so comparing
    weights after Adam steps would not notice a wrongly normalised gradient; SGD moves by lr * grad."""
    monkeypatch.setattr(torch.optim, "AdamW", lambda params, lr, weight_decay=0.0: torch.optim.SGD(params, lr=lr))


def test_grad_accumulation_4x2_equals_1x8(qa_world, tmp_path, sgd):
    # every query keeps the same candidates however the step is split: only its own 2 hard negatives
    rows = [json.loads(line) for line in Path(qa_world["train"]).read_text().splitlines()]
    for r in rows:
        r["retrievals"][0]["negatives"] = r["retrievals"][0]["negatives"][:2]
    train_file = write_jsonl(tmp_path / "train.jsonl", rows)
    common = {"data": {"train": str(train_file)}, "loss": {"negatives": 2, "in_batch_negatives": False}}
    step = {"max_steps": 2, "batch_size": 8, "lr": 0.05, "max_grad_norm": None, "schedule": "constant"}
    one = _run(_config(tmp_path, qa_world, name="1x8", **common, train={**step, "grad_accum": 1}))
    four = _run(_config(tmp_path, qa_world, name="4x2", **common, train={**step, "grad_accum": 4}))
    _assert_same_weights(_weights(one), _weights(four), atol=2e-5)  # a per-micro-batch mean: ~4e-3 off
    for a, b in zip(_metrics(one), _metrics(four), strict=True):
        assert a["lm_loss"] == pytest.approx(b["lm_loss"], rel=1e-5)
        assert a["retrieval_loss"] == pytest.approx(b["retrieval_loss"], rel=1e-4, abs=1e-5)
        assert a["retrieval_acc"] == b["retrieval_acc"]


# -- (c) the losses fall -------------------------------------------------------------------------

def _falls(rows: list[dict], key: str, n: int = 5) -> tuple[float, float]:
    first = sum(r[key] for r in rows[:n]) / n
    last = sum(r[key] for r in rows[-n:]) / n
    return first, last


def test_losses_fall(qa_world, tmp_path):
    cfg = _config(tmp_path, qa_world, train={"max_steps": 40, "batch_size": 16, "lr": 3e-3, "log_every": 1,
                                             "warmup_steps": 4})
    rows = _metrics(_run(cfg))
    assert len(rows) == 40
    lm_first, lm_last = _falls(rows, "lm_loss")
    ret_first, ret_last = _falls(rows, "retrieval_loss")
    assert lm_last < 0.7 * lm_first, (lm_first, lm_last)
    assert ret_last < 0.8 * ret_first, (ret_first, ret_last)


@pytest.mark.slow
def test_losses_fall_and_held_out_retrieval_beats_chance(tmp_path):
    """A few hundred steps on a generated world; recall@1 of [RQ] vectors on held-out questions."""
    from onegen.data import read_corpus, read_qa_items
    from onegen.model import OneGenModel
    from onegen.synth import synth

    world = synth("qa", tmp_path / "world", seed=1, size=200)
    cfg = _config(tmp_path, world, data={"max_length": 256}, loss={"negatives": 4, "temperature": 0.05},
                  tokenizer={"train": {"vocab_size": 1000}},
                  model={"scratch": {**SCRATCH, "hidden_size": 128, "intermediate_size": 256}},
                  train={"max_steps": 300, "batch_size": 16, "lr": 2e-3, "log_every": 10, "warmup_steps": 20})
    run_dir = _run(cfg)
    rows = _metrics(run_dir)
    lm_first, lm_last = _falls(rows, "lm_loss", 20)
    ret_first, ret_last = _falls(rows, "retrieval_loss", 20)
    assert lm_last < 0.5 * lm_first and ret_last < 0.5 * ret_first
    model = OneGenModel.from_pretrained(run_dir / "model")
    corpus = read_corpus(world["corpus"])
    items = read_qa_items(world["eval"], corpus)
    docs = torch.nn.functional.normalize(model.embed_documents([d.text for d in corpus.docs]), dim=-1)
    queries = torch.nn.functional.normalize(model.embed_queries([i.question for i in items]), dim=-1)
    best = (queries @ docs.T).argmax(-1)
    recall = sum(corpus.ids[int(b)] in i.gold_docs[0] for b, i in zip(best, items, strict=True)) / len(items)
    chance = 1 / len(corpus)
    print(f"\nheld-out recall@1 = {recall:.3f} over {len(items)} questions (chance {chance:.3f}); "
          f"lm loss {lm_first:.2f} -> {lm_last:.2f}, retrieval loss {ret_first:.2f} -> {ret_last:.2f}")
    assert recall > 0.15 and recall > 20 * chance  # measured: 0.38 over 94 questions


# -- (d) bad input through the CLI ---------------------------------------------------------------

SAMPLE = {"id": "q1", "messages": [{"role": "user", "content": "Who founded Velmora?"},
                                   {"role": "assistant", "content": "[RQ]<paragraph>Velmora was founded by Ilsa "
                                                                    "Brandt in 1901.</paragraph>Ilsa Brandt"}],
          "retrievals": [{"positives": ["d1"]}]}
CORPUS = [{"id": "d1", "text": "Velmora was founded by Ilsa Brandt in 1901."}, {"id": "d2", "text": "Other."}]


def _bad_case(tmp_path: Path, case: str) -> tuple[Path, str, dict]:
    """(config path, the where-string the error must name, extra config) for one kind of bad input."""
    train_rows: list[Any] = [SAMPLE, {**SAMPLE, "id": "q2"}, {**SAMPLE, "id": "q3"}]
    extra: dict[str, Any] = {}
    where_line = 2
    if case == "malformed_json":
        train_rows[1] = '{"id": "q2", "messages": [}'
    elif case == "count_mismatch":
        train_rows[1] = {**SAMPLE, "id": "q2", "retrievals": [{"positives": ["d1"]}, {"positives": ["d2"]}]}
    elif case == "unknown_doc":
        train_rows[1] = {**SAMPLE, "id": "q2", "retrievals": [{"positives": ["d404"]}]}
    elif case == "empty":
        train_rows, where_line = [], 0
    elif case == "truncation":
        extra = {"data": {"max_length": 12, "on_truncation": "error"}}
        where_line = 1
    train_file = write_jsonl(tmp_path / "train.jsonl", train_rows)
    write_jsonl(tmp_path / "corpus.jsonl", CORPUS)
    world = {"train": "train.jsonl", "corpus": "corpus.jsonl"}
    cfg = _config(tmp_path, world, name="runs/bad", tokenizer={"train": {"vocab_size": 300}}, **extra)
    cfg["output_dir"] = "runs/bad"  # relative: resolved against the config file
    where = f"{train_file}:{where_line}" if where_line else str(train_file)
    return _write_config(tmp_path / "bad.yaml", cfg), where, cfg


BAD_CASES = ["malformed_json", "count_mismatch", "unknown_doc", "empty", "truncation"]


@pytest.mark.parametrize("case", BAD_CASES)
def test_cli_bad_input_one_line_exit_2_no_run_dir(tmp_path, capsys, case):
    config_path, where, _ = _bad_case(tmp_path, case)
    rc = main(["train", "--config", str(config_path), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.startswith("onegen train: error: ") and "\n" not in err, err
    assert where in err, err
    if case == "truncation":  # every sample it would cut is named in the one error, not the first alone
        assert "samples in all" in err and where.replace(":1", ":2") in err, err
    assert not (tmp_path / "runs").exists()


def test_cli_bad_input_subprocess_no_traceback(tmp_path):
    config_path, where, _ = _bad_case(tmp_path, "count_mismatch")
    onegen = Path(sys.executable).with_name("onegen")
    proc = subprocess.run([str(onegen), "train", "--config", str(config_path)], capture_output=True, text=True,
                          cwd=tmp_path, timeout=120, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "train.jsonl:2" in lines[0] and "retrievals" in lines[0]
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("args, needle", [
    (["--train.lrr", "1"], "train.lrr"),
    (["--train.batch_size", "many"], "train.batch_size"),
    (["--loss.type", "hinge"], "loss.type"),
])
def test_cli_bad_config_override(tmp_path, capsys, qa_world, args, needle):
    path = _write_config(tmp_path / "c.yaml", _config(tmp_path, qa_world))
    assert main(["train", "--config", str(path), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "\n" not in err
    assert not (tmp_path / "run").exists()


# -- (e) the run directory -----------------------------------------------------------------------

def test_run_directory_files(tmp_path, qa_world, capsys):
    path = _write_config(tmp_path / "c.yaml", _config(tmp_path, qa_world))
    assert main(["train", "--config", str(path), "--no-progress", "--train.max_steps", "4",
                 "--train.log_every", "2", "--train.save_every", "2"]) == 0
    assert "run directory" in capsys.readouterr().out
    run = tmp_path / "run"
    rows = _metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for r in rows:
        for key in ("lm_loss", "retrieval_loss", "retrieval_acc", "lr", "tokens_per_s"):
            assert isinstance(r[key], float) and r[key] == r[key], key  # present, a number, not NaN
        assert 0.0 <= r["retrieval_acc"] <= 1.0 and r["tokens_per_s"] > 0
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = TrainConfig.from_yaml(run / "config.yaml")
    assert saved.train.max_steps == 4 and saved.train.save_every == 2  # the resolved config, overrides in
    meta = json.loads((run / "model" / "onegen.json").read_text())
    assert meta["tokens"]["query"] == "[RQ]" and meta["lora"] is False
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        assert (run / "model" / name).is_file(), name
    assert (run / "tokenizer" / "tokenizer.json").is_file()
    assert json.loads((run / "summary.json").read_text())["steps"] == 4
    assert sorted(p.name for p in (run / CKPT_DIR).iterdir()) == ["step-2", "step-4"]
    assert not [p for p in run.rglob(".*")]  # no temporary leftovers


def test_train_twice_in_one_process_with_other_precisions(tmp_path, qa_world):
    """accelerate keeps one state per process; a second run with another precision must still start."""
    for precision in ("bf16", "no"):
        path = _write_config(tmp_path / f"{precision}.yaml", _config(tmp_path / precision, qa_world))
        assert main(["train", "--config", str(path), "--no-progress", "--train.max_steps", "1",
                     "--train.precision", precision]) == 0
        assert (tmp_path / precision / "run" / "model" / "onegen.json").is_file()


def test_lora_run_saves_adapter(tmp_path, qa_world, tiny_model_dir):
    """LoRA on a pretrained OneGen model through the trainer; the saved adapter reloads."""
    from onegen.model import OneGenModel

    cfg = _config(tmp_path, qa_world, model={"name_or_path": str(tiny_model_dir)}, tokenizer={},
                  train={"lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}, "lr": 1e-2})
    cfg["model"].pop("scratch")
    run = _run(cfg)
    meta = json.loads((run / "model" / "onegen.json").read_text())
    assert meta["lora"] is True and (run / "model" / "adapter_config.json").is_file()
    assert OneGenModel.from_pretrained(run / "model").is_lora


# -- (f) tiny random checkpoints of many architectures -------------------------------------------

ARCHITECTURES = ["llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "phi3", "gpt2", "gpt_neox", "olmo",
                 "smollm3"]


@pytest.fixture(scope="module")
def plain_tokenizer(plain_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(plain_tokenizer_dir))


def _tiny_checkpoint(model_type: str, tokenizer, out: Path) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(
        model_type, vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=128, head_dim=16, max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return out


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_tiny_checkpoints_train_through_cli(model_type, plain_tokenizer, qa_world, tmp_path, capsys):
    from onegen.model import OneGenModel

    ckpt = _tiny_checkpoint(model_type, plain_tokenizer, tmp_path / model_type)
    cfg = _config(tmp_path, qa_world, model={"name_or_path": str(ckpt)}, tokenizer={},
                  train={"max_steps": 2, "batch_size": 4})
    cfg["model"].pop("scratch")
    path = _write_config(tmp_path / "c.yaml", cfg)
    assert main(["train", "--config", str(path), "--no-progress"]) == 0, capsys.readouterr().err
    rows = _metrics(tmp_path / "run")
    assert len(rows) == 2 and all(r["lm_loss"] > 0 and r["retrieval_loss"] > 0 for r in rows)
    model = OneGenModel.from_pretrained(tmp_path / "run" / "model")
    assert model.head_isolated, "the LM head should be found (no full-vocabulary forward)"
    assert len(model.tokenizer) == len(plain_tokenizer) + 4  # [RQ], [RD], <paragraph>, </paragraph>
    vecs = model.embed_queries(["Who founded Velmora?"])
    assert vecs.shape == (1, 64) and torch.isfinite(vecs).all()


def test_public_train_is_the_function_after_any_import():
    import onegen
    import onegen.trainer  # noqa: F401  (importing the module must not shadow the API)

    assert callable(onegen.train) and onegen.train is onegen.trainer.train
    assert onegen.TrainConfig is not None and onegen.Index is not None and onegen.Engine is not None


def test_a_half_written_metrics_line_is_skipped_on_resume(tmp_path):
    from onegen.rundir import append_records, load_history

    path = tmp_path / "metrics.jsonl"
    records = [{"step": s, "lm_loss": 1.0 / s} for s in (1, 2, 3)]
    assert append_records(path, records[:2], 0, sync=True) == 2
    assert append_records(path, records, 2, sync=False) == 3  # only step 3 is appended
    assert load_history(path, 2) == records[:2]
    with open(path, "a") as f:
        f.write('{"step": 4, "lm_lo')  # killed mid-write
    assert load_history(path, 10) == records
