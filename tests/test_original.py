"""Tests of the paper's files (onegen.original, onegen.workflow): its db.jsonl / train.jsonl read as they are, its workflow
JSON mapped onto TrainConfig, `onegen train --workflow` end to end, and that nothing read is executed
(class names, pickled indexes and weights, trust_remote_code)."""

from __future__ import annotations

import builtins
import json
import logging
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_jsonl

from onegen.cli import main
from onegen.config import TokensConfig, TrainConfig
from onegen.errors import OneGenError
from onegen.original import read_original, read_original_db, read_original_train
from onegen.workflow import load_workflow

FIXTURES = Path(__file__).parent / "data" / "original"
Q, D = "[Question Representation]", "[Document Fragment Representation]"
PAPER_TOKENS = TokensConfig(query=Q, doc=D)


def _workflow(tmp_path: Path, edit=None) -> Path:
    """The fixture files copied to tmp_path; `edit(dict)` changes the workflow JSON first."""
    for name in ("db.jsonl", "train.jsonl", "workflow.json"):
        shutil.copy(FIXTURES / name, tmp_path / name)
    if edit is not None:
        data = json.loads((tmp_path / "workflow.json").read_text())
        edit(data)
        (tmp_path / "workflow.json").write_text(json.dumps(data, indent=4))
    return tmp_path / "workflow.json"


def _user_assistant(content: str, **extra) -> list[dict]:
    return [{"role": "user", "content": ""}, {"role": "assistant", "content": content, **extra}]


# -- db.jsonl ------------------------------------------------------------------------------------

def test_db_one_document_per_representation_token():
    db = read_original_db(FIXTURES / "db.jsonl", D)
    assert db.corpus.ids == ["0", "1-0", "1-1", "2", "3-0", "3-1", "3-2", "4"]
    # document k is the row's text up to its k-th token (what the causal hidden state there sees)
    assert db.corpus["1-0"].text == "Ilsa Brandt was born in Caldris."
    assert db.corpus["1-1"].text == "Ilsa Brandt was born in Caldris. She studied law in Orvane."
    assert db.corpus["3-2"].text.startswith("Orvane. Orvane is known") and D not in db.corpus["3-2"].text
    # uids as the paper writes them: docid (= sentence 0) and docid-sentid
    assert [db.resolve(u) for u in ("0", "0-0", "1", "1-1", "3-2", "4", "4-0")] == \
        ["0", "0", "1-0", "1-1", "3-2", "4", "4"]
    assert db.resolve("1-2") is None and db.resolve("9") is None and db.resolve("0-1") is None


def test_db_bad_rows_name_file_line_and_field(tmp_path, caplog):
    path = write_jsonl(tmp_path / "db.jsonl", [{"uid": "a", "messages": _user_assistant(f"x{D}")},
                                               {"uid": "a", "messages": _user_assistant(f"y{D}")}])
    with pytest.raises(OneGenError, match=r"db.jsonl:2 field 'uid': duplicate uid 'a'"):
        read_original_db(path, D)
    path = write_jsonl(tmp_path / "db2.jsonl", [{"uid": "a", "messages": _user_assistant(f"x{D}")},
                                                {"messages": _user_assistant(f"y{D}")}])
    with pytest.raises(OneGenError, match=r"db2.jsonl:2 field 'uid': missing"):
        read_original_db(path, D)
    path = write_jsonl(tmp_path / "db3.jsonl", [{"uid": "a", "messages": [{"role": "bot", "content": "x"}]}])
    with pytest.raises(OneGenError, match=r"db3.jsonl:1 field 'messages\[0\].role'"):
        read_original_db(path, D)
    path = write_jsonl(tmp_path / "db4.jsonl", [{"uid": "a", "messages": _user_assistant(f"x{D}")},
                                                {"uid": "b", "messages": _user_assistant("no token")}])
    with caplog.at_level(logging.WARNING, logger="onegen.original"):
        assert read_original_db(path, D).corpus.ids == ["a"]  # skipped, as the paper's reader does
    assert "db4.jsonl:2" in caplog.text


# -- train.jsonl ---------------------------------------------------------------------------------

