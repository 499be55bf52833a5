"""Sequence packing for the training step: samples and documents share rows, one forward, no cross-talk.

A padded batch wastes what its short rows lack of the longest (the paper pads everything to max_length;
even per-kind dynamic padding wastes a third to a half on a batch of 40-200-token documents beside
300-900-token answers). Packing places every sequence of the step (answers and the documents their
queries need) into rows as wide as the longest one, first-fit decreasing, and runs them in ONE forward:

- each sequence keeps its own positions (`position_ids` restart at 0);
- attention is block-diagonal causal: a 4-D mask (R, 1, W, W) lets a token see only earlier tokens of
  its own sequence, so every hidden state equals the one of the sequence run alone;
- a row's padding tail is one more segment that attends to itself only (finite, never read).

Whether a model honours a 4-D mask and `position_ids` is not assumed from its architecture: `probe`
runs two sequences packed and separately and compares (as the fast path does). The mask is tried as
booleans (SDPA-style), then as an additive float mask (eager-style), then not at all ("positions":
attention kernels that take no tensor mask, such as flash-attention, find the sequence boundaries
from the restarting `position_ids` themselves); a model that reproduces with none is trained padded.
A sliding-window model packs only batches whose sequences fit the window (a 4-D mask replaces the
model's own per-layer window masks).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["MASK_KINDS", "Packed", "block_mask", "pack", "probe", "sliding_window"]

MASK_KINDS = ("bool", "additive", "positions")
_PROBE = ([5, 7, 11, 3, 2, 9], [13, 4, 6])  # token ids (mod the vocabulary): two sequences and a pad tail


@dataclass
class Packed:
    """Sequences laid out in rows: ids, positions and segment ids (R, W), and where each sequence went."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    segment_ids: torch.Tensor  # sequence k of a row has segment k; the padding tail the next one
    places: list[tuple[int, int]]  # sequence i starts at (row, column)


def pack(seqs: list[list[int]], pad_id: int, multiple: int = 8) -> Packed:
    """First-fit decreasing: rows as wide as the longest sequence (rounded up to `multiple`); longest
    sequences placed first, each into the first row with room. Deterministic (ties keep input order)."""
    if not seqs or any(not s for s in seqs):
        raise ValueError("pack needs non-empty sequences")
    width = -(-max(len(s) for s in seqs) // multiple) * multiple
    free: list[int] = []  # room left per row
    rows: list[list[int]] = []  # sequence indices per row, in placement order
    places: list[tuple[int, int]] = [(0, 0)] * len(seqs)
    for i in sorted(range(len(seqs)), key=lambda i: -len(seqs[i])):
        n = len(seqs[i])
        r = next((r for r, room in enumerate(free) if room >= n), None)
        if r is None:
            r = len(rows)
            rows.append([])
            free.append(width)
        places[i] = (r, width - free[r])
        rows[r].append(i)
        free[r] -= n
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    pos = torch.empty((len(rows), width), dtype=torch.long)
    seg = torch.empty((len(rows), width), dtype=torch.long)
    for r, members in enumerate(rows):
        for k, i in enumerate(members):
            c, n = places[i][1], len(seqs[i])
            ids[r, c:c + n] = torch.tensor(seqs[i], dtype=torch.long)
            pos[r, c:c + n] = torch.arange(n)
            seg[r, c:c + n] = k
        end = width - free[r]
        pos[r, end:] = torch.arange(width - end)  # the tail: a sequence of its own
        seg[r, end:] = len(members)
    return Packed(ids, pos, seg, places)


def block_mask(segment_ids: torch.Tensor, kind: str, dtype: torch.dtype) -> torch.Tensor | None:
    """(R, 1, W, W) block-diagonal causal mask: True where query i may see key j (same segment, j <= i);
    `kind` "additive" gives 0.0 / the dtype's minimum (what eager attention adds to its scores), and
    "positions" no mask (the model finds the boundaries from `position_ids`)."""
    if kind == "positions":
        return None
    width = segment_ids.shape[1]
    causal = torch.ones((width, width), dtype=torch.bool, device=segment_ids.device).tril()
    return as_mask((segment_ids[:, :, None] == segment_ids[:, None, :]) & causal, kind, dtype)  # (R, W, W)


def as_mask(allowed: torch.Tensor, kind: str, dtype: torch.dtype) -> torch.Tensor:
    """(R, Q, K) booleans (True: query may see key) as the (R, 1, Q, K) mask a model takes: "bool" as
    they are, "additive" 0.0 / the dtype's minimum (what eager attention adds to its scores)."""
    if kind == "bool":
        return allowed[:, None]
    if kind != "additive":
        raise ValueError(f"mask kind must be 'bool' or 'additive', got {kind!r}")
    out = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return out.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]


def sliding_window(config) -> int | None:
    """The smallest attention window the model's config declares, or None (full attention)."""
    if getattr(config, "use_sliding_window", True) is False:
        return None
    window = getattr(config, "sliding_window", None)
    return window if isinstance(window, int) and window > 0 else None


@torch.no_grad()
def probe(model) -> str | None:
    """The mask kind under which a packed forward of `model` (a OneGenModel) reproduces the separate
    forwards, or None when none does (the model is then trained padded)."""
    from .padding import pad_right

    hf = model.hf_model
    vocab = hf.get_input_embeddings().weight.shape[0]
    seqs = [[t % vocab for t in s] for s in _PROBE]
    was_training = hf.training
    hf.eval()
    try:
        ids, mask = pad_right(seqs, model.ids.pad, model.device)
        ref, _ = model.hidden_states(ids, mask)
        want = torch.cat([ref[i, : len(s)] for i, s in enumerate(seqs)]).float()
        packed = pack(seqs, model.ids.pad, multiple=sum(map(len, seqs)) + 2)  # one row: both and a pad tail
        for kind in MASK_KINDS:
            try:
                got, _ = model.hidden_states(packed.input_ids.to(model.device),
                                             block_mask(packed.segment_ids.to(model.device), kind, model.dtype),
                                             position_ids=packed.position_ids.to(model.device))
            except Exception:  # a model that refuses 4-D masks or position ids: try the next kind, or pad
                continue
            got = torch.cat([got[r, c:c + len(s)] for (r, c), s in zip(packed.places, seqs, strict=True)]).float()
            tol = 1e-4 if model.dtype == torch.float32 else 5e-2  # structural mistakes are O(1)
            if bool(torch.isfinite(got).all()) and float((got - want).norm() / want.norm().clamp(min=1e-6)) <= tol:
                return kind
        return None
    finally:
        hf.train(was_training)
