"""Engine invariants: cache == recompute, captured query vector == plain forward, batched == single,
forward-pass accounting, retrieval budget, link mode, baselines."""

from __future__ import annotations

import pytest
import torch

from onegen.config import ModelConfig, ScratchConfig, TokenizerConfig, TokenizerTrainConfig, TokensConfig
from onegen.data import Corpus, Document, Message
from onegen.engine import Engine
from onegen.index import Index
from onegen.model import OneGenModel
from onegen.retrievers import BM25Retriever, DenseRetriever

DOCS = [Document(f"d{i}", text) for i, text in enumerate([
    "Velmora was founded by Ilsa Brandt in 1901.", "Ilsa Brandt was born in Caldris.",
    "Caldris is a town in Ostria.", "Orla Venn is a painter from Velmora.",
    "Kerrin Brandt founded Brandt Works in 1850.", "Ostria is a region in the north."])]
QUESTIONS = ["Who founded Velmora?", "Where was Ilsa Brandt born, and in which region is that town?",
             "Which town is Orla Venn from?", "When was Brandt Works founded by Kerrin Brandt?"]


def _model(seed: int, arch: str = "llama", **extra) -> OneGenModel:
    torch.manual_seed(seed)
    texts = [d.text for d in DOCS] + QUESTIONS
    cfg = ModelConfig(scratch=ScratchConfig(architecture=arch, hidden_size=64, num_layers=2, num_heads=4,
                                            extra=extra))
    tok = TokenizerConfig(train=TokenizerTrainConfig(vocab_size=300, min_frequency=1))
    return OneGenModel.from_config(cfg, tok, TokensConfig(), texts).eval()


@pytest.fixture(scope="module")
def model() -> OneGenModel:
    return _model(0)


@pytest.fixture(scope="module")
def corpus() -> Corpus:
    return Corpus(DOCS)


@pytest.fixture(scope="module")
def index(model, corpus) -> Index:
    return Index.build(model, corpus, progress=False)


GEN = {"max_new_tokens": 24, "force_query_every": 7, "ignore_eos": True, "max_retrievals": 3, "top_k": 3}


def test_cached_equals_recompute(model, index, corpus):
    a = Engine(model, index, corpus=corpus).generate(QUESTIONS, **GEN)
    b = Engine(model, index, corpus=corpus, use_cache=False).generate(QUESTIONS, **GEN)
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    assert [[e.doc_ids for e in r.retrievals] for r in a] == [[e.doc_ids for e in r.retrievals] for r in b]
    assert all(len(r.retrievals) == 3 for r in a)  # the forced schedule really retrieved


@pytest.mark.parametrize("arch,slack,ratio,split", [("llama", 0, 0.0, 10**9), ("llama", 8, 0.25, 10**9),
                                                     ("llama", 8, 0.25, 0), ("llama", 10**9, 1.0, 0),
                                                     ("gpt2", 0, 0.0, 0), ("bert", 0, 0.0, 0)])
def test_compacted_and_split_cache_equals_recompute(corpus, monkeypatch, arch, slack, ratio, split):
    """Staggered inserts leave holes in the generic cache, and a paragraph step would run every row at its
    width. Compacting the holes (at every step, or now and then) and running the inserting rows apart on
    their own cache rows (`split` 0: whenever a step mixes) change nothing: the same tokens, retrievals and
    query vectors as recomputing every row, with rotary (Llama) or learned absolute positions (GPT-2, BERT
    turned decoder)."""
    import onegen.steppers

    model = _model(0, arch)
    index = Index.build(model, corpus, progress=False)
    monkeypatch.setattr(onegen.steppers, "COMPACT_SLACK", slack)
    monkeypatch.setattr(onegen.steppers, "COMPACT_RATIO", ratio)
    monkeypatch.setattr(onegen.steppers, "SPLIT_MIN", split)
    steppers = []
    engine = Engine(model, index, corpus=corpus, fast=False)
    new_stepper = engine.new_stepper
    engine.new_stepper = lambda *a: steppers.append(new_stepper(*a)) or steppers[-1]
    kw = {**GEN, "max_new_tokens": [30, 9, 22, 16], "keep_vectors": True}
    a = engine.generate(QUESTIONS, **kw)
    b = Engine(model, index, corpus=corpus, use_cache=False).generate(QUESTIONS, **kw)
    assert (steppers[0].compactions > 0) is (slack < 10**9)
    assert (steppers[0].splits > 0) is (split == 0)
    if slack < 10**9:
        width = steppers[0].mask.shape[1]
        assert width <= (1 + ratio) * int(steppers[0].lengths.max()) + slack + 40  # holes bounded (+ one insert)
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    assert [[e.doc_ids for e in r.retrievals] for r in a] == [[e.doc_ids for e in r.retrievals] for r in b]
    for ra, rb in zip(a, b, strict=True):
        for ea, eb in zip(ra.retrievals, rb.retrievals, strict=True):
            torch.testing.assert_close(ea.query_vec, eb.query_vec, atol=1e-5, rtol=1e-4)


