"""Collate: a training batch of rendered samples plus the documents their query tokens need.

For each query token: one positive (drawn from its positives), hard negatives from the sample, random
corpus negatives topped up to `negatives`; other queries' documents act as in-batch negatives. Each
document is encoded once per batch. Two layouts of the same content:
- packed (`pack=True`): samples and documents share rows as wide as the longest of them, with
  restarting `position_ids` and `segment_ids` for a block-diagonal mask (`packing`): ONE forward (or
  two, each kind packed at its own width, when long samples would make short documents pay for
  wide rows' attention: `attention_cost`);
- padded: samples and documents padded separately, each to its own longest (dynamic padding, never to
  max length): two forwards. Used when packing is off, or when a sequence exceeds `pack_limit`.
Both give (row, position) indices for LM targets, query tokens and (packed) the documents' `[RD]`.

Documents carry a 63-bit key of their id so that, after gathering documents across ranks, a query
still knows which documents are its positives (never to be used as negatives).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from typing import Any

import torch

from .data import Corpus
from .packing import Packed, pack
from .padding import pad_right
from .render import Rendered
from .tokens import IGNORE_INDEX


def doc_key(doc_id: str) -> int:
    """A stable 63-bit integer key for a document id."""
    return int.from_bytes(hashlib.blake2b(doc_id.encode(), digest_size=8).digest(), "little") >> 1


class Collator:
    """Builds training batches.

    Args:
        corpus: the documents.
        encode_document: document text -> token ids (ends with `[RD]`); results are cached.
        pad_id: the padding id.
        negatives: negatives per query (hard from the sample first, then random from the corpus).
        in_batch_negatives: let every document in the (gathered) batch be a candidate for every query.
        lm: False for retrieval-only training (`loss.lm_weight: 0`): no LM targets, and each sample is
            cut after its last query token (later tokens cannot change a causal query vector).
        retrieval: False for generation-only training (`loss.retrieval_weight: 0`): no documents.
        query_id, query_weight: LM targets equal to `query_id` get weight `query_weight`
            (`loss.query_token_weight`; the batch then carries `lm_weights`).
        pack: lay samples and documents out packed (see the module docstring).
        pack_limit: pack only batches whose sequences are at most this long (a sliding window).
        attention_cost: 1 / (6 x hidden size): with it, samples and documents are packed apart (two
            forwards, each kind at its own width) when that costs less than one forward at the longest
            width (long samples beside short documents: the dense attention of wide rows would dominate).
    """

    def __init__(self, corpus: Corpus | None, encode_document: Callable[[str], list[int]], pad_id: int,
                 negatives: int = 4, in_batch_negatives: bool = True, lm: bool = True, retrieval: bool = True,
                 query_id: int | None = None, query_weight: float = 1.0, pack: bool = False,
                 pack_limit: int | None = None, attention_cost: float | None = None):
        self.corpus = corpus
        self.pack, self.pack_limit, self.attention_cost = pack, pack_limit, attention_cost
        self.query_id, self.query_weight = query_id, query_weight
        self.lm, self.retrieval = lm, retrieval
        self.encode_document = encode_document
        self.pad_id = pad_id
        self.negatives = negatives
        self.in_batch_negatives = in_batch_negatives
        self._doc_cache: dict[str, list[int]] = {}
        self._corpus_ids = corpus.ids if corpus is not None else []

    def _doc_ids(self, doc_id: str) -> list[int]:
        if doc_id not in self._doc_cache:
            self._doc_cache[doc_id] = self.encode_document(self.corpus[doc_id].text)  # type: ignore[index]
        return self._doc_cache[doc_id]

    def _negatives_for(self, positives: tuple[str, ...], hard: tuple[str, ...], rng: random.Random) -> list[str]:
        hard = [d for d in dict.fromkeys(hard) if d not in positives]
        chosen = rng.sample(hard, min(self.negatives, len(hard)))
        exclude = set(positives) | set(chosen)
        available = len(self._corpus_ids) - len(exclude)
        tries = 0
        while len(chosen) < self.negatives and available > 0 and tries < 20 * self.negatives:
            d = self._corpus_ids[rng.randrange(len(self._corpus_ids))]
            tries += 1
            if d not in exclude:
                chosen.append(d)
                exclude.add(d)
                available -= 1
        return chosen

    def __call__(self, samples: list[Rendered], rng: random.Random) -> dict[str, torch.Tensor]:
        seqs = [s.input_ids if self.lm else s.input_ids[: max(s.ret_positions, default=0) + 1] for s in samples]
        docs: dict[str, int] = {}
        targets, pos_keys, cand_keys = [], [], []
        for s in samples if self.retrieval else ():
            for r in s.retrievals:
                positive = r.positives[rng.randrange(len(r.positives))]
                negs = self._negatives_for(r.positives, r.negatives, rng)
                for d in (positive, *negs):
                    docs.setdefault(d, len(docs))
                targets.append(docs[positive])
                pos_keys.append([doc_key(d) for d in r.positives])
                cand_keys.append([doc_key(d) for d in (positive, *negs)])
        doc_seqs = [self._doc_ids(d) for d in docs]
        batch: dict[str, torch.Tensor] = {}
        packed = self.pack and (self.pack_limit is None or max(map(len, seqs + doc_seqs)) <= self.pack_limit)
        if packed:
            places, doc_places = self._pack(seqs, doc_seqs, batch)
            batch["doc_positions"] = torch.tensor([(r, c + len(d) - 1) for (r, c), d in
                                                   zip(doc_places, doc_seqs, strict=True)],
                                                  dtype=torch.long).reshape(-1, 2)
        else:
            batch["input_ids"], batch["attention_mask"] = pad_right(seqs, self.pad_id)
            places = [(row, 0) for row in range(len(seqs))]
            if doc_seqs:
                batch["doc_input_ids"], batch["doc_attention_mask"] = pad_right(doc_seqs, self.pad_id)
            else:
                batch["doc_input_ids"] = torch.zeros((0, 1), dtype=torch.long)
                batch["doc_attention_mask"] = torch.zeros((0, 1), dtype=torch.long)
        lm_positions, lm_targets, query_positions = [], [], []
        for s, (row, c) in zip(samples, places[: len(seqs)], strict=True):
            for t in range(1, len(s.lm_labels) if self.lm else 0):
                if s.lm_labels[t] != IGNORE_INDEX:
                    lm_positions.append((row, c + t - 1))
                    lm_targets.append(s.lm_labels[t])
            if self.retrieval:
                query_positions.extend((row, c + q) for q in s.ret_positions)
        batch.update({
            "lm_positions": torch.tensor(lm_positions, dtype=torch.long).reshape(-1, 2),
            "lm_targets": torch.tensor(lm_targets, dtype=torch.long),
            "query_positions": torch.tensor(query_positions, dtype=torch.long).reshape(-1, 2),
            "query_targets": torch.tensor(targets, dtype=torch.long),
            "query_pos_keys": _pad_keys(pos_keys),
            "query_cand_keys": _pad_keys(cand_keys),
            "doc_keys": torch.tensor([doc_key(d) for d in docs], dtype=torch.long),
            "n_tokens": torch.tensor(sum(map(len, seqs + doc_seqs))),  # real tokens, whatever the layout
            "in_batch_negatives": torch.tensor(self.in_batch_negatives),
        })
        if self.query_id is not None and self.query_weight != 1.0:
            targets_t = batch["lm_targets"]
            batch["lm_weights"] = torch.where(targets_t == self.query_id, self.query_weight, 1.0)
        return batch


    def _pack(self, seqs: list[list[int]], doc_seqs: list[list[int]], batch: dict[str, torch.Tensor]
              ) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """Samples and documents packed into shared rows, or (when `attention_cost` says that is cheaper)
        each kind into rows of its own width, run as two forwards (`doc_*` keys). Returns where each
        sample and each document starts (row, column) in its rows."""
        together = pack(seqs + doc_seqs, self.pad_id)
        if self.attention_cost is not None and seqs and doc_seqs:
            apart = pack(seqs, self.pad_id), pack(doc_seqs, self.pad_id)
            if sum(self._cost(p) for p in apart) < self._cost(together):
                for prefix, p in zip(("", "doc_"), apart, strict=True):
                    batch.update({f"{prefix}input_ids": p.input_ids, f"{prefix}position_ids": p.position_ids,
                                  f"{prefix}segment_ids": p.segment_ids})
                return apart[0].places, apart[1].places
        batch.update(input_ids=together.input_ids, position_ids=together.position_ids,
                     segment_ids=together.segment_ids)
        return together.places[: len(seqs)], together.places[len(seqs):]

    def _cost(self, p: Packed) -> float:
        """A forward's cost in token units: every position once (the projections), plus the dense W x W
        attention of its rows, a W / (6 d) share per position for hidden size d (`attention_cost` = 1 / 6d)."""
        rows, width = p.input_ids.shape
        return rows * width * (1 + width * (self.attention_cost or 0.0))


def pack_options(model, pack: bool) -> dict[str, Any]:
    """The `Collator` packing keywords for a `OneGenModel`: packing only when asked and the model passed
    the packing probe, its sliding window as the limit, and its attention cost per position (1 / 6d)."""
    return {"pack": pack and model.packing_mask_kind() is not None, "pack_limit": model.packing_window,
            "attention_cost": 1 / (6 * model.hidden_size)}


def _pad_keys(rows: list[list[int]]) -> torch.Tensor:
    width = max((len(r) for r in rows), default=1)
    out = torch.full((len(rows), width), -1, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return out
