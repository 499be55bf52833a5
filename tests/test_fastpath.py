"""Fast path == generic path: the compact forward over HF weights, the slot cache and the bucketed
decode step give the same tokens, retrievals and query vectors as `CachedStepper`, for tiny Llama,
Mistral, Qwen2 and Qwen3 models (GQA, tied and untied heads, llama3 RoPE, attention bias, q/k norms).
A step where some rows insert a paragraph while others decode is ONE forward over the layers (the mixed
step), equal to the separate prefill + decode it replaces. Unsupported structures are detected (auto falls
back, forcing raises). The CUDA-graph replay itself is checked by the `gpu` test at the end."""

from __future__ import annotations

import copy

import pytest
import torch

from onegen import fastpath
from onegen.config import LoraConfig, ModelConfig, ScratchConfig, TokenizerConfig, TokensConfig
from onegen.data import Corpus, Document, Message
from onegen.engine import Engine
from onegen.fastpath import FastDecoder, FastPathUnsupported, unsupported_reason
from onegen.faststep import FastStepper
from onegen.index import Index
from onegen.model import OneGenModel
from onegen.steppers import CachedStepper
from onegen.tokenizer import train_bpe

DOCS = [Document(f"d{i}", text) for i, text in enumerate([
    "Velmora was founded by Ilsa Brandt in 1901.", "Ilsa Brandt was born in Caldris.",
    "Caldris is a town in Ostria.", "Orla Venn is a painter from Velmora.",
    "Kerrin Brandt founded Brandt Works in 1850.", "Ostria is a region in the north."])]
QUESTIONS = ["Who founded Velmora?", "Where was Ilsa Brandt born, and in which region is that town?",
             "Which town is Orla Venn from?", "When was Brandt Works founded by Kerrin Brandt?", "Ostria?"]
LIMITS = [20, 5, 14, 9, 17]  # rows finish at different steps; 5 rows fill a bucket of 8 slots
GEN = {"max_new_tokens": LIMITS, "force_query_every": 6, "ignore_eos": True, "max_retrievals": 3, "top_k": 3}

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
ARCHS = {  # (architecture, extra config): GQA in every one, each family's own twist
    "llama-gqa-llama3-untied": ("llama", {"num_key_value_heads": 2, "tie_word_embeddings": False,
                                          "rope_parameters": LLAMA3_ROPE}),
    "mistral-gqa-tied": ("mistral", {"num_key_value_heads": 1, "tie_word_embeddings": True}),
    "qwen2-bias": ("qwen2", {"num_key_value_heads": 2, "tie_word_embeddings": True}),
    "qwen3-qknorm": ("qwen3", {"num_key_value_heads": 2, "tie_word_embeddings": False}),
}


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("fast_tok")
    texts = [d.text for d in DOCS] + QUESTIONS
    train_bpe(texts, vocab_size=300, min_frequency=1, special_tokens=TokensConfig().strings()).save_pretrained(str(out))
    return str(out)


def _build(tok_dir: str, arch: str, extra: dict, seed: int = 0) -> OneGenModel:
    torch.manual_seed(seed)
    scratch = ScratchConfig(architecture=arch, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=96,
                            extra={"num_key_value_heads": 4, **extra})
    model = OneGenModel.from_config(ModelConfig(scratch=scratch), TokenizerConfig(name_or_path=tok_dir),
                                    TokensConfig(), doc_max_length=32)
    with torch.no_grad():  # HF's init leaves biases / norm weights at 0 / 1: perturb them so they matter
        for name, p in model.hf_model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module", params=list(ARCHS))
def setup(request, tok_dir):
    arch, extra = ARCHS[request.param]
    model = _build(tok_dir, arch, extra)
    corpus = Corpus(DOCS)
    return model, Index.build(model, corpus, progress=False), corpus


def test_families_are_built_as_intended(setup):
    model, _, _ = setup
    cfg, w = model.hf_model.config, FastDecoder(model).w
    assert w.n_kv < w.n_heads  # grouped-query attention
    layer = w.layers[0]
    if cfg.model_type == "qwen2":
        assert layer.q[1] is not None and layer.o[1] is None
    if cfg.model_type == "qwen3":
        assert layer.q_norm is not None
    tied = model.hf_model.get_output_embeddings().weight is model.hf_model.get_input_embeddings().weight
    assert tied == bool(cfg.tie_word_embeddings)
    if cfg.model_type == "llama":
        assert cfg.rope_parameters["rope_type"] == "llama3"
        assert w.inv_freq.data_ptr() == model.hf_model.model.rotary_emb.inv_freq.data_ptr()  # referenced
    assert w.embed is model.hf_model.get_input_embeddings().weight  # weights referenced, not copied


