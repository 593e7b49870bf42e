#!/usr/bin/env bash
# The GPU checks in one run (about 5 minutes): installs the project into the current Python (which
# must already have a CUDA build of torch) and runs benchmarks/gpu_check.py.
#   bash benchmarks/gpu_check.sh            on a GPU machine
#   bash benchmarks/gpu_check.sh --smoke    at toy sizes on a CPU (checks the script only)
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'available', torch.cuda.is_available())"
python3 -m pip install -q -e . 2>&1 | grep -v "already satisfied" || true
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
PYTHONUNBUFFERED=1 exec python3 benchmarks/gpu_check.py "$@"
