"""compact_embedding: the fused mixed-dimension lookup over per-field compact tables.

Every result is compared with an independent plain-PyTorch expression written from the definition (for each
field: remap the ids, gather the kept rows of the field's own ``(R_f, D_f)`` table, serve zeros or the OOV vector
for pruned ids, zero-pad to ``out_dim``), and gradients with that expression's autograd.
"""
import pytest
import torch
import torch.nn.functional as F

from optembed_ext import _ext, ops, reference

#: tests of the compiled op itself (schema, fake kernel, layout checks done in the kernel)
needs_kernel = pytest.mark.skipif(not _ext.HAS_EXTENSION or ops.use_reference(),
                                  reason="compiled extension not built (or the reference is forced)")

FLOAT_DTYPES = [torch.float32, torch.float64]
HALF_DTYPES = [torch.float16, torch.bfloat16]


# ----------------------------------------------------------------------------------------------- helpers
def make_layout(cards, dims, *, keep=0.6, seed=0, dtype=torch.float32, device="cpu", remap_dtype=torch.int64,
                oov=False, out_dim=None):
    """A random compact layout: each field keeps a random subset of its ids, stored in a random local order."""
    gen = torch.Generator().manual_seed(seed)
    out_dim = max(dims) if out_dim is None else out_dim
    N = sum(cards)
    remap = torch.full((N,), -1, dtype=torch.long)
    offsets, start, total = [0], 0, 0
    for c, d in zip(cards, dims):
        kept = torch.nonzero(torch.rand(c, generator=gen) < keep).flatten() + start
        if d == 0:
            kept = kept[:0]
        remap[kept] = torch.randperm(kept.numel(), generator=gen)
        total += kept.numel() * d
        offsets.append(total)
        start += c
    packed = torch.randn(total, generator=gen, dtype=torch.float64).to(dtype)
    oov_t = torch.randn(len(cards), out_dim, generator=gen, dtype=torch.float64).to(dtype) if oov else None
    return {
        "packed": packed.to(device),
        "field_offsets": torch.tensor(offsets, dtype=torch.long, device=device),
        "field_dims": torch.tensor(dims, dtype=torch.long, device=device),
        "remap": remap.to(device=device, dtype=remap_dtype),
        "out_dim": out_dim,
        "oov": None if oov_t is None else oov_t.to(device),
    }


def make_ids(cards, batch, *, seed=1, device="cpu", dtype=torch.int64):
    """(batch, F) global ids; ``batch`` larger than a field's cardinality repeats ids."""
    gen = torch.Generator().manual_seed(seed)
    cols, start = [], 0
    for c in cards:
        cols.append(torch.randint(0, c, (batch,), generator=gen) + start)
        start += c
    return torch.stack(cols, 1).to(device=device, dtype=dtype) if cols else torch.zeros(batch, 0, dtype=dtype)


def expected(packed, field_offsets, field_dims, remap, ids, out_dim, oov=None):
    """Per-field gather + pad, from the definition (differentiable in ``packed`` and ``oov``)."""
    B, nf = ids.shape
    cols = []
    for f in range(nf):
        d = int(field_dims[f])
        lo, hi = int(field_offsets[f]), int(field_offsets[f + 1])
        r = remap[ids[:, f].long()].long()
        kept = (r >= 0).unsqueeze(1)
        if d == 0:
            col = packed.new_zeros(B, 0)
        else:
            table = packed[lo:hi].reshape(-1, d)
            rows = table[r.clamp_min(0)] if table.shape[0] else packed.new_zeros(B, d)
            fill = oov[f, :d].expand(B, d) if oov is not None else packed.new_zeros(B, d)
            col = torch.where(kept, rows, fill)
        cols.append(F.pad(col, (0, out_dim - d)))
    if not cols:
        return packed.new_zeros(B, 0, out_dim)
    return torch.stack(cols, 1)


