"""Tests for onegen.index: every backend against brute-force cosine, save/load round trips, refusals."""

from __future__ import annotations

import json
import pathlib
import sys

import numpy as np
import pytest
import torch

from onegen.backends import FAISS_FILE, VECTORS_NPY, FlatBackend
from onegen.config import ModelConfig, ScratchConfig, TokenizerConfig, TokenizerTrainConfig, TokensConfig
from onegen.data import Corpus, Document
from onegen.errors import OneGenError
from onegen.index import IDS_JSON, INDEX_JSON, Index, SearchResult
from onegen.model import OneGenModel

EXACT = ["flat", "faiss-flat"]
ALL = ["flat", "faiss-flat", "faiss-hnsw", "faiss-ivf"]
DOC_TEXTS = [f"{name} was founded by {who} in {year}." for name, who, year in [
    ("Velmora", "Ilsa Brandt", 1901), ("Caldris", "Orla Venn", 1877), ("Tessaly", "Brom Ketter", 1932),
    ("Arnhold", "Mira Quell", 1810), ("Dunmere", "Pell Orrin", 1955), ("Yarrow", "Senna Vale", 1744)]]


def _tiny_model(seed: int) -> OneGenModel:
    torch.manual_seed(seed)
    return OneGenModel.from_config(
        ModelConfig(scratch=ScratchConfig(architecture="llama", hidden_size=64, num_layers=2, num_heads=4)),
        TokenizerConfig(train=TokenizerTrainConfig(vocab_size=400, min_frequency=1)), TokensConfig(), DOC_TEXTS)


@pytest.fixture(scope="module")
def model() -> OneGenModel:
    return _tiny_model(0)


@pytest.fixture(scope="module")
def corpus() -> Corpus:
    return Corpus([Document(f"d{i}", t, None) for i, t in enumerate(DOC_TEXTS)])