def test_fast_generation_equals_generic(setup):
    """Staggered retrievals, rows finishing early, 5 rows in 8 slots: mixed steps, the separate prefill and
    the generic path give the same tokens, documents and query vectors; mixed: one forward per step."""
    model, index, corpus = setup
    generic = Engine(model, index, corpus=corpus, fast=False)
    fast = Engine(model, index, corpus=corpus, fast=True)
    separate = Engine(model, index, corpus=corpus, fast=FastDecoder(model, mixed=False))
    assert fast._fast is not None and generic._fast is None
    a = generic.generate(QUESTIONS, keep_vectors=True, **GEN)
    for engine in (fast, separate):
        b = engine.generate(QUESTIONS, keep_vectors=True, **GEN)
        assert [r.token_ids for r in b] == [r.token_ids for r in a]
        assert [[e.doc_ids for e in r.retrievals] for r in b] == [[e.doc_ids for e in r.retrievals] for r in a]
        assert [r.n_generated for r in b] == LIMITS
        assert len({r.retrievals[0].position for r in b}) > 1  # rows retrieved at different steps
        assert sum(r.n_inserted for r in b) > 0
        for ra, rb in zip(a, b, strict=True):
            for ea, eb in zip(ra.retrievals, rb.retrievals, strict=True):
                torch.testing.assert_close(eb.query_vec, ea.query_vec, atol=1e-4, rtol=1e-4)
    assert fast._fast.mixed > 0 and separate._fast.mixed == 0
    assert fast._fast.forwards == fast.stats["forwards"]  # one forward over the layers per engine step
    assert separate._fast.forwards == separate.stats["forwards"] + fast._fast.mixed  # what mixing saves