def call(lay, ids, fn=None, **kwargs):
    fn = ops.compact_embedding if fn is None else fn
    return fn(lay["packed"], lay["field_offsets"], lay["field_dims"], lay["remap"], ids, lay["out_dim"],
              lay["oov"], **kwargs)


def call_expected(lay, ids, packed=None, oov=None):
    return expected(lay["packed"] if packed is None else packed, lay["field_offsets"], lay["field_dims"],
                    lay["remap"], ids, lay["out_dim"], lay["oov"] if oov is None else oov)


CASES = [
    # cardinalities, field dims, out_dim
    ((7, 1, 13, 5, 3), (3, 2, 5, 1, 5), 5),      # odd sizes, a field at full width
    ((11, 4, 9), (0, 3, 7), 9),                  # a zero-width field, padding on every field
    ((1, 2), (1, 1), 1),                         # tiny
    ((33, 17, 2, 64), (16, 8, 3, 13), 16),       # wider rows
    ((9, 21, 6, 14), (4, 8, 16, 12), 16),        # every D_f a multiple of 4: the CUDA vector path
]


# -------------------------------------------------------------------------------------------- expression
def test_expression_sanity():
    """The test's expression itself, on a hand-written layout."""
    packed = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0])  # field 0: (2, 2); field 1: (3, 1)
    offs = torch.tensor([0, 4, 7])
    dims = torch.tensor([2, 1])
    remap = torch.tensor([1, -1, 0, 2, -1, 0, 1])  # ids 0..2 field 0, ids 3..6 field 1
    ids = torch.tensor([[0, 3], [1, 4], [2, 6]])
    out = expected(packed, offs, dims, remap, ids, 3)
    want = torch.tensor([[[3.0, 4.0, 0.0], [7.0, 0.0, 0.0]],
                         [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]],
                         [[1.0, 2.0, 0.0], [6.0, 0.0, 0.0]]])
    torch.testing.assert_close(out, want)
    oov = torch.tensor([[-1.0, -2.0, -3.0], [-4.0, -5.0, -6.0]])
    out = expected(packed, offs, dims, remap, ids, 3, oov)
    torch.testing.assert_close(out[1], torch.tensor([[-1.0, -2.0, 0.0], [-4.0, 0.0, 0.0]]))


# ------------------------------------------------------------------------------------------------ forward
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("with_oov", [False, True])
def test_forward(device, case, dtype, with_oov):
    cards, dims, out_dim = case
    lay = make_layout(cards, dims, dtype=dtype, device=device, oov=with_oov, out_dim=out_dim, seed=len(cards))
    ids = make_ids(cards, 37, device=device)
    out = call(lay, ids)
    assert out.shape == (37, len(cards), out_dim) and out.dtype == dtype and out.device.type == device.type
    torch.testing.assert_close(out, call_expected(lay, ids), rtol=0, atol=0)  # a pure copy: exact


