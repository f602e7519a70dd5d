"""The optimizer fused into the masked lookup's backward (ops.RowUpdate / fuse_update, optim.FusedBackwardOptimizer).

Expected values: the unfused path written from its parts -- the reference lookup's autograd gradient (float64)
summed per row and stepped with the rule of sparse_row_update restated here -- never the fused kernel itself.
"""
import math

import pytest
import torch

from optembed_ext import ops, optim
from optembed_ext import reference as ref


def _expected_step(w0, idx, thr, dims, p, oov, grad_out, kind, lr, eps, betas, wd, s1=None, s2=None, step=1):
    """float64: autograd of the reference lookup, then the row rule on the touched rows."""
    w = w0.detach().double().requires_grad_(True)
    t = thr.detach().double().requires_grad_(True) if thr is not None else None
    o = oov.detach().double().requires_grad_(True) if oov is not None else None
    out = ref.masked_embedding(w, idx, t, dims, p, o)
    out.backward(grad_out.double())
    G = w.grad
    touched = torch.zeros(w.shape[0], dtype=torch.bool)
    touched[idx.reshape(-1).long()] = True
    new = w.detach().clone()
    g = G[touched] + wd * new[touched]
    if kind == "sgd":
        new[touched] -= lr * g
    elif kind == "adagrad":
        s1 = s1.clone()
        s1[touched] += g.pow(2).mean(1)
        new[touched] -= lr * g / (s1[touched].sqrt() + eps).unsqueeze(1)
    else:
        b1, b2 = betas
        s1, s2 = s1.clone(), s2.clone()
        s1[touched] = b1 * s1[touched] + (1 - b1) * g
        s2[touched] = b2 * s2[touched] + (1 - b2) * g * g
        new[touched] -= lr / (1 - b1 ** step) * s1[touched] / (s2[touched].sqrt() / math.sqrt(1 - b2 ** step) + eps)
    return new, (t.grad if t is not None else None), (o.grad if o is not None else None), s1, s2


@pytest.mark.parametrize("kind", ["sgd", "adagrad", "adam"])
@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("D,masked,index_dtype", [(16, True, torch.int64), (64, False, torch.int32),
                                                  (5, True, torch.int32)])
