#!/usr/bin/env bash
# The GPU check: the gpu tests, then a short training of each strategy on the GPUs present
# (a table of step time, memory per rank and traffic; then, per strategy and rank, communication
# per step timed by CUDA events next to the host's launch-time figures, and the CUDA peak
# (max_memory_allocated) next to the model state at rest) and the dashboard of the ZeRO-3 run.
# Under 5 minutes on one GPU. Usage: scripts/gpu_check.sh [OUT_DIR]   (default: gpu_check/)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-gpu_check}"
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'GPUs', torch.cuda.device_count())"
"$PY" -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.txt"
GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count())")
WORLD=$(( GPUS >= 2 ? GPUS : 2 ))
"$PY" scripts/gpu_table.py --world-size "$WORLD" --out "$OUT" 2>&1 | tee "$OUT/gpu_table.txt"