@pytest.mark.parametrize("idx_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("remap_dtype", [torch.int32, torch.int64])
def test_index_dtypes(device, idx_dtype, remap_dtype):
    cards, dims, out_dim = CASES[0]
    lay = make_layout(cards, dims, device=device, remap_dtype=remap_dtype, oov=True, out_dim=out_dim)
    ids = make_ids(cards, 29, device=device, dtype=idx_dtype)
    torch.testing.assert_close(call(lay, ids), call_expected(lay, ids), rtol=0, atol=0)


def test_pruned_and_repeated_ids(device):
    """Every id of every field, each several times: pruned ids give zeros (or OOV) only in their D_f columns."""
    cards, dims, out_dim = (6, 5, 4), (2, 3, 1), 4
    for with_oov in (False, True):
        lay = make_layout(cards, dims, keep=0.5, device=device, oov=with_oov, out_dim=out_dim, seed=3)
        col = [torch.arange(c).repeat(3) for c in cards]
        n = max(len(c) for c in col)
        ids = torch.stack([c.repeat(n // len(c) + 1)[:n] + o for c, o in zip(col, (0, 6, 11))], 1).to(device)
        remap = lay["remap"].cpu()
        assert (remap[ids.cpu()] == -1).any() and (remap[ids.cpu()] >= 0).any()  # both kinds are looked up
        out = call(lay, ids)
        torch.testing.assert_close(out, call_expected(lay, ids), rtol=0, atol=0)
        pruned = (remap[ids.cpu()] < 0).to(device)
        for f, d in enumerate(dims):
            assert out[:, f, d:].abs().sum() == 0  # padding
            got = out[pruned[:, f], f, :d]
            want = (lay["oov"][f, :d].expand_as(got) if with_oov else torch.zeros_like(got))
            torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_all_rows_pruned_in_a_field(device):
    cards, dims, out_dim = (5, 4), (3, 2), 4
    lay = make_layout(cards, dims, device=device, oov=True, out_dim=out_dim)
    # Prune the whole of field 1: its block in packed becomes empty.
    remap = lay["remap"].clone()
    remap[5:] = -1
    lo = int(lay["field_offsets"][1])
    lay = {**lay, "remap": remap, "packed": lay["packed"][:lo].clone(),
           "field_offsets": torch.tensor([0, lo, lo], device=device)}
    ids = make_ids(cards, 11, device=device)
    out = call(lay, ids)
    torch.testing.assert_close(out, call_expected(lay, ids), rtol=0, atol=0)
    torch.testing.assert_close(out[:, 1, :2], lay["oov"][1, :2].expand(11, 2), rtol=0, atol=0)


def test_empty_batch(device):
    cards, dims, out_dim = CASES[0]
    lay = make_layout(cards, dims, device=device, oov=True, out_dim=out_dim)
    packed = lay["packed"].clone().requires_grad_(True)
    oov = lay["oov"].clone().requires_grad_(True)
    ids = torch.zeros(0, len(cards), dtype=torch.long, device=device)
    out = ops.compact_embedding(packed, lay["field_offsets"], lay["field_dims"], lay["remap"], ids, out_dim, oov)
    assert out.shape == (0, len(cards), out_dim)
    out.sum().backward()
    assert packed.grad.shape == packed.shape and packed.grad.abs().sum() == 0
    assert oov.grad.shape == oov.shape and oov.grad.abs().sum() == 0


# ----------------------------------------------------------------------------------------------- backward
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("with_oov", [False, True])
@pytest.mark.parametrize("deterministic", [False, True])
def test_backward(device, case, dtype, with_oov, deterministic):
    cards, dims, out_dim = case
    lay = make_layout(cards, dims, dtype=dtype, device=device, oov=with_oov, out_dim=out_dim, seed=7)
    ids = make_ids(cards, 53, device=device, seed=8)  # 53 > every cardinality but 64: repeated ids
    grad = torch.randn(53, len(cards), out_dim, dtype=dtype, generator=torch.Generator().manual_seed(9)).to(device)

    packed = lay["packed"].clone().requires_grad_(True)
    oov = lay["oov"].clone().requires_grad_(True) if with_oov else None
    out = ops.compact_embedding(packed, lay["field_offsets"], lay["field_dims"], lay["remap"], ids, out_dim, oov,
                                deterministic=deterministic)
    out.backward(grad)

    packed_r = lay["packed"].clone().requires_grad_(True)
    oov_r = lay["oov"].clone().requires_grad_(True) if with_oov else None
    call_expected(lay, ids, packed_r, oov_r).backward(grad)

    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-12}
    torch.testing.assert_close(packed.grad, packed_r.grad, **tol)
    if with_oov:
        torch.testing.assert_close(oov.grad, oov_r.grad, **tol)
        # Padding columns of the OOV vectors never receive gradient.
        for f, d in enumerate(dims):
            assert oov.grad[f, d:].abs().sum() == 0


@pytest.mark.parametrize("with_oov", [False, True])
def test_sparse_gradient(device, with_oov):
    """sparse=True: the gradient of packed is a sparse COO tensor equal to the dense gradient."""
    cards, dims, out_dim = CASES[0]
    lay = make_layout(cards, dims, device=device, oov=with_oov, out_dim=out_dim, seed=11)
    ids = make_ids(cards, 41, device=device)
    grad = torch.randn(41, len(cards), out_dim, generator=torch.Generator().manual_seed(4)).to(device)
    packed = lay["packed"].clone().requires_grad_(True)
    oov = lay["oov"].clone().requires_grad_(True) if with_oov else None
    ops.compact_embedding(packed, lay["field_offsets"], lay["field_dims"], lay["remap"], ids, out_dim, oov,
                          sparse=True).backward(grad)
    assert packed.grad.is_sparse and packed.grad.shape == packed.shape
    packed_r = lay["packed"].clone().requires_grad_(True)
    oov_r = lay["oov"].clone().requires_grad_(True) if with_oov else None
    call_expected(lay, ids, packed_r, oov_r).backward(grad)
    torch.testing.assert_close(packed.grad.to_dense(), packed_r.grad)
    if with_oov:
        torch.testing.assert_close(oov.grad, oov_r.grad)


def test_backward_deterministic_repeatable(device):
    cards, dims, out_dim = (3, 2, 4), (4, 3, 2), 4
    lay = make_layout(cards, dims, keep=1.0, device=device, oov=True, out_dim=out_dim)
    ids = make_ids(cards, 4096, device=device)  # heavy collisions on few rows
    grad = torch.randn(4096, 3, out_dim, generator=torch.Generator().manual_seed(0)).to(device)
    grads = []
    for _ in range(2):
        packed = lay["packed"].clone().requires_grad_(True)
        oov = lay["oov"].clone().requires_grad_(True)
        ops.compact_embedding(packed, lay["field_offsets"], lay["field_dims"], lay["remap"], ids, out_dim, oov,
                              deterministic=True).backward(grad)
        grads.append((packed.grad, oov.grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


@pytest.mark.parametrize("with_oov", [False, True])
def test_gradcheck(device, with_oov):
    cards, dims, out_dim = (4, 3, 5), (2, 0, 3), 4
    lay = make_layout(cards, dims, dtype=torch.float64, device=device, oov=with_oov, out_dim=out_dim)
    ids = make_ids(cards, 9, device=device)
    packed = lay["packed"].clone().requires_grad_(True)
    inputs = [packed] + ([lay["oov"].clone().requires_grad_(True)] if with_oov else [])

    def fn(p, *rest):
        return ops.compact_embedding(p, lay["field_offsets"], lay["field_dims"], lay["remap"], ids, out_dim,
                                     rest[0] if rest else None)

    assert torch.autograd.gradcheck(fn, inputs)


# ------------------------------------------------------------------------------------------ half precision
@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_half_precision(device, dtype):
    """fp16 / bf16 (the CPU kernel supports them too): exact forward; gradient error against the fp64 truth at most
    about twice the error of the expression evaluated in the same precision."""
    cards, dims, out_dim = (9, 5, 30), (8, 3, 16), 16
    lay64 = make_layout(cards, dims, dtype=torch.float64, device=device, oov=True, out_dim=out_dim)
    lay = {k: (v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
           for k, v in lay64.items()}
    ids = make_ids(cards, 2048, device=device)  # many collisions: long gradient sums
    out = call(lay, ids)
    torch.testing.assert_close(out, call_expected(lay, ids), rtol=0, atol=0)  # a copy is exact in any dtype

    grad64 = torch.randn(2048, 3, out_dim, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    grad64 = grad64.to(device)
    # fp64 truth from the expression; the expression's own error in `dtype` sets the allowance.
    p64 = lay64["packed"].clone().requires_grad_(True)
    o64 = lay64["oov"].clone().requires_grad_(True)
    call_expected(lay64, ids, p64, o64).backward(grad64)
    p_ref = lay["packed"].clone().requires_grad_(True)
    o_ref = lay["oov"].clone().requires_grad_(True)
    call_expected(lay, ids, p_ref, o_ref).backward(grad64.to(dtype))
    p = lay["packed"].clone().requires_grad_(True)
    o = lay["oov"].clone().requires_grad_(True)
    ops.compact_embedding(p, lay["field_offsets"], lay["field_dims"], lay["remap"], ids, out_dim, o).backward(
        grad64.to(dtype))
    for got, ref, truth in ((p.grad, p_ref.grad, p64.grad), (o.grad, o_ref.grad, o64.grad)):
        err = (got.double() - truth).abs().max().item()
        ref_err = (ref.double() - truth).abs().max().item()
        assert err <= 2 * ref_err + 1e-3 * truth.abs().max().item(), (err, ref_err)


# ---------------------------------------------------------------------------------------------- reference
@pytest.mark.parametrize("with_oov", [False, True])
def test_reference_matches_expression(with_oov):
    cards, dims, out_dim = CASES[1]
    lay = make_layout(cards, dims, dtype=torch.float64, oov=with_oov, out_dim=out_dim)
    ids = make_ids(cards, 31)
    packed = lay["packed"].clone().requires_grad_(True)
    out = reference.compact_embedding(packed, lay["field_offsets"], lay["field_dims"], lay["remap"], ids, out_dim,
                                      lay["oov"])
    torch.testing.assert_close(out, call_expected(lay, ids), rtol=0, atol=0)
    grad = torch.randn_like(out)
    out.backward(grad)
    packed_r = lay["packed"].clone().requires_grad_(True)
    call_expected(lay, ids, packed_r).backward(grad)
    torch.testing.assert_close(packed.grad, packed_r.grad)


def test_use_reference_switch():
    cards, dims, out_dim = CASES[0]
    lay = make_layout(cards, dims, oov=True, out_dim=out_dim)
    ids = make_ids(cards, 17)
    previous = ops.use_reference()  # query only
    ops.use_reference(True)
    try:
        out = call(lay, ids)
    finally:
        ops.use_reference(previous)
    torch.testing.assert_close(out, call_expected(lay, ids), rtol=0, atol=0)


# ------------------------------------------------------------------------------------- opcheck and compile
@needs_kernel
@pytest.mark.parametrize("with_oov", [False, True])
def test_opcheck(device, with_oov):
    cards, dims, out_dim = CASES[0]
    lay = make_layout(cards, dims, device=device, oov=with_oov, out_dim=out_dim)
    ids = make_ids(cards, 13, device=device)
    packed = lay["packed"].clone().requires_grad_(True)
    oov = lay["oov"].clone().requires_grad_(True) if with_oov else None
    fwd_args = (packed, lay["field_offsets"], lay["field_dims"], lay["remap"], ids, out_dim, oov, True)
    torch.library.opcheck(torch.ops.optembed.compact_embedding_forward.default, fwd_args)
    grad = torch.randn(13, len(cards), out_dim, device=device)
    bwd_args = (grad, lay["packed"], lay["field_offsets"], lay["field_dims"], lay["remap"], ids, lay["oov"], False)
    torch.library.opcheck(torch.ops.optembed.compact_embedding_backward.default, bwd_args)
    # The autograd-carrying op that ops.compact_embedding calls (flags: check_indices, deterministic, sparse).
    torch.library.opcheck(torch.ops.optembed.compact_embedding.default, fwd_args + (False, False))


@needs_kernel
def test_torch_compile_fullgraph(device):
    torch._dynamo.reset()
    cards, dims, out_dim = CASES[0]
    lay = make_layout(cards, dims, device=device, oov=True, out_dim=out_dim)
    ids = make_ids(cards, 21, device=device)

    def fn(packed, oov, idx):
        out = ops.compact_embedding(packed, lay["field_offsets"], lay["field_dims"], lay["remap"], idx, out_dim,
                                    oov)
        return (out * out).sum(-1)

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    packed = lay["packed"].clone().requires_grad_(True)
    oov = lay["oov"].clone().requires_grad_(True)
    out = compiled(packed, oov, ids)
    packed_r = lay["packed"].clone().requires_grad_(True)
    oov_r = lay["oov"].clone().requires_grad_(True)
    want = (call_expected(lay, ids, packed_r, oov_r) ** 2).sum(-1)
    torch.testing.assert_close(out, want)
    out.sum().backward()
    want.sum().backward()
    torch.testing.assert_close(packed.grad, packed_r.grad)
    torch.testing.assert_close(oov.grad, oov_r.grad)


# ---------------------------------------------------------------------------------------------- bad inputs
RAISES = (RuntimeError, ValueError, IndexError, TypeError)


def _bad(lay, ids, **overrides):
    args = {"packed": lay["packed"], "field_offsets": lay["field_offsets"], "field_dims": lay["field_dims"],
            "remap": lay["remap"], "indices": ids, "out_dim": lay["out_dim"], "oov": lay["oov"]}
    args.update(overrides)
    return ops.compact_embedding(args["packed"], args["field_offsets"], args["field_dims"], args["remap"],
                                 args["indices"], args["out_dim"], args["oov"])


@pytest.fixture
def layout():
    cards, dims, out_dim = CASES[0]
    return make_layout(cards, dims, oov=True, out_dim=out_dim), make_ids(cards, 8), cards


def test_bad_index_out_of_range(layout):
    lay, ids, cards = layout
    N = sum(cards)
    for value in (N, -1):
        bad = ids.clone()
        bad[3, 2] = value
        with pytest.raises(RAISES, match="indices"):
            _bad(lay, bad)


def test_bad_remapped_row(layout):
    lay, ids, _ = layout
    remap = lay["remap"].clone()
    remap[ids[0, 0]] = 10_000  # beyond field 0's table
    with pytest.raises(RAISES, match="remap"):
        _bad(lay, ids, remap=remap)


@pytest.mark.parametrize("what,overrides_fn", [
    ("remap", lambda lay, ids: {"remap": lay["remap"][:, None]}),
    ("remap", lambda lay, ids: {"remap": lay["remap"].float()}),
    # F of indices disagrees with the per-field tensors: either side may be named
    ("indices|field_offsets|field_dims", lambda lay, ids: {"indices": ids[:, :3]}),
    ("indices", lambda lay, ids: {"indices": ids.float()}),
    ("indices", lambda lay, ids: {"indices": ids.flatten()}),
    # layout checks of the kernel (O(F), on the host)
    pytest.param("field_dims", lambda lay, ids: {"field_dims": lay["field_dims"] + 1},  # full-width field > out_dim
                 marks=needs_kernel),
    ("field_dims", lambda lay, ids: {"field_dims": lay["field_dims"][:-1]}),
    ("field_offsets", lambda lay, ids: {"field_offsets": lay["field_offsets"][:-1]}),
    pytest.param("field_offsets", lambda lay, ids: {"field_offsets": lay["field_offsets"].flip(0)},
                 marks=needs_kernel),
    pytest.param("packed", lambda lay, ids: {"packed": lay["packed"][:-1]}, marks=needs_kernel),
    ("packed", lambda lay, ids: {"packed": lay["packed"].reshape(1, -1)}),
    ("oov", lambda lay, ids: {"oov": lay["oov"][:, :-1]}),
    ("oov", lambda lay, ids: {"oov": lay["oov"].double()}),
    ("out_dim", lambda lay, ids: {"out_dim": -1}),
])
def test_bad_arguments_name_the_argument(layout, what, overrides_fn):
    lay, ids, _ = layout
    with pytest.raises(RAISES, match=what):
        _bad(lay, ids, **overrides_fn(lay, ids))


# ----------------------------------------------------------------- same checks and semantics on every backend
class _Backend:
    def __init__(self, use_ref):
        self.use_ref = use_ref

    def __enter__(self):
        self.previous = ops.use_reference()
        ops.use_reference(self.use_ref)

    def __exit__(self, *exc):
        ops.use_reference(self.previous)


def _small_layout(device="cpu"):
    """Field 0: (2, 2) table, field 1: (3, 1) table; ids 0..2 field 0, ids 3..6 field 1."""
    return {
        "packed": torch.arange(1.0, 8.0, dtype=torch.float64, device=device),
        "field_offsets": torch.tensor([0, 4, 7], device=device),
        "field_dims": torch.tensor([2, 1], device=device),
        "remap": torch.tensor([1, -1, 0, 2, -1, 0, 1], device=device),
        "out_dim": 3,
        "oov": torch.tensor([[-1.0, -2.0, -3.0], [-4.0, -5.0, -6.0]], dtype=torch.float64, device=device),
    }


BAD_LAYOUTS = [
    # (override, exception, message fragment naming the argument)
    ({"field_dims": [4, 2]}, ValueError, r"field_dims\[0\] = 4 must lie in \[0, out_dim = 3\]"),
    ({"field_dims": [-1, 1]}, ValueError, r"field_dims\[0\] = -1"),
    ({"field_offsets": [-2, 4, 7]}, ValueError, r"field_offsets\[0\] must be >= 0"),
    ({"field_offsets": [0, 4, 9]}, ValueError, r"field_offsets\[F\] = 9 exceeds packed.numel\(\) = 7"),
    ({"field_offsets": [0, 8, 7], "packed": 9}, ValueError, "field_offsets must be non-decreasing"),
    ({"field_offsets": [0, 3, 7]}, ValueError, r"not a multiple of field_dims\[0\] = 2"),
    ({"field_dims": [2, 0]}, ValueError, r"field 1 has field_dims 0 but a non-empty block"),
]


@pytest.mark.parametrize("case", range(len(BAD_LAYOUTS)))
def test_layout_checked_identically_by_kernel_and_reference(device, case):
    override, exc, fragment = BAD_LAYOUTS[case]
    lay = _small_layout(device)
    for key, value in override.items():
        lay[key] = (torch.zeros(value, dtype=torch.float64, device=device) if key == "packed"
                    else torch.tensor(value, device=device))
    ids = torch.tensor([[0, 3], [2, 6]], device=device)
    messages = []
    for use_ref in ([False, True] if _ext.HAS_EXTENSION else [True]):
        with _Backend(use_ref), pytest.raises(exc, match=fragment) as info:
            call(lay, ids)
        messages.append(str(info.value).splitlines()[0])
    assert len(set(messages)) == 1, messages  # same message from the kernel and the reference


@pytest.mark.parametrize("use_ref", [False, True])
def test_out_of_range_ids_and_rows_raise_index_error(device, use_ref):
    lay = _small_layout(device)
    ids = torch.tensor([[0, 3], [2, 6]], device=device)
    remap = lay["remap"].clone()
    remap[6] = 3  # field 1 has 3 rows
    remap_neg = lay["remap"].clone()
    remap_neg[0] = -2
    with _Backend(use_ref):
        for bad_value in (7, -1, 4_000_000_000):
            bad = ids.clone()
            bad[1, 0] = bad_value
            with pytest.raises(IndexError, match=rf"indices\[1, 0\] = {bad_value} is out of range"):
                call(lay, bad)
        with pytest.raises(IndexError, match=r"remap\[6\] = 3 \(looked up by indices\[1, 1\]\)"):
            call(dict(lay, remap=remap), ids)
        with pytest.raises(IndexError, match=r"remap\[0\] = -2"):
            call(dict(lay, remap=remap_neg), ids)
        # out_dim = 0 still checks the ids
        zero = dict(lay, field_dims=torch.zeros(2, dtype=torch.long, device=device),
                    field_offsets=torch.zeros(3, dtype=torch.long, device=device), out_dim=0, oov=None)
        with pytest.raises(IndexError, match="indices"):
            call(zero, torch.tensor([[0, 7]], device=device))


@pytest.mark.parametrize("use_ref", [False, True])
def test_first_bad_lookup_is_reported_whatever_the_threads(device, use_ref):
    lay = _small_layout(device)
    B = 40000
    ids = torch.tensor([[0, 3]], device=device).repeat(B, 1)
    first = B  # flat position B = (B // 2, 0)
    ids.view(-1)[first] = 100
    ids.view(-1)[first + 1:] = -5
    with _Backend(use_ref), pytest.raises(IndexError, match=rf"indices\[{first // 2}, 0\] = 100 "):
        call(lay, ids)


@pytest.mark.parametrize("use_ref", [False, True])
@pytest.mark.parametrize("mode", ["dense", "deterministic", "sparse"])
def test_unchecked_invalid_lookups_read_and_write_nothing(device, mode, use_ref):
    lay = _small_layout(device)
    remap = lay["remap"].clone()
    remap[5] = 50  # remapped row far outside field 1's table
    remap[1] = -7  # neither a row nor -1
    ids = torch.tensor([[0, 3], [-1, 6], [4_000_000_000, 5], [1, -(2 ** 40)], [2, 4]], device=device)
    invalid = torch.tensor([[False, False], [True, False], [True, True], [True, True], [False, False]],
                           device=device)
    packed = lay["packed"].clone().requires_grad_(True)
    oov = lay["oov"].clone().requires_grad_(True)
    flags = {"dense": {}, "deterministic": {"deterministic": True}, "sparse": {"sparse": True}}[mode]
    with _Backend(use_ref):
        out = ops.compact_embedding(packed, lay["field_offsets"], lay["field_dims"], remap, ids, 3, oov,
                                    check_indices=False, **flags)
        grad = torch.randn(out.shape, dtype=out.dtype, device=device)
        out.backward(grad)
    assert torch.equal(out[invalid], torch.zeros_like(out[invalid]))
    # the valid lookups, through the test's own expression on the valid rows only
    keep = ~invalid.any(1)
    p_r = lay["packed"].clone().requires_grad_(True)
    o_r = lay["oov"].clone().requires_grad_(True)
    want = expected(p_r, lay["field_offsets"], lay["field_dims"], remap, ids[keep], 3, o_r)
    torch.testing.assert_close(out[keep], want)
    # lookups (1, 1) and (2, 1)... row 1 (ids [-1, 6]) has a valid field-1 lookup: id 6 -> row 1
    mixed = torch.tensor([1], device=device)
    want_mixed = expected(p_r, lay["field_offsets"], lay["field_dims"], remap,
                          torch.tensor([[0, 6]], device=device), 3, o_r)[:, 1]
    torch.testing.assert_close(out[mixed, 1], want_mixed)
    (want * grad[keep]).sum().add_((want_mixed * grad[mixed, 1]).sum()).backward()
    gp = packed.grad.to_dense() if packed.grad.is_sparse else packed.grad
    torch.testing.assert_close(gp, p_r.grad)
    torch.testing.assert_close(oov.grad, o_r.grad)


# ------------------------------------------------------------------------------------ layout validated once
def test_unchecked_module_validates_its_layout_once(device):
    """CompactEmbedding(check_indices=False) validates field_offsets / field_dims once before its first lookup (the
    unchecked CUDA op does not read the layout back), and again after a state dict is loaded."""
    from optembed_ext.data import FeatureMap
    from optembed_ext.nn.compact import CompactEmbedding

    fmap = FeatureMap("t", ["a", "b"], [4, 3])
    emb = CompactEmbedding(fmap, 4, [2, 3], [4, 2], check_indices=False).to(device)
    ids = torch.tensor([[0, 4], [1, 6]], device=device)
    emb(ids)
    assert emb._layout_checked
    state = emb.state_dict()
    state["field_offsets"] = state["field_offsets"].clone()
    state["field_offsets"][2] += 5  # the last block would end past packed
    emb.load_state_dict(state)
    assert not emb._layout_checked
    with pytest.raises(ValueError, match="field_offsets"):
        emb(ids)
