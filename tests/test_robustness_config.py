"""Config and run robustness found by the acceptance check: duplicate YAML keys, out-of-range numbers and
booleans for numbers, errors that name the command-line override, where relative paths resolve,
truncation that cuts a query token, unreadable checkpoints on resume, and file permissions."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import stat
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from onegen.cli import main
from onegen.config import DataConfig, TrainConfig
from onegen.configfile import _Loader
from onegen.errors import OneGenError
from onegen.io import atomic_path, write_text_atomic
from onegen.render import Renderer
from onegen.trainer import CKPT_DIR, render_all, train

SCRATCH = {"architecture": "llama", "hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64}


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _error(path: Path, overrides: list[str] | None = None) -> OneGenError:
    with pytest.raises(OneGenError) as e:
        TrainConfig.from_yaml(path, overrides).validate_for_training()
    return e.value


# -- 1. duplicate keys ---------------------------------------------------------------------------

@pytest.mark.parametrize("text, line, key", [
    ("train:\n  max_steps: 6\n  lr: 0.1\noutput_dir: r\ntrain:\n  epochs: 2\n", 5, "train"),
    ("train:\n  lr: 0.1\n  batch_size: 2\n  lr: 0.2\n", 4, "train.lr"),
    ("model:\n  scratch: {architecture: llama, hidden_size: 64, hidden_size: 32}\n", 2, "model.scratch.hidden_size"),
])
def test_duplicate_yaml_key_names_file_line_and_key(tmp_path, text, line, key):
    path = _write(tmp_path / "c.yaml", text)
    e = _error(path)
    assert (e.file, e.line, e.field) == (str(path), line, key)
    assert "duplicate key" in str(e) and f"{path}:{line}" in str(e)


def test_yaml_merge_key_may_be_overridden(tmp_path):
    path = _write(tmp_path / "c.yaml", "base: &b {lr: 0.1, batch_size: 2}\n")
    data = yaml.load(path.read_text() + "train: {<<: *b, lr: 0.3}\n", Loader=_Loader)
    assert data["train"] == {"lr": 0.3, "batch_size": 2}


# -- 2. numbers out of range, booleans for numbers -----------------------------------------------

@pytest.mark.parametrize("text, key", [
    ("train: {max_steps: -3}", "train.max_steps"),
    ("train: {max_steps: 0}", "train.max_steps"),
    ("train: {max_steps: true}", "train.max_steps"),
    ("train: {batch_size: true}", "train.batch_size"),
    ("train: {epochs: 0}", "train.epochs"),
    ("train: {lr: -1.0}", "train.lr"),
    ("train: {lr: 0}", "train.lr"),
    ("train: {lr: .nan}", "train.lr"),
    ("train: {lr: false}", "train.lr"),
    ("train: {weight_decay: -0.1}", "train.weight_decay"),
    ("train: {warmup_steps: -1}", "train.warmup_steps"),
    ("train: {warmup_ratio: 1.5}", "train.warmup_ratio"),
    ("train: {max_grad_norm: -1}", "train.max_grad_norm"),
    ("train: {grad_accum: 0}", "train.grad_accum"),
    ("train: {save_every: -2}", "train.save_every"),
    ("train: {keep_checkpoints: -1}", "train.keep_checkpoints"),
    ("train: {log_every: 0}", "train.log_every"),
    ("train: {seed: -1}", "train.seed"),
    ("train: {lora: {r: 0}}", "train.lora.r"),
    ("train: {lora: {dropout: 1.0}}", "train.lora.dropout"),
    ("data: {max_length: 4}", "data.max_length"),
    ("data: {doc_max_length: 1}", "data.doc_max_length"),
    ("loss: {negatives: -1}", "loss.negatives"),
    ("loss: {temperature: -0.5}", "loss.temperature"),
    ("tokenizer: {train: {vocab_size: 0}}", "tokenizer.train.vocab_size"),
    ("model: {scratch: {hidden_size: 65, num_heads: 2}}", "model.scratch.hidden_size"),
    ("model: {scratch: {num_layers: 0}}", "model.scratch.num_layers"),
])
def test_bad_number_names_file_and_field(tmp_path, text, key):
    path = _write(tmp_path / "c.yaml", text + "\n")
    e = _error(path)
    assert e.field == key and e.file == str(path), str(e)


def test_good_numbers_accepted(tmp_path):
    path = _write(tmp_path / "c.yaml", "train: {max_steps: null, epochs: 2, lr: 3e-4, save_every: 0, seed: 0}\n")
    t = TrainConfig.from_yaml(path).train
    assert (t.max_steps, t.epochs, t.save_every) == (None, 2, 0) and t.lr == pytest.approx(3e-4)


# -- 3. errors name the override, the config file ------------------------------------------------

@pytest.mark.parametrize("args, key", [
    (["--train.lr", "[1,"], "train.lr"),  # malformed YAML
    (["--train.lr", "-1"], "train.lr"),
    (["--train.max_steps", "true"], "train.max_steps"),
    (["--train.lrr", "1"], "train.lrr"),
    (["--train", "5"], "train"),
])
def test_override_error_names_the_override_not_the_file(tmp_path, args, key):
    path = _write(tmp_path / "c.yaml", "train: {lr: 0.1}\noutput_dir: r\n")
    e = _error(path, args)
    assert e.file is None and e.field == key
    assert f"--{key}" in str(e) and str(path) not in str(e)


def test_override_error_through_cli_is_one_line(tmp_path, capsys):
    path = _write(tmp_path / "c.yaml", "train: {lr: 0.1}\noutput_dir: r\n")
    assert main(["train", "--config", str(path), "--train.lr", "[1,", "--output_dir", "runs/x"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--train.lr" in err and "Traceback" not in err


@pytest.mark.parametrize("text, key", [
    ("", "output_dir"),
    ("output_dir: r\n", "data.train"),
    ("output_dir: r\ndata: {train: x.jsonl}\n", "model"),
])
def test_missing_required_key_names_the_config_file(tmp_path, text, key):
    path = _write(tmp_path / "c.yaml", text)
    e = _error(path)
    assert e.field == key and e.file == str(path)


# -- 4. relative paths ---------------------------------------------------------------------------

@pytest.fixture
def project(tmp_path, monkeypatch) -> tuple[Path, Path]:
    """A config in `project/`, run from `cwd/`; both have a runs/Y and a data/x.jsonl."""
    proj, cwd = tmp_path / "project", tmp_path / "cwd"
    for d in (proj, cwd):
        (d / "runs" / "Y").mkdir(parents=True)
        _write(d / "data" / "x.jsonl", "{}\n")
    _write(proj / "c.yaml", "data: {train: data/x.jsonl}\noutput_dir: runs/Y\n")
    monkeypatch.chdir(cwd)
    return proj, cwd


@pytest.mark.parametrize("exists_in_cwd", [True, False])
def test_override_paths_resolve_against_cwd(project, exists_in_cwd):
    proj, cwd = project
    if not exists_in_cwd:
        (cwd / "runs" / "Y").rmdir()
    c = TrainConfig.from_yaml(proj / "c.yaml", ["--output_dir", "runs/Y", "--data.train", "data/x.jsonl"])
    assert Path(c.output_dir).resolve() == cwd / "runs" / "Y"
    assert Path(c.data.train).resolve() == cwd / "data" / "x.jsonl"


def test_override_of_a_whole_section_resolves_against_cwd(project):
    proj, cwd = project
    c = TrainConfig.from_yaml(proj / "c.yaml", ["--data", "{train: data/x.jsonl}"])
    assert Path(c.data.train).resolve() == cwd / "data" / "x.jsonl"


@pytest.mark.parametrize("exists_in_cwd", [True, False])
def test_yaml_paths_resolve_against_the_yaml_folder(project, exists_in_cwd):
    proj, cwd = project
    if not exists_in_cwd:
        (cwd / "runs" / "Y").rmdir()
    c = TrainConfig.from_yaml(proj / "c.yaml")
    assert Path(c.output_dir).resolve() == proj / "runs" / "Y"  # whether or not ./runs/Y exists
    assert Path(c.data.train).resolve() == proj / "data" / "x.jsonl"  # the folder first


# -- 5. truncation that cuts a query token -------------------------------------------------------

def test_truncation_default_is_error():
    assert DataConfig().on_truncation == "error"


def test_default_truncation_cutting_a_query_token_is_an_error(tiny_tokenizer, tokens, samples):
    renderer = Renderer(tiny_tokenizer, tokens, max_length=12, on_truncation=DataConfig().on_truncation)
    with pytest.raises(OneGenError) as e:
        render_all(SimpleNamespace(renderer=renderer), samples)
    assert e.value.file == samples[0].source and ":" in samples[0].source


@pytest.mark.parametrize("policy, needle", [("shorten", "cuts query tokens"), ("drop", "left them out")])
def test_truncation_warning_names_the_samples(tiny_tokenizer, tokens, samples, caplog, policy, needle):
    renderer = Renderer(tiny_tokenizer, tokens, max_length=12, on_truncation=policy)
    with caplog.at_level(logging.WARNING, logger="onegen.trainer"), contextlib.suppress(OneGenError):
        render_all(SimpleNamespace(renderer=renderer), samples)  # drop: none is left, an error after the warning
    warned = [r.getMessage() for r in caplog.records if needle in r.getMessage()]
    assert len(warned) == 1
    with_rq = [s for s in samples if s.retrievals]
    assert with_rq[0].source in warned[0] and with_rq[4].source in warned[0]
    assert f"and {len(with_rq) - 5} more" in warned[0]


# -- 6-8. resume from unreadable checkpoints, resume shown, permissions --------------------------

def _run_config(run_dir: Path, world: dict, max_steps: int) -> TrainConfig:
    return TrainConfig.from_dict({
        "model": {"scratch": SCRATCH}, "tokenizer": {"train": {"vocab_size": 300}},
        "data": {"train": world["train"], "corpus": world["corpus"], "max_length": 256},
        "loss": {"negatives": 1},
        "train": {"max_steps": max_steps, "save_every": 2, "batch_size": 2, "lr": 1e-3, "progress": False,
                  "precision": "no"},
        "output_dir": str(run_dir)})


@pytest.fixture(scope="module")
def four_steps(qa_world, tmp_path_factory) -> Path:
    """A 4-step run with checkpoints step-2 and step-4, written under umask 022."""
    old = os.umask(0o022)
    try:
        return train(_run_config(tmp_path_factory.mktemp("four") / "run", qa_world, 4))
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _corrupt(ckpt: Path) -> None:
    weights = ckpt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5])


def test_weights_are_as_readable_as_other_files(four_steps):
    for f in (four_steps / "model" / "model.safetensors", four_steps / CKPT_DIR / "step-4" / "model.safetensors",
              four_steps / "config.yaml", four_steps / "model" / "config.json"):
        assert _mode(f) == 0o644, f
    assert _mode(four_steps / CKPT_DIR / "step-4") == 0o755


def test_resume_skips_an_unreadable_checkpoint_and_says_so(four_steps, qa_world, tmp_path, caplog):
    run = Path(shutil.copytree(four_steps, tmp_path / "run"))
    ckpts = run / CKPT_DIR
    _corrupt(ckpts / "step-4")
    with caplog.at_level(logging.WARNING, logger="onegen.trainer"):
        train(_run_config(run, qa_world, 6))
    messages = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any(f"{ckpts / 'step-4'} cannot be read" in m for m in messages), messages
    assert any(f"resuming from {ckpts / 'step-2'} (step 2)" in m for m in messages), messages
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-4", "step-6", "unreadable-step-4"]
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == \
        [1, 2, 3, 4, 5, 6]
    # none readable: a one-line error naming the newest checkpoint and how to start over
    for name in ("step-4", "step-6"):
        _corrupt(ckpts / name)
    with pytest.raises(OneGenError) as e:
        train(_run_config(run, qa_world, 8))
    assert e.value.file == str(ckpts / "step-6") and "train.resume false" in str(e.value)


def test_resume_is_shown_without_verbose(four_steps, qa_world, tmp_path, caplog):
    run = Path(shutil.copytree(four_steps, tmp_path / "run"))
    with caplog.at_level(logging.WARNING, logger="onegen.trainer"):
        train(_run_config(run, qa_world, 5))
    assert any(f"resuming from {run / CKPT_DIR / 'step-4'} (step 4)" in r.getMessage() for r in caplog.records)


def test_atomic_writes_get_umask_permissions(tmp_path):
    old = os.umask(0o027)
    try:
        write_text_atomic(tmp_path / "a.txt", "x")
        with atomic_path(tmp_path / "d") as tmp:
            tmp.mkdir()
            fd, name = tempfile.mkstemp(dir=tmp)  # 0600, as safetensors and mkstemp writers leave it
            os.close(fd)
            os.mkdir(tmp / "sub", 0o700)
        with atomic_path(tmp_path / "b.bin") as tmp:
            fd = os.open(tmp, os.O_CREAT | os.O_WRONLY, 0o600)
            os.close(fd)
    finally:
        os.umask(old)
    assert _mode(tmp_path / "a.txt") == 0o640
    assert _mode(tmp_path / "b.bin") == 0o640
    assert _mode(tmp_path / "d" / Path(name).name) == 0o640
    assert _mode(tmp_path / "d" / "sub") == 0o750 and _mode(tmp_path / "d") == 0o750


def test_leftovers_of_killed_writers_are_removed_and_live_ones_kept(tmp_path):
    """A writer killed mid-write leaves `.NAME.PID.*.tmp`; the next write of NAME removes it once that
    process is gone, and leaves a live writer's (another process writing the same path) alone."""
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    from onegen.io import _WRITER

    stale = [tmp_path / f".idx.{_WRITER}-{dead}.k2j4ab_9.tmp", tmp_path / f".idx.old-{dead}"]
    live = tmp_path / f".idx.{_WRITER}-{os.getppid()}.a1b2cd3e.tmp"
    other = tmp_path / f".other.{_WRITER}-{dead}.x1y2z3w4.tmp"  # another path's: not this write's business
    sibling = tmp_path / f".idx.{dead}.json.{_WRITER}-{dead}.abcdefgh.tmp"  # target "idx.<n>.json"'s temporary
    remote = tmp_path / f".idx.elsewhere-{dead}.abcdefgh.tmp"  # another machine's writer (a shared directory)
    for d in [*stale, live, other, sibling, remote]:
        d.mkdir()
        (d / "vectors.npy").write_bytes(b"0" * 10)
    with atomic_path(tmp_path / "idx") as tmp:
        tmp.mkdir()
    assert not any(d.exists() for d in stale)
    assert live.exists() and other.exists() and sibling.exists() and remote.exists() and (tmp_path / "idx").is_dir()


