#!/usr/bin/env bash
# One device check on a GPU machine, sized for a 15-minute device budget with start-up included:
# the gpu-marked tests, bench/decode.py and bench/prefill.py on the 30B-A3B shape, and (when
# given its path) transformers' anchor benchmark in the same call.
#
#   bash scripts/gpu_check.sh [OUT_DIR] [HF_ANCHOR_PY]
#
# Results land in OUT_DIR (default $OUT, else /tmp/gpu_check): gpu_tests.log, decode.json,
# prefill.json, hf_anchor.json and a summary. Python packages the GPU image lacks may be
# carried as wheels in .whl/ (installed into /tmp/site first).
set -uo pipefail
OUT_DIR=${1:-${OUT:-/tmp/gpu_check}}
ANCHOR=${2:-}
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT_DIR/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" \
    | tee -a "$OUT_DIR/gpu.txt"

step() {  # name, time limit in seconds, command...
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit}s)"
    local t0=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee "$OUT_DIR/$name.log"
    local status=${PIPESTATUS[0]}
    echo "$name: exit $status after $((SECONDS - t0)) s" | tee -a "$OUT_DIR/summary.txt"
}

step gpu_tests 240 python3 -m pytest -q -m gpu tests/gpu tests/kernels -p no:cacheprovider
step decode 240 python3 -m bench.decode --shape 30b-a3b --device cuda --dtype bfloat16 \
    --batches 1,16,64,128 --prompt 512 --new 32 --out "$OUT_DIR/decode.json"
step prefill 120 python3 -m bench.prefill --shape 30b-a3b --device cuda --dtype bfloat16 \
    --out "$OUT_DIR/prefill.json"
if [ -n "$ANCHOR" ]; then
    step hf_anchor 200 python3 "$ANCHOR" --batches 1,16,64 --new 32 --out "$OUT_DIR/hf_anchor.json"
fi
cat "$OUT_DIR/summary.txt"
