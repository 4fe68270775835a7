"""First-use self-check of the compiled backends: a small random problem against a float64 oracle.

The first call of an op on a device type runs each compiled backend (``cuda``, ``triton``, ``gemm``; ``cpu`` too
when forced on CPU) once on a small random problem with a vocabulary prior and a temperature, forward and backward
(masked_logprob) or greedy and tempered sampling (sample_step), against float64 computed here from the same inputs,
once per dtype (float32, bfloat16 and float16 on CUDA; float32 on CPU). A backend that raises or misses the
tolerance is disabled for the process and that dtype by ``_backends`` with one warning naming it and the error, and
dispatch moves to the next backend. Why: the kernels are compiled on the user's machine for the user's GPU; a
miscompiled or mislaunched kernel must never silently train on wrong numbers.

``$STP_KERNEL_SELFCHECK``: ``auto`` (default: CUDA devices only), ``1`` (also CPU; tests), ``0`` (never).
The tolerances catch wrong kernels (errors of order one), not rounding: float32 accumulation of float32 or
16-bit products stays orders of magnitude inside them.
"""

from __future__ import annotations

import os
from types import ModuleType

import torch

from .reference import counter_gumbel, row_keys

ENV = "STP_KERNEL_SELFCHECK"
CHECKED = ("cuda", "triton", "gemm", "cpu")
_MODES = ("auto", "1", "0")


def enabled(device_type: str) -> bool:
    mode = os.environ.get(ENV, "auto")
    if mode not in _MODES:
        raise ValueError(f"stp_kernels: ${ENV}={mode!r} is not allowed (allowed: auto = CUDA only, 1 = always, "
                         "0 = never)")
    return mode == "1" or (mode == "auto" and device_type == "cuda")


