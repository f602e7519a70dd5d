"""masked_embedding: the fused op vs the pure-PyTorch reference and vs a direct expression of the formula.

The direct expression (``direct_formula`` below) writes the forward output and every gradient out explicitly
(gather, norm, step, blend, prefix mask; STE backward with H, scatter-add into the table), in float64, and is
independent of both the kernel and the reference's autograd.
"""
import pytest
import torch

from optembed_ext import _ext, ops
from optembed_ext import reference as ref

CARDS = (3, 11, 1, 29, 7)  # per-field vocabulary sizes: tiny fields give many repeated indices
OFFSETS = (-1.6, -0.7, -0.2, 0.15, 0.6, 1.3)  # x = norm - threshold: H in every piece, away from 0, 0.4 and 1


def make_problem(device, dtype=torch.float64, p=1, B=37, D=13, idx_dtype=torch.int64, seed=0, oov=False,
                 dims_mode=None):
    """Field-partitioned table whose row norms sit at known distances from the field thresholds."""
    g = torch.Generator().manual_seed(seed)
    F = len(CARDS)
    offs = torch.tensor((0,) + CARDS).cumsum(0)
    N = int(offs[-1])
    field_of_row = torch.repeat_interleave(torch.arange(F), torch.tensor(CARDS))
    threshold = 2 + torch.rand(F, generator=g, dtype=torch.float64)
    x = torch.tensor(OFFSETS, dtype=torch.float64)[torch.randint(0, len(OFFSETS), (N,), generator=g)]
    direction = torch.randn(N, D, generator=g, dtype=torch.float64)
    direction = direction / torch.linalg.vector_norm(direction, ord=p, dim=1, keepdim=True)
    weight = direction * (threshold[field_of_row] + x).unsqueeze(1)
    cols = [offs[f] + torch.randint(0, CARDS[f], (B,), generator=g) for f in range(F)]
    indices = torch.stack(cols, 1)
    if dims_mode == "F":
        dims = torch.randint(0, D + 1, (F,), generator=g)
    elif dims_mode == "BF":
        dims = torch.randint(0, D + 1, (B, F), generator=g)
    else:
        dims = None
    oov_weight = torch.randn(F, D, generator=g, dtype=torch.float64) if oov else None
    grad = torch.randn(B, F, D, generator=g, dtype=torch.float64)
    cast = dict(device=device, dtype=dtype)
    return dict(
        weight=weight.to(**cast),
        indices=indices.to(device=device, dtype=idx_dtype),
        threshold=threshold.to(device=device, dtype=torch.float32 if dtype != torch.float64 else dtype),
        dims=None if dims is None else dims.to(device),
        p=p,
        oov_weight=None if oov_weight is None else oov_weight.to(**cast),
        grad=grad.to(**cast),
        field_of_row=field_of_row.to(device),
    )


def direct_formula(weight, indices, threshold, dims, p, oov_weight, grad):
    """Output and gradients (weight, threshold, oov) written out from the formula, in float64."""
    w = weight.detach().double()
    idx = indices.long()
    B, F = idx.shape
    N, D = w.shape
    rows = w[idx]
    n = rows.abs().sum(-1) if p == 1 else rows.pow(2).sum(-1).sqrt()
    if threshold is None:
        m = torch.ones(B, F, dtype=torch.float64, device=w.device)
    else:
        x = n - threshold.detach().double()
        m = (x > 0).double()
    if dims is None:
        k = torch.full((B, F), D, device=w.device)
    else:
        k = dims.long().expand(B, F)
    colmask = (torch.arange(D, device=w.device) < k.unsqueeze(-1)).double()
    o = oov_weight.detach().double() if oov_weight is not None else torch.zeros(F, D, dtype=torch.float64,
                                                                                device=w.device)
    mm = m.unsqueeze(-1)
    out = (mm * rows + (1 - mm) * o.unsqueeze(0)) * colmask
    g = grad.double()
    gw = torch.zeros(N, D, dtype=torch.float64, device=w.device)
    gw.index_add_(0, idx.reshape(-1), (mm * g * colmask).reshape(-1, D))
    gt = None
    if threshold is not None:
        s = (g * (rows - o.unsqueeze(0)) * colmask).sum(-1)
        ax = x.abs()
        H = torch.where(ax <= 0.4, 2 - 4 * ax, torch.where(ax <= 1, torch.full_like(ax, 0.4), torch.zeros_like(ax)))
        if p == 1:
            dn = rows.sign()
        else:
            dn = torch.where(n.unsqueeze(-1) > 0, rows / n.clamp_min(1e-300).unsqueeze(-1), torch.zeros_like(rows))
        gw.index_add_(0, idx.reshape(-1), ((s * H).unsqueeze(-1) * dn).reshape(-1, D))
        gt = -(s * H).sum(0)
    go = ((1 - mm) * g * colmask).sum(0) if oov_weight is not None else None
    return out, gw, gt, go


