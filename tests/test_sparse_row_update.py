"""sparse_row_update (fused SGD / row-wise Adagrad / lazy Adam on the touched rows) against plain PyTorch formulas.

The expected values come from a dense float64 re-statement of each update rule (a dense gradient built with
``index_add_``, the rule applied to the rows that occur in ``indices``) and, where the rules coincide, from
``torch.optim.SGD`` / ``Adagrad`` / ``Adam`` themselves.
"""
import pytest
import torch

from optembed_ext import _ext

KINDS = ("sgd", "adagrad", "adam")


def _torch_op(weight, indices, grad_rows, state1=None, state2=None, *, optimizer="sgd", lr, eps=1e-8, beta1=0.9,
              beta2=0.999, weight_decay=0.0, step=1, check_indices=None):
    extra = () if check_indices is None else (check_indices,)  # the schema's default is True
    torch.ops.optembed.sparse_row_update(weight, indices, grad_rows, state1, state2, optimizer, lr, eps, beta1, beta2,
                                         weight_decay, step, *extra)


def _ops_fn(*args, **kwargs):
    from optembed_ext import ops

    return ops.sparse_row_update(*args, **kwargs)


def _reference_fn(*args, **kwargs):
    from optembed_ext import reference

    return reference.sparse_row_update(*args, **kwargs)


needs_ext = pytest.mark.skipif(not _ext.HAS_EXTENSION, reason="compiled extension not built")
IMPLS = [
    pytest.param("torch_op", marks=needs_ext),
    "ops",
    "reference",
]
FN = {"torch_op": _torch_op, "ops": _ops_fn, "reference": _reference_fn}


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _states(kind, N, D, dtype, device, gen=None):
    acc = _acc(dtype)
    if kind == "sgd":
        return None, None
    if kind == "adagrad":
        s = torch.rand(N, generator=gen, dtype=torch.float64).to(acc) if gen is not None else torch.zeros(N, dtype=acc)
        return s.to(device), None
    if gen is None:
        return torch.zeros(N, D, dtype=acc, device=device), torch.zeros(N, D, dtype=acc, device=device)
    m = (torch.randn(N, D, generator=gen, dtype=torch.float64) * 0.1).to(acc).to(device)
    v = (torch.rand(N, D, generator=gen, dtype=torch.float64) * 0.01).to(acc).to(device)
    return m, v


def expected_update(kind, w, idx, rows, s1, s2, lr, eps, beta1, beta2, wd, step):
    """Dense float64 statement of the rules; returns new (w, s1, s2) (inputs untouched)."""
    w = w.detach().to(torch.float64).cpu().clone()
    N, D = w.shape
    G = torch.zeros(N, D, dtype=torch.float64)
    G.index_add_(0, idx.cpu().long(), rows.detach().cpu().to(torch.float64))
    touched = torch.zeros(N, dtype=torch.bool)
    touched[idx.cpu().long()] = True
    G = G + wd * w
    s1 = None if s1 is None else s1.detach().cpu().to(torch.float64).clone()
    s2 = None if s2 is None else s2.detach().cpu().to(torch.float64).clone()
    t = touched
    if kind == "sgd":
        w[t] = w[t] - lr * G[t]
    elif kind == "adagrad":
        s1[t] = s1[t] + (G[t] ** 2).sum(1) / D
        w[t] = w[t] - lr * G[t] / (s1[t].sqrt() + eps)[:, None]
    else:
        s1[t] = beta1 * s1[t] + (1 - beta1) * G[t]
        s2[t] = beta2 * s2[t] + (1 - beta2) * G[t] ** 2
        mhat = s1[t] / (1 - beta1 ** step)
        vhat = s2[t] / (1 - beta2 ** step)
        w[t] = w[t] - lr * mhat / (vhat.sqrt() + eps)
    return w, s1, s2


