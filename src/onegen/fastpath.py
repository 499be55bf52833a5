"""Fast decode path for Llama-like decoders: a compact forward over the HF model's own weights, a
slot-based static KV cache, and the one-token decode step captured in CUDA graphs.

Which models: decided from structure and config, never from architecture names (`fastlayout`: Llama,
Mistral, Qwen2, Qwen3 and the like). Then it is *proved*: the compact forward must reproduce the HF
forward's hidden states and logits on a probe sequence, so norm offsets, embedding multipliers and the
like are refused, not silently wrong; a bf16/fp16 model is first checked on a float32 twin of its first
layers (`_check_in_float32`), where rounding cannot hide such a difference. A sliding window is
accepted while the sequences fit in it. The engine's stepper and the shape buckets are in `faststep`.

The cache is a K and a V tensor (S, H_kv, T + 1, d) per layer, in the model dtype (separate tensors:
`torch.compile` turns a write into a view of one big tensor into a copy of all of it); row i of an engine batch owns
slot i and a length. Every step is ONE forward over the layers (every weight read once), in one of two
forms. The step: rows feeding one token run over slots [0, bb) and cache columns [0, tb), and rows
inserting a paragraph in the same step join it as p runs padded to `insert_width` tokens: the linear
parts run once over the (1, bb + p * w) packed tokens, each token's K/V goes to its own slot and
position, and attention is two SDPA calls (one query per decode slot; the runs' queries, causal, over
their own slots' gathered columns), so decode rows never pay for the runs' width. bb, p, w and tb are
bucketed: on CUDA each shape is captured once as a CUDA graph with static buffers and replayed (decode
only: p = 0). Idle slots and padding write into the spare column T, which is never read. Steps where
no row decodes (the prompts) are prefilled eagerly, straight into the slots. On CPU the same code runs
eagerly (what the tests exercise); `mixed=False` keeps the older separate prefill as a reference.
No weight is copied: the forward reads the HF model's parameters. Use: `Engine(model, index, fast=...)`,
or build a `FastDecoder`, `warmup()` it and pass it as `fast=` (graphs captured before timing).
"""

from __future__ import annotations

import copy
import gc
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .fastlayout import FastPathUnsupported, layout, rms, run_layers
from .faststep import BATCH_BUCKETS, FastStepper, batch_bucket, len_bucket, len_buckets, round_up
from .model import OneGenModel

__all__ = ["FastDecoder", "FastPathUnsupported", "fast_decoder", "unsupported_reason"]

log = logging.getLogger(__name__)

