"""When the engine searches: the queue of query vectors that rows retrieving at different steps share.

`SearchQueue` decides, step by step, whether the queued queries are searched now (one batch, one scan
of the index) or wait one more step; the vectors do not change while they wait, so the generated
tokens are the same under every policy.
"""

from __future__ import annotations

from typing import Any

import torch

SEARCH_MAX_WAIT = 16  # steps a query may wait under search_wait="auto" (in link mode, where waiting is free)


class SearchQueue:
    """Queries of rows that fed `[RQ]`, waiting for the index: when to search them, as one batch.

    An exact search reads the whole index whatever the number of queries (1 M x 4096 fp16: 8 GB, the
    bytes of half a 7B decode step). With rows retrieving at different steps (batch 64, a retrieval every
    64 tokens: about one `[RQ]` per step) searching at once scans the index at nearly every step. A
    waiting row idles instead (insert mode: it cannot go on without its paragraph), wasting its share of
    each step. Under "auto" the queue waits while the waste so far plus one more step of it stays below
    the price of one scan (rent or buy), in bytes read: a scan reads `scan_bytes`, a step the weights
    and the live rows' KV cache. So a row alone never waits (its whole step outweighs a scan), a small
    index is searched at once, and with many rows a few queries share each scan. In link mode rows do
    not idle (nothing is inserted) and "auto" searches at once, so retrievals stream as they happen.
    `wait=N` holds queries up to N steps (in link mode too); 0 searches at once. Every rule searches when no live row
    could run meanwhile. Vectors do not change while they wait: the tokens are the same either way.
    """

    def __init__(self, wait: int | str, scan_bytes: int, link: bool, weight_bytes: int, kv_per_token: int):
        # link mode: nothing is inserted, rows do not idle; "auto" searches at once so that retrievals
        # stream as they happen (an explicit N may hold them, to share scans)
        self.cap = (0 if link else SEARCH_MAX_WAIT) if wait == "auto" else int(wait)
        self.auto = wait == "auto" and not link
        self.scan_bytes, self.weight_bytes, self.kv_per_token = scan_bytes, weight_bytes, kv_per_token
        self.items: list[tuple[int, int, torch.Tensor | None]] = []  # (row, position of [RQ], vector)
        self.age = 0  # steps the oldest item has waited
        self.waste = 0.0  # bytes of step time the waiting rows have idled so far

    def add(self, row: int, position: int, vector: torch.Tensor | None) -> None:
        self.items.append((row, position, vector))

    def take(self) -> list[tuple[int, int, torch.Tensor | None]]:
        items, self.items, self.age, self.waste = self.items, [], 0, 0.0
        return items

    def due(self, rows: list[Any]) -> bool:
        """Search now? (Else the items wait one more step: `wait`.)"""
        if not self.items:
            return False
        if self.cap == 0 or self.age >= self.cap or all(r.done or r.waiting for r in rows):
            return True
        return self.auto and self.waste + self._idle_cost(rows) >= self.scan_bytes

    def wait(self, rows: list[Any]) -> None:
        if self.items:
            self.age += 1
            self.waste += self._idle_cost(rows) if self.auto else 0.0

    def _idle_cost(self, rows: list[Any]) -> float:
        """Bytes of one step the waiting rows waste: their share of it."""
        live = [r for r in rows if not r.done]
        step = self.weight_bytes + self.kv_per_token * sum(len(r.prompt) + len(r.stream) for r in live)
        return step * sum(r.waiting for r in live) / len(live)