def test_rows_retrieve_at_different_steps(model, index, corpus):
    res = Engine(model, index, corpus=corpus).generate(QUESTIONS, **GEN)
    first = {r.retrievals[0].position for r in res}
    assert len(first) > 1


def test_query_vector_equals_plain_forward(model, index, corpus):
    res = Engine(model, index, corpus=corpus).generate(QUESTIONS, keep_vectors=True, **GEN)
    for q, r in zip(QUESTIONS, res, strict=False):
        prompt = model.renderer.encode_prompt([Message("user", q)])
        for e in r.retrievals:
            ids = prompt + r.token_ids[: e.position + 1]
            assert ids[-1] == model.ids.query
            hidden, _ = model.hidden_states(torch.tensor([ids]))
            torch.testing.assert_close(hidden[0, -1], e.query_vec, atol=1e-5, rtol=1e-4)


def test_batched_equals_one_by_one_with_early_finish(model, index, corpus):
    limits = [24, 5, 17, 9]  # rows finish at different steps
    eng = Engine(model, index, corpus=corpus)
    batched = eng.generate(QUESTIONS, **{**GEN, "max_new_tokens": limits})
    single = [eng.generate([q], **{**GEN, "max_new_tokens": n})[0] for q, n in zip(QUESTIONS, limits, strict=False)]
    assert [r.token_ids for r in batched] == [r.token_ids for r in single]
    assert [r.n_generated for r in batched] == limits
    flat = [s for r in batched for e in r.retrievals for s in e.scores]
    assert flat == pytest.approx([s for r in single for e in r.retrievals for s in e.scores], abs=1e-5)


def test_forward_accounting(model, index, corpus):
    eng = Engine(model, index, corpus=corpus)
    res = eng.generate(QUESTIONS, **GEN)
    prompt = sum(len(model.renderer.encode_prompt([Message("user", q)])) for q in QUESTIONS)
    generated = sum(r.n_generated for r in res)
    inserted = sum(r.n_inserted for r in res)
    # every token is processed exactly once; a row's last sampled token is never fed
    assert eng.stats["generator_tokens"] == prompt + generated + inserted - len(QUESTIONS)
    assert eng.stats["reencode_tokens"] == 0
    re = Engine(model, index, corpus=corpus, mode="reencode")
    res2 = re.generate(QUESTIONS, **GEN)
    assert re.stats["generator_tokens"] == eng.stats["generator_tokens"]
    extra = sum(len(model.renderer.encode_prompt([Message("user", q)])) + e.position + 1
                for q, r in zip(QUESTIONS, res2, strict=False) for e in r.retrievals)
    assert re.stats["reencode_tokens"] == extra > 0


def test_reencode_retrieves_the_same(model, index, corpus):
    a = Engine(model, index, corpus=corpus).generate(QUESTIONS, **GEN)
    b = Engine(model, index, corpus=corpus, mode="reencode").generate(QUESTIONS, **GEN)
    assert [r.token_ids for r in a] == [r.token_ids for r in b]


def test_retrieval_budget_masks_query_token(model, index, corpus):
    res = Engine(model, index, corpus=corpus).generate(QUESTIONS, **{**GEN, "max_retrievals": 1})
    for r in res:
        assert len(r.retrievals) == 1
        assert r.token_ids.count(model.ids.query) == 1


def test_insert_mode_inserts_top1_paragraph(model, index, corpus):
    res = Engine(model, index, corpus=corpus).generate(QUESTIONS[:1], **GEN)[0]
    e = res.retrievals[0]
    para = model.renderer.encode_paragraph(corpus[e.doc_ids[0]].text)
    start = e.position + 1
    assert res.token_ids[start:start + len(para)] == para
    assert res.n_inserted == len(para) * len(res.retrievals)


def test_link_mode_inserts_nothing(model, index, corpus):
    res = Engine(model, index, corpus=corpus).generate(QUESTIONS, link=True, **GEN)
    for r in res:
        assert r.n_inserted == 0 and len(r.retrievals) == 3
        assert model.ids.open not in r.token_ids


def test_callback_streams_tokens_and_retrievals(model, index, corpus):
    events = []
    res = Engine(model, index, corpus=corpus).generate(QUESTIONS[:2], callback=events.append, **GEN)
    for row in range(2):
        toks = [e["token_id"] for e in events if e["row"] == row and e["type"] == "token"]
        assert len(toks) == res[row].n_generated
        assert sum(e["type"] == "retrieval" and e["row"] == row for e in events) == len(res[row].retrievals)
        assert any(e["type"] == "done" and e["row"] == row for e in events)


def test_sampling_is_seeded(model, index, corpus):
    eng = Engine(model, index, corpus=corpus)
    kw = {**GEN, "do_sample": True, "temperature": 0.9, "top_p": 0.9}
    a = eng.generate(QUESTIONS, seed=3, **kw)
    b = eng.generate(QUESTIONS, seed=3, **kw)
    c = eng.generate(QUESTIONS, seed=4, **kw)
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    assert [r.token_ids for r in a] != [r.token_ids for r in c]


