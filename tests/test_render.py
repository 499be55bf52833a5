"""Tests of onegen.render: golden role visualisations, label/RET invariants, truncation, chat templates."""

from __future__ import annotations

import copy

import pytest
from conftest import CONTRACT_DOC, CONTRACT_SAMPLE, contract_sample, write_jsonl
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from onegen.config import TokensConfig
from onegen.data import Corpus, Document, Message, Retrieval, Sample, read_samples
from onegen.errors import OneGenError
from onegen.render import Renderer, TruncationError, show
from onegen.tokens import CTX, GEN, IGNORE_INDEX, RET

DOC = CONTRACT_DOC["text"]

GOLDEN_BUILTIN = (
    "«CTX|<s>User: Who founded Velmora?\nAssistant:\n»"
    "«GEN+RET|[RQ]»"
    "«CTX|<paragraph>Velmora was founded by Ilsa Brandt in 1901.</paragraph>»"
    "«GEN|Ilsa Brandt</s>»"
    "«CTX|\n»"
)

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}</s>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
GOLDEN_CHAT = (
    "«CTX|<|user|>Who founded Velmora?</s>\n<|assistant|>»"
    "«GEN+RET|[RQ]»"
    "«CTX|<paragraph>Velmora was founded by Ilsa Brandt in 1901.</paragraph>»"
    "«GEN|Ilsa Brandt</s>»"
    "«CTX|\n»"
)


@pytest.fixture(scope="module")
def renderer(tiny_tokenizer, tokens) -> Renderer:
    return Renderer(tiny_tokenizer, tokens, max_length=512)


@pytest.fixture(scope="module")
def chat_renderer(tiny_tokenizer, tokens) -> Renderer:
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = CHAT_TEMPLATE
    return Renderer(tok, tokens, max_length=512)


def _find(seq: list[int], sub: list[int]) -> int:
    for i in range(len(seq) - len(sub) + 1):
        if seq[i:i + len(sub)] == sub:
            return i
    return -1


def _check_invariants(r, renderer: Renderer) -> None:
    """Labels only on GEN/RET tokens and equal to the input there; RET tokens are query tokens."""
    assert len(r.input_ids) == len(r.lm_labels) == len(r.roles)
    for t, (tid, label, role) in enumerate(zip(r.input_ids, r.lm_labels, r.roles, strict=True)):
        if label != IGNORE_INDEX:
            assert role in (GEN, RET) and label == tid, t
    assert r.ret_positions == [t for t, role in enumerate(r.roles) if role == RET]
    assert all(r.input_ids[p] == renderer.ids.query for p in r.ret_positions)
    assert len(r.ret_positions) == len(r.retrievals)


# -- golden visualisations -----------------------------------------------------------------------

def test_golden_builtin_template(renderer, tiny_tokenizer):
    r = renderer.render(contract_sample())
    assert show(r, tiny_tokenizer) == GOLDEN_BUILTIN
    _check_invariants(r, renderer)


def test_golden_chat_template(chat_renderer):
    assert chat_renderer.use_chat_template
    r = chat_renderer.render(contract_sample())
    assert show(r, chat_renderer.tokenizer) == GOLDEN_CHAT
    _check_invariants(r, chat_renderer)
    prompt = chat_renderer.encode_prompt([Message("user", "Who founded Velmora?")])
    assert r.input_ids[: len(prompt)] == prompt


@pytest.mark.parametrize("answer", ["a", "s", "user", "</s>"])
def test_chat_template_answer_that_occurs_in_the_markup(chat_renderer, answer):
    s = Sample("x", (Message("user", "hi"), Message("assistant", answer)))
    text = show(chat_renderer.render(s), chat_renderer.tokenizer)
    assert text.startswith("«CTX|<|user|>hi</s>\n<|assistant|>»«GEN|")  # not matched inside "<|assistant|>"
    assert text.endswith(f"{answer}</s>»«CTX|\n»")


def test_color_visualisation_marks_roles(renderer, tiny_tokenizer):
    text = show(renderer.render(contract_sample()), tiny_tokenizer, color=True)
    assert "[bold magenta reverse][RQ][/]" in text and "[bold green]Ilsa Brandt</s>[/]" in text


def test_labels_only_on_gen(renderer):
    r = renderer.render(contract_sample())
    gen = [t for t, role in enumerate(r.roles) if role == GEN]
    trained = [t for t, label in enumerate(r.lm_labels) if label != IGNORE_INDEX]
    assert trained == sorted([*gen, *r.ret_positions])  # [RQ] itself is generated (trained)
    answer = renderer.encode_chunk("Ilsa Brandt") + [renderer.ids.eos]
    assert [r.input_ids[t] for t in gen] == answer


