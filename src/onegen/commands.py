"""What each CLI verb does, as functions of parsed arguments (the CLI only parses and dispatches)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .errors import OneGenError


def cmd_train(args: argparse.Namespace, extra: list[str]) -> int:
    from .config import TrainConfig
    from .trainer import train

    if args.workflow:
        from .workflow import load_workflow

        config = load_workflow(args.workflow, extra)
    else:
        config = TrainConfig.from_yaml(args.config, extra)
    run_dir = train(config, progress=False if args.no_progress else None)
    if os.environ.get("RANK", "0") == "0":  # under torchrun / accelerate: said once
        print(f"run directory: {run_dir}  (model: {run_dir / 'model'})")
    return 0


def cmd_data(args: argparse.Namespace, extra: list[str]) -> int:
    if args.data_cmd == "synth":
        from .synth import synth

        info = synth(args.task, args.out, seed=args.seed, size=args.size)
        counts = info.get("counts", {})
        print(f"wrote {args.out}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
        return 0
    if args.data_cmd == "show":
        return _data_show(args)
    from .convert import convert

    info = convert(args.source, args.input, args.out, unit=args.unit, split=args.split, entities=args.entities)
    print(f"wrote {args.out}: " + ", ".join(f"{k} {v}" for k, v in info["counts"].items())
          + "".join(f"; skipped {v}: {k}" for k, v in info["skipped"].items()))
    return 0


def _data_show(args: argparse.Namespace) -> int:
    from .config import TrainConfig
    from .data import read_corpus, read_el_items, read_samples
    from .model import OneGenModel
    from .render import show
    from .tasks import el_to_sample

    config = TrainConfig.from_yaml(args.config) if args.config else TrainConfig()
    tokens = config.tokens
    corpus = read_corpus(config.data.corpus) if config.data.corpus else None
    first = _first_object(args.file)  # read and check the file before loading anything
    if "entities" in first and "text" in first and "messages" not in first:
        samples = [el_to_sample(i, tokens) for i in read_el_items(args.file, corpus)]
    else:
        samples = read_samples(args.file, tokens.query, corpus, close_token=tokens.close, open_token=tokens.open,
                               require_corpus=False)  # the checks training makes
    if args.model:
        from .modeldir import check_onegen_dir

        check_onegen_dir(args.model)
        model = OneGenModel.from_pretrained(args.model)
        tokenizer, renderer = model.tokenizer, model.renderer
    else:
        from .render import Renderer
        from .tokenizer import load_tokenizer, train_bpe
        from .tokens import add_special_tokens

        name = config.tokenizer.name_or_path or config.model.name_or_path
        if name:
            tokenizer = load_tokenizer(name)
        else:  # no tokenizer given: a small BPE trained on the file itself, so roles can be shown
            text = Path(args.file).read_text(encoding="utf-8", errors="replace")
            tokenizer = train_bpe([text], vocab_size=2000, special_tokens=tokens.strings())
        add_special_tokens(tokenizer, tokens)
        renderer = Renderer(tokenizer, tokens, config.data.max_length, "shorten")
    color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
    if color:
        from rich.console import Console

        console = Console()
    for s in samples[: args.n]:
        r = renderer.render(s)
        if r is None:
            print(f"# {s.id}: dropped by truncation")
            continue
        header = f"# {s.id} ({len(r)} tokens, {len(r.ret_positions)} retrieval) — «ROLE|text»: GEN trained, CTX context, RET retrieval vector, GEN+RET both (the query token)"
        if color:
            console.print(header, markup=False)
            console.print(show(r, tokenizer, color=True))
        else:
            print(header)
            print(show(r, tokenizer))
    return 0


def _first_object(path: str) -> dict:
    from .io import iter_jsonl

    for _, obj in iter_jsonl(path):
        return obj
    raise OneGenError("file is empty (expected at least one JSON object)", file=path)


def cmd_eval(args: argparse.Namespace, extra: list[str]) -> int:
    from .evaluate import evaluate_files, render_metrics_json

    print(render_metrics_json(evaluate_files(args.task, args.gold, args.pred, k=args.k)))
    return 0


def cmd_index(args: argparse.Namespace, extra: list[str]) -> int:
    from .data import read_corpus
    from .index import Index
    from .retrievers import load_encoder

    first = _first_object(args.corpus)
    if "text" not in first and "uid" in first and "messages" in first:  # the paper's db.jsonl, as it is
        corpus = _paper_db(args.corpus, args.model)
    else:
        corpus = read_corpus(args.corpus)
    device = args.device
    if device == "cuda" and "LOCAL_RANK" in os.environ:  # torchrun: one GPU per rank
        device = f"cuda:{os.environ['LOCAL_RANK']}"
    encoder = load_encoder(args.model, device)
    if args.max_tokens is not None and args.max_tokens < 1:
        raise OneGenError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    index = Index.build(encoder, corpus, backend=args.backend, batch_size=args.batch_size, progress=True,
                        max_tokens=args.max_tokens)
    if index.rank == 0:  # a sharded build (torchrun) gives every rank the index; one writes it
        index.save(args.out)
        print(f"indexed {len(index)} documents ({args.backend}, dim {index.dim}) into {args.out}")
    return 0


def _paper_db(path: str, model_dir: str):
    """A `db.jsonl` of the paper's repository as a corpus: its rows split at the model's own document
    token (from the model directory's onegen.json), ids `uid` / `uid-k` as training reads them."""
    from .modeldir import read_meta
    from .original import read_original_db

    meta = read_meta(model_dir)
    if meta is None:
        raise OneGenError("this corpus is a db.jsonl of the paper's repository (rows with uid and messages); "
                          "index it with a OneGen model directory, whose document token splits its rows",
                          file=path)
    return read_original_db(path, meta["tokens"]["doc"]).corpus


def cmd_generate(args: argparse.Namespace, extra: list[str]) -> int:
    from .predict import predict_file

    stats = predict_file(model_dir=args.model, index_dir=args.index, input_path=args.input, out_path=args.out,
                         task=args.task, mode=args.mode, retriever=args.retriever, batch_size=args.batch_size,
                         max_new_tokens=args.max_new_tokens, top_k=args.top_k,
                         max_retrievals=args.max_retrievals, device=args.device, fast=args.fast)
    print(f"wrote {stats['n']} predictions to {args.out} ({stats['seconds']:.1f} s; "
          f"generator tokens {stats['generator_tokens']}, extra query tokens {stats['extra_query_tokens']})")
    return 0


def cmd_bench(args: argparse.Namespace, extra: list[str]) -> int:
    from .bench import main as bench_main

    return bench_main([args.what, *args.rest])


def cmd_demo(args: argparse.Namespace, extra: list[str]) -> int:
    from .demo import TASKS, DemoRecipe, run_demo

    run_demo(args.out, DemoRecipe(tasks=(args.task,) if args.task else TASKS, ablations=args.ablations))
    return 0
