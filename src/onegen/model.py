"""OneGenModel: wraps any HF causal LM so it both generates and embeds (one model, one pass).

It holds the HF model (composition, never a subclass), its tokenizer and the special tokens. The
forward runs the decoder body once per sequence batch and returns hidden states at retrieval (RET)
positions and LM logits only at supervised (GEN) positions: the vocabulary projection is never
computed for every position. The body and the head are found once at load time by checking them
against the HF model's own forward (no list of architectures), with a full-forward fallback
(`hfparts`). A model saves to and loads from a OneGen model directory (`modeldir`).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import lora as lora_parts
from .config import LoraConfig, ModelConfig, TokenizerConfig, TokensConfig
from .device import check_device
from .errors import OneGenError
from .hfparts import FullHead, build_scratch_lm, cache_of, find_body_and_head, load_causal_lm
from .io import atomic_path
from .modeldir import FORMAT_VERSION, ONEGEN_JSON, read_meta, tokens_dict
from .packing import block_mask, sliding_window
from .packing import probe as probe_packing
from .padding import length_batches, pad_right
from .render import Renderer
from .tokens import add_special_tokens, init_new_embeddings, token_ids

log = logging.getLogger(__name__)
DOC_CHUNK = 2048  # documents tokenized and embedded at a time (a batched tokenizer call holds ~100 B a token)


class OneGenModel(nn.Module):
    """A causal LM that generates text and gives retrieval vectors at `[RQ]` / `[RD]` tokens.

    Args:
        lm: a HF `AutoModelForCausalLM` (or a peft model wrapping one).
        tokenizer: its tokenizer, with the special tokens added.
        tokens: the special token strings.
        max_length: longest training sample; doc_max_length: longest document in tokens.
        base_model: where the base weights came from (recorded for LoRA adapters).
    """

    def __init__(self, lm: nn.Module, tokenizer, tokens: TokensConfig, max_length: int = 1024,
                 doc_max_length: int = 256, base_model: str | None = None):
        super().__init__()
        self.lm = lm
        self.tokenizer = tokenizer
        self.tokens = tokens
        self.ids = token_ids(tokenizer, tokens)
        self.renderer = Renderer(tokenizer, tokens, max_length=max_length, doc_max_length=doc_max_length)
        self.base_model = base_model
        self._set_parts()
        self.train(lm.training)  # a loaded model comes back in eval mode, as HF's does

    def _set_parts(self) -> None:
        # Plain attributes, not submodules: they are parts of `self.lm` already.
        body, head, fn = find_body_and_head(self.hf_model)
        object.__setattr__(self, "_body", body)
        object.__setattr__(self, "_head", head)
        object.__setattr__(self, "_logit_fn", fn)
        # transformers 5 names the KV-cache keyword `cache`; older versions `past_key_values`
        params = inspect.signature((body or self.hf_model).forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path_or_dir: str | Path, tokens: TokensConfig | None = None, *,
                        dtype: torch.dtype | str | None = None, device: str | torch.device | None = None,
                        tokenizer: str | None = None, lora: LoraConfig | None = None,
                        trust_remote_code: bool = False, max_length: int = 1024,
                        doc_max_length: int = 256) -> OneGenModel:
        """Load a OneGen model directory, or turn any HF causal LM checkpoint into a ready OneGen model.

        Special tokens are added and initialised when missing; an encoder checkpoint whose config has
        an `is_decoder` flag is loaded as a causal decoder. `lora` wraps the model in new LoRA adapters.
        """
        from .tokenizer import load_tokenizer

        if device is not None:
            device = check_device(device)  # before any loading
        path = str(path_or_dir)
        local = Path(path).expanduser()
        if (local.is_absolute() or path.startswith((".", "~"))) and not local.exists():  # not a hub id either
            raise OneGenError("model directory not found", file=path)
        meta = read_meta(path)
        if meta is not None:
            saved = TokensConfig(**meta["tokens"])
            if tokens is not None and tokens.strings() not in (saved.strings(), TokensConfig().strings()):
                raise OneGenError(f"this OneGen model uses the tokens {saved.strings()}, not {tokens.strings()}: "
                                  "write the data with the model's tokens (or set `tokens:` to them), or start "
                                  "from the base checkpoint", file=path, field="tokens")
            tokens = saved
            max_length = meta.get("max_length", max_length)
            doc_max_length = meta.get("doc_max_length", doc_max_length)
        tokens = tokens or TokensConfig()
        tok = load_tokenizer(tokenizer or path, trust_remote_code)
        new_tokens = add_special_tokens(tok, tokens)
        if meta is not None and meta.get("lora"):
            if lora is not None:
                raise _second_adapter(path, meta.get("base_model"))
            return cls._load_lora(path, meta, tok, tokens, dtype, device, trust_remote_code, max_length,
                                  doc_max_length)
        lm = load_causal_lm(path, dtype, trust_remote_code)
        init_new_embeddings(lm, tok, new_tokens, tokens)
        if device is not None:
            lm.to(device)
        base = str(Path(path).resolve()) if Path(path).is_dir() else path  # a LoRA adapter finds it from anywhere
        model = cls(lm, tok, tokens, max_length, doc_max_length, base_model=base)
        if lora is not None:
            model.add_lora(lora)
        return model

    @classmethod
    def _load_lora(cls, path, meta, tok, tokens, dtype, device, trust_remote_code, max_length, doc_max_length):
        lm = lora_parts.load_adapter(path, meta["base_model"], len(tok), dtype, trust_remote_code)
        if device is not None:
            lm.to(device)
        return cls(lm, tok, tokens, max_length, doc_max_length, base_model=meta["base_model"])

    @classmethod
    def from_config(cls, model_cfg: ModelConfig, tokenizer_cfg: TokenizerConfig, tokens: TokensConfig,
                    texts: list[str] | None = None, max_length: int = 1024, doc_max_length: int = 256,
                    progress: bool = False) -> OneGenModel:
        """Build the model a training config asks for: pretrained from a path, or new from `scratch`
        (a tokenizer trained on `texts`, with its progress shown under `progress`)."""
        if model_cfg.name_or_path:
            return cls.from_pretrained(model_cfg.name_or_path, tokens, tokenizer=tokenizer_cfg.name_or_path,
                                       trust_remote_code=model_cfg.trust_remote_code, max_length=max_length,
                                       doc_max_length=doc_max_length)
        from .tokenizer import load_tokenizer, train_bpe

        if tokenizer_cfg.train is not None:
            if not texts:
                raise OneGenError("tokenizer.train needs training text", field="tokenizer.train")
            tok = train_bpe(texts, tokenizer_cfg.train.vocab_size, tokenizer_cfg.train.min_frequency,
                            special_tokens=tokens.strings(), progress=progress)
        else:
            tok = load_tokenizer(tokenizer_cfg.name_or_path, model_cfg.trust_remote_code)
        new_tokens = add_special_tokens(tok, tokens)
        lm = build_scratch_lm(model_cfg, tok)
        init_new_embeddings(lm, tok, new_tokens, tokens)
        return cls(lm, tok, tokens, max_length, doc_max_length, base_model=None)

    def add_lora(self, lora: LoraConfig) -> None:
        """Wrap the LM in new LoRA adapters (`onegen.lora`); the special-token rows stay trainable."""
        if self.is_lora:
            raise _second_adapter(None, self.base_model)
        new_ids = sorted({self.ids.query, self.ids.doc, self.ids.open, self.ids.close, *self.ids.extra})
        self.lm = lora_parts.wrap(self.lm, lora, new_ids)
        self._set_parts()

    def merge_lora(self) -> None:
        """Fold the LoRA adapter into the weights: the model becomes a plain one, every parameter
        trainable and saved whole (its fingerprint changes: rebuild indexes made with the adapter)."""
        if self.is_lora:
            self.lm = lora_parts.merge(self.lm)
            self.base_model = None
            self._set_parts()

    @property
    def is_lora(self) -> bool:
        return hasattr(self.lm, "peft_config")

    @property
    def hf_model(self) -> nn.Module:
        """The HF causal LM (inside the peft wrapper when there is one)."""
        return self.lm.get_base_model() if self.is_lora else self.lm

    @property
    def device(self) -> torch.device:
        return next(self.lm.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return self.hf_model.get_input_embeddings().weight.dtype

    @property
    def hidden_size(self) -> int:
        return self.hf_model.get_input_embeddings().weight.shape[1]

    @property
    def max_positions(self) -> int | None:
        """The longest sequence the model takes (its config's position limit; None when it names none).
        Past it, learned position tables fail outright and rotary models drift out of what they saw."""
        cfg = self.hf_model.config
        for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx"):
            value = getattr(cfg, key, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
        return None

    def weight_bytes(self) -> int:
        """Bytes of all parameters: what one forward step reads at least once."""
        return sum(p.numel() * p.element_size() for p in self.lm.parameters())

    def kv_bytes_per_token(self) -> int:
        """Bytes one token adds to the KV cache (keys and values of every layer), from the config; an
        estimate (0 when the config names no layers or heads) for cost models, not an allocation."""
        cfg = self.hf_model.config
        layers, heads = getattr(cfg, "num_hidden_layers", None), getattr(cfg, "num_attention_heads", None)
        if not layers or not heads:
            return 0
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        kv = getattr(cfg, "num_key_value_heads", None) or heads
        return 2 * layers * kv * head_dim * self.dtype.itemsize

    # -- saving ---------------------------------------------------------------------------------
    def save_pretrained(self, out_dir: str | Path) -> Path:
        """Write HF weights (or the LoRA adapter) + tokenizer + onegen.json, atomically."""
        out_dir = Path(out_dir)
        with atomic_path(out_dir) as tmp:
            tmp.mkdir(parents=True)
            self.lm.save_pretrained(str(tmp))
            self.tokenizer.save_pretrained(str(tmp))
            if self.is_lora:
                lora_parts.save_fresh_weights(self.hf_model, tmp)
            meta = {"format_version": FORMAT_VERSION, "tokens": tokens_dict(self.tokens),
                    "token_ids": {"query": self.ids.query, "doc": self.ids.doc, "open": self.ids.open,
                                  "close": self.ids.close, "eos": self.ids.eos},
                    "roles": {"query": "GEN+RET", "doc": "RET", "open": "CTX", "close": "CTX"},
                    "max_length": self.renderer.max_length, "doc_max_length": self.renderer.doc_max_length,
                    "lora": self.is_lora, "base_model": self.base_model, "fingerprint": self.fingerprint()}
            (tmp / ONEGEN_JSON).write_text(json.dumps(meta, indent=2))
        return out_dir

    @torch.no_grad()
    def fingerprint(self, version: int = 2) -> str:
        """A short hash of the special tokens, a strided sample of every weight and (version 2, "v2-...")
        the whole embedding rows of the special tokens, input and output: what retrieval vectors hang on
        most, and what a strided sample of a large vocabulary misses. Values are rounded to bf16 first, so
        the hash does not depend on the device or dtype the model runs in. Version 1 (16 hex digits, the
        indexes of onegen <= 0.2) is still accepted by `Index.check_model`."""
        h = hashlib.sha256()
        h.update(json.dumps(tokens_dict(self.tokens), sort_keys=True).encode())
        h.update(str(len(self.tokenizer)).encode())
        for name, p in sorted(self.lm.state_dict().items()):
            if ".original_module." in name:  # peft's unused copy of a module it trains whole
                continue
            flat = p.detach().reshape(-1)
            step = max(1, flat.numel() // 256)
            sample = flat[::step][:256].to(torch.bfloat16).float().cpu()
            h.update(name.replace("base_model.model.", "").encode())
            h.update(sample.numpy().tobytes())
        if version == 1:
            return h.hexdigest()[:16]
        rows = torch.tensor(sorted({self.ids.query, self.ids.doc, self.ids.open, self.ids.close}))
        for table in (self.lm.get_input_embeddings(), self.lm.get_output_embeddings()):
            weight = getattr(table, "weight", None)
            if isinstance(weight, torch.Tensor) and weight.dim() == 2 and weight.shape[0] > int(rows.max()):
                h.update(weight.detach()[rows.to(weight.device)].to(torch.bfloat16).float().cpu().numpy().tobytes())
        return "v2-" + h.hexdigest()[:16]

    # -- forward --------------------------------------------------------------------------------
    def run(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
            position_ids: torch.Tensor | None = None, past_key_values: Any = None, use_cache: bool = False,
            logits_at: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None, Any]:
        """One forward of the decoder: hidden states (B, T, D) after the final norm, LM logits (N, V) at
        `logits_at` (N, 2) = (row, position) pairs only, and the KV cache when `use_cache`."""
        kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": use_cache}
        if position_ids is not None:
            kwargs["position_ids"] = position_ids
        if past_key_values is not None:
            kwargs[self._cache_kw] = past_key_values
        if self._body is not None or not isinstance(self._head, FullHead):
            if self._body is not None:
                out = self._body(**kwargs)
                hidden = out.last_hidden_state
            else:
                out = self.hf_model(**kwargs, output_hidden_states=True)
                hidden = out.hidden_states[-1]
            logits = None if logits_at is None else self.logits(hidden[logits_at[:, 0], logits_at[:, 1]])
            return hidden, logits, cache_of(out)
        out = self.hf_model(**kwargs, output_hidden_states=True)  # fallback: logits everywhere
        logits = None if logits_at is None else out.logits[logits_at[:, 0], logits_at[:, 1]]
        return out.hidden_states[-1], logits, cache_of(out)

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      **kwargs: Any) -> tuple[torch.Tensor, Any]:
        """Last-layer hidden states (B, T, D) and the KV cache (see `run`)."""
        hidden, _, cache = self.run(input_ids, attention_mask, **kwargs)
        return hidden, cache

    @property
    def head_isolated(self) -> bool:
        """Whether logits can be computed from hidden states alone (no full-forward fallback)."""
        return not isinstance(self._head, FullHead)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM logits (..., V) for the given hidden states only."""
        return self._logit_fn(self._head(hidden))

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Training forward over a collated batch (see `collate`): packed (one forward over samples and
        documents sharing rows, block-diagonal attention) or padded (samples and documents separately).

        Returns `lm_targets` (N,) with `gen_hidden` (N, D) at the positions that predict them (or
        `gen_logits` (N, V) when the head could not be isolated), `query_vecs` (Q, D) at the query
        tokens and `doc_vecs` (M, D) at the documents' `[RD]` tokens.
        """
        out: dict[str, torch.Tensor] = {"lm_targets": batch["lm_targets"]}
        lm_pos = batch["lm_positions"]  # (N, 2): (row, position predicting the target)
        kwargs: dict[str, Any] = {}
        if "segment_ids" in batch:  # packed
            kind = self.packing_mask_kind()
            if kind is None:
                raise OneGenError("this model does not reproduce its forward when sequences are packed; "
                                  "collate with pack=False (train.packing: false)", field="train.packing")
            mask = block_mask(batch["segment_ids"], kind, self.dtype)
            kwargs["position_ids"] = batch["position_ids"]
        else:
            mask = batch["attention_mask"]
        if self.head_isolated:
            hidden, _, _ = self.run(batch["input_ids"], mask, **kwargs)  # (B, T, D)
            out["gen_hidden"] = hidden[lm_pos[:, 0], lm_pos[:, 1]]
        else:
            hidden, out["gen_logits"], _ = self.run(batch["input_ids"], mask, logits_at=lm_pos, **kwargs)
        q_pos = batch["query_positions"]  # (Q, 2)
        out["query_vecs"] = hidden[q_pos[:, 0], q_pos[:, 1]]
        if "doc_segment_ids" in batch:  # documents packed apart, at their own width
            d_pos = batch["doc_positions"]
            doc_hidden, _ = self.hidden_states(batch["doc_input_ids"],
                                               block_mask(batch["doc_segment_ids"], kind, self.dtype),
                                               position_ids=batch["doc_position_ids"])
            out["doc_vecs"] = doc_hidden[d_pos[:, 0], d_pos[:, 1]]
        elif "doc_positions" in batch:
            d_pos = batch["doc_positions"]
            out["doc_vecs"] = hidden[d_pos[:, 0], d_pos[:, 1]]
        elif batch.get("doc_input_ids") is not None and batch["doc_input_ids"].numel():
            doc_hidden, _ = self.hidden_states(batch["doc_input_ids"], batch["doc_attention_mask"])
            last = batch["doc_attention_mask"].sum(1) - 1  # right padding: [RD] is the last real token
            out["doc_vecs"] = doc_hidden[torch.arange(doc_hidden.shape[0], device=last.device), last]
        else:
            out["doc_vecs"] = hidden.new_zeros((0, hidden.shape[-1]))
        return out

    def packing_mask_kind(self) -> str | None:
        """How this model takes packed rows: the mask kind under which it reproduces its unpacked forward
        ("bool", "additive" or "positions": see `packing`), or None when none does. Probed once."""
        if not hasattr(self, "_packing_kind"):
            self._packing_kind = probe_packing(self)
        return self._packing_kind

    @property
    def packing_window(self) -> int | None:
        """Packed batches must keep every sequence within this sliding window (None: no limit)."""
        return sliding_window(self.hf_model.config)

    # -- embedding ------------------------------------------------------------------------------
    @torch.no_grad()
    def embed_documents(self, texts: list[str], batch_size: int = 32, progress: bool = False,
                        max_tokens: int | None = None) -> torch.Tensor:
        """Retrieval vectors (N, D), float32 on CPU: the hidden state at each document's `[RD]` token.

        Texts are tokenized and embedded `DOC_CHUNK` at a time (memory stays flat however large the
        corpus); the progress bar counts tokens, its total estimated from the chunks seen so far.
        `max_tokens` batches by a padded-token budget instead of a fixed count (see `_embed`).
        """
        from tqdm.auto import tqdm

        texts = texts if isinstance(texts, list) else list(texts)
        vecs = torch.empty((len(texts), self.hidden_size), dtype=torch.float32)
        chars, seen_chars, seen_tokens = sum(map(len, texts)), 0, 0
        bar = None
        for start in range(0, len(texts), DOC_CHUNK):
            chunk = texts[start:start + DOC_CHUNK]
            seqs = self.renderer.encode_documents(chunk)
            seen_chars, seen_tokens = seen_chars + sum(map(len, chunk)), seen_tokens + sum(map(len, seqs))
            total = seen_tokens + round((chars - seen_chars) * seen_tokens / max(seen_chars, 1))
            if bar is None:
                bar = tqdm(total=total, desc="embedding documents", unit="tok", unit_scale=True, disable=not progress)
            else:
                bar.total = total
                bar.refresh()
            vecs[start:start + len(chunk)] = self._embed(seqs, batch_size, False, "documents", max_tokens, bar=bar)
        if bar is not None:
            bar.close()
        return vecs

    @torch.no_grad()
    def embed_queries(self, texts: list[str], batch_size: int = 32, progress: bool = False) -> torch.Tensor:
        """Retrieval vectors (N, D): the hidden state at `[RQ]` when the answer to `text` starts with it."""
        from .data import Message

        seqs = [self.renderer.encode_prompt([Message("user", t)]) + [self.ids.query] for t in texts]
        return self._embed(seqs, batch_size, progress, "queries")

    def _embed(self, seqs: list[list[int]], batch_size: int, progress: bool, what: str,
               max_tokens: int | None = None, bar: Any = None) -> torch.Tensor:
        """Last-token hidden states (N, D) of `seqs`, run in length-sorted batches (little padding).

        Batches hold `batch_size` sequences, or with `max_tokens` as many as fit that budget of padded
        tokens (rows x longest row; a longer sequence runs alone): short documents then share big
        batches and long ones small ones. Right padding never changes a causal row, so the vectors are
        the same whatever the batching. Progress counts tokens (on `bar` when given).
        """
        from tqdm.auto import tqdm

        was_training = self.training
        self.eval()
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))  # length-sorted: little padding
        vecs = torch.empty((len(seqs), self.hidden_size), dtype=torch.float32)
        own = bar is None
        if own:
            bar = tqdm(total=sum(map(len, seqs)), desc=f"embedding {what}", disable=not progress, unit="tok",
                       unit_scale=True)
        for idx in length_batches([len(seqs[i]) for i in order], order, batch_size, max_tokens):
            ids, mask = pad_right([seqs[i] for i in idx], self.ids.pad, self.device)
            hidden, _ = self.hidden_states(ids, mask)
            last = mask.sum(1) - 1
            vecs[idx] = hidden[torch.arange(len(idx), device=self.device), last].float().cpu()
            bar.update(int(mask.sum()))
        if own:
            bar.close()
        self.train(was_training)
        return vecs


def _second_adapter(path: str | None, base: str | None) -> OneGenError:
    return OneGenError(f"this model holds a LoRA adapter already (over {base}): an adapter is not stacked on "
                       "another; start the new adapter from that base checkpoint, resume the adapter's own run, or "
                       "train this model without train.lora (its adapter is then merged and every weight trained)",
                       file=path, field="train.lora")
