"""Packed training batches (`packing`, `Collator(pack=True)`): the layout is valid, the mask is block-diagonal
causal, and a packed forward gives the same vectors, loss and gradients as the padded one, for every family
that passes the probe; a model that does not (ALiBi) is refused by the probe and trained padded."""

from __future__ import annotations

import logging
import random

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from onegen.bench.train import PAPER_BATCH, make_batch
from onegen.collate import Collator
from onegen.config import LossConfig, ModelConfig, ScratchConfig
from onegen.data import Corpus, Document
from onegen.errors import OneGenError
from onegen.losses import Objective
from onegen.model import OneGenModel
from onegen.packing import block_mask, pack

PAD = 0
LOSS = LossConfig(negatives=PAPER_BATCH["negatives"], in_batch_negatives=True)


# -- the layout ----------------------------------------------------------------------------------

@given(st.lists(st.integers(1, 40), min_size=1, max_size=30), st.sampled_from([1, 8, 64]))
def test_pack_places_every_sequence_whole_and_alone(lengths, multiple):
    seqs = [[1000 * i + t + 1 for t in range(n)] for i, n in enumerate(lengths)]
    p = pack(seqs, PAD, multiple)
    rows, width = p.input_ids.shape
    assert width % multiple == 0 and max(lengths) <= width < max(lengths) + multiple
    owner = torch.full((rows, width), -1)
    for i, ((r, c), s) in enumerate(zip(p.places, seqs, strict=True)):
        assert p.input_ids[r, c:c + len(s)].tolist() == s
        assert p.position_ids[r, c:c + len(s)].tolist() == list(range(len(s)))
        assert len(set(p.segment_ids[r, c:c + len(s)].tolist())) == 1
        assert (owner[r, c:c + len(s)] == -1).all()  # no overlap
        owner[r, c:c + len(s)] = i
    for r in range(rows):  # segments differ between sequences; the tail is padding of its own segment
        used = owner[r] >= 0
        assert used.any() and (p.input_ids[r][~used] == PAD).all()
        assert not used[used.long().argmin():].any() or used.all()  # sequences first, then the tail
        seg = p.segment_ids[r]
        assert len(set(seg.tolist())) == len(set(owner[r][used].tolist())) + int((~used).any())
    # first-fit decreasing: no row could have held the shortest sequence of a later row
    room = [width - int((owner[r] >= 0).sum()) for r in range(rows)]
    for r in range(1, rows):
        shortest = min(len(seqs[i]) for i in set(owner[r].tolist()) - {-1})
        assert all(room[q] < shortest for q in range(r)) or rows == 1


def test_pack_fills_rows_far_better_than_padding():
    rng = random.Random(0)
    lengths = [rng.randint(300, 900) for _ in range(2)] + [rng.randint(40, 200) for _ in range(28)]
    p = pack([[1] * n for n in lengths], PAD)
    assert sum(lengths) / p.input_ids.numel() > 0.8  # per-kind padding of this batch: ~0.62