def run(fn, prob, *, use_threshold=True, **kwargs):
    """Forward + backward of ``fn``; returns (out, grad_weight, grad_threshold, grad_oov) as dense tensors."""
    w = prob["weight"].clone().requires_grad_(True)
    t = prob["threshold"].clone().requires_grad_(True) if use_threshold else None
    o = prob["oov_weight"].clone().requires_grad_(True) if prob["oov_weight"] is not None else None
    out = fn(w, prob["indices"], t, prob["dims"], prob["p"], o, **kwargs)
    out.backward(prob["grad"])
    gw = w.grad.to_dense() if w.grad is not None and w.grad.is_sparse else w.grad
    return out.detach(), gw, (t.grad if t is not None else None), (o.grad if o is not None else None)


def assert_close(actual, expected, dtype, name):
    if expected is None:
        assert actual is None or not actual.abs().any(), f"{name}: expected no gradient"
        return
    assert actual is not None, f"{name}: gradient missing"
    tol = {torch.float64: 1e-10, torch.float32: 2e-5}[dtype]
    scale = max(1.0, float(expected.abs().max()))
    torch.testing.assert_close(actual.double(), expected.double(), atol=tol * scale, rtol=tol, msg=name)


# ------------------------------------------------------------------------------------------------ correctness
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("idx_dtype", [torch.int64, torch.int32], ids=["i64", "i32"])
@pytest.mark.parametrize("oov", [False, True])
@pytest.mark.parametrize("dims_mode", [None, "F", "BF"])
@pytest.mark.parametrize("p", [1, 2])
def test_matches_formula_and_reference(device, p, dims_mode, oov, idx_dtype, dtype):
    prob = make_problem(device, dtype, p, idx_dtype=idx_dtype, oov=oov, dims_mode=dims_mode, seed=p + 7 * oov)
    # the problem exercises every piece of H: |x| <= 0.4, 0.4 < |x| <= 1, |x| > 1, on both sides of 0
    x = torch.linalg.vector_norm(prob["weight"].double()[prob["indices"].long()], ord=p, dim=-1) - prob["threshold"]
    ax = x.abs()
    assert bool((ax <= 0.4).any() and ((ax > 0.4) & (ax <= 1)).any() and (ax > 1).any())
    assert bool((x > 0).any() and (x < 0).any())

    expected = direct_formula(prob["weight"], prob["indices"], prob["threshold"], prob["dims"], p,
                              prob["oov_weight"], prob["grad"])
    fused = run(ops.masked_embedding, prob)
    reference = run(ref.masked_embedding, prob)
    for name, a, r, e in zip(("out", "grad_weight", "grad_threshold", "grad_oov"), fused, reference, expected):
        assert_close(a, e, dtype, f"fused {name}")
        assert_close(r, e, dtype, f"reference {name}")
        if e is not None:
            assert a.dtype == r.dtype
    assert fused[0].dtype == dtype and fused[0].shape == (37, len(CARDS), 13)


@pytest.mark.parametrize("p", [1, 2])
def test_many_lookups_across_threads(device, p):
    """Enough lookups for several parallel chunks: rows whose lookups straddle chunk boundaries are summed once."""
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        prob = make_problem(device, torch.float64, p, B=1500, D=4, oov=True, dims_mode="BF", seed=11)
        expected = direct_formula(prob["weight"], prob["indices"], prob["threshold"], prob["dims"], p,
                                  prob["oov_weight"], prob["grad"])
        for sparse in (False, True):
            got = run(ops.masked_embedding, prob, sparse=sparse)
            for name, a, e in zip(("out", "grad_weight", "grad_threshold", "grad_oov"), got, expected):
                assert_close(a, e, torch.float64, f"{name} (sparse={sparse})")
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("oov", [False, True])
@pytest.mark.parametrize("p", [1, 2])
def test_no_threshold(device, p, oov):
    prob = make_problem(device, torch.float64, p, oov=oov, dims_mode="BF")
    expected = direct_formula(prob["weight"], prob["indices"], None, prob["dims"], p, prob["oov_weight"],
                              prob["grad"])
    for fn in (ops.masked_embedding, ref.masked_embedding):
        out, gw, gt, go = run(fn, prob, use_threshold=False)
        assert_close(out, expected[0], torch.float64, "out")
        assert_close(gw, expected[1], torch.float64, "grad_weight")
        assert gt is None
        # every row is kept: the OOV vector is never served and gets no gradient
        assert go is None or not go.any()


