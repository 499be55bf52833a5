"""One-pass generation: the model retrieves inside its own decode loop.

Each row is a small state machine: it decodes; when it feeds `[RQ]`, the hidden state of that very
forward step is its query vector (no second pass). Rows retrieving in the same step search the index
as one batch. In insert mode the logits of the `[RQ]` step are discarded and `<paragraph>` document
`</paragraph>` is prefilled on top of the row's KV cache, the logits after `</paragraph>` picking the
next token; in link mode (entity linking) the retrieved id is recorded and the `[RQ]` logits are used
as usual. A row whose retrieval budget is spent cannot emit `[RQ]` again (masked).

Every step feeds each row's new tokens (1 decode token, or a whole paragraph, or its prompt) in one
forward over all rows: right-aligned in a (B, S) block, earlier columns masked, positions counted per
row; so rows run at different phases in one batch. On the generic path a step that mixes paragraphs
with one-token rows runs the paragraph rows apart (a second forward over their own cache rows), and the
cache is compacted when the holes alignment leaves behind outnumber the tokens (`_CachedStepper`).

The two baselines share the loop: `reencode` (the same model re-encodes the whole context in a second
pass at each `[RQ]`, GritLM-style) and `pipeline` (a separate retriever embeds the query text).
`stats` counts the tokens each model processed.

The step itself is behind `_CachedStepper` / `_RecomputeStepper`; the fast path (`fastpath`: static
slot cache, CUDA graphs) replaces it with the same interface and gives the same tokens.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .data import Message
from .fastpath import FastDecoder, fast_decoder
from .model import OneGenModel
from .packing import as_mask, sliding_window
from .tasks import extract_answer

log = logging.getLogger(__name__)

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
        search_wait: when to search the queries of rows that fed `[RQ]` (`_SearchQueue`): "auto" holds
            them while idling costs less than another scan of the index, N holds them up to N steps, 0
            searches at once. The tokens are the same either way.
    """

    def __init__(self, model: OneGenModel, index: Any = None, mode: str = "onegen", retriever: Any = None,
                 corpus: Any = None, use_cache: bool = True, fast: bool | FastDecoder | None = None,
                 search_wait: int | str = "auto"):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if mode == "pipeline" and retriever is None:
            raise ValueError("pipeline mode needs retriever=")
        if mode != "pipeline" and index is None:
            raise ValueError(f"{mode} mode needs an index built by the model")
        if mode != "pipeline" and hasattr(index, "check_model"):
            index.check_model(model)
        if mode == "pipeline" and hasattr(retriever, "check_generator"):
            retriever.check_generator(model)
        self.model, self.index, self.mode, self.retriever = model, index, mode, retriever
        self.corpus = corpus if corpus is not None else getattr(index, "corpus", None) or getattr(retriever, "corpus", None)
        self.use_cache = use_cache
        if fast and not use_cache:
            raise ValueError("fast=True needs use_cache=True")
        self._fast = fast_decoder(model, fast) if use_cache else None
        if not (search_wait == "auto" or (isinstance(search_wait, int) and search_wait >= 0)):
            raise ValueError(f"search_wait must be 'auto' or an int >= 0, got {search_wait!r}")
        self.search_wait = search_wait
        self._eos = sorted(_eos_ids(model))  # looked up once, not per generated token
        self._paragraphs: dict[str, list[int]] = {}  # doc id -> inserted tokens, least recent first
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
        batch_size = batch_size or len(prompts) or 1
        results: list[GenerationResult] = []
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
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
        for i, p in enumerate(prompts):
            messages = _as_messages(p)
            ids = m.renderer.encode_prompt(messages, assistant_prefix)
            gen = torch.Generator().manual_seed(seed + offset + i) if do_sample else None
            rows.append(_Row(ids, list(ids), messages, generator=gen, max_new=max_new_tokens[i]))
        inserts = 0 if link else max_retrievals * (m.renderer.doc_max_length + 2)
        stepper = self.new_stepper(len(rows), max(len(r.prompt) + r.max_new for r in rows) + inserts)
        needs_history = getattr(stepper, "needs_history", False)  # only recomputation re-reads whole rows
        select = _TokenSelector(self, do_sample, temperature, top_p, force_every is not None, ignore_eos)
        scan = getattr(self.retriever if self.mode == "pipeline" else self.index, "scan_bytes", 0)
        queue = _SearchQueue(self.search_wait, scan, link, m.weight_bytes(), m.kv_bytes_per_token())
        while not all(r.done for r in rows):
            # 1. one forward over every row's pending tokens (waiting rows feed nothing)
            hidden, logits = stepper.step([r.feed if not r.done else [] for r in rows],
                                          [r.history for r in rows] if needs_history else [])
            self.stats["forwards"] += 1
            self.stats["generator_tokens"] += sum(len(r.feed) for r in rows if not r.done)
            # 2. rows that just fed [RQ] queue their query: the hidden state of this very step
            for i, r in enumerate(rows):
                if not r.done and r.feed and r.feed[-1] == m.ids.query and r.n_generated and r.stream \
                        and r.stream[-1] == m.ids.query:
                    queue.add(i, len(r.stream) - 1, hidden[i] if self.mode == "onegen" else None)
                    r.queued += 1
                    r.feed, r.waiting = ([], True) if not link else (r.feed, False)
            # 3. every live row that is not waiting decodes a token: all picked at once, one transfer
            decoding = [i for i, r in enumerate(rows) if not r.done and not r.waiting]
            if decoding:
                no_rq = [len(rows[i].events) + rows[i].queued >= max_retrievals for i in decoding]
                tokens = select(logits, decoding, no_rq, [rows[i].generator for i in decoding])
                for i, tok, spent in zip(decoding, tokens, no_rq, strict=True):
                    self._take(rows[i], offset + i, tok, spent, force_every, stop, callback)
            # 4. the queued queries are searched as one batch now, or wait a step; (insert mode) rows
            #    whose query was searched feed their paragraph next
            if queue.due(rows):
                for i in self._retrieve(rows, queue.take(), offset, top_k, keep_vectors, callback):
                    r = rows[i]
                    if not link:
                        para = self._paragraph(r.events[-1].doc_ids[0])
                        r.stream += para
                        r.n_inserted += len(para)
                        r.feed, r.waiting = para, False
            else:
                queue.wait(rows)
        if queue.items:  # link mode: queries of rows that finished meanwhile
            self._retrieve(rows, queue.take(), offset, top_k, keep_vectors, callback)
        m.train(was_training)
        return [self._result(r, link) for r in rows]

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
        self._maybe_finish(r, tok, r.max_new, stop)
        if r.done and callback:
            callback({"row": row, "type": "done", "finish_reason": r.finish})

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
            stepper = _CachedStepper(self.model, n_rows, masks) if masks != UNSUPPORTED else None
        return stepper or _RecomputeStepper(self.model, n_rows)

    def _maybe_finish(self, r: _Row, tok: int, max_new_tokens: int, stop: list[str]) -> None:
        m = self.model
        if tok in self._eos:
            r.done, r.finish = True, "eos"
        elif r.n_generated >= max_new_tokens:
            r.done, r.finish = True, "length"
        elif stop:
            tail = m.tokenizer.decode(r.stream[-16:], skip_special_tokens=False)
            if any(tail.endswith(s) for s in stop):
                r.done, r.finish = True, "stop"

    def _result(self, r: _Row, link: bool) -> GenerationResult:
        m = self.model
        ids = [t for t in r.stream if t not in self._eos]
        text = m.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        for s in (m.tokenizer.pad_token, m.tokenizer.eos_token):
            if s:
                text = text.replace(s, "")
        answer = "" if link else extract_answer(text, m.tokens)
        return GenerationResult(text, answer, r.events, r.stream, r.n_generated, r.n_inserted, r.finish)


