"""``masked_logprob``: the LM head fused with log-softmax and target gather, at the scored rows only.

Layers: backend modules (``torch_chunked``, ``_cpu``, ``_cuda``, ``triton/masked_logprob``) implement the
two-function contract of ``reference.backend_contract``; ``_MaskedLogprob`` is the autograd Function over any
of them; ``masked_logprob`` validates, gathers rows, maps the vocabulary prior and dispatches.
"""

from __future__ import annotations

import math
from types import ModuleType

import torch

from . import _backends
from .reference import masked_logprob_reference

__all__ = ["masked_logprob"]

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class _MaskedLogprob(torch.autograd.Function):
    """Outputs (logp, lse, entropy) for compact rows; backward recomputes logits tile by tile."""

    @staticmethod
    def forward(ctx, h, w, tgt, vocab_ids, inv_temp: float, want_entropy: bool, impl: ModuleType):
        lse, tgt_logit, mean = impl.forward(h, w, vocab_ids, tgt, inv_temp, want_entropy)
        ctx.save_for_backward(h, w, tgt, vocab_ids, lse, mean)
        ctx.inv_temp, ctx.impl = inv_temp, impl
        ctx.set_materialize_grads(False)
        entropy = lse - mean if want_entropy else lse.new_empty(0)
        if not want_entropy:
            ctx.mark_non_differentiable(entropy)
        return tgt_logit - lse, lse, entropy

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_logp, g_lse, g_ent):
        h, w, tgt, vocab_ids, lse, mean = ctx.saved_tensors
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_dh or need_dw) or (g_logp is None and g_lse is None and g_ent is None):
            return None, None, None, None, None, None, None
        zeros = torch.zeros_like(lse)
        g_tgt = g_logp.float() if g_logp is not None else zeros
        a = -g_tgt
        if g_lse is not None:
            a = a + g_lse.float()
        b = None
        if g_ent is not None and g_ent.numel():
            b = g_ent.float()
            a = a + b * mean
        dh, dw = ctx.impl.backward(h, w, vocab_ids, tgt, ctx.inv_temp, lse, g_tgt.contiguous(), a.contiguous(),
                                   None if b is None else b.contiguous(), need_dh, need_dw)
        if dh is not None:
            dh = dh.to(h.dtype)
        if dw is not None:
            if vocab_ids is None:
                dw = dw.to(w.dtype)
            else:
                dw = torch.zeros_like(w).index_copy_(0, vocab_ids, dw.to(w.dtype))
        return dh, dw, None, None, None, None, None


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
        backend: "torch", "torch_chunked", "cpu", "triton", "cuda"; None picks ``$STP_KERNEL_BACKEND`` or the
            fastest available (``stp_kernels.available_backends()``).
        return_lse / return_entropy: also return the log-sum-exp / the entropy of each row's distribution.

    Returns:
        float32 [R] log-probabilities (plus [R] lse and/or entropy when asked), differentiable with respect
        to ``hidden`` and ``weight`` for any upstream gradient.
    """
    h, w, tgt, rows, vocab, temperature = _validate(hidden, weight, targets, rows, vocab, temperature)
    name, impl = _backends.resolve("masked_logprob", backend, h.device)
    if name == "torch":
        return masked_logprob_reference(hidden, weight, targets, rows=rows, vocab=vocab, temperature=temperature,
                                        upcast=torch.float32, return_lse=return_lse, return_entropy=return_entropy)
    if rows is not None:
        h = h.index_select(0, rows)
    slots = tgt if vocab is None else torch.searchsorted(vocab, tgt)
    logp, lse, ent = _MaskedLogprob.apply(h.contiguous(), w.contiguous(), slots, vocab, 1.0 / temperature,
                                          return_entropy, impl)
    extras = ([lse] if return_lse else []) + ([ent] if return_entropy else [])
    return (logp, *extras) if extras else logp


def _validate(hidden, weight, targets, rows, vocab, temperature):
    fn = "stp_kernels.masked_logprob"
    for arg, value in (("hidden", hidden), ("weight", weight), ("targets", targets)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{fn}: {arg} must be a torch.Tensor, got {type(value).__name__}")
    if hidden.dim() not in (2, 3):
        raise ValueError(f"{fn}: hidden must be [N, H] or [B, L, H], got shape {tuple(hidden.shape)}")
    if hidden.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{fn}: hidden has dtype {hidden.dtype}; allowed: float32, bfloat16, float16")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"{fn}: weight must be [V, H] with H = hidden.shape[-1] = {hidden.shape[-1]}, "
                         f"got shape {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"{fn}: weight has dtype {weight.dtype} but hidden has {hidden.dtype}; they must match")
    if weight.device != hidden.device:
        raise ValueError(f"{fn}: weight is on {weight.device} but hidden is on {hidden.device}")
    if weight.shape[0] == 0 or hidden.shape[-1] == 0:
        raise ValueError(f"{fn}: weight has an empty dimension: shape {tuple(weight.shape)}")
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"{fn}: temperature must be a finite number > 0, got {temperature!r}")
    num_hidden_rows = hidden.numel() // hidden.shape[-1]
    vocab_size = weight.shape[0]
    h = hidden.reshape(num_hidden_rows, hidden.shape[-1])

    def int_vector(arg, value):
        if value.dim() != 1:
            raise ValueError(f"{fn}: {arg} must be 1-D, got shape {tuple(value.shape)}")
        if value.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise TypeError(f"{fn}: {arg} must hold integers (int64), got dtype {value.dtype}")
        if value.device != hidden.device:
            raise ValueError(f"{fn}: {arg} is on {value.device} but hidden is on {hidden.device}")
        return value.long()

    tgt = int_vector("targets", targets)
    checks = []  # (message, bool tensor that must be False) evaluated with a single host sync below
    if rows is not None:
        rows = int_vector("rows", rows)
        if rows.numel() != tgt.numel():
            raise ValueError(
                f"{fn}: rows has {rows.numel()} entries but targets has {tgt.numel()}; need one target per row")
        if rows.numel():
            checks.append((f"rows must lie in [0, {num_hidden_rows}) (the flat rows of hidden)",
                           (rows < 0).any() | (rows >= num_hidden_rows).any()))
    elif tgt.numel() != num_hidden_rows:
        raise ValueError(f"{fn}: targets has {tgt.numel()} entries but hidden has {num_hidden_rows} rows; "
                         "pass rows= to score a subset")
    if tgt.numel() == 0:
        raise ValueError(f"{fn}: no rows to score (targets is empty)")
    checks.append((f"targets must lie in [0, {vocab_size}) (weight has {vocab_size} rows)",
                   (tgt < 0).any() | (tgt >= vocab_size).any()))
    if vocab is not None:
        vocab = int_vector("vocab", vocab)
        if vocab.numel() == 0:
            raise ValueError(f"{fn}: vocab is empty; it must list at least the target ids")
        checks.append((f"vocab ids must lie in [0, {vocab_size})", (vocab[0] < 0) | (vocab[-1] >= vocab_size)))
        if vocab.numel() > 1:
            checks.append(("vocab must be sorted strictly increasing (unique ids)", (vocab[1:] <= vocab[:-1]).any()))
        slot = torch.searchsorted(vocab, tgt).clamp_(max=vocab.numel() - 1)
        checks.append(("every target must be in vocab", (vocab[slot] != tgt).any()))
    flags = torch.stack([c for _, c in checks]).tolist()
    for (message, _), bad in zip(checks, flags):
        if bad:
            raise ValueError(f"{fn}: {message}")
    return h, weight, tgt, rows, vocab, float(temperature)