def test_block_mask_is_block_diagonal_causal():
    seg = torch.tensor([[0, 0, 0, 1, 1, 2]])
    m = block_mask(seg, "bool", torch.float32)[0, 0]
    want = torch.tensor([[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0],
                         [0, 0, 0, 1, 0, 0], [0, 0, 0, 1, 1, 0], [0, 0, 0, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(m, want)
    add = block_mask(seg, "additive", torch.bfloat16)[0, 0]
    assert add.dtype == torch.bfloat16 and torch.equal(add == 0, want)
    assert (add[~want] == torch.finfo(torch.bfloat16).min).all()


# -- the packed forward equals the padded one ------------------------------------------------------

def _model(arch: str, tokenizer, tokens) -> OneGenModel:
    torch.manual_seed(0)
    if arch == "bert":  # a BERT turned decoder, as the demo's MiniLM
        from transformers import BertConfig, BertLMHeadModel

        lm = BertLMHeadModel(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, intermediate_size=64, is_decoder=True))
    else:
        from onegen.hfparts import build_scratch_lm

        lm = build_scratch_lm(ModelConfig(scratch=ScratchConfig(architecture=arch, hidden_size=32, num_layers=2,
                                                                num_heads=2)), tokenizer)
    return OneGenModel(lm, tokenizer, tokens, max_length=512, doc_max_length=256)


def _both(model: OneGenModel, seed: int = 1, scale: float = 0.05):
    batch = make_batch(model, scale, seed)
    corpus = Corpus([Document(d, d) for d in batch.docs])
    out = []
    for pk in (False, True):
        collator = Collator(corpus, batch.docs.__getitem__, model.ids.pad, LOSS.negatives, True, pack=pk,
                            query_id=model.ids.query, query_weight=2.0)
        out.append(collator(batch.answers, random.Random(0)))
    return out


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer, tokens):
    import copy

    from onegen.tokens import add_special_tokens

    tok = copy.deepcopy(tiny_tokenizer)
    add_special_tokens(tok, tokens)
    return tok


@pytest.mark.parametrize("arch,kind", [("llama", "bool"), ("qwen3", "bool"), ("gemma2", "additive"),
                                       ("gpt2", "bool"), ("gpt_neox", "bool"), ("bert", "bool")])
def test_packed_forward_equals_padded_forward(arch, kind, tokenizer, tokens):
    """Same GEN hidden states, query vectors and document vectors, in the same order, whatever the family:
    rotary or absolute positions, SDPA (boolean mask) or eager attention (additive mask)."""
    model = _model(arch, tokenizer, tokens).eval()
    assert model.packing_mask_kind() == kind
    padded, packed = _both(model)
    assert "segment_ids" in packed and "doc_input_ids" not in packed and "segment_ids" not in padded
    assert packed["input_ids"].numel() < padded["input_ids"].numel() + padded["doc_input_ids"].numel()
    for key in ("lm_targets", "query_targets", "doc_keys", "n_tokens", "lm_weights"):
        assert torch.equal(padded[key], packed[key]), key
    with torch.no_grad():
        a, b = model(padded), model(packed)
    for key in ("gen_hidden", "query_vecs", "doc_vecs"):
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-5)


def test_position_ids_alone_separate_the_sequences(tokenizer, tokens):
    """The "positions" kind (for attention kernels that take no tensor mask): no mask is passed and the
    model finds the boundaries from the restarting position ids (transformers' packed-sequence path)."""
    model = _model("llama", tokenizer, tokens).eval()
    model._packing_kind = "positions"
    padded, packed = _both(model)
    with torch.no_grad():
        a, b = model(padded), model(packed)
    for key in ("gen_hidden", "query_vecs", "doc_vecs"):
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-5)


def test_packed_step_has_the_padded_steps_loss_and_gradients(fresh_model):
    fresh_model.train()
    grads = []
    for batch in _both(fresh_model, seed=2):
        fresh_model.zero_grad(set_to_none=True)
        out = fresh_model(batch)
        terms = Objective(LOSS)(out, batch, fresh_model.logits, float(len(batch["lm_targets"])),
                                float(len(batch["query_targets"])))
        terms["loss"].backward()
        grads.append((terms, {n: p.grad.clone() for n, p in fresh_model.named_parameters() if p.grad is not None}))
    (t1, g1), (t2, g2) = grads
    assert float(t1["retrieval_loss"]) > 0.1 and float(t1["lm_loss"]) > 1.0
    for k in ("loss", "lm_loss", "retrieval_loss"):
        torch.testing.assert_close(t2[k], t1[k], rtol=1e-5, atol=1e-6)
    assert g1.keys() == g2.keys() and g1
    for name in g1:
        assert (g1[name] - g2[name]).norm() <= 1e-4 * g1[name].norm().clamp(min=1e-8), name


def test_pack_limit_keeps_long_batches_padded(tiny_model):
    batch = make_batch(tiny_model, 0.05, 1)
    corpus = Corpus([Document(d, d) for d in batch.docs])
    longest = max(len(a) for a in batch.answers)
    for limit, is_packed in ((longest, True), (longest - 1, False)):
        out = Collator(corpus, batch.docs.__getitem__, tiny_model.ids.pad, 6, pack=True,
                       pack_limit=limit)(batch.answers, random.Random(0))
        assert ("segment_ids" in out) is is_packed


