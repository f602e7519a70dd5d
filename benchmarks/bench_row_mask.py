"""Benchmarks of ``optembed_ext.ops.row_mask`` (which rows of the whole table survive the learned per-field
thresholds) against ``optembed_ext.reference.row_mask``.

The op is a single streaming pass over the table: GB/s = (table + field_of_row + bool mask bytes) / time, directly
comparable with the machine's memory bandwidth. Thresholds sit at the mean row norm, so about half the rows are
kept. Variants: ``p`` = 1 (OptEmbed's default) and 2.
"""
from __future__ import annotations

import pytest
import torch

from conftest import DEVICES, Shape, make_table, make_threshold, run_case, shape_params
from optembed_ext import _ext, reference

ops = pytest.importorskip("optembed_ext.ops")

SUITE = "row_mask"
IMPLS = ("reference", "fused")  # baseline first


def row_mask_bytes(shape: Shape, elem: int = 4, field_elem: int = 8) -> int:
    return shape.rows * (shape.dim * elem + field_elem + 1)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("p", [1, 2], ids=["p1", "p2"])
@pytest.mark.parametrize("shape", shape_params())
@pytest.mark.parametrize("device", DEVICES)
def test_row_mask(benchmark, request, device, shape, p, impl):
    if impl == "fused" and not _ext.HAS_EXTENSION:
        pytest.skip("compiled extension not available: ops would fall back to the reference")
    weight = make_table(shape, device)
    field_of_row = shape.field_of_row(device)
    threshold = make_threshold(shape, device)
    if p == 2:  # mean L2 norm of a row of N(0, s^2) entries ~ s * sqrt(D)
        threshold = torch.full_like(threshold, float(weight[:1000].norm(dim=1).mean()))
    fn_impl = ops.row_mask if impl == "fused" else reference.row_mask

    if impl == "fused":
        got = ops.row_mask(weight, field_of_row, threshold, p)
        want = reference.row_mask(weight, field_of_row, threshold, p)
        assert got.dtype == torch.bool and got.shape == (shape.rows,)
        # Norms are summed in a different order; only rows within rounding of the threshold may differ.
        mismatch = int((got != want).sum())
        assert mismatch <= max(1, shape.rows // 100_000), f"row_mask: {mismatch} rows differ from the reference"
        kept = float(got.float().mean())
        assert 0.2 < kept < 0.8, f"threshold should keep about half of the rows, kept {kept:.2%}"

    def fn():
        return fn_impl(weight, field_of_row, threshold, p)

    fn()  # warm-up
    run_case(benchmark, request, fn, suite=SUITE, case=f"p{p} {shape.name} ({shape.rows:.0e} x {shape.dim})",
             device=device, impl=impl, nbytes=row_mask_bytes(shape))
