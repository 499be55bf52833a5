"""Render: the ONE place where a record becomes token ids, LM labels and retrieval positions.

Guarantees:
- only assistant text outside `<paragraph>…</paragraph>` is GEN (trained); everything else is CTX;
  the query token is generated (GEN) and its hidden state is a retrieval vector (RET);
- the logits at a query token are not trained when a paragraph follows (the engine discards them);
- the end-of-turn token after an assistant message is GEN, so the model learns to stop;
- text is tokenized in chunks split at the special-token strings, and a paragraph's content is one
  chunk: `encode_chunk(doc_text)` is exactly what training saw, so the engine inserts identical ids;
- truncation never leaves a query token without its retrieval entry.
"""

from __future__ import annotations

import bisect
import functools
import logging
import re
from dataclasses import dataclass, field

from .config import TokensConfig
from .data import Message, Retrieval, Sample
from .errors import OneGenError
from .tokens import CTX, GEN, IGNORE_INDEX, RET, special_tokens_of, token_ids

log = logging.getLogger(__name__)

_SENTINEL_RE = re.compile("\ue000(\\d+)\ue001")
BUILTIN_ROLE_PREFIX = {"system": "System: ", "user": "User: ", "assistant": "Assistant:\n"}


@dataclass
class Rendered:
    """A rendered sample. `lm_labels[t]` is `input_ids[t]` where token t is trained, else IGNORE_INDEX."""

    input_ids: list[int]
    lm_labels: list[int]
    roles: list[str]
    ret_positions: list[int] = field(default_factory=list)
    retrievals: tuple[Retrieval, ...] = ()
    sample_id: str = ""

    def __len__(self) -> int:
        return len(self.input_ids)


class TruncationError(OneGenError):
    pass


