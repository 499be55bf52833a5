#!/usr/bin/env bash
# The GPU benchmark suite of issue 5, as ONE command for the device machine (<= 8 min on an H100).
# Run benchmarks/gpu_smoke.sh first (see BENCHMARKS.md, "How to run the GPU suite"):
#     bash benchmarks/gpu_suite.sh       # writes $OUT/suite.log and $OUT/{inference,train,index}.{json,png}
# Steps, each under its own time limit so that one hang cannot eat the budget (the rest still run):
#   1. pytest -m gpu           the CUDA tests (fast path graphs == generic tokens, flat index on CUDA)
#   2. bench inference         7B-shaped, bf16, fast path: items 1, 2, 3(a)(b)(c)
#   3. bench train             1B- and 7B-shaped, checkpointing on/off: item 4
#   4. bench index             7B-shaped embedding, 1M x 4096 exact / int8 search: item 5
# Environment: OUT (default benchmarks/results/gpu), PYTHON (default python3), DEVICE (default cuda),
# INFERENCE_ARGS / TRAIN_ARGS / INDEX_ARGS (replace each bench's sizes, e.g. tiny ones for a dry run with
# DEVICE=cpu), LIMIT_SCALE (multiplies every time limit; default 1).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu}
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
SCALE=${LIMIT_SCALE:-1}
mkdir -p "$OUT"
LOG="$OUT/suite.log"
: >"$LOG"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
INFERENCE_ARGS=${INFERENCE_ARGS:---size 7b --engine fast --repeats 2}
TRAIN_ARGS=${TRAIN_ARGS:---models 7b 1b --checkpointing 1 0 --repeats 3}  # the target row (7B, checkpointing on) first
INDEX_ARGS=${INDEX_ARGS:---model 7b --docs 1000 --repeats 1}
failed=0
start=$SECONDS

step() {  # step NAME SECONDS command...: run with a time limit, log it, go on whatever happens
    local name=$1 limit=$(( $2 * SCALE ))
    shift 2
    echo "=== $name (limit ${limit}s, suite at $((SECONDS - start)) s): $*" | tee -a "$LOG"
    local t0=$SECONDS
    timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    [ "$rc" = 124 ] && echo "=== $name: TIMED OUT" | tee -a "$LOG"
    echo "=== $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$LOG"
    [ "$rc" = 0 ] || failed=$((failed + 1))
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 || true; } | tee -a "$LOG"
# gpu tests live in a few files; naming them keeps collection from importing the rest
gpu_tests=$(grep -l "pytest.mark.gpu" tests/test_*.py | tr '\n' ' ')
# shellcheck disable=SC2086
step pytest-gpu 60 "$PY" -m pytest -q -p no:cacheprovider -m gpu $gpu_tests
# shellcheck disable=SC2086
step inference 240 "$PY" -m onegen.cli bench inference --device "$DEVICE" $INFERENCE_ARGS --out "$OUT"
# shellcheck disable=SC2086
step train 110 "$PY" -m onegen.cli bench train --device "$DEVICE" $TRAIN_ARGS --out "$OUT"
# shellcheck disable=SC2086
step index 70 "$PY" -m onegen.cli bench index --device "$DEVICE" $INDEX_ARGS --out "$OUT"
echo "=== suite: $failed step(s) failed, $((SECONDS - start)) s in all" | tee -a "$LOG"
exit "$failed"