PARAGRAPH_CACHE = 65536  # documents whose inserted tokens the engine keeps
SEARCH_MAX_WAIT = 16  # steps a query may wait under search_wait="auto" (in link mode, where waiting is free)


class _SearchQueue:
    """Queries of rows that fed `[RQ]`, waiting for the index: when to search them, as one batch.

    An exact search reads the whole index whatever the number of queries (1 M x 4096 fp16: 8 GB, the
    bytes of half a 7B decode step). With rows retrieving at different steps (batch 64, a retrieval every
    64 tokens: about one `[RQ]` per step) searching at once scans the index at nearly every step. A
    waiting row idles instead (insert mode: it cannot go on without its paragraph), wasting its share of
    each step. Under "auto" the queue waits while the waste so far plus one more step of it stays below
    the price of one scan (rent or buy), in bytes read: a scan reads `scan_bytes`, a step the weights
    and the live rows' KV cache. So a row alone never waits (its whole step outweighs a scan), a small
    index is searched at once, and with many rows a few queries share each scan. In link mode rows do
    not idle (nothing is inserted): queries wait for free, up to `SEARCH_MAX_WAIT` steps or the end.
    `wait=N` holds queries up to N steps; 0 searches at once. Every rule searches when no live row
    could run meanwhile. Vectors do not change while they wait: the tokens are the same either way.
    """

    def __init__(self, wait: int | str, scan_bytes: int, link: bool, weight_bytes: int, kv_per_token: int):
        self.cap = SEARCH_MAX_WAIT if wait == "auto" else int(wait)
        self.auto = wait == "auto" and not link
        self.scan_bytes, self.weight_bytes, self.kv_per_token = scan_bytes, weight_bytes, kv_per_token
        self.items: list[tuple[int, int, torch.Tensor | None]] = []  # (row, position of [RQ], vector)
        self.age = 0  # steps the oldest item has waited
        self.waste = 0.0  # bytes of step time the waiting rows have idled so far

    def add(self, row: int, position: int, vector: torch.Tensor | None) -> None:
        self.items.append((row, position, vector))

    def take(self) -> list[tuple[int, int, torch.Tensor | None]]:
        items, self.items, self.age, self.waste = self.items, [], 0, 0.0
        return items

    def due(self, rows: list[_Row]) -> bool:
        """Search now? (Else the items wait one more step: `wait`.)"""
        if not self.items:
            return False
        if self.cap == 0 or self.age >= self.cap or all(r.done or r.waiting for r in rows):
            return True
        return self.auto and self.waste + self._idle_cost(rows) >= self.scan_bytes

    def wait(self, rows: list[_Row]) -> None:
        if self.items:
            self.age += 1
            self.waste += self._idle_cost(rows) if self.auto else 0.0

    def _idle_cost(self, rows: list[_Row]) -> float:
        """Bytes of one step the waiting rows waste: their share of it."""
        live = [r for r in rows if not r.done]
        step = self.weight_bytes + self.kv_per_token * sum(len(r.prompt) + len(r.stream) for r in live)
        return step * sum(r.waiting for r in live) / len(live)