def test_stop_strings(model, index, corpus):
    res = Engine(model, index, corpus=corpus).generate(QUESTIONS[:1], max_new_tokens=30, ignore_eos=True)[0]
    word = model.tokenizer.decode(res.token_ids[:3], skip_special_tokens=False)
    stopped = Engine(model, index, corpus=corpus).generate(QUESTIONS[:1], max_new_tokens=30, ignore_eos=True,
                                                            stop=[word])[0]
    assert stopped.finish_reason == "stop" and stopped.n_generated <= 3


def test_generation_stops_on_the_token_that_ends_a_turn(model, index, corpus, monkeypatch):
    """A chat template's end-of-turn token (`<|im_end|>`, not eos) stops a row, and is not in the text."""
    free = Engine(model, index, corpus=corpus).generate(QUESTIONS[:1], max_new_tokens=12, ignore_eos=True)[0]
    ours = {model.ids.query, model.ids.doc, model.ids.open, model.ids.close, model.ids.eos, model.ids.pad}
    k = next(i for i, t in enumerate(free.token_ids) if i >= 2 and t not in ours and t not in free.token_ids[:i])
    end = free.token_ids[k]
    monkeypatch.setattr(model.renderer, "end_of_turn_ids", lambda: {end})
    res = Engine(model, index, corpus=corpus).generate(QUESTIONS[:1], max_new_tokens=12)[0]
    assert res.finish_reason == "eos" and res.token_ids == free.token_ids[: k + 1]
    assert res.text == model.tokenizer.decode(free.token_ids[:k], skip_special_tokens=False,
                                              clean_up_tokenization_spaces=False)


@pytest.mark.parametrize("retriever", [None, "bm25"])
def test_pipeline_mode_without_a_retriever_object_is_refused_at_once(model, retriever):
    with pytest.raises(ValueError, match="BM25Retriever"):
        Engine(model, mode="pipeline", retriever=retriever)


@pytest.mark.parametrize("fast, use_cache", [(False, True), (None, True), (False, False)])
def test_rows_end_at_the_models_position_limit(corpus, fast, use_cache):
    """GPT-2's learned positions end at n_positions: a row stops there ("length") instead of indexing past
    the table, whether the limit falls on a decoded token or on an inserted paragraph; a longer prompt is
    refused up front."""
    torch.manual_seed(0)
    cfg = ModelConfig(scratch=ScratchConfig(architecture="gpt2", hidden_size=64, num_layers=2, num_heads=4,
                                            max_position_embeddings=80))
    tok = TokenizerConfig(train=TokenizerTrainConfig(vocab_size=300, min_frequency=1))
    small = OneGenModel.from_config(cfg, tok, TokensConfig(), [d.text for d in DOCS] + QUESTIONS).eval()
    index = Index.build(small, corpus, progress=False)
    engine = Engine(small, index, corpus=corpus, fast=fast if use_cache else False, use_cache=use_cache)
    results = engine.generate(QUESTIONS, max_new_tokens=64, force_query_every=5, ignore_eos=True, max_retrievals=4)
    prompts = [small.renderer.encode_prompt([Message("user", q)]) for q in QUESTIONS]
    for p, r in zip(prompts, results, strict=True):
        assert r.finish_reason == "length" and len(p) + len(r.token_ids) <= 80 + 1  # the last one is never fed
    assert any(r.retrievals for r in results)
    plain = engine.generate(QUESTIONS, max_new_tokens=200, ignore_eos=True, max_retrievals=0)  # the limit on decoding
    assert [len(p) + len(r.token_ids) for p, r in zip(prompts, plain, strict=True)] == [80 + 1] * len(prompts)
    events = []
    with pytest.raises(ValueError, match="prompt 4 is .* the model takes at most 80 positions"):
        engine.generate([*QUESTIONS, "word " * 100], batch_size=1, callback=events.append)
    assert events == []  # refused before the first batch ran


@pytest.mark.parametrize("fast", [False, None])
def test_prompts_prefilled_in_chunks_give_the_same_results(model, index, corpus, monkeypatch, fast):
    """A long prompt feeds PREFILL_CHUNK tokens a step (its attention mask stays chunk x length) while the
    other rows go on decoding: the same tokens, retrievals and query vectors as prefilling it at once."""
    from onegen import engine as engine_module

    kw = {**GEN, "keep_vectors": True}
    plain = Engine(model, index, corpus=corpus, fast=fast)
    whole = plain.generate(QUESTIONS, **kw)
    monkeypatch.setattr(engine_module, "PREFILL_CHUNK", 3)
    chunked = Engine(model, index, corpus=corpus, fast=fast)
    results = chunked.generate(QUESTIONS, **kw)
    _same_results(results, whole)
    for a, b in zip(results, whole, strict=True):
        for ea, eb in zip(a.retrievals, b.retrievals, strict=True):
            torch.testing.assert_close(ea.query_vec, eb.query_vec, rtol=1e-4, atol=1e-5)
    assert chunked.stats["forwards"] > plain.stats["forwards"] + 5  # the prompts took several steps each


