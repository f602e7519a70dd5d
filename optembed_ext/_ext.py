"""Loader of the compiled extension ``optembed_ext._C``.

Importing ``optembed_ext._C`` registers the ``optembed`` torch library (``torch.ops.optembed.*``). When the
extension is missing or fails to load, :data:`HAS_EXTENSION` is False, a warning is emitted once, and
:mod:`optembed_ext.ops` falls back to the pure-PyTorch reference (:mod:`optembed_ext.reference`). The fallback can
also be forced with the environment variable ``OPTEMBED_USE_REFERENCE=1`` or ``optembed_ext.ops.use_reference(True)``.
"""
from __future__ import annotations

import os
import warnings
from typing import Any

import torch

__all__ = ["HAS_EXTENSION", "IMPORT_ERROR", "build_info", "extension", "warn_fallback_once", "env_use_reference",
           "cuda_required"]

_C: Any = None
IMPORT_ERROR: BaseException | None = None
try:
    from optembed_ext import _C  # noqa: F811  (loads the op library)
except (ImportError, OSError) as exc:  # missing build, ABI mismatch, missing shared library
    IMPORT_ERROR = exc

HAS_EXTENSION: bool = _C is not None
_warned = False


def extension() -> Any:
    """The loaded ``optembed_ext._C`` module, or None."""
    return _C


def env_use_reference() -> bool:
    """True when ``OPTEMBED_USE_REFERENCE`` asks for the pure-PyTorch reference implementations."""
    return os.environ.get("OPTEMBED_USE_REFERENCE", "").strip().lower() in {"1", "true", "yes", "on"}


def cuda_required() -> bool:
    """True when ``OPTEMBED_REQUIRE_CUDA=1``: an op on CUDA tensors without its compiled CUDA kernel raises instead
    of falling back to the reference (set by scripts/gpu_check.py and for GPU CI runs)."""
    return os.environ.get("OPTEMBED_REQUIRE_CUDA", "").strip().lower() in {"1", "true", "yes", "on"}


def warn_fallback_once() -> None:
    """Warn (once per process) that the compiled extension is unavailable and the reference is used instead."""
    global _warned
    if _warned or HAS_EXTENSION:
        return
    _warned = True
    warnings.warn(
        "optembed_ext: the compiled extension optembed_ext._C could not be loaded "
        f"({type(IMPORT_ERROR).__name__}: {IMPORT_ERROR}); falling back to the pure-PyTorch reference ops, "
        "which are slower. Rebuild with `pip install --no-build-isolation -e .` (torch must be installed first).",
        RuntimeWarning,
        stacklevel=3,
    )


def build_info() -> dict[str, Any]:
    """Facts about the compiled extension, for bug reports and error messages."""
    info: dict[str, Any] = {
        "has_extension": HAS_EXTENSION,
        "torch_version": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "use_reference_env": env_use_reference(),
        "cuda_required": cuda_required(),
    }
    if _C is None:
        info["import_error"] = f"{type(IMPORT_ERROR).__name__}: {IMPORT_ERROR}" if IMPORT_ERROR else None
        return info
    info.update(
        version=_C.__version__,
        built_against_torch=_C.torch_version,
        with_cuda=bool(_C.with_cuda),
        cuda_version=_C.cuda_version or None,
        cuda_archs=[a for a in _C.cuda_archs.split(",") if a],
        with_openmp=bool(_C.with_openmp),
        compiler=_C.compiler,
        library_path=getattr(_C, "__file__", None),
    )
    return info
