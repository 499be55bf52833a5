"""Tests of onegen.tokens: special tokens are single tokens; new rows start as description means."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from onegen.config import TokensConfig
from onegen.tokens import add_special_tokens, init_new_embeddings, token_ids

EXTRA = TokensConfig(extra={"[ANSWER]": "the final answer follows"})


@pytest.fixture
def plain_tokenizer(plain_tokenizer_dir):
    """A fresh copy of a BPE tokenizer without onegen's tokens."""
    return AutoTokenizer.from_pretrained(str(plain_tokenizer_dir))


def _llama(vocab_size: int, tie: bool):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=64, tie_word_embeddings=tie)
    return AutoModelForCausalLM.from_config(cfg)


@pytest.mark.parametrize("token_set", [TokensConfig(), EXTRA,
                                       TokensConfig(query="<ret>", doc="<doc>", open="<p>", close="</p>")])
def test_special_tokens_become_single_tokens(plain_tokenizer, token_set):
    tokens = token_set
    before = len(plain_tokenizer)
    added = add_special_tokens(plain_tokenizer, tokens)
    assert set(added) == set(tokens.strings())
    assert len(plain_tokenizer) == before + len(tokens.strings())
    for t in tokens.strings():
        assert len(plain_tokenizer.encode(t, add_special_tokens=False)) == 1
    ids = token_ids(plain_tokenizer, tokens)
    text = f"Who?{tokens.query}{tokens.open}Velmora was founded.{tokens.close}Ilsa{tokens.doc}"
    enc = plain_tokenizer.encode(text, add_special_tokens=False)
    for tid in (ids.query, ids.open, ids.close, ids.doc):
        assert enc.count(tid) == 1
    assert plain_tokenizer.decode(enc) == text
    assert add_special_tokens(plain_tokenizer, tokens) == []  # idempotent


def test_existing_tokens_are_not_added_twice(tiny_tokenizer, tokens):
    import copy

    tok = copy.deepcopy(tiny_tokenizer)
    n = len(tok)
    assert add_special_tokens(tok, tokens) == []
    assert len(tok) == n


def _expected_means(weight: torch.Tensor, tokenizer, tokens: TokensConfig) -> dict[str, torch.Tensor]:
    out = {}
    for t in tokens.strings():
        desc = tokenizer.encode(tokens.description_of(t), add_special_tokens=False)
        out[t] = weight[desc].float().mean(0)
    return out


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_new_rows_are_description_means(plain_tokenizer, tie):
    tokens = EXTRA
    model = _llama(len(plain_tokenizer), tie)
    emb_before = model.get_input_embeddings().weight.detach().clone()
    out_before = model.get_output_embeddings().weight.detach().clone()
    added = add_special_tokens(plain_tokenizer, tokens)
    init_new_embeddings(model, plain_tokenizer, added, tokens)
    emb, out = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert emb.shape[0] == len(plain_tokenizer)
    assert (out.data_ptr() == emb.data_ptr()) == tie  # the tie survives the resize
    old = emb_before.shape[0]
    assert torch.equal(emb[:old], emb_before) and torch.equal(out[:old], out_before)  # old rows untouched
    want_in = _expected_means(emb_before, plain_tokenizer, tokens)
    want_out = _expected_means(out_before, plain_tokenizer, tokens)
    for t in tokens.strings():
        row = plain_tokenizer.convert_tokens_to_ids(t)
        assert row >= old
        torch.testing.assert_close(emb[row].float(), want_in[t])
        torch.testing.assert_close(out[row].float(), want_in[t] if tie else want_out[t])
    if not tie:  # the untied head's rows come from the head, not from the input embeddings
        row = plain_tokenizer.convert_tokens_to_ids(tokens.query)
        assert not torch.allclose(out[row], emb[row])


def test_padded_vocabulary_reuses_rows(plain_tokenizer, tokens):
    padded = len(plain_tokenizer) + 16  # like models whose vocabulary is padded to a multiple of 64
    model = _llama(padded, tie=False)
    emb_before = model.get_input_embeddings().weight.detach().clone()
    out_before = model.get_output_embeddings().weight.detach().clone()
    added = add_special_tokens(plain_tokenizer, tokens)
    init_new_embeddings(model, plain_tokenizer, added, tokens)
    emb, out = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert emb.shape[0] == padded and out.shape[0] == padded  # no resize
    want_in = _expected_means(emb_before, plain_tokenizer, tokens)
    want_out = _expected_means(out_before, plain_tokenizer, tokens)
    rows = []
    for t in tokens.strings():
        row = plain_tokenizer.convert_tokens_to_ids(t)
        rows.append(row)
        torch.testing.assert_close(emb[row].float(), want_in[t])
        torch.testing.assert_close(out[row].float(), want_out[t])
    untouched = [i for i in range(padded) if i not in rows]
    assert torch.equal(emb[untouched], emb_before[untouched])
    assert torch.equal(out[untouched], out_before[untouched])


def test_output_bias_initialised(plain_tokenizer, tokens):
    from transformers import GPT2Config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(GPT2Config(vocab_size=len(plain_tokenizer), n_embd=32, n_layer=1,
                                                        n_head=2))
    added = add_special_tokens(plain_tokenizer, tokens)
    before = model.get_input_embeddings().weight.detach().clone()
    init_new_embeddings(model, plain_tokenizer, added, tokens)
    want = _expected_means(before, plain_tokenizer, tokens)
    for t in tokens.strings():
        row = plain_tokenizer.convert_tokens_to_ids(t)
        torch.testing.assert_close(model.get_input_embeddings().weight[row], want[t])
        torch.testing.assert_close(model.get_output_embeddings().weight[row], want[t])  # GPT-2 ties


def test_a_token_string_already_in_the_vocabulary_is_made_special_in_place():
    """A BPE trained on OneGen text learns `<paragraph>` as an ordinary token: it is registered as
    special with its id kept (no new row), and text no longer splits it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    raw.decoder = decoders.Metaspace(prepend_scheme="first")
    raw.train_from_iterator(["[RQ]<paragraph>Velmora was founded</paragraph>Ilsa Brandt"] * 50,
                            trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"]))
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|endoftext|>")
    before = tok.get_vocab()["<paragraph>"]
    added = add_special_tokens(tok, TokensConfig())
    assert "<paragraph>" not in added and tok.convert_tokens_to_ids("<paragraph>") == before
    for t in TokensConfig().strings():
        assert len(tok.encode(t, add_special_tokens=False)) == 1
        assert tok.convert_tokens_to_ids(t) in tok.encode(f"Velmora {t} was", add_special_tokens=False)