@pytest.fixture(scope="module")
def data() -> tuple[torch.Tensor, list[str], torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    vectors = torch.randn(500, 32, generator=gen) * 3  # scaled: the index must normalise
    queries = torch.randn(40, 32, generator=gen)
    return vectors, [f"doc-{i}" for i in range(500)], queries


def brute_force(vectors: torch.Tensor, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    sims = torch.nn.functional.normalize(queries, dim=1) @ torch.nn.functional.normalize(vectors, dim=1).T
    return sims.topk(min(k, vectors.shape[0]), dim=1)


def recall(found: torch.Tensor, expected: torch.Tensor) -> float:
    hits = sum(len(set(f) & set(e)) for f, e in zip(found.tolist(), expected.tolist(), strict=True))
    return hits / expected.numel()


@pytest.mark.parametrize("backend", EXACT)
def test_exact_backends_equal_brute_force(data, backend):
    vectors, ids, queries = data
    index = Index.from_vectors(vectors, ids, "fp", backend=backend)
    scores, indices = index.search_tensor(queries, 10)
    want_scores, want_indices = brute_force(vectors, queries, 10)
    assert scores.dtype == torch.float32 and indices.dtype == torch.int64
    assert torch.equal(indices, want_indices)
    torch.testing.assert_close(scores, want_scores, atol=1e-5, rtol=0)
    result = index.search(queries, 10)
    assert result.ids == [[ids[i] for i in row] for row in want_indices.tolist()]
    assert result.scores == scores.tolist()


@pytest.mark.parametrize("backend", ["faiss-hnsw", "faiss-ivf"])
def test_approximate_backends_recall(data, backend):
    vectors, ids, queries = data
    index = Index.from_vectors(vectors, ids, "fp", backend=backend)
    assert recall(index.search_tensor(queries, 10)[1], brute_force(vectors, queries, 10)[1]) >= 0.9


def test_ivf_probing_every_list_is_exact(data):
    vectors, ids, queries = data
    index = Index.from_vectors(vectors, ids, "fp", backend="faiss-ivf", nlist=8, nprobe=8)
    assert torch.equal(index.search_tensor(queries, 10)[1], brute_force(vectors, queries, 10)[1])


@pytest.mark.parametrize("k", [1, 5, 12, 500])
def test_chunked_flat_equals_unchunked(data, k):
    vectors, _, queries = data
    whole, chunked = FlatBackend(chunk_rows=10_000), FlatBackend(chunk_rows=37)  # 14 chunks, ragged tail
    whole.add(vectors)
    chunked.add(vectors)
    (s1, i1), (s2, i2) = whole.search(queries, k), chunked.search(queries, k)
    assert torch.equal(i1, i2)
    torch.testing.assert_close(s1, s2, atol=1e-6, rtol=0)


@pytest.mark.parametrize("rows", [1 << 24, 13, 1])
def test_auto_chunks_equal_fixed_chunks(data, rows, monkeypatch):
    """`chunk_rows=None` takes `auto_chunk_rows`: whatever it gives (one chunk, ragged chunks, one row per
    chunk) the result is that of a fixed chunking."""
    import onegen.backends

    vectors, _, queries = data
    fixed = FlatBackend(chunk_rows=37)
    fixed.add(vectors)
    want = fixed.search(queries, 7)
    monkeypatch.setattr(onegen.backends, "_CPU_CHUNK_ROWS", rows)
    auto = FlatBackend()
    auto.add(vectors)
    got = auto.search(queries, 7)
    assert torch.equal(got[1], want[1])
    torch.testing.assert_close(got[0], want[0], atol=1e-6, rtol=0)


def test_auto_chunk_rows_per_device():
    from onegen.backends import _MAX_BLOCK, auto_chunk_rows

    assert auto_chunk_rows("cuda", 64) == 262_144 and auto_chunk_rows("cuda", 1) == _MAX_BLOCK
    assert auto_chunk_rows("cpu", 64) == auto_chunk_rows("cpu", 1) == 16_384


@pytest.mark.parametrize("backend", ALL)
def test_k_above_count_returns_every_document(data, backend):
    vectors, ids, queries = data
    index = Index.from_vectors(vectors[:5], ids[:5], "fp", backend=backend)
    scores, indices = index.search_tensor(queries, 50)
    assert scores.shape == indices.shape == (len(queries), 5)
    result = index.search(queries[0], 50)  # a single (D,) query
    assert sorted(result.ids[0]) == ids[:5] and result.scores[0] == sorted(result.scores[0], reverse=True)


@pytest.mark.parametrize("backend", ALL)
def test_save_load_round_trip(tmp_path, data, backend):
    vectors, ids, queries = data
    index = Index.from_vectors(vectors, ids, "fp", backend=backend)
    index.save(tmp_path / "idx")
    loaded = Index.load(tmp_path / "idx")
    assert (loaded.ids, len(loaded), loaded.fingerprint, loaded.backend_name) == (ids, 500, "fp", backend)
    assert loaded.search(queries, 10) == index.search(queries, 10)
    meta = json.loads((tmp_path / "idx" / INDEX_JSON).read_text())
    assert meta["dim"] == 32 and meta["count"] == 500 and meta["backend"] == backend
    assert (tmp_path / "idx" / FAISS_FILE).is_file() == backend.startswith("faiss")


@pytest.mark.parametrize("backend", ["faiss-flat", "faiss-ivf"])
def test_missing_faiss_file_is_rebuilt_from_vectors(tmp_path, data, backend):
    vectors, ids, queries = data
    options = {"nprobe": 10_000} if backend == "faiss-ivf" else {}  # IVF: probe every list, so exact
    index = Index.from_vectors(vectors, ids, "fp", backend=backend, **options)
    index.save(tmp_path / "idx")
    (tmp_path / "idx" / FAISS_FILE).unlink()
    assert torch.equal(Index.load(tmp_path / "idx").search_tensor(queries, 10)[1], brute_force(vectors, queries, 10)[1])


def test_load_overrides_search_options(tmp_path, data):
    vectors, ids, queries = data
    Index.from_vectors(vectors, ids, "fp", backend="faiss-ivf", nprobe=1).save(tmp_path / "idx")
    loaded = Index.load(tmp_path / "idx", nprobe=10_000)
    assert torch.equal(loaded.search_tensor(queries, 10)[1], brute_force(vectors, queries, 10)[1])


def test_build_embeds_corpus_and_checks_model(tmp_path, model, corpus):
    index = Index.build(model, corpus, progress=False)
    assert index.ids == corpus.ids and index.fingerprint == model.fingerprint() and index.dim == 64
    doc_vecs = model.embed_documents(DOC_TEXTS)
    assert torch.equal(index.search_tensor(doc_vecs, 3)[1], brute_force(doc_vecs, doc_vecs, 3)[1])
    index.save(tmp_path / "idx")
    Index.load(tmp_path / "idx", model=model).check_model(model)


def test_other_model_is_refused(tmp_path, model, corpus):
    other = _tiny_model(1)
    assert other.fingerprint() != model.fingerprint()
    index = Index.build(model, corpus, progress=False)
    index.save(tmp_path / "idx")
    with pytest.raises(OneGenError, match=rf"index .*idx was built by model {model.fingerprint()}, "
                                          rf"not {other.fingerprint()}; rebuild it with `onegen index`"):
        Index.load(tmp_path / "idx", model=other)
    with pytest.raises(OneGenError, match="was built by model"):
        index.check_model(other)


@pytest.fixture
def saved(tmp_path, data) -> pathlib.Path:
    vectors, ids, _ = data
    return Index.from_vectors(vectors, ids, "fp").save(tmp_path / "idx")


@pytest.mark.parametrize("damage", [
    lambda d: (d / INDEX_JSON).write_text("{not json"),
    lambda d: (d / INDEX_JSON).write_text(json.dumps({"backend": "flat"})),
    lambda d: (d / INDEX_JSON).unlink(),
    lambda d: (d / VECTORS_NPY).unlink(),
    lambda d: (d / VECTORS_NPY).write_bytes(b"garbage"),
    lambda d: np.save(d / VECTORS_NPY, np.zeros((3, 32), np.float32)),
    lambda d: (d / IDS_JSON).write_text(json.dumps(["a"] * 500)),
], ids=["bad-json", "missing-fields", "no-index-json", "no-vectors", "garbage-vectors", "wrong-count", "dup-ids"])
def test_damaged_index_is_refused(saved, damage):
    damage(saved)
    with pytest.raises(OneGenError, match="rebuild|unique"):
        Index.load(saved)


def test_pickled_vectors_cannot_run_code(saved, tmp_path):
    sentinel = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (pathlib.Path.touch, (sentinel,))

    np.save(saved / VECTORS_NPY, np.array([Payload()], dtype=object), allow_pickle=True)
    with pytest.raises(OneGenError, match=VECTORS_NPY):
        Index.load(saved)
    assert not sentinel.exists()
    np.load(saved / VECTORS_NPY, allow_pickle=True)  # the payload is live: loading with pickle runs it
    assert sentinel.exists()


def test_ids_must_align_and_be_unique(data):
    vectors, ids, _ = data
    with pytest.raises(OneGenError, match="duplicate document id"):
        Index.from_vectors(vectors[:3], ["a", "b", "a"], "fp")
    with pytest.raises(OneGenError, match="align"):
        Index.from_vectors(vectors[:3], ["a", "b"], "fp")


def test_bad_options_and_missing_faiss(data, monkeypatch):
    vectors, ids, _ = data
    with pytest.raises(OneGenError, match="no option 'nprobe'"):
        Index.from_vectors(vectors, ids, "fp", backend="flat", nprobe=4)
    with pytest.raises(OneGenError, match="unknown index backend"):
        Index.from_vectors(vectors, ids, "fp", backend="annoy")
    monkeypatch.setitem(sys.modules, "faiss", None)  # makes `import faiss` fail
    with pytest.raises(OneGenError, match="pip install faiss-cpu"):
        Index.from_vectors(vectors, ids, "fp", backend="faiss-hnsw")


def test_save_is_atomic_and_never_clobbers_other_dirs(tmp_path, data, monkeypatch):
    vectors, ids, queries = data
    index = Index.from_vectors(vectors, ids, "fp")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("x")
    with pytest.raises(OneGenError, match="not an onegen index"):
        index.save(tmp_path / "notes")

    def crash(self, directory):
        raise KeyboardInterrupt

    monkeypatch.setattr(FlatBackend, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        index.save(tmp_path / "idx")
    assert list(tmp_path.iterdir()) == [tmp_path / "notes"]


def test_search_rejects_wrong_dimension(data):
    vectors, ids, _ = data
    index = Index.from_vectors(vectors, ids, "fp")
    with pytest.raises(OneGenError, match="32-dimensional"):
        index.search(torch.randn(2, 16), 3)
    assert index.search(torch.empty(0, 32), 3) == SearchResult([], [])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_flat_on_cuda_matches_cpu(data, dtype):
    vectors, ids, queries = data
    cpu = Index.from_vectors(vectors, ids, "fp")
    gpu = Index.from_vectors(vectors, ids, "fp", device="cuda", dtype=dtype, chunk_rows=64)
    want = cpu.search_tensor(queries, 10)[1]
    got = gpu.search_tensor(queries.cuda(), 10)[1]
    assert got.device.type == "cpu"
    assert recall(got, want) >= (1.0 if dtype == torch.float32 else 0.95)


def test_scan_bytes_is_what_a_search_reads(data):
    """The engine's cost model: exact scans read every row (int8 a quarter of fp32 plus the scales), IVF
    the probed share, HNSW a bounded walk; an empty index reads nothing."""
    pytest.importorskip("faiss")
    vectors, ids, _ = data
    full = 500 * 32 * 4
    assert Index.from_vectors(vectors, ids, "fp").scan_bytes == full
    assert Index.from_vectors(vectors, ids, "fp", backend="faiss-flat").scan_bytes == full
    assert Index.from_vectors(vectors, ids, "fp", backend="flat-int8").scan_bytes == 500 * 32 + 500 * 4
    ivf = Index.from_vectors(vectors, ids, "fp", backend="faiss-ivf", nlist=10, nprobe=2)
    assert ivf.scan_bytes == full * 2 // 10
    hnsw = Index.from_vectors(vectors, ids, "fp", backend="faiss-hnsw", M=8, ef_search=16)
    assert hnsw.scan_bytes == 8 * 16 * 32 * 4 < full
    assert FlatBackend().scan_bytes == 0


def test_build_takes_a_list_of_documents_or_dicts(model, corpus):
    as_list = Index.build(model, [{"id": d.id, "text": d.text, "title": d.title} for d in corpus.docs], progress=False)
    ref = Index.build(model, corpus, progress=False)
    assert as_list.ids == ref.ids and torch.equal(as_list.vectors, ref.vectors)
    assert Index.build(model, list(corpus.docs), progress=False).ids == ref.ids
    for bad, needle in ((["a text"], "item 0 is str"), ("a text", "got str"),
                        ([{"id": "a", "text": "x"}, {"id": "a", "text": "y"}], "duplicate document id 'a'")):
        with pytest.raises(OneGenError, match=needle):
            Index.build(model, bad, progress=False)


def test_search_refuses_a_non_integer_k_and_a_nan_query(model, corpus):
    index = Index.build(model, corpus, progress=False)
    q = torch.zeros(index.dim)
    for k in (2.0, True):
        with pytest.raises(OneGenError, match="top-k must be an integer"):
            index.search(q, k)
    with pytest.raises(OneGenError, match="NaN"):
        index.search(torch.full((index.dim,), float("nan")), 1)
    assert len(Index.build(model, [{"id": 7, "text": "Velmora"}], progress=False).search(q, 1).ids[0]) == 1


def test_load_names_the_file_that_is_wrong(tmp_path, model, corpus):
    out = Index.build(model, corpus, progress=False).save(tmp_path / "idx")
    vectors = np.load(out / VECTORS_NPY)
    vectors[0, 0] = np.nan
    np.save(out / VECTORS_NPY, vectors)
    with pytest.raises(OneGenError, match=r"vectors\.npy.*NaN"):
        Index.load(out)
    meta = json.loads((out / "index.json").read_text())
    (out / "index.json").write_text(json.dumps({**meta, "dim": True}))
    with pytest.raises(OneGenError, match=r"index\.json.*'dim'"):
        Index.load(out)
