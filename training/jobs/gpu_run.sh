#!/usr/bin/env bash
# One time-budgeted GPU pretraining run of the default model, as run on a lent H200 (no registry access there).
# Expects, beside the repository's own files:
#   .whl/         wheels the machine lacks: deepspeed 0.19.8 (pip wheel --no-deps), hjson, einops, msgpack, ninja,
#                 py-cpuinfo, pydantic 2.14.4 + pydantic-core 2.50.5 (cp312), annotated-types, typing-inspection,
#                 typing_extensions, psutil, tqdm
#   .gpu/train.jsonl.xz   the training text (data/corpus-large/train.jsonl, xz-compressed)
# Usage: bash training/jobs/gpu_run.sh OUT_DIR BUDGET_S   (BUDGET_S: seconds this whole script may take)
set -euo pipefail
OUT=${1:?out dir}; BUDGET=${2:-540}
T0=$(date +%s)
export TORCH_CUDA_ARCH_LIST=9.0 PYTHONUNBUFFERED=1
LIB=/tmp/coexit-pylib
python3 -m pip install -q --no-index --no-deps --target "$LIB" .whl/*.whl
export PYTHONPATH="$LIB:$PWD"
mkdir -p data/corpus-large
xz -d -T16 -c .gpu/train.jsonl.xz > data/corpus-large/train.jsonl
python3 -m training.data --out data/tokens-large --tokenizer models/coexit-code-small/tokenizer.json \
    --val-fraction 0.01 --seed 0 data/corpus-large/train.jsonl
SETUP=$(( $(date +%s) - T0 ))
LIMIT=$(( BUDGET - SETUP - 75 ))  # leaves time for start-up, the final evaluation, export and copying out
echo "setup took ${SETUP}s; training loop budget ${LIMIT}s"
JOB=training/jobs/coexit-code-small-gpu.toml
sed "s/^time_limit_s = .*/time_limit_s = $LIMIT/" $JOB > training/jobs/.gpu-run.toml
python3 -m torch.distributed.run --nproc_per_node 1 -m training.cli --config training/jobs/.gpu-run.toml \
    2>&1 | tee "$OUT/train.log" | grep -v "^\s*$" | tail -40
EXP=runs/coexit-code-small-gpu/export
tail -n 3 runs/coexit-code-small-gpu/metrics.jsonl >> "$OUT/train.log" || true
cp $EXP/config.json "$OUT/"
python3 - "$EXP/model.safetensors" <<'PY'  # ship bf16, as the bundled model is stored
import sys, torch
from safetensors.torch import load_file, save_file
sd = load_file(sys.argv[1])
save_file({k: v.to(torch.bfloat16).contiguous() for k, v in sd.items()}, "/tmp/model-bf16.safetensors", {"format": "pt"})
PY
split -b 15m /tmp/model-bf16.safetensors "$OUT/model.safetensors.part-"
sha256sum /tmp/model-bf16.safetensors | tee -a "$OUT/train.log"
echo "total $(( $(date +%s) - T0 ))s" | tee -a "$OUT/train.log"
