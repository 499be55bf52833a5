"""Tests of onegen.config: YAML load, dotted overrides, errors that name the key, path resolution."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from onegen.config import TrainConfig
from onegen.configfile import apply_overrides
from onegen.errors import OneGenError

BASE = """\
model:
  scratch: {architecture: llama, hidden_size: 64, num_layers: 2, num_heads: 4}
tokenizer:
  train: {vocab_size: 500}
data:
  train: data/train.jsonl
  corpus: data/corpus.jsonl
loss: {type: bpr, temperature: 0.05}
train: {max_steps: 20, batch_size: 4, lr: 1.0e-3}
output_dir: runs/r1
"""


@pytest.fixture
def config_dir(tmp_path: Path) -> Path:
    d = tmp_path / "project"
    (d / "data").mkdir(parents=True)
    (d / "data" / "train.jsonl").write_text("{}\n")
    (d / "data" / "corpus.jsonl").write_text("{}\n")
    (d / "c.yaml").write_text(BASE)
    return d


@pytest.fixture
def elsewhere(tmp_path: Path, monkeypatch) -> Path:
    """Run from a directory that is not the config's, so resolution against the file is visible."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return cwd


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_yaml_load_sections(config_dir, elsewhere):
    c = TrainConfig.from_yaml(config_dir / "c.yaml")
    assert c.model.scratch is not None and c.model.scratch.hidden_size == 64
    assert c.tokenizer.train is not None and c.tokenizer.train.vocab_size == 500
    assert c.loss.type == "bpr" and c.loss.temperature == pytest.approx(0.05)
    assert c.train.max_steps == 20 and c.train.lr == pytest.approx(1e-3)
    assert c.train.lora is None and c.data.format == "native"  # defaults kept
    c.validate_for_training()


def test_relative_paths_resolve_against_config_file(config_dir, elsewhere):
    c = TrainConfig.from_yaml(config_dir / "c.yaml")
    assert Path(c.data.train).resolve() == (config_dir / "data" / "train.jsonl").resolve()
    assert Path(c.data.corpus).resolve() == (config_dir / "data" / "corpus.jsonl").resolve()
    assert Path(c.output_dir).resolve() == (config_dir / "runs" / "r1").resolve()


def test_absolute_paths_kept(config_dir, elsewhere, tmp_path):
    target = tmp_path / "abs.jsonl"
    target.write_text("{}\n")
    c = TrainConfig.from_yaml(config_dir / "c.yaml", ["--data.train", str(target)])
    assert c.data.train == str(target)


@pytest.mark.parametrize("overrides", [
    ["--train.lr", "1e-4", "--train.batch_size", "2"],
    ["train.lr=1e-4", "train.batch_size=2"],
    ["--train.lr=1e-4", "--train.batch_size=2"],
])
def test_dotted_overrides(config_dir, elsewhere, overrides):
    c = TrainConfig.from_yaml(config_dir / "c.yaml", overrides)
    assert c.train.lr == pytest.approx(1e-4)  # "1e-4" is a string to PyYAML; the float field takes it
    assert isinstance(c.train.lr, float)
    assert c.train.batch_size == 2
    assert c.train.max_steps == 20  # untouched keys survive


def test_override_creates_nested_sections(config_dir, elsewhere):
    c = TrainConfig.from_yaml(config_dir / "c.yaml", ["--train.lora.r", "4", "--loss.in_batch_negatives", "false",
                                                      "--data.on_truncation", "drop"])
    assert c.train.lora is not None and c.train.lora.r == 4 and c.train.lora.alpha == 32
    assert c.loss.in_batch_negatives is False
    assert c.data.on_truncation == "drop"


def test_override_without_value_is_an_error():
    with pytest.raises(OneGenError, match="train.lr"):
        apply_overrides({}, ["--train.lr"])


def test_exponent_floats_in_yaml(tmp_path):
    c = TrainConfig.from_yaml(_write(tmp_path, "train: {lr: 3e-5, max_grad_norm: 1}\nloss: {temperature: 2e-2}\n"))
    assert c.train.lr == pytest.approx(3e-5) and c.loss.temperature == pytest.approx(0.02)
    assert c.train.max_grad_norm == 1.0