class Renderer:
    """Turns conversations, prompts and documents into token ids for one tokenizer and token set.

    Args:
        tokenizer: a fast HF tokenizer with the special tokens already added.
        tokens: the special token strings.
        max_length: the longest rendered sample, in tokens.
        on_truncation: `shorten` (cut, dropping retrievals whose query token is cut), `drop` the sample,
            or `error`.
        train_after_link: train the token that follows a query token when no paragraph follows it
            (link mode: the engine uses those logits to go on).
    """

    def __init__(self, tokenizer, tokens: TokensConfig, max_length: int = 1024, on_truncation: str = "shorten",
                 doc_max_length: int = 256, train_after_link: bool = True):
        self.tokenizer = tokenizer
        self.tokens = tokens
        self.ids = token_ids(tokenizer, tokens)
        self.max_length = max_length
        self.on_truncation = on_truncation
        self.doc_max_length = doc_max_length
        self.train_after_link = train_after_link
        specials = sorted(tokens.strings(), key=len, reverse=True)
        self._split_re = re.compile("(" + "|".join(re.escape(s) for s in specials) + ")")
        self._special_ids = set(special_tokens_of(tokenizer))
        self.use_chat_template = bool(getattr(tokenizer, "chat_template", None))
        self.dropped = 0  # samples dropped by truncation
        self.shortened = 0  # samples cut (with their retrievals beyond the cut removed)

    # -- low level ------------------------------------------------------------------------------
    def encode_chunk(self, text: str) -> list[int]:
        """Token ids of a chunk of text with no special-token strings of ours in it."""
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def encode_text(self, texts: list[str]) -> list[list[int]]:
        """Token ids of document texts, in one batched call. Special-token strings in them (`[RQ]`,
        `</paragraph>`, `</s>`, ...) are plain text: a document cannot close its paragraph early or
        carry a query token."""
        if not texts:
            return []
        return self.tokenizer(texts, add_special_tokens=False, split_special_tokens=True, return_attention_mask=False,
                              return_token_type_ids=False)["input_ids"]

    def encode_documents(self, texts: list[str]) -> list[list[int]]:
        """Corpus documents as indexed: each text (cut to `doc_max_length - 1` tokens) then `[RD]`."""
        bos = self._bos()
        keep = self.doc_max_length - 1 - len(bos)
        return [bos + ids[:keep] + [self.ids.doc] for ids in self.encode_text(texts)]

    def encode_document(self, text: str) -> list[int]:
        """A corpus document as indexed (see `encode_documents`)."""
        return self.encode_documents([text])[0]

    def encode_paragraph(self, text: str) -> list[int]:
        """A document as inserted after a query token: `<paragraph>` text `</paragraph>`."""
        return [self.ids.open, *self.encode_text([text])[0][: self.doc_max_length], self.ids.close]

    def _bos(self) -> list[int]:
        bos = self.tokenizer.bos_token_id
        if self.use_chat_template or bos is None or bos == self.ids.eos:
            return []
        return [bos]

    # -- conversations --------------------------------------------------------------------------
    def conversation_text(self, messages: tuple[Message, ...] | list[Message], add_generation_prompt: bool
                          ) -> tuple[str, list[tuple[int, int]]]:
        """The templated text and the character spans of the assistant contents in it."""
        if self.use_chat_template:
            found = self._template_by_sentinels(messages, add_generation_prompt)
            if found is not None:
                return found
            text = self._apply_template([{"role": m.role, "content": m.content} for m in messages],
                                        add_generation_prompt)
            spans, pos = [], 0
            for m in messages:
                content = m.content if m.content in text[pos:] else m.content.strip()
                start = text.find(content, pos)
                if start < 0:
                    raise OneGenError(f"the tokenizer's chat template changes the {m.role} message content; "
                                      "use a template that keeps it verbatim")
                pos = start + len(content)
                if m.role == "assistant":
                    spans.append((start, pos))
            return text, spans
        parts, spans, pos = [], [], 0
        eos = self.tokenizer.eos_token or ""
        for m in messages:
            prefix = BUILTIN_ROLE_PREFIX[m.role]
            start = pos + len(prefix)
            end_text = eos + "\n" if m.role == "assistant" else "\n"
            parts.append(prefix + m.content + end_text)
            if m.role == "assistant":
                spans.append((start, start + len(m.content)))
            pos += len(parts[-1])
        if add_generation_prompt:
            parts.append(BUILTIN_ROLE_PREFIX["assistant"])
        return "".join(parts), spans

    def _template_by_sentinels(self, messages: tuple[Message, ...] | list[Message], add_generation_prompt: bool
                               ) -> tuple[str, list[tuple[int, int]]] | None:
        """Apply the chat template to sentinel contents, then put the real contents in their places.

        Searching for a content in the templated text could match inside the template's own markup
        (an answer "a" inside "<|assistant|>"); sentinels give exact spans. None when the template does
        not keep every message (then the contents are searched for)."""
        skeleton = self._apply_template([{"role": m.role, "content": f"\ue000{i}\ue001"}
                                         for i, m in enumerate(messages)], add_generation_prompt)
        pieces = _SENTINEL_RE.split(skeleton)  # [template, index, template, index, ..., template]
        if pieces[1::2] != [str(i) for i in range(len(messages))]:
            return None
        text, spans = pieces[0], []
        for i, tail in zip(pieces[1::2], pieces[2::2], strict=True):
            m = messages[int(i)]
            start = len(text)
            text += m.content
            if m.role == "assistant":
                spans.append((start, len(text)))
            text += tail
        return text, spans

    def _apply_template(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                      add_generation_prompt=add_generation_prompt)
        except Exception as e:  # noqa: BLE001 - jinja's TemplateError (raise_exception) and whatever the template hits
            reason = " ".join(str(e).split()) or type(e).__name__
            raise OneGenError(f"the tokenizer's chat template refuses this conversation: {reason}",
                              field="messages") from None

    def _prompt(self, messages: list[Message] | tuple[Message, ...]) -> tuple[str, list[tuple[int, int]]]:
        """The text before the assistant's answer, as training renders it, and the spans of the earlier
        assistant contents in it: with a chat template, the conversation with one more assistant
        message, cut where that message's content starts (so markup a template writes inside the
        assistant turn, such as Llama-2's space after `[/INST]`, is there as it was in training); the
        template's generation prompt when that cannot be found."""
        if self.use_chat_template:
            try:
                found = self._template_by_sentinels((*messages, Message("assistant", "\ue002")), False)
            except OneGenError:  # e.g. a template that refuses two assistant turns in a row
                found = None
            if found is not None:
                text, spans = found
                return text[: spans[-1][0]], spans[:-1]
        return self.conversation_text(messages, add_generation_prompt=True)

    def prompt_text(self, messages: list[Message] | tuple[Message, ...]) -> str:
        """The text of a prompt ready for generation (see `_prompt`)."""
        return self._prompt(messages)[0]

    def encode_prompt(self, messages: list[Message] | tuple[Message, ...], assistant_prefix: str = "") -> list[int]:
        """Ids of a prompt ready for generation (ends where the assistant's answer starts), tokenized as
        training tokenizes the same text: each assistant content, earlier turns' too, starts a chunk."""
        text, spans = self._prompt(messages)
        start = [(len(text), len(text) + len(assistant_prefix))] if assistant_prefix else []  # the answer's start
        ids, _, _ = self._tokenize(text + assistant_prefix, spans + start)
        return self._bos() + ids

    def _tokenize(self, text: str, gen_spans: list[tuple[int, int]]) -> tuple[list[int], list[str], list[int]]:
        """Tokenize in chunks split at our special strings; roles from the character spans.

        Returns ids, roles and the character offset where each token starts."""
        char_gen = bytearray(len(text))
        for s, e in gen_spans:
            char_gen[s:e] = b"\x01" * (e - s)
        ids: list[int] = []
        roles: list[str] = []
        starts: list[int] = []
        pos = 0
        in_paragraph = False
        cuts = sorted({0, *(s for s, _ in gen_spans), len(text)})  # an answer starts a chunk, as after a prompt
        pieces = [p for a, b in zip(cuts, cuts[1:], strict=False) for p in self._split_re.split(text[a:b])]
        for piece in pieces:
            if not piece:
                continue
            start, pos = pos, pos + len(piece)
            if piece in self.tokens.strings():
                tid = self.tokenizer.convert_tokens_to_ids(piece)
                if piece == self.tokens.open:
                    in_paragraph = True
                gen = bool(char_gen[start]) and not in_paragraph
                ids.append(tid)
                roles.append(GEN if gen else CTX)
                starts.append(start)
                if piece == self.tokens.close:
                    in_paragraph = False
                continue
            enc = self.tokenizer(piece, add_special_tokens=False, return_offsets_mapping=True,
                                 split_special_tokens=in_paragraph)  # a paragraph is document text
            for tid, (s, e) in zip(enc["input_ids"], enc["offset_mapping"], strict=True):
                # GEN when any of its characters is: a token that ends the answer and takes the template's
                # space with it (SentencePiece's `a▁` before ` </s>`) is generated. (None straddles an
                # answer's start: the answer is a chunk of its own.)
                gen = any(char_gen[start + s:start + max(e, s + 1)]) and not in_paragraph
                ids.append(tid)
                roles.append(GEN if gen else CTX)
                starts.append(start + s)
        return ids, roles, starts

    def render(self, sample: Sample) -> Rendered | None:
        """Render a training sample; None when truncation drops it (policy `drop`)."""
        try:
            text, spans = self.conversation_text(sample.messages, add_generation_prompt=False)
        except OneGenError as e:  # a template that refuses the conversation: name the sample
            if e.file is not None or not sample.source:
                raise
            raise OneGenError(e.message, file=sample.source, field=e.field) from None
        ids, roles, starts = self._tokenize(text, spans)
        self._mark_end_of_turn(text, spans, ids, roles, starts, self._closers)
        bos = self._bos()
        ids, roles = bos + ids, [CTX] * len(bos) + roles
        labels = [t if r == GEN else IGNORE_INDEX for t, r in zip(ids, roles, strict=True)]
        ret_positions = [i for i, t in enumerate(ids) if t == self.ids.query and roles[i] == GEN]
        for p in ret_positions:
            roles[p] = RET
            nxt = p + 1
            if nxt < len(ids) and (ids[nxt] == self.ids.open or not self.train_after_link):
                labels[nxt] = IGNORE_INDEX
        if len(ret_positions) != len(sample.retrievals):
            raise OneGenError(f"rendered {len(ret_positions)} query tokens but the sample has "
                              f"{len(sample.retrievals)} retrieval entries (a query token inside a paragraph "
                              "or a non-assistant turn does not count)", file=sample.source or None,
                              field="retrievals")
        out = Rendered(ids, labels, roles, ret_positions, sample.retrievals, sample.id)
        return self._truncate(out, sample)

    def _mark_end_of_turn(self, text: str, spans: list[tuple[int, int]], ids: list[int], roles: list[str],
                          starts: list[int], closers: set[int] | None = None) -> list[int]:
        """Make the special token that closes each assistant turn GEN, so the model learns to stop;
        returns the positions of those tokens.

        It is the first special token at or after the end of the turn's content, with only whitespace
        tokens between (Llama-2 writes ` </s>`, some ChatML variants `\n<|im_end|>`: those are GEN
        too), whatever precedes the end (text, a paragraph, or nothing for an empty turn). With
        `closers` (what closes the last turn of a conversation: `end_of_turn_ids`) only those count, so
        a template without a closer does not train the next turn's header instead."""
        ours = (self.ids.open, self.ids.close, self.ids.doc, self.ids.query)
        closing = []
        for _, end in spans:
            i = j = bisect.bisect_left(starts, end)
            while j < len(ids) and ids[j] not in self._special_ids \
                    and not text[starts[j]:starts[j + 1] if j + 1 < len(ids) else len(text)].strip():
                j += 1
            if j < len(ids) and ids[j] in self._special_ids and ids[j] not in ours \
                    and (closers is None or ids[j] in closers):
                roles[i:j + 1] = [GEN] * (j + 1 - i)
                closing.append(j)
        return closing

    def end_of_turn_ids(self) -> set[int]:
        """The special tokens that close an assistant turn, as training teaches the model to emit them
        (a chat template's `<|im_end|>`, `<|eot_id|>`, ...; eos with the built-in format): generation
        stops on them."""
        return set(self._closers)

    @functools.cached_property
    def _closers(self) -> frozenset[int]:
        messages = (Message("user", "q"), Message("assistant", "a"))
        text, spans = self.conversation_text(messages, add_generation_prompt=False)
        ids, roles, starts = self._tokenize(text, spans)
        return frozenset(ids[i] for i in self._mark_end_of_turn(text, spans, ids, roles, starts))

    def _truncate(self, r: Rendered, sample: Sample) -> Rendered | None:
        if len(r) <= self.max_length:
            return r
        keep = [p for p in r.ret_positions if p < self.max_length]
        if len(keep) < len(r.ret_positions):
            if self.on_truncation == "error":
                raise TruncationError(
                    f"{len(r)} tokens; cutting to data.max_length={self.max_length} would cut query token "
                    f"{len(keep) + 1} of {len(r.ret_positions)}: raise data.max_length or set "
                    "data.on_truncation to shorten or drop", file=sample.source or None)
            if self.on_truncation == "drop":
                self.dropped += 1
                return None
        self.shortened += 1
        n = self.max_length
        return Rendered(r.input_ids[:n], r.lm_labels[:n], r.roles[:n], keep, r.retrievals[: len(keep)],
                        r.sample_id)


# -- visualiser ----------------------------------------------------------------------------------

_GEN_RET = f"{GEN}+{RET}"  # a query token: generated (LM loss) and a retrieval vector
_STYLE = {GEN: "bold green", CTX: "dim", RET: "bold magenta reverse", _GEN_RET: "bold magenta reverse"}


def show(rendered: Rendered, tokenizer, color: bool = False) -> str:
    """A sample with its roles marked: runs of tokens as «ROLE|text», or with colours for a terminal."""
    runs: list[tuple[str, list[int]]] = []
    for tid, role, label in zip(rendered.input_ids, rendered.roles, rendered.lm_labels, strict=True):
        tag = role if role != GEN or label != IGNORE_INDEX else CTX
        if role == RET and label != IGNORE_INDEX:
            tag = _GEN_RET
        if runs and runs[-1][0] == tag:
            runs[-1][1].append(tid)
        else:
            runs.append((tag, [tid]))
    out = []
    for tag, ids in runs:
        text = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if color:
            from rich.markup import escape
            out.append(f"[{_STYLE[tag]}]{escape(text)}[/]")
        else:
            out.append(f"«{tag}|{text}»")
    return "".join(out)
