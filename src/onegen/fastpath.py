"""Fast decode path for Llama-like decoders: a compact forward over the HF model's own weights, a
slot-based static KV cache, and the one-token decode step captured in CUDA graphs.

Which models: decided from structure and config, never from architecture names. The body must have
`layers` of `self_attn.{q,k,v,o}_proj` (+ optional per-head `q_norm`/`k_norm`), `mlp.{gate,up,down}_proj`
with a SiLU gate, pre-norm `input_layernorm` / `post_attention_layernorm` RMSNorms, one rotary module of
a static RoPE type (default, linear, llama3), plain `nn.Linear`/`nn.Embedding` weights (LoRA must be
merged first), no attention soft-capping. A sliding window is accepted only while sequences fit in it.
Then it is *proved*: the compact forward must reproduce the HF forward's hidden states and logits on a
probe sequence (so norm offsets, embedding multipliers and the like are refused, not silently wrong).

The cache is one tensor (L, 2, S, H_kv, T + 1, d) in the model dtype; row i of an engine batch owns
slot i and a length. Rows feeding several tokens (a prompt, an inserted paragraph) are prefilled
eagerly, straight into their slots. Rows feeding one token share the decode step, run over slots
[0, bb) and cache columns [0, tb), both bucketed: on CUDA each (bb, tb) is captured once as a CUDA
graph with static buffers and replayed. Slots in the bucket that do not decode this step write into
the spare column T, which is never read. On CPU the same code runs eagerly (what the tests exercise).
No weight is copied: the forward reads the HF model's parameters.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .errors import OneGenError
from .model import OneGenModel

log = logging.getLogger(__name__)

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
ROPE_TYPES = ("default", "linear", "llama3")
_LAYER_PARTS = {"self_attn", "mlp", "input_layernorm", "post_attention_layernorm"}
_ATTN_PARTS = {"q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm"}
_MLP_PARTS = {"gate_proj", "up_proj", "down_proj"}
_PROBE = [5, 7, 11, 3, 2, 9, 13, 4]


class FastPathUnsupported(OneGenError):
    """The model (or this request) cannot run on the fast path; the reason says why."""


Linear = tuple[torch.Tensor, torch.Tensor | None]  # (weight, bias)
Norm = tuple[torch.Tensor, float]  # (weight, eps)


@dataclass
class _Layer:
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
class _Layout:
    embed: torch.Tensor  # (V, D)
    layers: list[_Layer]
    norm: Norm
    n_heads: int
    n_kv: int
    head_dim: int
    scaling: float
    inv_freq: torch.Tensor  # the rotary module's own buffer
    rope_scale: float
    window: int | None  # sliding window: sequences must fit in it


def unsupported_reason(model: OneGenModel) -> str | None:
    """Why `model` cannot use the fast path, or None when it can (structure, config and probe)."""
    try:
        FastDecoder(model)
    except FastPathUnsupported as e:
        return e.message
    return None


def fast_decoder(model: OneGenModel, fast: bool | FastDecoder | None) -> FastDecoder | None:
    """Resolve the engine's `fast=` option: None = auto (CUDA and supported), True = required, False = off."""
    if isinstance(fast, FastDecoder):
        return fast
    if fast is False or (fast is None and not _auto_enabled(model)):
        return None
    try:
        return FastDecoder(model, required=bool(fast))
    except FastPathUnsupported as e:
        if fast:
            raise
        log.info("fast path not used: %s", e.message)
        return None


def _auto_enabled(model: OneGenModel) -> bool:
    return model.device.type == "cuda"


