"""Index: corpus embedding (naive / length-sorted / token-budget batches) and exact search (fp32/fp16 vs int8).

    python benchmarks/bench_index.py [--device cuda] [--skip embed|search]

Prints tables, writes benchmarks/results/index.json and index.png (same as `onegen bench index`).
"""

import sys

from onegen.bench import main

if __name__ == "__main__":
    sys.exit(main(["index", *sys.argv[1:]]))
