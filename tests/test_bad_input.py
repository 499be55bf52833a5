"""Bad input through the real CLI: every command that reads files, every kind of broken file.

Each bad case must give exit status 2, exactly one stderr line naming file:line (where there is a
line) and the field, no traceback, and no output: no run directory, no index directory, a
pre-existing predictions file left byte-identical, nothing on stdout. Odd-but-valid input (a UTF-8
BOM, CRLF line ends, a 10 MB line) must be accepted. The files live in tests/data/bad/ (the good
ones they are variations of in tests/data/ok/); the 10 MB lines are written at test time.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml

from onegen.cli import main
from onegen.data import read_corpus
from onegen.index import Index

DATA = Path(__file__).parent / "data"
OK, BAD = DATA / "ok", DATA / "bad"
SCRATCH = {"architecture": "llama", "hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64}
PREVIOUS = b'{"id": "old", "output": "a previous run"}\n'


@pytest.fixture(scope="module")
def env(tiny_model, tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    """A OneGen model dir, an index it built over ok/corpus.jsonl, another model, a plain HF checkpoint."""
    root = tmp_path_factory.mktemp("bad_input")
    index = Index.build(tiny_model, read_corpus(OK / "corpus.jsonl"), progress=False).save(root / "index")
    other = copy.deepcopy(tiny_model)  # the same model with one weight nudged
    with torch.no_grad():
        other.hf_model.get_input_embeddings().weight[0] += 1.0
    other_dir = other.save_pretrained(root / "other_model")
    plain = root / "plain_checkpoint"  # what a hub download looks like: weights + tokenizer, no onegen.json
    shutil.copytree(tiny_model_dir, plain, ignore=shutil.ignore_patterns("onegen.json"))
    return {"model": tiny_model_dir, "index": index, "other_model": other_dir, "plain": plain}


def _train_config(tmp: Path, **data) -> Path:
    cfg = {"model": {"scratch": SCRATCH}, "tokenizer": {"train": {"vocab_size": 300}},
           "data": {"train": str(OK / "train.jsonl"), "corpus": str(OK / "corpus.jsonl"), "max_length": 256,
                    **data},
           "loss": {"negatives": 1},
           "train": {"max_steps": 1, "batch_size": 2, "progress": False, "precision": "no"},
           "output_dir": str(tmp / "run")}
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _argv(cmd: str, file: Path, env: dict[str, Path], tmp: Path) -> list[str]:
    """The command line that feeds `file` to `cmd` (all other inputs good); outputs go under `tmp`."""
    if cmd == "train":
        return ["train", "--config", str(_train_config(tmp, train=str(file))), "--no-progress"]
    if cmd == "train-corpus":
        return ["train", "--config", str(_train_config(tmp, corpus=str(file))), "--no-progress"]
    if cmd == "train-el":
        return ["train", "--config", str(_train_config(tmp, train=str(file), task="el")), "--no-progress"]
    if cmd == "train-truncation":
        return ["train", "--config", str(_train_config(tmp, train=str(file), on_truncation="error")),
                "--no-progress"]
    if cmd == "index":
        return ["index", "--model", str(env["model"]), "--corpus", str(file), "--out", str(tmp / "idx")]
    if cmd in ("generate", "generate-el"):
        task = "el" if cmd == "generate-el" else "qa"
        return ["generate", "--model", str(env["model"]), "--index", str(env["index"]), "--input", str(file),
                "--out", str(tmp / "preds.jsonl"), "--task", task, "--max-new-tokens", "4"]
    if cmd == "eval-gold":
        return ["eval", "--task", "qa", "--gold", str(file), "--pred", str(OK / "pred_qa.jsonl")]
    if cmd == "eval-el-gold":
        return ["eval", "--task", "el", "--gold", str(file), "--pred", str(OK / "el.jsonl")]
    if cmd == "eval-el-pred":
        return ["eval", "--task", "el", "--gold", str(OK / "el.jsonl"), "--pred", str(file)]
    if cmd == "eval-pred":
        return ["eval", "--task", "qa", "--gold", str(OK / "qa.jsonl"), "--pred", str(file)]
    if cmd == "show":
        return ["data", "show", str(file), "--model", str(env["model"]), "--color", "never"]
    if cmd == "show-no-model":  # the tokenizer is then trained on the file itself: only after it is read
        return ["data", "show", str(file), "--color", "never"]
    raise AssertionError(cmd)


@dataclass(frozen=True)
class Case:
    cmd: str  # see _argv
    file: str  # in tests/data/bad/
    line: int | None  # the line the error must name (None: the file as a whole)
    field: str | None = None  # the field it must name
    needle: str = ""  # what the message must say (the what-to-fix part)

    @property
    def id(self) -> str:
        return f"{self.cmd}:{self.file.removesuffix('.jsonl')}"


CASES = [
    # malformed JSON, a line that is not an object
    Case("index", "corpus_malformed_json.jsonl", 2, None, "malformed JSON"),
    Case("train-corpus", "corpus_malformed_json.jsonl", 2, None, "malformed JSON"),
    Case("index", "corpus_not_an_object.jsonl", 2, None, "expected a JSON object"),
    Case("train", "train_malformed_json.jsonl", 2, None, "malformed JSON"),
    Case("show", "train_malformed_json.jsonl", 2, None, "malformed JSON"),
    Case("generate", "qa_malformed_json.jsonl", 2, None, "malformed JSON"),
    Case("eval-gold", "qa_malformed_json.jsonl", 2, None, "malformed JSON"),
    Case("eval-pred", "qa_malformed_json.jsonl", 2, None, "malformed JSON"),
    # wrong types
    Case("index", "corpus_wrong_type.jsonl", 2, "text", "expected str"),
    Case("train", "train_wrong_type.jsonl", 2, "messages", "expected list"),
    Case("train", "train_wrong_role.jsonl", 2, "messages[0].role", "must be one of"),
    Case("show", "train_wrong_type.jsonl", 2, "messages", "expected list"),
    Case("generate", "qa_wrong_type.jsonl", 2, "answers", "expected list"),
    Case("eval-gold", "qa_wrong_type.jsonl", 2, "answers", "list of strings"),
    Case("generate-el", "el_wrong_type.jsonl", 2, "entities[0].start", "integer"),
    Case("eval-el-gold", "el_wrong_type.jsonl", 2, "entities[0].start", "integer"),
    Case("eval-pred", "pred_wrong_type.jsonl", 2, "retrievals[0].doc_ids", "list of strings"),
    # missing fields
    Case("index", "corpus_missing_text.jsonl", 2, "text", "missing"),
    Case("train", "train_missing_messages.jsonl", 2, "messages", "missing"),
    Case("train", "train_missing_positives.jsonl", 2, "retrievals[0].positives", "missing"),
    Case("generate", "qa_missing_question.jsonl", 2, "question", "missing"),
    # empty files (nothing, or only blank lines)
    Case("index", "empty.jsonl", None, None, "empty"),
    Case("train", "empty.jsonl", None, None, "empty"),
    Case("train-corpus", "blank_lines.jsonl", None, None, "empty"),
    Case("generate", "blank_lines.jsonl", None, None, "empty"),
    Case("eval-gold", "empty.jsonl", None, None, "empty"),
    Case("eval-pred", "blank_lines.jsonl", None, None, "empty"),
    Case("show", "empty.jsonl", None, None, "empty"),
    Case("show-no-model", "missing.jsonl", None, None, "file not found"),
    Case("show-no-model", "train_malformed_json.jsonl", 2, None, "malformed JSON"),
    # ids that name nothing
    Case("train", "train_unknown_doc.jsonl", 2, "retrievals[0].positives", "'d404' is not in the corpus"),
    Case("train", "train_unknown_negative.jsonl", 2, "retrievals[0].negatives", "'d999' is not in the corpus"),
    Case("train-el", "el_unknown_entity.jsonl", 2, "entities[0].id", "'d404' is not in the corpus"),
    Case("generate", "qa_unknown_doc.jsonl", 2, "gold_docs[0]", "'d404' is not in the corpus"),
    Case("generate-el", "el_unknown_entity.jsonl", 2, "entities[0].id", "'d404' is not in the corpus"),
    Case("eval-pred", "pred_unknown_id.jsonl", 3, "id", "not in the gold file"),
    # query tokens vs retrieval entries
    Case("train", "train_count_mismatch.jsonl", 2, "retrievals", "1 query token(s) '[RQ]' in assistant turns but 2"),
    Case("show", "train_count_mismatch.jsonl", 2, "retrievals", "needs retrievals[k]"),
    # duplicate ids
    Case("index", "corpus_duplicate_id.jsonl", 3, "id", "duplicate id 'd1' (first seen on line 1)"),
    Case("train-corpus", "corpus_duplicate_id.jsonl", 3, "id", "duplicate id 'd1'"),
    Case("train", "train_duplicate_id.jsonl", 3, "id", "duplicate id 'q1'"),
    Case("show", "train_duplicate_id.jsonl", 3, "id", "duplicate id 'q1'"),
    Case("generate", "qa_duplicate_id.jsonl", 2, "id", "duplicate id 'e1'"),
    Case("eval-gold", "qa_duplicate_id.jsonl", 2, "id", "duplicate id 'e1'"),
    Case("eval-pred", "pred_duplicate_id.jsonl", 2, "id", "duplicate id 'e1'"),
    # paragraph markers out of order (as many opens as closes), overlapping or out-of-text spans
    Case("train", "train_paragraph_order.jsonl", 2, "messages[1].content", "unbalanced"),
    Case("show", "train_paragraph_order.jsonl", 2, "messages[1].content", "unbalanced"),
    Case("train-el", "el_overlap.jsonl", 2, "entities", "overlap"),  # eval and generate take nested spans
    Case("eval-el-pred", "pred_el_out_of_range.jsonl", 2, "entities[0]", "ends past the gold text"),
    # truncation that would cut a query token, with data.on_truncation: error
    Case("train-truncation", "train_truncation.jsonl", 2, None, "data.max_length"),
]


def _snapshot(tmp: Path) -> None:
    """Outputs that exist before the command: a previous predictions file."""
    (tmp / "preds.jsonl").write_bytes(PREVIOUS)


def _assert_no_output(tmp: Path, out: str) -> None:
    assert out == "", out
    assert (tmp / "preds.jsonl").read_bytes() == PREVIOUS  # an earlier output is left as it was
    assert not (tmp / "run").exists() and not (tmp / "idx").exists()
    assert not [p.name for p in tmp.iterdir() if p.name.startswith(".")]  # no temporary litter


def _assert_one_line(err: str, cmd: str, where: str, field: str | None, needle: str, after_work: bool = False) -> str:
    """Exactly one stderr line, the error (`after_work`: progress bars of work done before it may precede)."""
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip()]
    if after_work:
        lines = [line for line in lines if "%|" not in line]
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith(f"onegen {cmd}: error: {where}"), line
    if field is not None:
        assert f"field '{field}'" in line, line
    assert needle in line, line
    assert "Traceback" not in err and len(line) < 1000, line
    return line


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_file(case: Case, env, tmp_path, capsys):
    _snapshot(tmp_path)
    file = BAD / case.file
    argv = _argv(case.cmd, file, env, tmp_path)
    rc = main(argv)
    captured = capsys.readouterr()
    assert rc == 2, captured.err
    where = f"{file}:{case.line}" if case.line is not None else str(file)
    _assert_one_line(captured.err, argv[0] if argv[0] != "data" else "data", where, case.field, case.needle)
    _assert_no_output(tmp_path, captured.out)


def test_every_bad_file_is_used():
    used = {c.file for c in CASES} | {f.name for f in BAD.glob("*_bom*.jsonl")} | {f.name for f in BAD.glob("*_crlf*")}
    assert {f.name for f in BAD.glob("*.jsonl")} <= used


# -- accepted: a UTF-8 BOM and CRLF line ends --------------------------------------------------

def test_bom_and_crlf_accepted_by_train(env, tmp_path, capsys):
    for name in ("train_bom.jsonl", "train_crlf.jsonl"):
        out = tmp_path / name
        out.mkdir()
        cfg = _train_config(out, train=str(BAD / name), corpus=str(BAD / "corpus_bom_crlf.jsonl"))
        assert main(["train", "--config", str(cfg), "--no-progress"]) == 0, capsys.readouterr().err
        assert (out / "run" / "model" / "model.safetensors").is_file()
        summary = json.loads((out / "run" / "summary.json").read_text())
        assert summary["samples"] == 4  # every sample read, none lost to the BOM or the \r


def test_bom_and_crlf_accepted_by_index_generate_eval_show(env, tmp_path, capsys):
    assert main(["index", "--model", str(env["model"]), "--corpus", str(BAD / "corpus_bom_crlf.jsonl"),
                 "--out", str(tmp_path / "idx")]) == 0, capsys.readouterr().err
    index = Index.load(tmp_path / "idx")
    assert index.ids == ["d1", "d2", "d3", "d4", "d5", "d6"] and index.corpus["d1"].text.endswith("1901.")
    for task, name in (("qa", "qa_bom_crlf.jsonl"), ("el", "el_bom_crlf.jsonl")):
        preds = tmp_path / f"{task}.jsonl"
        assert main(["generate", "--model", str(env["model"]), "--index", str(tmp_path / "idx"), "--input",
                     str(BAD / name), "--out", str(preds), "--task", task, "--max-new-tokens", "4"]) == 0
        assert [json.loads(line)["id"] for line in preds.read_text().splitlines()] == (
            ["e1", "e2"] if task == "qa" else ["l1", "l2"])
    capsys.readouterr()
    assert main(["eval", "--task", "qa", "--gold", str(BAD / "qa_bom_crlf.jsonl"),
                 "--pred", str(BAD / "pred_qa_bom_crlf.jsonl")]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["n"] == 2 and metrics["em"] == 1.0 and metrics["hop1_recall@1"] == 0.5
    assert main(["data", "show", str(BAD / "train_bom.jsonl"), "--model", str(env["model"]), "-n", "4",
                 "--color", "never"]) == 0
    out = capsys.readouterr().out
    assert [line.split()[1] for line in out.splitlines() if line.startswith("# ")] == ["q1", "q2", "q3", "q4"]
    assert "\r" not in out and "\ufeff" not in out


# -- a 10 MB line ------------------------------------------------------------------------------

TEN_MB = 10 * 1024 * 1024


def test_ten_mb_line_valid_is_read(tmp_path, capsys):
    gold = tmp_path / "gold.jsonl"
    big = {"id": "e2", "question": "x" * TEN_MB, "answers": ["Orla Venn"], "gold_docs": [["d2"]]}
    gold.write_text((OK / "qa.jsonl").read_text().splitlines()[0] + "\n" + json.dumps(big) + "\n")
    assert main(["eval", "--task", "qa", "--gold", str(gold), "--pred", str(OK / "pred_qa.jsonl")]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 2


@pytest.mark.parametrize("kind", ["malformed", "huge-value-in-error"])
def test_ten_mb_line_invalid_names_line_without_echoing_it(tmp_path, capsys, kind):
    """The error names file:2 and stays short: neither the line nor a 10 MB value is printed."""
    first = (OK / "train.jsonl").read_text().splitlines()[0]
    bad = tmp_path / "train.jsonl"
    if kind == "malformed":  # an unterminated string 10 MB long
        bad.write_text(first + '\n{"id": "q2", "messages": "' + "y" * TEN_MB + "\n")
        field, needle = None, "malformed JSON"
    else:  # a 10 MB role: the message quotes the value, shortened
        row = {"id": "q2", "messages": [{"role": "y" * TEN_MB, "content": "hi"}]}
        bad.write_text(first + "\n" + json.dumps(row) + "\n")
        field, needle = "messages[0].role", "must be one of"
    rc = main(["train", "--config", str(_train_config(tmp_path, train=str(bad))), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2
    _assert_one_line(err, "train", f"{bad}:2", field, needle)
    assert not (tmp_path / "run").exists()


# -- models and indexes that do not fit ---------------------------------------------------------

def test_index_built_by_another_model(env, tmp_path, capsys):
    _snapshot(tmp_path)
    rc = main(["generate", "--model", str(env["other_model"]), "--index", str(env["index"]),
               "--input", str(OK / "qa.jsonl"), "--out", str(tmp_path / "preds.jsonl")])
    captured = capsys.readouterr()
    assert rc == 2
    line = _assert_one_line(captured.err, "generate", "index", None, "rebuild it with `onegen index`")
    assert f"{env['index']} was built by model" in line
    _assert_no_output(tmp_path, captured.out)


@pytest.mark.parametrize("cmd", ["index", "generate"])
def test_model_dir_without_onegen_json(env, tmp_path, capsys, cmd):
    """A plain HF checkpoint has never learnt [RQ]/[RD]: index and generate say what is missing.
    (`train` takes it as a pretrained start: see test_train.py::test_tiny_checkpoints_train_through_cli.)"""
    _snapshot(tmp_path)
    argv = _argv(cmd, OK / ("corpus.jsonl" if cmd == "index" else "qa.jsonl"), env, tmp_path)
    argv[argv.index("--model") + 1] = str(env["plain"])
    rc = main(argv)
    captured = capsys.readouterr()
    assert rc == 2
    line = _assert_one_line(captured.err, cmd, str(env["plain"]), None, "no onegen.json")
    assert "onegen train" in line  # what to do about it
    _assert_no_output(tmp_path, captured.out)


def test_missing_model_dir(env, tmp_path, capsys):
    argv = _argv("index", OK / "corpus.jsonl", env, tmp_path)
    argv[argv.index("--model") + 1] = str(tmp_path / "nope")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and str(tmp_path / "nope") in err
    assert not (tmp_path / "idx").exists()


# -- through a real process: exit status and no traceback ---------------------------------------

def _onegen(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("onegen")
    return subprocess.run([str(exe), *args], capture_output=True, text=True, cwd=cwd, timeout=120,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})


def test_subprocess_exit_status_and_no_traceback(env, tmp_path):
    (tmp_path / "preds.jsonl").write_bytes(PREVIOUS)
    runs = [
        (_onegen("eval", "--task", "qa", "--gold", str(BAD / "qa_duplicate_id.jsonl"),
                 "--pred", str(OK / "pred_qa.jsonl"), cwd=tmp_path), f"{BAD / 'qa_duplicate_id.jsonl'}:2"),
        (_onegen("generate", "--model", str(env["plain"]), "--index", str(env["index"]), "--input",
                 str(OK / "qa.jsonl"), "--out", str(tmp_path / "preds.jsonl"), cwd=tmp_path), "no onegen.json"),
        (_onegen("data", "show", "missing.jsonl", cwd=tmp_path), "missing.jsonl: file not found"),  # was a traceback
    ]
    for proc, needle in runs:
        assert proc.returncode == 2, proc.stderr
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert needle in lines[0] and proc.stdout == ""
    assert (tmp_path / "preds.jsonl").read_bytes() == PREVIOUS


# -- failing writes and interrupted index builds -------------------------------------------------

def _tree(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("failing", ["replace", "fsync"])
def test_failing_write_leaves_previous_file(env, tmp_path, capsys, monkeypatch, failing):
    """Disk full at the last moment: one line naming the output, the previous predictions unchanged."""
    import errno

    _snapshot(tmp_path)
    out = tmp_path / "preds.jsonl"
    real_replace = os.replace

    def replace(src, dst):
        if Path(dst) == out:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_replace(src, dst)

    def fsync(fd):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    if failing == "replace":
        monkeypatch.setattr(os, "replace", replace)
    else:
        monkeypatch.setattr(os, "fsync", fsync)
    rc = main(_argv("generate", OK / "qa.jsonl", env, tmp_path))
    captured = capsys.readouterr()
    assert rc == 2
    _assert_one_line(captured.err, "generate", str(out), None, "writing failed", after_work=True)
    assert captured.out == "" and out.read_bytes() == PREVIOUS
    assert [p.name for p in tmp_path.iterdir()] == ["preds.jsonl"]  # no temporary litter


def test_index_save_failing_midway_keeps_previous_index(env, tmp_path, capsys, monkeypatch):
    import errno

    import numpy as np

    out = tmp_path / "idx"
    shutil.copytree(env["index"], out)
    before = _tree(out)
    real_save = np.save

    def half_then_full_disk(file, arr, **kwargs):
        real_save(file, arr, **kwargs)
        Path(file).write_bytes(Path(file).read_bytes()[:100])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(np, "save", half_then_full_disk)
    rc = main(["index", "--model", str(env["model"]), "--corpus", str(BAD / "corpus_bom_crlf.jsonl"),
               "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 2
    _assert_one_line(captured.err, "index", str(out), None, "No space left on device", after_work=True)
    monkeypatch.undo()
    assert _tree(out) == before and len(Index.load(out)) == 6
    assert [p.name for p in tmp_path.iterdir()] == ["idx"]  # no temporary litter


KILLED_SAVE = '''
import os, signal, sys
from pathlib import Path
import numpy as np, torch
import onegen.io
from onegen.index import Index

out, when = sys.argv[1], sys.argv[2]
index = Index.from_vectors(torch.randn(9, 8, generator=torch.Generator().manual_seed(1)),
                           [f"new{i}" for i in range(9)], "another-model")
if when == "mid-write":  # SIGKILL with the vectors half written
    real_save = np.save
    def save(file, arr, **kwargs):
        real_save(file, arr, **kwargs)
        Path(file).write_bytes(Path(file).read_bytes()[:64])
        os.kill(os.getpid(), signal.SIGKILL)
    np.save = save
else:  # SIGKILL right after the new directory took the old one's place, before the old one is removed
    real_exchange = onegen.io._exchange
    def exchange(a, b):
        assert real_exchange(a, b)
        os.kill(os.getpid(), signal.SIGKILL)
    onegen.io._exchange = exchange
index.save(out)
'''


@pytest.mark.parametrize("when", ["mid-write", "after-swap"])
def test_index_build_killed(env, tmp_path, when):
    """SIGKILL while an index is saved over an old one: the directory holds one whole index (the old one,
    or after the swap the new one), never half of each; the half-written temporary is refused clearly."""
    from onegen.errors import OneGenError

    out = tmp_path / "idx"
    shutil.copytree(env["index"], out)
    before = _tree(out)
    proc = subprocess.run([sys.executable, "-c", KILLED_SAVE, str(out), when], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == -9, proc.stderr
    litter = [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert len(litter) == 1  # what SIGKILL leaves: one temporary directory, never under the target's name
    loaded = Index.load(out)
    if when == "mid-write":
        assert _tree(out) == before and loaded.ids == ["d1", "d2", "d3", "d4", "d5", "d6"]
        with pytest.raises(OneGenError, match=r"index\.json: file not found; the index is missing or corrupt, "
                                              r"rebuild it with `onegen index`"):
            Index.load(litter[0] / "x")
    else:
        assert loaded.ids == [f"new{i}" for i in range(9)] and loaded.fingerprint == "another-model"
        assert Index.load(litter[0] / "x").ids == ["d1", "d2", "d3", "d4", "d5", "d6"]  # the old, whole


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "fallback"])
def test_directory_replace_with_and_without_exchange(tmp_path, monkeypatch, exchange):
    import onegen.io
    from onegen.io import atomic_path

    if not exchange:
        monkeypatch.setattr(onegen.io, "_exchange", lambda a, b: False)
    target = tmp_path / "d"
    for version in ("old", "new"):
        with atomic_path(target) as tmp:
            tmp.mkdir()
            (tmp / "f").write_text(version)
    assert (target / "f").read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["d"]


@pytest.mark.parametrize("argv,needle", [
    (["generate", "--top-k", "0"], "argument --top-k: must be >= 1, got 0"),
    (["generate", "--batch-size", "0"], "argument --batch-size: must be >= 1, got 0"),
    (["generate", "--max-new-tokens", "-1"], "argument --max-new-tokens: must be >= 1, got -1"),
    (["generate", "--max-retrievals", "x"], "argument --max-retrievals: expected an integer, got 'x'"),
    (["index", "--batch-size", "0"], "argument --batch-size: must be >= 1"),
    (["data", "show", "f.jsonl", "-n", "0"], "argument -n: must be >= 1"),
    (["eval", "--task", "qa", "--gold", "g", "--pred", "p", "--k", "0"], "argument --k: must be >= 1"),
    (["data", "synth", "--task", "qa", "--out", "o", "--size", "19"], "argument --size: must be >= 20"),
    (["bench", "inference", "--batches", "1", "0"], "argument --batches: must be >= 1, got 0"),
    (["bench", "index", "--docs", "0"], "argument --docs: must be >= 1"),
    (["bench", "train", "--scale", "0"], "argument --scale: must be a finite number > 0"),
    (["index", "--backend", "bogus"], "argument --backend: invalid choice"),
])
def test_bad_numbers_are_refused_before_any_work(argv, needle, capsys):
    required = {"generate": ["--model", "m", "--index", "i", "--input", "f", "--out", "o"],
                "index": ["--model", "m", "--corpus", "c", "--out", "o"]}.get(argv[0], [])
    with pytest.raises(SystemExit) as e:
        main(argv + required)
    err = capsys.readouterr().err
    assert e.value.code == 2 and needle in err and len(err.strip().splitlines()) == 1  # no usage block


def test_generate_names_an_item_longer_than_the_models_positions(env, tmp_path, capsys, tiny_model):
    limit = tiny_model.max_positions
    items = tmp_path / "long.jsonl"
    items.write_text(json.dumps({"id": "ok", "question": "Who founded Velmora?"}) + "\n"
                     + json.dumps({"id": "long", "question": "Velmora " * limit}) + "\n")
    argv = ["generate", "--model", str(env["model"]), "--index", str(env["index"]), "--input", str(items),
            "--out", str(tmp_path / "preds.jsonl")]
    assert main(argv) == 2
    _assert_one_line(capsys.readouterr().err, "generate", f"{items}:2", "question",
                     f"the model takes at most {limit} positions", after_work=True)
    assert not (tmp_path / "preds.jsonl").exists()


def test_generate_refuses_to_overwrite_its_input(env, tmp_path, capsys):
    same = tmp_path / "items.jsonl"
    shutil.copy(OK / "qa.jsonl", same)
    before = same.read_bytes()
    argv = ["generate", "--model", str(env["model"]), "--index", str(env["index"]), "--input", str(same),
            "--out", str(tmp_path / "." / "items.jsonl")]
    assert main(argv) == 2
    _assert_one_line(capsys.readouterr().err, "generate", str(tmp_path / "." / "items.jsonl"), None,
                     "would overwrite the input")
    assert same.read_bytes() == before


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
@pytest.mark.parametrize("argv", [["bench", "inference", "--device", "cuda"], ["bench", "train", "--device", "tpu"],
                                  ["index", "--model", "m", "--corpus", "c", "--out", "o", "--device", "cuda"],
                                  ["generate", "--model", "m", "--index", "i", "--input", "f", "--out", "o",
                                   "--device", "cuda:1"]])
def test_a_device_this_machine_lacks_is_refused_in_one_line(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "argument --device:" in err and len(err.strip().splitlines()) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_from_pretrained_refuses_a_missing_device_before_loading(tmp_path):
    from onegen.errors import OneGenError
    from onegen.model import OneGenModel

    with pytest.raises(OneGenError, match="CPU-only torch build|no CUDA device"):
        OneGenModel.from_pretrained(tmp_path / "not-even-there", device="cuda")
    with pytest.raises(OneGenError, match="unknown device 'gpu0'"):
        OneGenModel.from_pretrained(tmp_path / "not-even-there", device="gpu0")
