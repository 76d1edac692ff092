#!/usr/bin/env bash
# #23's GPU checks and measurements in one call of a lent GPU machine (the device tool), inside a time budget.
#
# 1. The engine tests that compare batched serving with each session served alone, on the GPU
#    (COEXIT_TEST_DEVICE=cuda: CUDA graphs per bucket, the overlap lane's stream, the mixed pass on the device).
# 2. bench/cloud_load.py, most needed first, each run under what is left of the budget:
#    a. the TinyLlama shape (22 layers, d 2048, split 11, random bf16 weights), prompt 128: 256 sessions, then 1
#       and 64, one server process;
#    b. the same shape at 256 sessions behind 1, 2 and 4 front-end processes;
#    c. the bundled default model at 1, 64 and 256 sessions.
#    CLIENTS load-generator processes (6) and THREADS server compute threads (4), STEPS decode steps (64).
# Everything goes to OUT_DIR/gpu_engine.txt (and each step's own log beside it). Each step has a time limit of its
# own (a step that hangs leaves time to the ones after it) and stops at the end of the budget; a step cut says so,
# and one with too little budget left is skipped.
#
# The machine has no registry: bring .whl/ from bench/gpu_wheels.sh (pass it in the device tool's `carry`).
#   bash bench/gpu_engine.sh OUT_DIR [BUDGET_S]          # e.g. bash bench/gpu_engine.sh $OUT 520
#   BIG=8 SMALL=1,4 STEPS=8 SHAPE=default bash bench/gpu_engine.sh /tmp/o 900   # the plumbing, on a CPU
set -uo pipefail
OUT=${1:?usage: bench/gpu_engine.sh OUT_DIR [BUDGET_S]}
BUDGET=${2:-520}
BIG=${BIG:-256} SMALL=${SMALL:-1,64} STEPS=${STEPS:-64} CLIENTS=${CLIENTS:-6} THREADS=${THREADS:-4}
SHAPE=${SHAPE:-tinyllama}
T0=$(date +%s)
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
LOG="$OUT/gpu_engine.txt"
PY=${PY:-python3}
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
if [ -d .whl ] && ! "$PY" -c "import coexit.v1.coexit_pb2_grpc" 2>/dev/null; then
    LIB=/tmp/coexit-pylib  # the checkout first (its code), then the wheels (newer grpcio, the entry points)
    "$PY" -m pip install -q --no-index --no-deps --target "$LIB" .whl/*.whl
    export PYTHONPATH="$PWD:$LIB${PYTHONPATH:+:$PYTHONPATH}"
fi

left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
say() { echo "$*" | tee -a "$LOG"; }
step() {  # step NAME MIN_S MAX_S COMMAND...: at most MAX_S s and what is left of the budget; its log beside LOG
    local name=$1 need=$2 most=$3 t rc limit
    shift 3
    if [ "$(left)" -lt "$need" ]; then
        say "## $name: skipped, $(left) s left of the budget (needs about $need s)"
        return 1
    fi
    limit=$(left)
    [ "$limit" -gt "$most" ] && limit=$most  # (a step that hangs leaves the budget to the ones after it)
    say "## $name ($(left) s left, at most $limit s)"
    say "\$ $*"
    t=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
    rc=$?
    grep -E '^(shape|\|)|passed|failed|error|Error' "$OUT/$name.log" | tail -40 | tee -a "$LOG"
    if [ $rc -ne 0 ]; then
        say "(exit $rc$([ $rc -eq 124 ] && echo ': cut at its time limit'); the last lines of its log:)"
        tail -15 "$OUT/$name.log" | tee -a "$LOG"
    fi
    say "($(( $(date +%s) - t )) s)"
    return $rc
}

say "# bench/gpu_engine.sh, $(date -u +%FT%TZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | tee -a "$LOG"
"$PY" -c "import torch, grpc, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', \
torch.cuda.is_available(), 'grpcio', grpc.__version__)" 2>&1 | tee -a "$LOG"
say "nproc $(nproc); budget ${BUDGET} s; clients $CLIENTS, server threads $THREADS, $STEPS decode steps"

device=$("$PY" -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")
step engine_tests 60 150 env COEXIT_TEST_DEVICE="$device" "$PY" -m pytest -p no:cacheprovider \
    tests/cloud/test_engine.py -k "equal_sessions_alone or equals_sessions_alone or equals_contiguous"

CKPT=/tmp/coexit-gpu-engine-$SHAPE
if [ ! -f "$CKPT/config.json" ]; then
    step write_"$SHAPE" 30 120 "$PY" -c "import sys; sys.path.insert(0, 'bench'); from pathlib import Path; \
import cloud_load; cloud_load.write_shape('$SHAPE', Path('$CKPT'))"
fi
load=("$PY" bench/cloud_load.py --model "$CKPT" --shape "$SHAPE" --steps "$STEPS" --clients "$CLIENTS"
      --server-threads "$THREADS")
step "${SHAPE}_one_process" 90 200 "${load[@]}" --sessions "$BIG,$SMALL" || true
for f in 1 2 4; do
    step "${SHAPE}_${f}_frontends" 60 100 "${load[@]}" --sessions "$BIG" --frontends "$f" || break
done
step default_model 60 120 "$PY" bench/cloud_load.py --model models/coexit-code-small --steps "$STEPS" \
    --clients "$CLIENTS" --server-threads "$THREADS" --sessions "1,64,$BIG" || true
say "# done in $(( $(date +%s) - T0 )) s"
