"""The compact forward of Llama-like decoders: which HF models fit it, their weights referenced (never
copied) in a flat layout, and the maths exactly as HF computes it (RMSNorm in float32, RoPE, SiLU-gated
MLP, pre-norm residuals). How K/V are stored and attended is left to the caller (`fastpath`).

A model fits when its structure says so, never its architecture name: the body has `layers` of
`self_attn.{q,k,v,o}_proj` (+ optional per-head `q_norm`/`k_norm`, any projection biases),
`mlp.{gate,up,down}_proj` with a SiLU gate, `input_layernorm` / `post_attention_layernorm` RMSNorms, a
final `norm`, one rotary module of a static RoPE type (default, linear, llama3), plain
`nn.Linear`/`nn.Embedding` weights (LoRA merged first), and no soft-capping. Parts with parameters that
are not in this list (extra norms, MoE routers, ...) make it unsupported.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .errors import OneGenError
from .model import OneGenModel
from .packing import sliding_window

ROPE_TYPES = ("default", "linear", "llama3")
_LAYER_PARTS = {"self_attn", "mlp", "input_layernorm", "post_attention_layernorm"}
_ATTN_PARTS = {"q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm"}
_MLP_PARTS = {"gate_proj", "up_proj", "down_proj"}


class FastPathUnsupported(OneGenError):
    """The model (or this request) cannot run on the fast path; the reason says why."""


Linear = tuple[torch.Tensor, torch.Tensor | None]  # (weight, bias)
Norm = tuple[torch.Tensor, float]  # (weight, eps)


@dataclass
class Layer:
    """One decoder layer's weights (references to the HF parameters)."""

    ln_attn: Norm
    ln_mlp: Norm
    q: Linear
    k: Linear
    v: Linear
    o: Linear
    q_norm: Norm | None
    k_norm: Norm | None
    gate: Linear
    up: Linear
    down: Linear


@dataclass
class Layout:
    """The whole decoder: weights, head counts, attention scale, RoPE and sliding window."""

    embed: torch.Tensor  # (V, D)
    layers: list[Layer]
    norm: Norm
    n_heads: int
    n_kv: int
    head_dim: int
    scaling: float
    inv_freq: torch.Tensor  # the rotary module's own buffer
    rope_scale: float
    window: int | None  # sliding window: sequences must fit in it


Attend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (layer, q, k, v) -> (B, S, H*d)


def run_layers(w: Layout, x: torch.Tensor, pos: torch.Tensor, attend: Attend) -> torch.Tensor:
    """The decoder layers over x (B, S, D) at positions pos (B, S); `attend` writes K/V and attends.

    Every element-wise kernel counts in a decode step (a CUDA graph replays ~30 per layer), so the maths
    is HF's in fewer of them, bit for bit: RMSNorm as one `F.rms_norm` (fp32 inside, like HF) and one
    weight product, and RoPE once over q and k together with `rotate_half` as a roll against a sign-folded
    sine (`rope`): 5 kernels where HF launches 10."""
    cos, sin = rope(pos, w.inv_freq, w.rope_scale, x.dtype)  # (B, S, 1, d)
    b, s = x.shape[:2]
    half = w.head_dim // 2
    for i, layer in enumerate(w.layers):
        h = rms(x, layer.ln_attn)
        q = linear(h, layer.q).view(b, s, w.n_heads, w.head_dim)
        k = linear(h, layer.k).view(b, s, w.n_kv, w.head_dim)
        v = linear(h, layer.v).view(b, s, w.n_kv, w.head_dim)
        if layer.q_norm is not None and layer.k_norm is not None:
            q, k = rms(q, layer.q_norm), rms(k, layer.k_norm)
        qk = torch.cat([q, k], dim=2)  # (B, S, H + H_kv, d): one rotation for both
        qk = qk * cos + qk.roll(half, dims=-1) * sin  # roll = cat(x2, x1); sin's first half negated
        q, k = qk.split([w.n_heads, w.n_kv], dim=2)
        x = x + linear(attend(i, q, k, v), layer.o)
        h = rms(x, layer.ln_mlp)
        x = x + linear(F.silu(linear(h, layer.gate)) * linear(h, layer.up), layer.down)
    return x


# -- what the HF model holds, checked ---------------------------------------------------------------

