"""Tasks: the answer and the entity links read back from generated text."""

from __future__ import annotations

import pytest

from onegen.config import TokensConfig
from onegen.data import ELItem, Entity
from onegen.tasks import el_to_sample, extract_answer, extract_entities

T = TokensConfig()


def _links(text: str, output: str) -> list[tuple[str, int]]:
    return [(text[m.start:m.end] + f"@{m.start}", m.retrieval) for m in extract_entities(text, output, T)]


@pytest.mark.parametrize("text, entities", [
    ("Yesterday Orla Venn spoke in Caldris.", [(10, 19), (29, 36)]),
    ("Paris is in Paris County, near Paris.", [(12, 17), (31, 36)]),  # a repeated name: the marked one
    ("İzmir hosted Orla Venn.", [(13, 22)]),  # lower-casing "İ" gives two characters
    ("Cafe\u0301 Noir hosted Orla Venn.", [(0, 10)]),  # an accent written apart (NFD) belongs to the name
    ("Zoë Ålund met Jean-Luc Picard and O'Brien in 東京.", [(0, 9), (14, 29), (34, 41), (45, 47)]),
])
def test_links_of_a_faithful_copy_are_the_gold_spans(text, entities):
    """The training conversation's own assistant turn, read back, gives the gold spans, in order."""
    item = ELItem("x", text, tuple(Entity(s, e, f"d{i}") for i, (s, e) in enumerate(entities)))
    output = el_to_sample(item, T).messages[-1].content
    assert [(m.start, m.end, m.retrieval) for m in extract_entities(text, output, T)] == \
        [(s, e, k) for k, (s, e) in enumerate(entities)]


def test_links_survive_a_tokenizer_that_lowercases_strips_accents_and_splits_punctuation():
    text = "Zoë Ålund met Jean-Luc Picard and O'Brien in 東京."
    output = "[ [ zoe alund ] ] [RQ] met [ [ jean - luc picard ] ] [RQ] and [ [ o ' brien ] ] [RQ] in [ [ 東 京 ] ] [RQ]."
    assert _links(text, output) == [("Zoë Ålund@0", 0), ("Jean-Luc Picard@14", 1), ("O'Brien@34", 2), ("東京@45", 3)]


def test_each_query_token_is_one_retrieval_even_without_a_mention():
    text = "Yesterday Orla Venn spoke."
    assert _links(text, "Yesterday[RQ] [[Orla Venn]][RQ] spoke.") == [("Orla Venn@10", 1)]


def test_an_unclosed_mark_does_not_swallow_the_next_mention():
    text = "Orla Venn in Caldris."
    assert _links(text, "[[Orla Venn in [[Caldris]][RQ].") == [("Caldris@13", 0)]
    assert _links(text, "[[Orla Venn]] in [[Caldris]][RQ].") == [("Caldris@13", 0)]


def test_a_mention_not_in_the_input_is_skipped_and_spans_stay_inside_the_text():
    text = "İİ Ab"
    links = extract_entities(text, "[[Xy]][RQ] [[ii ab]][RQ]", T)
    assert [(m.start, m.end, m.retrieval) for m in links] == [(0, 5, 1)]


def test_the_answer_stops_at_chat_markup_and_follows_the_last_paragraph():
    out = "[RQ]<paragraph>Velmora was founded by Ilsa Brandt.</paragraph>Ilsa  Brandt<|im_end|>\n<|im_start|>user"
    assert extract_answer(out, T, ("<|im_start|>", "<|im_end|>")) == "Ilsa Brandt"
    assert extract_answer(out, T).startswith("Ilsa Brandt<|im_end|>")  # no marks given: nothing is cut
    assert extract_answer("Ilsa[RQ]<paragraph>x</paragraph> Brandt", T) == "Brandt"


def test_an_unknown_token_inside_a_mention_stands_for_what_the_input_has_there():
    text = "Saltir Hatadeck😀 joined Dérsïa Holdings last spring."
    output = "[ [ saltir hatadeck [UNK] ] ] [RQ] joined [ [ dersia holdings ] ] [RQ] last spring."
    links = [(text[m.start:m.end], m.retrieval) for m in extract_entities(text, output, T, unk="[UNK]")]
    assert links == [("Saltir Hatadeck😀", 0), ("Dérsïa Holdings", 1)]
    assert [m.retrieval for m in extract_entities(text, output, T)] == [1]  # without it: only the second
    assert extract_entities("😀 x", "[[[UNK]]][RQ] x", T, unk="[UNK]") == []  # nothing to anchor it
    wide = "Yesterday Ilsa went home. 🎉 Brandt spoke."  # a leading unknown token does not reach back to the cursor
    assert [(wide[m.start:m.end]) for m in extract_entities(wide, "... [[ [UNK] brandt ]][RQ] spoke.", T,
                                                             unk="[UNK]")] == ["Brandt"]
