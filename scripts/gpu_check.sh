#!/usr/bin/env bash
# One prepared check of the CUDA half on a machine with a GPU and no network (see scripts/gpu_check.py):
# build for the local GPU only, require every CUDA kernel, run the CUDA tests, compute-sanitizer, the GPU benchmarks
# and a DeepFM step at Criteo shape; everything goes under $OUT; a summary table at the end.
#
#   OUT=/tmp/out bash scripts/gpu_check.sh [--stages build,kernels,...] [--budget 470] [--python PY]
#
# Exit status 0 only when every stage passed. Needs torch with CUDA, nvcc, cmake, ninja, pybind11 and
# scikit-build-core in the interpreter's environment (PYTHON, default: .venv/bin/python if present, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-}
if [ -z "$py" ]; then
  if [ -x .venv/bin/python ]; then py=.venv/bin/python; else py=python3; fi
fi
if [ -d /usr/local/cuda/bin ]; then export PATH="/usr/local/cuda/bin:$PATH"; fi
exec "$py" scripts/gpu_check.py --python "$py" "$@"