# -- a model that does not pack -----------------------------------------------------------------

def test_alibi_model_fails_the_probe_and_trains_padded(tokenizer, tokens, qa_world, tmp_path, caplog):
    """Bloom's ALiBi biases come from the 2-D mask, so a packed row would change its outputs: the probe
    says so, a packed batch is refused with the reason, and the trainer falls back to padded batches."""
    model = _model("bloom", tokenizer, tokens)
    assert model.packing_mask_kind() is None
    _, packed = _both(model)
    with pytest.raises(OneGenError, match="train.packing"):
        model(packed)

    from onegen import trainer

    with caplog.at_level(logging.WARNING, logger="onegen.trainer"):
        assert trainer._packs(model) is False
    assert "padded batches" in caplog.text


def test_training_packed_and_padded_follow_the_same_curve(qa_world, tiny_tokenizer, tmp_path):
    """`train.packing` changes the layout, not the training: three steps give the same losses."""
    from onegen.config import TrainConfig
    from onegen.trainer import train

    tok_dir = tmp_path / "tok"
    tiny_tokenizer.save_pretrained(str(tok_dir))
    curves = []
    for packing in (True, False):
        cfg = TrainConfig.from_dict({
            "model": {"scratch": {"architecture": "llama", "hidden_size": 32, "num_layers": 2, "num_heads": 2}},
            "tokenizer": {"name_or_path": str(tok_dir)},
            "data": {"train": qa_world["train"], "corpus": qa_world["corpus"], "max_length": 256},
            "train": {"max_steps": 3, "batch_size": 4, "lr": 1e-3, "packing": packing, "progress": False,
                      "log_every": 1, "precision": "no"},
            "output_dir": str(tmp_path / f"run-{packing}")})
        run = train(cfg)
        import json

        curves.append([json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()])
    assert len(curves[0]) == len(curves[1]) == 3
    for a, b in zip(*curves, strict=True):
        for k in ("lm_loss", "retrieval_loss"):
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), (a["step"], k)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_packed_step_on_cuda_in_bf16():
    """On the GPU (SDPA, bf16, autocast as the trainer runs it) the probe accepts packing and the packed
    step's loss is the padded step's to bf16 rounding."""
    from onegen.bench.train import build_model, onegen_loss

    model = build_model("1b-mini", "cuda", torch.bfloat16).train()
    assert model.packing_mask_kind() == "bool"
    batch = make_batch(model, 0.2, 3)
    losses = [float(onegen_loss(model, batch, LOSS, pack=p)) for p in (False, True)]
    assert losses[0] > 1.0 and losses[1] == pytest.approx(losses[0], rel=2e-2)


def test_long_samples_beside_short_documents_pack_apart(tokenizer, tokens):
    """With `attention_cost`, a batch of long samples and short documents packs each kind at its own width
    (two forwards) when the wide rows' dense attention would cost more; the vectors are the same."""
    model = _model("llama", tokenizer, tokens).eval()  # hidden 32: attention weighs a lot per position
    batch = make_batch(model, 0.5, 4)  # answers of 150-450 tokens, documents of 20-100
    corpus = Corpus([Document(d, d) for d in batch.docs])

    def collate(cost):
        return Collator(corpus, batch.docs.__getitem__, model.ids.pad, LOSS.negatives, True, pack=True,
                        attention_cost=cost)(batch.answers, random.Random(0))

    apart, together = collate(1 / (6 * 32)), collate(1 / (6 * 4096))  # a 32-wide model, a 7B-wide one
    assert "doc_segment_ids" in apart and "doc_segment_ids" not in together
    assert apart["doc_input_ids"].shape[1] < apart["input_ids"].shape[1]  # documents at their own width
    padded = Collator(corpus, batch.docs.__getitem__, model.ids.pad, LOSS.negatives, True)(batch.answers,
                                                                                          random.Random(0))
    with torch.no_grad():
        want = model(padded)
        for got in (model(apart), model(together)):
            for key in ("gen_hidden", "query_vecs", "doc_vecs"):
                torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-5)
