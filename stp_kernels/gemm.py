"""``gemm`` backend of ``masked_logprob``: library matmuls over vocabulary chunks with fused epilogues.

Interface: ``reference.backend_contract``. Structure and settings: ``_gemm_common`` (chunk of 2**24 / R slots, at
least 4096, Triton epilogue on CUDA, torch epilogue on CPU, second CUDA stream for the epilogues).

Forward, per chunk: z = h @ W[chunk].T (float32 output, float32 accumulation), then the epilogue folds z * inv_temp
into each row's running max, sum exp and sum exp * z and picks the target logit. 2 N H V flops.
Backward, per chunk: z recomputed (2 N H V), the epilogue writes dz = inv_temp (g_tgt [v == t] + p (a - b z))
ONCE in the input dtype, then dh += dz @ W[chunk] (float32 accumulation across chunks, 2 N H V) and
dW[chunk] = dz^T @ h written directly in the weight's dtype (2 N H V). Forward + backward: exactly 8 N H V flops.
No atomics, chunks in a fixed order: bitwise identical results run to run. Extra memory, never [R, V]: the float32
[R, chunk] logits buffer and an [R, chunk] dz buffer (two of each when overlapping on CUDA; on one stream with
float32 inputs dz overwrites the logits in place) and the float32 [R, H] dh accumulator.

On CUDA the 16-bit operands go to cuBLAS as they are (tensor cores, ``torch.mm(out_dtype=float32)``); on CPU,
16-bit operands are multiplied in float32 (the CPU library has no 16-bit-in, float32-out product).

Status: verified on CPU (torch epilogue, and the Triton epilogue through Triton's interpreter); the CUDA path
(cuBLAS float32-output products, the Triton kernels compiled, two-stream overlap) has not run on a GPU yet:
``python -m stp_kernels.acceptance`` measures it.
"""

from __future__ import annotations

import torch

from . import _gemm_common as G

__all__ = ["forward", "backward"]


def _slots(w: torch.Tensor, vocab_ids: torch.Tensor | None) -> int:
    return w.shape[0] if vocab_ids is None else vocab_ids.shape[0]


