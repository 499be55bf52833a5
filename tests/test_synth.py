"""Tests of onegen.synth: file schemas, answer/document consistency, held-out splits, determinism."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from onegen.errors import OneGenError
from onegen.synth import synth

TASKS = ("qa", "multihop", "el")
RQ, OPEN, CLOSE = "[RQ]", "<paragraph>", "</paragraph>"


def _load(out: Path) -> dict[str, Any]:
    rows = {name: [json.loads(line) for line in (out / f"{name}.jsonl").read_text("utf-8").splitlines()]
            for name in ("corpus", "train", "eval")}
    rows["world"] = json.loads((out / "world.json").read_text("utf-8"))
    rows["docs"] = {d["id"]: d for d in rows["corpus"]}
    return rows


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, dict[str, Any]]:
    out = {}
    for task in TASKS:
        d = tmp_path_factory.mktemp(task)
        result = synth(task, d, seed=0)
        out[task] = {**_load(d), "result": result}
    return out


def _pattern(template: str) -> re.Pattern[str]:
    """A template as a regex: each {slot} matches any text."""
    return re.compile("(.+)".join(re.escape(p) for p in re.split(r"\{\w+\}", template)))


def _all_templates(templates: Any) -> list[str]:
    return list(templates) if isinstance(templates, list) else [t for ts in templates.values() for t in ts]


def _matches(text: str, templates: list[str]) -> bool:
    return any(_pattern(t).fullmatch(text) for t in templates)


@pytest.mark.parametrize("task", TASKS)
def test_result_counts_and_sizes(data, task):
    d = data[task]
    assert d["result"]["counts"] == {"corpus": 200, "train": len(d["train"]), "eval": len(d["eval"])}
    assert d["world"]["counts"] == d["result"]["counts"]
    assert all(Path(d["result"][k]).is_file() for k in ("corpus", "train", "eval", "world"))
    kept = 200 - len(d["world"]["held_out_entities"])
    assert 0.8 * 3 * kept <= len(d["train"]) <= 3 * kept
    assert abs(len(d["eval"]) - 0.2 * len(d["train"])) <= 1


def test_corpus_schema_and_distractors(data):
    corpus = data["qa"]["corpus"]
    assert all(set(doc) == {"id", "title", "text"} for doc in corpus)
    assert len({doc["id"] for doc in corpus}) == len({doc["title"] for doc in corpus}) == len(corpus)
    assert all(doc["title"] in doc["text"] and 10 <= len(doc["text"].split()) <= 40 for doc in corpus)
    words: dict[str, int] = {}
    for doc in corpus:
        for w in doc["title"].split():
            words[w] = words.get(w, 0) + 1
    shared = [doc for doc in corpus if any(words[w] > 1 for w in doc["title"].split())]
    assert len(shared) > 0.8 * len(corpus)  # most names have look-alikes
    titles = {doc["title"] for doc in corpus}
    assert any(t.split()[0] in titles for t in titles if " " in t)  # "Velmora" and "Velmora Falls"


@pytest.mark.parametrize("task,hops", [("qa", 1), ("multihop", 2)])
def test_train_samples(data, task, hops):
    docs = data[task]["docs"]
    for sample in data[task]["train"]:
        assert set(sample) == {"id", "messages", "retrievals"}
        user, assistant = sample["messages"]
        assert (user["role"], assistant["role"]) == ("user", "assistant")
        content, retrievals = assistant["content"], sample["retrievals"]
        assert content.count(RQ) == len(retrievals) == hops
        steps = re.findall(re.escape(RQ) + re.escape(OPEN) + "(.*?)" + re.escape(CLOSE) + "([^[]*)", content)
        assert len(steps) == hops
        for (paragraph, out), r in zip(steps, retrievals, strict=True):
            (pos,) = r["positives"]
            assert paragraph == docs[pos]["text"] and out in paragraph
            assert 2 <= len(r["negatives"]) <= 3 and pos not in r["negatives"]
            assert all(n in docs for n in r["negatives"])
        if hops == 2:  # the bridge output names the second document's entity
            assert steps[0][1] == docs[retrievals[1]["positives"][0]]["title"]


@pytest.mark.parametrize("task,hops", [("qa", 1), ("multihop", 2)])
def test_eval_items(data, task, hops):
    docs = data[task]["docs"]
    for item in data[task]["eval"]:
        assert set(item) == {"id", "question", "answers", "gold_docs"}
        assert len(item["gold_docs"]) == hops and all(len(h) == 1 and h[0] in docs for h in item["gold_docs"])
        (answer,) = item["answers"]
        assert answer and answer in docs[item["gold_docs"][-1][0]]["text"]


@pytest.mark.parametrize("task", TASKS)
def test_held_out_entities_only_in_eval(data, task):
    d = data[task]
    held = set(d["world"]["held_out_entities"])
    assert 0.15 * 200 <= len(held) <= 0.3 * 200
    if task == "el":
        train_ids = {e["id"] for item in d["train"] for e in item["entities"]}
        eval_subjects = {e["id"] for item in d["eval"] for e in item["entities"]}
    else:
        train_ids = {p for s in d["train"] for r in s["retrievals"] for p in r["positives"]}
        eval_subjects = {item["gold_docs"][0][0] for item in d["eval"]}
    assert not train_ids & held
    assert eval_subjects <= held


@pytest.mark.parametrize("task", TASKS)
def test_held_out_templates_only_in_eval(data, task):
    d = data[task]
    templates = d["world"]["templates"]
    if task != "el":
        assert all(len(ts) >= 4 for ts in templates["train"].values())
        assert all(len(ts) >= 2 for ts in templates["held_out"].values())
    train_t, held_t = _all_templates(templates["train"]), _all_templates(templates["held_out"])
    key = "text" if task == "el" else "question"
    train_texts = [s["text"] if task == "el" else s["messages"][0]["content"] for s in d["train"]]
    assert all(_matches(t, train_t) and not _matches(t, held_t) for t in train_texts)
    with_held = [item["id"] for item in d["eval"] if _matches(item[key], held_t)]
    assert with_held and with_held == d["world"]["eval_ids_with_held_out_templates"]
    assert all(_matches(item[key], train_t + held_t) for item in d["eval"])


def test_el_items(data):
    d = data["el"]
    for item in d["train"] + d["eval"]:
        assert set(item) == {"id", "text", "entities"}
        assert 1 <= len(item["entities"]) <= 3
        ends = 0
        for e in item["entities"]:
            assert set(e) == {"start", "end", "id"} and e["start"] >= ends
            assert item["text"][e["start"]:e["end"]] == d["docs"][e["id"]]["title"]
            ends = e["end"]


@pytest.mark.parametrize("task", TASKS)
def test_deterministic_per_seed(tmp_path, task):
    names = ("corpus.jsonl", "train.jsonl", "eval.jsonl", "world.json")
    synth(task, tmp_path / "a", seed=3, size=60)
    synth(task, tmp_path / "c", seed=4, size=60)
    code = f"from onegen.synth import synth; synth({task!r}, {str(tmp_path / 'b')!r}, seed=3, size=60)"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}  # set iteration order must not leak into files
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    for name in names[:3]:
        assert (tmp_path / "a" / name).read_bytes() != (tmp_path / "c" / name).read_bytes()


def test_custom_tokens(tmp_path):
    tokens = {"query": "<q>", "open": "<doc>", "close": "</doc>"}
    synth("multihop", tmp_path, size=40, tokens=tokens)
    world = json.loads((tmp_path / "world.json").read_text("utf-8"))
    assert world["tokens"] == {"query": "<q>", "doc": "[RD]", "open": "<doc>", "close": "</doc>"}
    for line in (tmp_path / "train.jsonl").read_text("utf-8").splitlines():
        content = json.loads(line)["messages"][1]["content"]
        assert content.startswith("<q><doc>") and content.count("<q>") == 2 and RQ not in content


@pytest.mark.parametrize("kwargs", [{"task": "summarise"}, {"size": 5}, {"tokens": {"querry": "[Q]"}},
                                    {"tokens": {"query": ""}}])
def test_bad_arguments(tmp_path, kwargs):
    with pytest.raises(OneGenError):
        synth(**{"task": "qa", "out_dir": tmp_path, **kwargs})
    assert not list(tmp_path.iterdir())