class _TokenSelector:
    """Picks the next token of many rows at once from one (B, V) logits tensor.

    Banned ids are masked in one go: the tokens the engine inserts itself (never generated), `[RQ]`
    for every row under a forced schedule (the schedule places it) or for rows whose retrieval budget
    is spent, eos under `ignore_eos`. Greedy is a batched argmax. Sampling takes a batched softmax on
    the device, then each row draws with its own seeded CPU generator (top-p applied per row), exactly
    as drawing row by row would: a row's tokens depend on its seed, not on its batch. Either way the
    chosen ids reach the CPU in ONE transfer per step (the probabilities when sampling).
    """

    def __init__(self, engine: Engine, do_sample: bool, temperature: float, top_p: float,
                 forced: bool, ignore_eos: bool):
        m = engine.model
        banned = [m.ids.open, m.ids.close, m.ids.doc] + ([m.ids.query] if forced else [])
        banned += engine._eos if ignore_eos else []
        self.query = m.ids.query
        self.banned_all: torch.Tensor | None = None  # (K,) on the logits' device, made on first use
        self._banned = sorted(set(banned))
        self.forced = forced
        self.do_sample, self.temperature, self.top_p = do_sample, max(temperature, 1e-6), top_p

    def __call__(self, logits: torch.Tensor, rows: list[int], no_rq: list[bool],
                 generators: list[torch.Generator | None]) -> list[int]:
        """Next token of each of `rows` (indices into `logits` (B, V)); `no_rq[j]`: row j may not query."""
        dev = logits.device
        if self.banned_all is None or self.banned_all.device != dev:
            self.banned_all = torch.tensor(self._banned, dtype=torch.long, device=dev)
        scores = (logits if len(rows) == logits.shape[0] else logits[torch.tensor(rows, device=dev)]).float()
        scores = scores.index_fill(1, self.banned_all, float("-inf"))  # (R, V), a new tensor
        if not self.forced and any(no_rq):
            spent = torch.tensor(no_rq, dtype=torch.bool).to(dev, non_blocking=True)
            scores[:, self.query] = scores[:, self.query].masked_fill(spent, float("-inf"))
        if not self.do_sample:
            return scores.argmax(-1).tolist()
        probs = torch.softmax(scores / self.temperature, dim=-1).cpu()  # (R, V): the step's one transfer
        out = []
        for j, gen in enumerate(generators):
            p = probs[j]
            if self.top_p < 1.0:
                sorted_p, order = p.sort(descending=True)
                keep = sorted_p.cumsum(0) - sorted_p < self.top_p
                p = torch.zeros_like(p).scatter(0, order[keep], sorted_p[keep])
            out.append(int(torch.multinomial(p, 1, generator=gen)))
        return out