def _problem(device: str, dtype: torch.dtype, seed: int = 0):
    """21 rows, H = 40, V = 333 (ragged against every tile and chunk size), a 60% vocabulary prior."""
    gen = torch.Generator().manual_seed(seed)
    n, hdim, vsize = 21, 40, 333
    h = torch.randn(n, hdim, generator=gen)
    w = torch.randn(vsize, hdim, generator=gen) * (3.0 / hdim**0.5)
    vocab = torch.randperm(vsize, generator=gen)[: vsize * 3 // 5].sort().values
    slots = torch.randint(0, vocab.numel(), (n,), generator=gen)
    extra = [torch.randn(n, generator=gen) for _ in range(3)]
    to = dict(device=device)
    return h.to(dtype).to(**to), w.to(dtype).to(**to), vocab.to(**to), slots.to(**to), [e.to(**to) for e in extra]


def _compare(what: str, got: torch.Tensor | None, want: torch.Tensor, tol: float) -> None:
    """Max error relative to the largest reference value (plus tol absolute): raises with the numbers."""
    if got is None:
        raise AssertionError(f"{what}: returned None")
    if tuple(got.shape) != tuple(want.shape):
        raise AssertionError(f"{what}: shape {tuple(got.shape)}, expected {tuple(want.shape)}")
    err = (got.double().cpu() - want.cpu()).abs().max().item()
    bound = tol * (1.0 + want.abs().max().item())
    if not err <= bound:  # also catches NaN
        raise AssertionError(f"{what}: max error {err:.3e} > {bound:.3e}")


def check_masked_logprob(module: ModuleType, device: str, dtype: torch.dtype) -> None:
    h, w, vocab, slots, (g_tgt, a, b) = _problem(device, dtype)
    inv_temp = 1.0 / 0.8
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    lse, tgt_logit, mean = module.forward(h, w, vocab, slots, inv_temp, True)
    z = (h.double() @ w.index_select(0, vocab).double().T) * inv_temp
    ref_lse = torch.logsumexp(z, -1)
    p = torch.exp(z - ref_lse[:, None])
    _compare(f"forward lse ({dtype})", lse, ref_lse, tol)
    _compare(f"forward target logit ({dtype})", tgt_logit, z.gather(1, slots[:, None])[:, 0], tol)
    _compare(f"forward mean logit ({dtype})", mean, (p * z).sum(-1), tol)
    dh, dw = module.backward(h, w, vocab, slots, inv_temp, ref_lse.float(), g_tgt, a, b, True, True)
    dz = p * (a.double()[:, None] - b.double()[:, None] * z)
    dz.scatter_add_(1, slots[:, None], g_tgt.double()[:, None])
    dz *= inv_temp
    _compare(f"backward dh ({dtype})", dh, dz @ w.index_select(0, vocab).double(), tol)
    _compare(f"backward dw ({dtype})", dw, dz.T @ h.double(), tol)


def check_sample_step(module: ModuleType, device: str, dtype: torch.dtype) -> None:
    h, w, vocab, _, _ = _problem(device, dtype, seed=1)
    row_ids = torch.arange(h.shape[0], device=device) * 7919
    z = h.double() @ w.index_select(0, vocab).double().T
    ref_lse = torch.logsumexp(z, -1)
    ref_mean = (torch.softmax(z, -1) * z).sum(-1)
    for temperature in (0.0, 0.8):
        greedy = temperature == 0.0
        keys = row_keys(5, 3, row_ids)
        slot, z_sel, lse, mean = module.forward(h, w, vocab, keys, 0.0 if greedy else 1 / temperature, greedy, True)
        score = z if greedy else z / temperature + counter_gumbel(5, 3, row_ids, vocab).double()
        if slot.dtype != torch.int64 or slot.shape != (h.shape[0],):
            raise AssertionError(f"slot: dtype {slot.dtype} shape {tuple(slot.shape)}, expected int64 [{h.shape[0]}]")
        if bool(((slot < 0) | (slot >= vocab.numel())).any()):
            raise AssertionError(f"slot out of [0, {vocab.numel()}) at T={temperature}")
        # The chosen slot must be a maximiser of the score up to rounding (near-ties may go either way).
        loss = (score.amax(-1) - score.gather(1, slot[:, None])[:, 0]).max().item()
        if not loss <= 1e-3 * (1.0 + score.abs().max().item()):
            raise AssertionError(f"slot at T={temperature} ({dtype}): chosen score is {loss:.3e} below the best")
        _compare(f"z_sel at T={temperature} ({dtype})", z_sel, z.gather(1, slot[:, None])[:, 0], 1e-4)
        _compare(f"lse at T={temperature} ({dtype})", lse, ref_lse, 1e-4)
        _compare(f"mean logit at T={temperature} ({dtype})", mean, ref_mean, 1e-4)
        if not greedy:  # the tempered log-sum-exp of the same pass (sample_step's return_tempered_logp)
            out = module.forward(h, w, vocab, keys, 1 / temperature, greedy, False, want_tlse=True)
            _compare(f"tempered lse at T={temperature} ({dtype})", out[4], torch.logsumexp(z / temperature, -1),
                     1e-4)


# The gemm backends' chunk during the check: the problem's 199 vocabulary slots make 4 chunks (64, 64, 64 and a
# ragged 7), so the double buffer, the events between the streams and the narrow last chunk all run at first use.
CHECK_CHUNK = 64


def dtypes_checked(device_type: str) -> tuple[torch.dtype, ...]:
    return (torch.float32, torch.bfloat16, torch.float16) if device_type == "cuda" else (torch.float32,)


def run(op: str, module: ModuleType, device_type: str) -> dict[str, str | None]:
    """Check one backend module per dtype: {dtype name: None when it passes, else ``"ExceptionType: message"``}.

    The check runs as the ops run the backend: float32 products exact whatever the TF32 setting (``_fp32``)."""
    from . import _gemm_common as G
    from ._fp32 import exact_fp32

    device = "cuda" if device_type == "cuda" else "cpu"
    check = check_masked_logprob if op == "masked_logprob" else check_sample_step
    verdicts: dict[str, str | None] = {}
    chunk = G.settings.chunk
    G.settings.chunk = CHECK_CHUNK
    try:
        for dtype in dtypes_checked(device_type):
            try:
                with torch.no_grad(), exact_fp32():
                    check(module, device, dtype)
                verdicts[str(dtype).removeprefix("torch.")] = None
            except Exception as exc:  # a kernel that raises is as unusable as one that returns wrong numbers
                verdicts[str(dtype).removeprefix("torch.")] = f"{type(exc).__name__}: {exc}"
    finally:
        G.settings.chunk = chunk
    return verdicts