def test_a_stop_string_may_end_inside_a_token(model, index, corpus):
    res = Engine(model, index, corpus=corpus).generate(QUESTIONS[:1], max_new_tokens=30, ignore_eos=True)[0]
    ours = {model.ids.query, model.ids.doc, model.ids.open, model.ids.close}
    k = next(i for i in range(1, len(res.token_ids)) if len(model.tokenizer.decode(res.token_ids[i:i + 1])) >= 2
             and not ours & set(res.token_ids[:i + 1]))
    stop = model.tokenizer.decode(res.token_ids[:k + 1], skip_special_tokens=False)[:-1]  # ends inside token k
    stopped = Engine(model, index, corpus=corpus).generate(QUESTIONS[:1], max_new_tokens=30, ignore_eos=True,
                                                            stop=[stop])[0]
    assert stopped.finish_reason == "stop" and stopped.n_generated <= k + 1
    with pytest.raises(ValueError, match="stop strings must be non-empty"):
        Engine(model, index, corpus=corpus).generate(QUESTIONS[:1], stop=[""])


@pytest.mark.parametrize("kw", [{"do_sample": True, "top_p": 0.0}, {"do_sample": True, "temperature": float("nan")},
                                {"do_sample": True, "temperature": -1.0}, {"do_sample": True, "top_p": 2.0},
                                {"force_query_every": 0}])
def test_bad_sampling_and_schedule_options_are_refused_up_front(model, index, corpus, kw):
    with pytest.raises(ValueError):
        Engine(model, index, corpus=corpus).generate(QUESTIONS[:1], max_new_tokens=4, **kw)


def test_a_bad_role_and_a_corpus_that_misses_indexed_ids_are_refused(model, index, corpus):
    with pytest.raises(ValueError, match="role 'robot'; expected one of system, user, assistant"):
        Engine(model, index, corpus=corpus).generate([[{"role": "robot", "content": "x"}]])
    with pytest.raises(ValueError, match="holds no text for 5 of the index's ids"):
        Engine(model, index, corpus=Corpus(DOCS[:1]))


@pytest.mark.parametrize("every", [2, 4])  # every 2: a row holds two queries at once under search_wait=3
@pytest.mark.parametrize("link", [False, True])
@pytest.mark.parametrize("wait", ["auto", 0, 3])
def test_a_query_token_that_ends_a_row_is_still_searched(model, index, corpus, link, wait, every):
    """max_new_tokens spent on [RQ]: its retrieval still happens (nothing is inserted after it), so every
    [RQ] in token_ids has its event and, in link mode, the last mention keeps its link."""
    kw = {"force_query_every": every, "ignore_eos": True, "link": link}
    free = []
    Engine(model, index, corpus=corpus).generate(QUESTIONS, max_new_tokens=20, callback=free.append, **kw)
    limits = []  # each row's second [RQ] is its last generated token
    for row in range(len(QUESTIONS)):
        tokens = [e["token_id"] for e in free if e["row"] == row and e["type"] == "token"]
        limits.append([i + 1 for i, t in enumerate(tokens) if t == model.ids.query][1])
    events = []
    engine = Engine(model, index, corpus=corpus, search_wait=wait)
    results = engine.generate(QUESTIONS, max_new_tokens=limits, callback=events.append, **kw)
    for row, r in enumerate(results):
        assert r.token_ids[-1] == model.ids.query and r.finish_reason == "length"
        assert [e.position for e in r.retrievals] == [i for i, t in enumerate(r.token_ids) if t == model.ids.query]
        mine = [e for e in events if e["row"] == row]
        assert mine[-1]["type"] == "done" and sum(e["type"] == "done" for e in mine) == 1


def test_pipeline_mode_counts_retriever_tokens(model, corpus):
    other = _model(1)
    r_index = Index.build(other, corpus, progress=False)
    eng = Engine(model, None, mode="pipeline", retriever=DenseRetriever(other, r_index), corpus=corpus)
    res = eng.generate(QUESTIONS, **GEN)
    assert all(len(r.retrievals) == 3 for r in res)
    assert eng.stats["retriever_tokens"] > 0
    bm = Engine(model, None, mode="pipeline", retriever=BM25Retriever(corpus), corpus=corpus)
    out = bm.generate(["Who founded Velmora?"], **{**GEN, "max_retrievals": 1})[0]
    assert out.retrievals[0].doc_ids[0] in {"d0", "d3"}  # lexical match on "Velmora"


def test_index_from_another_model_is_refused(model, corpus):
    from onegen.errors import OneGenError

    other_index = Index.build(_model(2), corpus, progress=False)
    with pytest.raises(OneGenError):
        Engine(model, other_index, corpus=corpus)


