"""The `onegen` command: a thin map from verbs to library functions (no logic here).

User errors (`OneGenError`) print one line to stderr and exit with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from .argtypes import NON_NEGATIVE, POSITIVE, Parser, at_least
from .device import device_arg
from .errors import OneGenError
from .synth import MIN_SIZE


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a OneGen model from a YAML config (dotted overrides allowed)",
                       description="onegen train --config FILE.yaml [--section.key value ...]")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", help="training config (YAML)")
    src.add_argument("--workflow", help="a workflow JSON file of the paper's repository")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_data(sub) -> None:
    p = sub.add_parser("data", help="generate, inspect and convert data")
    dsub = p.add_subparsers(dest="data_cmd", required=True)
    s = dsub.add_parser("synth", help="generate a fictional world in the native formats")
    s.add_argument("--task", choices=["qa", "multihop", "el"], required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--size", type=at_least(MIN_SIZE), default=200,
                   help=f"number of entities in the world (at least {MIN_SIZE})")
    s = dsub.add_parser("show", help="print samples with their token roles marked")
    s.add_argument("file")
    s.add_argument("--config", help="a training config (tokenizer, tokens, corpus, task)")
    s.add_argument("--model", help="a model directory whose tokenizer to use")
    s.add_argument("-n", type=POSITIVE, default=1, help="how many samples")
    s.add_argument("--color", choices=["auto", "always", "never"], default="auto")
    s = dsub.add_parser("convert", help="convert a public dataset into the native formats")
    s.add_argument("--from", dest="source", choices=["hotpotqa", "2wiki", "selfrag", "aida"], required=True)
    s.add_argument("input")
    s.add_argument("--out", required=True)
    s.add_argument("--unit", choices=["paragraph", "sentence", "document"], default=None,
                   help="corpus unit (hotpotqa, 2wiki: paragraph|sentence) or item unit (aida: document|sentence)")
    s.add_argument("--split", choices=["train", "eval", "both"], default="both",
                   help="which files to make of the records (AIDA's own train/testa/testb parts win)")
    s.add_argument("--entities", help="aida: JSONL of entity descriptions (id or title, text) for the corpus")


def _add_index(sub) -> None:
    p = sub.add_parser("index", help="embed a corpus with a model and save the index")
    p.add_argument("--model", required=True)
    p.add_argument("--corpus", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--backend", choices=["flat", "flat-int8", "faiss-flat", "faiss-hnsw", "faiss-ivf"], default="flat")
    p.add_argument("--batch-size", type=POSITIVE, default=32)
    p.add_argument("--max-tokens", type=POSITIVE, default=None,
                   help="batch by a budget of padded tokens (rows x longest) instead of --batch-size documents")
    p.add_argument("--device", default=None, type=device_arg)


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="answer questions (or link entities) with one-pass retrieval")
    p.add_argument("--model", required=True)
    p.add_argument("--index", required=True)
    p.add_argument("--input", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--task", choices=["qa", "el"], default="qa")
    p.add_argument("--mode", choices=["onegen", "pipeline", "reencode"], default="onegen")
    p.add_argument("--retriever", help="pipeline mode: the separate embedder (a model dir)")
    p.add_argument("--batch-size", type=POSITIVE, default=8)
    p.add_argument("--max-new-tokens", type=POSITIVE, default=None,
                   help="default: 64 for qa; for el twice the text's tokens + 32 (the text is written out again "
                        "with its mentions marked)")
    p.add_argument("--top-k", type=POSITIVE, default=5)
    p.add_argument("--max-retrievals", type=NON_NEGATIVE, default=4)
    p.add_argument("--device", default=None, type=device_arg)
    p.add_argument("--fast", action=argparse.BooleanOptionalAction, default=None,
                   help="the fast decode path (static cache, CUDA graphs): --fast requires it, --no-fast turns "
                        "it off; default: on when the model runs on CUDA and is supported")


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="score predictions; prints one JSON object of metrics")
    p.add_argument("--task", choices=["qa", "el"], required=True)
    p.add_argument("--gold", required=True)
    p.add_argument("--pred", required=True)
    p.add_argument("--k", type=POSITIVE, default=None)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="onegen", description="One LLM that generates and retrieves in one pass.")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="cmd", required=True)
    _add_train(sub)
    _add_data(sub)
    _add_index(sub)
    _add_generate(sub)
    _add_eval(sub)
    p = sub.add_parser("demo", help="the main job on a generated world: train, index, answer, compare")
    p.add_argument("--task", choices=["qa", "multihop", "el"], default=None)
    p.add_argument("--out", default="demo_runs")
    p.add_argument("--ablations", action="store_true",
                   help="also train a retrieval-only and a generation-only model (the two-model system; ~+4 min)")
    p = sub.add_parser("bench", help="benchmarks (CPU-sized defaults; --device cuda for GPU sizes)")
    p.add_argument("what", choices=["inference", "train", "index"])
    p.add_argument("rest", nargs=argparse.REMAINDER)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.cmd != "train":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return _dispatch(args, extra) or 0
    except OneGenError as e:
        print(f"onegen {args.cmd}: error: {e.one_line()}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"onegen {args.cmd}: interrupted", file=sys.stderr)
        return 130


def _dispatch(args: argparse.Namespace, extra: list[str]) -> int | None:
    from . import commands

    return getattr(commands, f"cmd_{args.cmd}")(args, extra)


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["main", "build_parser"]
