"""``masked_logprob``: the LM head fused with log-softmax and target gather, at the scored rows only.

Layers: backend modules (``torch_chunked``, ``_cpu``, ``_cuda``, ``triton/masked_logprob``, ``gemm``) implement the
two-function contract of ``reference.backend_contract``; two torch.library custom ops (``stp::masked_logprob_fwd``
and ``_bwd``, with fake implementations and registered autograd) call any of them; ``masked_logprob`` validates,
gathers rows, maps the vocabulary prior and dispatches.
"""

from __future__ import annotations

from types import ModuleType

import torch

from . import _backends
from . import _validate as V
from ._fp32 import exact_fp32
from .reference import masked_logprob_reference

__all__ = ["masked_logprob"]

# The backend call as torch.library custom ops (with fake implementations), so that torch.compile traces through
# it without a graph break. Outputs are the contract's per-row quantities: lse, the target logit and the mean
# logit sum_v p_v z_v (an empty tensor when not asked for). Public outputs derive from them in plain torch:
# logp = tgt_logit - lse, entropy = lse - mean.


@torch.library.custom_op("stp::masked_logprob_fwd", mutates_args=())
def _fwd_op(h: torch.Tensor, w: torch.Tensor, vocab_ids: torch.Tensor | None, tgt: torch.Tensor, inv_temp: float,
            want_mean: bool, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    with exact_fp32():  # float32 inputs give float32 results whatever the process's TF32 setting
        lse, tgt_logit, mean = _impl(backend, h).forward(h, w, vocab_ids, tgt, inv_temp, want_mean)
    # Always copied: backends may return views of one buffer, which custom-op outputs must not be (R floats each).
    return lse.clone(), tgt_logit.clone(), (mean.clone() if want_mean else lse.new_empty(0))


@_fwd_op.register_fake
def _(h, w, vocab_ids, tgt, inv_temp, want_mean, backend):
    rows = h.shape[0]
    out = [h.new_empty(rows, dtype=torch.float32) for _ in range(2)]
    return out[0], out[1], h.new_empty(rows if want_mean else 0, dtype=torch.float32)


@torch.library.custom_op("stp::masked_logprob_bwd", mutates_args=())
def _bwd_op(h: torch.Tensor, w: torch.Tensor, vocab_ids: torch.Tensor | None, tgt: torch.Tensor, inv_temp: float,
            lse: torch.Tensor, g_tgt: torch.Tensor, a: torch.Tensor, b: torch.Tensor | None, need_dh: bool,
            need_dw: bool, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    with exact_fp32():
        dh, dw = _impl(backend, h).backward(h, w, vocab_ids, tgt, inv_temp, lse, g_tgt, a, b, need_dh, need_dw)
    # Backends may return dw in float32 or already in w's dtype (triton, cuda, torch_chunked): then .to() below is
    # a no-op and no float32 [V, H] buffer ever exists.
    dh = _own(dh.to(h.dtype)) if need_dh else h.new_empty(0)
    if not need_dw:
        dw = w.new_empty(0)
    elif vocab_ids is None:
        dw = _own(dw.to(w.dtype))
    else:  # slot order -> weight rows; ids outside the prior get exactly zero gradient
        dw = torch.zeros_like(w).index_copy_(0, vocab_ids, dw.to(w.dtype))
    return dh, dw


@_bwd_op.register_fake
def _(h, w, vocab_ids, tgt, inv_temp, lse, g_tgt, a, b, need_dh, need_dw, backend):
    return (torch.empty_like(h) if need_dh else h.new_empty(0)), (torch.empty_like(w) if need_dw else w.new_empty(0))


def _setup_context(ctx, inputs, output):
    h, w, vocab_ids, tgt, inv_temp, want_mean, backend = inputs
    lse, _, mean = output
    ctx.save_for_backward(h, w, vocab_ids, tgt, lse, mean)
    ctx.inv_temp, ctx.want_mean, ctx.backend = inv_temp, want_mean, backend


def _backward(ctx, g_lse, g_tgt_logit, g_mean):
    # With p = softmax(z): d lse/dz_v = p_v; d z_t/dz_v = [v == t]; d mean/dz_v = p_v (1 + z_v - mean).
    # So dz_v = g_tgt [v == t] + p_v (a - b z_v) with a = g_lse + g_mean (1 - mean), b = -g_mean:
    # the backend contract's form (reference.backend_contract).
    h, w, vocab_ids, tgt, lse, mean = ctx.saved_tensors
    need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if not (need_dh or need_dw):
        return None, None, None, None, None, None, None
    g_tgt = g_tgt_logit.float().contiguous() if g_tgt_logit is not None else torch.zeros_like(lse)
    a = g_lse.float() if g_lse is not None else torch.zeros_like(lse)
    b = None
    if ctx.want_mean and g_mean is not None:
        b = -g_mean.float()
        a = a + g_mean.float() * (1.0 - mean)
    dh, dw = _bwd_op(h, w, vocab_ids, tgt, ctx.inv_temp, lse, g_tgt, a.contiguous(),
                     None if b is None else b.contiguous(), need_dh, need_dw, ctx.backend)
    return (dh if need_dh else None), (dw if need_dw else None), None, None, None, None, None


torch.library.register_autograd("stp::masked_logprob_fwd", _backward, setup_context=_setup_context)


def _own(t: torch.Tensor) -> torch.Tensor:
    """Custom-op outputs may not alias each other or inputs: backends may return views of one buffer."""
    return t if t._base is None else t.clone()


def _impl(backend: str, h: torch.Tensor) -> ModuleType:
    module = _backends._load("masked_logprob", backend, h.device.type)
    if module is None:  # resolve() already reported why; reaching here means the environment changed since
        raise RuntimeError(f"stp_kernels.masked_logprob: backend {backend!r} is no longer available")
    return module


def masked_logprob(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    rows: torch.Tensor | None = None,
    vocab: torch.Tensor | None = None,
    temperature: float = 1.0,
    backend: str | None = None,
    return_lse: bool = False,
    return_entropy: bool = False,
    check_inputs: bool | None = None,
):
    """log p(target | row) under softmax(hidden @ weight.T / temperature), without materialising [R, V].

    Args:
        hidden: [N, H] or [B, L, H] final hidden states (float32, bfloat16 or float16).
        weight: [V, H] LM-head weight, same dtype and device as ``hidden``.
        targets: [R] token ids, one per scored row.
        rows: [R] int64 flat indices into the N (or B*L) rows of ``hidden``; None scores every row (R = N).
        vocab: sorted int64 token ids of a static vocabulary prior; the softmax runs over those ids only
            and every target must be among them. Cost scales with ``len(vocab)``.
        temperature: logits are divided by it before the softmax.
        backend: "torch", "torch_chunked", "cpu", "triton", "cuda", "gemm"; None picks ``$STP_KERNEL_BACKEND`` or the
            fastest available (``stp_kernels.available_backends()``).
        return_lse / return_entropy: also return the log-sum-exp / the entropy of each row's distribution.
        check_inputs: True: raise a ValueError naming any target, row or vocab id out of range (one host sync per
            call); False: no host sync: out-of-range indices are clamped before any kernel reads them and the rows
            they affect come back NaN (every row for an unsorted or out-of-range prior); None (default): True on CPU
            tensors, False on CUDA tensors.

    Returns:
        float32 [R] log-probabilities (plus [R] lse and/or entropy when asked), differentiable with respect
        to ``hidden`` and ``weight`` for any upstream gradient.
    """
    h, w, tgt, rows, vocab, temperature, poison = _validate(hidden, weight, targets, rows, vocab, temperature,
                                                            check_inputs)
    name, _ = _backends.resolve("masked_logprob", backend, h.device, h.dtype)
    if poison is not None:
        out = _dispatch(name, hidden, h, w, tgt, rows, vocab, temperature, return_lse, return_entropy, clamp=True)
        nan = torch.full((), float("nan"), device=h.device)
        if isinstance(out, tuple):
            return tuple(torch.where(poison, nan, o) for o in out)
        return torch.where(poison, nan, out)
    return _dispatch(name, hidden, h, w, tgt, rows, vocab, temperature, return_lse, return_entropy)


def _dispatch(name, hidden, h, w, tgt, rows, vocab, temperature, return_lse, return_entropy, clamp=False):
    if clamp and vocab is not None:  # a target missing from the prior (its row is NaN): any member stands in
        tgt = vocab[torch.searchsorted(vocab, tgt).clamp_(max=vocab.numel() - 1)]
    weight, targets = w, tgt
    if name == "torch":
        with exact_fp32():
            return masked_logprob_reference(hidden, weight, targets, rows=rows, vocab=vocab, temperature=temperature,
                                            upcast=torch.float32, return_lse=return_lse,
                                            return_entropy=return_entropy)
    if rows is not None:
        h = h.index_select(0, rows)
    slots = tgt if vocab is None else torch.searchsorted(vocab, tgt)
    lse, tgt_logit, mean = _fwd_op(h.contiguous(), w.contiguous(), vocab, slots, 1.0 / temperature,
                                   return_entropy, name)
    logp = tgt_logit - lse
    extras = ([lse] if return_lse else []) + ([lse - mean] if return_entropy else [])
    return (logp, *extras) if extras else logp


def _validate(hidden, weight, targets, rows, vocab, temperature, check_inputs):
    fn = "stp_kernels.masked_logprob"
    h, num_hidden_rows = V.head_inputs(fn, hidden, weight)
    temperature = V.temperature_arg(fn, temperature, allow_zero=False)
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"{fn}: targets must be a torch.Tensor, got {type(targets).__name__}")
    tgt = V.int_vector(fn, "targets", targets, hidden.device)
    vocab_size = weight.shape[0]
    checks = V.Checks(fn)
    rows = V.rows_arg(fn, rows, num_hidden_rows, hidden.device, checks)
    if rows is not None and rows.numel() != tgt.numel():
        raise ValueError(f"{fn}: rows has {rows.numel()} entries but targets has {tgt.numel()}; "
                         "need one target per row")
    if rows is None and tgt.numel() != num_hidden_rows:
        raise ValueError(f"{fn}: targets has {tgt.numel()} entries but hidden has {num_hidden_rows} rows; "
                         "pass rows= to score a subset")
    if tgt.numel() == 0:
        raise ValueError(f"{fn}: no rows to score (targets is empty)")
    if not V.check_mode(fn, check_inputs, hidden.device):
        vocab = V.vocab_arg(fn, vocab, vocab_size, hidden.device, V.Checks(fn))  # type and shape checks only
        tgt, rows, vocab, poison = V.poison_mask(num_hidden_rows, vocab_size, tgt, rows, vocab, tgt.numel())
        return h, weight, tgt, rows, vocab, temperature, poison
    checks.add(f"targets must lie in [0, {vocab_size}) (weight has {vocab_size} rows)",
               (tgt < 0).any() | (tgt >= vocab_size).any())
    vocab = V.vocab_arg(fn, vocab, vocab_size, hidden.device, checks)
    if vocab is not None:
        slot = torch.searchsorted(vocab, tgt).clamp_(max=vocab.numel() - 1)
        checks.add("every target must be in vocab", (vocab[slot] != tgt).any())
    checks.run()
    return h, weight, tgt, rows, vocab, temperature, None
