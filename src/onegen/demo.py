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
This module holds the recipe, the world and data, the training configs and the run; the MiniLM start
is `demo_minilm`, the systems and their scoring `demo_systems`, the report `demo_report` (none of
them imports this module).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .config import TokensConfig, TrainConfig
from .data import Corpus, read_corpus, read_el_items, read_eval_items
from .demo_minilm import minilm_dir, prepare_minilm_start
from .demo_report import print_report, save_plot, timing_line
from .demo_systems import build_systems, by_wording, evaluate, load_trained
from .io import read_jsonl, write_json_atomic, write_jsonl_atomic
from .synth import synth
from .tasks import el_to_sample

TASKS = ("qa", "multihop", "el")


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


# -- 3. training configs ---------------------------------------------------------------------------

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
    start = prepare_minilm_start(st_dir, corpus, run_dir / "minilm-start", recipe.max_length,
                                 recipe.doc_max_length)
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
                write_jsonl_atomic(run_dir / f"gold-{task}.jsonl", gold)  # the items scored: `onegen eval` input
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