def test_query_logits_not_trained_when_paragraph_follows(renderer):
    r = renderer.render(contract_sample())
    (p,) = r.ret_positions
    assert r.input_ids[p + 1] == renderer.ids.open
    assert r.lm_labels[p + 1] == IGNORE_INDEX  # the logits AT [RQ] predict <paragraph>: not trained
    assert r.lm_labels[p] == renderer.ids.query  # the logits before [RQ] learn to emit it


def test_link_mode_trains_token_after_query(renderer):
    s = Sample("e", (Message("user", "Link: Orla Venn spoke."),
                     Message("assistant", "[[Orla Venn]][RQ] spoke.")), (Retrieval(("d1",)),))
    r = renderer.render(s)
    (p,) = r.ret_positions
    assert r.roles[p + 1] == GEN and r.lm_labels[p + 1] == r.input_ids[p + 1]
    _check_invariants(r, renderer)
    off = Renderer(renderer.tokenizer, renderer.tokens, train_after_link=False).render(s)
    assert off.lm_labels[p + 1] == IGNORE_INDEX


def test_paragraph_ids_appear_verbatim(renderer):
    r = renderer.render(contract_sample())
    para = renderer.encode_paragraph(DOC)
    assert para[0] == renderer.ids.open and para[-1] == renderer.ids.close
    assert _find(r.input_ids, para) == r.ret_positions[0] + 1  # what training saw = what the engine inserts


def test_paragraph_ids_verbatim_for_every_world_sample(renderer, samples, corpus):
    for s in samples:
        r = renderer.render(s)
        for p, ret in zip(r.ret_positions, s.retrievals, strict=True):
            para = renderer.encode_paragraph(corpus[ret.positives[0]].text)
            assert r.input_ids[p + 1:p + 1 + len(para)] == para, s.id


def test_prompt_is_prefix_of_rendered_ids(renderer):
    r = renderer.render(contract_sample())
    prompt = renderer.encode_prompt([Message("user", "Who founded Velmora?")])
    assert r.input_ids[: len(prompt)] == prompt
    assert r.input_ids[len(prompt)] == renderer.ids.query


def test_document_encoding_ends_with_doc_token(renderer):
    ids = renderer.encode_document(DOC)
    assert ids[-1] == renderer.ids.doc
    long = renderer.encode_document(" ".join([DOC] * 100))
    assert len(long) == renderer.doc_max_length and long[-1] == renderer.ids.doc


def test_multi_turn_roles(renderer):
    s = Sample("m", (Message("system", "Be brief."), Message("user", "Who?"),
                     Message("assistant", "[RQ]<paragraph>A doc.</paragraph>Ilsa"),
                     Message("user", "And then?"), Message("assistant", "Done")), (Retrieval(("d1",)),))
    r = renderer.render(s)
    _check_invariants(r, renderer)
    text = show(r, renderer.tokenizer)
    assert "«GEN|Ilsa</s>»" in text and "«GEN|Done</s>»" in text
    assert "«CTX|\nUser: And then?\nAssistant:\n»" in text


def test_query_token_inside_paragraph_is_rejected(renderer):
    s = Sample("x", (Message("user", "q"), Message("assistant", "<paragraph>a [RQ] b</paragraph>ok")),
               (Retrieval(("d1",)),), "train.jsonl:7")
    with pytest.raises(OneGenError) as e:
        renderer.render(s)
    assert "train.jsonl:7" in str(e.value)


# -- truncation ----------------------------------------------------------------------------------

TWO_HOPS = {"id": "t2", "messages": [
    {"role": "user", "content": "Who founded the town where Ilsa Brandt was born?"},
    {"role": "assistant", "content": f"[RQ]<paragraph>{DOC} {DOC} {DOC}</paragraph>Velmora"
                                     f"[RQ]<paragraph>{DOC}</paragraph>Ilsa Brandt"}],
            "retrievals": [{"positives": ["d17"]}, {"positives": ["d17"]}]}


@pytest.fixture
def two_hop_sample(tmp_path):
    corpus = Corpus([Document(i, DOC) for i in ("d17", "d3", "d9")])
    path = write_jsonl(tmp_path / "train.jsonl", [CONTRACT_SAMPLE, TWO_HOPS])
    return read_samples(path, "[RQ]", corpus)[1], path


