"""The fast path's stepper and shape buckets: how an engine step's rows map onto the slot cache.

`FastStepper` gives the engine the same `step(feeds, histories)` as `steppers.CachedStepper`: rows that
decode one token, and inserted paragraphs with them, in ONE forward over the slots (`FastDecoder.run`);
prompts (and paragraphs when no row decodes) prefilled apart. Row i lives in slot i. The buckets fix the
few shapes the CUDA graphs are captured for: batch slots, inserted runs, attended cache lengths.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .fastlayout import FastPathUnsupported

if TYPE_CHECKING:
    from .fastpath import FastDecoder

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class FastStepper:
    """The engine's stepper on the fast path: row i lives in slot i; same interface as `steppers.CachedStepper`."""

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
        one = [i for i, f in enumerate(feeds) if len(f) == 1]
        many = [i for i, f in enumerate(feeds) if len(f) > 1]
        joined = [i for i in many if len(feeds[i]) <= dec.insert_width] if one and dec.mixed_steps else []
        alone = [i for i in many if i not in joined]
        # 1. rows feeding one token, and inserted paragraphs with them: ONE forward over slots [0, bb)
        if one:
            bb = batch_bucket(max(one + joined) + 1)  # the joined rows' slots too: fewer shapes to capture
            hidden, logits = dec.run(bb, {i: (feeds[i][0], self.lengths[i]) for i in one},
                                     [(i, feeds[i], self.lengths[i]) for i in joined])
            if len(one) == n:  # the common step: every row decodes (copies: graph outputs get overwritten)
                self._advance(feeds)
                return hidden[:n].clone(), logits[:n].clone()
            rows = torch.tensor(one + list(range(bb, bb + len(joined))), device=hidden.device)
            parts.append((one + joined, hidden[rows], logits[rows]))
        # 2. rows feeding more (prompts; paragraphs too when no row decodes or `mixed` is off): prefilled
        if alone:
            hidden, logits = dec.prefill(alone, [feeds[i] for i in alone], [self.lengths[i] for i in alone])
            parts.append((alone, hidden, logits))
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


def batch_bucket(n: int) -> int:
    return next((b for b in BATCH_BUCKETS if b >= n), round_up(n, BATCH_BUCKETS[-1]))


def round_up(n: int, to: int) -> int:
    return max(to, -(-n // to) * to)


def len_bucket(need: int, capacity: int) -> int:
    """Cache columns a decode step attends over: a power of two from 128, at most the capacity."""
    b = 128
    while b < need:
        b *= 2
    return min(b, capacity)


def len_buckets(capacity: int) -> list[int]:
    out, b = [], 128
    while b < capacity:
        out.append(b)
        b *= 2
    return out + [capacity]
