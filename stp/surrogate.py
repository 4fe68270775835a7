"""DiFFPO's two-times mean-field (2-MF) surrogate likelihood of a rollout's completions (docs/method.md section 8).

A completion y was decoded over forward passes 1..T; the trajectory record (``stp.sampler``: ``commit_step``) says
which pass s(k) committed each position k (0 = anchor). The surrogate splits the trajectory at one time tau in
[0, T) per sample and scores every valid position under one of two contexts::

    A = [prompt ; all MASK]   (anchors visible)    scores the positions with s(k) <= tau
    B = [prompt ; z_tau]      z_tau = y with every position of s(k) > tau masked (anchors visible)
                                                    scores the positions with s(k) > tau

A token committed at pass tau + 1 is therefore scored under exactly the canvas it was drawn from (z_tau is the
canvas before pass tau + 1). tau is drawn per sample and GRPO inner iteration from the counter-based generator
(``draw_tau``: a pure function of (seed, iteration, sample id)), so old, reference and current policy share it. With
tau = 0 nothing is scored under A and B is the fully masked completion: d1's estimator without prompt masking.

Packing: the contexts of all samples form one [N, P + C] batch (sample-major; a context with nothing to score is
left out, so at tau = 0 the batch is exactly d1's), one ``model.backbone`` call per chunk of at most
``samples_per_chunk(model, N, 1, ...)`` sequences (the same chunking as d1's one-draw batch), and
``stp_kernels.masked_logprob`` computes log-probs at the scored rows only. Each (sample, position) is scored in
exactly one context, so the per-token values are placed by an index_put without accumulation (deterministic).
Leaving contexts out reads the scored count once on the host (the d1 estimator's ``nonzero`` does the same).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from stp.likelihood import default_memory_budget, samples_per_chunk, valid_lengths
from stp_kernels import masked_logprob
from stp_kernels.reference import counter_uniform, row_keys

__all__ = ["TAU_SALT", "SurrogateOutput", "draw_tau", "num_passes", "two_mf_logprobs"]

TAU_SALT = 0x7461755F32_4D46  # "tau_2MF"


@dataclass
class SurrogateOutput:
    """Result of ``two_mf_logprobs``. B samples, C completion length."""

    logprobs: torch.Tensor  # [B, C] float32; 0 at padding positions
    valid: torch.Tensor  # [B, C] bool: positions up to and including the first EOS (the loss mask)
    tau: torch.Tensor  # [B] int64 split times
    in_b: torch.Tensor  # [B, C] bool: scored under context B (s(k) > tau)
    num_sequences: int  # sequences the packed forward ran (B + samples with tau > 0)


def num_passes(commit_step: torch.Tensor) -> torch.Tensor:
    """[B, C] commit steps -> [B] int64 T: the last pass that committed a position of the sample (>= 1)."""
    return commit_step.max(1).values.clamp(min=1)


def draw_tau(seed: int, iteration: int, sample_ids: torch.Tensor, passes: torch.Tensor) -> torch.Tensor:
    """[B] int64 tau uniform in {0, ..., T_b - 1} from the counter (seed, iteration, sample id): no global RNG,
    independent of the batch layout and of which policy asks."""
    keys = row_keys(seed ^ TAU_SALT, iteration, sample_ids.long())
    u = counter_uniform(keys, torch.zeros(1, dtype=torch.long, device=sample_ids.device))[:, 0]  # (0, 1)
    passes = passes.long()
    return torch.minimum((u.double() * passes.double()).long(), passes - 1)


def two_mf_logprobs(model, prompt_ids: torch.Tensor, prompt_attention_mask: torch.Tensor | None,
                    completion_ids: torch.Tensor, commit_step: torch.Tensor, *, tau: torch.Tensor,
                    anchors: torch.Tensor | None = None, temperature: float = 1.0, memory_budget: int | None = None,
                    backend: str | None = None, vocab: torch.Tensor | None = None) -> SurrogateOutput:
    """Per-token 2-MF surrogate log-probs of ``completion_ids`` (module docstring).

    Args:
        model: a ``stp.models.DiffusionLM``.
        prompt_ids: [B, P] int64 left-padded; prompt_attention_mask: [B, P] (1 = real) or None.
        completion_ids: [B, C]; commit_step: [B, C] int64 (``GenerationOutput.commit_step``; 0 = anchor).
        tau: [B] int64 split times (``draw_tau``). anchors: [B, C] bool or None (visible in both contexts).
        temperature: logits are divided by it. memory_budget: bytes per packed forward (default as
            ``stp.likelihood``). backend: ``stp_kernels.masked_logprob`` backend.
        vocab: sorted token ids of the vocabulary prior the rollout sampled from (``stp.sampler.generate(vocab=)``):
            the softmax runs over those ids, as the behaviour log-probs do; None = the full vocabulary.
    """
    fn = "stp.surrogate.two_mf_logprobs"
    batch, p_len = prompt_ids.shape
    c_len = completion_ids.shape[1]
    if completion_ids.shape[0] != batch or commit_step.shape != completion_ids.shape:
        raise ValueError(f"{fn}: prompt_ids {tuple(prompt_ids.shape)}, completion_ids {tuple(completion_ids.shape)} "
                         f"and commit_step {tuple(commit_step.shape)} must be [B, P], [B, C], [B, C]")
    if tuple(tau.shape) != (batch,):
        raise ValueError(f"{fn}: tau must be [B={batch}], got {tuple(tau.shape)}")
    if anchors is not None and anchors.shape != completion_ids.shape:
        raise ValueError(f"{fn}: anchors {tuple(anchors.shape)} must match completion_ids "
                         f"{tuple(completion_ids.shape)}")
    device = completion_ids.device
    seq_len = p_len + c_len
    mask_id = int(model.mask_token_id)
    lengths = valid_lengths(completion_ids, int(model.eos_token_id))
    valid = torch.arange(c_len, device=device)[None, :] < lengths[:, None]  # [B, C]
    anchor = (torch.zeros_like(valid) if anchors is None else anchors.to(torch.bool))
    late = commit_step > tau.long()[:, None]  # s(k) > tau: masked in z_tau, scored under B
    in_b = late & valid & ~anchor
    # contexts [B, 2, C]: 0 = A (all masked), 1 = B (z_tau); anchors stay visible in both
    comp = torch.stack([torch.where(anchor, completion_ids, mask_id),
                        torch.where(late & ~anchor, mask_id, completion_ids)], 1)
    scored = torch.stack([valid & ~in_b, in_b], 1)  # [B, 2, C]
    keep = scored.any(2)
    keep[:, 1] |= ~keep[:, 0]  # a sample with nothing valid still gets one sequence (its output stays 0)
    seq = keep.reshape(-1).nonzero()[:, 0]  # [N] kept (sample, context) pairs, sample-major; one host sync
    owner = seq // 2
    ids = torch.cat([prompt_ids[owner], comp.reshape(batch * 2, c_len)[seq]], 1)  # [N, P + C]
    attn = None
    if prompt_attention_mask is not None:
        attn = torch.cat([prompt_attention_mask.to(torch.bool)[owner],
                          torch.ones(seq.numel(), c_len, dtype=torch.bool, device=device)], 1)
    flat_scored = scored.reshape(batch * 2, c_len)[seq]  # [N, C]
    n_seq = seq.numel()
    budget = default_memory_budget(model) if memory_budget is None else int(memory_budget)
    per_chunk = samples_per_chunk(model, n_seq, 1, seq_len, budget)
    out = torch.zeros(batch, c_len, dtype=torch.float32, device=device)
    pieces = []
    for s0 in range(0, n_seq, per_chunk):
        s1 = min(n_seq, s0 + per_chunk)
        sc = flat_scored[s0:s1]
        seq_idx, col = sc.nonzero(as_tuple=True)
        hidden = model.backbone(ids[s0:s1], None if attn is None else attn[s0:s1])  # [n, L, H]
        if seq_idx.numel() == 0:
            pieces.append((None, None, 0.0 * hidden.sum()))
            continue
        logp = masked_logprob(hidden, model.lm_head_weight, completion_ids[owner[s0:s1][seq_idx], col],
                              rows=seq_idx * seq_len + p_len + col, temperature=temperature, backend=backend,
                              vocab=vocab)
        pieces.append((owner[s0:s1][seq_idx], col, logp))
    for rows, col, logp in pieces:
        if rows is None:
            out = out + logp  # keeps the graph connected for a batch with nothing scored
        else:
            out = out.index_put((rows, col), logp)
    return SurrogateOutput(logprobs=out, valid=valid, tau=tau.long(), in_b=in_b, num_sequences=n_seq)