def layout(model: OneGenModel) -> Layout:
    """Reference the HF model's weights in the compact layout, or raise FastPathUnsupported."""
    if model.is_lora:
        raise FastPathUnsupported("the model has unmerged LoRA adapters: merge them first "
                                  "(model.lm = model.lm.merge_and_unload()) or use the generic path")
    if not model.head_isolated:
        raise FastPathUnsupported("the LM head could not be isolated from the model's forward")
    hf = model.hf_model
    cfg = hf.config
    body = getattr(hf, "base_model", None)
    layers = getattr(body, "layers", None)
    embed = hf.get_input_embeddings()
    if not isinstance(layers, nn.ModuleList) or not len(layers) or type(embed) is not nn.Embedding:
        raise FastPathUnsupported("the decoder has no `layers` list with a plain input embedding")
    act = getattr(cfg, "hidden_act", None) or getattr(cfg, "hidden_activation", None)
    if act not in ("silu", "swish"):
        raise FastPathUnsupported(f"the MLP activation is {act!r}, the fast path needs a SiLU-gated MLP")
    if getattr(cfg, "attn_logit_softcapping", None) or getattr(cfg, "final_logit_softcapping", None):
        raise FastPathUnsupported("soft-capped attention/logits are not supported by the fast path")
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    flat = isinstance(rope, dict) and not any(isinstance(v, dict) for v in rope.values())  # not per layer type
    rope_type = rope.get("rope_type", rope.get("type", "default")) if flat else None
    if rope_type not in ROPE_TYPES:
        raise FastPathUnsupported(f"RoPE type {rope_type!r} is not supported (fast path: {', '.join(ROPE_TYPES)})")
    rotary = [m for m in body.modules() if isinstance(getattr(m, "inv_freq", None), torch.Tensor)]
    if len(rotary) != 1:
        raise FastPathUnsupported(f"the decoder has {len(rotary)} rotary embeddings; the fast path needs one")
    dtype = embed.weight.dtype
    out = [_layer(layer, i, dtype) for i, layer in enumerate(layers)]
    attn = layers[0].self_attn
    head_dim = getattr(attn, "head_dim", None) or getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    n_heads, n_kv = out[0].q[0].shape[0] // head_dim, out[0].k[0].shape[0] // head_dim
    if n_heads % max(n_kv, 1) or n_kv == 0:
        raise FastPathUnsupported(f"{n_heads} query heads cannot share {n_kv} KV heads")
    windows = [getattr(layer.self_attn, "sliding_window", None) for layer in layers] + [sliding_window(cfg)]
    windows = [x for x in windows if isinstance(x, int) and x > 0]
    return Layout(embed.weight, out, _norm(getattr(body, "norm", None), "the final norm"), n_heads, n_kv,
                   head_dim, float(getattr(attn, "scaling", head_dim ** -0.5)), rotary[0].inv_freq,
                   float(getattr(rotary[0], "attention_scaling", 1.0) or 1.0), min(windows) if windows else None)


def _layer(layer: nn.Module, i: int, dtype: torch.dtype) -> Layer:
    _only(layer, _LAYER_PARTS, f"layer {i}", required=_LAYER_PARTS)
    attn, mlp = layer.self_attn, layer.mlp
    _only(attn, _ATTN_PARTS, f"layer {i} attention", required={"q_proj", "k_proj", "v_proj", "o_proj"})
    _only(mlp, _MLP_PARTS, f"layer {i} MLP", required=_MLP_PARTS)
    has_qk_norm = getattr(attn, "q_norm", None) is not None
    lin = {name: _linear_of(getattr(part, name), f"layer {i} {name}", dtype)
           for part, names in ((attn, ("q_proj", "k_proj", "v_proj", "o_proj")),
                               (mlp, ("gate_proj", "up_proj", "down_proj"))) for name in names}
    return Layer(_norm(layer.input_layernorm, f"layer {i} input_layernorm"),
                  _norm(layer.post_attention_layernorm, f"layer {i} post_attention_layernorm"),
                  lin["q_proj"], lin["k_proj"], lin["v_proj"], lin["o_proj"],
                  _norm(attn.q_norm, f"layer {i} q_norm") if has_qk_norm else None,
                  _norm(attn.k_norm, f"layer {i} k_norm") if has_qk_norm else None,
                  lin["gate_proj"], lin["up_proj"], lin["down_proj"])


def _only(module: nn.Module, known: set[str], what: str, required: set[str]) -> None:
    """The module's parametrised children are among `known`, and `required` ones are present."""
    children = dict(module.named_children())
    unknown = sorted(n for n, c in children.items() if n not in known and any(True for _ in c.parameters()))
    missing = sorted(required - set(children))
    if unknown or missing:
        detail = (f"unknown parts {unknown}" if unknown else "") + (f" missing {missing}" if missing else "")
        raise FastPathUnsupported(f"{what} is not Llama-like: {detail.strip()}")


def _linear_of(m: nn.Module, what: str, dtype: torch.dtype) -> Linear:
    if type(m) is not nn.Linear or type(m.weight) is not nn.Parameter or m.weight.dtype != dtype:
        raise FastPathUnsupported(f"{what} is not a plain {dtype} nn.Linear ({type(m).__name__}); "
                                  "merge adapters / dequantize first")
    return m.weight, m.bias


def _norm(m: nn.Module | None, what: str) -> Norm:
    weight = getattr(m, "weight", None)
    eps = getattr(m, "variance_epsilon", getattr(m, "eps", None))
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1 or getattr(m, "bias", None) is not None \
            or not isinstance(eps, float):
        raise FastPathUnsupported(f"{what} is not an RMSNorm with a weight and an epsilon")
    return weight, eps


# -- the maths, as HF computes it -----------------------------------------------------------------

def linear(x: torch.Tensor, lin: Linear) -> torch.Tensor:
    return F.linear(x, lin[0], lin[1])


def rms(x: torch.Tensor, norm: Norm) -> torch.Tensor:
    """HF's RMSNorm (normalise in float32, round to x's dtype, times the weight) in two kernels."""
    return norm[0] * F.rms_norm(x, (x.shape[-1],), eps=norm[1])


def rope(pos: torch.Tensor, inv_freq: torch.Tensor, scale: float, dtype: torch.dtype
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, signed sin (B, S, 1, d) for positions (B, S): the rotary module's formula, broadcast over heads.

    The sine's first half is negated, so that `x * cos + x.roll(d / 2) * sin` is HF's
    `x * cos + rotate_half(x) * sin` exactly (negation commutes with rounding)."""
    freqs = pos[..., None].float() * inv_freq.to(device=pos.device, dtype=torch.float)
    emb = torch.cat((freqs, freqs), dim=-1)
    sin = (emb.sin() * scale).to(dtype)
    half = sin.shape[-1] // 2
    return (emb.cos() * scale).to(dtype)[:, :, None], torch.cat((-sin[..., :half], sin[..., half:]), -1)[:, :, None]