def _tol(dtype):
    return {"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-6}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("wd", [0.0, 0.05])
def test_matches_formula(impl, kind, dtype, wd, device):
    gen = torch.Generator().manual_seed(100 * KINDS.index(kind) + 10 * (dtype == torch.float64) + int(wd > 0))
    N, D, M = 41, 13, 57
    w = torch.randn(N, D, generator=gen, dtype=torch.float64).to(dtype).to(device)
    s1, s2 = _states(kind, N, D, dtype, device, gen)
    hp = {"lr": 0.05, "eps": 1e-6, "beta1": 0.8, "beta2": 0.95}
    for step in (1, 2, 3):
        # fewer distinct rows than positions: many repeats; about half the table untouched
        idx = torch.randint(0, N // 2, (M,), generator=gen) * 2
        rows = torch.randn(M, D, generator=gen, dtype=torch.float64).to(dtype).to(device)
        ew, es1, es2 = expected_update(kind, w, idx, rows, s1, s2, hp["lr"], hp["eps"], hp["beta1"], hp["beta2"], wd,
                                       step)
        before = w.clone()
        FN[impl](w, idx.to(device), rows, s1, s2, optimizer=kind, weight_decay=wd, step=step, **hp)
        torch.testing.assert_close(w.cpu().to(torch.float64), ew, **_tol(dtype))
        if s1 is not None:
            torch.testing.assert_close(s1.cpu().to(torch.float64), es1, **_tol(dtype))
        if s2 is not None:
            torch.testing.assert_close(s2.cpu().to(torch.float64), es2, **_tol(dtype))
        untouched = torch.ones(N, dtype=torch.bool)
        untouched[idx] = False
        assert untouched.any()
        assert torch.equal(w.cpu()[untouched], before.cpu()[untouched])  # bit-identical


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("wd", [0.0, 0.01])
def test_adam_equals_torch_adam_when_every_row_is_touched(impl, wd, device):
    gen = torch.Generator().manual_seed(1)
    N, D = 9, 6
    w0 = torch.randn(N, D, generator=gen, dtype=torch.float64)
    p = torch.nn.Parameter(w0.clone())
    opt = torch.optim.Adam([p], lr=0.01, betas=(0.9, 0.99), eps=1e-7, weight_decay=wd)
    w = w0.clone().to(device)
    m = torch.zeros(N, D, dtype=torch.float64, device=device)
    v = torch.zeros_like(m)
    for step in range(1, 5):
        idx = torch.cat([torch.randperm(N, generator=gen), torch.randint(0, N, (7,), generator=gen)])
        rows = torch.randn(idx.numel(), D, generator=gen, dtype=torch.float64)
        p.grad = torch.zeros(N, D, dtype=torch.float64).index_add_(0, idx, rows)
        opt.step()
        FN[impl](w, idx.to(device), rows.to(device), m, v, optimizer="adam", lr=0.01, eps=1e-7, beta1=0.9, beta2=0.99,
                 weight_decay=wd, step=step)
        torch.testing.assert_close(w.cpu(), p.detach(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("impl", IMPLS)
def test_sgd_equals_torch_sgd(impl, device):
    gen = torch.Generator().manual_seed(2)
    N, D = 30, 7
    w0 = torch.randn(N, D, generator=gen)
    p = torch.nn.Parameter(w0.clone())
    opt = torch.optim.SGD([p], lr=0.1)
    w = w0.clone().to(device)
    for _ in range(3):
        idx = torch.randint(0, N, (40,), generator=gen)
        rows = torch.randn(40, D, generator=gen)
        p.grad = torch.zeros(N, D).index_add_(0, idx, rows)
        opt.step()
        FN[impl](w, idx.to(device), rows.to(device), optimizer="sgd", lr=0.1)
        torch.testing.assert_close(w.cpu(), p.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_rowwise_adagrad_with_one_column_equals_torch_adagrad(impl, device):
    # with D = 1 the row-wise accumulator is the element-wise one
    gen = torch.Generator().manual_seed(3)
    N = 25
    w0 = torch.randn(N, 1, generator=gen, dtype=torch.float64)
    p = torch.nn.Parameter(w0.clone())
    opt = torch.optim.Adagrad([p], lr=0.3, eps=1e-9)
    w = w0.clone().to(device)
    acc = torch.zeros(N, dtype=torch.float64, device=device)
    for _ in range(4):
        idx = torch.cat([torch.arange(N), torch.randint(0, N, (10,), generator=gen)])
        rows = torch.randn(idx.numel(), 1, generator=gen, dtype=torch.float64)
        p.grad = torch.zeros(N, 1, dtype=torch.float64).index_add_(0, idx, rows)
        opt.step()
        FN[impl](w, idx.to(device), rows.to(device), acc, optimizer="adagrad", lr=0.3, eps=1e-9)
        torch.testing.assert_close(w.cpu(), p.detach(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(acc.cpu(), opt.state[p]["sum"].squeeze(1), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", KINDS)
def test_repeated_index_sums_before_the_update(impl, kind, device):
    # a row given k times must equal that row given once with the summed gradient (adagrad/adam are non-linear in g)
    gen = torch.Generator().manual_seed(4)
    N, D = 6, 5
    w_a = torch.randn(N, D, generator=gen, dtype=torch.float64).to(device)
    w_b = w_a.clone()
    parts = torch.randn(4, D, generator=gen, dtype=torch.float64).to(device)
    sa1, sa2 = _states(kind, N, D, torch.float64, device)
    sb1, sb2 = _states(kind, N, D, torch.float64, device)
    hp = {"optimizer": kind, "lr": 0.1, "eps": 1e-8, "step": 1}
    FN[impl](w_a, torch.tensor([3, 3, 3, 3], device=device), parts, sa1, sa2, **hp)
    FN[impl](w_b, torch.tensor([3], device=device), parts.sum(0, keepdim=True), sb1, sb2, **hp)
    torch.testing.assert_close(w_a, w_b, rtol=1e-13, atol=1e-13)
    assert not torch.equal(w_a[3], w_b.new_zeros(D))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", KINDS)
def test_empty_indices_change_nothing(impl, kind, device):
    N, D = 8, 4
    w = torch.randn(N, D, device=device)
    s1, s2 = _states(kind, N, D, torch.float32, device)
    before = w.clone()
    FN[impl](w, torch.zeros(0, dtype=torch.int64, device=device), torch.zeros(0, D, device=device), s1, s2,
             optimizer=kind, lr=0.1, step=1)
    assert torch.equal(w, before)
    for s in (s1, s2):
        if s is not None:
            assert torch.count_nonzero(s) == 0


@pytest.mark.parametrize("impl", IMPLS)
def test_int32_indices(impl, device):
    gen = torch.Generator().manual_seed(5)
    N, D = 20, 3
    w = torch.randn(N, D, generator=gen).to(device)
    idx = torch.randint(0, N, (30,), generator=gen)
    rows = torch.randn(30, D, generator=gen).to(device)
    s1, s2 = _states("adam", N, D, torch.float32, device)
    ew, _, _ = expected_update("adam", w, idx, rows, s1, s2, 0.01, 1e-8, 0.9, 0.999, 0.0, 1)
    FN[impl](w, idx.to(torch.int32).to(device), rows, s1, s2, optimizer="adam", lr=0.01, step=1)
    torch.testing.assert_close(w.cpu().double(), ew, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_tables(impl, dtype, device):
    # states are float32; the result is the float32 update rounded once to the table dtype
    gen = torch.Generator().manual_seed(6)
    N, D = 16, 8
    w = torch.randn(N, D, generator=gen).to(dtype).to(device)
    idx = torch.randint(0, N, (24,), generator=gen)
    rows = torch.randn(24, D, generator=gen).to(dtype).to(device)
    s1, s2 = _states("adam", N, D, dtype, device)
    assert s1.dtype == torch.float32
    ew, es1, _ = expected_update("adam", w, idx, rows, s1, s2, 0.01, 1e-8, 0.9, 0.999, 0.0, 1)
    FN[impl](w, idx.to(device), rows, s1, s2, optimizer="adam", lr=0.01, step=1)
    assert w.dtype == dtype
    torch.testing.assert_close(w.cpu().double(), ew.to(dtype).double(), rtol=0, atol=2 * ew.abs().max().item()
                               * torch.finfo(dtype).eps)
    torch.testing.assert_close(s1.cpu().double(), es1, rtol=1e-5, atol=1e-6)


@needs_ext
def test_result_does_not_depend_on_thread_count():
    gen = torch.Generator().manual_seed(7)
    N, D, M = 500, 16, 20000
    idx = torch.randint(0, 50, (M,), generator=gen)  # long segments
    rows = torch.randn(M, D, generator=gen)
    outs = []
    previous = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            w = torch.zeros(N, D)
            _torch_op(w, idx, rows, optimizer="sgd", lr=1.0)
            outs.append(w)
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(outs[0], outs[1])


# ------------------------------------------------------------------------------------------------- bad inputs
def _good(kind="adam", N=10, D=4, M=5):
    w = torch.randn(N, D)
    idx = torch.randint(0, N, (M,))
    rows = torch.randn(M, D)
    s1, s2 = _states(kind, N, D, torch.float32, "cpu")
    return w, idx, rows, s1, s2


BAD_CASES = {
    "unknown optimizer": (lambda w, i, r, s1, s2: (w, i, r, s1, s2, {"optimizer": "rmsprop"}), "optimizer"),
    "state1 shape": (lambda w, i, r, s1, s2: (w, i, r, s1[:-1], s2, {}), "state1"),
    "state2 shape": (lambda w, i, r, s1, s2: (w, i, r, s1, s2[:, :-1], {}), "state2"),
    "state1 dtype": (lambda w, i, r, s1, s2: (w, i, r, s1.double(), s2, {}), "state1"),
    "missing state2": (lambda w, i, r, s1, s2: (w, i, r, s1, None, {}), "state2"),
    "sgd with state": (lambda w, i, r, s1, s2: (w, i, r, s1, s2, {"optimizer": "sgd"}), "state"),
    "adagrad state shape": (lambda w, i, r, s1, s2: (w, i, r, s1, None, {"optimizer": "adagrad"}), "state1"),
    "index out of range": (lambda w, i, r, s1, s2: (w, torch.tensor([0, 1, 2, 3, 10]), r, s1, s2, {}), "indices"),
    "negative index": (lambda w, i, r, s1, s2: (w, torch.tensor([0, -1, 2, 3, 4]), r, s1, s2, {}), "indices"),
    "float indices": (lambda w, i, r, s1, s2: (w, i.float(), r, s1, s2, {}), "indices"),
    "grad_rows rows": (lambda w, i, r, s1, s2: (w, i, r[:-1], s1, s2, {}), "grad_rows"),
    "grad_rows cols": (lambda w, i, r, s1, s2: (w, i, r[:, :-1], s1, s2, {}), "grad_rows"),
    "grad_rows dtype": (lambda w, i, r, s1, s2: (w, i, r.double(), s1, s2, {}), "grad_rows"),
    "weight 1-D": (lambda w, i, r, s1, s2: (w[:, 0].contiguous(), i, r, s1, s2, {"optimizer": "sgd"}), "weight"),
    "weight not contiguous": (lambda w, i, r, s1, s2: (w.t(), i, r, s1, s2, {"optimizer": "sgd"}), "weight"),
    "adam step 0": (lambda w, i, r, s1, s2: (w, i, r, s1, s2, {"step": 0}), "step"),
    "beta1 = 1": (lambda w, i, r, s1, s2: (w, i, r, s1, s2, {"beta1": 1.0}), "beta1"),
    "eps = 0": (lambda w, i, r, s1, s2: (w, i, r, s1, s2, {"eps": 0.0}), "eps"),
    "negative weight_decay": (lambda w, i, r, s1, s2: (w, i, r, s1, s2, {"weight_decay": -1.0}), "weight_decay"),
}


@pytest.mark.parametrize("impl", [pytest.param("torch_op", marks=needs_ext), "ops"])
@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_inputs_raise_naming_the_argument(impl, case):
    make, word = BAD_CASES[case]
    w, i, r, s1, s2, kw = make(*_good())
    if case == "weight not contiguous":
        r = torch.randn(i.numel(), w.shape[1])
    kwargs = {"optimizer": "adam", "lr": 0.1, "step": 1}
    kwargs.update(kw)
    if kwargs["optimizer"] == "sgd" and case != "sgd with state":
        s1 = s2 = None
    before = w.clone()
    with pytest.raises((RuntimeError, ValueError, TypeError, IndexError), match=word):
        FN[impl](w, i, r, s1, s2, **kwargs)
    if w.shape == before.shape:
        assert torch.equal(w, before)  # checks run before anything is written


@needs_ext
@pytest.mark.parametrize("kind", KINDS)
def test_opcheck(kind):
    import optembed_ext.ops  # noqa: F401  (registers the fake kernels)

    gen = torch.Generator().manual_seed(8)
    N, D = 12, 5
    s1, s2 = _states(kind, N, D, torch.float32, "cpu", gen)
    args = (torch.randn(N, D, generator=gen), torch.tensor([3, 0, 3, 11]), torch.randn(4, D, generator=gen), s1, s2,
            kind, 0.1, 1e-8, 0.9, 0.999, 0.01, 2)
    torch.library.opcheck(torch.ops.optembed.sparse_row_update.default, args)


# ----------------------------------------------------------------------------------- ids: checked and unchecked
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", KINDS)
def test_out_of_range_ids_raise_index_error_before_any_write(impl, kind, device):
    gen = torch.Generator().manual_seed(11)
    N, D = 10, 4
    w = torch.randn(N, D, generator=gen).to(device)
    s1, s2 = _states(kind, N, D, torch.float32, device)
    rows = torch.randn(6, D, generator=gen).to(device)
    before = w.clone()
    for bad_value in (N, -1, 4_000_000_000):
        idx = torch.tensor([1, 2, bad_value, 3, -7, N + 5], device=device)
        with pytest.raises(IndexError, match=rf"indices\[2\] = {bad_value} is out of range"):
            FN[impl](w, idx, rows, s1, s2, optimizer=kind, lr=0.1, step=1)
        assert torch.equal(w, before)
    with pytest.raises(IndexError, match="indices"):  # D = 0: the ids are still checked
        FN[impl](torch.zeros(N, 0, device=device), torch.tensor([0, N], device=device),
                 torch.zeros(2, 0, device=device), optimizer="sgd", lr=0.1)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", KINDS)
def test_unchecked_out_of_range_ids_update_nothing(impl, kind, device):
    gen = torch.Generator().manual_seed(12)
    N, D = 10, 4
    w = torch.randn(N, D, generator=gen).to(device)
    s1, s2 = _states(kind, N, D, torch.float32, device, gen)
    idx = torch.tensor([1, 4_000_000_000, 3, -1, 1, N, -(2 ** 40)])
    rows = torch.randn(idx.numel(), D, generator=gen).to(device)
    valid = (idx >= 0) & (idx < N)
    ew, es1, es2 = expected_update(kind, w, idx[valid], rows[valid.to(device)], s1, s2, 0.1, 1e-8, 0.9, 0.999, 0.01,
                                   1)
    FN[impl](w, idx.to(device), rows, s1, s2, optimizer=kind, lr=0.1, weight_decay=0.01, step=1,
             check_indices=False)
    torch.testing.assert_close(w.cpu().double(), ew, rtol=1e-5, atol=1e-6)
    for got, want in ((s1, es1), (s2, es2)):
        if got is not None:
            torch.testing.assert_close(got.cpu().double(), want, rtol=1e-5, atol=1e-6)
    # nothing valid at all: nothing changes
    before = w.clone()
    FN[impl](w, torch.tensor([-1, N], device=device), rows[:2], s1, s2, optimizer=kind, lr=0.1, step=1,
             check_indices=False)
    assert torch.equal(w, before)


@pytest.mark.parametrize("impl", IMPLS)
def test_zero_width_table(impl, device):
    w = torch.zeros(5, 0, device=device)
    FN[impl](w, torch.tensor([0, 4, 4], device=device), torch.zeros(3, 0, device=device), optimizer="sgd", lr=0.1)
    s1, _ = _states("adagrad", 5, 0, torch.float32, device)
    FN[impl](w, torch.tensor([1], device=device), torch.zeros(1, 0, device=device), s1, optimizer="adagrad", lr=0.1)
    assert w.shape == (5, 0)


@needs_ext
def test_first_bad_id_is_reported_whatever_the_threads():
    M = 50000
    idx = torch.zeros(M, dtype=torch.long)
    idx[M // 2 - 1] = 99
    idx[M // 2:] = -3
    with pytest.raises(IndexError, match=rf"indices\[{M // 2 - 1}\] = 99 "):
        _torch_op(torch.zeros(10, 2), idx, torch.zeros(M, 2), optimizer="sgd", lr=1.0)
