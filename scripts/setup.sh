#!/usr/bin/env bash
# Set up a virtual environment with torch, the build tools and optembed-ext (editable), from a fresh machine.
#
#   bash scripts/setup.sh            # venv in .venv, CUDA kernels built when nvcc and a CUDA torch are present
#
# Environment knobs:
#   OPTEMBED_VENV=path        where the virtual environment goes (default: .venv in the repository)
#   OPTEMBED_TORCH=spec       torch requirement (default: torch==2.14.1, a CUDA 13.0 build that also runs on the CPU;
#                             torch==2.13.0 is a CPU-only build)
#   OPTEMBED_WITH_CUDA=AUTO|ON|OFF   build the CUDA kernels (default AUTO: when nvcc and a CUDA torch are found)
#   OPTEMBED_TORCHREC=auto|off       install TorchRec for the sharded export (default auto: only with torch 2.14.1,
#                                    the torch that torchrec 1.9.2 + fbgemm-gpu-cpu 1.9.0 were checked against)
#   PYTHON=python3.11         interpreter used to create the venv
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
venv=${OPTEMBED_VENV:-$root/.venv}
python=${PYTHON:-python3}
torch_spec=${OPTEMBED_TORCH:-torch==2.14.1}
with_cuda=${OPTEMBED_WITH_CUDA:-AUTO}

if [ ! -x "$venv/bin/python" ]; then
  echo "[setup] creating virtual environment $venv"
  "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip)
"${pip[@]}" install -q --upgrade pip

echo "[setup] installing $torch_spec and the build/test tools"
"${pip[@]}" install -q "$torch_spec" numpy pybind11 "scikit-build-core>=0.10" ninja cmake
"${pip[@]}" install -q pyyaml scikit-learn tqdm matplotlib pyarrow pytest pytest-benchmark hypothesis expecttest \
  deepctr-torch==0.3.0 torchfm==0.7.0

# TorchRec (optembed_ext.export.torchrec, tests/test_torchrec.py): torchrec 1.9.2 with FBGEMM's CPU build
# fbgemm-gpu-cpu 1.9.0, which loads with torch 2.14.1 only. torchrec declares a dependency on the CUDA package
# fbgemm-gpu (whose library needs libnvidia-ml), so it is installed without dependencies, next to the CPU build and
# its other requirements. Any other torch: skipped, the TorchRec tests skip.
torchrec_mode=${OPTEMBED_TORCHREC:-auto}
torch_now=$("$venv/bin/python" -c "import torch; print(torch.__version__.split('+')[0])")
if [ "$torchrec_mode" = "off" ]; then
  echo "[setup] OPTEMBED_TORCHREC=off: TorchRec not installed"
elif [ "$torch_now" != "2.14.1" ]; then
  echo "[setup] torch $torch_now: TorchRec not installed (torchrec 1.9.2 + fbgemm-gpu-cpu 1.9.0 need torch 2.14.1);" \
       "the TorchRec export and its tests are skipped"
else
  echo "[setup] installing torchrec 1.9.2 + fbgemm-gpu-cpu 1.9.0 (for torch $torch_now)"
  "${pip[@]}" install -q "torch==$torch_now" fbgemm-gpu-cpu==1.9.0 "torchmetrics==1.0.3" tensordict pyre-extensions
  "${pip[@]}" install -q --no-deps torchrec==1.9.2
  if ! "$venv/bin/python" - <<'PY'
import torch, fbgemm_gpu, torchrec
torch.ops.fbgemm.asynchronous_complete_cumsum(torch.tensor([1]))
print("[setup] torchrec", torchrec.__version__, "with fbgemm_gpu", fbgemm_gpu.__version__)
PY
  then
    echo "[setup] torchrec does not load with torch $torch_now; uninstalling it (the TorchRec tests will skip)"
    "${pip[@]}" uninstall -y -q torchrec
  fi
fi

# nvcc is often installed without being on PATH; point the build at the usual CUDA root.
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda
fi
if [ -n "${CUDA_HOME:-}" ]; then
  export PATH="$CUDA_HOME/bin:$PATH"
fi

echo "[setup] building optembed-ext (OPTEMBED_WITH_CUDA=$with_cuda)"
"${pip[@]}" install --no-build-isolation --no-deps -e "$root" -Ccmake.define.OPTEMBED_WITH_CUDA="$with_cuda"

"$venv/bin/python" - <<'PY'
import optembed_ext
from optembed_ext import _ext
info = _ext.build_info()
print("[setup] optembed-ext", optembed_ext.__version__, "build:", info)
if not _ext.HAS_EXTENSION:
    raise SystemExit("[setup] the compiled extension failed to load")
PY