MAX_GRAPH_INSERTS = 8  # steps with more inserted runs than this run their (one) forward eagerly
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
        mixed: rows feeding up to `insert_width` tokens (an inserted paragraph) join the decode rows'
            forward (the mixed step); False prefills them in a separate forward (the reference).
    Raises FastPathUnsupported with the reason when the model is not supported.
    """

    def __init__(self, model: OneGenModel, graphs: bool = True, required: bool = True, compile: bool = False,
                 mixed: bool = True):
        self.model = model
        self.required = required
        self.mixed_steps = mixed
        self.insert_width = round_up(model.renderer.doc_max_length + 2, 16)  # every inserted run padded to it
        self.w = layout(model)
        self.device, self.dtype = model.device, model.dtype
        self.graphs = graphs and self.device.type == "cuda"
        self.kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # per layer K, V: (S, H_kv, T + 1, d)
        self._graphs: dict[tuple[int, int, int, int], _Graph] = {}  # (bb, p, w, tb)
        self._pool = None
        self.forwards = 0  # forwards over the layers (each reads every weight once)
        self.replays = 0  # of which served by a captured graph
        self.prefills = 0  # of which eager prefills (no row decoding: prompts, a lone insertion)
        self.mixed = 0  # of which carried decode tokens and inserted runs together
        self._forward_fn = torch.compile(self._forward, fullgraph=True) if compile else self._forward
        if self.dtype != torch.float32:
            _check_in_float32(model)  # the structure, where rounding cannot hide a difference
        self._probe()

    # -- public ---------------------------------------------------------------------------------
    @property
    def slots(self) -> int:
        return 0 if self.kv is None else self.kv[0][0].shape[0]

    @property
    def capacity(self) -> int:
        """Tokens a row can hold (prompt, generated and inserted)."""
        return 0 if self.kv is None else self.kv[0][0].shape[2] - 1

    def stepper(self, n_rows: int, max_len: int | None = None) -> FastStepper | None:
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
        return FastStepper(self, n_rows)

    @torch.no_grad()
    def reserve(self, n_rows: int, max_len: int, min_len: int = 0) -> None:
        """Make room for `n_rows` slots of `max_len` tokens (keeps what the cache holds). On CUDA, `max_len`
        is cut to what fits in free memory, but never below `min_len`."""
        slots, cap = max(batch_bucket(n_rows), self.slots), max(round_up(max_len, 128), self.capacity)
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
                cap = max(fits, round_up(min_len, 128), self.capacity)
        shape = (slots, w.n_kv, cap + 1, w.head_dim)  # zeros: masked garbage must be finite (0 * NaN = NaN)
        kv = [(torch.zeros(shape, dtype=self.dtype, device=self.device),
               torch.zeros(shape, dtype=self.dtype, device=self.device)) for _ in w.layers]
        for new, prev in zip(kv, old or [], strict=False):  # what the old cache held, spare column excluded
            for a, b in zip(new, prev, strict=True):
                a[: b.shape[0], :, : b.shape[2] - 1] = b[:, :, :-1]
        self.kv = kv

    @torch.no_grad()
    def warmup(self, batch_sizes: tuple[int, ...] = BATCH_BUCKETS, max_len: int = 2048,
               insert_rows: tuple[int, ...] = (1, 2)) -> None:
        """Allocate the cache and capture every decode graph now (so timings exclude capture), and the mixed
        step's graphs for steps where up to `insert_rows` rows insert a paragraph (others: on first use)."""
        self.reserve(max(batch_sizes), max_len)
        if not self.graphs:
            return
        for b in sorted({batch_bucket(b) for b in batch_sizes}):
            runs = sorted({batch_bucket(p) for p in insert_rows if p < b}) if self.mixed_steps else []  # + 1 decoding
            for t in len_buckets(self.capacity):
                self._graph(b, 0, 0, t)
                for p in runs:
                    self._graph(b, p, self.insert_width, t)

    # -- the step: decode rows and inserted runs in one forward -----------------------------------
    @torch.no_grad()
    def run(self, bb: int, decode: dict[int, tuple[int, int]], inserts: list[tuple[int, list[int], int]],
            graphs: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """ONE forward over the first `bb` slots' decode tokens and the inserted runs (weights read once).

        decode: slot -> (token, position) for the slots in [0, bb) that decode one token (the others idle);
        inserts: (slot, tokens, start) for rows feeding up to `insert_width` tokens, written from `start`.
        Returns hidden (bb + I, D) and logits (bb + I, V): slot s at row s, insert j at row bb + j."""
        p = batch_bucket(len(inserts)) if inserts else 0
        w = self.insert_width if inserts else 0
        need = max([q + 1 for _, q in decode.values()] + [s + len(f) for _, f, s in inserts] + [1])
        inputs = torch.tensor(self._pack(bb, p, w, decode, inserts), dtype=torch.long)  # one copy to the device
        tb = len_bucket(need, self.capacity)
        self.forwards += 1
        self.mixed += bool(inserts)
        if not (self.graphs if graphs is None else graphs) or p > MAX_GRAPH_INSERTS:
            hidden, logits = self._forward_fn(inputs.to(self.device), bb, p, w, tb)
        else:
            g = self._graph(bb, p, w, tb)
            g.inputs.copy_(inputs)
            g.graph.replay()
            self.replays += 1
            hidden, logits = g.hidden, g.logits
        return hidden[: bb + len(inserts)], logits[: bb + len(inserts)]

    def _pack(self, bb: int, p: int, w: int, decode: dict[int, tuple[int, int]],
              inserts: list[tuple[int, list[int], int]]) -> list[int]:
        """The step's host-side inputs, flat: tokens, positions, slots, cache columns (n = bb + p * w each),
        then the p inserted runs' last-token rows. Idle slots, padding tokens and padding runs write into
        the spare column (never read); their outputs are dropped."""
        n, spare, pad = bb + p * w, self.capacity, self.model.ids.pad
        tokens, pos, slot, col, last = [pad] * n, [spare] * n, list(range(bb)) + [0] * (p * w), [spare] * n, [bb] * p
        for s, (t, q) in decode.items():
            tokens[s], pos[s], col[s] = t, q, q
        for j, (s, feed, start) in enumerate(inserts):
            base, m = bb + j * w, len(feed)
            tokens[base: base + m] = feed
            pos[base: base + w] = range(start, start + w)
            slot[base: base + w] = [s] * w
            col[base: base + m] = range(start, start + m)
            last[j] = base + m - 1
        return tokens + pos + slot + col + last

    def _graph(self, bb: int, p: int, w: int, tb: int) -> _Graph:
        key = (bb, p, w, tb)
        if key in self._graphs:
            return self._graphs[key]
        dev = self.device
        inputs = torch.tensor(self._pack(bb, p, w, {}, []), device=dev)  # every token idle
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):  # warm-up runs outside the capture (kernel selection, workspaces)
            for _ in range(2):
                self._forward_fn(inputs, bb, p, w, tb)
        torch.cuda.current_stream(dev).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            hidden, logits = self._forward_fn(inputs, bb, p, w, tb)
        self._graphs[key] = g = _Graph(graph, inputs, hidden, logits)
        return g

    def _forward(self, inputs: torch.Tensor, bb: int, p: int, w: int, tb: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The graph body (fixed shapes, no host synchronisation): layers once over (1, bb + p * w) tokens.

        Attention in two groups over the same cache: decode tokens, one query per slot [0, bb) against
        that slot's first tb columns (what the decode-only step always did), and the p inserted runs, p * w
        padded queries against their own slots' columns gathered (p, H_kv, tb, d), causal by position. No
        decode row pays for the runs' width, and the gather copies only p slots."""
        wl, kv = self.w, self.kv
        n, rep, dev = bb + p * w, wl.n_heads // wl.n_kv, inputs.device
        tokens, pos, slot, col = inputs[: 4 * n].view(4, n)
        mask = torch.arange(tb, device=dev)[None] <= pos[:, None]  # (n, tb): each token up to its position
        decode_mask = mask[:bb, None, None]  # (bb, 1, 1, tb)
        if p:
            run_slots = slot[bb:].view(p, w)[:, 0]  # (p,)
            run_mask = mask[bb:].view(p, 1, 1, w, tb).expand(p, 1, rep, w, tb).reshape(p, 1, rep * w, tb)

        def attend(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            kc, vc = kv[i]
            kc[slot, :, col] = k[0]  # (n, H_kv, d) into each token's slot and column
            vc[slot, :, col] = v[0]
            qd = q[0, :bb].reshape(bb, wl.n_kv, rep, wl.head_dim)  # query heads grouped by their KV head
            out = F.scaled_dot_product_attention(qd, kc[:bb, :, :tb], vc[:bb, :, :tb],
                                                 attn_mask=decode_mask, scale=wl.scaling)  # (bb, H_kv, rep, d)
            out = out.reshape(bb, wl.n_heads * wl.head_dim)
            if p:
                qr = q[0, bb:].view(p, w, wl.n_kv, rep, wl.head_dim).permute(0, 2, 3, 1, 4).reshape(
                    p, wl.n_kv, rep * w, wl.head_dim)  # row r * w + s: group member r, token s
                keys, vals = kc[:, :, :tb][run_slots], vc[:, :, :tb][run_slots]  # (p, H_kv, tb, d)
                runs = F.scaled_dot_product_attention(qr, keys, vals, attn_mask=run_mask, scale=wl.scaling)
                out = torch.cat([out, runs.view(p, wl.n_kv, rep, w, wl.head_dim).permute(0, 3, 1, 2, 4).reshape(
                    p * w, wl.n_heads * wl.head_dim)])
            return out[None]  # (1, n, H * d)

        x = run_layers(wl, F.embedding(tokens[None], wl.embed), pos[None], attend)  # (1, n, D)
        rows = torch.cat([torch.arange(bb, device=dev), inputs[4 * n:]])  # (bb + p,) each row's last token
        hidden = rms(x[0, rows], wl.norm)
        return hidden, self.model.logits(hidden)

    # -- prefill --------------------------------------------------------------------------------
    @torch.no_grad()
    def prefill(self, slots: list[int], feeds: list[list[int]], starts: list[int], all_positions: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Each row's new tokens written into its slot from position `starts[r]`, eagerly.

        Returns hidden (P, D) at each row's last new token and its logits (P, V); with
        `all_positions`, hidden (P, S, D) at every new token (right-padded) and no logits."""
        w, kv, dev = self.w, self.kv, self.device
        self.forwards += 1
        self.prefills += 1
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
            kc, vc = kv[i]
            kc[slot_idx, :, pos_idx] = k[valid]  # (N, H_kv, d)
            vc[slot_idx, :, pos_idx] = v[valid]
            keys, vals = kc[:, :, :tp][slot_t], vc[:, :, :tp][slot_t]  # (P, H_kv, tp, d)
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
        """Refuse the model unless the compact forward (prefill, an inserted run, decode) reproduces the HF
        forward."""
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
        head, _ = self.prefill([0], [ids[:3]], [0], all_positions=True)  # positions 0-2
        got, w = [head[0]], self.insert_width
        for bb, p, decode, inserts in ((1, 1, {}, [(0, ids[3:6], 3)]),  # position 5: a run, slot 0 idle
                                       (1, 0, {0: (ids[6], 6)}, []), (1, 0, {0: (ids[7], 7)}, [])):
            inputs = torch.tensor(self._pack(bb, p, w * p, decode, inserts), device=self.device)
            hidden, _ = self._forward(inputs, bb, p, w * p, self.capacity)
            got.append(hidden[-1:])
        got_hidden = torch.cat(got).float()
        got_logits = self.model.logits(got_hidden.to(self.dtype)).float()
        seen = [0, 1, 2, 5, 6, 7]
        tol = 1e-4 if self.dtype == torch.float32 else 0.1  # structural mistakes are O(1)
        for name, a, b in (("hidden states", got_hidden, ref.hidden_states[-1][0, seen].float()),
                           ("logits", got_logits, ref.logits[0, seen].float())):
            err = float((a - b).norm() / b.norm().clamp(min=1e-6))
            if not err <= tol:
                raise FastPathUnsupported(f"the compact forward does not reproduce the model's {name} "
                                          f"(relative error {err:.2g}): a layer computes something else")
        self.kv, self.forwards, self.prefills = None, 0, 0


PROBE_LAYERS = 6  # layers of the float32 twin: enough for the usual per-layer patterns (sliding, NoPE)


def _check_in_float32(model: OneGenModel) -> None:
    """Refuse (FastPathUnsupported) a low-precision model whose structure the fast path does not compute.

    In bf16 the compact forward and HF's differ by rounding (a few 1e-3), which can hide a real
    difference of the same size (another RoPE layout, a residual multiplier, a layer without RoPE). So
    the structure is checked on a float32 twin: the same class and config cut to its first
    `PROBE_LAYERS` layers (per-layer config lists cut alike), with the model's own weights upcast, where
    the probe's tolerance is 1e-4. The twin is dropped afterwards; the real model is not touched."""
    hf = model.hf_model
    cfg = copy.deepcopy(hf.config)
    n = getattr(cfg, "num_hidden_layers", None)
    if not isinstance(n, int) or n < 1:
        raise FastPathUnsupported("the config does not say how many layers the decoder has")
    k = min(n, PROBE_LAYERS)
    for key, value in list(vars(cfg).items()):  # per-layer lists (layer_types, no_rope_layers, ...)
        if isinstance(value, list) and len(value) == n:
            setattr(cfg, key, value[:k])
    cfg.num_hidden_layers = k
    try:
        with torch.device(model.device):
            twin_lm = type(hf)(cfg).to(torch.float32)
        wanted = set(twin_lm.state_dict())
        state = {name: t for name, t in hf.state_dict().items() if name in wanted}
        missing = wanted - set(state)
        twin_lm.load_state_dict(state, strict=False)  # copies upcast to float32
    except Exception as e:  # noqa: BLE001 - any family that cannot be rebuilt this way is refused
        raise FastPathUnsupported(f"the float32 check could not rebuild the model ({type(e).__name__}: {e})"
                                  ) from None
    if missing - {name for name in missing if name.endswith(("inv_freq", "original_inv_freq"))}:
        raise FastPathUnsupported(f"the float32 check could not copy every weight ({sorted(missing)[:3]})")
    twin = OneGenModel(twin_lm.eval(), model.tokenizer, model.tokens,
                       doc_max_length=model.renderer.doc_max_length)
    try:
        FastDecoder(twin, graphs=False)  # its probe, in float32; raises when the structure differs
    finally:
        del twin, twin_lm
        if model.device.type == "cuda":  # hand the twin's memory back: the KV cache is sized by what is free
            gc.collect()
            torch.cuda.empty_cache()


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    inputs: torch.Tensor  # (3, bb): tokens, write positions, attended lengths
    hidden: torch.Tensor
    logits: torch.Tensor
