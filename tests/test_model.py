"""Tests of onegen.model: one optimizer step trains every parameter, save/load round trips (full and
LoRA), query vectors equal a plain forward, fingerprints, and an encoder checkpoint loaded as a decoder."""

from __future__ import annotations

import copy
import json
import random
import shutil

import pytest
import torch

from onegen.collate import Collator
from onegen.config import LoraConfig, LossConfig
from onegen.data import Message
from onegen.losses import Objective
from onegen.model import OneGenModel
from onegen.modeldir import ONEGEN_JSON
from onegen.padding import pad_right

QUESTIONS = ["Who founded Velmora?", "Where was Ilsa Brandt born? Tell me.", "Hi"]


def _batch(model: OneGenModel, samples, corpus, n: int = 6) -> dict[str, torch.Tensor]:
    rendered = [model.renderer.render(s) for s in samples[:n]]
    collator = Collator(corpus, model.renderer.encode_document, model.ids.pad, negatives=2)
    return collator(rendered, random.Random(0))


def _step(model: OneGenModel, batch: dict[str, torch.Tensor], lr: float = 1e-3) -> dict[str, torch.Tensor]:
    """One full optimizer step as the trainer takes it."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    head = model.logits if model.head_isolated else None
    out = model(batch)
    terms = Objective(LossConfig())(out, batch, head, float(len(batch["lm_targets"])),
                                    float(len(batch["query_targets"])))
    terms["loss"].backward()
    opt.step()
    opt.zero_grad()
    model.eval()
    return terms


def _outputs(model: OneGenModel, texts: list[str]) -> dict[str, torch.Tensor]:
    """Hidden states, logits everywhere and both kinds of retrieval vectors, for comparisons."""
    seqs = [model.renderer.encode_prompt([Message("user", t)]) for t in texts]
    ids, mask = pad_right(seqs, model.ids.pad)
    positions = mask.nonzero()
    with torch.no_grad():
        hidden, logits, _ = model.run(ids, mask, logits_at=positions)
    return {"hidden": hidden[mask.bool()], "logits": logits, "queries": model.embed_queries(texts),
            "docs": model.embed_documents(texts)}


def _assert_same_outputs(a: dict, b: dict) -> None:
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


# -- training step -------------------------------------------------------------------------------

def test_every_trainable_parameter_changes_after_one_step(fresh_model, samples, corpus):
    batch = _batch(fresh_model, samples, corpus)
    assert len(batch["query_targets"]) > 0 and len(batch["lm_targets"]) > 0
    before = {n: p.detach().clone() for n, p in fresh_model.named_parameters() if p.requires_grad}
    terms = _step(fresh_model, batch)
    assert torch.isfinite(terms["loss"]) and terms["retrieval_loss"] > 0 and terms["lm_loss"] > 0
    unchanged = [n for n, p in fresh_model.named_parameters() if p.requires_grad and torch.equal(p, before[n])]
    assert not unchanged


def test_lora_trains_adapters_and_new_token_rows_only(fresh_model, samples, corpus):
    fresh_model.add_lora(LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    trainable = {n for n, p in fresh_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "token_adapter" in n for n in trainable), sorted(trainable)
    frozen = {n: p.detach().clone() for n, p in fresh_model.named_parameters() if not p.requires_grad}
    before = {n: p.detach().clone() for n, p in fresh_model.named_parameters() if p.requires_grad}
    batch = _batch(fresh_model, samples, corpus)
    for _ in range(2):  # LoRA B starts at zero, so A only moves from the second step on
        _step(fresh_model, batch)
    params = dict(fresh_model.named_parameters())
    assert [n for n in trainable if torch.equal(params[n], before[n])] == []
    assert [n for n in frozen if not torch.equal(params[n], frozen[n])] == []
    # an untied head: its new-token rows train too (else [RQ] could not be learnt through its own row)
    base = fresh_model.hf_model
    assert base.get_output_embeddings().weight is not base.get_input_embeddings().weight
    assert sum("token_adapter" in n for n in trainable) == 2, sorted(trainable)


# -- save / load ---------------------------------------------------------------------------------

def test_save_load_full_identical(tiny_model, tiny_model_dir):
    meta = json.loads((tiny_model_dir / ONEGEN_JSON).read_text())
    assert meta["lora"] is False and meta["tokens"]["query"] == "[RQ]"
    assert meta["token_ids"]["query"] == tiny_model.ids.query
    loaded = OneGenModel.from_pretrained(tiny_model_dir).eval()
    assert loaded.ids == tiny_model.ids and len(loaded.tokenizer) == len(tiny_model.tokenizer)
    _assert_same_outputs(_outputs(tiny_model, QUESTIONS), _outputs(loaded, QUESTIONS))


def test_save_load_lora_identical(tiny_model_dir, samples, corpus, tmp_path):
    base = OneGenModel.from_pretrained(tiny_model_dir)
    base.add_lora(LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    _step(base, _batch(base, samples, corpus), lr=1e-2)
    _step(base, _batch(base, samples, corpus), lr=1e-2)  # LoRA A and B and the token rows all moved
    before = _outputs(base, QUESTIONS)
    plain = _outputs(OneGenModel.from_pretrained(tiny_model_dir), QUESTIONS)
    assert not torch.allclose(before["logits"], plain["logits"])  # the adapter does something
    out = base.save_pretrained(tmp_path / "lora")
    meta = json.loads((out / ONEGEN_JSON).read_text())
    assert meta["lora"] is True and meta["base_model"] == str(tiny_model_dir)
    assert (out / "adapter_config.json").is_file() and not (out / "model.safetensors").exists()
    loaded = OneGenModel.from_pretrained(out).eval()
    assert loaded.is_lora
    _assert_same_outputs(before, _outputs(loaded, QUESTIONS))


def test_lora_saves_what_the_checkpoint_lacked(tiny_model_dir, samples, corpus, tmp_path):
    """A checkpoint without some weights (a base model without its head; MiniLM without its LM-head
    transform) gets them at random on every load: LoRA trains and saves those modules whole, so the
    saved model comes back the same (its index stays valid)."""
    from safetensors.torch import load_file, save_file

    ckpt = tmp_path / "headless"
    shutil.copytree(tiny_model_dir, ckpt)
    weights = load_file(ckpt / "model.safetensors")
    del weights["lm_head.weight"]
    save_file(weights, ckpt / "model.safetensors", metadata={"format": "pt"})
    model = OneGenModel.from_pretrained(ckpt, lora=LoraConfig(r=4, alpha=8, target_modules=["q_proj"]))
    assert any("lm_head" in n and p.requires_grad for n, p in model.lm.named_parameters())
    _step(model, _batch(model, samples, corpus), lr=1e-2)
    before = _outputs(model.eval(), QUESTIONS)
    out = model.save_pretrained(tmp_path / "lora")
    first, second = (OneGenModel.from_pretrained(out).eval() for _ in range(2))
    assert first.fingerprint() == second.fingerprint() == json.loads((out / ONEGEN_JSON).read_text())["fingerprint"]
    _assert_same_outputs(before, _outputs(first, QUESTIONS))


def test_lora_keeps_a_weight_the_checkpoint_lacked_inside_a_module_it_adapts(tokens, tiny_tokenizer, samples,
                                                                              corpus, tmp_path):
    """Qwen2's q_proj has a bias: with only its weight missing the module is not new as a whole, and
    LoRA adapts it; the random weight is saved beside the adapter and comes back on every load."""
    from safetensors.torch import load_file, save_file

    from onegen.config import ModelConfig, ScratchConfig, TokenizerConfig

    tok_dir = tmp_path / "tok"
    tiny_tokenizer.save_pretrained(str(tok_dir))
    torch.manual_seed(0)
    scratch = ScratchConfig(architecture="qwen2", hidden_size=32, num_layers=2, num_heads=2)
    ckpt = OneGenModel.from_config(ModelConfig(scratch=scratch), TokenizerConfig(name_or_path=str(tok_dir)),
                                   tokens).save_pretrained(tmp_path / "ckpt")
    weights = load_file(ckpt / "model.safetensors")
    del weights["model.layers.0.self_attn.q_proj.weight"]
    save_file(weights, ckpt / "model.safetensors", metadata={"format": "pt"})
    model = OneGenModel.from_pretrained(ckpt, lora=LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    before = _outputs(model.eval(), QUESTIONS)
    out = model.save_pretrained(tmp_path / "lora")
    first, second = (OneGenModel.from_pretrained(out) for _ in range(2))
    assert first.fingerprint() == second.fingerprint() == json.loads((out / ONEGEN_JSON).read_text())["fingerprint"]
    _assert_same_outputs(before, _outputs(first, QUESTIONS))


def test_lora_directories_merge_for_full_training_and_refuse_a_second_adapter(tiny_model_dir, samples, corpus,
                                                                              tmp_path):
    from onegen.errors import OneGenError

    model = OneGenModel.from_pretrained(tiny_model_dir, lora=LoraConfig(r=4, alpha=8, target_modules=["q_proj"]))
    _step(model, _batch(model, samples, corpus), lr=1e-2)
    out = model.eval().save_pretrained(tmp_path / "lora")
    with pytest.raises(OneGenError, match="holds a LoRA adapter"):
        OneGenModel.from_pretrained(out, lora=LoraConfig(r=4))
    loaded = OneGenModel.from_pretrained(out)
    with pytest.raises(OneGenError, match="holds a LoRA adapter"):  # the trainer's way: load, then add
        loaded.add_lora(LoraConfig(r=4, target_modules=["q_proj"]))
    assert not loaded.training  # loaded models come back in eval mode, and stay so after embedding
    loaded.embed_queries(QUESTIONS[:1])
    assert not loaded.training and not loaded.lm.training
    before = _outputs(loaded, QUESTIONS)
    loaded.merge_lora()
    assert not loaded.is_lora and all(p.requires_grad for p in loaded.parameters())
    merged = _outputs(loaded, QUESTIONS)
    for key in before:
        torch.testing.assert_close(merged[key], before[key], rtol=1e-4, atol=1e-5)
    with pytest.raises(OneGenError, match="field 'train.lora.target_modules'"):
        OneGenModel.from_pretrained(tiny_model_dir, lora=LoraConfig(r=4, target_modules=["nonexistent_proj"]))


def test_an_adapter_whose_base_moved_says_where_it_looked(tiny_model_dir, tmp_path):
    from onegen.errors import OneGenError

    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    out = OneGenModel.from_pretrained(base, lora=LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(
        tmp_path / "lora")
    shutil.rmtree(base)
    with pytest.raises(OneGenError, match=f"field 'base_model'.*{base}"):
        OneGenModel.from_pretrained(out)


def test_a_onegen_model_keeps_its_tokens_and_refuses_others(tiny_model_dir):
    from onegen.config import TokensConfig
    from onegen.errors import OneGenError

    assert OneGenModel.from_pretrained(tiny_model_dir, TokensConfig()).tokens.strings() == TokensConfig().strings()
    with pytest.raises(OneGenError, match=r"field 'tokens'.*uses the tokens \['\[RQ\]'"):
        OneGenModel.from_pretrained(tiny_model_dir, TokensConfig(query="<LOC>"))


def test_lora_from_train_section(tiny_model_dir, samples, corpus, tmp_path):
    """`TrainSection.lora` -> `from_pretrained(lora=...)`: the same wrapping as `add_lora`."""
    from onegen.config import TrainSection

    section = TrainSection(lora=LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    model = OneGenModel.from_pretrained(tiny_model_dir, lora=section.lora)
    assert model.is_lora and model.head_isolated
    _step(model, _batch(model, samples, corpus), lr=1e-2)
    _step(model, _batch(model, samples, corpus), lr=1e-2)
    out = model.save_pretrained(tmp_path / "lora")
    assert (out / ONEGEN_JSON).is_file()
    _assert_same_outputs(_outputs(model, QUESTIONS), _outputs(OneGenModel.from_pretrained(out).eval(), QUESTIONS))


def test_lora_base_path_recorded_absolute(tiny_model_dir, tmp_path, monkeypatch):
    """An adapter saved from a model loaded by a relative path still loads from another directory."""
    monkeypatch.chdir(tiny_model_dir.parent)
    model = OneGenModel.from_pretrained(tiny_model_dir.name)
    model.add_lora(LoraConfig(r=2, alpha=4, target_modules=["q_proj"]))
    out = model.save_pretrained(tmp_path / "lora")
    monkeypatch.chdir(tmp_path)
    assert json.loads((out / ONEGEN_JSON).read_text())["base_model"] == str(tiny_model_dir.resolve())
    assert OneGenModel.from_pretrained(out).is_lora


def test_save_is_atomic_over_an_existing_dir(tiny_model, tmp_path):
    out = tmp_path / "m"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    tiny_model.save_pretrained(out)
    assert (out / ONEGEN_JSON).is_file() and not (out / "stale.txt").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


# -- retrieval vectors ---------------------------------------------------------------------------

def test_embed_queries_equals_plain_forward_at_query_token(tiny_model):
    vecs = tiny_model.embed_queries(QUESTIONS, batch_size=2)  # batched and padded
    for text, vec in zip(QUESTIONS, vecs, strict=True):
        ids = tiny_model.renderer.encode_prompt([Message("user", text)]) + [tiny_model.ids.query]
        with torch.no_grad():
            out = tiny_model.hf_model(input_ids=torch.tensor([ids]), output_hidden_states=True)
        torch.testing.assert_close(vec, out.hidden_states[-1][0, -1], rtol=1e-5, atol=1e-5)


def test_embed_documents_equals_plain_forward_at_doc_token(tiny_model, corpus):
    texts = [d.text for d in corpus.docs[:5]]
    vecs = tiny_model.embed_documents(texts, batch_size=3)
    for text, vec in zip(texts, vecs, strict=True):
        ids = tiny_model.renderer.encode_document(text)
        assert ids[-1] == tiny_model.ids.doc
        with torch.no_grad():
            out = tiny_model.hf_model(input_ids=torch.tensor([ids]), output_hidden_states=True)
        torch.testing.assert_close(vec, out.hidden_states[-1][0, -1], rtol=1e-5, atol=1e-5)


def test_embedding_a_corpus_in_chunks_equals_all_at_once(tiny_model, corpus, monkeypatch):
    from onegen import model as model_module

    texts = [d.text for d in corpus.docs[:11]]
    whole = tiny_model.embed_documents(texts, batch_size=4)
    monkeypatch.setattr(model_module, "DOC_CHUNK", 3)  # four chunks, the last one short
    torch.testing.assert_close(tiny_model.embed_documents(texts, batch_size=4), whole, rtol=1e-5, atol=1e-6)


def test_training_forward_matches_plain_forward(tiny_model, samples, corpus):
    """The batch forward's query vectors and GEN logits equal a plain HF forward per sample."""
    batch = _batch(tiny_model, samples, corpus, n=3)
    with torch.no_grad():
        out = tiny_model(batch)
        full = tiny_model.hf_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                   output_hidden_states=True)
    q = batch["query_positions"]
    torch.testing.assert_close(out["query_vecs"], full.hidden_states[-1][q[:, 0], q[:, 1]], rtol=1e-5, atol=1e-5)
    lm = batch["lm_positions"]
    torch.testing.assert_close(tiny_model.logits(out["gen_hidden"]), full.logits[lm[:, 0], lm[:, 1]],
                               rtol=1e-4, atol=1e-4)


