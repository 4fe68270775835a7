"""``sample_step``: one denoising step's per-position work fused into the LM head.

For each scored row: x0 = argmax_v (z_v / T + g_v) with Gumbel noise g drawn from a counter-based generator
(``reference.counter_gumbel``: a pure function of seed, step, row identity and token id, computed inside the
kernel), x0 = argmax z when T == 0, confidence = softmax(z)[x0] from the untempered logits z = h @ W.T and, on
request, the predictive entropy of softmax(z) from the same pass (an entropy-bounded sampler reads it). The
[rows, vocab] logits and noise are never written. Backends: ``torch`` (reference, materialises), ``torch_chunked``,
``triton``, ``cuda``, ``gemm`` (the CUDA default: a library matmul per vocabulary chunk and a fused epilogue); same
dispatch as ``masked_logprob``.
"""

from __future__ import annotations

import torch

from . import _backends
from . import _validate as V
from ._fp32 import exact_fp32
from .reference import row_keys, sample_step_reference

__all__ = ["sample_step"]


@torch.no_grad()
def sample_step(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    *,
    seed: int,
    step: int,
    rows: torch.Tensor | None = None,
    row_ids: torch.Tensor | None = None,
    temperature: float = 0.0,
    vocab: torch.Tensor | None = None,
    backend: str | None = None,
    return_logp: bool = False,
    return_entropy: bool = False,
    return_tempered_logp: bool = False,
    check_inputs: bool | None = None,
):
    """Sample x0 and its confidence at the scored rows of one denoising step.

    Args:
        hidden: [N, H] or [B, L, H] final hidden states; weight: [V, H] LM head (same dtype and device).
        seed, step: integers keying the noise; the same (seed, step, row id, token) always gives the same draw.
        rows: [R] flat row indices into hidden (None: every row).
        row_ids: [R] int64 identities of the rows for the noise counter (default: ``rows``, or 0..N-1). Give stable
            ids (e.g. sample_id * canvas_length + position) so a sample's draws do not depend on its batch.
        temperature: Gumbel-max temperature; 0 is greedy (argmax, no noise).
        vocab: sorted int64 token ids of a vocabulary prior; sampling and the confidence softmax use only those.
        return_logp: also return log softmax(z)[x0].
        return_entropy: also return the entropy -sum_v p_v log p_v of p = softmax(z) (untempered logits, over the
            vocabulary prior when given), as lse(z) - sum_v p_v z_v from the same pass (backends compute the mean
            logit only when asked).
        return_tempered_logp: also return log softmax(z / T)[x0], the log-prob of x0 under the distribution it was
            drawn from (temperature and vocabulary prior applied; 0 at T = 0, where the draw is deterministic): the
            behaviour log-prob of RL, from the same pass (backends add one exp per logit; no second pass).
        check_inputs: True: raise a ValueError naming rows or vocab ids out of range (one host sync per call);
            False: no host sync: indices are clamped before any kernel reads them and the rows they affect come back
            as x0 = -1 with NaN scores (every row for an unsorted or out-of-range prior); None (default): True on
            CPU tensors, False on CUDA tensors. A caller that calls once per denoising step can validate once
            itself and pass False.

    Returns: (x0 int64 [R] token ids, confidence float32 [R]) + (log-confidence float32 [R],) if ``return_logp``
    + (entropy float32 [R],) if ``return_entropy`` + (tempered log-prob float32 [R],) if ``return_tempered_logp``,
    in that order.
    """
    fn = "stp_kernels.sample_step"
    h, num_rows = V.head_inputs(fn, hidden, weight)
    temperature = V.temperature_arg(fn, temperature, allow_zero=True)
    for arg, value in (("seed", seed), ("step", step)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{fn}: {arg} must be an int, got {type(value).__name__}")
    checks = V.Checks(fn)
    rows = V.rows_arg(fn, rows, num_rows, hidden.device, checks)
    vocab = V.vocab_arg(fn, vocab, weight.shape[0], hidden.device, checks)
    num_scored = rows.numel() if rows is not None else num_rows
    if num_scored == 0:
        raise ValueError(f"{fn}: no rows to sample (rows is empty)")
    if row_ids is not None:
        row_ids = V.int_vector(fn, "row_ids", row_ids, hidden.device)
        if row_ids.numel() != num_scored:
            raise ValueError(f"{fn}: row_ids has {row_ids.numel()} entries but {num_scored} rows are sampled")
    poison = None
    if V.check_mode(fn, check_inputs, hidden.device):
        checks.run()
    else:
        _, rows, vocab, poison = V.poison_mask(num_rows, weight.shape[0], None, rows, vocab, num_scored)
    if row_ids is None:
        row_ids = rows if rows is not None else torch.arange(num_rows, device=hidden.device)

    name, impl = _backends.resolve("sample_step", backend, h.device, h.dtype)
    if name == "torch":
        with exact_fp32():
            out = sample_step_reference(hidden, weight, seed=seed, step=step, rows=rows, row_ids=row_ids,
                                        temperature=temperature, vocab=vocab, upcast=torch.float32,
                                        return_entropy=return_entropy, return_tempered_logp=return_tempered_logp)
        x0, conf = out[0], out[1]
        return _poisoned((x0, conf) + ((conf.log(),) if return_logp else ()) + out[2:], poison)
    if rows is not None:
        h = h.index_select(0, rows)
    keys = row_keys(seed, step, row_ids)
    greedy = temperature == 0.0
    with exact_fp32():  # float32 inputs give float32 results whatever the process's TF32 setting
        want_tlse = return_tempered_logp and not greedy
        inv_temp = 0.0 if greedy else 1.0 / temperature
        args = (h.contiguous(), weight.contiguous(), vocab, keys, inv_temp, greedy, return_entropy)
        slot, z_sel, lse, mean, *tlse = impl.forward(*args, want_tlse=True) if want_tlse else impl.forward(*args)
    x0 = slot if vocab is None else vocab[slot]
    logp = z_sel - lse
    out = (x0, logp.exp()) + ((logp,) if return_logp else ()) + ((lse - mean,) if return_entropy else ())
    if return_tempered_logp:
        out += ((z_sel * inv_temp - tlse[0]) if want_tlse else torch.zeros_like(z_sel),)
    return _poisoned(out, poison)


def _poisoned(out: tuple, poison: torch.Tensor | None) -> tuple:
    """x0 = -1 and NaN scores at the rows ``poison`` marks (no host sync)."""
    if poison is None:
        return out
    return (torch.where(poison, -1, out[0]),) + tuple(torch.where(poison, float("nan"), o) for o in out[1:])