def test_train_positive_negative_lists_become_retrievals(caplog):
    with caplog.at_level(logging.WARNING, logger="onegen.original"):
        corpus, samples = read_original(FIXTURES / "train.jsonl", FIXTURES / "db.jsonl", PAPER_TOKENS)
    got = [[(r.positives, r.negatives) for r in s.retrievals] for s in samples]
    assert got == [
        [(("0",), ("2", "3-1")), (("1-0",), ("4", "1-1"))],  # two hops; scalar and list positives
        [((), ())],  # null positive: generated, no retrieval loss
        [(("3-0",), ("0",))],  # "3-0" and "3" are one document; "99-0" is not in the db: dropped
        [(("2",), ("0",)), (("4",), ("3-2",))],  # links (no paragraph), system turn, integer uid
        [],  # plain generation
        [(("3-2",), ("1-1", "2")), (("4",), ("3-1",))],  # two assistant turns
    ]
    assert "train.jsonl:3 messages[1].negative[0]" in caplog.text
    assert samples[0].source.endswith("train.jsonl:1") and corpus is not None and len(corpus) == 8


BAD_TRAIN = [
    ({"positive": ["0"]}, "messages[1].negative", "expected a list with one entry per query token"),
    ({"positive": ["0", "2"], "negative": [[], []]}, "messages[1].positive", "(1 in this turn), got 2"),
    ({"positive": ["0"], "negative": ["2"]}, "messages[1].negative[0]", "list of lists"),
    ({"positive": [["0", {"x": 1}]], "negative": [["2"]]}, "messages[1].positive[0]", "expected a uid"),
    ({"positive": ["7-3"], "negative": [["2"]]}, "messages[1].positive[0]", "uid '7-3' is not in the db"),
]


@pytest.mark.parametrize("fields, field, needle", BAD_TRAIN)
def test_train_bad_rows_name_file_line_and_field(tmp_path, fields, field, needle):
    good = {"messages": _user_assistant(f"{Q}<paragraph>x</paragraph>y", positive=["0"], negative=[["2"]])}
    bad = {"messages": _user_assistant(f"{Q}<paragraph>x</paragraph>y", **fields)}
    path = write_jsonl(tmp_path / "train.jsonl", [good, bad])
    db = read_original_db(FIXTURES / "db.jsonl", D)
    with pytest.raises(OneGenError) as e:
        read_original_train(path, PAPER_TOKENS, db)
    assert f"train.jsonl:2 field '{field}'" in str(e.value) and needle in str(e.value), str(e.value)


def test_train_needs_the_db_for_positives_and_user_turns_carry_none(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"messages": _user_assistant(f"{Q}y", positive=["0"], negative=[["2"]])}])
    with pytest.raises(OneGenError, match="t.jsonl:1 .*no db was given"):
        read_original_train(path, PAPER_TOKENS, None)
    msgs = _user_assistant("y")
    msgs[0]["positive"] = ["0"]
    path = write_jsonl(tmp_path / "u.jsonl", [{"messages": msgs}])
    with pytest.raises(OneGenError, match=r"u.jsonl:1 field 'messages\[0\]'"):
        read_original_train(path, PAPER_TOKENS, None)


def test_yaml_config_reads_the_paper_files_through_the_trainer():
    from onegen.trainer import load_training_data

    cfg = TrainConfig.from_dict({"data": {"format": "onegen-original", "train": str(FIXTURES / "train.jsonl"),
                                          "corpus": str(FIXTURES / "db.jsonl")},
                                 "tokens": {"query": Q, "doc": D}, "output_dir": "x"})
    corpus, samples = load_training_data(cfg)
    assert len(samples) == 6 and corpus.ids[:3] == ["0", "1-0", "1-1"]


def test_untargeted_query_tokens_are_generated_without_retrieval_loss(tiny_model, tmp_path):
    from onegen.tokens import RET
    from onegen.trainer import render_all

    row = {"messages": _user_assistant("[RQ]<paragraph>x</paragraph>y [RQ]<paragraph>z</paragraph>w",
                                       positive=[None, "0"], negative=[[], ["2"]])}
    path = write_jsonl(tmp_path / "t.jsonl", [row])
    db = read_original_db(FIXTURES / "db.jsonl", D)
    [sample] = read_original_train(path, TokensConfig(), db)
    [r] = render_all(tiny_model, [sample])
    query_id = tiny_model.ids.query
    positions = [i for i, t in enumerate(r.input_ids) if t == query_id]
    assert len(positions) == 2 and r.ret_positions == positions[1:]  # only the targeted one gives a vector
    assert [x.positives for x in r.retrievals] == [("0",)]
    assert all(r.lm_labels[p] == query_id for p in positions)  # both are still generated (GEN-trained)
    assert r.roles[positions[1]] == RET


