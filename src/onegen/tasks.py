"""Tasks: prompt building and answer/link extraction for QA (single- and multi-hop) and entity linking.

Entity linking: the user turn holds the input text; the assistant writes it back with each mention
marked as `[[mention]]` followed by a query token, whose retrieved document id is the link (nothing
is inserted). `el_to_sample` makes the training conversation; `extract_entities` maps the generated
text back to character offsets of the input.
"""

from __future__ import annotations

import re
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


def extract_entities(input_text: str, output: str, tokens: TokensConfig) -> list[Mention]:
    """Map marked mentions in the generated `output` back to character offsets of `input_text`.

    Each `[[m]]` followed by a query token is located in the input (in order, after the previous
    mention); the k-th such mention belongs to the k-th retrieval event. Mentions that cannot be found
    in the input are skipped (their retrieval index is still consumed).
    """
    pattern = re.compile(_spaced(MENTION_OPEN) + r"(.+?)" + _spaced(MENTION_CLOSE) + r"\s*" + re.escape(tokens.query))
    mentions, cursor = [], 0
    for k, m in enumerate(pattern.finditer(output)):
        surface = m.group(1).strip()
        found = _find(input_text, surface, cursor)
        if found is None:
            continue
        start, end = found
        mentions.append(Mention(start, end, k))
        cursor = end
    return mentions


def _spaced(marker: str) -> str:
    """A regex for `marker` that also matches it with spaces between its characters: WordPiece
    tokenizers (BERT's) decode `[[` as `[ [`."""
    return r"\s*".join(re.escape(c) for c in marker)


def _find(text: str, surface: str, start: int) -> tuple[int, int] | None:
    i = text.find(surface, start)
    if i < 0:
        i = text.lower().find(surface.lower(), start)  # tokenizers that lowercase
    if i < 0:
        return None
    return i, i + len(surface)


def qa_prompt(item: QAItem) -> list[Message]:
    return list(item.messages)


def extract_answer(output: str, tokens: TokensConfig) -> str:
    """The answer: generated text after the last paragraph, without special tokens."""
    tail = output.rsplit(tokens.close, 1)[-1]
    for t in tokens.strings():
        tail = tail.replace(t, " ")
    return " ".join(tail.split())
