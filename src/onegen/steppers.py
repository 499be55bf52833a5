"""The generic decode step for any HF causal LM: rows at different phases in one batch over a shared
KV cache (`CachedStepper`), or recomputing every row's whole history (`RecomputeStepper`, for
equivalence tests and for models the cached step cannot serve exactly).

A stepper's `step(feeds, histories)` processes each row's new tokens (a prompt, one decode token, an
inserted paragraph, or nothing) in one forward and returns the last-position hidden states (B, D) and
logits (B, V). Guarantee: the cached step gives the recomputed outputs (tested per family, sliding
windows included); rows never see each other.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
import torch.nn.functional as F

from .model import OneGenModel
from .packing import as_mask, sliding_window

log = logging.getLogger(__name__)


def _last_column(rows: int, width: int, device: torch.device) -> torch.Tensor:
    """(rows, 2) (row, position) pairs of the last column: where right-aligned rows end."""
    return torch.stack([torch.arange(rows, device=device), torch.full((rows,), width - 1, device=device)], 1)


class CachedStepper:
    """Generic path for any HF causal LM: a KV cache shared by the rows, masked holes for alignment.

    Every step appends as many columns as its longest feed to EVERY row: a paragraph one row inserts
    is a run of holes in all the others. With rows retrieving at different steps the holes would soon
    outnumber the tokens (64 rows inserting 4 paragraphs of 64 tokens each: ~16k columns, 250 of them
    real per row), and each step would attend over, and keep, all of them. So when the holes exceed
    `COMPACT_SLACK` + `COMPACT_RATIO` x the longest row, the cache is compacted: each row's real
    columns are gathered, in order, right-aligned into `longest` columns (one gather per layer).
    Positions are explicit and holes were masked, so the outputs do not change. Done only for plain
    dynamic caches (full attention, keys/values (B, H, T, d)); others keep their holes. Steps that mix
    paragraphs with one-token rows are split (`step`).

    Sliding-window models: the model's own masks count the window in cache columns, holes included,
    and its sliding cache layers keep the last window's columns: holes would push real tokens out. So
    for them (`masks` from `own_masks`) the cache is plain dynamic layers (nothing dropped; compaction
    and splits apply) and every forward gets a 4-D mask made here from the tokens' positions: causal,
    holes masked, each sliding layer type within its window.
    """

    def __init__(self, model: OneGenModel, n_rows: int, masks: tuple[str, Any] | None = None):
        from transformers.cache_utils import DynamicCache

        self.model = model
        self.masks = masks
        self.cache = DynamicCache() if masks is not None else None
        self.mask = torch.zeros((n_rows, 0), dtype=torch.long, device=model.device)
        self.lengths = torch.zeros(n_rows, dtype=torch.long, device=model.device)  # real tokens so far
        self.compactions = 0
        self.splits = 0  # steps whose wide rows ran apart

    def step(self, feeds: list[list[int]], histories: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Process each row's new tokens; returns the last-position hidden (B, D) and logits (B, V).

        A step where some rows feed many tokens (a paragraph) and others one would run every row at the
        paragraph's width; when the narrow rows would waste more than `SPLIT_MIN` token slots, the wide
        rows run alone on their own rows of the cache (`_step_rows`) after one narrow forward."""
        wide = [i for i, f in enumerate(feeds) if len(f) > 1]
        narrow = sum(1 for f in feeds if len(f) == 1)
        width = max((len(feeds[i]) for i in wide), default=1)
        if not wide or not narrow or narrow * (width - 1) < SPLIT_MIN or not self._splittable():
            return self._step_all(feeds)
        hidden, logits = self._step_all([f if len(f) == 1 else [] for f in feeds])
        w_hidden, w_logits = self._step_rows(wide, [feeds[i] for i in wide])
        index = torch.tensor(wide, device=hidden.device)
        return hidden.index_copy(0, index, w_hidden), logits.index_copy(0, index, w_logits)

    def _splittable(self) -> bool:
        """A plain dynamic cache (not wrapped with cross-attention state) whose rows can be taken apart."""
        return not hasattr(self.cache, "self_attention_cache") and \
            _dense_layers(self.cache, self.mask.shape[1]) is not None

    def _block(self, feeds: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Feeds right-aligned in a (R, S) block: ids and the mask of its real tokens, on the device."""
        width = max(1, max(len(f) for f in feeds))
        ids = torch.full((len(feeds), width), self.model.ids.pad, dtype=torch.long)
        new_mask = torch.zeros((len(feeds), width), dtype=torch.long)
        for i, f in enumerate(feeds):
            if f:
                ids[i, width - len(f):] = torch.tensor(f)
                new_mask[i, width - len(f):] = 1
        return ids.to(self.model.device), new_mask.to(self.model.device)

    def _step_all(self, feeds: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """One forward over every row (rows with nothing to feed get a masked hole)."""
        ids, new_mask = self._block(feeds)
        positions = (self.lengths[:, None] + new_mask.cumsum(1) - 1).clamp(min=0)  # (B, S)
        self.mask = torch.cat([self.mask, new_mask], dim=1)
        last = _last_column(len(feeds), ids.shape[1], ids.device)
        hidden, logits, self.cache = self.model.run(ids, self._attention(self.mask, positions), position_ids=positions,
                                                    past_key_values=self.cache, use_cache=True, logits_at=last)
        self.lengths = self.lengths + new_mask.sum(1)
        self._maybe_compact()
        return hidden[:, -1], logits

    def _step_rows(self, rows: list[int], feeds: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """One forward over `rows` only: their cache rows gathered into a cache of their own, the new
        columns written back (holes for the other rows, which the compaction removes later)."""
        layers = _dense_layers(self.cache, self.mask.shape[1])
        assert layers is not None  # `step` checked `_splittable`
        index = torch.tensor(rows, device=self.mask.device)
        sub = copy.copy(self.cache)
        sub.layers = [copy.copy(layer) for layer in layers]
        for layer in sub.layers:
            layer.keys, layer.values = layer.keys.index_select(0, index), layer.values.index_select(0, index)
        ids, new_mask = self._block(feeds)
        old = self.mask.shape[1]
        positions = (self.lengths[index, None] + new_mask.cumsum(1) - 1).clamp(min=0)
        mask = torch.cat([self.mask.index_select(0, index), new_mask], dim=1)
        last = _last_column(len(rows), ids.shape[1], ids.device)
        hidden, logits, sub = self.model.run(ids, self._attention(mask, positions), position_ids=positions,
                                             past_key_values=sub, use_cache=True, logits_at=last)
        sub_layers = _dense_layers(sub, mask.shape[1])
        if sub_layers is None:  # the model handed back another kind of cache: feed these rows the plain way
            feed_all = [[] for _ in range(self.mask.shape[0])]
            for i, f in zip(rows, feeds, strict=True):
                feed_all[i] = f
            hidden_all, logits_all = self._step_all(feed_all)
            return hidden_all[index], logits_all[index]
        for full, part in zip(layers, sub_layers, strict=True):
            for name in ("keys", "values"):
                t, new = getattr(full, name), getattr(part, name)[:, :, old:]
                grown = torch.cat([t, t.new_zeros((t.shape[0], t.shape[1], new.shape[2], t.shape[3]))], dim=2)
                grown[index, :, old:] = new
                setattr(full, name, grown)
        cols = torch.zeros((self.mask.shape[0], new_mask.shape[1]), dtype=self.mask.dtype, device=self.mask.device)
        cols[index] = new_mask
        self.mask = torch.cat([self.mask, cols], dim=1)
        self.lengths = self.lengths.index_add(0, index, new_mask.sum(1))
        self.splits += 1
        self._maybe_compact()
        return hidden[:, -1], logits

    def _attention(self, mask: torch.Tensor, positions: torch.Tensor) -> Any:
        """The attention mask of a forward: the (R, T) mask of real columns, or under `masks` 4-D ones
        (R, 1, S, T) from positions: a query sees the real columns at or before its position (within the
        window on sliding layers) and its own column (a hole then attends to something: no NaN)."""
        if self.masks is None:
            return mask
        kind, windows = self.masks
        n, width = positions.shape[1], mask.shape[1]
        q = positions[:, :, None]  # (R, S, 1)
        k = (mask.cumsum(1) - 1)[:, None, :]  # (R, 1, T): each real column's position
        seen = mask.bool()[:, None, :] & (k <= q)
        own = torch.zeros((n, width), dtype=torch.bool, device=mask.device)
        own[torch.arange(n), torch.arange(width - n, width)] = True

        def made(window: int | None) -> torch.Tensor:
            return as_mask((seen & (q - k < window) if window else seen) | own, kind, self.model.dtype)

        return {t: made(w) for t, w in windows.items()} if isinstance(windows, dict) else made(windows)

    def _maybe_compact(self) -> None:
        width, longest = self.mask.shape[1], int(self.lengths.max())
        if width - longest <= COMPACT_SLACK + COMPACT_RATIO * longest:
            return
        layers = _dense_layers(self.cache, width)
        if layers is None:
            return
        mask, order = torch.sort(self.mask, dim=1, stable=True)  # holes first, then real columns in order
        keep = order[:, width - longest:]  # (B, longest): each row's real columns, right-aligned
        for layer in layers:
            index = keep[:, None, :, None].expand(-1, layer.keys.shape[1], -1, layer.keys.shape[3])
            layer.keys, layer.values = layer.keys.gather(2, index), layer.values.gather(2, index)
        self.mask = mask[:, width - longest:]
        self.compactions += 1


COMPACT_SLACK, COMPACT_RATIO = 64, 1.0  # the generic cache is compacted when holes > slack + ratio x longest row
SPLIT_MIN = 256  # token slots narrow rows would waste in a wide step before the wide rows run apart


def _dense_layers(cache: Any, width: int) -> list[Any] | None:
    """The layers of a plain dynamic KV cache whose keys/values are (B, H, width, d), or None when the
    cache is anything else (sliding-window or static layers, legacy tuples): those are left alone."""
    from transformers.cache_utils import DynamicLayer

    layers = getattr(getattr(cache, "self_attention_cache", cache), "layers", None)
    if not layers:
        return None
    for layer in layers:
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        if type(layer) is not DynamicLayer or not isinstance(keys, torch.Tensor) or keys.dim() != 4 \
                or keys.shape[2] != width or not isinstance(values, torch.Tensor) or values.shape[:3] != keys.shape[:3]:
            return None
    return layers


UNSUPPORTED = "unsupported"


def own_masks(model: OneGenModel) -> tuple[str, Any] | str | None:
    """How `CachedStepper` masks `model` (found once, kept on the model), each choice checked against
    recomputation with holes in the cache (`_masks_hold`) before it is taken:

    - None: the model's own masks (no sliding window in use), the common case;
    - (mask kind, windows): 4-D masks made by the stepper, windows being one window for every layer, or
      {layer type: window or None} for configs that declare `layer_types` (sliding windows; or a model
      whose own masks do not survive holes);
    - `UNSUPPORTED`: neither reproduces recomputation (e.g. recurrent or linear-attention layers, whose
      state a hole changes; layer types other than full and sliding attention): the engine then
      recomputes every step (slow, exact) and says so.
    """
    if hasattr(model, "_engine_masks"):
        return model._engine_masks
    cfg = model.hf_model.config
    window = sliding_window(cfg)
    types = set(getattr(cfg, "layer_types", None) or [])
    sliding = window is not None and (not types or "sliding_attention" in types)
    known = types <= {"full_attention", "sliding_attention"}  # others (chunked, linear, ...): a short
    #                                                         check could pass before their limit bites
    result: tuple[str, Any] | str | None = \
        None if known and not sliding and _masks_hold(model, None) else UNSUPPORTED
    if result == UNSUPPORTED and known:
        kind = model.packing_mask_kind()
        if kind in ("bool", "additive"):
            w = window if sliding else None
            windows: Any = {t: w if t == "sliding_attention" else None for t in types} if types else w
            result = (kind, windows) if _masks_hold(model, (kind, windows)) else UNSUPPORTED
    if result == UNSUPPORTED:
        log.warning("generic decoding recomputes every step (slow): cached steps with rows at different phases "
                    "do not reproduce this model's outputs (sliding windows it takes no mask for, recurrent or "
                    "other layer types)")
    model._engine_masks = result
    return result


@torch.no_grad()
def _masks_hold(model: OneGenModel, masks: tuple[str, Any] | None) -> bool:
    """Whether cached steps with holes (under `masks`; None: the model's own) give the recomputed hidden
    states: all close in float32; in lower precision each row's direction within 0.1 % (a wrong mask or
    a state a hole changed is off by far more, rounding by far less)."""
    vocab = model.hf_model.get_input_embeddings().weight.shape[0]
    feeds = [[[3, 5, 7, 9, 11], [4, 6]], [[13], []], [[15], [8, 10, 12]], [[17], [14]]]
    feeds = [[[t % vocab for t in f] for f in step] for step in feeds]
    was_training = model.training
    model.eval()
    try:
        cached, history = CachedStepper(model, 2, masks), [[], []]
        for step in feeds:
            hidden, _ = cached.step(step, [])
            history = [h + f for h, f in zip(history, step, strict=True)]
        ref, _ = RecomputeStepper(model, 2).step([[], []], history)
        got, want = hidden.float(), ref.float()
        if model.dtype == torch.float32:
            return torch.allclose(got, want, atol=1e-3, rtol=1e-3)
        return bool((F.cosine_similarity(got, want, dim=-1) > 0.999).all())
    except (RuntimeError, ValueError, TypeError, KeyError, IndexError, AttributeError):
        return False
    finally:
        model.train(was_training)


class RecomputeStepper:
    """No cache: every step re-runs each row's full history (left-padded). For equivalence tests."""

    needs_history = True

    def __init__(self, model: OneGenModel, n_rows: int):
        self.model = model

    def step(self, feeds: list[list[int]], histories: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        dev = self.model.device
        width = max(len(h) for h in histories)
        ids = torch.full((len(histories), width), self.model.ids.pad, dtype=torch.long)
        mask = torch.zeros((len(histories), width), dtype=torch.long)
        for i, h in enumerate(histories):
            ids[i, width - len(h):] = torch.tensor(h)
            mask[i, width - len(h):] = 1
        ids, mask = ids.to(dev), mask.to(dev)
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        last = _last_column(len(histories), width, dev)
        hidden, logits, _ = self.model.run(ids, mask, position_ids=positions, logits_at=last)
        return hidden[:, -1], logits