def _cut(renderer: Renderer, policy: str, max_length: int) -> Renderer:
    return Renderer(renderer.tokenizer, renderer.tokens, max_length=max_length, on_truncation=policy)


def _second_query_cut_length(renderer: Renderer, sample: Sample) -> int:
    full = renderer.render(sample)
    assert len(full.ret_positions) == 2
    return full.ret_positions[1] - 2  # keeps the first query token, cuts the second


@pytest.mark.parametrize("policy", ["shorten", "drop", "error"])
def test_truncation_without_cutting_a_query_shortens(renderer, two_hop_sample, policy):
    sample, _ = two_hop_sample
    full = renderer.render(sample)
    n = len(full) - 3
    r = _cut(renderer, policy, n).render(sample)
    assert len(r) == n and r.input_ids == full.input_ids[:n] and len(r.retrievals) == 2


def test_truncation_shorten_drops_cut_retrievals(renderer, two_hop_sample):
    sample, _ = two_hop_sample
    n = _second_query_cut_length(renderer, sample)
    cut = _cut(renderer, "shorten", n)
    r = cut.render(sample)
    assert len(r) == n and r.retrievals == sample.retrievals[:1]
    assert cut.shortened == 1 and cut.dropped == 0
    _check_invariants(r, cut)


def test_truncation_drop(renderer, two_hop_sample):
    sample, _ = two_hop_sample
    cut = _cut(renderer, "drop", _second_query_cut_length(renderer, sample))
    assert cut.render(sample) is None
    assert cut.dropped == 1


def test_truncation_error_names_file_and_line(renderer, two_hop_sample):
    sample, path = two_hop_sample
    with pytest.raises(TruncationError) as e:
        _cut(renderer, "error", _second_query_cut_length(renderer, sample)).render(sample)
    assert f"{path}:2" in str(e.value) and "data.max_length" in str(e.value)
    assert "\n" not in str(e.value)


# -- fuzz ----------------------------------------------------------------------------------------

_CHARS = list("abcxyz ABC.,?!'\n\t0123456789éß漢字😀-_<>[]|/")
_TEXT = st.lists(st.one_of(st.sampled_from(_CHARS), st.sampled_from(["</s>", "<s>", "[RD]", "<pad>"])),
                 max_size=30).map("".join)  # never our query or paragraph strings
_USER_TEXT = st.lists(st.one_of(_TEXT, st.sampled_from(["[RQ]", "<paragraph>x</paragraph>"])),
                      max_size=3).map("".join)  # query tokens outside assistant turns do not count


@st.composite
def _samples(draw) -> tuple[Sample, int]:
    """A random conversation: assistant turns of text, insertions ([RQ] + paragraph) and links."""
    messages, n_queries = [], 0
    if draw(st.booleans()):
        messages.append(Message("system", draw(_USER_TEXT)))
    for _ in range(draw(st.integers(1, 3))):
        messages.append(Message("user", draw(_USER_TEXT)))
        parts = []
        for kind in draw(st.lists(st.sampled_from(["text", "insert", "link"]), max_size=4)):
            if kind == "text":
                parts.append(draw(_TEXT))
            else:
                n_queries += 1
                parts.append("[RQ]" + (f"<paragraph>{draw(_TEXT)}</paragraph>" if kind == "insert" else ""))
        messages.append(Message("assistant", "".join(parts)))
    retrievals = tuple(Retrieval((f"d{k}",)) for k in range(n_queries))
    return Sample("fuzz", tuple(messages), retrievals, "fuzz.jsonl:1"), draw(st.integers(8, 200))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=_samples(), chat=st.booleans())
def test_fuzz_render(renderer, chat_renderer, case, chat):
    sample, max_length = case
    base = chat_renderer if chat else renderer
    r = _cut(base, "shorten", max_length).render(sample)
    assert r is not None and len(r) <= max_length
    _check_invariants(r, base)
    assert r.retrievals == sample.retrievals[: len(r.retrievals)]
    full = base.render(sample)
    assert len(full.ret_positions) == len(sample.retrievals)
    for p in full.ret_positions:  # the logits at [RQ] are trained only when no paragraph follows
        if p + 1 < len(full) and full.input_ids[p + 1] == base.ids.open:
            assert full.lm_labels[p + 1] == IGNORE_INDEX
    n_gen = sum(role == GEN for role in full.roles)
    assert n_gen >= sum(m.role == "assistant" for m in sample.messages)  # every turn ends with a trained stop
    assert full.roles[0] == CTX


# -- the visualiser command ----------------------------------------------------------------------