def _eos_ids(m: OneGenModel) -> set[int]:
    ids = {m.ids.eos}
    cfg_eos = getattr(m.hf_model.generation_config, "eos_token_id", None) if hasattr(m.hf_model, "generation_config") else None
    if isinstance(cfg_eos, int):
        ids.add(cfg_eos)
    elif isinstance(cfg_eos, list):
        ids.update(cfg_eos)
    return ids


def _as_messages(prompt: Any) -> list[Message]:
    if isinstance(prompt, str):
        return [Message("user", prompt)]
    out = []
    for x in prompt:
        out.append(x if isinstance(x, Message) else Message(x["role"], x["content"]))
    return out


def _last_column(rows: int, width: int, device: torch.device) -> torch.Tensor:
    """(rows, 2) (row, position) pairs of the last column: where right-aligned rows end."""
    return torch.stack([torch.arange(rows, device=device), torch.full((rows,), width - 1, device=device)], 1)


class _CachedStepper:
    """Generic path for any HF causal LM: a KV cache shared by the rows, masked holes for alignment.

    Every step appends as many columns as its longest feed to EVERY row: a paragraph one row inserts
    is a run of holes in all the others. With rows retrieving at different steps the holes would soon
    outnumber the tokens (64 rows inserting 4 paragraphs of 64 tokens each: ~16k columns, 250 of them
    real per row), and each step would attend over, and keep, all of them. So when the holes exceed
    `COMPACT_SLACK` + `COMPACT_RATIO` x the longest row, the cache is compacted: each row's real
    columns are gathered, in order, right-aligned into `longest` columns (one gather per layer).
    Positions are explicit and holes were masked, so the outputs do not change. Done only for plain
    dynamic caches (full attention, keys/values (B, H, T, d)); others keep their holes. Steps that mix
    paragraphs with one-token rows are split (`step`).

    Sliding-window models: the model's own masks count the window in cache columns, holes included,
    and its sliding cache layers keep the last window's columns: holes would push real tokens out. So
    for them (`masks` from `own_masks`) the cache is plain dynamic layers (nothing dropped; compaction
    and splits apply) and every forward gets a 4-D mask made here from the tokens' positions: causal,
    holes masked, each sliding layer type within its window.
    """

    def __init__(self, model: OneGenModel, n_rows: int, masks: tuple[str, Any] | None = None):
        from transformers.cache_utils import DynamicCache

        self.model = model
        self.masks = masks
        self.cache = DynamicCache() if masks is not None else None
        self.mask = torch.zeros((n_rows, 0), dtype=torch.long, device=model.device)
        self.lengths = torch.zeros(n_rows, dtype=torch.long, device=model.device)  # real tokens so far
        self.compactions = 0
        self.splits = 0  # steps whose wide rows ran apart

    def step(self, feeds: list[list[int]], histories: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Process each row's new tokens; returns the last-position hidden (B, D) and logits (B, V).

        A step where some rows feed many tokens (a paragraph) and others one would run every row at the
        paragraph's width; when the narrow rows would waste more than `SPLIT_MIN` token slots, the wide
        rows run alone on their own rows of the cache (`_step_rows`) after one narrow forward."""
        wide = [i for i, f in enumerate(feeds) if len(f) > 1]
        narrow = sum(1 for f in feeds if len(f) == 1)
        width = max((len(feeds[i]) for i in wide), default=1)
        if not wide or not narrow or narrow * (width - 1) < SPLIT_MIN or not self._splittable():
            return self._step_all(feeds)
        hidden, logits = self._step_all([f if len(f) == 1 else [] for f in feeds])
        w_hidden, w_logits = self._step_rows(wide, [feeds[i] for i in wide])
        index = torch.tensor(wide, device=hidden.device)
        return hidden.index_copy(0, index, w_hidden), logits.index_copy(0, index, w_logits)

    def _splittable(self) -> bool:
        """A plain dynamic cache (not wrapped with cross-attention state) whose rows can be taken apart."""
        return not hasattr(self.cache, "self_attention_cache") and \
            _dense_layers(self.cache, self.mask.shape[1]) is not None

    def _block(self, feeds: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Feeds right-aligned in a (R, S) block: ids and the mask of its real tokens, on the device."""
        width = max(1, max(len(f) for f in feeds))
        ids = torch.full((len(feeds), width), self.model.ids.pad, dtype=torch.long)
        new_mask = torch.zeros((len(feeds), width), dtype=torch.long)
        for i, f in enumerate(feeds):
            if f:
                ids[i, width - len(f):] = torch.tensor(f)
                new_mask[i, width - len(f):] = 1
        return ids.to(self.model.device), new_mask.to(self.model.device)

    def _step_all(self, feeds: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """One forward over every row (rows with nothing to feed get a masked hole)."""
        ids, new_mask = self._block(feeds)
        positions = (self.lengths[:, None] + new_mask.cumsum(1) - 1).clamp(min=0)  # (B, S)
        self.mask = torch.cat([self.mask, new_mask], dim=1)
        last = _last_column(len(feeds), ids.shape[1], ids.device)
        hidden, logits, self.cache = self.model.run(ids, self._attention(self.mask, positions), position_ids=positions,
                                                    past_key_values=self.cache, use_cache=True, logits_at=last)
        self.lengths = self.lengths + new_mask.sum(1)
        self._maybe_compact()
        return hidden[:, -1], logits

    def _step_rows(self, rows: list[int], feeds: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """One forward over `rows` only: their cache rows gathered into a cache of their own, the new
        columns written back (holes for the other rows, which the compaction removes later)."""
        layers = _dense_layers(self.cache, self.mask.shape[1])
        assert layers is not None  # `step` checked `_splittable`
        index = torch.tensor(rows, device=self.mask.device)
        sub = copy.copy(self.cache)
        sub.layers = [copy.copy(layer) for layer in layers]
        for layer in sub.layers:
            layer.keys, layer.values = layer.keys.index_select(0, index), layer.values.index_select(0, index)
        ids, new_mask = self._block(feeds)
        old = self.mask.shape[1]
        positions = (self.lengths[index, None] + new_mask.cumsum(1) - 1).clamp(min=0)
        mask = torch.cat([self.mask.index_select(0, index), new_mask], dim=1)
        last = _last_column(len(rows), ids.shape[1], ids.device)
        hidden, logits, sub = self.model.run(ids, self._attention(mask, positions), position_ids=positions,
                                             past_key_values=sub, use_cache=True, logits_at=last)
        sub_layers = _dense_layers(sub, mask.shape[1])
        if sub_layers is None:  # the model handed back another kind of cache: feed these rows the plain way
            feed_all = [[] for _ in range(self.mask.shape[0])]
            for i, f in zip(rows, feeds, strict=True):
                feed_all[i] = f
            hidden_all, logits_all = self._step_all(feed_all)
            return hidden_all[index], logits_all[index]
        for full, part in zip(layers, sub_layers, strict=True):
            for name in ("keys", "values"):
                t, new = getattr(full, name), getattr(part, name)[:, :, old:]
                grown = torch.cat([t, t.new_zeros((t.shape[0], t.shape[1], new.shape[2], t.shape[3]))], dim=2)
                grown[index, :, old:] = new
                setattr(full, name, grown)
        cols = torch.zeros((self.mask.shape[0], new_mask.shape[1]), dtype=self.mask.dtype, device=self.mask.device)
        cols[index] = new_mask
        self.mask = torch.cat([self.mask, cols], dim=1)
        self.lengths = self.lengths.index_add(0, index, new_mask.sum(1))
        self.splits += 1
        self._maybe_compact()
        return hidden[:, -1], logits

    def _attention(self, mask: torch.Tensor, positions: torch.Tensor) -> Any:
        """The attention mask of a forward: the (R, T) mask of real columns, or under `masks` 4-D ones
        (R, 1, S, T) from positions: a query sees the real columns at or before its position (within the
        window on sliding layers) and its own column (a hole then attends to something: no NaN)."""
        if self.masks is None:
            return mask
        kind, windows = self.masks
        n, width = positions.shape[1], mask.shape[1]
        q = positions[:, :, None]  # (R, S, 1)
        k = (mask.cumsum(1) - 1)[:, None, :]  # (R, 1, T): each real column's position
        seen = mask.bool()[:, None, :] & (k <= q)
        own = torch.zeros((n, width), dtype=torch.bool, device=mask.device)
        own[torch.arange(n), torch.arange(width - n, width)] = True

        def made(window: int | None) -> torch.Tensor:
            return as_mask((seen & (q - k < window) if window else seen) | own, kind, self.model.dtype)

        return {t: made(w) for t, w in windows.items()} if isinstance(windows, dict) else made(windows)

    def _maybe_compact(self) -> None:
        width, longest = self.mask.shape[1], int(self.lengths.max())
        if width - longest <= COMPACT_SLACK + COMPACT_RATIO * longest:
            return
        layers = _dense_layers(self.cache, width)
        if layers is None:
            return
        mask, order = torch.sort(self.mask, dim=1, stable=True)  # holes first, then real columns in order
        keep = order[:, width - longest:]  # (B, longest): each row's real columns, right-aligned
        for layer in layers:
            index = keep[:, None, :, None].expand(-1, layer.keys.shape[1], -1, layer.keys.shape[3])
            layer.keys, layer.values = layer.keys.gather(2, index), layer.values.gather(2, index)
        self.mask = mask[:, width - longest:]
        self.compactions += 1


COMPACT_SLACK, COMPACT_RATIO = 64, 1.0  # the generic cache is compacted when holes > slack + ratio x longest row
SPLIT_MIN = 256  # token slots narrow rows would waste in a wide step before the wide rows run apart


def _dense_layers(cache: Any, width: int) -> list[Any] | None:
    """The layers of a plain dynamic KV cache whose keys/values are (B, H, width, d), or None when the
    cache is anything else (sliding-window or static layers, legacy tuples): those are left alone."""
    from transformers.cache_utils import DynamicLayer

    layers = getattr(getattr(cache, "self_attention_cache", cache), "layers", None)
    if not layers:
        return None
    for layer in layers:
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        if type(layer) is not DynamicLayer or not isinstance(keys, torch.Tensor) or keys.dim() != 4 \
                or keys.shape[2] != width or not isinstance(values, torch.Tensor) or values.shape[:3] != keys.shape[:3]:
            return None
    return layers


UNSUPPORTED = "unsupported"


def own_masks(model: OneGenModel) -> tuple[str, Any] | str | None:
    """How `_CachedStepper` masks `model` (found once, kept on the model): None when the model's own
    masks are right (no sliding window in use); (mask kind, windows) when the stepper makes them, windows
    being one window for every layer or {layer type: window or None} for configs that declare
    `layer_types`; `UNSUPPORTED` when the model takes no such masks, declares other layer types, or does
    not reproduce recomputation under them (`_masks_hold`): the engine then recomputes (slow, exact)."""
    if hasattr(model, "_engine_masks"):
        return model._engine_masks
    cfg = model.hf_model.config
    window = sliding_window(cfg)
    types = set(getattr(cfg, "layer_types", None) or [])
    result: tuple[str, Any] | str | None = None
    if window is not None and (not types or "sliding_attention" in types):
        kind = model.packing_mask_kind()
        windows: Any = {t: window if t == "sliding_attention" else None for t in types} if types else window
        if kind not in ("bool", "additive") or not types <= {"full_attention", "sliding_attention"}:
            result = UNSUPPORTED
        else:
            result = (kind, windows) if _masks_hold(model, (kind, windows)) else UNSUPPORTED
        if result == UNSUPPORTED:
            log.warning("generic decoding recomputes every step (slow): cached steps with rows at different "
                        "phases are not exact for this sliding-window model")
    model._engine_masks = result
    return result


@torch.no_grad()
def _masks_hold(model: OneGenModel, masks: tuple[str, Any]) -> bool:
    """Whether cached steps with holes under `masks` give the recomputed hidden states."""
    vocab = model.hf_model.get_input_embeddings().weight.shape[0]
    feeds = [[[3, 5, 7, 9, 11], [4, 6]], [[13], []], [[15], [8, 10, 12]], [[17], [14]]]
    feeds = [[[t % vocab for t in f] for f in step] for step in feeds]
    was_training = model.training
    model.eval()
    try:
        cached, history = _CachedStepper(model, 2, masks), [[], []]
        for step in feeds:
            hidden, _ = cached.step(step, [])
            history = [h + f for h, f in zip(history, step, strict=True)]
        ref, _ = _RecomputeStepper(model, 2).step([[], []], history)
        tol = 1e-3 if model.dtype == torch.float32 else 5e-2  # a wrong mask is off by far more
        return torch.allclose(hidden.float(), ref.float(), atol=tol, rtol=tol)
    except (RuntimeError, ValueError, TypeError, KeyError):
        return False
    finally:
        model.train(was_training)


class _RecomputeStepper:
    """No cache: every step re-runs each row's full history (left-padded). For equivalence tests."""

    needs_history = True

    def __init__(self, model: OneGenModel, n_rows: int):
        self.model = model

    def step(self, feeds: list[list[int]], histories: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        dev = self.model.device
        width = max(len(h) for h in histories)
        ids = torch.full((len(histories), width), self.model.ids.pad, dtype=torch.long)
        mask = torch.zeros((len(histories), width), dtype=torch.long)
        for i, h in enumerate(histories):
            ids[i, width - len(h):] = torch.tensor(h)
            mask[i, width - len(h):] = 1
        ids, mask = ids.to(dev), mask.to(dev)
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        last = _last_column(len(histories), width, dev)
        hidden, logits, _ = self.model.run(ids, mask, position_ids=positions, logits_at=last)
        return hidden[:, -1], logits
