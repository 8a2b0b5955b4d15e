#!/usr/bin/env bash
# The one device check on a GPU machine (bench/gpu_check.py): the gpu-marked tests, decode and
# prefill beside transformers on the 30B-A3B shape and the kernels' bandwidth, every step
# time-limited, one table in OUT_DIR/table.md. Run --quick (<= 180 s) first, then the full check
# (<= 480 s); each fits one 600-s device call with the machine's start-up.
#
#   bash scripts/gpu_check.sh [--quick] [OUT_DIR]
#
# Python packages the GPU image lacks may be carried as wheels in .whl/ (installed into
# /tmp/site first).
set -uo pipefail
MODE=()
if [ "${1:-}" = "--quick" ]; then
    MODE=(--quick)
    shift
fi
OUT_DIR=${1:-${OUT:-/tmp/gpu_check}}
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
exec python3 -m bench.gpu_check "${MODE[@]}" --out "$OUT_DIR"