@pytest.mark.parametrize("p", [1, 2])
def test_zero_rows_get_no_norm_gradient(device, p):
    """dn/dw is sign(w) (p = 1) or w / n (p = 2), taken as 0 at a zero row, even where H(x) != 0."""
    prob = make_problem(device, torch.float64, p, oov=True)
    prob["weight"][: CARDS[0] + CARDS[1]] = 0  # every row of fields 0 and 1
    prob["threshold"].fill_(0.3)  # x = -0.3 at the zero rows: H = 0.8
    expected = direct_formula(prob["weight"], prob["indices"], prob["threshold"], None, p, prob["oov_weight"],
                              prob["grad"])
    for fn in (ops.masked_embedding, ref.masked_embedding):
        got = run(fn, prob)
        for name, a, e in zip(("out", "grad_weight", "grad_threshold", "grad_oov"), got, expected):
            assert torch.isfinite(a).all(), name
            assert_close(a, e, torch.float64, name)


@pytest.mark.parametrize("use_ref", [False, True])
@pytest.mark.parametrize("p", [1, 2])
def test_sparse_gradient_is_coo_like_nn_embedding(device, p, use_ref, monkeypatch):
    monkeypatch.setattr(ops, "_force_reference", use_ref)
    prob = make_problem(device, torch.float64, p, oov=True, dims_mode="BF")
    dense = run(ops.masked_embedding, prob)
    w = prob["weight"].clone().requires_grad_(True)
    t = prob["threshold"].clone().requires_grad_(True)
    o = prob["oov_weight"].clone().requires_grad_(True)
    out = ops.masked_embedding(w, prob["indices"], t, prob["dims"], p, o, sparse=True)
    out.backward(prob["grad"])
    assert w.grad.is_sparse and w.grad.shape == w.shape
    assert torch.equal(w.grad._indices()[0], prob["indices"].reshape(-1).long())
    assert_close(w.grad.to_dense(), dense[1], torch.float64, "sparse grad_weight")
    assert_close(t.grad, dense[2], torch.float64, "grad_threshold")
    assert_close(o.grad, dense[3], torch.float64, "grad_oov")
    # same layout as nn.Embedding(sparse=True): one value row per looked-up position
    emb = torch.nn.Embedding.from_pretrained(prob["weight"].clone(), freeze=False, sparse=True)
    emb(prob["indices"].long()).sum().backward()
    assert emb.weight.grad._indices().shape == w.grad._indices().shape


