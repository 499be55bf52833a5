"""Losses as pure functions over tensors, and the objective that combines them into named terms.

- `lm_cross_entropy`: next-token CE over GEN positions only, in chunks (the vocabulary projection of a
  chunk is recomputed in backward instead of kept), summed; the caller divides by the token count.
- `infonce`: cosine similarity / temperature, softmax over each query's candidate documents.
- `bpr`: -log sigmoid(s_pos - s_neg) averaged over each query's negatives; vectors are normalised
  one by one (the paper's code normalises across the sequence axis; we do not copy that bug).
- `gather_docs`: all-gather of document vectors across ranks that keeps gradients.

Sums, not means, are returned with counts, so that gradient accumulation and data parallelism can
normalise by the number of tokens/queries in the whole optimizer step (1 x 8 == 4 x 2 exactly).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .config import LossConfig


def lm_cross_entropy(gen_hidden: torch.Tensor, targets: torch.Tensor,
                     head: Callable[[torch.Tensor], torch.Tensor] | None = None,
                     chunk_size: int = 2048, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Summed CE (each target's term times its weight, when `weights` (N,) is given). `gen_hidden`
    (N, D) with `head`, or logits (N, V) when `head` is None."""
    if targets.numel() == 0:
        return gen_hidden.sum() * 0.0
    if head is None:
        return _weighted_sum(F.cross_entropy(gen_hidden.float(), targets, reduction="none"), weights)
    total = gen_hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, targets.shape[0], chunk_size):
        h, t = gen_hidden[start:start + chunk_size], targets[start:start + chunk_size]
        w = None if weights is None else weights[start:start + chunk_size]
        if torch.is_grad_enabled() and h.requires_grad:
            total = total + checkpoint(_chunk_ce, h, t, head, w, use_reentrant=False)
        else:
            total = total + _chunk_ce(h, t, head, w)
    return total


def _chunk_ce(h: torch.Tensor, t: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor],
              w: torch.Tensor | None = None) -> torch.Tensor:
    return _weighted_sum(F.cross_entropy(head(h).float(), t, reduction="none"), w)


