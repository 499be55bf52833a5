"""Tokenizers: load one from a path, or train a byte-level BPE tokenizer for a from-scratch model."""

from __future__ import annotations

from collections.abc import Iterable

from transformers import AutoTokenizer, PreTrainedTokenizerFast

from .errors import OneGenError

SCRATCH_SPECIALS = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}


def train_bpe(texts: Iterable[str], vocab_size: int = 4000, min_frequency: int = 2,
              special_tokens: list[str] | None = None, progress: bool = False) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer (HF `tokenizers`) on `texts`; `special_tokens` become single tokens.
    `progress` shows the trainer's own bars (minutes on a large corpus)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = list(SCRATCH_SPECIALS.values()) + list(special_tokens or [])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=progress)
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **SCRATCH_SPECIALS)
    if special_tokens:
        fast.add_special_tokens({"additional_special_tokens": list(special_tokens)},
                                replace_extra_special_tokens=False)
    return fast


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    """Load a tokenizer from a local directory or hub id, with a clear error when it cannot."""
    try:
        tok = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise OneGenError(f"cannot load a tokenizer from '{name_or_path}': {str(e).splitlines()[0]}") from None
    if not getattr(tok, "is_fast", False):
        raise OneGenError(f"the tokenizer at '{name_or_path}' is not a fast tokenizer; onegen needs character "
                          "offsets (install `tokenizers` / provide tokenizer.json)")
    return tok