def test_deterministic_flag_gives_identical_results(device):
    prob = make_problem(device, torch.float32, 2, oov=True, dims_mode="BF", B=301)
    first = run(ops.masked_embedding, prob, deterministic=True)
    again = run(ops.masked_embedding, prob, deterministic=True)
    default = run(ops.masked_embedding, prob)
    for a, b, c in zip(first, again, default):
        assert torch.equal(a, b)  # bitwise reproducible
        torch.testing.assert_close(a, c, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("use_ref", [False, True])
@pytest.mark.parametrize("sparse", [False, True])
def test_empty_batch(device, sparse, use_ref, monkeypatch):
    monkeypatch.setattr(ops, "_force_reference", use_ref)
    prob = make_problem(device, torch.float32, 1, oov=True, dims_mode="BF", B=0)
    out, gw, gt, go = run(ops.masked_embedding, prob, sparse=sparse)
    assert out.shape == (0, len(CARDS), 13)
    assert gw.shape == prob["weight"].shape and not gw.any()
    assert gt.shape == (len(CARDS),) and not gt.any()
    assert go.shape == (len(CARDS), 13) and not go.any()


@pytest.mark.parametrize("use_ref", [False, True])
def test_degenerate_shapes(device, use_ref, monkeypatch):
    """D = 0 (empty rows), F = 0 (no fields) and a 1-row table."""
    monkeypatch.setattr(ops, "_force_reference", use_ref)
    w = torch.randn(4, 0, device=device, requires_grad=True)
    t = torch.tensor([-1.0, 1.0], device=device, requires_grad=True)
    i = torch.tensor([[0, 1], [3, 3], [2, 0]], device=device)
    out = ops.masked_embedding(w, i, t, None, 2)
    assert out.shape == (3, 2, 0)
    out.sum().backward()
    assert w.grad.shape == (4, 0) and not t.grad.any()
    w = torch.randn(5, 3, device=device, requires_grad=True)
    out = ops.masked_embedding(w, torch.empty(4, 0, dtype=torch.long, device=device), None, None, 1)
    assert out.shape == (4, 0, 3)
    w1 = torch.randn(1, 3, dtype=torch.float64, device=device, requires_grad=True)
    i1 = torch.zeros(6, 1, dtype=torch.long, device=device)
    out = ops.masked_embedding(w1, i1, torch.zeros(1, dtype=torch.float64, device=device), None, 1)
    out.sum().backward()
    # kept (norm > 0): each of the 6 lookups adds 1 to every column, plus the STE term
    # s * H(x) * sign(w) with s = sum(w), x = ||w||_1
    x = w1.detach().abs().sum()
    H = 2 - 4 * x if x <= 0.4 else (0.4 if x <= 1 else 0.0)
    expected = 6 * (1 + w1.detach().sum() * H * w1.detach().sign())
    torch.testing.assert_close(w1.grad, expected)


def test_missing_extension_falls_back_with_one_warning(device, monkeypatch):
    monkeypatch.setattr(ops, "_force_reference", None)
    monkeypatch.delenv("OPTEMBED_USE_REFERENCE", raising=False)
    monkeypatch.setattr(_ext, "HAS_EXTENSION", False)
    monkeypatch.setattr(_ext, "_warned", False)
    prob = make_problem(device, torch.float64, 2, oov=True, dims_mode="BF")
    expected = direct_formula(prob["weight"], prob["indices"], prob["threshold"], prob["dims"], 2,
                              prob["oov_weight"], prob["grad"])
    with pytest.warns(RuntimeWarning, match="falling back"):
        got = run(ops.masked_embedding, prob)
    for a, e in zip(got, expected):
        assert_close(a, e, torch.float64, "fallback")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per process only
        run(ops.masked_embedding, prob)
        ops.row_mask(prob["weight"], prob["field_of_row"], prob["threshold"], 2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_half_precision_error_at_most_twice_reference(device, dtype):
    """Error of the kernel vs the float64 formula is at most ~2x the reference's own error in that dtype."""
    prob = make_problem(device, dtype, 2, oov=True, dims_mode="BF", D=16)
    expected = direct_formula(prob["weight"], prob["indices"], prob["threshold"], prob["dims"], 2,
                              prob["oov_weight"], prob["grad"])
    fused = run(ops.masked_embedding, prob)
    reference = run(ref.masked_embedding, prob)
    for name, a, r, e in zip(("out", "grad_weight", "grad_threshold", "grad_oov"), fused, reference, expected):
        assert a.dtype == (prob["threshold"].dtype if name == "grad_threshold" else dtype)
        err_a = float((a.double() - e).abs().max())
        err_r = float((r.double() - e).abs().max())
        assert err_a <= 2 * err_r + 1e-3 * max(1.0, float(e.abs().max())), (name, err_a, err_r)


# -------------------------------------------------------------------------------------------------- gradcheck
@pytest.mark.parametrize("p", [1, 2])
def test_gradcheck_no_threshold(device, p):
    prob = make_problem(device, torch.float64, p, B=6, D=5, dims_mode="BF")
    w = prob["weight"].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda w_: ops.masked_embedding(w_, prob["indices"], None, prob["dims"], p), (w,))
    assert torch.autograd.gradgradcheck is not None  # (second order is not supported: first order only)


def test_gradcheck_oov_with_threshold(device):
    """With the threshold fixed, the output is smooth (linear) in oov_weight: its gradient is the true one."""
    prob = make_problem(device, torch.float64, 1, B=6, D=5, oov=True, dims_mode="F")
    o = prob["oov_weight"].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda o_: ops.masked_embedding(prob["weight"], prob["indices"], prob["threshold"], prob["dims"], 1, o_), (o,))


# ------------------------------------------------------------------------------------------- torch.library
@pytest.mark.skipif(not _ext.HAS_EXTENSION, reason="compiled extension not built")
def test_opcheck(device):
    prob = make_problem(device, torch.float32, 2, B=9, D=6, oov=True, dims_mode="BF")
    w = prob["weight"].clone().requires_grad_(True)
    t = prob["threshold"].clone().requires_grad_(True)
    o = prob["oov_weight"].clone().requires_grad_(True)
    idx, dims = prob["indices"], prob["dims"]
    torch.library.opcheck(torch.ops.optembed.masked_embedding_forward.default, (w, idx, t, dims, 2, o, True))
    torch.library.opcheck(torch.ops.optembed.masked_embedding_forward.default, (w, idx, None, None, 1, None, False))
    for sparse in (False, True):
        torch.library.opcheck(torch.ops.optembed.masked_embedding.default,
                              (w, idx, t, dims, 2, o, True, False, sparse))
    out, norm = torch.ops.optembed.masked_embedding_forward(w.detach(), idx, t.detach(), dims, 2, o.detach(), True)
    for sparse in (False, True):
        torch.library.opcheck(torch.ops.optembed.masked_embedding_backward.default,
                              (prob["grad"], w.detach(), idx, norm, t.detach(), dims, 2, o.detach(), False, sparse))