# -- the workflow JSON ---------------------------------------------------------------------------

def test_workflow_maps_onto_train_config(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="onegen.workflow"):
        cfg = load_workflow(_workflow(tmp_path))
    assert (cfg.loss.type, cfg.loss.temperature, cfg.loss.negatives, cfg.loss.in_batch_negatives) == \
        ("bpr", 1.0, 2, False)  # the paper's BPR: raw cosines, own negatives only
    assert (cfg.loss.lm_weight, cfg.loss.retrieval_weight) == (1.0, 1.0)
    assert (cfg.tokens.query, cfg.tokens.doc, cfg.tokens.open, cfg.tokens.close) == (Q, D, "<paragraph>", "</paragraph>")
    assert cfg.tokens.descriptions["query"] == "the question to retrieve for" and cfg.tokens.extra == {}
    assert cfg.data.format == "onegen-original" and cfg.data.max_length == 256
    assert cfg.data.train == str(tmp_path / "train.jsonl") and cfg.data.corpus == str(tmp_path / "db.jsonl")
    assert cfg.output_dir == str(tmp_path / "output" / "tiny")
    t = cfg.train
    assert (t.batch_size, t.grad_accum, t.epochs, t.lr, t.precision, t.schedule, t.seed) == \
        (4, 2, 3, 2e-5, "bf16", "linear", 42)
    assert (t.save_every, t.keep_checkpoints, t.log_every) == (500, 10, 1)
    assert cfg.model.name_or_path == "./tiny-model" and cfg.model.trust_remote_code is False
    assert cfg.tokenizer.name_or_path is None  # the same as the model's
    assert "deepspeed" in caplog.text and "report_to" in caplog.text


def test_workflow_infonce_entity_linking_tokens_and_overrides(tmp_path):
    def edit(w):
        w["onegen"].update(loss_type="InfoNCE", n_neg_per_pos=4, lambda_r=0.5)
        w["special_token_list"] = {"GEN": {"[_CONTINUE_]": "continue to output"},
                                   "RET": {"[SE]": "description of entity", "[LK]": "information of subject"},
                                   "CTX": {}}
        w["info-data-db"]["repr_token"] = ["[SE]"]
        w["info-data-train"].update(repr_token=["[LK]"], mask_token_from_to=[],
                                    templator="EntityLinking_Llama2Templator")
        w["train"].update(bf16=False, max_steps=-1, lr_scheduler_type="cosine")

    cfg = load_workflow(_workflow(tmp_path, edit), ["--train.max_steps", "5"])
    assert (cfg.loss.type, cfg.loss.temperature, cfg.loss.negatives, cfg.loss.in_batch_negatives) == \
        ("infonce", 0.02, 4, True)
    assert cfg.loss.retrieval_weight == 0.5
    assert (cfg.tokens.query, cfg.tokens.doc, cfg.tokens.descriptions["doc"]) == ("[LK]", "[SE]", "description of entity")
    assert cfg.tokens.extra == {"[_CONTINUE_]": "continue to output"}
    assert (cfg.train.precision, cfg.train.schedule, cfg.train.max_steps) == ("no", "cosine", 5)


BAD_WORKFLOWS = [
    (lambda w: w.update(extra={}), "extra", "unknown section"),
    (lambda w: w["onegen"].update(loss_type="hinge"), "onegen.loss_type", "not BPR or InfoNCE"),
    (lambda w: w["onegen"].update(lambda_r="1"), "onegen.lambda_r", "expected int or float"),
    (lambda w: w["info-model"].update(max_len=3), "info-model.max_len", "unknown key"),
    (lambda w: w["train"].update(micro_batch_size=5), "train.micro_batch_size", "not a transformers"),
    (lambda w: w["train"].update(optim="sgd"), "train.optim", "AdamW"),
    (lambda w: w["train"].update(learning_rate="fast"), "train.learning_rate", "expected int or float"),
    (lambda w: w["train"].update(num_train_epochs=2.5), "train.num_train_epochs", "whole epochs"),
    (lambda w: w["info-data-train"].update(repr_token=["[RQ]"]), "info-data-train.repr_token", "RET"),
    (lambda w: w["info-data-train"].update(repr_token=[Q, D]), "info-data-train.repr_token", "exactly one"),
    (lambda w: w["info-data-db"].update(file_path=""), "info-data-db.file_path", "required"),
    (lambda w: w["info-model"].update(trust_remote_code=True), "info-model.trust_remote_code", "unknown key"),
]