class FastDecoder:
    """The compact forward, the slot cache and the captured decode graphs of one model.

    Args:
        model: a OneGen model whose decoder is Llama-like (see the module docstring).
        graphs: capture the decode step in CUDA graphs (CUDA only; False runs it eagerly).
        required: raise (instead of returning no stepper) when a request does not fit (sliding window).
    Raises FastPathUnsupported with the reason when the model is not supported.
    """

    def __init__(self, model: OneGenModel, graphs: bool = True, required: bool = True):
        self.model = model
        self.required = required
        self.w = _layout(model)
        self.device, self.dtype = model.device, model.dtype
        self.graphs = graphs and self.device.type == "cuda"
        self.kv: torch.Tensor | None = None  # (L, 2, S, H_kv, T + 1, d)
        self._graphs: dict[tuple[int, int], _Graph] = {}
        self._pool = None
        self._probe()

    # -- public ---------------------------------------------------------------------------------
    @property
    def slots(self) -> int:
        return 0 if self.kv is None else self.kv.shape[2]

    @property
    def capacity(self) -> int:
        """Tokens a row can hold (prompt, generated and inserted)."""
        return 0 if self.kv is None else self.kv.shape[4] - 1

    def stepper(self, n_rows: int, max_len: int | None = None) -> _FastStepper | None:
        """A stepper for `n_rows` rows of at most `max_len` tokens each (the cache grows if needed).

        Returns None (or raises when `required`) if `max_len` exceeds the model's sliding window."""
        need = max_len or max(self.capacity, 256)
        if self.w.window is not None and need > self.w.window:
            msg = f"the fast path needs sequences within the sliding window ({need} > {self.w.window} tokens)"
            if self.required:
                raise FastPathUnsupported(msg)
            log.info("fast path not used for this batch: %s", msg)
            return None
        self.reserve(n_rows, need)
        return _FastStepper(self, n_rows)

    @torch.no_grad()
    def reserve(self, n_rows: int, max_len: int) -> None:
        """Make room for `n_rows` slots of `max_len` tokens (keeps what the cache holds)."""
        slots, cap = max(_batch_bucket(n_rows), self.slots), max(_round_up(max_len, 128), self.capacity)
        if slots == self.slots and cap == self.capacity:
            return
        old, self.kv = self.kv, None
        self._graphs.clear()  # graphs hold the old cache's addresses
        w = self.w
        kv = torch.zeros((len(w.layers), 2, slots, w.n_kv, cap + 1, w.head_dim), dtype=self.dtype,
                         device=self.device)  # zeros: masked garbage must be finite (0 * NaN = NaN)
        if old is not None:
            kv[:, :, : old.shape[2], :, : old.shape[4] - 1] = old[:, :, :, :, :-1]
        self.kv = kv

    @torch.no_grad()
    def warmup(self, batch_sizes: tuple[int, ...] = BATCH_BUCKETS, max_len: int = 2048) -> None:
        """Allocate the cache and capture every decode graph now (so timings exclude capture)."""
        self.reserve(max(batch_sizes), max_len)
        if not self.graphs:
            return
        for b in sorted({_batch_bucket(b) for b in batch_sizes}):
            for t in _len_buckets(self.capacity):
                self._graph(b, t)

    # -- the decode step ------------------------------------------------------------------------
    def decode(self, tokens: list[int], write_pos: list[int], attend_len: list[int], tb: int,
               graphs: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One token for each of the first bb slots; returns hidden (bb, D) and logits (bb, V)."""
        bb = len(tokens)
        args = [torch.tensor(x, dtype=torch.long) for x in (tokens, write_pos, attend_len)]
        if not (self.graphs if graphs is None else graphs):
            return self._decode(*(a.to(self.device) for a in args), tb)
        g = self._graph(bb, tb)
        for static, a in zip((g.tokens, g.write_pos, g.attend_len), args, strict=True):
            static.copy_(a)
        g.graph.replay()
        return g.hidden, g.logits

    def _graph(self, bb: int, tb: int) -> _Graph:
        if (bb, tb) in self._graphs:
            return self._graphs[(bb, tb)]
        dev = self.device
        tokens = torch.full((bb,), self.model.ids.pad, dtype=torch.long, device=dev)
        write_pos = torch.full((bb,), self.capacity, dtype=torch.long, device=dev)  # the spare column
        attend_len = torch.ones((bb,), dtype=torch.long, device=dev)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):  # warm-up runs outside the capture (kernel selection, workspaces)
            for _ in range(2):
                self._decode(tokens, write_pos, attend_len, tb)
        torch.cuda.current_stream(dev).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            hidden, logits = self._decode(tokens, write_pos, attend_len, tb)
        self._graphs[(bb, tb)] = g = _Graph(graph, tokens, write_pos, attend_len, hidden, logits)
        return g

    def _decode(self, tokens: torch.Tensor, write_pos: torch.Tensor, attend_len: torch.Tensor, tb: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """The graph body: fixed shapes, no host synchronisation."""
        w, kv = self.w, self.kv
        bb, rep = tokens.shape[0], w.n_heads // w.n_kv
        rows = torch.arange(bb, device=tokens.device)
        mask = (torch.arange(tb, device=tokens.device)[None] < attend_len[:, None])[:, None, None]  # (bb,1,1,tb)

        def attend(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            kv[i, 0][rows, :, write_pos] = k[:, 0]  # (bb, H_kv, d) into each slot's column
            kv[i, 1][rows, :, write_pos] = v[:, 0]
            qg = q.reshape(bb, w.n_kv, rep, w.head_dim)  # query heads grouped by their KV head
            out = F.scaled_dot_product_attention(qg, kv[i, 0, :bb, :, :tb], kv[i, 1, :bb, :, :tb],
                                                 attn_mask=mask, scale=w.scaling)  # (bb, H_kv, rep, d)
            return out.reshape(bb, 1, w.n_heads * w.head_dim)

        x = F.embedding(tokens[:, None], w.embed)  # (bb, 1, D)
        x = self._layers(x, write_pos[:, None], attend)
        hidden = _rms(x[:, 0], w.norm)
        return hidden, self.model.logits(hidden)

    # -- prefill --------------------------------------------------------------------------------
    def prefill(self, slots: list[int], feeds: list[list[int]], starts: list[int], all_positions: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Each row's new tokens written into its slot from position `starts[r]`, eagerly.

        Returns hidden (P, D) at each row's last new token and its logits (P, V); with
        `all_positions`, hidden (P, S, D) at every new token (right-padded) and no logits."""
        w, kv, dev = self.w, self.kv, self.device
        n, width, rep = len(feeds), max(len(f) for f in feeds), w.n_heads // w.n_kv
        ids = torch.full((n, width), self.model.ids.pad, dtype=torch.long)
        for r, f in enumerate(feeds):
            ids[r, : len(f)] = torch.tensor(f)
        lens = torch.tensor([len(f) for f in feeds], device=dev)
        pos = torch.tensor(starts, device=dev)[:, None] + torch.arange(width, device=dev)  # (P, S)
        valid = torch.arange(width, device=dev)[None] < lens[:, None]
        slot_t = torch.tensor(slots, device=dev)
        slot_idx, pos_idx = slot_t[:, None].expand(n, width)[valid], pos[valid]  # (N,) real tokens
        tp = max(s + len(f) for s, f in zip(starts, feeds, strict=True))
        mask = torch.arange(tp, device=dev)[None, None] <= pos[:, :, None]  # (P, S, tp) causal over the cache
        mask = mask[:, None].expand(n, rep, width, tp).reshape(n, 1, rep * width, tp)

        def attend(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            kv[i, 0][slot_idx, :, pos_idx] = k[valid]  # (N, H_kv, d)
            kv[i, 1][slot_idx, :, pos_idx] = v[valid]
            keys, vals = kv[i, 0, :, :, :tp][slot_t], kv[i, 1, :, :, :tp][slot_t]  # (P, H_kv, tp, d)
            qg = q.view(n, width, w.n_kv, rep, w.head_dim).permute(0, 2, 3, 1, 4).reshape(
                n, w.n_kv, rep * width, w.head_dim)  # row r * S + s: group member r, token s
            out = F.scaled_dot_product_attention(qg, keys, vals, attn_mask=mask, scale=w.scaling)
            return out.view(n, w.n_kv, rep, width, w.head_dim).permute(0, 3, 1, 2, 4).reshape(
                n, width, w.n_heads * w.head_dim)

        x = self._layers(F.embedding(ids.to(dev), w.embed), pos, attend)
        if all_positions:
            return _rms(x, w.norm), None
        hidden = _rms(x[torch.arange(n, device=dev), lens - 1], w.norm)
        return hidden, self.model.logits(hidden)

    # -- shared by both ---------------------------------------------------------------------------
    def _layers(self, x: torch.Tensor, pos: torch.Tensor, attend) -> torch.Tensor:
        """The decoder layers over x (B, S, D) at positions pos (B, S); `attend` writes K/V and attends."""
        w = self.w
        cos, sin = _rope(pos, w.inv_freq, w.rope_scale, x.dtype)  # (B, S, 1, d)
        b, s = x.shape[:2]
        for i, layer in enumerate(w.layers):
            h = _rms(x, layer.ln_attn)
            q = _linear(h, layer.q).view(b, s, w.n_heads, w.head_dim)
            k = _linear(h, layer.k).view(b, s, w.n_kv, w.head_dim)
            v = _linear(h, layer.v).view(b, s, w.n_kv, w.head_dim)
            if layer.q_norm is not None and layer.k_norm is not None:
                q, k = _rms(q, layer.q_norm), _rms(k, layer.k_norm)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            x = x + _linear(attend(i, q, k, v), layer.o)
            h = _rms(x, layer.ln_mlp)
            x = x + _linear(F.silu(_linear(h, layer.gate)) * _linear(h, layer.up), layer.down)
        return x

    @torch.no_grad()
    def _probe(self) -> None:
        """Refuse the model unless the compact forward (prefill + decode) reproduces the HF forward."""
        hf = self.model.hf_model
        vocab = self.w.embed.shape[0]
        ids = [t % vocab for t in _PROBE]
        was_training = hf.training
        hf.eval()
        try:
            ref = hf(input_ids=torch.tensor([ids], device=self.device), output_hidden_states=True, use_cache=False)
        finally:
            hf.train(was_training)
        self.reserve(1, 16)
        split = len(ids) // 2
        head, _ = self.prefill([0], [ids[:split]], [0], all_positions=True)
        got = [head[0]]
        for p in range(split, len(ids)):
            hidden, _ = self.decode([ids[p]], [p], [p + 1], self.capacity, graphs=False)
            got.append(hidden)
        got_hidden = torch.cat(got).float()
        got_logits = self.model.logits(got_hidden.to(self.dtype)).float()
        tol = 1e-4 if self.dtype == torch.float32 else 0.1  # structural mistakes are O(1)
        for name, a, b in (("hidden states", got_hidden, ref.hidden_states[-1][0].float()),
                           ("logits", got_logits, ref.logits[0].float())):
            err = float((a - b).norm() / b.norm().clamp(min=1e-6))
            if not err <= tol:
                raise FastPathUnsupported(f"the compact forward does not reproduce the model's {name} "
                                          f"(relative error {err:.2g}): a layer computes something else")


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    tokens: torch.Tensor
    write_pos: torch.Tensor
    attend_len: torch.Tensor
    hidden: torch.Tensor
    logits: torch.Tensor


class _FastStepper:
    """The engine's stepper on the fast path: row i lives in slot i; same interface as `_CachedStepper`."""

    def __init__(self, decoder: FastDecoder, n_rows: int):
        self.decoder = decoder
        self.lengths = [0] * n_rows  # tokens in each row's slot

    @torch.no_grad()
    def step(self, feeds: list[list[int]], histories: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Process each row's new tokens; returns the last-position hidden (B, D) and logits (B, V)."""
        dec, n = self.decoder, len(feeds)
        need = max(length + len(f) for length, f in zip(self.lengths, feeds, strict=True))
        if need > dec.capacity:
            dec.reserve(n, need)
        parts: list[tuple[list[int], torch.Tensor, torch.Tensor]] = []
        # 1. rows feeding one token: the (captured) decode step over slots [0, bb)
        one = [i for i, f in enumerate(feeds) if len(f) == 1]
        if one:
            bb = _batch_bucket(one[-1] + 1)
            tokens, write_pos, attend = [dec.model.ids.pad] * bb, [dec.capacity] * bb, [1] * bb
            for i in one:
                tokens[i], write_pos[i], attend[i] = feeds[i][0], self.lengths[i], self.lengths[i] + 1
            tb = _len_bucket(max(attend), dec.capacity)
            hidden, logits = dec.decode(tokens, write_pos, attend, tb)
            parts.append((one, hidden[one], logits[one]))
        # 2. rows feeding several tokens (prompt, inserted paragraph): prefilled eagerly into their slots
        many = [i for i, f in enumerate(feeds) if len(f) > 1]
        if many:
            hidden, logits = dec.prefill(many, [feeds[i] for i in many], [self.lengths[i] for i in many])
            parts.append((many, hidden, logits))
        for i, f in enumerate(feeds):
            self.lengths[i] += len(f)
        d, v = parts[0][1].shape[-1], parts[0][2].shape[-1]
        out_hidden = parts[0][1].new_zeros((n, d))
        out_logits = parts[0][2].new_zeros((n, v))
        for idx, hidden, logits in parts:
            index = torch.tensor(idx, device=hidden.device)
            out_hidden.index_copy_(0, index, hidden)
            out_logits.index_copy_(0, index, logits)
        return out_hidden, out_logits


# -- layout: what the HF model holds, checked ---------------------------------------------------

def _layout(model: OneGenModel) -> _Layout:
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
    windows = [getattr(layer.self_attn, "sliding_window", None) for layer in layers]
    if getattr(cfg, "use_sliding_window", True) is not False:
        windows.append(getattr(cfg, "sliding_window", None))
    windows = [x for x in windows if isinstance(x, int) and x > 0]
    return _Layout(embed.weight, out, _norm(getattr(body, "norm", None), "the final norm"), n_heads, n_kv,
                   head_dim, float(getattr(attn, "scaling", head_dim ** -0.5)), rotary[0].inv_freq,
                   float(getattr(rotary[0], "attention_scaling", 1.0) or 1.0), min(windows) if windows else None)


def _layer(layer: nn.Module, i: int, dtype: torch.dtype) -> _Layer:
    _only(layer, _LAYER_PARTS, f"layer {i}", required=_LAYER_PARTS)
    attn, mlp = layer.self_attn, layer.mlp
    _only(attn, _ATTN_PARTS, f"layer {i} attention", required={"q_proj", "k_proj", "v_proj", "o_proj"})
    _only(mlp, _MLP_PARTS, f"layer {i} MLP", required=_MLP_PARTS)
    has_qk_norm = getattr(attn, "q_norm", None) is not None
    lin = {name: _linear_of(getattr(part, name), f"layer {i} {name}", dtype)
           for part, names in ((attn, ("q_proj", "k_proj", "v_proj", "o_proj")),
                               (mlp, ("gate_proj", "up_proj", "down_proj"))) for name in names}
    return _Layer(_norm(layer.input_layernorm, f"layer {i} input_layernorm"),
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

def _linear(x: torch.Tensor, lin: Linear) -> torch.Tensor:
    return F.linear(x, lin[0], lin[1])


def _rms(x: torch.Tensor, norm: Norm) -> torch.Tensor:
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm[1])
    return norm[0] * h.to(x.dtype)


def _rope(pos: torch.Tensor, inv_freq: torch.Tensor, scale: float, dtype: torch.dtype
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (B, S, 1, d) for positions (B, S): the rotary module's formula, broadcast over heads."""
    freqs = pos[..., None].float() * inv_freq.to(device=pos.device, dtype=torch.float)
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * scale).to(dtype)[:, :, None], (emb.sin() * scale).to(dtype)[:, :, None]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _batch_bucket(n: int) -> int:
    return next((b for b in BATCH_BUCKETS if b >= n), _round_up(n, BATCH_BUCKETS[-1]))


def _round_up(n: int, to: int) -> int:
    return max(to, -(-n // to) * to)


def _len_bucket(need: int, capacity: int) -> int:
    """Cache columns a decode step attends over: a power of two from 128, at most the capacity."""
    b = 128
    while b < need:
        b *= 2
    return min(b, capacity)


def _len_buckets(capacity: int) -> list[int]:
    out, b = [], 128
    while b < capacity:
        out.append(b)
        b *= 2
    return out + [capacity]
