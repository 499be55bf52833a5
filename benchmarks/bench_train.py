"""Training step: the paper's padded step vs onegen's, same batch (multi-hop recipe shape), side by side.

    python benchmarks/bench_train.py [--device cuda] [--models 1b 7b] [--checkpointing 0 1]

Prints a table, writes benchmarks/results/train.json and train.png (same as `onegen bench train`).
"""

import sys

from onegen.bench import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