@pytest.mark.skipif(not _ext.HAS_EXTENSION, reason="compiled extension not built")
def test_direct_op_autograd_matches_wrapper(device):
    prob = make_problem(device, torch.float64, 1, oov=True, dims_mode="BF")
    expected = run(ops.masked_embedding, prob)
    got = run(lambda w, i, t, d, p, o: torch.ops.optembed.masked_embedding_forward(w, i, t, d, p, o, True)[0], prob)
    for a, e in zip(got, expected):
        torch.testing.assert_close(a, e)


@pytest.mark.skipif(not _ext.HAS_EXTENSION or ops.use_reference(),
                    reason="fullgraph compilation is a property of the compiled ops (the reference checks data eagerly)")
@pytest.mark.parametrize("sparse", [False, True])
def test_torch_compile_fullgraph(device, sparse):
    prob = make_problem(device, torch.float32, 2, oov=True, dims_mode="BF")

    def f(w, i, t, d, p, o):
        return ops.masked_embedding(w, i, t, d, p, o, sparse=sparse) * 2.0

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    eager = run(f, prob)
    got = run(compiled, prob)
    for a, e in zip(got, eager):
        torch.testing.assert_close(a, e)


# ------------------------------------------------------------------------------------------------ fallback
def test_use_reference_switch(device, monkeypatch):
    prob = make_problem(device, torch.float64, 1, oov=True, dims_mode="F")
    calls = []
    original = ref.masked_embedding

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(ref, "masked_embedding", spy)
    monkeypatch.setattr(ops, "_force_reference", None)
    monkeypatch.delenv("OPTEMBED_USE_REFERENCE", raising=False)
    assert ops.use_reference() is False
    assert ops.use_reference(True) is True
    expected = direct_formula(prob["weight"], prob["indices"], prob["threshold"], prob["dims"], 1,
                              prob["oov_weight"], prob["grad"])
    for a, e in zip(run(ops.masked_embedding, prob), expected):
        assert_close(a, e, torch.float64, "reference path")
    assert calls
    assert ops.use_reference(False) is False
    calls.clear()
    run(ops.masked_embedding, prob)
    assert bool(calls) == (not _ext.HAS_EXTENSION)
    monkeypatch.setenv("OPTEMBED_USE_REFERENCE", "1")
    assert ops.use_reference() is False  # an explicit setting wins over the environment
    monkeypatch.setattr(ops, "_force_reference", None)
    assert ops.use_reference() is True
    run(ops.masked_embedding, prob)
    assert calls
    with pytest.raises(TypeError, match="flag"):
        ops.use_reference(1)


# ---------------------------------------------------------------------------------------------- bad inputs
def _bad_cases(device):
    w = torch.randn(10, 4, device=device)
    i = torch.randint(0, 10, (3, 2), device=device)
    t = torch.zeros(2, device=device)
    return w, i, t, [
        # (kwargs overriding the good call, exception, message fragment)
        (dict(weight=w.double().numpy() if device.type == "cpu" else [1.0]), TypeError, "weight"),
        (dict(weight=w[0]), ValueError, "weight"),
        (dict(weight=w.long()), TypeError, "weight"),
        (dict(indices=i.float()), TypeError, "indices"),
        (dict(indices=i[0]), ValueError, "indices"),
        (dict(indices=i.to("meta")), ValueError, "indices"),
        (dict(p=3), ValueError, "p must be 1 or 2"),
        (dict(p=2.0), TypeError, "p must be an int"),
        (dict(p=True), TypeError, "p must be an int"),
        (dict(threshold=torch.zeros(3, device=device)), ValueError, "threshold"),
        (dict(threshold=torch.zeros(2, dtype=torch.long, device=device)), TypeError, "threshold"),
        (dict(threshold=[0.0, 0.0]), TypeError, "threshold"),
        (dict(dims=torch.tensor([1, 2, 3], device=device)), ValueError, "dims"),
        (dict(dims=torch.ones(3, 3, dtype=torch.long, device=device)), ValueError, "dims"),
        (dict(dims=torch.ones(2, device=device)), TypeError, "dims"),
        (dict(oov_weight=torch.zeros(2, 5, device=device)), ValueError, "oov_weight"),
        (dict(oov_weight=torch.zeros(2, 4, dtype=torch.float64, device=device)), TypeError, "oov_weight"),
        (dict(sparse=1), TypeError, "sparse"),
        (dict(check_indices="yes"), TypeError, "check_indices"),
    ]


