#!/usr/bin/env bash
# GPU smoke check (<= 90 s on an H100): everything imports and every bench runs, tiny sizes, on CUDA.
# Run it on the device machine before benchmarks/gpu_suite.sh (see BENCHMARKS.md, "How to run the GPU suite"):
#     bash benchmarks/gpu_smoke.sh            # writes $OUT/smoke.log and $OUT/{inference,train,index}.{json,png}
# Environment: OUT (output folder; default benchmarks/results/smoke), PYTHON (default python3),
# DEVICE (default cuda; DEVICE=cpu runs the same commands here, as a dry run of the script itself).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/smoke}
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
mkdir -p "$OUT"
LOG="$OUT/smoke.log"
: >"$LOG"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
DTYPE=bfloat16
[ "$DEVICE" = cpu ] && DTYPE=float32
failed=0

step() {  # step NAME SECONDS command...: run with a time limit, log it, go on whatever happens
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit}s): $*" | tee -a "$LOG"
    local t0=$SECONDS
    timeout -k 5 "$limit" "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$LOG"
    [ "$rc" = 0 ] || failed=$((failed + 1))
}

step env 30 "$PY" -c "import sys, torch, transformers, onegen.bench.inference, onegen.bench.train, onegen.bench.index
print(sys.version.split()[0], 'torch', torch.__version__, 'transformers', transformers.__version__,
      'cuda', torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '')
assert '$DEVICE' == 'cpu' or torch.cuda.is_available(), 'no CUDA device'"
step inference 40 "$PY" -m onegen.cli bench inference --device "$DEVICE" --size tiny --dtype "$DTYPE" --engine both \
    --batches 1 8 --prompt-tokens 32 --new-tokens 24 --every 8 --index-rows 100000 --query-lengths 64 \
    --answers 16 --retrievals 1 2 --doc-tokens 16 --corpus-size 32 --repeats 1 --out "$OUT"
step train 25 "$PY" -m onegen.cli bench train --device "$DEVICE" --models 1b-mini --scale 0.1 --repeats 1 \
    --dtype "$DTYPE" --out "$OUT"
step index 25 "$PY" -m onegen.cli bench index --device "$DEVICE" --model 7b-mini --docs 100 --scale 0.1 \
    --rows 100000 --dim 256 --max-tokens 4096 --repeats 1 --dtype "$DTYPE" --out "$OUT"
echo "=== smoke: $failed step(s) failed" | tee -a "$LOG"
exit "$failed"
