"""Benchmarks of ``optembed_ext.ops.compact_embedding`` (the exported model's mixed-dimension lookup).

Three implementations of the lookup a searched model serves, timed in the same session (baseline first):

``reference``  :func:`optembed_ext.reference.compact_embedding` on the compact tables (pure PyTorch)
``uniform``    ``torch.nn.functional.embedding`` on the full uniform ``(N, D)`` table the compact one replaces
``fused``      :func:`optembed_ext.ops.compact_embedding` on the compact tables (one fused kernel)

The compact tables keep a random 30% of each field's rows at a random field dimension in ``1..D`` (about the
compression OptEmbed finds on Criteo). Every fused case is checked against the masked uniform lookup (kept rows
at their field dims, zeros elsewhere) before it is timed; the fused line also prints its ratio to ``uniform``.

Modes: ``forward`` (inference, no autograd graph) and ``fwd_bwd`` (forward + backward with a dense gradient of
the packed tables, i.e. fine-tuning the exported model; ``uniform``: dense gradient of the full table).

GB/s counts the bytes the fused algorithm must move (:func:`compact_bytes`), charged to every implementation, so
GB/s figures compare like the times; the summary table prints both.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import (DEVICES, Shape, _print_now, assert_close, dist_params, make_ids, make_table, recorder,
                      run_case, shape_params)
from optembed_ext import _ext, reference

ops = pytest.importorskip("optembed_ext.ops")

SUITE = "compact_embedding"
MODES = ("forward", "fwd_bwd")
IMPLS = ("reference", "uniform", "fused")  # baseline first
KEEP = 0.3


class Case:
    """Uniform table, its compact form and a batch of ids for one (shape, dist, device)."""

    def __init__(self, shape: Shape, dist: str, device: str, seed: int = 0):
        self.shape, self.device = shape, device
        self.ids = make_ids(shape, dist, device)
        self.weight = make_table(shape, device)
        g = torch.Generator().manual_seed(seed)
        dims = torch.randint(1, shape.dim + 1, (shape.fields,), generator=g)
        keep = torch.rand(shape.rows, generator=g) < KEEP
        remap = torch.full((shape.rows,), -1, dtype=torch.int32)
        w = self.weight.cpu()
        blocks, offsets = [], [0]
        for f, (off, card) in enumerate(zip(shape.offsets(), shape.cardinalities())):
            kept = torch.nonzero(keep[off:off + card]).flatten() + off
            remap[kept] = torch.arange(kept.numel(), dtype=torch.int32)
            blocks.append(w[kept, :int(dims[f])].reshape(-1))
            offsets.append(offsets[-1] + blocks[-1].numel())
        self.packed = torch.cat(blocks).to(device)
        self.field_offsets = torch.tensor(offsets, dtype=torch.long, device=device)
        self.field_dims = dims.to(device)
        self.remap = remap.to(device)
        self.grad_out = torch.randn(shape.batch, shape.fields, shape.dim, generator=g).to(device)

    def lookup(self, impl: str, param=None) -> torch.Tensor:
        if impl == "uniform":
            return F.embedding(self.ids, self.weight if param is None else param)
        fn = ops.compact_embedding if impl == "fused" else reference.compact_embedding
        return fn(self.packed if param is None else param, self.field_offsets, self.field_dims, self.remap, self.ids,
                  self.shape.dim)

    def expected(self) -> torch.Tensor:
        """The masked uniform lookup: kept rows at their field dims, zeros elsewhere."""
        kept = (self.remap[self.ids] >= 0).unsqueeze(-1)
        cols = torch.arange(self.shape.dim, device=self.ids.device)
        return F.embedding(self.ids, self.weight) * (kept & (cols < self.field_dims.view(1, -1, 1)))

    def table_bytes(self) -> tuple[int, int]:
        """(uniform table bytes, compact bytes: packed values + remap + offsets and dims)."""
        item = self.weight.element_size()
        compact = (self.packed.numel() * item + self.remap.numel() * self.remap.element_size()
                   + (self.field_offsets.numel() + self.field_dims.numel()) * 8)
        return self.weight.numel() * item, compact


def compact_bytes(case: Case, mode: str) -> int:
    """Bytes the fused kernels must move: ids and their remap entries, the kept values read, the ``(B, F, D)``
    output written (forward); ``grad_out`` read, the dense ``packed`` gradient written once and the touched values
    accumulated (backward)."""
    L = case.ids.numel()
    item = case.weight.element_size()
    out = L * case.shape.dim * item
    kept_values = int(((case.remap[case.ids] >= 0) * case.field_dims.view(1, -1)).sum()) * item
    index = L * (case.ids.element_size() + case.remap.element_size())
    fwd = index + kept_values + out
    if mode == "forward":
        return fwd
    return fwd + index + out + case.packed.numel() * item + kept_values


def _require_fused(impl: str) -> None:
    if impl == "fused" and not _ext.HAS_EXTENSION:
        pytest.skip("compiled extension not available: ops would fall back to the reference")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dist", dist_params())
@pytest.mark.parametrize("shape", shape_params())
@pytest.mark.parametrize("device", DEVICES)
def test_compact_embedding(benchmark, request, device, shape, dist, mode, impl):
    _require_fused(impl)
    case = Case(shape, dist, device)
    if impl == "fused":
        assert_close(case.lookup("fused"), case.expected(), "forward output")
        assert_close(case.lookup("reference"), case.expected(), "reference forward output")

    if mode == "forward":
        def fn():
            with torch.no_grad():
                return case.lookup(impl)
    else:
        param = (case.weight if impl == "uniform" else case.packed).clone().requires_grad_(True)
        if impl == "fused":
            got = torch.autograd.grad(case.lookup("fused", param), param, case.grad_out)[0]
            want = torch.autograd.grad(case.lookup("reference", param), param, case.grad_out)[0]
            assert_close(got, want, "grad packed")

        def fn():
            return torch.autograd.grad(case.lookup(impl, param), param, case.grad_out)

    fn()  # warm-up
    name = f"{mode} {shape.name} {dist}"
    rec = run_case(benchmark, request, fn, suite=SUITE, case=name, device=device, impl=impl,
                   nbytes=compact_bytes(case, mode))
    uniform_bytes, compact_table = case.table_bytes()
    benchmark.extra_info.update(uniform_table_bytes=uniform_bytes, compact_table_bytes=compact_table)
    if impl == "fused":
        uni = recorder(request.config).find(SUITE, name, str(device), "uniform")
        if uni is not None and uni.median_s and rec.median_s:
            ratio = rec.median_s / uni.median_s
            benchmark.extra_info["fused_over_uniform_time"] = ratio
            _print_now(request.config, f"[{SUITE}] {name} [{device}] fused / uniform time = {ratio:.2f}; tables: "
                       f"uniform {uniform_bytes:,} B, compact {compact_table:,} B "
                       f"({uniform_bytes / compact_table:.2f}x smaller)")