def test_history_retriever_with_the_generator_itself_equals_reencode(model, index, corpus):
    """A second model re-reading the context: with the generator's own weights it must find what
    reencode (and so onegen) finds, and it counts the re-read context as retriever tokens."""
    from onegen.retrievers import HistoryRetriever

    re = Engine(model, index, corpus=corpus, mode="reencode")
    a = re.generate(QUESTIONS, **GEN)
    pipe = Engine(model, None, "pipeline", HistoryRetriever(model, index), corpus)
    b = pipe.generate(QUESTIONS, **GEN)
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    assert [[e.doc_ids for e in r.retrievals] for r in a] == [[e.doc_ids for e in r.retrievals] for r in b]
    assert pipe.stats["retriever_tokens"] == re.stats["reencode_tokens"] > 0


def test_history_retriever_refuses_another_tokenizer(model, index):
    from onegen.retrievers import HistoryRetriever

    other = _model(1)
    other.tokenizer.add_tokens(["zzextra"])
    with pytest.raises(ValueError, match="tokenizer"):
        Engine(model, None, "pipeline", HistoryRetriever(other, Index.build(other, Corpus(DOCS))), Corpus(DOCS))


def test_sampling_batched_equals_one_by_one(model, index, corpus):
    """Each row draws from its own seeded generator: its tokens do not depend on its batch."""
    eng = Engine(model, index, corpus=corpus)
    kw = {**GEN, "max_retrievals": 2, "do_sample": True, "temperature": 1.3,
          "top_p": 0.95, "seed": 11}
    limits = [20, 6, 14, 9]
    batched = eng.generate(QUESTIONS, **{**kw, "max_new_tokens": limits})
    single = [eng.generate([q], **{**kw, "max_new_tokens": n, "seed": 11 + i})[0]
              for i, (q, n) in enumerate(zip(QUESTIONS, limits, strict=True))]
    assert [r.token_ids for r in batched] == [r.token_ids for r in single]
    greedy = eng.generate(QUESTIONS, **{**kw, "do_sample": False, "max_new_tokens": limits})
    assert [r.token_ids for r in batched] != [r.token_ids for r in greedy]  # it really sampled


def test_split_step_falls_back_when_the_rows_cache_comes_back_another_kind(model, index, corpus, monkeypatch):
    """If the model hands back a cache the split cannot merge, the paragraph rows are fed the plain way
    in the same step: the same tokens as recomputing every row."""
    import onegen.steppers

    real = onegen.steppers._dense_layers
    main: list = []
    refused = []

    def dense_layers(cache, width):  # the engine's own cache as it is; any other (the rows' cache) refused
        if main and cache is not main[0].cache:
            refused.append(width)
            return None
        return real(cache, width)

    monkeypatch.setattr(onegen.steppers, "SPLIT_MIN", 0)
    monkeypatch.setattr(onegen.steppers, "_dense_layers", dense_layers)
    engine = Engine(model, index, corpus=corpus, fast=False)
    new_stepper = engine.new_stepper
    engine.new_stepper = lambda *a: main.append(new_stepper(*a)) or main[-1]
    a = engine.generate(QUESTIONS, **GEN)
    b = Engine(model, index, corpus=corpus, use_cache=False).generate(QUESTIONS, **GEN)
    assert refused and main[0].splits == 0  # splits were attempted, and every one fell back
    assert [r.token_ids for r in a] == [r.token_ids for r in b]


def _same_results(a, b):
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    assert [[(e.position, e.doc_ids) for e in r.retrievals] for r in a] == \
        [[(e.position, e.doc_ids) for e in r.retrievals] for r in b]
    flat = [s for r in b for e in r.retrievals for s in e.scores]
    assert flat == pytest.approx([s for r in a for e in r.retrievals for s in e.scores], abs=1e-5)


@pytest.mark.parametrize("mode", ["onegen", "reencode", "pipeline"])
@pytest.mark.parametrize("link", [False, True])
def test_queries_waiting_for_a_shared_search_give_the_same_results(model, index, corpus, mode, link):
    """Rows that fed [RQ] wait up to N steps for one search with others: same tokens, positions, documents,
    scores and query vectors as searching at once; fewer searches. Reencode and pipeline read the context
    up to each row's own [RQ], even in link mode where the row has written on since."""
    kw = {"retriever": DenseRetriever(_model(1), Index.build(_model(1), corpus, progress=False))} \
        if mode == "pipeline" else {}
    idx = None if mode == "pipeline" else index
    at_once = Engine(model, idx, mode=mode, corpus=corpus, search_wait=0, **kw)
    ref = at_once.generate(QUESTIONS, link=link, keep_vectors=True, **GEN)
    assert at_once.stats["searches"] > 3 and at_once.stats["queries"] == sum(len(r.retrievals) for r in ref) == 12
    for wait in (1, 3):
        eng = Engine(model, idx, mode=mode, corpus=corpus, search_wait=wait, **kw)
        got = eng.generate(QUESTIONS, link=link, keep_vectors=True, **GEN)
        _same_results(ref, got)
        assert eng.stats["queries"] == 12 and eng.stats["searches"] < at_once.stats["searches"]
        if mode != "pipeline":
            for ra, rb in zip(ref, got, strict=True):
                for ea, eb in zip(ra.retrievals, rb.retrievals, strict=True):
                    torch.testing.assert_close(eb.query_vec, ea.query_vec, atol=1e-5, rtol=1e-4)
        if not link:  # waiting rows idle: the engine takes more steps
            assert eng.stats["forwards"] > at_once.stats["forwards"]