def forward(h: torch.Tensor, w: torch.Tensor, vocab_ids: torch.Tensor | None, tgt: torch.Tensor, inv_temp: float,
            want_mean: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    rows, vocab_size, dev = h.shape[0], _slots(w, vocab_ids), h.device
    m = torch.full((rows,), float("-inf"), dtype=torch.float32, device=dev)
    s = torch.zeros(rows, dtype=torch.float32, device=dev)
    sz = torch.zeros(rows, dtype=torch.float32, device=dev) if want_mean else None
    tgt_logit = torch.zeros(rows, dtype=torch.float32, device=dev)
    epi = G.epilogue_module(dev)
    fold = epi.fold_lse if epi is not None else G.torch_fold_lse
    G.fold_chunks(h, w, vocab_ids, vocab_size, lambda z, start: fold(z, start, inv_temp, tgt, m, s, sz, tgt_logit))
    lse = m + torch.log(s)
    return lse, tgt_logit, (sz / s if sz is not None else None)


# dh accumulation for 16-bit operands on CUDA: cuBLAS adds the product into the float32 accumulator in place when
# torch offers addmm(out_dtype=float32); otherwise the product goes through a float32 [R, H] scratch buffer.
_inplace_acc: dict[tuple[str, torch.dtype], bool] = {}


def _acc_inplace_ok(device: torch.device, dtype: torch.dtype) -> bool:
    key = (str(device), dtype)
    if key not in _inplace_acc:
        ok, why = False, None
        try:
            a = torch.randn(8, 16, device=device).to(dtype)
            b = torch.randn(16, 8, device=device).to(dtype)
            acc = torch.randn(8, 8, device=device)
            expected = acc + a.float() @ b.float()
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            ok = bool(torch.allclose(acc, expected, rtol=1e-3, atol=1e-3))
            why = None if ok else "its result differs from the float32 sum"
        except (RuntimeError, TypeError, NotImplementedError) as exc:
            why = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        _inplace_acc[key] = ok
        if why is not None:
            from . import _backends

            _backends.report_fallback(
                "gemm", device.type, f"backward adds each {dtype} chunk product to dh through a float32 [R, H] "
                f"scratch buffer (one more read and write of R x H floats per chunk) because "
                f"torch.addmm(out_dtype=float32, out=acc) failed: {why}")
    return _inplace_acc[key]


def backward(h: torch.Tensor, w: torch.Tensor, vocab_ids: torch.Tensor | None, tgt: torch.Tensor, inv_temp: float,
             lse: torch.Tensor, g_tgt: torch.Tensor, a: torch.Tensor, b: torch.Tensor | None, need_dh: bool,
             need_dw: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    rows, hidden = h.shape
    vocab_size, dev = _slots(w, vocab_ids), h.device
    dh = torch.zeros(rows, hidden, dtype=torch.float32, device=dev) if need_dh else None
    dw = torch.empty(vocab_size, hidden, dtype=w.dtype, device=dev) if need_dw else None
    if not (need_dh or need_dw):
        return dh, dw
    epi = G.epilogue_module(dev)
    grad = epi.logit_grad if epi is not None else G.torch_logit_grad
    pipe = G.Pipeline(dev)
    parts = G.chunks(vocab_size, rows)
    lhs = G.operand(h)  # h itself, or h in float32 where the library cannot take 16-bit operands to float32
    native = lhs.dtype == h.dtype  # dz and W[chunk] enter the gradient products in their own dtype
    count = 2 if pipe.on else 1
    zbufs = G.Buffers(rows, parts[0][1], dev, torch.float32, count)
    # One stream, float32 input, torch epilogue: dz overwrites z in its own buffer (it reads each slab first).
    share = not pipe.on and h.dtype == torch.float32 and epi is None
    dzbufs = zbufs if share else G.Buffers(rows, parts[0][1], dev, h.dtype, count)
    scratch = None
    if dh is not None and h.dtype != torch.float32 and native and not _acc_inplace_ok(dev, h.dtype):
        scratch = torch.empty(rows, hidden, dtype=torch.float32, device=dev)
    z_free, dz_free = [None, None], [None, None]

    def consume(c: int, start: int, stop: int, w_c: torch.Tensor, dz: torch.Tensor, dz_ready) -> None:
        """The two gradient products of chunk c, on the caller's stream, once its dz is written."""
        pipe.wait(dz_ready)
        dz_op = dz if native else dz.float()
        w_op = w_c if native else w_c.float()
        if dh is not None:
            if dh.dtype == dz_op.dtype:
                torch.addmm(dh, dz_op, w_op, out=dh)  # in place (the flop counter does not see addmm_)
            elif scratch is None:
                torch.addmm(dh, dz_op, w_op, out_dtype=torch.float32, out=dh)
            else:
                dh.add_(torch.mm(dz_op, w_op, out_dtype=torch.float32, out=scratch))
        if dw is not None:
            if native:
                torch.mm(dz_op.T, lhs, out=dw[start:stop])  # written in the weight's dtype, float32 accumulation
            else:
                dw[start:stop].copy_(dz_op.T @ lhs)
        dz_free[c % 2] = pipe.mark()

    pending = None
    try:
        for c, (start, stop) in enumerate(parts):
            width = stop - start
            z, dz = zbufs.get(c, width), dzbufs.get(c, width)
            w_c = G.weight_chunk(w, vocab_ids, start, stop)
            pipe.wait(z_free[c % 2])
            G.mm_f32(lhs, w_c.T, z)
            ready = pipe.mark()
            with pipe.side():
                pipe.wait(ready, on_side=True)
                pipe.wait(dz_free[c % 2], on_side=True)  # the products of chunk c - 2 have read this dz buffer
                grad(z, start, inv_temp, tgt, lse, g_tgt, a, b, dz)
                z_free[c % 2] = pipe.mark(on_side=True)
                dz_ready = pipe.mark(on_side=True)
            if not pipe.on:  # one stream: the products follow at once, while the chunk is still in cache
                consume(c, start, stop, w_c, dz, dz_ready)
                continue
            if pending is not None:  # chunk c - 1's products on the caller's stream while chunk c's epilogue runs
                consume(*pending)
            pending = (c, start, stop, w_c, dz, dz_ready)
        if pending is not None:
            consume(*pending)
    finally:  # also when a chunk raises: the buffers are freed only after the side stream's work on them
        pipe.join()
    return dh, dw
