"""row_mask: the fused op vs a direct expression (per-row loop over the formula) and the reference."""
import pytest
import torch

from optembed_ext import _ext, ops
from optembed_ext import reference as ref

CARDS = (5, 1, 17, 40, 3, 9)
OFFSETS = (-1.3, -0.45, -0.02, 0.03, 0.5, 2.0)  # norm - threshold, never within rounding error of 0


def make_rows(device, dtype=torch.float64, p=1, D=11, field_dtype=torch.int64, seed=0):
    g = torch.Generator().manual_seed(seed)
    F = len(CARDS)
    field_of_row = torch.repeat_interleave(torch.arange(F), torch.tensor(CARDS))
    perm = torch.randperm(field_of_row.numel(), generator=g)
    field_of_row = field_of_row[perm]  # rows of a field need not be contiguous
    N = field_of_row.numel()
    threshold = 1 + 2 * torch.rand(F, generator=g, dtype=torch.float64)
    x = torch.tensor(OFFSETS, dtype=torch.float64)[torch.randint(0, len(OFFSETS), (N,), generator=g)]
    direction = torch.randn(N, D, generator=g, dtype=torch.float64)
    direction = direction / torch.linalg.vector_norm(direction, ord=p, dim=1, keepdim=True)
    weight = direction * (threshold[field_of_row] + x).unsqueeze(1)
    tdtype = torch.float64 if dtype == torch.float64 else torch.float32
    return (weight.to(device=device, dtype=dtype), field_of_row.to(device=device, dtype=field_dtype),
            threshold.to(device=device, dtype=tdtype))


def direct_mask(weight, field_of_row, threshold, p):
    """Row by row, in float64: ||w_r||_p > threshold[field_of_row[r]]."""
    out = []
    for r in range(weight.shape[0]):
        row = [float(v) for v in weight[r].double().cpu()]
        n = sum(abs(v) for v in row) if p == 1 else sum(v * v for v in row) ** 0.5
        out.append(n > float(threshold[int(field_of_row[r])]))
    return torch.tensor(out, dtype=torch.bool, device=weight.device)


@pytest.mark.parametrize("field_dtype", [torch.int64, torch.int32], ids=["i64", "i32"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16],
                         ids=["f64", "f32", "f16", "bf16"])
@pytest.mark.parametrize("p", [1, 2])
def test_matches_direct_expression(device, p, dtype, field_dtype):
    weight, fr, t = make_rows(device, dtype, p, field_dtype=field_dtype, seed=p)
    expected = direct_mask(weight, fr, t, p)
    assert 0 < int(expected.sum()) < weight.shape[0]  # both outcomes occur
    got = ops.row_mask(weight, fr, t, p)
    assert got.dtype == torch.bool and got.shape == (weight.shape[0],) and got.device == weight.device
    assert torch.equal(got, expected)
    assert torch.equal(ref.row_mask(weight, fr, t, p), expected)


def test_consistent_with_masked_embedding(device):
    """A row is kept by row_mask exactly when masked_embedding serves it unmasked."""
    weight, fr, t = make_rows(device, torch.float32, 2, seed=3)
    rows = torch.arange(weight.shape[0], device=device)
    F = len(CARDS)
    # one lookup per row, placed in the column of its field (the other columns look up a row of their field)
    first_row = torch.stack([rows[fr == f][0] for f in range(F)])
    ids = first_row.repeat(weight.shape[0], 1)
    ids[rows, fr.long()] = rows
    out = ops.masked_embedding(weight, ids, t, None, 2)
    served = out[rows, fr.long()].abs().sum(1) > 0
    assert torch.equal(served, ops.row_mask(weight, fr, t, 2))


def test_no_gradient_and_inputs_untouched(device):
    weight, fr, t = make_rows(device, torch.float32, 1)
    w = weight.clone().requires_grad_(True)
    th = t.clone().requires_grad_(True)
    mask = ops.row_mask(w, fr, th, 1)
    assert not mask.requires_grad
    assert torch.equal(w.detach(), weight) and torch.equal(th.detach(), t)


def test_empty_table(device):
    w = torch.empty(0, 4, device=device)
    fr = torch.empty(0, dtype=torch.long, device=device)
    t = torch.zeros(3, device=device)
    assert ops.row_mask(w, fr, t, 2).shape == (0,)
    assert ref.row_mask(w, fr, t, 2).shape == (0,)