def test_waiting_equals_recompute_and_one_by_one(model, index, corpus):
    cached = Engine(model, index, corpus=corpus, search_wait=2).generate(QUESTIONS, **GEN)
    recompute = Engine(model, index, corpus=corpus, search_wait=2, use_cache=False).generate(QUESTIONS, **GEN)
    single = [Engine(model, index, corpus=corpus).generate([q], **GEN)[0] for q in QUESTIONS]
    _same_results(cached, recompute)
    _same_results(single, cached)


def _rows(waiting: int, running: int, length: int = 10):
    from onegen.engine import _Row

    return [_Row([1] * length, [], [], waiting=True) for _ in range(waiting)] + \
        [_Row([1] * length, [1], []) for _ in range(running)]


def test_search_queue_rent_or_buy():
    """auto: a scan is bought once the waiting rows' idle share of steps would cost more than it, counted
    in bytes read (weights 100 + KV 1 per token, rows of 10 tokens: a step of 64 rows reads 740)."""
    from onegen.searchqueue import SEARCH_MAX_WAIT, SearchQueue

    def queue(scan, link=False, wait="auto"):
        q = SearchQueue(wait, scan, link, weight_bytes=100, kv_per_token=1)
        q.add(0, 5, None)
        return q

    alone = _rows(1, 0)
    assert queue(10**9).due(alone)  # nobody else could run: search whatever it costs
    one_of_two = _rows(1, 1)
    assert queue(60).due(one_of_two)  # idling half of a 120-byte step (60) costs a scan of 60
    assert not queue(61).due(one_of_two)
    rows = _rows(1, 63)  # one waiting row wastes 740 / 64 = 11.6 bytes a step
    q, steps = queue(100), 0
    while not q.due(rows):
        q.wait(rows)
        steps += 1
    assert steps == 8 and q.age == 8  # 9 x 11.6 >= 100 > 8 x 11.6
    assert queue(0).due(rows)  # a backend that does not say what a scan costs: at once
    q = queue(10**12)
    for _ in range(SEARCH_MAX_WAIT):
        assert not q.due(rows)
        q.wait(rows)
    assert q.due(rows)  # the cap bounds a row's wait
    q = queue(0, link=True)  # link mode: rows do not idle; "auto" searches at once (retrievals stream)
    assert q.due(_rows(0, 4))
    q = queue(0, link=True, wait=2)  # an explicit wait holds them, to share scans
    assert not q.due(_rows(0, 4))
    assert queue(10**9, wait=0).due(rows) and not queue(0, wait=2).due(rows)
    q.take()
    assert not q.due(rows) and q.age == 0 and q.waste == 0


def test_auto_searches_a_small_index_at_once(model, index, corpus):
    eng = Engine(model, index, corpus=corpus)
    res = eng.generate(QUESTIONS, **GEN)
    ref = Engine(model, index, corpus=corpus, search_wait=0)
    _same_results(ref.generate(QUESTIONS, **GEN), res)
    assert eng.stats["forwards"] == ref.stats["forwards"] and eng.stats["searches"] == ref.stats["searches"]


def test_bad_search_wait_is_refused(model, index, corpus):
    for bad in (-1, "soon", 1.5, True):
        with pytest.raises(ValueError, match="search_wait"):
            Engine(model, index, corpus=corpus, search_wait=bad)


def test_callback_rows_count_across_batches(model, index, corpus):
    events = []
    Engine(model, index, corpus=corpus).generate(QUESTIONS, callback=events.append, batch_size=2, **GEN)
    assert {e["row"] for e in events if e["type"] == "retrieval"} == {0, 1, 2, 3}


SLIDING = {  # (architecture, config): every layer windowed, or sliding and full layers alternating
    "mistral": ("mistral", {"sliding_window": 6}),
    "phi3": ("phi3", {"sliding_window": 6}),
    "gemma2": ("gemma2", {"sliding_window": 6, "head_dim": 16}),
    "qwen2": ("qwen2", {"sliding_window": 6, "use_sliding_window": True, "max_window_layers": 1}),
}