@pytest.mark.parametrize("use_ref", [False, True])
def test_bad_inputs_raise_naming_the_argument(device, use_ref):
    w, i, t, cases = _bad_cases(device)
    previous = ops.use_reference()
    ops.use_reference(use_ref)
    try:
        for override, exc, fragment in cases:
            args = dict(weight=w, indices=i, threshold=t, dims=None, p=1, oov_weight=None)
            flags = {k: override.pop(k) for k in ("sparse", "check_indices") if k in override}
            args.update(override)
            with pytest.raises(exc, match=fragment):
                ops.masked_embedding(args.pop("weight"), args.pop("indices"), **args, **flags)
    finally:
        ops.use_reference(previous)


@pytest.mark.parametrize("idx_dtype", [torch.int64, torch.int32], ids=["i64", "i32"])
@pytest.mark.parametrize("use_ref", [False, True])
def test_data_dependent_errors(device, use_ref, idx_dtype):
    w = torch.randn(10, 4, device=device)
    t = torch.zeros(2, device=device)
    good = torch.randint(0, 10, (3, 2), device=device, dtype=idx_dtype)
    previous = ops.use_reference()
    ops.use_reference(use_ref)
    try:
        for bad_value in (10, -1):
            bad = good.clone()
            bad[1, 1] = bad_value
            with pytest.raises(IndexError, match="indices"):
                ops.masked_embedding(w, bad, t)
            with pytest.raises(IndexError, match="indices"):
                ops.masked_embedding(w, bad, None, None, 2, None, sparse=True)
        for dims in (torch.tensor([1, 5], device=device), torch.tensor([[0, 1], [2, -1], [4, 4]], device=device)):
            with pytest.raises(ValueError, match="dims"):
                ops.masked_embedding(w, good, t, dims)
        with pytest.raises(ValueError, match="threshold"):
            ops.masked_embedding(w, good, torch.tensor([0.0, float("nan")], device=device))
        # dims as a plain sequence of F ints is accepted
        out = ops.masked_embedding(w, good, None, [1, 4])
        expected = w[good.long()].clone()
        expected[:, 0, 1:] = 0
        assert torch.equal(out, expected)
    finally:
        ops.use_reference(previous)


@pytest.mark.skipif(not _ext.HAS_EXTENSION or ops.use_reference(),
                    reason="fullgraph compilation is a property of the compiled ops (the reference checks data eagerly)")
@pytest.mark.slow
def test_torch_compile_inductor(device):
    prob = make_problem(device, torch.float32, 1, oov=True, dims_mode="F")

    def f(w, i, t, d, p, o):
        return torch.tanh(ops.masked_embedding(w, i, t, d, p, o))

    eager = run(f, prob)
    got = run(torch.compile(f, fullgraph=True), prob)
    for a, e in zip(got, eager):
        torch.testing.assert_close(a, e)


# ------------------------------------------------------------------------------- non-finite values, unchecked ids
class _Backend:
    """``with _Backend(use_ref):`` runs the block on the reference (True) or the compiled kernels (False)."""

    def __init__(self, use_ref):
        self.use_ref = use_ref

    def __enter__(self):
        self.previous = ops.use_reference()
        ops.use_reference(self.use_ref)

    def __exit__(self, *exc):
        ops.use_reference(self.previous)


@pytest.mark.parametrize("use_ref", [False, True])
@pytest.mark.parametrize("oov", [False, True])
@pytest.mark.parametrize("p", [1, 2])
def test_infinite_threshold_prunes_or_keeps_the_whole_field(device, p, oov, use_ref):
    prob = make_problem(device, p=p, oov=oov, dims_mode="BF")
    prob["threshold"][0] = float("inf")   # every lookup of field 0 pruned
    prob["threshold"][1] = float("-inf")  # every lookup of field 1 kept
    with _Backend(use_ref):
        got = run(ops.masked_embedding, prob)
    want = direct_formula(*(prob[k] for k in ("weight", "indices", "threshold", "dims", "p", "oov_weight", "grad")))
    for a, e, name in zip(got, want, ("out", "grad_weight", "grad_threshold", "grad_oov")):
        assert a is None or bool(torch.isfinite(a).all()), f"{name}: non-finite values"
        assert_close(a, e, torch.float64, name)
    out, _, gt, _ = got
    k = prob["dims"].unsqueeze(-1)
    cols = torch.arange(out.shape[-1], device=device)
    kept = prob["weight"][prob["indices"][:, 1]] * (cols < k[:, 1])
    assert torch.equal(out[:, 1], kept)
    pruned = prob["oov_weight"][0] * (cols < k[:, 0]) if oov else torch.zeros_like(out[:, 0])
    assert torch.equal(out[:, 0], pruned)
    assert gt[0] == 0 and gt[1] == 0  # H(+-inf) = 0: no STE term


