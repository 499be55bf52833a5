"""Tasks: prompt building and answer/link extraction for QA (single- and multi-hop) and entity linking.

Entity linking: the user turn holds the input text; the assistant writes it back with each mention
marked as `[[mention]]` followed by a query token, whose retrieved document id is the link (nothing
is inserted). `el_to_sample` makes the training conversation; `extract_entities` maps the generated
text back to character offsets of the input.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

from .config import TokensConfig
from .data import ELItem, Message, QAItem, Retrieval, Sample

MENTION_OPEN, MENTION_CLOSE = "[[", "]]"
EL_INSTRUCTION = "Link the entities: "


def el_prompt(text: str) -> list[Message]:
    return [Message("user", EL_INSTRUCTION + text)]


def el_to_sample(item: ELItem, tokens: TokensConfig, hard_negatives: dict[str, list[str]] | None = None) -> Sample:
    """The training conversation of an EL item: mentions marked and followed by a query token."""
    parts, pos, retrievals = [], 0, []
    for e in item.entities:
        parts.append(item.text[pos:e.start])
        parts.append(f"{MENTION_OPEN}{item.text[e.start:e.end]}{MENTION_CLOSE}{tokens.query}")
        negs = tuple((hard_negatives or {}).get(e.id, ()))
        retrievals.append(Retrieval((e.id,), negs))
        pos = e.end
    parts.append(item.text[pos:])
    messages = (*el_prompt(item.text), Message("assistant", "".join(parts)))
    return Sample(item.id, messages, tuple(retrievals), item.source)


@dataclass(frozen=True)
class Mention:
    start: int
    end: int
    retrieval: int  # index of the retrieval event that linked it


def extract_entities(input_text: str, output: str, tokens: TokensConfig, unk: str | None = None) -> list[Mention]:
    """Map marked mentions in the generated `output` back to character offsets of `input_text`.

    The k-th query token of the output is the k-th retrieval event; it links a mention when the text
    just before it (since the previous query token) ends with `[[m]]`. The output is the input written
    back with markup, so a mention is looked for where the copy puts it: both texts are folded (case,
    accents, whitespace: tokenizers that lowercase or split punctuation decode "Jean-Luc" as
    "jean - luc") and the occurrence of `m` nearest that place, after the previous mention, wins; a
    repeated name links the right occurrence. `unk` (the tokenizer's unknown-token string) in a mention
    stands for whatever the input has there (an emoji a WordPiece vocabulary lacks). Mentions not
    found in the input are skipped.
    """
    folded_input, origin = _fold(input_text)
    if unk:  # one placeholder character: an unknown token's own brackets ([UNK]) must not read as markup
        output = output.replace(unk, _UNK)
    mentions, cursor, segment_start = [], 0, 0
    copied, copied_to = 0, 0  # folded characters of the copy before `copied_to` in the output
    for k, q in enumerate(re.finditer(re.escape(tokens.query), output)):
        marked = _MARKED_AT_END.search(output, segment_start, q.start())
        segment_start = q.end()
        if marked is None:
            continue
        surface, _ = _fold(marked.group(1))
        copied += len(_fold(_unmarked(output[copied_to: marked.start()], tokens))[0])  # counted once, not per mention
        copied_to, expected = marked.start(), copied
        core = surface.strip(_UNK) if unk else surface  # an unknown token at an edge anchors nothing
        found = _nearest(folded_input, _pattern(core, _UNK if unk else ""), expected, cursor)
        if found is None:
            continue
        at, cursor = found
        start, end = origin[at], origin[cursor - 1] + 1
        while end < len(input_text) and unicodedata.combining(input_text[end]):  # accents written apart (NFD)
            end += 1
        # ... and the rest of the word where an unknown token stood at an edge ("Hatadeck😀")
        while core != surface and surface.startswith(_UNK) and start > 0 and not input_text[start - 1].isspace():
            start -= 1
        while core != surface and surface.endswith(_UNK) and end < len(input_text) and not input_text[end].isspace():
            end += 1
        mentions.append(Mention(start, end, k))
    return mentions


def _spaced(marker: str) -> str:
    """A regex for `marker` that also matches it with spaces between its characters: WordPiece
    tokenizers (BERT's) decode `[[` as `[ [`."""
    return r"\s*".join(re.escape(c) for c in marker)


_OPEN_RE, _CLOSE_RE = _spaced(MENTION_OPEN), _spaced(MENTION_CLOSE)
_UNK = "\ue003"  # stands for the tokenizer's unknown token inside generated text
# `[[m]]` right at the end of a span of text; m holds no marker (an unclosed `[[` cannot swallow the
# next mention).
_MARKED_AT_END = re.compile(_OPEN_RE + r"((?:(?!" + _OPEN_RE + "|" + _CLOSE_RE + r").)+)" + _CLOSE_RE + r"\s*$",
                            re.DOTALL)


def _unmarked(text: str, tokens: TokensConfig) -> str:
    """`text` without mention markers and onegen's token strings: what the copy of the input says."""
    for t in tokens.strings():
        text = text.replace(t, "")
    return re.sub(_OPEN_RE + "|" + _CLOSE_RE, "", text)


def _fold(text: str) -> tuple[str, list[int]]:
    """`text` folded for matching (accents and whitespace dropped, lower case), and the index in
    `text` of the character each folded character comes from."""
    folded, origin = [], []
    for i, ch in enumerate(text):
        for c in unicodedata.normalize("NFKD", ch):
            for f in c.lower():
                if not (unicodedata.combining(f) or f.isspace()):
                    folded.append(f)
                    origin.append(i)
    return "".join(folded), origin


def _pattern(surface: str, unk: str) -> re.Pattern | None:
    """A regex for a folded mention, each unknown token inside it matching 1 to 16 characters; None for
    a mention with nothing to anchor it."""
    parts = surface.split(unk) if unk else [surface]
    if not any(parts):
        return None
    return re.compile(".{1,16}?".join(re.escape(p) for p in parts), re.DOTALL)


def _nearest(text: str, pattern: re.Pattern | None, expected: int, start: int) -> tuple[int, int] | None:
    """(start, end) of the match of `pattern` in `text` at or after `start` nearest `expected`."""
    best = None
    for m in pattern.finditer(text, start) if pattern is not None else ():
        if best is None or abs(m.start() - expected) < abs(best[0] - expected):
            best = (m.start(), m.end())
        if m.start() > expected:
            break
    return best


def qa_prompt(item: QAItem) -> list[Message]:
    return list(item.messages)


def extract_answer(output: str, tokens: TokensConfig, end_marks: tuple[str, ...] = ()) -> str:
    """The answer: generated text after the last paragraph, cut at the first of `end_marks` (the
    tokenizer's other special tokens: chat markup after a turn that did not stop), without onegen's
    token strings and with whitespace collapsed."""
    tail = output.rsplit(tokens.close, 1)[-1]
    cuts = [i for i in (tail.find(mark) for mark in end_marks if mark) if i >= 0]
    if cuts:
        tail = tail[: min(cuts)]
    for t in tokens.strings():
        tail = tail.replace(t, " ")
    return " ".join(tail.split())
