#!/bin/bash
# One device `run` per step of the H100 session (issue 4; the exact calls are in benchmarks/RESULTS.md).
#   bash benchmarks/gpu_session.sh all|embedded|1.5b|6.7b|tests|train [budget seconds]
# Benchmark steps resume: a step with a result in /tmp/bench-out/results.jsonl is not run again.
# Installs the carried wheels (../shared/gpu) and the carried model (scripts/pack_gpu_extras.py) once per
# machine, then runs the step; results accumulate in /tmp/bench-out while the machine is held and are
# copied to $OUT after every step.
set -uo pipefail
STEP=$1; BUDGET=${2:-500}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" /tmp/bench-out
if [ ! -d /tmp/site/vllm ]; then
  bash /tmp/gw/p01/install.sh /tmp/gw > "$OUT/install.log" 2>&1 || { tail -40 "$OUT/install.log"; exit 1; }
fi
[ -f /tmp/iihome/models/SmolLM2-135M-Instruct/model.safetensors ] || bash /tmp/gw/m01/unpack.sh /tmp/gw || exit 1
export PYTHONPATH=$PWD:/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages PATH=/tmp/site/bin:$PATH
export PYTHONUNBUFFERED=1 INVERSE_INSTRUCT_HOME=/tmp/iihome TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
case "$STEP" in
  tests) timeout "$BUDGET" python3 -m pytest -v -s -p no:cacheprovider -m gpu tests/test_vllm_gpu.py \
           > "$OUT/gpu_tests.log" 2>&1; grep -E "PASS|FAIL|ERROR|Error|parity|identical" "$OUT/gpu_tests.log" | tail -30 ;;
  train) timeout "$BUDGET" bash -c "$TRAIN_CMD" 2>&1 | tee "$OUT/train.log" | tail -40 ;;
  *)     python3 -m benchmarks.run_gpu --part "$STEP" --budget-s "$BUDGET" --out /tmp/bench-out ;;
esac
cp -r /tmp/bench-out/. "$OUT/" 2>/dev/null; true
