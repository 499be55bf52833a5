"""Tests for the `flat-int8` backend (onegen.backends, int8 arithmetic in onegen.quantized) and token-budget embedding batches."""

from __future__ import annotations

import pytest
import torch

from onegen.backends import FlatInt8Backend
from onegen.errors import OneGenError
from onegen.index import Index
from onegen.padding import length_batches
from onegen.quantized import quantize_int8


def _data(n: int, d: int, q: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) * 2, torch.randn(q, d, generator=g)


def _exact(vectors: torch.Tensor, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    sims = torch.nn.functional.normalize(queries, dim=1) @ torch.nn.functional.normalize(vectors, dim=1).T
    return sims.topk(k, dim=1)


def _recall(found: torch.Tensor, expected: torch.Tensor) -> float:
    return sum(len(set(f) & set(e)) for f, e in zip(found.tolist(), expected.tolist(), strict=True)) / expected.numel()


def test_quantize_round_trip_error_is_within_half_a_step():
    rows = torch.nn.functional.normalize(_data(50, 64, 1)[0], dim=1)
    codes, scales = quantize_int8(rows)
    assert codes.dtype == torch.int8 and codes.abs().max() == 127  # the largest element uses the full range
    assert ((codes.float() * scales[:, None] - rows).abs() <= scales[:, None] / 2 + 1e-7).all()


@pytest.mark.parametrize("dim", [64, 100])  # 100: not a multiple of 8
def test_recall_at_10_against_exact(dim):
    vectors, queries = _data(5000, dim, 64)
    store = FlatInt8Backend(chunk_rows=1234)  # ragged chunks
    store.add(vectors)
    scores, indices = store.search(queries, 10)
    want_scores, want_indices = _exact(vectors, queries, 10)
    assert _recall(indices, want_indices) >= 0.99
    # scores are exact cosines of the rows returned, best first
    exact_of_found = (torch.nn.functional.normalize(queries, dim=1)[:, None]
                      * torch.nn.functional.normalize(vectors, dim=1)[indices]).sum(-1)
    torch.testing.assert_close(scores, exact_of_found, atol=1e-5, rtol=0)
    assert (scores[:, :-1] >= scores[:, 1:]).all()


def test_shortlist_of_everything_is_exact():
    vectors, queries = _data(300, 32, 20)
    store = FlatInt8Backend(rerank=1000)
    store.add(vectors)
    assert torch.equal(store.search(queries, 10)[1], _exact(vectors, queries, 10)[1])


def test_save_load_round_trip_and_k_above_count(tmp_path):
    vectors, queries = _data(700, 48, 9)
    ids = [f"d{i}" for i in range(700)]
    index = Index.from_vectors(vectors, ids, "fp", backend="flat-int8", rerank=3)
    index.save(tmp_path / "idx")
    loaded = Index.load(tmp_path / "idx")
    assert loaded.backend_name == "flat-int8" and loaded.backend_options["rerank"] == 3
    assert loaded.search(queries, 10) == index.search(queries, 10)
    few = Index.from_vectors(vectors[:4], ids[:4], "fp", backend="flat-int8")
    assert few.search_tensor(queries, 10)[1].shape == (9, 4)


def test_bad_rerank_is_refused():
    with pytest.raises(OneGenError, match="rerank"):
        Index.from_vectors(torch.randn(5, 8), [str(i) for i in range(5)], "fp", backend="flat-int8", rerank=0)


@pytest.mark.parametrize("budget", [None, 1, 40, 10_000])
def test_length_batches_cover_everything_within_budget(budget):
    lengths = [3, 3, 5, 8, 9, 20, 21, 40]
    order = list(range(10, 18))
    batches = length_batches(lengths, order, batch_size=3, max_tokens=budget)
    assert [i for b in batches for i in b] == order
    if budget is None:
        assert [len(b) for b in batches] == [3, 3, 2]
    else:
        length_of = dict(zip(order, lengths, strict=True))
        assert all(len(b) == 1 or len(b) * max(length_of[i] for i in b) <= budget for b in batches)


def test_token_budget_embedding_equals_fixed_batches(tiny_model):
    rng = torch.Generator().manual_seed(0)
    seqs = [torch.randint(5, 500, (int(n),), generator=rng).tolist()
            for n in torch.randint(2, 60, (40,), generator=rng)]
    one_by_one = torch.cat([tiny_model._embed([s], 1, False, "documents") for s in seqs])
    for kwargs in ({"batch_size": 8}, {"batch_size": 8, "max_tokens": 200}, {"batch_size": 8, "max_tokens": 1}):
        vecs = tiny_model._embed(seqs, progress=False, what="documents", **kwargs)
        torch.testing.assert_close(vecs, one_by_one, atol=1e-5, rtol=1e-5)