@pytest.mark.parametrize("text, key", [
    ("train: {lrr: 0.1}\n", "train.lrr"),
    ("tokenizer: {train: {vocab: 10}}\n", "tokenizer.train.vocab"),
    ("bogus: 1\n", "bogus"),
])
def test_unknown_key_named(tmp_path, text, key):
    path = _write(tmp_path, text)
    with pytest.raises(OneGenError) as e:
        TrainConfig.from_yaml(path)
    assert e.value.field == key
    assert key in str(e.value) and str(path) in str(e.value)


def test_unknown_key_in_override_named(config_dir):
    with pytest.raises(OneGenError) as e:
        TrainConfig.from_yaml(config_dir / "c.yaml", ["--train.batchsize", "3"])
    assert "train.batchsize" in str(e.value)


@pytest.mark.parametrize("text, key", [
    ("train: {batch_size: eight}\n", "train.batch_size"),
    ("train: {batch_size: 2.5}\n", "train.batch_size"),
    ("train: {lr: fast}\n", "train.lr"),
    ("train: {resume: 3}\n", "train.resume"),
    ("loss: {temperature: true}\n", "loss.temperature"),
    ("data: {train: 5}\n", "data.train"),
    ("model: {scratch: 3}\n", "model.scratch"),
    ("loss: {type: hinge}\n", "loss.type"),
    ("data: {on_truncation: cut}\n", "data.on_truncation"),
    ("loss: {temperature: 0}\n", "loss.temperature"),
    ("train: {batch_size: 8, grad_accum: 3}\n", "train.grad_accum"),
])
def test_bad_value_named(tmp_path, text, key):
    with pytest.raises(OneGenError) as e:
        TrainConfig.from_yaml(_write(tmp_path, text))
    assert e.value.field == key
    assert key in str(e.value)


def test_malformed_yaml_names_file_and_line(tmp_path):
    path = _write(tmp_path, "train:\n  lr: 0.1\n  batch_size: [1, 2\n")
    with pytest.raises(OneGenError) as e:
        TrainConfig.from_yaml(path)
    assert e.value.file == str(path) and e.value.line is not None


def test_missing_config_file(tmp_path):
    with pytest.raises(OneGenError, match="not found"):
        TrainConfig.from_yaml(tmp_path / "nope.yaml")


@pytest.mark.parametrize("text, key", [
    ("data: {train: x.jsonl}\n", "output_dir"),
    ("output_dir: r\n", "data.train"),
    ("output_dir: r\ndata: {train: x.jsonl}\n", "model"),
    ("output_dir: r\ndata: {train: x.jsonl}\nmodel: {scratch: {}}\n", "tokenizer"),
    ("output_dir: r\ndata: {train: x.jsonl}\nmodel: {scratch: {}}\ntokenizer: {train: {}}\ntrain: {lora: {r: 4}}\n",
     "train.lora"),  # a LoRA adapter of random weights could not be reloaded
])
def test_validate_for_training_names_missing_key(tmp_path, text, key):
    c = TrainConfig.from_yaml(_write(tmp_path, text))
    with pytest.raises(OneGenError) as e:
        c.validate_for_training()
    assert e.value.field == key


def test_saved_config_round_trips(config_dir, tmp_path):
    c = TrainConfig.from_yaml(config_dir / "c.yaml", ["--train.lora.r", "8"])
    c.save(tmp_path / "saved.yaml")
    again = TrainConfig.from_yaml(tmp_path / "saved.yaml")
    assert again.to_dict() == c.to_dict()
    assert yaml.safe_load((tmp_path / "saved.yaml").read_text())["train"]["lora"]["r"] == 8


def test_yaml_booleans_are_only_true_and_false(tmp_path):
    """`precision: no` (a documented value) must stay the string "no", in files and in overrides."""
    from onegen.config import TrainConfig

    path = tmp_path / "c.yaml"
    path.write_text("data: {train: t.jsonl}\ntrain: {precision: no, resume: false}\noutput_dir: run\n")
    cfg = TrainConfig.from_yaml(path)
    assert cfg.train.precision == "no" and cfg.train.resume is False
    cfg = TrainConfig.from_yaml(path, ["--train.precision", "no", "--train.progress", "false"])
    assert cfg.train.precision == "no" and cfg.train.progress is False
