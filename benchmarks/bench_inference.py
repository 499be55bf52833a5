"""Decoding with retrieval (tok/s, overhead vs plain decoding) and per-answer latency onegen vs reencode
vs pipeline, side by side in one run (`onegen bench inference --help` lists the options).

    python benchmarks/bench_inference.py [--device cuda] [--size tiny|1b|7b] [--engine fast|generic|both]

Prints a table, writes benchmarks/results/inference.json and inference.png.
"""

import sys

from onegen.bench import main

if __name__ == "__main__":
    args = sys.argv[1:]
    sys.exit(main(args if args[:1] == ["inference"] else ["inference", *args]))