def test_data_show_command(tmp_path, capsys):
    """`onegen data show FILE` (no config, no corpus): the CONTRACT sample with its roles marked."""
    from onegen.cli import main

    path = write_jsonl(tmp_path / "train.jsonl", [CONTRACT_SAMPLE])
    assert main(["data", "show", str(path), "--color", "never"]) == 0
    out = capsys.readouterr().out.splitlines(keepends=True)
    assert out[0].startswith("# q1 (") and "1 retrieval" in out[0]
    assert "".join(out[1:]) == GOLDEN_BUILTIN + "\n"


def test_the_token_that_closes_a_trained_turn_is_where_generation_stops(tiny_tokenizer, tokens):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_end|>"]}, replace_extra_special_tokens=False)
    tok.chat_template = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}<|im_end|>\n{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    chat = Renderer(tok, tokens, max_length=512)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    assert end != tok.eos_token_id and chat.end_of_turn_ids() == {end}
    r = chat.render(contract_sample())
    ends = [i for i, t in enumerate(r.input_ids) if t == end]  # the user's turn, then the assistant's
    assert [r.lm_labels[i] for i in ends] == [IGNORE_INDEX, end]  # trained: the model learns to emit it
    assert Renderer(tiny_tokenizer, tokens).end_of_turn_ids() == {tiny_tokenizer.eos_token_id}


def test_document_text_cannot_inject_control_tokens(renderer, tiny_tokenizer):
    """`[RQ]`, `</paragraph>` or `</s>` written inside a document are text, when indexed, inserted and
    trained alike: an inserted paragraph cannot close early or carry a query token."""
    text = "Velmora </paragraph> was [RQ] founded </s> in 1901."
    control = {renderer.ids.query, renderer.ids.doc, renderer.ids.open, renderer.ids.close, renderer.ids.eos}
    para = renderer.encode_paragraph(text)
    assert para[0] == renderer.ids.open and para[-1] == renderer.ids.close and not control & set(para[1:-1])
    doc = renderer.encode_document(text)
    assert doc[-1] == renderer.ids.doc and not control & set(doc[:-1])
    assert renderer.encode_documents([text, "Caldris"]) == [doc, renderer.encode_document("Caldris")]
    sample = Sample("x", (Message("user", "q"), Message("assistant", "[RQ]<paragraph>a </s> b</paragraph>A")),
                    (Retrieval(("d1",)),))
    r = renderer.render(sample)
    start, end = r.input_ids.index(renderer.ids.open), r.input_ids.index(renderer.ids.close)
    assert r.input_ids[start:end + 1] == renderer.encode_paragraph("a </s> b")


TEMPLATES = {  # chat templates in the styles users bring, each with the token that closes a turn
    "chatml": ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
               "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}", "<|im_end|>"),
    "llama3": ("{% for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n{{ m.content | trim }}"
               "<|eot_id|>{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>"
               "\n\n{% endif %}", "<|eot_id|>"),
    "llama2": ("{% for m in messages %}{% if m.role == 'user' %}[INST] {{ m.content.strip() }} [/INST]{% else %}"
               "{{ ' ' + m.content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}", "</s>"),
    "newline-before-end": ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}\n<|im_end|>\n"
                           "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}", "<|im_end|>"),
    "space-after-prompt": ("{% for m in messages %}{% if m.role == 'user' %}User: {{ m.content }}\n{% else %}"
                           "Assistant: {{ m.content }}{{ eos_token }}\n{% endif %}{% endfor %}"
                           "{% if add_generation_prompt %}Assistant: {% endif %}", "</s>"),
}


