"""Right padding and length-sorted batching of token-id sequences (no model, no tokenizer).

`pad_right` pads to the longest sequence of the list (dynamic padding) and returns ids with their
attention mask; `length_batches` splits length-sorted indices into batches of a fixed count or of a
padded-token budget. Padding is on the right, where a causal model's real tokens never attend to it.
"""

from __future__ import annotations

import torch

__all__ = ["length_batches", "pad_right"]


def length_batches(sorted_lengths: list[int], order: list[int], batch_size: int,
                   max_tokens: int | None = None) -> list[list[int]]:
    """Split `order` (indices sorted by length, `sorted_lengths` theirs) into batches: `batch_size`
    each, or with `max_tokens` the longest runs whose padded size (count x longest) fits the budget."""
    if max_tokens is None:
        return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    batches: list[list[int]] = []
    for i, n in zip(order, sorted_lengths, strict=True):
        if batches and (len(batches[-1]) + 1) * n <= max_tokens:  # ascending: n is the batch's longest
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def pad_right(seqs: list[list[int]], pad_id: int, device: torch.device | str = "cpu"
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad to the longest sequence in the list (dynamic padding): ids (B, T) and attention mask (B, T)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids.to(device), mask.to(device)
