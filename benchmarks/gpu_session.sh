#!/bin/bash
# One device `run` per step of the H100 session (issue 4; the exact calls are in benchmarks/RESULTS.md).
#   bash benchmarks/gpu_session.sh all|embedded|1.5b|6.7b|tests|train [budget seconds]
# Benchmark steps resume: a step with a result in /tmp/bench-out/results.jsonl is not run again.
# Installs the carried wheels (../shared/gpu) and the carried model (scripts/pack_gpu_extras.py) once per
# machine, and compile caches an earlier machine brought back (.gpuwheels/caches, when carried), then runs the
# step; results accumulate in /tmp/bench-out while the machine is held. Every call ends with `pack_out`
# (benchmarks/gpu_pack.sh: what comes back within the device tool's limits).
set -uo pipefail
STEP=$1; BUDGET=${2:-500}
OUT=${OUT:-/tmp/out}; BENCH=/tmp/bench-out; mkdir -p "$OUT" "$BENCH/logs"
# one marker per device call (each has its own $OUT), also when a call runs this script several times
CALL_START=$BENCH/.call-$(echo "$OUT" | md5sum | cut -c1-12); [ -f "$CALL_START" ] || touch "$CALL_START"
source "$(dirname "$0")/gpu_pack.sh"
if [ ! -d /tmp/site/vllm ]; then
  bash /tmp/gw/p01/install.sh /tmp/gw > "$BENCH/install.log" 2>&1 || { tail -40 "$BENCH/install.log"; pack_out; exit 1; }
fi
[ -f /tmp/iihome/models/SmolLM2-135M-Instruct/model.safetensors ] && [ -x /tmp/site-extras/bin/py-spy ] || bash /tmp/gw/m01/unpack.sh /tmp/gw || exit 1
restore_caches /tmp/gw/caches
export PYTHONPATH=$PWD:/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages:/tmp/site-extras
export PATH=/tmp/site/bin:/tmp/site-extras/bin:$PATH
export PYTHONUNBUFFERED=1 INVERSE_INSTRUCT_HOME=/tmp/iihome TOKENIZERS_PARALLELISM=false
# The one engine start that worked in session 1 (seed_replay) had CUDA initialised in the parent, so vLLM
# spawned its engine core; the two that failed (GPU tests) forked it. Spawn everywhere until that is understood.
export VLLM_WORKER_MULTIPROC_METHOD=spawn
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
case "$STEP" in
  tests) timeout "$BUDGET" python3 -m pytest -v -s -p no:cacheprovider -m gpu tests/test_vllm_gpu.py \
           > "$OUT/gpu_tests.log" 2>&1; grep -E "PASS|FAIL|ERROR|Error|parity|rounding|identical" "$OUT/gpu_tests.log" | tail -30 ;;
  train) # a short bf16 fine-tune of the embedded model on the bundled corpus (issue 3's GPU run)
         TRAIN_CMD=${TRAIN_CMD:-"python3 -m pipeline.cli train --config configs/train.yaml --model embedded \
           --output /tmp/train-gpu --num-workers 1 --use-gpu --set optim.global_batch_size=64 \
           --set optim.micro_batch_size=16 --set data.original_epochs=1 --set optim.max_steps=60 \
           --set checkpoint.every_steps=30"}
         timeout "$BUDGET" bash -c "$TRAIN_CMD" > "$OUT/train.log" 2>&1; grep -E "tokens/s|MFU|done|Error" "$OUT/train.log" | tail -20
         cp /tmp/train-gpu/report.md /tmp/train-gpu/manifest.json "$OUT/" 2>/dev/null ;;
  *)     python3 -m benchmarks.run_gpu --part "$STEP" --budget-s "$BUDGET" --out "$BENCH" ;;
esac
pack_out