def test_a_retrieval_loss_without_candidates_is_refused(tmp_path):
    """No hard negatives and no in-batch ones: each query's only candidate is its positive, InfoNCE is
    log 1 = 0 and retrieval would silently learn nothing."""
    path = _write(tmp_path / "c.yaml", "loss: {negatives: 0, in_batch_negatives: false}\n")
    assert _error(path).field == "loss.negatives"
    ok = _write(tmp_path / "ok.yaml", "loss: {negatives: 0, in_batch_negatives: false, retrieval_weight: 0}\n"
                                      "data: {train: t.jsonl}\noutput_dir: r\n")
    TrainConfig.from_yaml(ok)  # generation-only training needs no candidates


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks a machine without CUDA")
def test_fp16_without_a_gpu_is_refused_not_run_in_float32(qa_world, tmp_path):
    config = TrainConfig.from_dict({
        "model": {"scratch": SCRATCH}, "tokenizer": {"train": {"vocab_size": 300}},
        "data": {"train": qa_world["train"], "corpus": qa_world["corpus"]},
        "train": {"max_steps": 1, "precision": "fp16"}, "output_dir": str(tmp_path / "run")})
    with pytest.raises(OneGenError, match="fp16 needs a CUDA GPU") as e:
        train(config, progress=False)
    assert e.value.field == "train.precision" and not (tmp_path / "run").exists()
