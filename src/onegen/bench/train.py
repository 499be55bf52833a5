"""`onegen bench train`: one training step, the paper's padded way vs onegen's, on the same batch.

The batch is shaped like the paper's multi-hop recipe: 2 answers of 300-900 tokens with 2 query
tokens each, 1 positive + 6 negatives of 40-200 tokens per query, max_length 1200 (all lengths
times `--scale`; CPU defaults use 1/8 and mini models). Three steps over the same content:
- `naive` (the paper's): answers and documents in ONE forward, every row padded to max_length,
  fp32 logits over the whole vocabulary at every position, CE + InfoNCE, backward;
- `padded` (a lean step): `Collator(pack=False)`, answers and documents in separate forwards, each
  padded to its own longest -> `OneGenModel.forward` (LM head only at GEN positions) ->
  `losses.Objective` -> backward;
- `onegen`: the same with `Collator(pack=True)`, as the trainer runs it (`train.packing`): answers and
  documents packed into shared rows, one forward, block-diagonal attention (`packing`).
All compute the same loss (checked in tests/test_bench.py on a fp32 model; reported per run).
Reported per model and checkpointing on/off: real tokens/s, MFU = 6 * N * real tokens / time / peak
(N: parameters without the input embedding), peak and activation memory (CUDA: allocator peak minus
weights and gradients; CPU: sampled heap growth minus gradients, approximate: `common.PeakHeap`).
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F

from ..argtypes import POSITIVE, POSITIVE_FLOAT, Parser
from ..collate import Collator, pack_options
from ..config import LossConfig, TokensConfig
from ..data import Corpus, Document, Retrieval
from ..hfparts import set_checkpointing
from ..losses import Objective
from ..model import OneGenModel
from ..render import Rendered
from ..tokens import IGNORE_INDEX
from .common import (
    PeakHeap,
    common_args,
    machine,
    median_time,
    peak_flops,
    sync,
    table,
    write_outputs,
    write_partial,
)

# name -> (hidden, layers, heads, kv heads, intermediate, vocab): TinyLlama-1.1B and Llama-2-7B shapes,
# and CPU minis that keep their vocabulary / hidden ratios (16 and 8)
SHAPES = {"1b": (2048, 22, 32, 4, 5632, 32000), "7b": (4096, 32, 32, 32, 11008, 32000),
          "1b-mini": (128, 4, 4, 2, 352, 2048), "7b-mini": (256, 4, 8, 8, 688, 2048)}
PAPER_BATCH = {"answers": 2, "answer_len": (300, 900), "queries": 2, "negatives": 6, "doc_len": (40, 200),
               "max_length": 1200}
WORDS = "velmora brandt caldris ostria founded town region river company painter born north south".split()


def build_model(shape: str, device: str, dtype: torch.dtype, seed: int = 0) -> OneGenModel:
    """A random-init Llama-shaped OneGen model (`SHAPES[shape]`) with a small BPE tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from ..tokenizer import train_bpe
    from ..tokens import add_special_tokens

    hidden, layers, heads, kv, inter, vocab = SHAPES[shape]
    tokens = TokensConfig()
    tok = train_bpe([" ".join(WORDS)] * 4, vocab_size=300, min_frequency=1, special_tokens=tokens.strings())
    add_special_tokens(tok, tokens)
    cfg = LlamaConfig(vocab_size=max(vocab, len(tok)), hidden_size=hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, intermediate_size=inter,
                      max_position_embeddings=1 << 16, pad_token_id=tok.pad_token_id,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            lm = LlamaForCausalLM(cfg).to(dtype)
    finally:
        torch.set_default_dtype(previous)
    return OneGenModel(lm, tok, tokens, max_length=4096, doc_max_length=1024)


@dataclass
class StepBatch:
    """One batch's content: rendered answers, document token ids by id, and what each query needs."""

    answers: list[Rendered]
    docs: dict[str, list[int]]  # doc id -> token ids ending with [RD]
    max_length: int

    @property
    def real_tokens(self) -> int:
        """Tokens both steps must process: every answer and every (query, candidate) document once."""
        return sum(len(a) for a in self.answers) + sum(len(self.docs[d]) for a in self.answers
                                                       for r in a.retrievals for d in (*r.positives, *r.negatives))


def make_batch(model: OneGenModel, scale: float, seed: int, recipe: dict[str, Any] = PAPER_BATCH) -> StepBatch:
    """Random token ids laid out as the recipe says; queries sit in the assistant part, each followed by
    an inserted paragraph (context: no LM loss); the prompt is context too, everything else is GEN."""
    rng = random.Random(seed)
    vocab = model.hf_model.get_input_embeddings().weight.shape[0]
    ids = model.ids
    special = {ids.query, ids.doc, ids.open, ids.close, ids.pad, ids.eos}

    def tokens(n: int) -> list[int]:
        out = []
        while len(out) < n:
            t = rng.randrange(vocab)
            if t not in special:
                out.append(t)
        return out

    lo, hi = (max(8, round(x * scale)) for x in recipe["answer_len"])
    dlo, dhi = (max(2, round(x * scale)) for x in recipe["doc_len"])
    answers, docs = [], {}
    for a in range(recipe["answers"]):
        n = rng.randint(lo, hi)
        seq, labels = tokens(n // 10), [IGNORE_INDEX] * (n // 10)  # the prompt
        gap = (n - len(seq)) // (recipe["queries"] + 1)
        ret_positions, retrievals = [], []
        for q in range(recipe["queries"]):
            body = tokens(max(1, gap // 2))
            seq += body + [ids.query]
            labels += body + [ids.query]
            ret_positions.append(len(seq) - 1)
            para = tokens(max(1, gap // 2))
            seq += [ids.open, *para, ids.close]
            labels += [IGNORE_INDEX] * (len(para) + 2)
            names = [f"a{a}q{q}d{j}" for j in range(1 + recipe["negatives"])]
            for name in names:
                docs[name] = tokens(rng.randint(dlo, dhi) - 1) + [ids.doc]
            retrievals.append(Retrieval((names[0],), tuple(names[1:])))
        tail = tokens(max(1, n - len(seq)))
        seq, labels = seq + tail, labels + tail
        answers.append(Rendered(seq, labels, ["GEN"] * len(seq), ret_positions, tuple(retrievals), f"a{a}"))
    max_length = max(round(recipe["max_length"] * scale), max(len(s.input_ids) for s in answers))
    return StepBatch(answers, docs, max_length)


def naive_loss(model: OneGenModel, batch: StepBatch, loss_cfg: LossConfig) -> torch.Tensor:
    """The paper's step: one forward over answers + each query's documents, all padded to max_length,
    fp32 logits over the whole vocabulary at every position, CE over GEN + InfoNCE per query."""
    device, pad = model.device, model.ids.pad
    rows = [a.input_ids for a in batch.answers]
    labels = [a.lm_labels for a in batch.answers]
    for a in batch.answers:
        for r in a.retrievals:
            for d in (*r.positives, *r.negatives):
                rows.append(batch.docs[d])
                labels.append([IGNORE_INDEX] * len(batch.docs[d]))
    T = batch.max_length
    ids = torch.tensor([r + [pad] * (T - len(r)) for r in rows], device=device)  # (B, T)
    mask = torch.tensor([[1] * len(r) + [0] * (T - len(r)) for r in rows], device=device)
    lab = torch.tensor([x + [IGNORE_INDEX] * (T - len(x)) for x in labels], device=device)
    out = model.hf_model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    logits = out.logits.float()  # (B, T, V): every position, full vocabulary, fp32
    lm = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), lab[:, 1:].reshape(-1),
                         ignore_index=IGNORE_INDEX)
    hidden = out.hidden_states[-1]  # (B, T, D)
    q_rows = [i for i, a in enumerate(batch.answers) for _ in a.ret_positions]
    q_pos = [p for a in batch.answers for p in a.ret_positions]
    query_vecs = hidden[q_rows, q_pos]  # (Q, D)
    n_ans = len(batch.answers)
    doc_vecs = hidden[torch.arange(n_ans, len(rows), device=device), mask[n_ans:].sum(1) - 1]
    doc_vecs = doc_vecs.reshape(len(q_rows), -1, doc_vecs.shape[-1])  # (Q, 1 + negatives, D)
    scores = torch.einsum("qd,qcd->qc", F.normalize(query_vecs.float(), dim=-1),
                          F.normalize(doc_vecs.float(), dim=-1)) / loss_cfg.temperature
    ret = F.cross_entropy(scores, torch.zeros(len(q_rows), dtype=torch.long, device=device))
    return loss_cfg.lm_weight * lm + loss_cfg.retrieval_weight * ret


def onegen_loss(model: OneGenModel, batch: StepBatch, loss_cfg: LossConfig,
                collated: dict[str, torch.Tensor] | None = None, pack: bool = True) -> torch.Tensor:
    """onegen's step as the trainer runs it: collate (packed, or `pack=False` padded per kind),
    `OneGenModel.forward`, `Objective`."""
    if collated is None:
        collated = collate(model, batch, loss_cfg, pack)
    b = {k: v.to(model.device) for k, v in collated.items()}
    out = model(b)
    terms = Objective(loss_cfg)(out, b, model.logits if model.head_isolated else None,
                                float(len(b["lm_targets"])), float(len(b["query_targets"])))
    return terms["loss"]


def collate(model: OneGenModel, batch: StepBatch, loss_cfg: LossConfig, pack: bool = False) -> dict[str, torch.Tensor]:
    corpus = Corpus([Document(d, d) for d in batch.docs])
    collator = Collator(corpus, batch.docs.__getitem__, model.ids.pad, loss_cfg.negatives, loss_cfg.in_batch_negatives,
                        **pack_options(model, pack))
    return collator(batch.answers, random.Random(0))


def _measure(model: OneGenModel, step, args: argparse.Namespace) -> dict[str, Any]:
    """Time forward + backward; memory of one step."""
    params = [p for p in model.parameters() if p.requires_grad]

    def run() -> float:
        for p in params:
            p.grad = None
        loss = step()
        loss.backward()
        return float(loss.detach())

    seconds = median_time(run, args.repeats, args.device)
    # Memory: the gradients are allocated before the step, so the peak above the base is activations
    # (with gradients appearing during backward, the peak would mix the two).
    for p in params:
        p.grad = torch.zeros_like(p)

    def accumulate() -> float:
        loss = step()
        loss.backward()
        return float(loss.detach())

    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        loss = accumulate()
        sync(args.device)
        peak = torch.cuda.max_memory_allocated()
        act = peak - base
    else:
        with PeakHeap() as heap:
            loss = accumulate()
        peak, act = heap.peak, heap.growth
    for p in params:
        p.grad = None
    return {"seconds": seconds, "loss": loss, "peak_gb": peak / 1e9, "act_gb": act / 1e9}


def bench_train(args: argparse.Namespace) -> dict[str, Any]:
    """Every model x checkpointing row; `train.json` is rewritten (marked partial) after each row, so a
    run stopped by a time limit keeps what it measured."""
    dtype = getattr(torch, args.dtype)
    peak, peak_src = peak_flops(args.device, dtype)
    loss_cfg = LossConfig(negatives=PAPER_BATCH["negatives"], in_batch_negatives=False)
    rows: list[dict[str, Any]] = []

    def result() -> dict[str, Any]:
        return {"benchmark": "train", "partial": False, "rows": rows, "peak_flops": peak, "peak_source": peak_src,
                "batch": {**PAPER_BATCH, "scale": args.scale}, "machine": machine(args.device), "args": vars(args)}

    def add(row: dict[str, Any]) -> None:
        rows.append(row)
        write_partial(result(), args.out, "train")

    for shape in args.models:
        _bench_model(shape, dtype, peak, loss_cfg, args, add)
    return result()


def _bench_model(shape: str, dtype: torch.dtype, peak: float, loss_cfg: LossConfig,
                 args: argparse.Namespace, add: Callable[[dict[str, Any]], None]) -> None:
    """The three steps on one model shape, for each checkpointing setting: one row per setting (`add`)."""
    model = build_model(shape, args.device, dtype, args.seed).train()
    n_params = sum(p.numel() for p in model.parameters()) - model.hf_model.get_input_embeddings().weight.numel()
    batch = make_batch(model, args.scale, args.seed)
    collated = collate(model, batch, loss_cfg)
    packed = collate(model, batch, loss_cfg, pack=True)
    steps = {"naive": partial(naive_loss, model, batch, loss_cfg),
             "padded": partial(onegen_loss, model, batch, loss_cfg, collated),
             "onegen": partial(onegen_loss, model, batch, loss_cfg, packed)}
    real = batch.real_tokens
    for ckpt in args.checkpointing:
        set_checkpointing(model.hf_model, bool(ckpt))
        row: dict[str, Any] = {"model": shape, "checkpointing": ckpt, "params_m": n_params / 1e6, "real_tokens": real,
                               "padded_tokens_naive": batch.max_length * (len(batch.answers) + len(collated["doc_keys"])),
                               "padded_tokens_padded": collated["input_ids"].numel() + collated["doc_input_ids"].numel(),
                               "padded_tokens_onegen": packed["input_ids"].numel() + (
                                   packed["doc_input_ids"].numel() if "doc_input_ids" in packed else 0),
                               "packing": model.packing_mask_kind()}  # None: the model failed the probe
        for name, step in steps.items():
            try:
                m = _measure(model, step, args)
            except torch.OutOfMemoryError:  # the padded step at 7B without checkpointing: a result too
                for p in model.parameters():
                    p.grad = None
                torch.cuda.empty_cache()
                row.update({f"{name}_{k}": None for k in ("tok_s", "mfu", "seconds", "loss", "peak_gb", "act_gb")})
                row[f"{name}_oom"] = True
                continue
            row[f"{name}_tok_s"] = real / m["seconds"]
            row[f"{name}_mfu"] = 6 * n_params * real / m["seconds"] / peak
            row.update({f"{name}_{k}": v for k, v in m.items()})
        for name in ("padded", "onegen"):
            both = row["naive_tok_s"] is not None and row[f"{name}_tok_s"] is not None
            suffix = "" if name == "onegen" else f"_{name}"
            row[f"speedup{suffix}"] = row[f"{name}_tok_s"] / row["naive_tok_s"] if both else None
            row[f"act_ratio{suffix}"] = (row[f"{name}_act_gb"] / row["naive_act_gb"]
                                         if both and row["naive_act_gb"] > 0 else None)
            row[f"loss_diff{suffix}"] = abs(row[f"{name}_loss"] - row["naive_loss"]) if both else None
        add(row)
        print(table([row], COLUMNS).splitlines()[1], flush=True)


COLUMNS = [("model", "model", ""), ("checkpointing", "ckpt", ""), ("real_tokens", "real tok", "d"),
           ("naive_tok_s", "naive tok/s", ".0f"), ("padded_tok_s", "padded tok/s", ".0f"),
           ("onegen_tok_s", "onegen tok/s", ".0f"), ("speedup_padded", "padded x", ".2f"), ("speedup", "onegen x", ".2f"),
           ("naive_mfu", "naive MFU", ".3f"), ("onegen_mfu", "onegen MFU", ".3f"),
           ("naive_act_gb", "naive act GB", ".3f"), ("onegen_act_gb", "onegen act GB", ".3f"),
           ("act_ratio", "act ratio", ".2f"), ("loss_diff", "|dloss|", ".1e"), ("packing", "mask", "")]


def _plot(result: dict[str, Any]) -> Any:
    import matplotlib.pyplot as plt

    rows = result["rows"]
    labels = [f"{r['model']}\nckpt {'on' if r['checkpointing'] else 'off'}" for r in rows]
    x = range(len(rows))
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    for k, (name, label) in enumerate((("naive", "paper-style padded step"), ("padded", "per-kind padding"),
                                       ("onegen", "onegen step (packed)"))):
        ax[0].bar([i + 0.27 * (k - 1) for i in x], [r[f"{name}_tok_s"] or 0 for r in rows], 0.27, label=label)
    ax[0].set(xticks=list(x), xticklabels=labels, ylabel="real tokens / s", title="Training step throughput")
    ax[0].legend(fontsize=7)
    for k, (name, label) in enumerate((("naive", "paper-style (0: OOM)"), ("padded", "per-kind padding"),
                                       ("onegen", "onegen (packed)"))):
        ax[1].bar([i + 0.27 * (k - 1) for i in x], [r[f"{name}_act_gb"] or 0 for r in rows], 0.27, label=label)
    ax[1].set(xticks=list(x), xticklabels=labels, ylabel="GB", title="Activation memory (peak - weights - grads)")
    return fig


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="onegen bench train", description="training step: paper-style padded "
                                "step vs per-kind padding vs onegen's packed step, same batch (multi-hop recipe shape)")
    common_args(p)
    p.add_argument("--models", nargs="+", choices=sorted(SHAPES), default=None,
                   help="model shapes (default: 1b-mini 7b-mini on CPU, 1b 7b on CUDA)")
    p.add_argument("--scale", type=POSITIVE_FLOAT, default=None, help="length scale of the recipe (CPU 0.125, CUDA 1)")
    p.add_argument("--checkpointing", nargs="+", type=int, choices=[0, 1], default=[0, 1])
    p.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (CUDA default)")
    p.add_argument("--repeats", type=POSITIVE, default=None, help="timed steps per measurement (CPU 2, CUDA 5)")
    args = p.parse_args(argv)
    gpu = args.device.startswith("cuda")
    args.models = args.models or (["1b", "7b"] if gpu else ["1b-mini", "7b-mini"])
    args.scale = args.scale or (1.0 if gpu else 0.125)
    args.dtype = args.dtype or ("bfloat16" if gpu else "float32")
    args.repeats = args.repeats or (5 if gpu else 2)
    print(table([], COLUMNS))
    result = bench_train(args)
    write_outputs(result, args.out, "train", _plot)
    return 0
