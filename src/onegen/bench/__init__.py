"""Benchmarks behind `onegen bench {inference,train,index}` and `benchmarks/*.py`.

Each prints a table, writes `<what>.json` and `<what>.png` under `--out` (default
`benchmarks/results`), measures every compared method side by side in one run (read the ratios:
machines are noisy) and has CPU-sized defaults; `--device cuda` switches to the GPU sizes.
- `inference`: per-answer latency, onegen vs reencode vs pipeline (`inference.py`).
- `train`: a paper-style padded step vs onegen's step on the same batch: tokens/s, MFU, memory (`train.py`).
- `index`: corpus embedding (naive / length-sorted / token-budget) and exact search (fp32/fp16 vs int8) (`index.py`).
"""

from __future__ import annotations

import importlib
import sys

WHAT = ("inference", "train", "index")


def main(argv: list[str] | None = None) -> int:
    """`main(["train", "--device", "cuda"])`: run one benchmark with its own arguments."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in WHAT:
        print(f"usage: onegen bench {{{','.join(WHAT)}}} [options]  (each has --help)", file=sys.stderr)
        return 2
    module = importlib.import_module(f".{argv[0]}", __name__)
    return module.main(argv[1:])
