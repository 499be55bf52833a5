"""LoRA for OneGen models: wrap, load, save and merge adapters with peft.

Guarantees:
- the new tokens' rows stay trainable (peft trainable tokens), of the head too when it is untied;
- parameters the base checkpoint lacked (random at every load of it) come back with the adapter:
  modules made only of them are trained and saved whole (`modules_to_save`), any others are saved
  beside the adapter (`FRESH_WEIGHTS`) and restored on load, so a saved model is the same model at
  every load (its index fingerprint holds);
- an adapter is never stacked on another; merging folds it into the weights.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from .config import LoraConfig
from .errors import OneGenError
from .hfparts import load_causal_lm
from .modeldir import ONEGEN_JSON

log = logging.getLogger(__name__)

FRESH_WEIGHTS = "onegen_fresh.safetensors"  # base weights the checkpoint lacked, saved beside the adapter

__all__ = ["FRESH_WEIGHTS", "load_adapter", "merge", "save_fresh_weights", "wrap"]


def wrap(lm: nn.Module, lora: LoraConfig, new_ids: list[int]) -> nn.Module:
    """`lm` in new LoRA adapters, the `new_ids` rows of its embeddings trainable."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    fresh = list(getattr(lm, "onegen_fresh_modules", ()))
    if fresh:
        log.info("LoRA: also training and saving %s (not in the checkpoint: initialised at random)", ", ".join(fresh))
    cfg = PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                         target_modules=lora.target_modules, modules_to_save=fresh or None,
                         trainable_token_indices=_token_rows(lm, new_ids, fresh), task_type="CAUSAL_LM")
    try:
        return get_peft_model(lm, cfg)
    except ValueError as e:  # peft's: no module matches the target names, ...
        raise OneGenError(" ".join(str(e).split())[:400], field="train.lora.target_modules") from None


def _token_rows(lm: nn.Module, new_ids: list[int], whole: list[str]) -> list[int] | dict[str, list[int]] | None:
    """peft's `trainable_token_indices`: the new tokens' rows of the input embedding, and of the output
    embedding when it is a separate matrix (untied head): else the model could not learn to emit `[RQ]`
    through its own row of the head. Modules trained `whole` already are left out."""
    names = {id(m): n for n, m in lm.named_modules()}
    inp, out = lm.get_input_embeddings(), lm.get_output_embeddings()
    w_in, w_out = getattr(inp, "weight", None), getattr(out, "weight", None)
    untied = not (not isinstance(w_out, torch.Tensor) or w_out is w_in or id(inp) not in names
                  or id(out) not in names or w_out.data_ptr() == getattr(w_in, "data_ptr", lambda: None)()
                  or w_out.dim() != 2)
    if not untied:
        return None if names.get(id(inp)) in whole else new_ids
    rows = {names[id(m)]: new_ids for m in (inp, out) if names[id(m)] not in whole}
    return rows or None


def merge(lm: nn.Module) -> nn.Module:
    """The adapter folded into the weights: a plain model, every parameter trainable."""
    merged = lm.merge_and_unload()
    for p in merged.parameters():
        p.requires_grad_(True)
    return merged


def load_adapter(path: str, base: str, vocab: int, dtype, trust_remote_code: bool) -> nn.Module:
    """The base model at `base` with the adapter of the model directory `path` on it (not trainable)."""
    from peft import PeftModel

    try:
        lm = load_causal_lm(base, dtype, trust_remote_code)
    except OneGenError as e:
        raise OneGenError(f"the adapter was trained over the base model {base}, which does not load ({e.message}); "
                          f"put it back there, or set base_model in {ONEGEN_JSON} to where it is now",
                          file=path, field="base_model") from None
    fresh = Path(path) / FRESH_WEIGHTS
    if fresh.is_file():
        from safetensors.torch import load_file

        params = dict(lm.named_parameters())
        with torch.no_grad():
            for name, value in load_file(str(fresh)).items():
                params[name].copy_(value)
    if lm.get_input_embeddings().weight.shape[0] < vocab:
        lm.resize_token_embeddings(vocab, mean_resizing=False)
    return PeftModel.from_pretrained(lm, path, is_trainable=False)


def save_fresh_weights(base: nn.Module, out_dir: Path) -> None:
    """The parameters of `base` (inside its adapter) that its checkpoint lacked and the adapter does not
    save, i.e. not in a module it trains whole, into `out_dir / FRESH_WEIGHTS`."""
    missing = getattr(base, "onegen_missing_keys", ())
    whole = tuple(f"{m}." for m in getattr(base, "onegen_fresh_modules", ()))
    params = dict(base.named_parameters())

    def find(name: str) -> torch.Tensor | None:  # a LoRA-wrapped layer keeps its weight in `base_layer`
        module, _, leaf = name.rpartition(".")
        return params.get(name, params.get(f"{module}.base_layer.{leaf}"))

    keep = {n: p.detach().cpu().contiguous() for n in missing if not n.startswith(whole)
            if (p := find(n)) is not None}
    if keep:
        from safetensors.torch import save_file

        save_file(keep, str(out_dir / FRESH_WEIGHTS))
