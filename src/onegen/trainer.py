"""The training loop: joint LM + retrieval training on `accelerate`, with checkpoints and exact resume.

`train(config)` validates every input before it creates the run directory, then:
1. builds the model (pretrained path or scratch), renders all samples once;
2. for each optimizer step takes a fixed slice of a per-epoch seeded permutation (so the data
   position is the step number), splits it over ranks and into accumulation micro-batches, collates
   each with an RNG seeded from (seed, step, rank, micro-batch);
3. normalises losses by the step's token/query counts over all ranks (1 x 8 == 4 x 2 exactly);
4. logs metrics.jsonl, checkpoints every `save_every` steps (atomic directories: `rundir`), and at the end
   saves the model to `RUN/model`, a loss curve to `RUN/loss.png`.
An interrupted run started again with the same config resumes from its last complete checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import random
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from . import rundir
from .collate import Collator, pack_options
from .config import TrainConfig
from .data import Corpus, Sample, read_corpus, read_el_items, read_samples
from .errors import OneGenError
from .hfparts import set_checkpointing
from .io import write_json_atomic, write_text_atomic
from .losses import Objective
from .model import OneGenModel
from .render import Rendered, TruncationError
from .rundir import CKPT_DIR, STATE_FILE

__all__ = ["CKPT_DIR", "STATE_FILE", "build_model", "load_training_data", "render_all", "train"]

log = logging.getLogger(__name__)


def load_training_data(config: TrainConfig) -> tuple[Corpus | None, list[Sample]]:
    """Read and validate the corpus and the training samples named by the config."""
    d, tokens = config.data, config.tokens
    if d.format == "onegen-original":  # the paper's db.jsonl / train.jsonl
        from .original import read_original

        if d.task != "qa":
            raise OneGenError("the paper's train.jsonl holds samples: use data.task qa with it", field="data.task")
        return read_original(d.train, d.corpus, tokens)
    corpus = read_corpus(d.corpus) if d.corpus else None
    if d.task == "el":
        from .tasks import el_to_sample

        if corpus is None:
            raise OneGenError("entity linking needs a corpus of entities (set data.corpus)", field="data.corpus")
        return corpus, [el_to_sample(item, tokens) for item in read_el_items(d.train, corpus)]
    return corpus, read_samples(d.train, tokens.query, corpus, close_token=tokens.close, open_token=tokens.open)


def _texts_for_tokenizer(corpus: Corpus | None, samples: list[Sample]) -> list[str]:
    texts = [m.content for s in samples for m in s.messages]
    if corpus is not None:
        texts += [d.text for d in corpus.docs]
    return texts


def build_model(config: TrainConfig, corpus: Corpus | None, samples: list[Sample], run_dir: Path,
                progress: bool = False) -> OneGenModel:
    """The model to train; a from-scratch tokenizer is trained once (its progress shown with
    `progress`) and kept in the run directory."""
    tok_dir = run_dir / "tokenizer"
    tok_cfg = config.tokenizer
    if config.model.scratch is not None and tok_cfg.train is not None and tok_dir.is_dir():
        tok_cfg = type(tok_cfg)(name_or_path=str(tok_dir), train=None)
    model = OneGenModel.from_config(config.model, tok_cfg, config.tokens,
                                    texts=_texts_for_tokenizer(corpus, samples),
                                    max_length=config.data.max_length, doc_max_length=config.data.doc_max_length,
                                    progress=progress)
    model.renderer.on_truncation = config.data.on_truncation
    if config.train.lora is not None:
        model.add_lora(config.train.lora)
    elif model.is_lora:  # full fine-tuning of a LoRA model: its adapter folded into the weights first
        log.info("merging the LoRA adapter of %s: every weight is trained and saved", config.model.name_or_path)
        model.merge_lora()
    if config.model.gradient_checkpointing:
        set_checkpointing(model.hf_model, True)
    return model


def render_all(model: OneGenModel, samples: list[Sample], progress: bool = False) -> list[Rendered]:
    """Render every sample; truncation warns naming the samples it cut (file:line of the first few).
    Under `data.on_truncation: error` every sample is rendered first, so one error names them all."""
    from tqdm.auto import tqdm

    r = model.renderer
    rendered, cut, dropped, tail, refused = [], [], [], [], []
    for sample in tqdm(samples, desc="rendering samples", unit="sample", disable=not progress, leave=False):
        shortened = r.shortened
        try:
            out = r.render(sample)
        except TruncationError as e:
            refused.append((sample, e))
            continue
        if out is None:
            dropped.append(sample)
            continue
        if len(out.retrievals) < len(sample.retrievals):
            cut.append(sample)
        elif r.shortened > shortened:
            tail.append(sample)
        rendered.append(_drop_untargeted(out))
    n = r.max_length
    if refused:
        sample, first = refused[0]
        more = f"; {len(refused)} samples in all: {_where([s for s, _ in refused])}" if len(refused) > 1 else ""
        raise TruncationError(first.message + more, file=first.file, line=first.line, field=first.field)
    if cut:
        log.warning("data.max_length=%d cuts query tokens of %d samples; data.on_truncation shorten dropped "
                    "their cut retrievals: %s", n, len(cut), _where(cut))
    if dropped:
        log.warning("data.max_length=%d would cut query tokens of %d samples; data.on_truncation drop left "
                    "them out: %s", n, len(dropped), _where(dropped))
    if tail:
        log.warning("data.max_length=%d cuts the end of %d samples (no query token cut): %s", n, len(tail),
                    _where(tail))
    if not rendered:
        raise OneGenError("no training sample is left after truncation; raise data.max_length", field="data.max_length")
    return rendered


def _where(samples: list[Sample], first: int = 5) -> str:
    """`file:line` (or the id) of the first few samples, and how many more."""
    names = [s.source or f"id {s.id}" for s in samples[:first]]
    more = f" and {len(samples) - first} more" if len(samples) > first else ""
    return ", ".join(names) + more


def _drop_untargeted(r: Rendered) -> Rendered:
    """Query tokens with no positive (the paper's null positives) stay generated but get no retrieval loss."""
    keep = [k for k, ret in enumerate(r.retrievals) if ret.positives]
    if len(keep) == len(r.retrievals):
        return r
    return dataclasses.replace(r, ret_positions=[r.ret_positions[k] for k in keep],
                               retrievals=tuple(r.retrievals[k] for k in keep))


def _packs(model: OneGenModel) -> bool:
    """Whether this model trains on packed rows (`train.packing`): it must pass the packing probe."""
    kind = model.packing_mask_kind()
    if kind is None:
        log.warning("train.packing: this model does not reproduce its forward on packed rows (4-D masks "
                    "with position ids); training with padded batches instead")
    else:
        log.info("train.packing: samples and documents packed into shared rows (%s mask)", kind)
    return kind is not None


def _precision(name: str) -> str:
    if name == "fp16" and not torch.cuda.is_available():  # accelerate would run it in float32, silently
        raise OneGenError("train.precision fp16 needs a CUDA GPU (loss scaling); on a CPU use bf16 or no",
                          field="train.precision")
    if name != "auto":
        return name
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "no"


def _accelerator(precision: str, cpu: bool):
    """An `Accelerator` for this run. accelerate keeps one state per process and refuses a second one
    with another precision, so a later `train()` in the same process (another config, the demo's
    several models) first resets the precision state; the process group (PartialState) is kept."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    shared = AcceleratorState._shared_state
    if shared and shared.get("_mixed_precision") != precision:
        AcceleratorState._reset_state()
        GradientState._reset_state()
    # the scheduler steps once per optimizer step (by `train`), not once per process as accelerate would
    return Accelerator(mixed_precision=precision, cpu=cpu, step_scheduler_with_optimizer=False)


def _step_indices(n: int, global_batch: int, step: int, seed: int) -> list[int]:
    """The sample indices of optimizer step `step`: a slice of a per-epoch seeded permutation."""
    per_epoch = max(1, n // global_batch)
    epoch, i = divmod(step, per_epoch)
    return list(_epoch_order(n, seed, epoch)[i * global_batch:(i + 1) * global_batch])


@functools.lru_cache(maxsize=2)
def _epoch_order(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    """The seeded permutation of one epoch, made once per epoch (not per step: O(n) each)."""
    perm = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(perm)
    return tuple(perm)


def train(config: TrainConfig, progress: bool | None = None) -> Path:
    """Train a OneGen model as the config says; returns the run directory. `progress` False (or
    `train.progress: false`) also silences transformers' own bars (loading, writing weights)."""
    with _hf_progress(config.train.progress if progress is None else progress):
        return _train(config, progress)


@contextlib.contextmanager
def _hf_progress(show: bool) -> Iterator[None]:
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    if not show:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was and not show:
            hf_logging.enable_progress_bar()


def _train(config: TrainConfig, progress: bool | None) -> Path:
    from accelerate.utils import set_seed
    from transformers import get_scheduler

    config.validate_for_training()
    tc = config.train
    corpus, samples = load_training_data(config)  # 1. validate inputs before writing anything
    cpu = not torch.cuda.is_available()
    accelerator = _accelerator(_precision(tc.precision), cpu)
    rank, world = accelerator.process_index, accelerator.num_processes
    run_dir = Path(config.output_dir)
    set_seed(tc.seed)
    show_setup = (tc.progress if progress is None else progress) and accelerator.is_main_process
    model = build_model(config, corpus, samples, run_dir, show_setup)
    rendered = render_all(model, samples, show_setup)
    lm_on, ret_on = config.loss.lm_weight > 0, config.loss.retrieval_weight > 0
    if not lm_on:  # retrieval-only training: samples without a query token teach nothing
        rendered = [r for r in rendered if r.ret_positions]
        if not rendered:
            raise OneGenError("loss.lm_weight is 0 but no training sample has a query token", field="loss.lm_weight")
    packing = tc.packing and _packs(model)
    collator = Collator(corpus, model.renderer.encode_document, model.ids.pad, config.loss.negatives,
                        config.loss.in_batch_negatives, lm=lm_on, retrieval=ret_on, query_id=model.ids.query,
                        query_weight=config.loss.query_token_weight, **pack_options(model, packing))
    objective = Objective(config.loss)

    global_batch = tc.batch_size * world
    per_epoch = max(1, len(rendered) // global_batch)
    total_steps = tc.max_steps or tc.epochs * per_epoch
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)
    warmup = tc.warmup_steps or int(tc.warmup_ratio * total_steps)
    scheduler = get_scheduler("constant_with_warmup" if tc.schedule == "constant" else tc.schedule, optimizer,
                              num_warmup_steps=warmup, num_training_steps=total_steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    inner: OneGenModel = accelerator.unwrap_model(model)
    head = inner.logits if inner.head_isolated else None

    # 2. the run directory: created only now that inputs and model are good
    start_step = 0
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        rundir.remove_incomplete_checkpoints(run_dir)
        config.save(run_dir / "config.yaml")
        tok_dir = run_dir / "tokenizer"
        if config.model.scratch is not None and config.tokenizer.train is not None and not tok_dir.is_dir():
            inner.tokenizer.save_pretrained(str(tok_dir))
    accelerator.wait_for_everyone()
    if tc.resume:
        start_step = rundir.resume(accelerator, run_dir)
    metrics_path = run_dir / "metrics.jsonl"
    history = rundir.load_history(metrics_path, start_step) if accelerator.is_main_process else []
    if accelerator.is_main_process:  # rewritten once (a resumed run drops records past its checkpoint), then appended
        write_text_atomic(metrics_path, "".join(json.dumps(r) + "\n" for r in history))
    logged = len(history)

    show = (tc.progress if progress is None else progress) and accelerator.is_main_process
    from tqdm.auto import tqdm

    bar = tqdm(total=total_steps, initial=start_step, desc="training", disable=not show, unit="step")
    gather = world > 1 and config.loss.gather_across_ranks
    model.train()
    for step in range(start_step, total_steps):
        t0 = time.perf_counter()
        # 3. this rank's samples, its micro-batches, and the step's counts over all ranks
        idx = _step_indices(len(rendered), global_batch, step, tc.seed)
        local = idx[rank * tc.batch_size:(rank + 1) * tc.batch_size] or idx[:1]
        micro_size = math.ceil(len(local) / tc.grad_accum)
        micro = [local[i:i + micro_size] for i in range(0, len(local), micro_size)]
        batches = [collator([rendered[i] for i in m], random.Random(hash((tc.seed, step, rank, j))))
                   for j, m in enumerate(micro)]
        counts = torch.tensor([sum(len(b["lm_targets"]) for b in batches),
                               sum(len(b["query_targets"]) for b in batches)], dtype=torch.float64,
                              device=accelerator.device)
        counts = accelerator.reduce(counts, reduction="sum") if world > 1 else counts
        sums = {"lm_loss": 0.0, "retrieval_loss": 0.0, "retrieval_correct": 0.0, "tokens": 0}
        for j, batch in enumerate(batches):
            sums["tokens"] += int(batch["n_tokens"])
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            ctx = accelerator.no_sync(model) if j < len(batches) - 1 else contextlib.nullcontext()
            with ctx, accelerator.autocast():
                out = model(batch)
                terms = objective(out, batch, head, float(counts[0]), float(counts[1]), world, gather)
                accelerator.backward(terms["loss"])
            for k in ("lm_loss", "retrieval_loss", "retrieval_correct"):  # this rank's share of the global value
                sums[k] += float(terms[k]) / (world if k != "retrieval_correct" else 1)
        if tc.max_grad_norm:
            accelerator.clip_grad_norm_(params, tc.max_grad_norm)
        lr = scheduler.get_last_lr()[0]  # the rate this step ran at (logged below)
        optimizer.step()
        if not getattr(optimizer, "step_was_skipped", False):  # a step fp16 loss scaling skipped keeps its lr
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        # 4. metrics (summed over ranks: each holds its share of the global means), checkpoint
        done = step + 1
        if world > 1:
            keys = ("lm_loss", "retrieval_loss", "retrieval_correct", "tokens")
            total = accelerator.reduce(torch.tensor([float(sums[k]) for k in keys], dtype=torch.float64,
                                                    device=accelerator.device), reduction="sum")
            sums = dict(zip(keys, total.tolist(), strict=True))
        record = {"step": done, "epoch": round(done / per_epoch, 4), "lm_loss": sums["lm_loss"],
                  "retrieval_loss": sums["retrieval_loss"],
                  "retrieval_acc": sums["retrieval_correct"] / max(1.0, float(counts[1])),
                  "lr": lr,
                  "tokens_per_s": sums["tokens"] / max(time.perf_counter() - t0, 1e-9)}
        history.append(record)
        bar.update(1)
        bar.set_postfix(lm=f"{record['lm_loss']:.3f}", ret=f"{record['retrieval_loss']:.3f}")
        # a checkpoint also at the last step, so a run can be continued with a larger max_steps
        checkpoint = bool(tc.save_every) and (done % tc.save_every == 0 or done == total_steps)
        if accelerator.is_main_process and (done % tc.log_every == 0 or done == total_steps or checkpoint):
            logged = rundir.append_records(metrics_path, history, logged, sync=checkpoint)  # resume keeps it
        if checkpoint:
            rundir.save_checkpoint(accelerator, run_dir, done, tc.keep_checkpoints)
    bar.close()
    if accelerator.is_main_process:
        rundir.append_records(metrics_path, history, logged, sync=True)
        inner.save_pretrained(run_dir / "model")
        _plot(history, run_dir / "loss.png")
        write_json_atomic(run_dir / "summary.json", {"steps": total_steps, "final": history[-1] if history else {},
                                                     "world_size": world, "samples": len(rendered)})
    accelerator.wait_for_everyone()
    return run_dir



def _plot(history: list[dict], path: Path) -> None:
    """Loss curves (LM and retrieval) against the step, as a PNG."""
    if not history:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in history]
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
    ax[0].plot(steps, [r["lm_loss"] for r in history])
    ax[0].set(title="LM loss (GEN tokens)", xlabel="step")
    ax[1].plot(steps, [r["retrieval_loss"] for r in history], color="tab:orange")
    ax[1].set(title="retrieval loss", xlabel="step")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