def _nan_expectations(prob, bad, nan_rows, got, want):
    """Asserts NaN exactly where the semantics put it and the formula's values everywhere else.

    bad: (B, F) lookups whose x = norm - threshold is NaN; nan_rows: table rows whose whole gradient is NaN."""
    out, gw, gt, go = got
    w_out, w_gw, w_gt, w_go = want
    B, nf, D = out.shape
    dims = prob["dims"]
    k = torch.full((B, nf), D, device=out.device) if dims is None else dims.long().expand(B, nf)
    prefix = torch.arange(D, device=out.device) < k.unsqueeze(-1)  # (B, F, D)
    nan_out = bad.unsqueeze(-1) & prefix
    assert torch.equal(torch.isnan(out), nan_out), "out: NaN exactly on [0, k) of the NaN lookups"
    assert bool((out[bad.unsqueeze(-1) & ~prefix] == 0).all()), "out: exact zeros beyond k"
    assert_close(torch.where(nan_out, 0, out), torch.where(nan_out, 0, w_out), torch.float64, "out")
    row_nan = torch.zeros(gw.shape[0], dtype=torch.bool, device=gw.device)
    row_nan[nan_rows] = True
    assert torch.equal(torch.isnan(gw), row_nan.unsqueeze(-1).expand_as(gw)), "grad_weight: NaN on whole rows"
    assert_close(gw[~row_nan], w_gw[~row_nan], torch.float64, "grad_weight")
    field_nan = bad.any(0)
    assert torch.equal(torch.isnan(gt), field_nan), "grad_threshold: NaN for the fields of NaN lookups"
    assert_close(gt[~field_nan], w_gt[~field_nan], torch.float64, "grad_threshold")
    if go is not None:
        go_nan = (bad.unsqueeze(-1) & prefix).any(0)  # (F, D)
        assert torch.equal(torch.isnan(go), go_nan), "grad_oov: NaN on [0, k) of the NaN lookups' fields"
        assert_close(torch.where(go_nan, 0, go), torch.where(go_nan, 0, w_go), torch.float64, "grad_oov")


@pytest.mark.parametrize("use_ref", [False, True])
@pytest.mark.parametrize("dims_mode", [None, "F"])
@pytest.mark.parametrize("oov", [False, True])
@pytest.mark.parametrize("p", [1, 2])
def test_nan_in_a_row_propagates_to_its_output_and_gradients(device, p, oov, dims_mode, use_ref):
    prob = make_problem(device, p=p, oov=oov, dims_mode=dims_mode)
    if dims_mode == "F":
        prob["dims"][3] = 2  # the NaN sits beyond the kept prefix: the norm still sees it
    r = int(prob["indices"][0, 3])
    D = prob["weight"].shape[1]
    want = direct_formula(*(prob[k] for k in ("weight", "indices", "threshold", "dims", "p", "oov_weight", "grad")))
    prob["weight"][r, D - 1] = float("nan")
    with _Backend(use_ref):
        got = run(ops.masked_embedding, prob)
    bad = prob["indices"] == r
    _nan_expectations(prob, bad, [r], got, want)


@pytest.mark.parametrize("use_ref", [False, True])
@pytest.mark.parametrize("p", [1, 2])
def test_nan_threshold_unchecked_propagates_to_its_field(device, p, use_ref):
    prob = make_problem(device, p=p, oov=True, dims_mode="F")
    prob["dims"][1] = 3
    want = direct_formula(*(prob[k] for k in ("weight", "indices", "threshold", "dims", "p", "oov_weight", "grad")))
    prob["threshold"][1] = float("nan")
    with _Backend(use_ref):
        got = run(ops.masked_embedding, prob, check_indices=False)
        with pytest.raises(ValueError, match=r"threshold\[1\] is NaN"):  # checked: rejected, naming the field
            ops.masked_embedding(prob["weight"], prob["indices"], prob["threshold"], prob["dims"], p)
    bad = torch.zeros_like(prob["indices"], dtype=torch.bool)
    bad[:, 1] = True
    _nan_expectations(prob, bad, prob["indices"][:, 1].unique(), got, want)