@pytest.mark.parametrize("name", list(SLIDING))
@pytest.mark.parametrize("compact", [False, True])
def test_sliding_window_models_cached_equals_recompute(corpus, monkeypatch, name, compact):
    """A window of 6 tokens, rows inserting paragraphs at different steps (holes in the shared cache):
    cached steps give the recomputed tokens, documents and query vectors, batched equals one by one,
    with compaction and split steps or without. The window matters (same weights, no window: other
    tokens)."""
    import onegen.steppers

    arch, extra = SLIDING[name]
    if compact:
        monkeypatch.setattr(onegen.steppers, "COMPACT_SLACK", 0)
        monkeypatch.setattr(onegen.steppers, "COMPACT_RATIO", 0.0)
        monkeypatch.setattr(onegen.steppers, "SPLIT_MIN", 0)
    model = _model(0, arch, **extra)
    assert onegen.steppers.own_masks(model) not in (None, onegen.steppers.UNSUPPORTED)
    index = Index.build(model, corpus, progress=False)
    kw = {**GEN, "max_new_tokens": [30, 9, 22, 16], "keep_vectors": True}
    steppers = []
    engine = Engine(model, index, corpus=corpus, fast=False)
    new_stepper = engine.new_stepper
    engine.new_stepper = lambda *a: steppers.append(new_stepper(*a)) or steppers[-1]
    a = engine.generate(QUESTIONS, **kw)
    assert isinstance(steppers[0], onegen.steppers.CachedStepper)
    assert (steppers[0].compactions > 0 and steppers[0].splits > 0) is compact
    b = Engine(model, index, corpus=corpus, use_cache=False).generate(QUESTIONS, **kw)
    _same_results(b, a)
    for ra, rb in zip(a, b, strict=True):
        for ea, eb in zip(ra.retrievals, rb.retrievals, strict=True):
            torch.testing.assert_close(ea.query_vec, eb.query_vec, atol=1e-5, rtol=1e-4)
    single = [engine.generate([q], **{**kw, "max_new_tokens": n})[0]
              for q, n in zip(QUESTIONS, kw["max_new_tokens"], strict=True)]
    _same_results(single, a)
    wide = _model(0, arch, **{**extra, "sliding_window": 4096})  # the same weights
    assert torch.equal(wide.hf_model.get_input_embeddings().weight, model.hf_model.get_input_embeddings().weight)
    full = Engine(wide, Index.build(wide, corpus, progress=False), corpus=corpus).generate(QUESTIONS, **kw)
    assert [r.token_ids for r in full] != [r.token_ids for r in a]


def test_sliding_window_model_without_usable_masks_recomputes(corpus, monkeypatch, caplog):
    """A sliding-window model that takes no 4-D mask (or fails the check) is decoded by recomputation:
    slow, still exact; a warning says so."""
    import onegen.steppers

    model = _model(0, "mistral", sliding_window=6)
    index = Index.build(model, corpus, progress=False)
    ref = Engine(model, index, corpus=corpus).generate(QUESTIONS, **GEN)
    del model._engine_masks
    monkeypatch.setattr(onegen.steppers, "_masks_hold", lambda *a: False)
    with caplog.at_level("WARNING"):
        engine = Engine(model, index, corpus=corpus)
        assert isinstance(engine.new_stepper(2, 64), onegen.steppers.RecomputeStepper)
        _same_results(ref, engine.generate(QUESTIONS, **GEN))
    assert "recomputes" in caplog.text


def test_every_model_is_checked_with_holes_before_its_own_masks_are_trusted(corpus, monkeypatch):
    """No window: the model's own masks, once they reproduce recomputation with holes; a model whose own
    masks do not gets the stepper's 4-D masks (checked too), with the recomputed tokens."""
    import onegen.steppers

    assert onegen.steppers.own_masks(_model(0)) is None
    real = onegen.steppers._masks_hold
    monkeypatch.setattr(onegen.steppers, "_masks_hold", lambda m, masks: masks is not None and real(m, masks))
    model = _model(0)
    index = Index.build(model, corpus, progress=False)
    assert onegen.steppers.own_masks(model) in (("bool", None), ("additive", None))
    engine = Engine(model, index, corpus=corpus, fast=False)
    assert isinstance(engine.new_stepper(2, 64), onegen.steppers.CachedStepper)
    _same_results(Engine(model, index, corpus=corpus, use_cache=False).generate(QUESTIONS, **GEN),
                  engine.generate(QUESTIONS, **GEN))


def test_hybrid_layers_a_hole_would_change_are_recomputed(corpus, caplog):
    """A family with short-convolution layers (LFM-style `layer_types: conv`): a hole in the shared cache
    changes their state, so the check fails and the engine recomputes: batched equals one by one."""
    import onegen.steppers

    try:
        model = _model(0, "lfm3", sliding_window=6)
    except Exception as e:  # noqa: BLE001 - a transformers without this family
        pytest.skip(f"lfm3 not buildable here: {e}")
    assert "conv" in set(model.hf_model.config.layer_types)
    index = Index.build(model, corpus, progress=False)
    with caplog.at_level("WARNING"):
        assert onegen.steppers.own_masks(model) == onegen.steppers.UNSUPPORTED
    assert "recomputes" in caplog.text
    engine = Engine(model, index, corpus=corpus, fast=False)
    kw = {**GEN, "max_new_tokens": [30, 9, 22, 16]}
    batched = engine.generate(QUESTIONS, **kw)
    single = [engine.generate([q], **{**kw, "max_new_tokens": n})[0] for q, n in zip(QUESTIONS, kw["max_new_tokens"],
                                                                                     strict=True)]
    _same_results(single, batched)


