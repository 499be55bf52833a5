"""Special tokens and token roles.

Roles: GEN tokens are trained with next-token cross-entropy, CTX tokens are context (no loss), RET
tokens give retrieval vectors (their last-layer hidden state). The query token `[RQ]`, the document
token `[RD]` and the paragraph delimiters are added to any tokenizer as single tokens, and their input
and output embedding rows start as the mean embedding of a short description.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from .config import TokensConfig
from .errors import OneGenError

log = logging.getLogger(__name__)

GEN, CTX, RET = "GEN", "CTX", "RET"
IGNORE_INDEX = -100  # the one ignore index of LM labels


@dataclass(frozen=True)
class TokenIds:
    """Token ids of the special tokens in one tokenizer."""

    query: int
    doc: int
    open: int
    close: int
    eos: int
    pad: int
    extra: tuple[int, ...] = ()


def ensure_eos_and_pad(tokenizer) -> list[str]:
    """Give the tokenizer an end-of-sequence and a padding token if it lacks them; returns added strings."""
    added: list[str] = []
    if tokenizer.eos_token is None:
        if getattr(tokenizer, "sep_token", None) is not None:  # encoder vocabularies (BERT) end with [SEP]
            tokenizer.eos_token = tokenizer.sep_token
        else:
            tokenizer.add_special_tokens({"eos_token": "</s>"})
            added.append("</s>")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return added


def add_special_tokens(tokenizer, tokens: TokensConfig) -> list[str]:
    """Add the query/doc/paragraph (and extra) tokens as single special tokens; returns the new strings."""
    added = ensure_eos_and_pad(tokenizer)
    vocab = tokenizer.get_vocab()
    new = [t for t in tokens.strings() if t not in vocab]
    # an ordinary vocabulary entry with the same string (a BPE trained on OneGen text learns `<paragraph>`)
    # is made special in place: it keeps its id and trained row, and text no longer splits it
    specials = set(special_tokens_of(tokenizer).values())
    register = [t for t in tokens.strings() if t not in specials]
    if register:
        tokenizer.add_special_tokens({"additional_special_tokens": register}, replace_extra_special_tokens=False)
    for t in tokens.strings():
        ids = tokenizer.encode(t, add_special_tokens=False)
        if len(ids) != 1:
            raise OneGenError(f"the special token {t!r} does not encode to a single token with this tokenizer "
                              f"({ids}); choose other token strings (tokens: in the config)", field="tokens")
    return added + new


def token_ids(tokenizer, tokens: TokensConfig) -> TokenIds:
    """Look up the ids of the special tokens (they must have been added)."""
    conv = tokenizer.convert_tokens_to_ids
    return TokenIds(conv(tokens.query), conv(tokens.doc), conv(tokens.open), conv(tokens.close),
                    tokenizer.eos_token_id, tokenizer.pad_token_id, tuple(conv(t) for t in tokens.extra))


@torch.no_grad()
def init_new_embeddings(model, tokenizer, new_tokens: list[str], tokens: TokensConfig) -> None:
    """Resize `model` for the tokenizer and start each new row as the mean embedding of its description.

    Handles tied and untied output heads, output biases, and vocabularies padded beyond the tokenizer
    (rows already present are reused instead of resizing).
    """
    n_vocab = len(tokenizer)
    emb = model.get_input_embeddings()
    if emb.weight.shape[0] < n_vocab:
        model.resize_token_embeddings(n_vocab, mean_resizing=False)
        emb = model.get_input_embeddings()
    out = model.get_output_embeddings()
    tied = out is not None and out.weight.data_ptr() == emb.weight.data_ptr()
    for token in new_tokens:
        row = tokenizer.convert_tokens_to_ids(token)
        desc_ids = [i for i in tokenizer.encode(tokens.description_of(token), add_special_tokens=False)
                    if i < emb.weight.shape[0] and i != row]
        if not desc_ids:
            continue
        idx = torch.tensor(desc_ids, device=emb.weight.device)
        emb.weight[row] = emb.weight[idx].float().mean(0).to(emb.weight.dtype)
        if out is not None and not tied:
            out.weight[row] = out.weight[idx.to(out.weight.device)].float().mean(0).to(out.weight.dtype)
        bias = getattr(out, "bias", None) if out is not None else None
        if bias is not None and bias.shape[0] > row:
            bias[row] = bias[idx.to(bias.device)].float().mean().to(bias.dtype)
    log.info("initialised %d new token rows from descriptions (tied head: %s)", len(new_tokens), tied)


def special_tokens_of(tokenizer) -> dict[int, str]:
    """Every special token of a tokenizer, id -> string: the named ones (eos, pad, ...) and the added
    tokens marked special, which is how Llama-3 ships `<|eot_id|>` and Phi-3 `<|end|>` (they are in
    no named slot, so `all_special_ids` misses them)."""
    found = dict(zip(tokenizer.all_special_ids, tokenizer.all_special_tokens, strict=False))
    for i, added in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(added, "special", False):
            found[int(i)] = str(added.content if hasattr(added, "content") else added)
    return found
