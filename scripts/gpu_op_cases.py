"""Every op once on CUDA, small shapes, each kernel variant (for compute-sanitizer; run by gpu_check.py).

Forward and backward of masked_embedding (threshold / dims / OOV / p, dense atomic and deterministic, sparse, fused
update, int32 and int64 ids, fp32 with D = 16 / 64 (vector paths), odd D and a strided table view (scalar paths),
fp16 / bf16), row_mask, compact_embedding (forward, backward, checked and unchecked) and sparse_row_update (sgd,
adagrad, adam, with a hot row). Exits non-zero on any exception; results are compared with the reference.
"""
import torch

from optembed_ext import ops
from optembed_ext import reference as ref


def close(a, b, what, tol=1e-3):
    torch.testing.assert_close(a.float().cpu(), b.float().cpu(), rtol=tol, atol=tol, msg=lambda m: f"{what}: {m}")


def masked_cases(dev):
    g = torch.Generator().manual_seed(0)
    for D, dtype, idt in ((16, torch.float32, torch.int64), (64, torch.float32, torch.int32), (7, torch.float32,
                          torch.int64), (32, torch.float16, torch.int64), (32, torch.bfloat16, torch.int32)):
        N, B, F = 300, 37, 5
        w = (torch.randn(N, D, generator=g) * 0.3).to(dtype)
        idx = torch.randint(0, 40, (B, F), generator=g)
        idx[:, 0] = 3  # a hot row
        thr = torch.rand(F, generator=g) * D * 0.2
        dims = torch.randint(0, D + 1, (B, F), generator=g)
        oov = torch.randn(F, D, generator=g).to(dtype)
        go = torch.randn(B, F, D, generator=g).to(dtype)
        for p in (1, 2):
            for det, sparse in ((False, False), (True, False), (False, True)):
                outs = []
                for device in ("cpu", dev):
                    wd = w.to(device).requires_grad_(True)
                    td = thr.to(device).requires_grad_(True)
                    od = oov.to(device).requires_grad_(True)
                    o = ops.masked_embedding(wd, idx.to(idt).to(device), td, dims.to(device), p, od,
                                             deterministic=det, sparse=sparse)
                    o.backward(go.to(device))
                    gw = wd.grad.to_dense() if sparse else wd.grad
                    outs.append((o, gw, td.grad, od.grad))
                tol = 1e-3 if dtype == torch.float32 else 5e-2
                for a, b, name in zip(outs[0], outs[1], ("out", "grad_w", "grad_t", "grad_oov")):
                    close(b, a, f"masked D={D} {dtype} p={p} det={det} sparse={sparse} {name}", tol)
        # a strided view of a wider table (storage offset: the scalar fallback)
        big = torch.randn(N, D + 3, generator=g).to(dtype).to(dev)
        view = big[:, 1:D + 1]
        o = ops.masked_embedding(view, idx.to(dev), thr.to(dev), None, 1, None)
        close(o, ref.masked_embedding(view.cpu(), idx, thr, None, 1, None), f"masked view D={D}", 5e-2)
        # the optimizer fused into the backward
        for kind in ("sgd", "adagrad", "adam"):
            wd = w.float().to(dev).requires_grad_(True)
            upd = ops.RowUpdate(wd.detach(), kind, lr=0.1)
            ops.masked_embedding(wd, idx.to(dev), thr.to(dev), dims.to(dev), 1, None, update=upd).backward(
                go.float().to(dev))


def other_ops(dev):
    g = torch.Generator().manual_seed(1)
    N, D, F = 200, 16, 4
    w = torch.randn(N, D, generator=g)
    field = torch.randint(0, F, (N,), generator=g)
    thr = torch.rand(F, generator=g) * 8
    close(ops.row_mask(w.to(dev), field.to(dev), thr.to(dev), 1), ref.row_mask(w, field, thr, 1), "row_mask")
    for D in (16, 64, 5):
        for kind in ("sgd", "adagrad", "adam"):
            w = torch.randn(N, D, generator=g)
            idx = torch.randint(0, 50, (300,), generator=g)
            idx[:100] = 7  # hot row
            rows = torch.randn(300, D, generator=g)
            s1 = torch.zeros(N) if kind == "adagrad" else torch.zeros(N, D) if kind == "adam" else None
            s2 = torch.zeros(N, D) if kind == "adam" else None
            wc, wg = w.clone(), w.clone().to(dev)
            ref.sparse_row_update(wc, idx, rows, None if s1 is None else s1.clone(), None if s2 is None else
                                  s2.clone(), optimizer=kind, lr=0.1)
            ops.sparse_row_update(wg, idx.to(dev), rows.to(dev), None if s1 is None else s1.to(dev),
                                  None if s2 is None else s2.to(dev), optimizer=kind, lr=0.1)
            close(wg, wc, f"sparse_row_update {kind} D={D}")
    # compact layout: every D_f a multiple of 4 (vector path) and odd ones (scalar path)
    for dims in ((4, 8, 12, 16), (3, 5, 1, 7)):
        rows_per = (11, 6, 9, 4)
        offsets = [0]
        for r, d in zip(rows_per, dims):
            offsets.append(offsets[-1] + r * d)
        packed = torch.randn(offsets[-1], generator=g)
        card = 15
        remap = torch.cat([torch.randint(-1, r, (card,), generator=g) for r in rows_per])
        ids = torch.stack([torch.randint(0, card, (33,), generator=g) + f * card for f in range(4)], 1)
        fo = torch.tensor(offsets)
        fd = torch.tensor(dims)
        go = torch.randn(33, 4, 16, generator=g)
        for check in (True, False):
            res = []
            for device in ("cpu", dev):
                pk = packed.to(device).requires_grad_(True)
                o = ops.compact_embedding(pk, fo.to(device), fd.to(device), remap.to(device), ids.to(device), 16,
                                          None, check_indices=check)
                o.backward(go.to(device))
                res.append((o, pk.grad))
            close(res[1][0], res[0][0], f"compact {dims} out")
            close(res[1][1], res[0][1], f"compact {dims} grad")


def main():
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device")
    dev = "cuda"
    masked_cases(dev)
    other_ops(dev)
    torch.cuda.synchronize()
    print("gpu_op_cases: all cases ran and matched the CPU")


if __name__ == "__main__":
    main()