def test_fused_backward_matches_the_unfused_step(device, kind, p, D, masked, index_dtype):
    gen = torch.Generator().manual_seed(D + p)
    N, B, nf = 50, 13, 3
    w0 = torch.randn(N, D, generator=gen)
    idx = torch.randint(0, 12, (B, nf), generator=gen).to(index_dtype)  # many repeated rows
    idx[:, 2] += 30
    thr = torch.tensor([0.2 * D, 0.8 * D, 0.5 * D]) if p == 1 else torch.tensor([2.0, 4.5, 3.0])
    thr = thr if masked else None
    dims = torch.randint(0, D + 1, (B, nf), generator=gen) if masked else None
    oov = torch.randn(nf, D, generator=gen) if masked else None
    grad_out = torch.randn(B, nf, D, generator=gen)
    lr, eps, betas, wd = 0.05, 1e-6, (0.8, 0.9), 0.01
    s1 = torch.rand(N, generator=gen) if kind == "adagrad" else torch.zeros(N, D) if kind == "adam" else None
    s2 = torch.zeros(N, D) if kind == "adam" else None

    w = w0.clone().to(device).requires_grad_(True)
    upd = ops.RowUpdate(w.detach(), kind, lr=lr, eps=eps, betas=betas, weight_decay=wd)
    if kind == "adagrad":
        upd.state1.copy_(s1)
    t = thr.clone().to(device).requires_grad_(True) if masked else None
    o = oov.clone().to(device).requires_grad_(True) if masked else None
    out = ops.masked_embedding(w, idx.to(device), t, dims.to(device) if masked else None, p, o, update=upd)
    out.backward(grad_out.to(device))

    exp_w, exp_gt, exp_goov, exp_s1, exp_s2 = _expected_step(w0, idx, thr, dims, p, oov, grad_out, kind, lr, eps,
                                                             betas, wd, s1=s1.double() if s1 is not None else None,
                                                             s2=s2.double() if s2 is not None else None)
    assert w.grad is None
    assert upd.step == 1
    tol = dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(w.detach().cpu().double(), exp_w, **tol)
    if masked:
        torch.testing.assert_close(t.grad.cpu().double(), exp_gt, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(o.grad.cpu().double(), exp_goov, **tol)
    if kind != "sgd":
        torch.testing.assert_close(upd.state1.cpu().double(), exp_s1, **tol)
    if kind == "adam":
        torch.testing.assert_close(upd.state2.cpu().double(), exp_s2, **tol)


def test_fused_backward_is_deterministic_and_leaves_untouched_rows(device):
    gen = torch.Generator().manual_seed(3)
    N, D = 400, 32
    w0 = torch.randn(N, D, generator=gen)
    idx = torch.randint(0, 100, (257, 5), generator=gen)
    idx[:, 0] = 7  # a hot row
    grad_out = torch.randn(257, 5, D, generator=gen)
    results = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        w = w0.clone().to(device).requires_grad_(True)
        upd = ops.RowUpdate(w.detach(), "adagrad", lr=0.1)
        thr = torch.full((5,), 20.0, device=device, requires_grad=True)
        ops.masked_embedding(w, idx.to(device), thr, None, 1, None, update=upd).backward(grad_out.to(device))
        results.append((w.detach().cpu().clone(), thr.grad.cpu().clone()))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    assert torch.equal(results[0][0][100:], w0[100:])


def test_fused_backward_raises_on_bad_ids_before_writing(device):
    w = torch.randn(10, 4, device=device, requires_grad=True)
    before = w.detach().clone()
    upd = ops.RowUpdate(w.detach(), "sgd", lr=1.0)
    idx = torch.tensor([[1, 2], [3, 10]], device=device)
    out = ops.masked_embedding(w, idx, None, None, 1, None, check_indices=False, update=upd)
    if device.type == "cpu":  # the CPU backward checks its ids (as masked_embedding's)
        with pytest.raises(IndexError, match=r"indices\[1, 1\] = 10"):
            out.sum().backward()
        assert torch.equal(w.detach(), before)
    else:  # the CUDA backward trusts the forward's checks: an unchecked bad id updates nothing
        out.sum().backward()
        assert torch.equal(w.detach()[4:], before[4:]) and torch.equal(w.detach()[0], before[0])
        assert torch.equal(w.detach()[1:4], before[1:4] - 1.0)


def test_fused_backward_optimizer_trains_a_module_and_resumes():
    gen = torch.Generator().manual_seed(5)
    N, D, B, nf = 60, 8, 16, 3
    w0 = torch.randn(N, D, generator=gen)
    batches = [(torch.randint(0, N, (B, nf), generator=gen), torch.randn(B, nf, D, generator=gen)) for _ in range(4)]

    def run(fused, steps, state=None):
        w = torch.nn.Parameter(w0.clone())
        opt = (optim.FusedBackwardOptimizer if fused else optim.LazyAdam)([w], lr=0.05, **({"kind": "adam"}
                                                                                              if fused else {}))
        if state is not None:
            w.data.copy_(state[0])
            opt.load_state_dict(state[1])
        for idx, g in steps:
            opt.zero_grad()
            ops.masked_embedding(w, idx, None, None, 1, None, sparse=not fused).backward(g)
            opt.step()
        if fused:
            opt.detach()
        return w.detach().clone(), opt.state_dict()

    w_ref, _ = run(False, batches)
    w_fused, _ = run(True, batches)
    torch.testing.assert_close(w_fused, w_ref, rtol=1e-5, atol=1e-6)
    w_half, sd = run(True, batches[:2])
    assert sd["state"][0]["step"] == 2
    w_resumed, _ = run(True, batches[2:], state=(w_half, sd))
    torch.testing.assert_close(w_resumed, w_ref, rtol=1e-5, atol=1e-6)
    assert ops.fused_update_of(torch.nn.Parameter(w0)) is None


def test_fused_backward_optimizer_lr_change_takes_effect():
    w = torch.nn.Parameter(torch.zeros(4, 2))
    opt = optim.FusedBackwardOptimizer([w], kind="sgd", lr=1.0)
    idx = torch.tensor([[0]])
    ops.masked_embedding(w, idx).sum().backward()
    opt.step()
    assert torch.equal(w.detach()[0], torch.tensor([-1.0, -1.0]))
    opt.param_groups[0]["lr"] = 0.5
    opt.step()
    ops.masked_embedding(w, idx).sum().backward()
    assert torch.equal(w.detach()[0], torch.tensor([-1.5, -1.5]))
    assert w.grad is None
    opt.detach()
    ops.masked_embedding(w, idx).sum().backward()
    assert w.grad is not None


def test_trainer_factory_builds_the_fused_backward_optimizer():
    make = optim.fused_backward_factory("adagrad")
    table = torch.nn.Parameter(torch.randn(10, 4))
    dense = torch.nn.Parameter(torch.randn(3))

    class Cfg:
        lr, weight_decay = 0.01, 0.0

    opts = make([{"params": [dense], "lr": 0.01, "weight_decay": 0.0}],
                [{"params": [table], "lr": 0.02, "weight_decay": 0.0}], Cfg())
    assert isinstance(opts[0], torch.optim.Adam) and isinstance(opts[1], optim.FusedBackwardOptimizer)
    assert ops.fused_update_of(table).lr == 0.02
    opts[1].detach()
    with pytest.raises(ValueError):
        optim.fused_backward_factory("momentum")


def test_deterministic_algorithms_select_the_deterministic_path(monkeypatch):
    """torch.use_deterministic_algorithms(True) turns deterministic=True on for masked_embedding (and
    compact_embedding): the flag reaching the compiled op is recorded."""
    from optembed_ext import _ext

    if not _ext.HAS_EXTENSION or ops.use_reference():
        pytest.skip("the flag is passed to the compiled op only")
    seen = []
    real = torch.ops.optembed.masked_embedding

    def spy(*args):
        seen.append(args[7])
        return real(*args)

    monkeypatch.setattr(torch.ops.optembed, "masked_embedding", spy)
    w = torch.randn(10, 4, requires_grad=True)
    idx = torch.tensor([[1, 2]])
    ops.masked_embedding(w, idx)
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        ops.masked_embedding(w, idx)
    finally:
        torch.use_deterministic_algorithms(prev)
    assert seen == [False, True]


@pytest.mark.parametrize("kind", ["sgd", "adagrad"])
def test_hot_row_split_matches_reference_and_is_thread_independent(device, kind):
    """A row looked up 5,000 times in a batch (more than the CPU kernel's split length 4,096): its run is summed
    in fixed segments whose partials are added in order; the result matches the unfused step and does not depend
    on the thread count (dense backward and fused update)."""
    gen = torch.Generator().manual_seed(8)
    N, D, B, nf = 300, 12, 2500, 3
    w0 = torch.randn(N, D, generator=gen)
    idx = torch.randint(0, N, (B, nf), generator=gen)
    idx[:, 0] = 7
    idx[: B // 2, 2] = 7  # row 7: 3,750 + 1,250 = 5,000 lookups
    thr = torch.tensor([3.0, 9.0, 6.0])
    dims = torch.randint(1, D + 1, (B, nf), generator=gen)
    grad_out = torch.randn(B, nf, D, generator=gen)
    lr = 0.05
    s1 = torch.zeros(N) if kind == "adagrad" else None
    exp_w, exp_gt, _, _, _ = _expected_step(w0, idx, thr, dims, 1, None, grad_out, kind, lr, 1e-8, (0.9, 0.999),
                                            0.0, s1=s1.double() if s1 is not None else None)
    results = []
    threads0 = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            w = w0.clone().to(device).requires_grad_(True)
            upd = ops.RowUpdate(w.detach(), kind, lr=lr)
            t = thr.clone().to(device).requires_grad_(True)
            ops.masked_embedding(w, idx.to(device), t, dims.to(device), 1, None, update=upd).backward(
                grad_out.to(device))
            wd = w0.clone().to(device).requires_grad_(True)
            ops.masked_embedding(wd, idx.to(device), thr.to(device), dims.to(device), 1, None,
                                 deterministic=True).backward(grad_out.to(device))
            results.append((w.detach().cpu(), t.grad.cpu(), wd.grad.cpu()))
    finally:
        torch.set_num_threads(threads0)
    torch.testing.assert_close(results[0][0].double(), exp_w, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(results[0][1].double(), exp_gt, rtol=1e-4, atol=1e-3)
    for a, b in zip(results[0], results[1]):
        assert torch.equal(a, b)
    if kind == "sgd":  # the dense gradient of the hot row: (w0 - w_new) / lr
        torch.testing.assert_close(results[0][2][7].double(), (w0[7].double() - exp_w[7]) / lr, rtol=1e-4,
                                   atol=1e-3)