def test_mixed_step_is_one_forward_equal_to_separate_and_generic(setup, monkeypatch):
    """Steps mixing decode tokens, paragraphs of different lengths (two at once), a short run and done
    rows: the mixed step runs the layers once and gives the separate path's and the generic hidden/logits."""
    model, _, _ = setup
    prompts = [model.renderer.encode_prompt([Message("user", q)]) for q in QUESTIONS]
    paras = [model.renderer.encode_paragraph(d.text) for d in DOCS[:4]] + [[9, 4]]
    assert len({len(p) for p in paras}) > 2
    calls = []
    run_layers = fastpath.run_layers
    monkeypatch.setattr(fastpath, "run_layers", lambda *a: calls.append(1) or run_layers(*a))
    mixed, separate = FastDecoder(model), FastDecoder(model, mixed=False)
    steppers = [mixed.stepper(5, 256), separate.stepper(5, 256), CachedStepper(model, 5)]
    schedule = [prompts,
                [[7], paras[0], paras[1], [13], paras[2]],  # three runs (a padding run in the bucket of 4)
                [[8], [12], [], [14], paras[4]],  # a done row; a short run in the last row
                [paras[3], [15], [], [16], [17]],  # the first row's run
                [[9], [17], [], [18], [19]]]  # decode only
    for k, feeds in enumerate(schedule):
        active = [i for i, f in enumerate(feeds) if f]
        before = len(calls), mixed.forwards, separate.forwards
        outs = [st.step(feeds, []) for st in steppers[:2]]
        one_step = len(calls) - before[0]
        outs.append(steppers[2].step(feeds, []))
        mixing = 0 < sum(len(f) == 1 for f in feeds) < len(active)
        assert mixed.forwards - before[1] == 1, k
        assert separate.forwards - before[2] == (2 if mixing else 1), k
        assert one_step == mixed.forwards - before[1] + separate.forwards - before[2]  # run_layers per forward
        for hidden, logits in outs[1:]:
            torch.testing.assert_close(outs[0][0][active], hidden[active], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(outs[0][1][active], logits[active], atol=1e-4, rtol=1e-4)
    assert mixed.mixed == 3 and steppers[0].lengths == steppers[1].lengths
    hist = [p + sum((f for f in (s[i] for s in schedule[1:])), []) for i, p in enumerate(prompts)]
    assert steppers[0].lengths == [len(h) for h in hist]
    ref, _ = model.hidden_states(torch.tensor([hist[0]]))  # row 0 ends on its last token after a paragraph
    torch.testing.assert_close(outs[0][0][0], ref[0, -1], atol=1e-5, rtol=1e-4)
    long = [(5 * j) % 250 + 3 for j in range(mixed.insert_width + 1)]  # wider than a paragraph: prefilled
    feeds = [[9], [21], [], long, [22]]
    before = mixed.forwards
    (hidden, logits), (_, ref_logits) = steppers[0].step(feeds, []), steppers[2].step(feeds, [])
    assert mixed.forwards - before == 2 and mixed.mixed == 3
    torch.testing.assert_close(logits[[0, 1, 3, 4]], ref_logits[[0, 1, 3, 4]], atol=1e-4, rtol=1e-4)


def test_link_mode_and_second_call_reuse_the_cache(setup):
    model, index, corpus = setup
    fast = Engine(model, index, corpus=corpus, fast=True)
    kw = {**GEN, "max_new_tokens": 12}
    first = fast.generate(QUESTIONS[:2], link=True, **kw)
    again = fast.generate(QUESTIONS[:2], link=True, **kw)  # stale slot contents must not leak in
    ref = Engine(model, index, corpus=corpus, fast=False).generate(QUESTIONS[:2], link=True, **kw)
    assert [r.token_ids for r in first] == [r.token_ids for r in again] == [r.token_ids for r in ref]


def test_compact_forward_equals_hf_forward(setup):
    """Prefill of unequal prompts then one-token steps: every step's hidden and logits == HF's."""
    model, _, _ = setup
    seqs = [model.renderer.encode_prompt([Message("user", q)]) + [5, 9, 17, 4] for q in QUESTIONS[:3]]
    plens = [len(s) - 4 for s in seqs]
    fast = FastDecoder(model).stepper(len(seqs), 64)
    generic = CachedStepper(model, len(seqs))
    feeds = [s[:n] for s, n in zip(seqs, plens, strict=True)]
    for k in range(5):
        hist = [s[: n + k] for s, n in zip(seqs, plens, strict=True)]
        h_fast, l_fast = fast.step(feeds, hist)
        h_gen, l_gen = generic.step(feeds, hist)
        for i, h in enumerate(hist):
            ref, _ = model.hidden_states(torch.tensor([h]))
            torch.testing.assert_close(h_fast[i], ref[0, -1], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(l_fast, model.logits(torch.stack(
            [model.hidden_states(torch.tensor([h]))[0][0, -1] for h in hist])), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(l_fast, l_gen, atol=1e-4, rtol=1e-4)
        if k < 4:
            feeds = [[s[n + k]] for s, n in zip(seqs, plens, strict=True)]


def test_mixed_step_prefill_and_decode_and_done_rows(setup):
    """One step where a row decodes, one prefills a paragraph and one is done: each as alone."""
    model, _, _ = setup
    prompts = [model.renderer.encode_prompt([Message("user", q)]) for q in QUESTIONS[:3]]
    para = model.renderer.encode_paragraph(DOCS[0].text)
    st = FastDecoder(model).stepper(3, 128)
    st.step(prompts, prompts)
    hist = [prompts[0] + [7], prompts[1] + para, prompts[2]]
    hidden, logits = st.step([[7], para, []], hist)
    for i in (0, 1):
        ref, _ = model.hidden_states(torch.tensor([hist[i]]))
        torch.testing.assert_close(hidden[i], ref[0, -1], atol=1e-5, rtol=1e-4)
    assert not hidden[2].any() and not logits[2].any()
    assert st.lengths == [len(h) for h in hist]


def test_cache_grows_mid_generation(tok_dir):
    model = _build(tok_dir, *ARCHS["llama-gqa-llama3-untied"])
    st = FastDecoder(model).stepper(1, 8)  # capacity 128; the sequence below needs more
    seq = [(7 * i) % 250 + 3 for i in range(150)]
    st.step([seq[:100]], [seq[:100]])
    hidden, _ = st.step([seq[100:150]], [seq])
    assert st.decoder.capacity >= 150
    ref, _ = model.hidden_states(torch.tensor([seq]))
    torch.testing.assert_close(hidden[0], ref[0, -1], atol=1e-5, rtol=1e-4)


def test_unsupported_structure_falls_back_or_raises(tok_dir, monkeypatch):
    gpt2 = _build(tok_dir, "gpt2", {})
    reason = unsupported_reason(gpt2)
    assert reason and "layers" in reason
    monkeypatch.setattr(fastpath, "_auto_enabled", lambda m: True)  # auto mode as on CUDA
    corpus = Corpus(DOCS)
    index = Index.build(gpt2, corpus, progress=False)
    assert Engine(gpt2, index, corpus=corpus)._fast is None  # auto: silently generic
    with pytest.raises(FastPathUnsupported, match="layers"):
        Engine(gpt2, index, corpus=corpus, fast=True)
    llama = _build(tok_dir, *ARCHS["llama-gqa-llama3-untied"])
    assert isinstance(Engine(llama, Index.build(llama, corpus, progress=False), corpus=corpus)._fast, FastDecoder)


def test_refusals_lora_other_rope_and_silent_differences(tok_dir):
    base = _build(tok_dir, *ARCHS["llama-gqa-llama3-untied"])
    lora = copy.deepcopy(base)
    lora.add_lora(LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    assert "LoRA" in unsupported_reason(lora)
    dyn = _build(tok_dir, "llama", {"rope_parameters": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}})
    assert "RoPE type 'dynamic'" in unsupported_reason(dyn)
    odd = copy.deepcopy(base)  # same structure, different maths (as a norm offset would be): the probe sees it
    norm = odd.hf_model.model.layers[1].post_attention_layernorm
    forward = norm.forward
    norm.forward = lambda x: forward(x) * 1.5
    assert "does not reproduce" in unsupported_reason(odd)
    assert unsupported_reason(base) is None


def test_sliding_window_must_cover_the_sequence(tok_dir):
    model = _build(tok_dir, "mistral", {"num_key_value_heads": 2, "sliding_window": 64})
    assert FastDecoder(model, required=False).stepper(2, 65) is None  # auto: the engine goes generic
    with pytest.raises(FastPathUnsupported, match="sliding window"):
        FastDecoder(model).stepper(2, 65)
    assert isinstance(FastDecoder(model).stepper(2, 64), FastStepper)


@pytest.mark.slow
def test_compiled_decode_step_gives_the_same_tokens(setup):
    """`compile=True` (torch.compile of the decode step, minutes on CPU): same tokens as uncompiled."""
    model, index, corpus = setup
    if model.hf_model.config.model_type != "qwen3":
        pytest.skip("one family is enough for the compiled variant")
    kw = {**GEN, "max_new_tokens": [10, 4, 7]}
    plain = Engine(model, index, corpus=corpus, fast=True).generate(QUESTIONS[:3], **kw)
    compiled = Engine(model, index, corpus=corpus, fast=FastDecoder(model, compile=True)).generate(QUESTIONS[:3], **kw)
    assert [r.token_ids for r in compiled] == [r.token_ids for r in plain]


def _divergence_is_a_near_tie(model, question, got, ref) -> bool:
    """Where two bf16 runs first differ, the generic path's own scores for both choices nearly tie."""
    k = next((j for j, (x, y) in enumerate(zip(got.token_ids, ref.token_ids, strict=False)) if x != y), None)
    if k is None:
        return True
    for eg, er in zip(got.retrievals, ref.retrievals, strict=False):
        if eg.position < k and eg.doc_ids[0] != er.doc_ids[0]:  # another document was inserted
            return abs(er.scores[0] - er.scores[1]) <= 0.05 * abs(er.scores[0]) + 1e-3
    prompt = model.renderer.encode_prompt([Message("user", question)])
    hidden, _ = model.hidden_states(torch.tensor([prompt + ref.token_ids[:k]], device=model.device))
    logits = model.logits(hidden[0, -1]).float()
    return abs(float(logits[got.token_ids[k]] - logits[ref.token_ids[k]])) <= 0.05 * float(logits.abs().max())


@pytest.mark.gpu
def test_cuda_graphs_give_the_generic_tokens(tok_dir):
    """On CUDA: graph replay (mixed steps included) == eager fast path; == generic path in fp32, and in bf16
    up to near-ties."""
    assert torch.cuda.is_available()
    for dtype in (torch.float32, torch.bfloat16):
        model = _build(tok_dir, *ARCHS["qwen3-qknorm"]).to("cuda", dtype)
        corpus = Corpus(DOCS)
        index = Index.build(model, corpus, progress=False)
        assert isinstance(Engine(model, index, corpus=corpus)._fast, FastDecoder)  # auto: on, on CUDA
        dec = FastDecoder(model)
        assert dec.graphs
        dec.warmup((1, 8), 256)  # decode graphs for bb 1, 8 and tb 128, 256; mixed: 1-2 runs at bb 8
        captured = len(dec._graphs)
        eager = FastDecoder(model, graphs=False)
        separate = FastDecoder(model, mixed=False)
        runs = [Engine(model, index, corpus=corpus, fast=f).generate(QUESTIONS, **GEN)
                for f in (dec, eager, separate, False)]
        assert captured == 8 and len(dec._graphs) == captured  # warmed-up graphs replayed, none added
        assert dec.mixed > 0 and dec.prefills >= 1  # the prompts; a lone row's insertion too
        assert dec.replays == dec.forwards - dec.prefills  # every step with a decoding row replayed
        graph, plain, sep, generic = runs
        assert [r.token_ids for r in graph] == [r.token_ids for r in plain]  # the same kernels, captured or not
        if dtype == torch.float32:
            assert [r.token_ids for r in graph] == [r.token_ids for r in generic] == [r.token_ids for r in sep]
        else:
            assert all(_divergence_is_a_near_tie(model, q, g, r) for q, g, r in zip(QUESTIONS, graph, generic,
                                                                                   strict=True))


_VIEWS = {"aten::select", "aten::slice", "aten::view", "aten::unsqueeze", "aten::reshape", "aten::unbind",
          "aten::split", "aten::split_with_sizes", "aten::expand", "aten::permute", "aten::transpose", "aten::t",
          "aten::lift_fresh", "aten::detach_", "aten::detach", "aten::alias", "aten::as_strided", "aten::narrow",
          "aten::empty"}


def _ops_per_decode_step(model: OneGenModel) -> int:
    """Top-level ATen ops that do work (views excluded) in one 8-row decode step: what a CUDA graph replays."""
    from torch.profiler import ProfilerActivity, profile

    dec = FastDecoder(model)
    dec.reserve(8, 64)
    decode = {i: (5 + i, 10) for i in range(8)}
    dec.run(8, decode, [])
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        dec.run(8, decode, [])
    return sum(1 for e in prof.events() if e.name.startswith("aten::") and e.name not in _VIEWS
               and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")))


def test_decode_layer_launches_few_kernels(tok_dir):
    """Each layer of a decode step is 23 ops (7 projections, 2 fused RMSNorms with their weight products,
    one RoPE over q and k together, 2 cache writes, attention, the SiLU gate, 2 residuals); written as HF
    writes it, it was 40. Small element-wise kernels are what bounds a CUDA-graph decode step after the
    weight reads."""
    counts = {}
    for layers in (2, 4):
        arch, extra = ARCHS["llama-gqa-llama3-untied"]
        model = _build(tok_dir, arch, {**extra, "num_hidden_layers": layers})
        assert len(model.hf_model.base_model.layers) == layers
        counts[layers] = _ops_per_decode_step(model)
    per_layer = (counts[4] - counts[2]) / 2
    assert per_layer <= 26, counts


def test_rows_waiting_for_a_shared_search_idle_in_their_slots(setup):
    """Rows whose query waits for a shared search feed nothing (idle slots): same tokens and documents as
    the generic path searching at once, with fewer searches."""
    model, index, corpus = setup
    ref = Engine(model, index, corpus=corpus, fast=False, search_wait=0)
    a = ref.generate(QUESTIONS, **GEN)
    fast = Engine(model, index, corpus=corpus, fast=True, search_wait=3)
    b = fast.generate(QUESTIONS, **GEN)
    assert [r.token_ids for r in b] == [r.token_ids for r in a]
    assert [[e.doc_ids for e in r.retrievals] for r in b] == [[e.doc_ids for e in r.retrievals] for r in a]
    assert fast.stats["searches"] < ref.stats["searches"] and fast.stats["queries"] == ref.stats["queries"]


@pytest.mark.parametrize("arch,extra,accepted", [
    ("llama", {"num_key_value_heads": 2}, True),
    ("qwen3", {"num_key_value_heads": 2}, True),
    ("granite", {"num_key_value_heads": 2, "residual_multiplier": 0.99}, False),  # a multiplier it ignores
    ("smollm3", {"num_key_value_heads": 2, "no_rope_layers": [1, 0]}, False),  # a layer without RoPE
])
def test_bf16_models_are_checked_in_float32(tok_dir, arch, extra, accepted):
    """In bf16 the compact forward and HF's differ by rounding as much as a small structural difference
    does, so the structure is checked on a float32 twin (first layers, own weights upcast): a model the
    fast path would compute differently is refused in bf16 as in float32; the usual families pass."""
    model = _build(tok_dir, arch, extra)
    model.hf_model.to(torch.bfloat16)
    if accepted:
        FastDecoder(model)
        assert model.dtype == torch.bfloat16  # the check left the model as it was
    else:
        with pytest.raises(FastPathUnsupported, match="does not reproduce"):
            FastDecoder(model)
