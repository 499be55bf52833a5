"""One-pass generation: the model retrieves inside its own decode loop.

Each row is a small state machine: it decodes; when it feeds `[RQ]`, the hidden state of that very
forward step is its query vector (no second pass). Queries are searched in batches: those of rows
retrieving in the same step together, and, when rows retrieve at different steps, a query may wait a
few steps for others while that costs less than another scan of the index (`searchqueue.SearchQueue`; same
tokens whatever the wait). In insert mode the logits of the `[RQ]` step are discarded and `<paragraph>` document
`</paragraph>` is prefilled on top of the row's KV cache, the logits after `</paragraph>` picking the
next token; in link mode (entity linking) the retrieved id is recorded and the `[RQ]` logits are used
as usual. A row whose retrieval budget is spent cannot emit `[RQ]` again (masked).

Every step feeds each row's new tokens (1 decode token, or a whole paragraph, or its prompt) in one
forward over all rows: right-aligned in a (B, S) block, earlier columns masked, positions counted per
row; so rows run at different phases in one batch. On the generic path a step that mixes paragraphs
with one-token rows runs the paragraph rows apart (a second forward over their own cache rows), and the
cache is compacted when the holes alignment leaves behind outnumber the tokens (`steppers.CachedStepper`).

The two baselines share the loop: `reencode` (the same model re-encodes the whole context in a second
pass at each `[RQ]`, GritLM-style) and `pipeline` (a separate retriever embeds the query text).
`stats` counts the tokens each model processed.

The step itself is behind `steppers.CachedStepper` / `RecomputeStepper`; the fast path (`fastpath`: static
slot cache, CUDA graphs) replaces it with the same interface and gives the same tokens.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .data import ROLES, Corpus, Message
from .fastpath import FastDecoder, fast_decoder
from .model import OneGenModel
from .searchqueue import SearchQueue
from .selection import TokenSelector
from .steppers import UNSUPPORTED, CachedStepper, RecomputeStepper, own_masks
from .tasks import extract_answer
from .tokens import special_tokens_of

MODES = ("onegen", "pipeline", "reencode")


@dataclass
class RetrievalEvent:
    """One retrieval: where it happened, the top-k documents and their scores."""

    position: int  # index in the row's generated stream (prompt excluded) of the [RQ] token
    doc_ids: list[str]
    scores: list[float]
    query_vec: torch.Tensor | None = None  # (D,), kept when `keep_vectors`


@dataclass
class GenerationResult:
    text: str  # the full generated stream: generated tokens and inserted paragraphs
    answer: str
    retrievals: list[RetrievalEvent] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)  # generated + inserted ids (prompt excluded)
    n_generated: int = 0
    n_inserted: int = 0
    finish_reason: str = ""  # eos | stop | length


@dataclass
class _Row:
    prompt: list[int]
    feed: list[int]  # tokens to process in the next forward
    messages: list[Message]
    stream: list[int] = field(default_factory=list)
    events: list[RetrievalEvent] = field(default_factory=list)
    n_generated: int = 0
    n_inserted: int = 0
    done: bool = False
    finish: str = ""
    generator: torch.Generator | None = None
    max_new: int = 64
    queued: int = 0  # its queries waiting in the search queue
    waiting: bool = False  # idle until its queued query is searched (insert mode)
    pending: list[int] = field(default_factory=list)  # prompt tokens still to prefill, PREFILL_CHUNK a step
    closing: str = ""  # the finish reason of a row whose last token, [RQ], is still to be searched

    @property
    def history(self) -> list[int]:
        return self.prompt + self.stream


class Engine:
    """Batched one-pass generation with retrieval.

    Args:
        model: the OneGen model (generator, and retriever in `onegen`/`reencode` modes).
        index: an `Index` of the corpus built by `model` (or by the retriever in `pipeline` mode); its
            documents' texts are what gets inserted.
        mode: `onegen`, `pipeline` (needs `retriever`) or `reencode`.
        retriever: pipeline mode: an object with `retrieve(texts, k) -> list[(ids, scores)]`.
        use_cache: False recomputes the full sequence at every step (for equivalence tests).
        fast: the fast path (`onegen.fastpath`: static slot cache, CUDA graphs): None = when on CUDA and
            the model is supported, True = required (error if unsupported), False = the generic path; a
            `FastDecoder` is used as given (warmed-up graphs shared between engines).
        search_wait: when to search the queries of rows that fed `[RQ]` (`searchqueue.SearchQueue`): "auto" holds
            them while idling costs less than another scan of the index, N holds them up to N steps, 0
            searches at once. The tokens are the same either way.
    """

    def __init__(self, model: OneGenModel, index: Any = None, mode: str = "onegen", retriever: Any = None,
                 corpus: Any = None, use_cache: bool = True, fast: bool | FastDecoder | None = None,
                 search_wait: int | str = "auto"):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if mode == "pipeline" and not any(callable(getattr(retriever, f, None)) for f in ("retrieve", "retrieve_histories")):
            raise ValueError("pipeline mode needs retriever= a retriever object (onegen.retrievers.BM25Retriever(corpus), "
                             f"DenseRetriever(...) or HistoryRetriever(...)), got {retriever!r}")
        if mode != "pipeline" and index is None:
            raise ValueError(f"{mode} mode needs an index built by the model")
        if mode != "pipeline" and hasattr(index, "check_model"):
            index.check_model(model)
        if isinstance(corpus, Corpus) and isinstance(getattr(index, "ids", None), list) and mode != "pipeline":
            missing = [i for i in index.ids if i not in corpus]
            if missing:
                raise ValueError(f"the corpus holds no text for {len(missing)} of the index's ids (e.g. {missing[:3]}); "
                                 "pass the corpus the index was built from")
        if mode == "pipeline" and hasattr(retriever, "check_generator"):
            retriever.check_generator(model)
        self.model, self.index, self.mode, self.retriever = model, index, mode, retriever
        self.corpus = corpus if corpus is not None else getattr(index, "corpus", None) or getattr(retriever, "corpus", None)
        self.use_cache = use_cache
        if fast and not use_cache:
            raise ValueError("fast=True needs use_cache=True")
        self._fast = fast_decoder(model, fast) if use_cache else None
        if not (search_wait == "auto" or (isinstance(search_wait, int) and not isinstance(search_wait, bool)
                                          and search_wait >= 0)):
            raise ValueError(f"search_wait must be 'auto' or an int >= 0, got {search_wait!r}")
        self.search_wait = search_wait
        self._eos = sorted(_eos_ids(model) | model.renderer.end_of_turn_ids())  # looked up once, not per token
        self._answer_ends = _answer_ends(model)
        self._limit = model.max_positions
        self._paragraphs: dict[str, list[int]] = {}  # doc id -> inserted tokens, least recent first
        self._step_bytes = (model.weight_bytes(), model.kv_bytes_per_token())  # the search queue's cost model
        self.stats = {"generator_tokens": 0, "reencode_tokens": 0, "retriever_tokens": 0, "forwards": 0,
                      "searches": 0, "queries": 0}

    # -- public ---------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, prompts: list[Any], max_new_tokens: int | list[int] = 64, max_retrievals: int = 4, top_k: int = 5,
                 link: bool = False, do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                 seed: int = 0, stop: list[str] | None = None, batch_size: int | None = None,
                 callback: Callable[[dict[str, Any]], None] | None = None, keep_vectors: bool = False,
                 assistant_prefix: str = "", force_query_every: int | None = None,
                 ignore_eos: bool = False) -> list[GenerationResult]:
        """Generate for each prompt (a string, or a list of messages); results in input order.

        Options: `max_retrievals` per row; `top_k` documents in each trace; `link` records the
        retrieved id and inserts nothing; sampling with `temperature`/`top_p` seeded per row; `stop`
        strings; `callback` gets {"row", "type": token|retrieval|done, ...} events as they happen.
        `force_query_every=N` makes each row emit `[RQ]` every N generated tokens (phase set by its
        prompt length) and `ignore_eos` keeps rows going: a fixed retrieval schedule for benchmarks
        and tests with untrained weights.
        """
        limits = max_new_tokens if isinstance(max_new_tokens, list) else [max_new_tokens]
        if isinstance(max_new_tokens, list) and len(max_new_tokens) != len(prompts):
            raise ValueError(f"max_new_tokens: {len(max_new_tokens)} limits for {len(prompts)} prompts")
        for name, values, low in (("max_new_tokens", limits, 1), ("top_k", [top_k], 1),
                                  ("max_retrievals", [max_retrievals], 0),
                                  ("batch_size", [] if batch_size is None else [batch_size], 1)):
            if any(isinstance(v, bool) or not isinstance(v, int) or v < low for v in values):
                raise ValueError(f"{name} must be an integer >= {low}, got {values if len(values) > 1 else values[0]!r}")
        if do_sample and not (temperature >= 0 and 0 < top_p <= 1):  # NaN fails both
            raise ValueError(f"sampling needs temperature >= 0 and 0 < top_p <= 1, got {temperature!r}, {top_p!r}")
        if force_query_every is not None and (isinstance(force_query_every, bool)
                                              or not isinstance(force_query_every, int) or force_query_every < 1):
            raise ValueError(f"force_query_every must be None or an integer >= 1, got {force_query_every!r}")
        if stop and not all(isinstance(s, str) and s for s in stop):
            raise ValueError(f"stop strings must be non-empty strings, got {stop!r}")
        batch_size = batch_size or len(prompts) or 1
        encoded = [self._encode(p, i, assistant_prefix) for i, p in enumerate(prompts)]  # all checked first
        results: list[GenerationResult] = []
        for start in range(0, len(prompts), batch_size):
            chunk = encoded[start:start + batch_size]
            limits = max_new_tokens[start:start + batch_size] if isinstance(max_new_tokens, list) \
                else [max_new_tokens] * len(chunk)
            results += self._generate_batch(chunk, start, limits, max_retrievals, top_k, link, do_sample,
                                            temperature, top_p, seed, stop or [], callback, keep_vectors,
                                            assistant_prefix, force_query_every, ignore_eos)
        return results

    # -- the loop -------------------------------------------------------------------------------
    def _generate_batch(self, prompts, offset, max_new_tokens, max_retrievals, top_k, link, do_sample,
                        temperature, top_p, seed, stop, callback, keep_vectors, assistant_prefix,
                        force_every=None, ignore_eos=False):
        m = self.model
        was_training = m.training
        m.eval()
        rows = []
        for i, (messages, ids) in enumerate(prompts):
            gen = torch.Generator().manual_seed(seed + offset + i) if do_sample else None
            rows.append(_Row(ids, list(ids), messages, generator=gen, max_new=max_new_tokens[i]))
        inserts = 0 if link else max_retrievals * (m.renderer.doc_max_length + 2)
        longest = max(len(r.prompt) + r.max_new for r in rows) + inserts
        stepper = self.new_stepper(len(rows), longest if self._limit is None else min(longest, self._limit))
        needs_history = getattr(stepper, "needs_history", False)  # only recomputation re-reads whole rows
        for r in rows if not needs_history else ():  # long prompts prefill in chunks: attention memory O(chunk x T)
            r.feed, r.pending = r.feed[:PREFILL_CHUNK], r.feed[PREFILL_CHUNK:]
        select = TokenSelector(m, self._eos, do_sample, temperature, top_p, force_every is not None, ignore_eos)
        scan = getattr(self.retriever if self.mode == "pipeline" else self.index, "scan_bytes", 0)
        queue = SearchQueue(self.search_wait, scan, link, *self._step_bytes)
        while not all(r.done for r in rows):
            # 1. one forward over every row's pending tokens (waiting rows feed nothing)
            histories = [r.history if not r.done else r.history[:1] for r in rows] if needs_history else []
            hidden, logits = stepper.step([r.feed if not r.done else [] for r in rows], histories)  # done rows: unread
            self.stats["forwards"] += 1
            self.stats["generator_tokens"] += sum(len(r.feed) for r in rows if not r.done)
            # 2. rows that just fed [RQ] queue their query: the hidden state of this very step (taken
            #    out in one gather: a view would keep the step's whole hidden block alive while it waits)
            fresh = [i for i, r in enumerate(rows) if not r.done and r.feed and r.feed[-1] == m.ids.query
                     and r.n_generated and r.stream and r.stream[-1] == m.ids.query]
            vecs = hidden[torch.tensor(fresh, device=hidden.device)] if fresh and self.mode == "onegen" else None
            for n, i in enumerate(fresh):
                r = rows[i]
                queue.add(i, len(r.stream) - 1, None if vecs is None else vecs[n])
                r.queued += 1
                # insert mode: it idles until its paragraph; a closing row (nothing follows) in link mode too
                r.feed, r.waiting = ([], True) if not link or r.closing else (r.feed, False)
            prefilling = {i for i, r in enumerate(rows) if r.pending}  # their prompt goes on: nothing to decode
            for i in prefilling:
                r = rows[i]
                r.feed, r.pending = r.pending[:PREFILL_CHUNK], r.pending[PREFILL_CHUNK:]
            # 3. the queued queries are searched as one batch now, or wait a step; (insert mode) rows whose
            #    query was searched feed their paragraph next. Before decoding: in link mode a row's
            #    retrieval comes before the token after its [RQ]
            inserted: set[int] = set()
            if queue.due(rows):
                for i in self._retrieve(rows, queue.take(), offset, top_k, keep_vectors, callback):
                    r = rows[i]
                    if r.closing:  # its last token was a query: done once all its queries are searched
                        self._close(r, offset + i, callback)
                        continue
                    if not link:
                        found = r.events[-1].doc_ids  # a retriever may find nothing: an empty paragraph
                        para = self._paragraph(found[0]) if found else m.renderer.encode_paragraph("")
                        if not self._fits(r, len(para)):  # the row ends at the model's position limit
                            self._end(r, offset + i, "length", callback)
                            continue
                        r.stream += para
                        r.n_inserted += len(para)
                        r.feed, r.waiting = para, False
                        inserted.add(i)
            else:
                queue.wait(rows)
            # 4. every other live row that is not waiting decodes a token: all picked at once, one transfer
            decoding = [i for i, r in enumerate(rows) if not r.done and not r.waiting and i not in inserted
                        and i not in prefilling]
            if decoding:
                no_rq = [len(rows[i].events) + rows[i].queued >= max_retrievals for i in decoding]
                tokens = select(logits, decoding, no_rq, [rows[i].generator for i in decoding])
                for i, tok, spent in zip(decoding, tokens, no_rq, strict=True):
                    self._take(rows[i], offset + i, tok, spent, force_every, stop, callback)
                # 5. rows that just finished: queries they still hold (link mode, held by search_wait=N)
                #    are searched first, so that a row's retrievals are all reported before it is done
                finished = [i for i in decoding if rows[i].done]
                if any(rows[i].queued for i in finished):
                    for i in self._retrieve(rows, queue.take(), offset, top_k, keep_vectors, callback):
                        self._close(rows[i], offset + i, callback)  # a closing row searched with them
                for i in finished if callback else ():
                    callback({"row": offset + i, "type": "done", "finish_reason": rows[i].finish})
        if queue.items:  # nothing should be left (step 5); searched all the same
            for i in self._retrieve(rows, queue.take(), offset, top_k, keep_vectors, callback):
                self._close(rows[i], offset + i, callback)
        m.train(was_training)
        return [self._result(r, link) for r in rows]

    @classmethod
    def _close(cls, r: _Row, row: int, callback: Callable[[dict[str, Any]], None] | None) -> None:
        """A closing row (its last token a query) whose queries are all searched is done, once."""
        if r.closing and not r.done and r.queued == 0:
            cls._end(r, row, r.closing, callback)

    @staticmethod
    def _end(r: _Row, row: int, reason: str, callback: Callable[[dict[str, Any]], None] | None) -> None:
        """A row outside the decoding step (waiting for a search or a paragraph) ends, and says so."""
        r.done, r.finish, r.waiting, r.feed = True, reason, False, []
        if callback:
            callback({"row": row, "type": "done", "finish_reason": reason})

    def _take(self, r: _Row, row: int, tok: int, spent: bool, force_every: int | None, stop: list[str],
              callback: Callable[[dict[str, Any]], None] | None) -> None:
        """Row `r` (number `row` in the call) generated `tok`; it feeds it next."""
        m = self.model
        if force_every and not spent and (r.n_generated + len(r.prompt)) % force_every == force_every - 1:
            tok = m.ids.query
        r.stream.append(tok)
        r.n_generated += 1
        r.feed = [tok]
        if callback:
            callback({"row": row, "type": "token", "token_id": tok,
                      "text": m.tokenizer.decode([tok], skip_special_tokens=False)})
        self._maybe_finish(r, tok, r.max_new, stop)  # the loop reports "done" (after the row's retrievals)

    def _retrieve(self, rows: list[_Row], queries: list[tuple[int, int, torch.Tensor | None]], offset: int,
                  top_k: int, keep_vectors: bool, callback: Callable[[dict[str, Any]], None] | None) -> list[int]:
        """Search the queued `queries` (row, position of its `[RQ]`, vector) as one batch; record each as
        its row's next retrieval event. Returns the rows, in order."""
        m = self.model
        retrieving = [i for i, _, _ in queries]
        # what each row had up to its [RQ] (link-mode rows went on decoding since)
        histories = [rows[i].prompt + rows[i].stream[: pos + 1] for i, pos, _ in queries]
        if self.mode == "onegen":
            query_vecs = torch.stack([v for _, _, v in queries])  # (R, D): captured at each [RQ] step
        elif self.mode == "reencode":
            query_vecs = m._embed(histories, batch_size=len(histories), progress=False, what="queries")
            self.stats["reencode_tokens"] += sum(len(h) for h in histories)
        else:
            query_vecs = None
        if query_vecs is not None:
            scores, idx = self.index.search_tensor(query_vecs.float(), top_k)  # the backend moves them
            found = [([self.index.ids[j] for j in idx[r].tolist() if j >= 0], scores[r].tolist()[: top_k])
                     for r in range(len(retrieving))]
        elif hasattr(self.retriever, "retrieve_histories"):  # a second model re-reads the whole context
            found = self.retriever.retrieve_histories(histories, top_k)
            self.stats["retriever_tokens"] += sum(len(h) for h in histories)
        else:
            texts = [self._query_text(rows[i], pos) for i, pos, _ in queries]
            found = self.retriever.retrieve(texts, top_k)
            self.stats["retriever_tokens"] += self.retriever.count_tokens(texts)
        self.stats["searches"] += 1
        self.stats["queries"] += len(queries)
        for n, (i, pos, _) in enumerate(queries):
            r = rows[i]
            ids, scores = found[n]
            vec = query_vecs[n].float().cpu().clone() if keep_vectors and query_vecs is not None else None
            r.events.append(RetrievalEvent(pos, list(ids), [float(s) for s in scores], vec))
            r.queued -= 1
            if callback:
                callback({"row": offset + i, "type": "retrieval", "doc_ids": list(ids), "scores": list(scores)})
        return retrieving

    def _paragraph(self, doc_id: str) -> list[int]:
        """The tokens inserted for a document (`<paragraph>` text `</paragraph>`), tokenized once per
        document while it stays among the `PARAGRAPH_CACHE` most recent (tokenizing costs about as much
        host time as a whole decode step of a large batch)."""
        cached = self._paragraphs.pop(doc_id, None)
        if cached is None:
            cached = self.model.renderer.encode_paragraph(self._doc_text(doc_id))
            if len(self._paragraphs) >= PARAGRAPH_CACHE:
                self._paragraphs.pop(next(iter(self._paragraphs)))
        self._paragraphs[doc_id] = cached  # most recent last
        return list(cached)

    def _doc_text(self, doc_id: str) -> str:
        if self.corpus is None:
            raise ValueError("the engine needs the corpus texts to insert (pass corpus= or an index with texts)")
        return self.corpus[doc_id].text

    def _query_text(self, row: _Row, position: int) -> str:
        """Pipeline mode: the question plus what the model wrote up to its `[RQ]` at `position` (without
        inserted paragraphs)."""
        m = self.model
        visible, inside = [], False
        for t in row.stream[: position + 1]:
            if t == m.ids.open:
                inside = True
            elif t == m.ids.close:
                inside = False
            elif not inside:
                visible.append(t)
        question = next((x.content for x in reversed(row.messages) if x.role == "user"), "")
        written = m.tokenizer.decode(visible, skip_special_tokens=True).strip()
        return f"{question} {written}".strip()

    def new_stepper(self, n_rows: int, max_len: int) -> Any:
        """The step function this engine runs `n_rows` rows of at most `max_len` tokens with: the fast
        path's when it is on and fits, else the generic cached (or recomputing) one. `step(feeds,
        histories)` processes each row's new tokens (`histories`, each row's whole sequence, are needed only
        by a stepper with `needs_history`) and returns last-position hidden (B, D), logits (B, V)."""
        stepper = self._fast.stepper(n_rows, max_len) if self._fast is not None else None
        if stepper is None and self.use_cache:
            masks = own_masks(self.model)
            stepper = CachedStepper(self.model, n_rows, masks) if masks != UNSUPPORTED else None
        return stepper or RecomputeStepper(self.model, n_rows)

    def _maybe_finish(self, r: _Row, tok: int, max_new_tokens: int, stop: list[str]) -> None:
        m = self.model
        if tok in self._eos:
            r.done, r.finish = True, "eos"
        elif r.n_generated >= max_new_tokens or not self._fits(r, 0):
            r.done, r.finish = True, "length"
        elif stop and _stopped(m.tokenizer, r.stream, stop):
            r.done, r.finish = True, "stop"
        if r.done and tok == m.ids.query and self._fits(r, 0):  # a last [RQ] is still fed and searched
            r.done, r.closing = False, r.finish

    def _encode(self, prompt: Any, i: int, assistant_prefix: str) -> tuple[list[Message], list[int]]:
        """A prompt's messages and ids; one longer than the model's positions is refused."""
        messages = _as_messages(prompt)
        ids = self.model.renderer.encode_prompt(messages, assistant_prefix)
        if self._limit is not None and len(ids) > self._limit:
            raise ValueError(f"prompt {i} is {len(ids)} tokens; the model takes at most {self._limit} positions "
                             "(its config's max_position_embeddings)")
        return messages, ids

    def _fits(self, r: _Row, extra: int) -> bool:
        """Whether the row's tokens with `extra` more all fit in the model's positions (each is fed once,
        a decoded token at the next step)."""
        return self._limit is None or len(r.prompt) + len(r.stream) + extra <= self._limit

    def _result(self, r: _Row, link: bool) -> GenerationResult:
        m = self.model
        ids = [t for t in r.stream if t not in self._eos]
        text = m.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        for s in (m.tokenizer.pad_token, m.tokenizer.eos_token):
            if s:
                text = text.replace(s, "")
        answer = "" if link else extract_answer(text, m.tokens, self._answer_ends)
        return GenerationResult(text, answer, r.events, r.stream, r.n_generated, r.n_inserted, r.finish)