def _templated(tiny_tokenizer, template: str) -> Renderer:
    """The tiny tokenizer with a template, its markup added as special tokens the way Llama-3 ships
    them: marked special, in no named slot."""
    from tokenizers import AddedToken

    tok = copy.deepcopy(tiny_tokenizer)
    tok.add_tokens([AddedToken(t, special=True) for t in ("<|im_start|>", "<|im_end|>", "<|start_header_id|>",
                                                          "<|end_header_id|>", "<|eot_id|>")])
    tok.chat_template = template
    return Renderer(tok, TokensConfig(), max_length=512)


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_every_template_trains_its_turn_end_and_prompts_as_it_trained(tiny_tokenizer, name):
    """The token closing the assistant turn (a special token in no named slot; after whitespace) is GEN
    and stops generation; the generation prompt is exactly the start of a trained conversation, markup
    the template writes inside the assistant turn and a trailing space included."""
    template, end = TEMPLATES[name]
    r = _templated(tiny_tokenizer, template)
    end_id = r.tokenizer.convert_tokens_to_ids(end)
    assert r.end_of_turn_ids() == {end_id}
    messages = (Message("user", "Who founded Velmora?"),)
    sample = Sample("x", (*messages, Message("assistant", "[RQ]<paragraph>Velmora was founded by Ilsa Brandt."
                                                         "</paragraph>Ilsa Brandt")), (Retrieval(("d1",)),))
    rendered = r.render(sample)
    prompt = r.encode_prompt(list(messages))
    assert rendered.input_ids[: len(prompt)] == prompt and rendered.input_ids[len(prompt)] == r.ids.query
    plain = r.render(Sample("y", (*messages, Message("assistant", "the founder was Ilsa Brandt."))))
    assert plain.input_ids[: len(prompt)] == prompt  # an answer starting with text: tokenized apart too
    forced = r.encode_prompt(list(messages), assistant_prefix="the founder")  # the answer's start given
    assert plain.input_ids[: len(forced)] == forced
    last = max(i for i, t in enumerate(rendered.input_ids) if t == end_id)
    close = rendered.input_ids.index(r.ids.close)
    assert r.tokenizer.decode(rendered.input_ids[close + 1:last]).strip() == "Ilsa Brandt"
    assert rendered.lm_labels[last] == end_id  # trained: the model learns to stop there
    assert all(label != IGNORE_INDEX for label in rendered.lm_labels[close + 1:last + 1])  # whitespace before too


def test_a_template_that_refuses_a_conversation_names_the_sample(tiny_tokenizer, tmp_path):
    r = _templated(tiny_tokenizer, "{% for m in messages %}{% if m.role == 'system' %}"
                                   "{{ raise_exception('System role not supported') }}{% endif %}{{ m.content }}"
                                   "{% endfor %}")
    sample = Sample("x", (Message("system", "be brief"), Message("user", "hi"), Message("assistant", "A")),
                    source="train.jsonl:7")
    with pytest.raises(OneGenError, match=r"train.jsonl:7 field 'messages'.*System role not supported"):
        r.render(sample)


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_a_multi_turn_prompt_is_the_start_of_its_trained_conversation(tiny_tokenizer, name):
    r = _templated(tiny_tokenizer, TEMPLATES[name][0])
    messages = (Message("user", "Who founded Velmora?"), Message("assistant", "the founder was Ilsa Brandt."),
                Message("user", "And where was she born?"))
    rendered = r.render(Sample("x", (*messages, Message("assistant", "the town of Caldris."))))
    prompt = r.encode_prompt(list(messages))
    assert rendered.input_ids[: len(prompt)] == prompt


def test_a_template_without_a_turn_closer_trains_no_header_of_the_next_turn(tiny_tokenizer):
    r = _templated(tiny_tokenizer, "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}\n{% endfor %}"
                                   "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    assert r.end_of_turn_ids() == set()
    start = r.tokenizer.convert_tokens_to_ids("<|im_start|>")
    rendered = r.render(Sample("x", (Message("user", "q"), Message("assistant", "a"), Message("user", "q2"),
                                     Message("assistant", "b"))))
    assert [label for t, label in zip(rendered.input_ids, rendered.lm_labels, strict=True) if t == start] == \
        [IGNORE_INDEX] * 4


def test_a_token_that_ends_the_answer_with_the_templates_space_is_trained():
    """SentencePiece-style BPE without word splits learns `Brandt▁`: at the end of an answer it takes the
    space a Llama-2 template writes before `</s>`, and it is generated, so trained."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first", split=False)
    raw.decoder = decoders.Metaspace(prepend_scheme="first", split=False)
    raw.train_from_iterator(["[INST] Who founded Velmora? [/INST] Ilsa Brandt </s>"] * 50,
                            trainers.BpeTrainer(vocab_size=200, special_tokens=["</s>", "<s>"]))
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="</s>", bos_token="<s>")
    tok.chat_template = TEMPLATES["llama2"][0]
    r = Renderer(tok, TokensConfig(), max_length=512)
    rendered = r.render(Sample("x", (Message("user", "Who founded Velmora?"), Message("assistant", "Ilsa Brandt"))))
    end = max(i for i, t in enumerate(rendered.input_ids) if t == tok.eos_token_id)
    prompt = r.encode_prompt([Message("user", "Who founded Velmora?")])
    answer = rendered.input_ids[len(prompt):end + 1]
    assert tok.decode(answer).strip().startswith("Ilsa Brandt")
    assert rendered.lm_labels[len(prompt):end + 1] == answer  # every token of the answer and the closer
