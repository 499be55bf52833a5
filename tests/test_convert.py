"""Tests of the dataset converters (onegen.convert, `onegen data convert`) on small fixtures written in
the public schemas (tests/data/convert/): files read back with onegen's readers, hop order, dedup,
offsets, error messages, and a converted HotpotQA file rendered and trained on."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from onegen.cli import main
from onegen.config import TokensConfig, TrainConfig
from onegen.convert import convert
from onegen.convert.common import doc_id, join_sentences
from onegen.convert.multihop import order_paragraphs
from onegen.data import read_corpus, read_el_items, read_qa_items, read_samples
from onegen.errors import OneGenError
from onegen.trainer import train

DATA = Path(__file__).parent / "data" / "convert"
HOTPOT = DATA / "hotpotqa_dev_distractor.json"
TWOWIKI = DATA / "2wikimultihopqa_dev.json"
SELFRAG = DATA / "selfrag_eval_and_train.jsonl"
AIDA_TSV = DATA / "aida_yago2_sample.tsv"
EL_JSONL = DATA / "el_items.jsonl"
TOK = TokensConfig()
SCRATCH = {"architecture": "llama", "hidden_size": 64, "num_layers": 2, "num_heads": 4, "intermediate_size": 128}


def _rows(path: Path | str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


def _read_back(out: Path) -> tuple[Any, list, list]:
    """Corpus, samples and QA items read with onegen's own readers (ids checked against the corpus)."""
    corpus = read_corpus(out / "corpus.jsonl")
    samples = read_samples(out / "train.jsonl", TOK.query, corpus, close_token=TOK.close, open_token=TOK.open)
    items = read_qa_items(out / "eval.jsonl", corpus)
    return corpus, samples, items


def _by_title(corpus) -> dict[str, str]:
    return {d.title: d.id for d in corpus.docs}


# -- HotpotQA ------------------------------------------------------------------------------------

def test_hotpotqa_paragraphs_read_back_with_gold_hops_in_order(tmp_path):
    info = convert("hotpotqa", HOTPOT, tmp_path, progress=False)
    assert info["counts"] == {"train": 2, "eval": 2, "corpus": 7}
    assert info["skipped"] == {"single supporting facts (not records) naming a title or sentence not in the context": 1, "no answer or supporting facts": 1}
    corpus, samples, items = _read_back(tmp_path)
    ids = _by_title(corpus)
    # every context paragraph once, the shared ones ("Caldris", "Velmora Press") deduplicated
    assert sorted(ids) == sorted(["Orla Venn", "Ilsa Brandt", "Caldris", "Velmora Press",
                                  "Corvel Review (magazine)", "Tarn Weekly", "Orlen"])
    assert all(d.id == doc_id(d.title, d.text) for d in corpus.docs)  # stable: a hash of title and text
    assert corpus[ids["Velmora Press"]].text == ("Velmora Press is a publisher in Caldris. "
                                                 "It was founded by Ilsa Brandt in 1901.")
    bridge, comparison = items
    # bridge: Velmora Press mentions "Ilsa Brandt" -> it is hop 1 although supporting_facts lists it second
    assert bridge.gold_docs == ((ids["Velmora Press"],), (ids["Ilsa Brandt"],))
    assert bridge.question.startswith("In which year") and bridge.answers == ("1870",)
    # comparison: in the order the question names them ("(magazine)" qualifier ignored)
    assert comparison.gold_docs == ((ids["Tarn Weekly"],), (ids["Corvel Review (magazine)"],))
    s = samples[0]
    assert s.messages[1].content == (f"[RQ]<paragraph>{corpus[ids['Velmora Press']].text}</paragraph>"
                                     f"[RQ]<paragraph>{corpus[ids['Ilsa Brandt']].text}</paragraph>1870")
    assert [r.positives for r in s.retrievals] == [(ids["Velmora Press"],), (ids["Ilsa Brandt"],)]
    for r in s.retrievals:  # the distractors of that question are the hard negatives
        assert set(r.negatives) == {ids["Orla Venn"], ids["Caldris"]}
    assert set(samples[1].retrievals[0].negatives) == {ids["Caldris"], ids["Velmora Press"]}