@pytest.mark.parametrize("edit, field, needle", BAD_WORKFLOWS)
def test_workflow_bad_keys_name_file_line_and_key(tmp_path, edit, field, needle):
    path = _workflow(tmp_path, edit)
    with pytest.raises(OneGenError) as e:
        load_workflow(path)
    err = e.value
    assert err.file == str(path) and err.field == field and needle in err.message, err.one_line()
    key = field.split(".")[-1]
    assert err.line is not None and json.dumps(key) in path.read_text().splitlines()[err.line - 1], err.one_line()


def test_workflow_malformed_json_names_the_line(tmp_path):
    path = tmp_path / "w.json"
    path.write_text('{\n  "onegen": {\n    "loss_type": "BPR",,\n  }\n}\n')
    with pytest.raises(OneGenError, match=r"w.json:3: malformed JSON"):
        load_workflow(path)


# -- nothing read is executed --------------------------------------------------------------------

class _Payload:
    """Unpickling this creates `marker`: proof that a loader ran code from a file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


CRAFTED_NAMES = ["os.system", "__import__('os').system('touch {marker}')",
                 "open('{marker}', 'w')", "LlamaForCausalLM; open('{marker}', 'w')"]


@pytest.mark.parametrize("section, key", [("info-model", "model_class"), ("info-data-train", "templator"),
                                          ("info-data-db", "templator")])
@pytest.mark.parametrize("name", CRAFTED_NAMES)
def test_crafted_class_names_are_refused_not_evaluated(tmp_path, monkeypatch, section, key, name):
    import transformers.models.auto.modeling_auto  # noqa: F401  (imported before eval is patched)

    marker = tmp_path / "PWNED"
    path = _workflow(tmp_path, lambda w: w[section].update({key: name.format(marker=marker)}))

    def forbidden(*a, **k):
        raise AssertionError("eval/exec called")

    monkeypatch.setattr(builtins, "eval", forbidden)
    monkeypatch.setattr(builtins, "exec", forbidden)
    with pytest.raises(OneGenError) as e:
        load_workflow(path)
    assert e.value.field == f"{section}.{key}" and "never evaluates" in e.value.message
    assert not marker.exists()


def test_crafted_index_with_pickle_payload_does_not_run(tmp_path, tiny_model, corpus):
    from onegen.index import Index

    marker = tmp_path / "PWNED"
    index_dir = Index.build(tiny_model, corpus).save(tmp_path / "idx")
    payload = np.array([_Payload(marker)], dtype=object)
    np.save(tmp_path / "check.npy", payload, allow_pickle=True)
    np.load(tmp_path / "check.npy", allow_pickle=True)  # the payload is live: an unsafe loader runs it
    assert marker.exists()
    marker.unlink()
    np.save(index_dir / "vectors.npy", payload, allow_pickle=True)  # where the vectors are read
    for name in ("vectors.pkl", "index.pkl", "vectors.pt"):  # next to them: never opened
        (index_dir / name).write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(OneGenError, match="vectors.npy.*not a plain .npy array"):
        Index.load(index_dir)
    assert not marker.exists()


def test_crafted_pickled_weights_do_not_run(tmp_path, plain_tokenizer_dir):
    from transformers import AutoConfig

    from onegen.model import OneGenModel

    marker = tmp_path / "PWNED"
    model_dir = shutil.copytree(plain_tokenizer_dir, tmp_path / "model")
    AutoConfig.for_model("llama", vocab_size=700, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32).save_pretrained(str(model_dir))
    torch.save({"model.embed_tokens.weight": _Payload(marker)}, model_dir / "pytorch_model.bin")
    torch.load(model_dir / "pytorch_model.bin", weights_only=False)  # the payload is live for an unsafe loader
    assert marker.exists()
    marker.unlink()
    with pytest.raises(OneGenError, match="not unpickled"):
        OneGenModel.from_pretrained(model_dir)
    assert not marker.exists()


def test_trust_remote_code_is_off_unless_passed(tmp_path):
    assert TrainConfig().model.trust_remote_code is False
    assert load_workflow(_workflow(tmp_path)).model.trust_remote_code is False
    on = load_workflow(_workflow(tmp_path), ["--model.trust_remote_code", "true"])
    assert on.model.trust_remote_code is True


# -- onegen train --workflow ---------------------------------------------------------------------

def _tiny_checkpoint(tokenizer_dir: Path, out: Path) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    cfg = AutoConfig.for_model("llama", vocab_size=len(tok), hidden_size=64, num_hidden_layers=2,
                               num_attention_heads=4, intermediate_size=128, max_position_embeddings=512)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


def test_train_workflow_end_to_end(tmp_path, plain_tokenizer_dir, capsys, monkeypatch):
    import onegen.model as model_module

    path = _workflow(tmp_path)
    _tiny_checkpoint(plain_tokenizer_dir, tmp_path / "tiny-model")
    seen = []
    real = model_module.load_causal_lm
    monkeypatch.setattr(model_module, "load_causal_lm", lambda p, d, trust: seen.append(trust) or real(p, d, trust))
    rc = main(["train", "--workflow", str(path), "--no-progress", "--train.max_steps", "2", "--train.save_every", "2"])
    assert rc == 0, capsys.readouterr().err
    run = tmp_path / "output" / "tiny"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(r["lm_loss"] > 0 for r in rows)
    assert any(r["retrieval_loss"] > 0 for r in rows)
    meta = json.loads((run / "model" / "onegen.json").read_text())
    assert (meta["tokens"]["query"], meta["tokens"]["doc"]) == (Q, D)
    saved = TrainConfig.from_yaml(run / "config.yaml")
    assert saved.data.format == "onegen-original" and saved.loss.type == "bpr" and saved.train.max_steps == 2
    assert seen == [False]  # trust_remote_code stayed off
    assert not list(tmp_path.glob("*.cache*"))  # the paper's pickle caches are neither read nor written

    # a crafted checkpoint in the run directory: resuming from it runs nothing and stops with one line
    marker = tmp_path / "PWNED"
    ckpt = run / "checkpoints" / "step-2"
    for name in ("optimizer.bin", "random_states_0.pkl"):
        assert (ckpt / name).is_file(), sorted(p.name for p in ckpt.iterdir())
        torch.save({"state": _Payload(marker)}, ckpt / name)
    capsys.readouterr()
    assert main(["train", "--workflow", str(path), "--no-progress", "--train.max_steps", "3"]) == 2
    err = capsys.readouterr().err.strip()
    assert "step-2: a checkpoint file holds objects other than tensors" in err and "\n" not in err, err
    assert not marker.exists()


def test_train_workflow_bad_input_one_line_exit_2(tmp_path, capsys):
    path = _workflow(tmp_path)
    lines = (tmp_path / "train.jsonl").read_text().splitlines()
    lines[2] = lines[2].replace('"negative": [["0", "99-0"]]', '"negative": ["0"]')
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
    assert main(["train", "--workflow", str(path), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("onegen train: error: ") and "\n" not in err
    assert "train.jsonl:3 field 'messages[1].negative[0]'" in err, err
    assert not (tmp_path / "output").exists()


def test_index_reads_the_paper_db_split_at_the_models_document_token(tiny_model_dir, tmp_path, capsys):
    """`onegen index --corpus db.jsonl`: the paper's db is recognised (rows with uid and messages) and
    split at the model's own document token into the documents training reads (ids uid / uid-k)."""
    from onegen.index import Index

    db = tmp_path / "db.jsonl"
    db.write_text((FIXTURES / "db.jsonl").read_text().replace(json.dumps(D)[1:-1], "[RD]"))
    out = tmp_path / "idx"
    assert main(["index", "--model", str(tiny_model_dir), "--corpus", str(db), "--out", str(out)]) == 0
    expected = read_original_db(db, "[RD]").corpus
    index = Index.load(out)
    assert index.ids == expected.ids and len(index.ids) > 3
    assert [index.corpus[i].text for i in index.ids] == [d.text for d in expected.docs]
    plain = tmp_path / "plain"
    shutil.copytree(tiny_model_dir, plain, ignore=shutil.ignore_patterns("onegen.json"))
    assert main(["index", "--model", str(plain), "--corpus", str(db), "--out", str(tmp_path / "x")]) == 2
    assert "index it with a OneGen model directory" in capsys.readouterr().err