# -- fingerprint ---------------------------------------------------------------------------------

def test_fingerprint_stable_and_distinct(tiny_model, tiny_model_dir, fresh_model):
    fp = tiny_model.fingerprint()
    assert fp == tiny_model.fingerprint()
    assert json.loads((tiny_model_dir / ONEGEN_JSON).read_text())["fingerprint"] == fp
    assert OneGenModel.from_pretrained(tiny_model_dir).fingerprint() == fp
    with torch.no_grad():
        next(p for n, p in fresh_model.named_parameters() if "layers.1" in n).add_(0.01)
    assert fresh_model.fingerprint() != fp


def test_fingerprint_sees_the_special_token_rows(fresh_model):
    """A change to the [RD] embedding row alone moves every document vector; with a vocabulary much
    larger than the strided sample (4096 rows here) only the whole special-token rows (version 2) see
    it. An index of the version-1 kind is still accepted by its model."""
    from onegen.errors import OneGenError
    from onegen.index import Index

    model = copy.deepcopy(fresh_model)
    model.hf_model.resize_token_embeddings(4096)
    before, before_v1 = model.fingerprint(), model.fingerprint(version=1)
    assert before.startswith("v2-") and len(before_v1) == 16
    legacy = Index.from_vectors(torch.randn(2, model.hidden_size), ["a", "b"], before_v1)
    legacy.check_model(model)
    with torch.no_grad():
        model.hf_model.get_input_embeddings().weight[model.ids.doc] += 0.5
    assert model.fingerprint() != before
    with pytest.raises(OneGenError, match="built by model"):
        Index.from_vectors(torch.randn(2, model.hidden_size), ["a", "b"], before).check_model(model)


