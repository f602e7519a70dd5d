"""The compiled kernels are really there: on a machine with a GPU every op has its CUDA kernel, and a build that
was asked for CUDA produced it (otherwise the CUDA tests would silently exercise the reference fallback)."""
import os

import pytest
import torch

from optembed_ext import _ext, ops

CUDA_REQUESTED = os.environ.get("OPTEMBED_WITH_CUDA", "").upper() in {"ON", "1", "TRUE"} or _ext.cuda_required()


def test_every_op_has_a_cpu_kernel():
    if not _ext.HAS_EXTENSION:
        pytest.skip(f"compiled extension not built ({_ext.IMPORT_ERROR})")
    assert [op for op in ops.COMPILED_OPS if not ops.has_kernel(op, "cpu")] == []


@pytest.mark.skipif(not (torch.cuda.is_available() or CUDA_REQUESTED),
                    reason="no GPU present and no CUDA build requested")
def test_cuda_build_and_every_cuda_kernel():
    info = _ext.build_info()
    assert info["has_extension"], f"the compiled extension did not load: {info.get('import_error')}"
    assert info["with_cuda"], "the extension was built without its CUDA kernels (OPTEMBED_WITH_CUDA=ON to force)"
    missing = [op for op in ops.COMPILED_OPS if not ops.has_kernel(op, torch.device("cuda"))]
    assert missing == [], f"ops without a CUDA kernel: {missing}"
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(0)
        compiled = {a.split("-")[0] for a in info["cuda_archs"]}  # "90", "90-real", "90-virtual"
        assert f"{major}{minor}" in compiled or any(a.startswith(str(major)) for a in compiled), \
            f"sm_{major}{minor} is not among the compiled architectures {info['cuda_archs']}"


def test_has_kernel_takes_a_device_or_its_type():
    assert ops.has_kernel("masked_embedding_forward", "meta") == ops.has_kernel("masked_embedding_forward",
                                                                                 torch.device("meta"))
    assert ops.has_kernel("no_such_op", "cpu") is False


def test_required_cuda_refuses_the_fallback(monkeypatch):
    """OPTEMBED_REQUIRE_CUDA=1: an op on CUDA without its kernel raises instead of running the reference."""
    monkeypatch.setenv("OPTEMBED_REQUIRE_CUDA", "1")
    monkeypatch.setattr(ops, "_force_reference", False)
    monkeypatch.setitem(ops._KERNELS, ("row_mask", "cuda"), False)
    if _ext.HAS_EXTENSION:
        with pytest.raises(RuntimeError, match="no CUDA kernel"):
            ops._reference_path("row_mask", torch.device("cuda"))
    else:
        with pytest.raises(RuntimeError, match="did not load"):
            ops._reference_path("row_mask", torch.device("cuda"))
    assert ops._reference_path("row_mask", torch.device("cpu")) is (not _ext.HAS_EXTENSION)
    monkeypatch.setenv("OPTEMBED_REQUIRE_CUDA", "0")
    assert ops._reference_path("row_mask", torch.device("cuda")) is True