def test_converted_eval_file_scores_with_onegen_eval(tmp_path, capsys):
    """Predictions that retrieve each gold hop and give the answer score 1.0 everywhere."""
    convert("2wiki", TWOWIKI, tmp_path, split="eval", progress=False)
    preds = [{"id": r["id"], "output": r["answers"][0], "answer": r["answers"][0],
              "retrievals": [{"doc_ids": hop, "scores": [1.0]} for hop in r["gold_docs"]]}
             for r in _rows(tmp_path / "eval.jsonl")]
    (tmp_path / "preds.jsonl").write_text("".join(json.dumps(p) + "\n" for p in preds))
    assert main(["eval", "--task", "qa", "--gold", str(tmp_path / "eval.jsonl"), "--pred",
                 str(tmp_path / "preds.jsonl")]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["n"] == 2 and metrics["em"] == 1.0 and metrics["hop4_recall@1"] == 1.0


def test_hotpotqa_sentences(tmp_path):
    info = convert("hotpotqa", HOTPOT, tmp_path, unit="sentence", progress=False)
    corpus, samples, items = _read_back(tmp_path)
    assert info["counts"]["corpus"] == 12  # 2+2+2+2+1+2+1 non-empty sentences (Caldris, Velmora once)
    text_id = {d.text: d.id for d in corpus.docs}
    assert all(d.title for d in corpus.docs) and "" not in text_id
    assert items[0].gold_docs == ((text_id["It was founded by Ilsa Brandt in 1901."],),
                                  (text_id["Ilsa Brandt (born 1870) was a printer."],))
    negatives = set(samples[0].retrievals[0].negatives)  # the distractors' sentences
    assert negatives == {text_id[t] for t in ("Orla Venn is a painter from Caldris.", "She studied in Tarn.",
                                              "Caldris is a harbour town.", "It lies on the river Sel.")}


def test_hotpotqa_hugging_face_export_gives_the_same_files(tmp_path):
    """The `datasets` export (dict-of-columns context and supporting facts, `id`, JSONL) converts alike."""
    rows = []
    for r in json.loads(HOTPOT.read_text()):
        hf = {k: v for k, v in r.items() if k not in ("_id", "context", "supporting_facts")}
        hf["id"] = r["_id"]
        hf["context"] = {"title": [t for t, _ in r["context"]], "sentences": [s for _, s in r["context"]]}
        if "supporting_facts" in r:
            hf["supporting_facts"] = {"title": [t for t, _ in r["supporting_facts"]],
                                      "sent_id": [i for _, i in r["supporting_facts"]]}
        rows.append(hf)
    hf_path = tmp_path / "hotpot_hf.jsonl"
    hf_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    convert("hotpotqa", HOTPOT, tmp_path / "a", progress=False)
    convert("hotpotqa", hf_path, tmp_path / "b", progress=False)
    for name in ("corpus", "train", "eval"):
        assert (tmp_path / "a" / f"{name}.jsonl").read_bytes() == (tmp_path / "b" / f"{name}.jsonl").read_bytes()


def test_split_option_and_reconversion_is_byte_identical(tmp_path):
    info = convert("hotpotqa", HOTPOT, tmp_path / "e", split="eval", progress=False)
    assert set(info["counts"]) == {"eval", "corpus"} and not (tmp_path / "e" / "train.jsonl").exists()
    convert("hotpotqa", HOTPOT, tmp_path / "both", progress=False)
    assert (tmp_path / "e" / "corpus.jsonl").read_bytes() == (tmp_path / "both" / "corpus.jsonl").read_bytes()
    assert json.loads((tmp_path / "e" / "convert.json").read_text())["counts"] == info["counts"]


@pytest.mark.parametrize("texts,question,answer,want", [
    # no title mention either way: the paragraph without the answer comes first
    ({"Ardo": "Ardo is a town.", "Bel": "Bel was born in 1870."}, "When was it?", "1870", ["Ardo", "Bel"]),
    ({"Ardo": "Ardo was born in 1870.", "Bel": "Bel is a town."}, "When was it?", "1870", ["Bel", "Ardo"]),
    # yes/no answer, no mentions: the paragraph the question names comes first
    ({"Ardo": "Ardo is a town.", "Bel": "Bel is a town."}, "Is bel older than it?", "yes", ["Bel", "Ardo"]),
    # nothing decides: supporting-facts order; a name inside a longer word is no mention
    ({"Ardo": "Ardo is a town.", "Bel": "Bel is a Belardo town."}, "Is it?", "no", ["Ardo", "Bel"]),
    # mentions in both directions do not decide; answer containment does
    ({"Ardo": "Ardo knows Bel.", "Bel": "Bel knows Ardo, born 1870."}, "When?", "1870", ["Ardo", "Bel"]),
    # one-way mention decides before anything else (Bel mentions Ardo: Bel first)
    ({"Ardo": "Ardo was born in 1870.", "Bel": "Bel knows Ardo (film)."}, "When?", "1870", ["Bel", "Ardo"]),
])
def test_bridge_order_rules(texts, question, answer, want):
    assert order_paragraphs(question, answer, "bridge", ["Ardo", "Bel"], texts) == want


def test_join_sentences_handles_both_spacing_styles():
    assert join_sentences(["One.", " Two.", "Three."]) == "One. Two. Three."
    assert join_sentences(["  A  b. ", "", "C."]) == "A b. C."


# -- 2WikiMultiHopQA ------------------------------------------------------------------------------

def test_2wiki_hops_follow_the_evidence_triples(tmp_path):
    info = convert("2wiki", TWOWIKI, tmp_path, progress=False)
    assert info["counts"] == {"train": 2, "eval": 2, "corpus": 6} and not info["skipped"]
    corpus, samples, items = _read_back(tmp_path)
    ids = _by_title(corpus)
    assert corpus[ids["Edda Moren"]].text == "Edda Moren (born 1920) was a film director. Her mother was Runa Moren."
    compositional, bridge_comparison = items
    assert compositional.gold_docs == ((ids["Glass Harbor"],), (ids["Edda Moren"],))
    assert bridge_comparison.gold_docs == tuple((ids[t],) for t in ("Glass Harbor", "Tall Pines (film)",
                                                                   "Edda Moren", "Ossi Vahl"))
    assert samples[1].messages[1].content.count(TOK.query) == 4 and len(samples[1].retrievals) == 4
    assert set(samples[1].retrievals[0].negatives) == {ids["Sel River"]}


# -- Self-RAG -------------------------------------------------------------------------------------

def test_selfrag_eval_and_training_records(tmp_path):
    info = convert("selfrag", SELFRAG, tmp_path, progress=False)
    assert info["counts"] == {"eval": 3, "train": 5, "corpus": 5}
    assert info["skipped"] == {"no passage holds the answer (no training sample)": 1}
    corpus, samples, items = _read_back(tmp_path)
    text_id = {d.text: d.id for d in corpus.docs}
    popqa, trivia, no_gold = items
    assert popqa.id == "4222" and popqa.answers == ("painter", "artist")
    assert popqa.gold_docs == ((text_id["Orla Venn is a painter from Caldris."],),)  # hasanswer, deduplicated
    assert trivia.id == "selfrag-1" and trivia.gold_docs == ((text_id["Caldris is a harbour town."],),)  # computed
    assert no_gold.answers == ("Ilsa Brandt", "I. Brandt") and no_gold.gold_docs == ()  # possible_answers parsed
    by_id = {s.id: s for s in samples}
    assert by_id["4222"].retrievals[0].negatives == (text_id["Orla Venn lives in Caldris."],)
    assert by_id["t1"].messages[1].content == ("[RQ]<paragraph>Velmora Press is a publisher founded in 1901."
                                               "</paragraph>It was founded in 1901.")
    assert by_id["t2"].messages[1].content == "Hello there." and by_id["t2"].retrievals == ()
    assert by_id["t3"].messages[0].content == "Summarise this text.\n\nTarn is a city."
    assert by_id["t3"].messages[1].content == "Tarn is a city." and by_id["t3"].retrievals == ()  # [Irrelevant]
    assert "Unrelated words." not in text_id


# -- AIDA -----------------------------------------------------------------------------------------

MENTIONS = {"1 EU": ["EU", "German", "BRUSSELS"], "947testa CRICKET": ["Björn Borg", "West Indies", "Germany"],
            "1163testb SOCCER": ["Leeds", "São Paulo"]}


def test_aida_tsv_spans_slice_the_mentions(tmp_path):
    info = convert("aida", AIDA_TSV, tmp_path, entities=DATA / "entity_descriptions.jsonl", progress=False)
    assert info["counts"] == {"train": 1, "dev": 1, "eval": 1, "corpus": 7}
    assert info["skipped"] == {"mentions without an entity (--NME--)": 1}
    corpus = read_corpus(tmp_path / "corpus.jsonl")
    items = {i.id: i for f in ("train", "dev", "eval") for i in read_el_items(tmp_path / f"{f}.jsonl", corpus)}
    assert {f: [r["id"] for r in _rows(tmp_path / f"{f}.jsonl")] for f in ("train", "dev", "eval")} == {
        "train": ["1 EU"], "dev": ["947testa CRICKET"], "eval": ["1163testb SOCCER"]}
    for doc, mentions in MENTIONS.items():
        assert [items[doc].text[e.start:e.end] for e in items[doc].entities] == mentions
    assert items["1 EU"].text == "EU rejects German call .\nPeter Blackburn\nBRUSSELS 1996-08-22"
    assert [e.id for e in items["947testa CRICKET"].entities] == ["Björn_Borg", "West_Indies_cricket_team", "Germany"]
    assert [e.id for e in items["1163testb SOCCER"].entities] == ["Leeds_United_A.F.C.", "São_Paulo"]
    assert corpus["Germany"].text == "Germany is a country in Central Europe."  # KILT-style description
    assert corpus["Brussels"].text == "Brussels is the capital of Belgium."
    assert corpus["São_Paulo"].title == corpus["São_Paulo"].text == "São Paulo"  # no description: the title


def test_aida_sentence_units(tmp_path):
    convert("aida", AIDA_TSV, tmp_path, unit="sentence", progress=False)
    corpus = read_corpus(tmp_path / "corpus.jsonl")
    items = read_el_items(tmp_path / "train.jsonl", corpus)
    assert [i.id for i in items] == ["1 EU#0", "1 EU#1", "1 EU#2"]
    assert [[i.text[e.start:e.end] for e in i.entities] for i in items] == [["EU", "German"], [], ["BRUSSELS"]]


def test_el_jsonl_offsets_and_urls(tmp_path):
    info = convert("aida", EL_JSONL, tmp_path, split="eval", progress=False)
    assert info["counts"] == {"eval": 2, "corpus": 3}
    corpus = read_corpus(tmp_path / "corpus.jsonl")
    x1, x2 = read_el_items(tmp_path / "eval.jsonl", corpus)
    assert [(x1.text[e.start:e.end], e.id) for e in x1.entities] == [("Orla Venn", "Orla_Venn"),
                                                                     ("Ilsa Brandt", "Ilsa_Brandt")]
    assert [(x2.text[e.start:e.end], e.id) for e in x2.entities] == [("Sel", "Sel_(river)")]


# -- errors and the CLI ---------------------------------------------------------------------------

def _hotpot_with(tmp_path: Path, **change: Any) -> Path:
    rows = json.loads(HOTPOT.read_text())
    rows[1].update(change)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(rows))
    return path


