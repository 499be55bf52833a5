"""Shared fixtures: a tiny generated world, a tiny BPE tokenizer and a tiny model, each built ONCE.

Session-scoped objects must not be mutated by tests: take `fresh_model` (a deep copy) to train or
wrap a model, and `copy.deepcopy(tiny_tokenizer)` to change a tokenizer.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import settings

from onegen.config import ModelConfig, ScratchConfig, TokenizerConfig, TokensConfig
from onegen.data import Corpus, Message, Retrieval, Sample, read_corpus, read_samples
from onegen.model import OneGenModel
from onegen.synth import synth
from onegen.tokenizer import train_bpe

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# CI runs the same hypothesis examples every time (a failure there is reproducible); locally they vary
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")
# Tiny models: one thread is fastest, and with more, OpenMP spin-waiting on a busy 2-core machine makes a
# 64-wide matmul 40x slower. Subprocesses (the CLI, torchrun) inherit the variable.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

TINY_SIZE = 40  # entities in the generated world (>= 20)
TINY_HIDDEN, TINY_LAYERS, TINY_HEADS = 64, 2, 4
TINY_VOCAB = 600

# The sample of CONTRACT.md ("Training sample (native)").
CONTRACT_DOC = {"id": "d17", "text": "Velmora was founded by Ilsa Brandt in 1901.", "title": "Velmora"}
CONTRACT_SAMPLE = {
    "id": "q1",
    "messages": [{"role": "user", "content": "Who founded Velmora?"},
                 {"role": "assistant",
                  "content": "[RQ]<paragraph>Velmora was founded by Ilsa Brandt in 1901.</paragraph>Ilsa Brandt"}],
    "retrievals": [{"positives": ["d17"], "negatives": ["d3", "d9"]}],
}


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    """Write rows as JSONL; a `str` row is written verbatim (for malformed lines)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def contract_sample(source: str = "") -> Sample:
    return Sample("q1", (Message("user", "Who founded Velmora?"),
                         Message("assistant", CONTRACT_SAMPLE["messages"][1]["content"])),
                  (Retrieval(("d17",), ("d3", "d9")),), source)


@pytest.fixture(scope="session")
def tokens() -> TokensConfig:
    return TokensConfig()


@pytest.fixture(scope="session")
def qa_world(tmp_path_factory) -> dict[str, Any]:
    """A small generated QA world: `corpus`, `train`, `eval` paths (str) and `dir` (Path)."""
    out = tmp_path_factory.mktemp("qa_world")
    info = synth("qa", out, seed=0, size=TINY_SIZE)
    return {**info, "dir": out}


@pytest.fixture(scope="session")
def corpus(qa_world) -> Corpus:
    return read_corpus(qa_world["corpus"])


@pytest.fixture(scope="session")
def samples(qa_world, corpus, tokens) -> list[Sample]:
    return read_samples(qa_world["train"], tokens.query, corpus, close_token=tokens.close, open_token=tokens.open)


@pytest.fixture(scope="session")
def world_texts(corpus, samples) -> list[str]:
    return [m.content for s in samples for m in s.messages] + [d.text for d in corpus.docs]


@pytest.fixture(scope="session")
def tiny_tokenizer(world_texts, tokens):
    """A byte-level BPE trained on the world, with the special tokens as single tokens."""
    return train_bpe(world_texts, vocab_size=TINY_VOCAB, special_tokens=tokens.strings())


@pytest.fixture(scope="session")
def plain_tokenizer_dir(world_texts, tmp_path_factory) -> Path:
    """A saved BPE tokenizer WITHOUT onegen's special tokens (as a pretrained model's would be)."""
    out = tmp_path_factory.mktemp("plain_tokenizer")
    train_bpe(world_texts, vocab_size=TINY_VOCAB).save_pretrained(str(out))
    return out


@pytest.fixture(scope="session")
def tiny_model(tiny_tokenizer, tokens, tmp_path_factory) -> OneGenModel:
    """A tiny from-scratch Llama OneGen model (do not mutate: use `fresh_model`)."""
    tok_dir = tmp_path_factory.mktemp("tiny_tokenizer")
    tiny_tokenizer.save_pretrained(str(tok_dir))
    torch.manual_seed(0)
    scratch = ScratchConfig(architecture="llama", hidden_size=TINY_HIDDEN, num_layers=TINY_LAYERS,
                            num_heads=TINY_HEADS, intermediate_size=2 * TINY_HIDDEN)
    model = OneGenModel.from_config(ModelConfig(scratch=scratch), TokenizerConfig(name_or_path=str(tok_dir)),
                                    tokens, max_length=256, doc_max_length=128)
    return model.eval()


@pytest.fixture
def fresh_model(tiny_model) -> OneGenModel:
    """A private deep copy of the tiny model, free to train or wrap."""
    return copy.deepcopy(tiny_model)


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_model, tmp_path_factory) -> Path:
    """The tiny model saved with `save_pretrained` (a OneGen model directory)."""
    return tiny_model.save_pretrained(tmp_path_factory.mktemp("tiny_model") / "model")
