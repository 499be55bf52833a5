"""Per-answer latency: onegen vs reencode vs pipeline, side by side in one run.

    python benchmarks/bench_inference.py inference [--query-lengths 64 256 1024] [--retrievals 1 4]

Prints a table, writes benchmarks/results/inference.json and inference.png.
"""

import sys

from onegen.bench import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or ["inference"]))