@pytest.mark.parametrize("source,make,needle", [
    ("hotpotqa", lambda p: _hotpot_with(p, question=None), "bad.json[1] field 'question': missing"),
    ("hotpotqa", lambda p: _hotpot_with(p, context=[["Tarn", "x", "y"]]), "bad.json[1] field 'context[0]'"),
    ("hotpotqa", lambda p: _hotpot_with(p, supporting_facts=[["Tarn", "0"]]),
     "bad.json[1] field 'supporting_facts[0]': expected [title, sentence index]"),
    ("hotpotqa", lambda p: _hotpot_with(p, _id="hp-bridge"), "duplicate id 'hp-bridge'"),
    ("2wiki", lambda p: (p / "bad.json").write_text('[{"_id": 1,}]') and p / "bad.json", "malformed JSON"),
    ("selfrag", lambda p: (p / "bad.jsonl").write_text(
        '{"question": "q", "answers": ["a"], "ctxs": []}\n{"question": "q", "ctxs": [{"title": "t"}]}\n')
        and p / "bad.jsonl", "bad.jsonl:2 field 'ctxs[0]'"),
    ("aida", lambda p: (p / "bad.tsv").write_text("-DOCSTART- (1 X)\nfoo\nBar\tI\tBar\tBar\n") and p / "bad.tsv",
     "bad.tsv:3 field 'column 2': 'I' token without a 'B'"),
    ("aida", lambda p: (p / "bad.jsonl").write_text('{"text": "abc", "entities": [{"start": 1, "end": 9, "id": "A"}]}\n')
        and p / "bad.jsonl", "bad.jsonl:1 field 'entities[0]': span"),
])
def test_cli_malformed_input_one_line_exit_2_nothing_written(tmp_path, capsys, source, make, needle):
    path = make(tmp_path)
    out = tmp_path / "out"
    assert main(["data", "convert", "--from", source, str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("onegen data: error:") and needle in err, err
    assert not out.exists()


def test_cli_unit_that_does_not_apply(tmp_path, capsys):
    assert main(["data", "convert", "--from", "aida", str(AIDA_TSV), "--unit", "paragraph", "--out",
                 str(tmp_path)]) == 2
    assert "--unit paragraph does not apply to --from aida" in capsys.readouterr().err


def test_cli_converts_then_show_renders_and_training_runs(tmp_path, capsys):
    out = tmp_path / "hotpot"
    assert main(["data", "convert", "--from", "hotpotqa", str(HOTPOT), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "train 2, eval 2, corpus 7" in printed and "skipped 1: no answer or supporting facts" in printed
    assert main(["data", "show", str(out / "train.jsonl"), "-n", "2", "--color", "never"]) == 0
    shown = capsys.readouterr().out
    assert shown.count("«GEN+RET|[RQ]»") == 4 and "«GEN|1870" in shown and "«GEN|Tarn Weekly" in shown
    cfg = {"model": {"scratch": SCRATCH}, "tokenizer": {"train": {"vocab_size": 400}},
           "data": {"train": str(out / "train.jsonl"), "corpus": str(out / "corpus.jsonl"), "max_length": 128},
           "loss": {"negatives": 2},
           "train": {"max_steps": 2, "batch_size": 2, "lr": 1e-3, "progress": False, "precision": "no"},
           "output_dir": str(tmp_path / "run")}
    run_dir = train(TrainConfig.from_dict(cfg))
    assert (run_dir / "model" / "onegen.json").is_file()


def test_bad_arguments_raise():
    with pytest.raises(OneGenError, match="unknown source"):
        convert("squad", HOTPOT, "unused")
    with pytest.raises(OneGenError, match="--entities only applies"):
        convert("hotpotqa", HOTPOT, "unused", entities="x.jsonl")
    for source in ("hotpotqa", "2wiki", "selfrag", "aida"):
        for path in (DATA / "missing.json", DATA):  # no file there; a folder
            with pytest.raises(OneGenError, match="file not found"):
                convert(source, path, "unused")


def test_selfrag_reflection_tokens_between_words_leave_a_space():
    from onegen.convert.selfrag import _strip_reflection

    text = "[Relevant]The tower is in Paris.[Fully supported][Continue to Use Evidence]It was built.[Utility:5]"
    assert _strip_reflection(text) == "The tower is in Paris. It was built."
    assert _strip_reflection("a [No Retrieval]b") == "a b"  # a space already there: not doubled


def test_selfrag_dropped_paragraph_between_sentences_leaves_a_space(tmp_path):
    out = "It was built for the Fair.[Retrieval]<paragraph>Some text.</paragraph>[Irrelevant]It is 330 metres tall."
    path = tmp_path / "sr.jsonl"
    kept = "[Retrieval]<paragraph>The tower is in Paris.</paragraph>[Relevant]Paris.[Fully supported]"
    path.write_text(json.dumps({"id": "x", "instruction": "Tell me about the tower.", "output": out}) + "\n"
                    + json.dumps({"id": "y", "instruction": "Where is the tower?", "output": kept}) + "\n")
    convert("selfrag", path, tmp_path / "out", progress=False)
    rows = [json.loads(line) for line in (tmp_path / "out" / "train.jsonl").read_text().splitlines()]
    assert rows[0]["messages"][1]["content"] == "It was built for the Fair. It is 330 metres tall."
    assert "retrievals" not in rows[0]
    assert rows[1]["messages"][1]["content"] == "[RQ]<paragraph>The tower is in Paris.</paragraph>Paris."
