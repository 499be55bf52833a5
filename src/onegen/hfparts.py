"""The HF causal LM under a `OneGenModel`: load a checkpoint or build one from scratch, find its parts.

- `load_causal_lm` loads any HF causal LM checkpoint (an encoder with an `is_decoder` flag becomes a
  causal decoder); failures are one-line `OneGenError`s, and pickled weights holding more than
  tensors are refused, never run.
- `build_scratch_lm` builds a randomly initialised model of any architecture transformers knows,
  sized for a tokenizer.
- `find_body_and_head` finds the decoder body and the LM head by checking them against the model's
  own forward (no list of architectures), so that logits need only be computed where they are used;
  with no match it returns `FullHead`, the full-forward fallback.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from .config import ModelConfig
from .errors import OneGenError

__all__ = ["FullHead", "build_scratch_lm", "cache_of", "find_body_and_head", "load_causal_lm"]

log = logging.getLogger(__name__)


def load_causal_lm(path: str, dtype: torch.dtype | str | None, trust_remote_code: bool) -> nn.Module:
    """The HF causal LM at `path` (a directory or hub id), in `dtype` when given.

    Its `onegen_missing_keys` attribute lists the parameters the checkpoint had no weights for (newly
    initialised at random: an encoder's LM-head transform, say), which a LoRA adapter must save, and
    `onegen_fresh_modules` the modules made only of such parameters."""
    import pickle

    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise OneGenError(f"cannot load a model config from '{path}': {str(e).splitlines()[0]}") from None
    if getattr(config, "is_decoder", None) is False and not getattr(config, "is_encoder_decoder", False):
        config.is_decoder = True  # an encoder checkpoint (e.g. BERT) becomes a causal decoder
    kwargs: dict[str, Any] = {"config": config, "trust_remote_code": trust_remote_code}
    if dtype is not None:
        kwargs["dtype"] = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # its per-tensor bar would come before a one-line error on stderr
    try:
        lm, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True, **kwargs)
        lm.onegen_missing_keys = sorted(info.get("missing_keys") or ())
        lm.onegen_fresh_modules = fresh_modules(lm, set(lm.onegen_missing_keys))
        return lm
    except (OSError, ValueError) as e:
        raise OneGenError(f"cannot load a causal LM from '{path}': {str(e).splitlines()[0]}") from None
    except pickle.UnpicklingError:  # a .bin holding more than tensors: refused by weights_only, never run
        raise OneGenError(f"cannot load a causal LM from '{path}': its weights file holds objects other than "
                          "tensors and is not unpickled; use safetensors weights") from None
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def fresh_modules(lm: nn.Module, missing: set[str]) -> list[str]:
    """The outermost modules whose every parameter is in `missing` (parameters the checkpoint lacked)."""
    found: list[str] = []
    for name, module in lm.named_modules():
        params = [f"{name}.{p}" if name else p for p, _ in module.named_parameters()]
        if params and all(p in missing for p in params) and not any(name.startswith(f + ".") for f in found):
            found.append(name)
    return found


def build_scratch_lm(cfg: ModelConfig, tokenizer) -> nn.Module:
    """A randomly initialised causal LM of `cfg.scratch.architecture` sized for the tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    s = cfg.scratch
    assert s is not None
    try:
        config = AutoConfig.for_model(s.architecture)
    except ValueError:
        raise OneGenError(f"unknown architecture '{s.architecture}' (any model_type transformers knows)",
                          field="model.scratch.architecture") from None
    attribute_map = getattr(config, "attribute_map", {})
    head_dim = s.hidden_size // s.num_heads
    rotary = getattr(config, "rotary_dim", None)  # a partial-rotary default wider than a small head (GPT-J)
    fit = {"rotary_dim": head_dim} if isinstance(rotary, int) and rotary > head_dim else {}
    values = {"vocab_size": len(tokenizer), "hidden_size": s.hidden_size, "num_hidden_layers": s.num_layers,
              "num_attention_heads": s.num_heads, "num_key_value_heads": s.num_heads,
              "intermediate_size": s.intermediate_size or 4 * s.hidden_size,
              "max_position_embeddings": s.max_position_embeddings,
              "head_dim": head_dim, **fit,
              "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
              "pad_token_id": tokenizer.pad_token_id, **s.extra}
    def settable(key: str) -> bool:  # not a derived, read-only property (e.g. Falcon's head_dim)
        prop = getattr(type(config), key, None)
        return not (isinstance(prop, property) and prop.fset is None)

    known = {k: v for k, v in values.items() if (hasattr(config, k) or k in attribute_map) and settable(k)}
    # built again with the sizes as arguments, so fields a config derives from them when it is made
    # (e.g. one `layer_types` entry per layer) agree with them; setting them afterwards would not
    try:
        config = AutoConfig.for_model(s.architecture, **known)
        for key, value in known.items():  # configs that ignore an argument still get the attribute
            if getattr(config, key, None) != value:
                setattr(config, key, value)
        if getattr(config, "is_decoder", None) is False:
            config.is_decoder = True
        return AutoModelForCausalLM.from_config(config)
    except (ValueError, TypeError) as e:  # e.g. a hidden size the heads do not divide
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise OneGenError(f"transformers cannot build a '{s.architecture}' model from these sizes: {first}",
                          field="model.scratch") from None


def cache_of(out) -> Any:
    """The KV cache of a model output (`cache` in transformers 5, `past_key_values` before)."""
    if "cache" in getattr(type(out), "__dataclass_fields__", {}):  # asking for the old name would warn
        return getattr(out, "cache", None)
    return getattr(out, "past_key_values", None)


_PROBE = [5, 7, 11, 3, 2, 9]


@torch.no_grad()
def find_body_and_head(lm: nn.Module):
    """Find the decoder body and the LM head of `lm` by checking them against its own forward.

    Returns (body or None, head, logit_fn). Candidate heads are the output embedding and the modules
    that contain it; logit_fn applies soft-capping/scaling found in the config. With no match, the
    full forward is used (correct, but computes logits at every position).
    """
    was_training = lm.training
    lm.eval()
    try:
        device = next(lm.parameters()).device
        vocab = lm.get_input_embeddings().weight.shape[0]
        ids = torch.tensor([[t % vocab for t in _PROBE]], device=device)
        ref = lm(input_ids=ids, output_hidden_states=True, use_cache=False)
        hidden = ref.hidden_states[-1]
        body = getattr(lm, "base_model", None)
        if body is not None and body is not lm:
            try:
                got = body(input_ids=ids, use_cache=False).last_hidden_state
                if not torch.allclose(got.float(), hidden.float(), atol=1e-4, rtol=1e-3):
                    body = None
            except Exception:  # a body with another calling convention: use the full forward
                body = None
        else:
            body = None
        for head in _head_candidates(lm):
            for fn in _logit_fns(lm.config):
                try:
                    logits = fn(head(hidden))
                except Exception:
                    continue
                if logits.shape == ref.logits.shape and torch.allclose(
                        logits.float(), ref.logits.float(), atol=1e-3, rtol=1e-3):
                    return body, head, fn
        log.warning("could not isolate the LM head; using the full forward (logits at every position)")
        return None, FullHead(lm), _identity
    finally:
        lm.train(was_training)


def _head_candidates(lm: nn.Module) -> list[nn.Module]:
    out = lm.get_output_embeddings()
    if out is None:
        return []
    names = {id(m): n for n, m in lm.named_modules()}
    name = names.get(id(out), "")
    candidates = [out]
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):  # the output embedding's parents, innermost first
        candidates.append(lm.get_submodule(".".join(parts[:i])))
    return candidates


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _logit_fns(config) -> list:
    fns = [_identity]
    cap = getattr(config, "final_logit_softcapping", None)
    if cap:
        fns.append(lambda x: torch.tanh(x / cap) * cap)
    scale = getattr(config, "logits_scaling", None)
    if scale:
        fns.append(lambda x: x / scale)
    mult = getattr(config, "logit_scale", None)
    if mult:
        fns.append(lambda x: x * mult)
    return fns


class FullHead:
    """Marks a model whose LM head could not be isolated: `OneGenModel.run` takes logits from the full
    forward instead of applying a head to hidden states."""

    def __init__(self, lm: nn.Module):
        self.lm = lm


def set_checkpointing(lm: nn.Module, on: bool) -> None:
    """Turn activation (gradient) checkpointing on or off, non-reentrant; under the name transformers
    has (`activation_checkpointing_*` since 5.2x, `gradient_checkpointing_*` before)."""
    new = hasattr(lm, "activation_checkpointing_enable")
    if not on:
        (lm.activation_checkpointing_disable if new else lm.gradient_checkpointing_disable)()
    elif new:
        lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
