#!/usr/bin/env bash
# GPU smoke check (< 5 minutes on one GPU): a short CUDA training run for every registered method,
# then the AGM / joint step-time ratio on the paper's CREMA-D shapes (ResNet-18 encoders, audio
# 1x257x188, one 3x224x224 frame, batch 64, bf16). Exits 0 with a message when CUDA is absent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "gpu_check: CUDA is not available on this machine (torch.cuda.is_available() is False); nothing to check."
  exit 0
fi
exec "$PY" benchmarks/gpu_check.py "$@"
