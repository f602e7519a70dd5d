"""The code paths the kernels choose by shape and alignment: 16-byte vector rows (float32 with D = 16 and 64),
scalar fallbacks (odd D, a table view with a storage offset that breaks the alignment, a strided column view), for
the masked lookup's forward and every backward mode, and for sparse_row_update. Compared with the reference's
autograd / update in float64."""
import pytest
import torch

from optembed_ext import ops
from optembed_ext import reference as ref


def _table(N, D, layout, gen, device):
    if layout == "contiguous":
        return torch.randn(N, D, generator=gen).to(device)
    if layout == "offset":  # contiguous rows, storage offset of one element: misaligned for 16-byte loads
        return torch.randn(N * D + 1, generator=gen).to(device)[1:].view(N, D)
    return torch.randn(N, D + 3, generator=gen).to(device)[:, 1:D + 1]  # strided view (copied by the op)


@pytest.mark.parametrize("D", [16, 64, 7])
@pytest.mark.parametrize("layout", ["contiguous", "offset", "strided"])
@pytest.mark.parametrize("mode", ["dense", "deterministic", "sparse"])
def test_masked_embedding_paths(device, D, layout, mode):
    gen = torch.Generator().manual_seed(D)
    N, B, F = 120, 29, 4
    w0 = _table(N, D, layout, gen, device)
    idx = torch.randint(0, 30, (B, F), generator=gen)
    idx[:, 1] = 5  # a hot row
    thr = (torch.rand(F, generator=gen) * D * 0.8).to(device)
    dims = torch.randint(0, D + 1, (B, F), generator=gen).to(device)
    oov = torch.randn(F, D, generator=gen).to(device)
    go = torch.randn(B, F, D, generator=gen).to(device)

    w = w0.detach().clone() if layout == "contiguous" else w0.detach()
    w.requires_grad_(True)
    t = thr.clone().requires_grad_(True)
    o = oov.clone().requires_grad_(True)
    out = ops.masked_embedding(w, idx.to(device), t, dims, 1, o, deterministic=mode == "deterministic",
                               sparse=mode == "sparse")
    out.backward(go)

    wr = w0.detach().double().requires_grad_(True)
    tr = thr.double().requires_grad_(True)
    orr = oov.double().requires_grad_(True)
    out_r = ref.masked_embedding(wr, idx.to(device), tr, dims, 1, orr)
    out_r.backward(go.double())
    tol = dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.double(), out_r.detach(), **tol)
    gw = w.grad.to_dense() if mode == "sparse" else w.grad
    torch.testing.assert_close(gw.double(), wr.grad, **tol)
    torch.testing.assert_close(t.grad.double(), tr.grad, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(o.grad.double(), orr.grad, **tol)


@pytest.mark.parametrize("D", [16, 64, 7])
@pytest.mark.parametrize("kind", ["sgd", "adagrad", "adam"])
@pytest.mark.parametrize("offset", [False, True])
def test_sparse_row_update_paths(device, D, kind, offset):
    gen = torch.Generator().manual_seed(D + 1)
    N, M = 80, 300
    base = torch.randn(N * D + int(offset), generator=gen)
    w = base.to(device)[int(offset):].view(N, D)
    w_ref = w.detach().cpu().double().clone()
    idx = torch.randint(0, 40, (M,), generator=gen)
    idx[:120] = 3  # a hot row: runs longer than one chunk
    rows = torch.randn(M, D, generator=gen)
    s1 = torch.rand(N) if kind == "adagrad" else torch.zeros(N, D) if kind == "adam" else None
    s2 = torch.zeros(N, D) if kind == "adam" else None
    ops.sparse_row_update(w, idx.to(device), rows.to(device), None if s1 is None else s1.clone().to(device),
                          None if s2 is None else s2.clone().to(device), optimizer=kind, lr=0.05, weight_decay=0.01)
    ref.sparse_row_update(w_ref, idx, rows.double(), None if s1 is None else s1.double(),
                          None if s2 is None else s2.double(), optimizer=kind, lr=0.05, weight_decay=0.01)
    torch.testing.assert_close(w.detach().cpu().double(), w_ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("D", [7, 12, 16, 64, 67])
@pytest.mark.parametrize("mode", ["dense", "sparse", "fused_sgd"])
@pytest.mark.parametrize("oov", [False, True])
def test_supernet_lookups_near_the_threshold(device, D, mode, oov):
    """float32 supernet lookups: row norms at distances from their field's threshold that put x = n - t in every
    piece of H (and on both sides of 0), per-sample k over [0, D] (0 and D included), hot and repeated rows; D
    with whole 8-lane blocks, a last 4-lane block and a scalar remainder. Forward and every gradient (or the fused
    SGD step) against the reference's float64 autograd."""
    from test_masked_embedding import make_problem

    prob = make_problem(device, torch.float32, 1, B=211, D=D, oov=oov, dims_mode="BF", seed=D)
    dims = prob["dims"].clone()
    dims[:3] = 0
    dims[3:6] = D
    x_abs = (prob["weight"].double().abs().sum(1) - prob["threshold"].double()[prob["field_of_row"]]).abs()
    assert bool((x_abs <= 0.4).any()) and bool(((x_abs > 0.4) & (x_abs <= 1)).any()) and bool((x_abs > 1).any())
    idx = prob["indices"]
    w = prob["weight"].clone().requires_grad_(True)
    t = prob["threshold"].clone().requires_grad_(True)
    o = prob["oov_weight"].clone().requires_grad_(True) if oov else None
    lr = 0.1
    update = ops.RowUpdate(w.detach(), "sgd", lr=lr) if mode == "fused_sgd" else None
    out = ops.masked_embedding(w, idx, t, dims, 1, o, sparse=mode == "sparse", update=update)
    out.backward(prob["grad"])

    wr = prob["weight"].double().requires_grad_(True)
    tr = prob["threshold"].double().requires_grad_(True)
    orr = prob["oov_weight"].double().requires_grad_(True) if oov else None
    out_r = ref.masked_embedding(wr, idx, tr, dims, 1, orr)
    out_r.backward(prob["grad"].double())
    tol = dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.double(), out_r.detach(), **tol)
    if mode == "fused_sgd":
        assert w.grad is None
        touched = torch.zeros(w.shape[0], dtype=torch.bool, device=w.device)
        touched[idx.reshape(-1)] = True
        expected = prob["weight"].double() - lr * wr.grad * touched.unsqueeze(1)
        torch.testing.assert_close(w.detach().double(), expected, **tol)
    else:
        gw = w.grad.to_dense() if mode == "sparse" else w.grad
        torch.testing.assert_close(gw.double(), wr.grad, **tol)
    torch.testing.assert_close(t.grad.double(), tr.grad, rtol=1e-4, atol=1e-3)
    if oov:
        torch.testing.assert_close(o.grad.double(), orr.grad, **tol)
