"""Next-token selection for the engine: many rows at once from one (B, V) logits tensor, greedy or
seeded sampling, with the tokens a row may not generate masked."""

from __future__ import annotations

import torch

from .model import OneGenModel


class TokenSelector:
    """Picks the next token of many rows at once from one (B, V) logits tensor.

    Banned ids are masked in one go: the tokens the engine inserts itself (never generated), `[RQ]`
    for every row under a forced schedule (the schedule places it) or for rows whose retrieval budget
    is spent, eos under `ignore_eos`. Greedy is a batched argmax. Sampling takes a batched softmax on
    the device, then each row draws with its own seeded CPU generator (top-p applied per row), exactly
    as drawing row by row would: a row's tokens depend on its seed, not on its batch. Either way the
    chosen ids reach the CPU in ONE transfer per step (the probabilities when sampling).
    """

    def __init__(self, model: OneGenModel, eos_ids: list[int], do_sample: bool, temperature: float, top_p: float,
                 forced: bool, ignore_eos: bool):
        m = model
        banned = [m.ids.open, m.ids.close, m.ids.doc] + ([m.ids.query] if forced else [])
        banned += eos_ids if ignore_eos else []
        self.query = m.ids.query
        self.banned_all: torch.Tensor | None = None  # (K,) on the logits' device, made on first use
        self._banned = sorted(set(banned))
        self.forced = forced
        self.do_sample, self.temperature, self.top_p = do_sample, max(temperature, 1e-6), top_p

    def __call__(self, logits: torch.Tensor, rows: list[int], no_rq: list[bool],
                 generators: list[torch.Generator | None]) -> list[int]:
        """Next token of each of `rows` (indices into `logits` (B, V)); `no_rq[j]`: row j may not query."""
        dev = logits.device
        if self.banned_all is None or self.banned_all.device != dev:
            self.banned_all = torch.tensor(self._banned, dtype=torch.long, device=dev)
        scores = (logits if len(rows) == logits.shape[0] else logits[torch.tensor(rows, device=dev)]).float()
        scores = scores.index_fill(1, self.banned_all, float("-inf"))  # (R, V), a new tensor
        if not self.forced and any(no_rq):
            spent = torch.tensor(no_rq, dtype=torch.bool).to(dev, non_blocking=True)
            scores[:, self.query] = scores[:, self.query].masked_fill(spent, float("-inf"))
        if not self.do_sample:
            return scores.argmax(-1).tolist()
        probs = torch.softmax(scores / self.temperature, dim=-1).cpu()  # (R, V): the step's one transfer
        out = []
        for j, gen in enumerate(generators):
            p = probs[j]
            if self.top_p < 1.0:
                sorted_p, order = p.sort(descending=True)
                keep = sorted_p.cumsum(0) - sorted_p < self.top_p
                p = torch.zeros_like(p).scatter(0, order[keep], sorted_p[keep])
            out.append(int(torch.multinomial(p, 1, generator=gen)))
        return out
