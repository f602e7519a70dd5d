"""Shared pytest fixtures: devices to parametrise kernel tests over, and the real data samples."""
import os
from pathlib import Path

import pytest
import torch

_SHARED_DATA = Path(os.environ.get("OPTEMBED_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device present"),
    ),
]


@pytest.fixture(params=DEVICES)
def device(request):
    """Every kernel test runs on the CPU and, where a GPU is present, on CUDA."""
    return torch.device(request.param)


@pytest.fixture(scope="session")
def shared_data():
    """Directory of real public data samples (../shared/data); tests that need a file skip when it is absent."""
    if not _SHARED_DATA.is_dir():
        pytest.skip(f"real data samples not found at {_SHARED_DATA}")
    return _SHARED_DATA


def require_file(root: Path, rel: str) -> Path:
    path = root / rel
    if not path.exists():
        pytest.skip(f"{path} not present")
    return path