def _weighted_sum(ce: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    return ce.sum() if weights is None else (ce * weights.to(ce.dtype)).sum()


def candidate_mask(query_targets: torch.Tensor, doc_keys: torch.Tensor, pos_keys: torch.Tensor,
                   cand_keys: torch.Tensor, in_batch: bool) -> torch.Tensor:
    """(Q, M) bool: the documents each query is scored against.

    The target is always in; other positives of the same query never are; with `in_batch` every other
    document is a candidate, otherwise only the query's own positive and negatives.
    """
    is_pos = (doc_keys[None, :, None] == pos_keys[:, None, :]).any(-1)  # (Q, M)
    if in_batch:
        mask = ~is_pos
    else:
        mask = (doc_keys[None, :, None] == cand_keys[:, None, :]).any(-1) & ~is_pos
    mask[torch.arange(query_targets.shape[0], device=mask.device), query_targets] = True
    return mask


def similarity(query_vecs: torch.Tensor, doc_vecs: torch.Tensor) -> torch.Tensor:
    """Cosine similarity (Q, M), computed in float32."""
    return F.normalize(query_vecs.float(), dim=-1) @ F.normalize(doc_vecs.float(), dim=-1).T


def infonce(query_vecs: torch.Tensor, doc_vecs: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
            temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed InfoNCE over queries, and the number of queries whose target scores highest."""
    scores = similarity(query_vecs, doc_vecs) / temperature
    scores = scores.masked_fill(~mask, float("-inf"))
    loss = F.cross_entropy(scores, targets, reduction="sum")
    correct = (scores.argmax(-1) == targets).sum()
    return loss, correct


def bpr(query_vecs: torch.Tensor, doc_vecs: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
        temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed BPR over queries (each query's term is a mean over its negatives), and correct count."""
    scores = similarity(query_vecs, doc_vecs) / temperature  # (Q, M)
    rows = torch.arange(targets.shape[0], device=scores.device)
    pos = scores[rows, targets]  # (Q,)
    neg_mask = mask.clone()
    neg_mask[rows, targets] = False
    pair = -F.logsigmoid(pos[:, None] - scores)  # (Q, M)
    per_query = (pair * neg_mask).sum(-1) / neg_mask.sum(-1).clamp(min=1)
    correct = (scores.masked_fill(~mask, float("-inf")).argmax(-1) == targets).sum()
    return per_query.sum(), correct


def gather_docs(doc_vecs: torch.Tensor, doc_keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """All-gather document vectors (with gradients) and keys across ranks.

    Ranks may hold different numbers of documents: vectors are padded to the largest count, gathered,
    and the padding dropped. Returns (vectors (M_all, D), keys (M_all,), this rank's offset).
    """
    import torch.distributed as dist
    from torch.distributed._functional_collectives import all_gather_tensor_autograd

    world, rank = dist.get_world_size(), dist.get_rank()
    count = torch.tensor([doc_vecs.shape[0]], device=doc_vecs.device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    counts = [int(c.item()) for c in counts]
    width = max(counts)
    pad = width - doc_vecs.shape[0]
    padded = F.pad(doc_vecs, (0, 0, 0, pad))
    keys = F.pad(doc_keys, (0, pad), value=-1)
    group = dist.group.WORLD
    all_vecs = all_gather_tensor_autograd(padded, gather_dim=0, group=group)  # (world * width, D)
    all_keys = [torch.zeros_like(keys) for _ in range(world)]
    dist.all_gather(all_keys, keys)
    keep = torch.cat([torch.arange(r * width, r * width + counts[r]) for r in range(world)]).to(doc_vecs.device)
    return all_vecs[keep], torch.cat(all_keys)[keep], sum(counts[:rank])


class Objective:
    """loss = lm_weight * CE(GEN) / n_gen + retrieval_weight * contrastive(RET) / n_queries.

    `n_gen` and `n_queries` are the counts over the whole optimizer step on all ranks, times
    `world_size` (DDP averages gradients over ranks), so every split of the step gives the same gradient.
    """

    def __init__(self, cfg: LossConfig):
        self.cfg = cfg

    def __call__(self, out: dict[str, torch.Tensor], batch: dict[str, torch.Tensor],
                 head: Callable[[torch.Tensor], torch.Tensor] | None, n_gen: float, n_queries: float,
                 world_size: int = 1, gather: bool = False) -> dict[str, torch.Tensor]:
        weights = batch.get("lm_weights")
        if "gen_logits" in out:
            lm_sum = lm_cross_entropy(out["gen_logits"], out["lm_targets"], weights=weights)
        else:
            lm_sum = lm_cross_entropy(out["gen_hidden"], out["lm_targets"], head, weights=weights)
        doc_vecs, doc_keys, offset = out["doc_vecs"], batch["doc_keys"], 0
        if gather:
            doc_vecs, doc_keys, offset = gather_docs(doc_vecs, doc_keys)
        q = out["query_vecs"]
        if q.shape[0] and doc_vecs.shape[0]:
            targets = batch["query_targets"] + offset
            mask = candidate_mask(targets, doc_keys, batch["query_pos_keys"], batch["query_cand_keys"],
                                  bool(batch["in_batch_negatives"]))
            fn = infonce if self.cfg.type == "infonce" else bpr
            ret_sum, correct = fn(q, doc_vecs, targets, mask, self.cfg.temperature)
        else:
            ret_sum = q.sum() * 0.0 + doc_vecs.sum() * 0.0
            correct = torch.zeros((), device=q.device)
        lm_loss = lm_sum / max(n_gen, 1.0) * world_size
        ret_loss = ret_sum / max(n_queries, 1.0) * world_size
        loss = self.cfg.lm_weight * lm_loss + self.cfg.retrieval_weight * ret_loss
        return {"loss": loss, "lm_loss": lm_loss.detach(), "retrieval_loss": ret_loss.detach(),
                "retrieval_correct": correct.detach().float(), "n_queries_local": torch.tensor(float(q.shape[0]))}
