"""The implementations compared by the masked_logprob benchmark, each as a callable over the same inputs.

Data: hidden ~ N(0, 1), weight ~ N(0, 1/H) scaled by 4 (logits with a spread of about 4: a peaked but not
degenerate softmax), uniform random targets, per-row upstream gradient ~ N(0, 1) (advantage-like, both signs).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import torch

import stp_kernels


def make_inputs(n: int, h: int, v: int, dtype: torch.dtype, device: str, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return dict(
        hidden=torch.randn(n, h, generator=gen).to(device=device, dtype=dtype).requires_grad_(),
        weight=(torch.randn(v, h, generator=gen) * (4.0 / h**0.5)).to(device=device, dtype=dtype).requires_grad_(),
        targets=torch.randint(0, v, (n,), generator=gen).to(device),
        grad=torch.randn(n, generator=gen).to(device),
    )


def naive(hidden, weight, targets):
    """What a training loop writes: full logits, upcast, log-softmax, gather."""
    return torch.log_softmax((hidden @ weight.T).float(), dim=-1).gather(1, targets[:, None])[:, 0]


_compiled = None


def compiled(hidden, weight, targets):
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(naive, dynamic=False)
    return _compiled(hidden, weight, targets)


def _ours(backend: str) -> Callable:
    return lambda hidden, weight, targets: stp_kernels.masked_logprob(hidden, weight, targets, backend=backend)


def _liger(hidden, weight, targets):
    # Liger's fused linear cross-entropy returns per-row losses with reduction="none" (its gradient is computed in
    # the forward pass, so it only takes a uniform upstream gradient correctly; timed here as a throughput peer).
    from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction

    return -LigerFusedLinearCrossEntropyFunction.apply(hidden, weight, targets, None, None, -100, 0.0, 0.0, "none")[0]


def _cce(hidden, weight, targets):
    from cut_cross_entropy import linear_cross_entropy

    return -linear_cross_entropy(hidden, weight, targets, reduction="none")


def variants(device: str) -> dict[str, Callable]:
    """Name -> fn(hidden, weight, targets) -> per-row log-probs, for those that can run on ``device``."""
    out: dict[str, Callable] = {"naive_torch": naive, "torch_compile": compiled}
    for backend in stp_kernels.available_backends(device):
        if backend == "torch":
            continue  # the plain reference: same as naive_torch up to the upcast
        if backend == "triton" and device == "cpu":
            continue  # Triton's interpreter: for tests, ~1000x slower
        out[f"stp_{backend}"] = _ours(backend)
    if device == "cuda":
        if importlib.util.find_spec("liger_kernel") is not None:
            out["liger_kernel"] = _liger
        if importlib.util.find_spec("cut_cross_entropy") is not None:
            out["cut_cross_entropy"] = _cce
    return out


def step(fn: Callable, inputs: dict, mode: str) -> Callable[[], None]:
    """A closure running one forward (mode "fwd", no autograd graph) or forward+backward ("fwd_bwd")."""
    h, w, t, g = inputs["hidden"], inputs["weight"], inputs["targets"], inputs["grad"]
    sync = torch.cuda.synchronize if h.is_cuda else (lambda: None)

    if mode == "fwd":
        def run():
            with torch.no_grad():
                fn(h, w, t)
            sync()
    elif mode == "fwd_bwd":
        def run():
            h.grad = w.grad = None
            fn(h, w, t).backward(g)
            sync()
    else:
        raise ValueError(f"mode must be 'fwd' or 'fwd_bwd', got {mode!r}")
    return run