@pytest.mark.parametrize("use_ref", [False, True])
def test_nan_row_without_threshold_is_copied(device, use_ref):
    w = torch.randn(6, 4, dtype=torch.float64, device=device, requires_grad=True)
    with torch.no_grad():
        w[2, 1] = float("nan")
    idx = torch.tensor([[2, 0], [1, 2]], device=device)
    with _Backend(use_ref):
        out = ops.masked_embedding(w, idx)
    assert torch.equal(torch.isnan(out), torch.isnan(w.detach()[idx]))
    out.backward(torch.ones_like(out))
    assert bool(torch.isfinite(w.grad).all())


@pytest.mark.parametrize("use_ref", [False, True])
@pytest.mark.parametrize("sparse", [False, True])
def test_unchecked_out_of_range_ids_never_touch_memory(device, sparse, use_ref):
    w = torch.randn(10, 4, dtype=torch.float64, device=device)
    t = torch.zeros(2, dtype=torch.float64, device=device)
    idx = torch.tensor([[1, 4_000_000_000], [-1, 3], [10, 2 ** 40], [7, -(2 ** 62)]], device=device)
    valid = (idx >= 0) & (idx < 10)
    wg = w.clone().requires_grad_(True)
    with _Backend(use_ref):
        out = ops.masked_embedding(wg, idx, t, None, 2, None, check_indices=False, sparse=sparse)
        assert torch.equal(out[~valid], torch.zeros_like(out[~valid]))
        assert torch.equal(out[valid], w[idx[valid]])
        try:  # the CPU kernel's backward checks its ids; every other path gives them no gradient
            out.backward(torch.ones_like(out))
        except IndexError as exc:
            assert "indices" in str(exc)
        else:
            gw = wg.grad.to_dense() if wg.grad.is_sparse else wg.grad
            assert gw.shape == w.shape and bool(torch.isfinite(gw).all())
        # checked: the full 64-bit value is reported (never truncated to a 32-bit offset)
        bad = torch.tensor([[1, 4_000_000_000]], device=device)
        with pytest.raises(IndexError, match="= 4000000000 is out of range"):
            ops.masked_embedding(w, bad, t[:2])


@pytest.mark.parametrize("use_ref", [False, True])
def test_unchecked_dims_are_clamped_and_empty_batches_check_nothing(device, use_ref):
    prob = make_problem(device, p=2, oov=True)
    D = prob["weight"].shape[1]
    wild = torch.tensor([-3, D + 4, 2, 0, D], device=device)
    clamped = wild.clamp(0, D)
    with _Backend(use_ref):
        got = run(ops.masked_embedding, dict(prob, dims=wild), check_indices=False)
        want = run(ops.masked_embedding, dict(prob, dims=clamped))
        for a, e in zip(got, want):
            assert torch.equal(a, e)
        with pytest.raises(ValueError, match="dims"):
            ops.masked_embedding(prob["weight"], prob["indices"], prob["threshold"], wild)
        # no lookups: nothing to check, with or without checks (NaN threshold, dims out of range)
        empty = prob["indices"][:0]
        t = prob["threshold"].clone()
        t[0] = float("nan")
        for check in (True, False):
            out = ops.masked_embedding(prob["weight"], empty, t, wild, 2, prob["oov_weight"], check_indices=check)
            assert out.shape == (0, 5, D)


@pytest.mark.parametrize("use_ref", [False, True])
def test_first_bad_index_is_reported_whatever_the_threads(device, use_ref):
    B, nf, D = 20000, 2, 4  # several parallel chunks
    w = torch.randn(8, D, device=device)
    idx = torch.randint(0, 8, (B, nf), device=device)
    idx.view(-1)[B * nf // 2 - 1] = 8  # the last lookup of the first half ...
    idx.view(-1)[B * nf // 2:] = -1   # ... comes before every lookup of the second half
    first = B * nf // 2 - 1
    with _Backend(use_ref):
        for sparse in (False, True):
            with pytest.raises(IndexError, match=rf"indices\[{first // nf}, {first % nf}\] = 8 "):
                ops.masked_embedding(w, idx, None, None, 1, None, sparse=sparse)
        dims = torch.full((B, nf), D, device=device)
        dims.view(-1)[first] = D + 1
        dims.view(-1)[first + 1:] = -1
        with pytest.raises(ValueError, match=rf"dims\[{first // nf}, {first % nf}\] = {D + 1} "):
            ops.masked_embedding(w, idx.clamp(0, 7), None, dims)
