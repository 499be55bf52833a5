"""Fast decode path for Llama-like decoders: a compact forward over the HF model's own weights, a
slot-based static KV cache, and the one-token decode step captured in CUDA graphs.

Which models: decided from structure and config, never from architecture names (`fastlayout`: Llama,
Mistral, Qwen2, Qwen3 and the like). Then it is *proved*: the compact forward must reproduce the HF
forward's hidden states and logits on a probe sequence, so norm offsets, embedding multipliers and the
like are refused, not silently wrong. A sliding window is accepted while the sequences fit in it.

The cache is one tensor (L, 2, S, H_kv, T + 1, d) in the model dtype; row i of an engine batch owns
slot i and a length. Rows feeding several tokens (a prompt, an inserted paragraph) are prefilled
eagerly, straight into their slots. Rows feeding one token share the decode step, run over slots
[0, bb) and cache columns [0, tb), both bucketed: on CUDA each (bb, tb) is captured once as a CUDA
graph with static buffers and replayed. Slots in the bucket that do not decode this step write into
the spare column T, which is never read. On CPU the same code runs eagerly (what the tests exercise).
No weight is copied: the forward reads the HF model's parameters. Use: `Engine(model, index, fast=...)`,
or build a `FastDecoder`, `warmup()` it and pass it as `fast=` (graphs captured before timing).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .fastlayout import FastPathUnsupported, layout, rms, run_layers
from .model import OneGenModel

__all__ = ["FastDecoder", "FastPathUnsupported", "fast_decoder", "unsupported_reason"]

log = logging.getLogger(__name__)

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
_PROBE = [5, 7, 11, 3, 2, 9, 13, 4]


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
        compile: run the decode step through `torch.compile` (fuses the small element-wise kernels
            before the graph capture; costs a compilation per new shape; off by default).
    Raises FastPathUnsupported with the reason when the model is not supported.
    """

    def __init__(self, model: OneGenModel, graphs: bool = True, required: bool = True, compile: bool = False):
        self.model = model
        self.required = required
        self.w = layout(model)
        self.device, self.dtype = model.device, model.dtype
        self.graphs = graphs and self.device.type == "cuda"
        self.kv: torch.Tensor | None = None  # (L, 2, S, H_kv, T + 1, d)
        self._graphs: dict[tuple[int, int], _Graph] = {}
        self._pool = None
        self.replays = 0  # decode steps served by a captured graph
        self._decode_fn = torch.compile(self._decode, fullgraph=True) if compile else self._decode
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
        """A stepper for `n_rows` rows of at most `max_len` tokens each.

        `max_len` sizes the cache when there is none yet (or too few slots); an existing cache (e.g. from
        `warmup`) is kept and grows only when a row really needs more. Returns None (or raises when
        `required`) if `max_len` exceeds the model's sliding window."""
        need = max_len or 256
        if self.w.window is not None and need > self.w.window:
            msg = f"the fast path needs sequences within the sliding window ({need} > {self.w.window} tokens)"
            if self.required:
                raise FastPathUnsupported(msg)
            log.info("fast path not used for this batch: %s", msg)
            return None
        if self.slots < n_rows:
            self.reserve(n_rows, need)
        return _FastStepper(self, n_rows)

    @torch.no_grad()
    def reserve(self, n_rows: int, max_len: int, min_len: int = 0) -> None:
        """Make room for `n_rows` slots of `max_len` tokens (keeps what the cache holds). On CUDA, `max_len`
        is cut to what fits in free memory, but never below `min_len`."""
        slots, cap = max(_batch_bucket(n_rows), self.slots), max(_round_up(max_len, 128), self.capacity)
        if slots == self.slots and cap == self.capacity:
            return
        old, self.kv = self.kv, None
        self._graphs.clear()  # graphs hold the old cache's addresses
        self._pool = None
        w = self.w
        if self.device.type == "cuda":  # an upper bound may not fit: take what does, grow when really needed
            per_column = len(w.layers) * 2 * slots * w.n_kv * w.head_dim * self.w.embed.element_size()
            free = torch.cuda.mem_get_info(self.device)[0] - (1 << 30)  # 1 GiB for activations and graphs
            fits = (max(free, 0) // per_column - 1) // 128 * 128
            if fits < cap:
                log.info("KV cache: %d of the %d tokens asked for fit in GPU memory", fits, cap)
                cap = max(fits, _round_up(min_len, 128), self.capacity)
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
    @torch.no_grad()
    def decode(self, tokens: list[int], write_pos: list[int], attend_len: list[int], tb: int,
               graphs: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One token for each of the first bb slots, written at `write_pos` and attending over the first
        `attend_len` columns (of at most tb); returns hidden (bb, D) and logits (bb, V)."""
        inputs = torch.tensor([tokens, write_pos, attend_len], dtype=torch.long)  # (3, bb): one copy
        if not (self.graphs if graphs is None else graphs):
            return self._decode_fn(inputs.to(self.device), tb)
        g = self._graph(len(tokens), tb)
        g.inputs.copy_(inputs)
        g.graph.replay()
        self.replays += 1
        return g.hidden, g.logits

    def _graph(self, bb: int, tb: int) -> _Graph:
        if (bb, tb) in self._graphs:
            return self._graphs[(bb, tb)]
        dev = self.device
        inputs = torch.tensor([[self.model.ids.pad] * bb, [self.capacity] * bb, [1] * bb], device=dev)  # spare column
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):  # warm-up runs outside the capture (kernel selection, workspaces)
            for _ in range(2):
                self._decode_fn(inputs, tb)
        torch.cuda.current_stream(dev).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            hidden, logits = self._decode_fn(inputs, tb)
        self._graphs[(bb, tb)] = g = _Graph(graph, inputs, hidden, logits)
        return g

    def _decode(self, inputs: torch.Tensor, tb: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The graph body: fixed shapes, no host synchronisation."""
        w, kv = self.w, self.kv
        tokens, write_pos, attend_len = inputs  # (bb,) each
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
        x = run_layers(self.w, x, write_pos[:, None], attend)
        hidden = rms(x[:, 0], w.norm)
        return hidden, self.model.logits(hidden)

    # -- prefill --------------------------------------------------------------------------------
    @torch.no_grad()
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

        x = run_layers(self.w, F.embedding(ids.to(dev), w.embed), pos, attend)
        if all_positions:
            return rms(x, w.norm), None
        hidden = rms(x[torch.arange(n, device=dev), lens - 1], w.norm)
        return hidden, self.model.logits(hidden)

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
        self.reserve(1, 16)  # a temporary cache: the first stepper sizes the real one
        split = len(ids) // 2
        head, _ = self.prefill([0], [ids[:split]], [0], all_positions=True)
        got = [head[0]]
        for p in range(split, len(ids)):
            hidden, _ = self._decode(torch.tensor([[ids[p]], [p], [p + 1]], device=self.device), self.capacity)
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
        self.kv = None


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    inputs: torch.Tensor  # (3, bb): tokens, write positions, attended lengths
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
            if dec.w.window is not None and need > dec.w.window:
                raise FastPathUnsupported(f"a row outgrew the sliding window ({need} > {dec.w.window} tokens)")
            dec.reserve(n, max(need, 2 * dec.capacity), min_len=need)  # geometric: few re-captures
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
            if len(one) == n:  # the common step: every row decodes (copies: graph outputs get overwritten)
                self._advance(feeds)
                return hidden[:n].clone(), logits[:n].clone()
            parts.append((one, hidden[one], logits[one]))
        # 2. rows feeding several tokens (prompt, inserted paragraph): prefilled eagerly into their slots
        many = [i for i, f in enumerate(feeds) if len(f) > 1]
        if many:
            hidden, logits = dec.prefill(many, [feeds[i] for i in many], [self.lengths[i] for i in many])
            parts.append((many, hidden, logits))
        self._advance(feeds)
        d, v = parts[0][1].shape[-1], parts[0][2].shape[-1]
        out_hidden = parts[0][1].new_zeros((n, d))
        out_logits = parts[0][2].new_zeros((n, v))
        for idx, hidden, logits in parts:
            index = torch.tensor(idx, device=hidden.device)
            out_hidden.index_copy_(0, index, hidden)
            out_logits.index_copy_(0, index, logits)
        return out_hidden, out_logits

    def _advance(self, feeds: list[list[int]]) -> None:
        for i, f in enumerate(feeds):
            self.lengths[i] += len(f)


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