PARAGRAPH_CACHE = 65536  # documents whose inserted tokens the engine keeps
PREFILL_CHUNK = 1024  # prompt tokens a row feeds per step: a 16k-token prompt never needs a 16k x 16k mask
def _eos_ids(m: OneGenModel) -> set[int]:
    ids = {m.ids.eos}
    cfg_eos = getattr(m.hf_model.generation_config, "eos_token_id", None) if hasattr(m.hf_model, "generation_config") else None
    if isinstance(cfg_eos, int):
        ids.add(cfg_eos)
    elif isinstance(cfg_eos, list):
        ids.update(cfg_eos)
    return ids


def _stopped(tokenizer, stream: list[int], stop: list[str]) -> bool:
    """Whether the newest token completes a stop string, wherever in that token the string ends (a
    string can end inside a token: "F B" in "F", " Bra"). The window covers the longest string even
    when each character takes up to four byte tokens."""
    window = stream[-(4 * max(map(len, stop)) + 2):]
    text = tokenizer.decode(window, skip_special_tokens=False)
    # what the newest token added: after the common prefix (a partial UTF-8 character decodes to U+FFFD)
    before = len(os.path.commonprefix([text, tokenizer.decode(window[:-1], skip_special_tokens=False)]))
    return any(text.find(s, max(0, before - len(s) + 1)) >= 0 for s in stop)


def _answer_ends(m: OneGenModel) -> tuple[str, ...]:
    """Special token strings that end an answer: the tokenizer's own, except onegen's and unk (an
    unknown character inside the answer)."""
    skip = {*m.tokens.strings(), m.tokenizer.unk_token}
    return tuple(t for t in special_tokens_of(m.tokenizer).values() if t and t not in skip)


def _as_messages(prompt: Any) -> list[Message]:
    if isinstance(prompt, str):
        return [Message("user", prompt)]
    out = []
    for x in prompt:
        m = x if isinstance(x, Message) else Message(x["role"], x["content"])
        if m.role not in ROLES:
            raise ValueError(f"message role {m.role!r}; expected one of {', '.join(ROLES)}")
        out.append(m)
    return out