@pytest.mark.parametrize("kw", [{"top_k": 0}, {"max_new_tokens": 0}, {"max_new_tokens": [5, 0, 5, 5]},
                                {"max_new_tokens": [5, 5]}, {"max_retrievals": -1}, {"batch_size": 0},
                                {"top_k": True}])
def test_bad_generate_arguments_are_refused(model, index, corpus, kw):
    with pytest.raises(ValueError, match=next(iter(kw))):
        Engine(model, index, corpus=corpus).generate(QUESTIONS, **{**GEN, **kw})


def test_predictions_respect_max_new_tokens_and_size_entity_linking_by_the_text(model, index, corpus):
    """--max-new-tokens is a limit for both tasks; by default EL gets twice the text's tokens + 32 (the
    text is written out again with its mentions marked), QA 64."""
    from onegen.data import ELItem, QAItem
    from onegen.predict import default_limits, run_engine

    engine = Engine(model, index, corpus=corpus)
    el = [ELItem("e1", "Orla Venn spoke in Caldris."), ELItem("e2", "Velmora.")]
    limits = default_limits(engine, el, "el")
    assert limits == [2 * len(model.tokenizer(i.text, add_special_tokens=False)["input_ids"]) + 32 for i in el]
    assert limits[0] > limits[1]
    qa = [QAItem("q1", (Message("user", QUESTIONS[0]),), ("Ilsa Brandt",))]
    assert default_limits(engine, qa, "qa") == [64]
    calls = []
    generate = engine.generate
    engine.generate = lambda prompts, **kw: calls.append(kw["max_new_tokens"]) or generate(prompts, **kw)
    run_engine(engine, el, "el", max_new_tokens=4, progress=False)
    run_engine(engine, el, "el", progress=False)
    assert calls == [[4, 4], limits]


def test_paragraph_tokens_are_cached_per_document_least_recent_out(model, index, corpus, monkeypatch):
    import onegen.engine

    monkeypatch.setattr(onegen.engine, "PARAGRAPH_CACHE", 2)
    eng = Engine(model, index, corpus=corpus)
    calls = []
    encode = model.renderer.encode_paragraph
    monkeypatch.setattr(model.renderer, "encode_paragraph", lambda t: calls.append(t) or encode(t))
    for doc in ("d0", "d1", "d0", "d2", "d1", "d0"):
        got = eng._paragraph(doc)
        assert got == encode(corpus[doc].text)
        got.append(-1)  # a caller's copy: the cache is not changed through it
    # d0, d1 tokenized; d0 hit; d2 evicts d1 (least recent); d1 again evicts d0; d0 again
    assert calls == [corpus[d].text for d in ("d0", "d1", "d2", "d1", "d0")]


def test_a_retrieval_that_finds_nothing_inserts_an_empty_paragraph(model, corpus):
    class Nothing:
        def retrieve(self, texts, k):
            return [([], []) for _ in texts]

        def count_tokens(self, texts):
            return 0

    res = Engine(model, None, mode="pipeline", retriever=Nothing(), corpus=corpus).generate(QUESTIONS[:2], **GEN)
    empty = model.renderer.encode_paragraph("")
    for r in res:
        assert len(r.retrievals) == 3 and all(e.doc_ids == [] for e in r.retrievals)
        e = r.retrievals[0]
        assert r.token_ids[e.position + 1:e.position + 1 + len(empty)] == empty


@pytest.mark.parametrize("wait", ["auto", 0, 2])
def test_link_mode_callbacks_report_each_retrieval_before_the_row_is_done(model, index, corpus, wait):
    """Every retrieval event of a row comes before its done event; searching at once (auto, 0) it comes
    right after the [RQ] token's event, before the next token's."""
    events = []
    res = Engine(model, index, corpus=corpus, search_wait=wait).generate(
        QUESTIONS, link=True, callback=events.append, **{**GEN, "max_new_tokens": [22, 7, 15, 8]})
    for row, r in enumerate(res):
        mine = [e for e in events if e["row"] == row]
        kinds = [e["type"] for e in mine]
        assert kinds.count("retrieval") == len(r.retrievals) > 0 and kinds[-1] == "done"
        if wait != 2:
            for k, e in enumerate(mine):
                if e["type"] == "token" and e["token_id"] == model.ids.query and mine[k + 1]["type"] != "done":
                    assert mine[k + 1]["type"] == "retrieval"  # (a final [RQ] is never fed: no retrieval)


@pytest.mark.parametrize("text, stop", [("Velmora Café now", "Café"), ("in 1901 ✓ ok", "✓"),
                                        ("Velmora was founded .", "founded .")])
def test_a_stop_string_is_seen_at_the_token_that_completes_it(model, text, stop):
    """Byte tokens of a multi-byte character decode to U+FFFD until the last one: the string is complete
    at that token, not before and not never."""
    from onegen.engine import _stopped

    ids = model.tokenizer.encode(text, add_special_tokens=False)
    first = next(n for n in range(1, len(ids) + 1) if _stopped(model.tokenizer, ids[:n], [stop]))
    assert stop in model.tokenizer.decode(ids[:first]) and stop not in model.tokenizer.decode(ids[:first - 1])