# -- any checkpoint ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bert_dir(plain_tokenizer_dir, tmp_path_factory):
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    tok = AutoTokenizer.from_pretrained(str(plain_tokenizer_dir))
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128, is_decoder=False)
    out = tmp_path_factory.mktemp("bert")
    BertForMaskedLM(cfg).save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


def test_encoder_checkpoint_loads_as_causal_decoder(bert_dir, tmp_path):
    model = OneGenModel.from_pretrained(bert_dir).eval()
    assert model.hf_model.config.is_decoder
    assert model.head_isolated
    ids = model.renderer.encode_prompt([Message("user", QUESTIONS[1])]) + [model.ids.query]
    changed = list(ids)
    changed[-3:] = [model.ids.doc, model.ids.open, model.ids.close]
    with torch.no_grad():
        a, _ = model.hidden_states(torch.tensor([ids]))
        b, _ = model.hidden_states(torch.tensor([changed]))
    n = len(ids) - 3
    torch.testing.assert_close(a[0, :n], b[0, :n], rtol=0, atol=1e-6)  # causal: the past ignores the future
    assert not torch.allclose(a[0, n:], b[0, n:])
    out = model.save_pretrained(tmp_path / "m")  # and it round-trips as a decoder
    again = OneGenModel.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(again.hidden_states(torch.tensor([ids]))[0], a, rtol=0, atol=0)