def test_zero_width_rows(device):
    """D = 0: every norm is 0, kept only where the threshold is negative."""
    w = torch.empty(4, 0, device=device)
    fr = torch.tensor([0, 1, 1, 0], device=device)
    t = torch.tensor([-0.5, 0.5], device=device)
    expected = torch.tensor([True, False, False, True], device=device)
    assert torch.equal(ops.row_mask(w, fr, t, 1), expected)


@pytest.mark.skipif(not _ext.HAS_EXTENSION, reason="compiled extension not built")
def test_opcheck(device):
    weight, fr, t = make_rows(device, torch.float32, 2)
    torch.library.opcheck(torch.ops.optembed.row_mask.default, (weight, fr, t, 2))
    torch.library.opcheck(torch.ops.optembed.row_mask.default, (weight, fr.int(), t, 1))


@pytest.mark.skipif(not _ext.HAS_EXTENSION or ops.use_reference(),
                    reason="fullgraph compilation is a property of the compiled ops (the reference checks data eagerly)")
def test_torch_compile_fullgraph(device):
    weight, fr, t = make_rows(device, torch.float32, 2)

    def f(w, r, th):
        return ops.row_mask(w, r, th, 2).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    assert int(compiled(weight, fr, t)) == int(direct_mask(weight, fr, t, 2).sum())


@pytest.mark.parametrize("use_ref", [False, True])
def test_bad_inputs_raise_naming_the_argument(device, use_ref):
    w = torch.randn(6, 3, device=device)
    fr = torch.tensor([0, 1, 0, 1, 1, 0], device=device)
    t = torch.zeros(2, device=device)
    cases = [
        (dict(weight=w.tolist()), TypeError, "weight"),
        (dict(weight=w[0]), ValueError, "weight"),
        (dict(weight=w.int()), TypeError, "weight"),
        (dict(field_of_row=fr.float()), TypeError, "field_of_row"),
        (dict(field_of_row=fr[:5]), ValueError, "field_of_row"),
        (dict(field_of_row=fr.to("meta")), ValueError, "field_of_row"),
        (dict(threshold=t.unsqueeze(0)), ValueError, "threshold"),
        (dict(threshold=t.long()), TypeError, "threshold"),
        (dict(threshold=None), TypeError, "threshold"),
        (dict(threshold=torch.tensor([0.0, float("nan")], device=device)), ValueError, "threshold"),
        (dict(field_of_row=torch.tensor([0, 1, 0, 2, 1, 0], device=device)), IndexError, "field_of_row"),
        (dict(field_of_row=torch.tensor([0, 1, 0, -1, 1, 0], device=device)), IndexError, "field_of_row"),
        (dict(p=0), ValueError, "p must be 1 or 2"),
        (dict(p="2"), TypeError, "p must be an int"),
    ]
    previous = ops.use_reference()
    ops.use_reference(use_ref)
    try:
        for override, exc, fragment in cases:
            args = dict(weight=w, field_of_row=fr, threshold=t, p=1)
            args.update(override)
            with pytest.raises(exc, match=fragment):
                ops.row_mask(**args)
    finally:
        ops.use_reference(previous)


@pytest.mark.parametrize("use_ref", [False, True])
def test_first_bad_field_is_reported_whatever_the_threads(device, use_ref):
    N = 100000  # several parallel chunks
    w = torch.randn(N, 2, device=device)
    fr = torch.zeros(N, dtype=torch.long, device=device)
    fr[N // 2 - 1] = 5  # the last row of the first half comes before every row of the second half
    fr[N // 2:] = -1
    previous = ops.use_reference()
    ops.use_reference(use_ref)
    try:
        with pytest.raises(IndexError, match=rf"field_of_row\[{N // 2 - 1}\] = 5 "):
            ops.row_mask(w, fr, torch.zeros(2, device=device))
    finally:
        ops.use_reference(previous)


@pytest.mark.parametrize("use_ref", [False, True])
def test_nan_row_is_not_kept_and_infinite_thresholds(device, use_ref):
    w = torch.randn(6, 3, dtype=torch.float64, device=device)
    w[1, 2] = float("nan")
    fr = torch.tensor([0, 0, 1, 1, 2, 2], device=device)
    t = torch.tensor([0.0, float("inf"), float("-inf")], dtype=torch.float64, device=device)
    previous = ops.use_reference()
    ops.use_reference(use_ref)
    try:
        mask = ops.row_mask(w, fr, t, 2)
    finally:
        ops.use_reference(previous)
    assert mask.tolist() == [True, False, False, False, True, True]