def test_bad_model_dir_is_a_user_error(tmp_path):
    from onegen.errors import OneGenError

    with pytest.raises(OneGenError):
        OneGenModel.from_pretrained(tmp_path / "nothing-here")


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma2", "gpt2", "gpt_neox", "falcon", "gptj"])
def test_scratch_models_of_any_family_save_and_load(arch, tiny_tokenizer, tmp_path):
    """Sizes go in when the config is made: fields derived from them (Qwen3's per-layer `layer_types`)
    agree, read-only properties (Falcon's head_dim) are left alone, and the saved model loads back."""
    from transformers import AutoModelForCausalLM

    from onegen.config import ModelConfig, ScratchConfig
    from onegen.hfparts import build_scratch_lm

    lm = build_scratch_lm(ModelConfig(scratch=ScratchConfig(architecture=arch, hidden_size=32, num_layers=2,
                                                            num_heads=2)), tiny_tokenizer)
    lm.save_pretrained(str(tmp_path))
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path))
    assert back.config.num_hidden_layers == 2 and back.config.vocab_size == len(tiny_tokenizer)
    ids = torch.tensor([[1, 2, 3]])
    torch.testing.assert_close(back(ids).logits, lm.eval()(ids).logits)


def test_a_local_path_that_does_not_exist_fails_at_once(tmp_path):
    """An absolute or ./ path cannot be a hub id: no download attempts (offline: half a minute of retries)."""
    from onegen.errors import OneGenError

    for path in (str(tmp_path / "missing"), "./missing-model-dir"):
        with pytest.raises(OneGenError, match="model directory not found"):
            OneGenModel.from_pretrained(path)
