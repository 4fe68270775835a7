"""Per-token log-likelihood estimators of a masked diffusion LM's completions (docs/method.md section 3).

One interface, ``per_token_logprobs``, for three estimators:

- ``stp``: K random-count masks (``stp_kernels.noise_masks``, scheme "random_count"); anchors are never masked and
  stay visible as conditioning. Without anchors it equals ``elbo``.
- ``elbo`` ("GRPO with ELBO", the paper's main baseline): the same masks without anchors.
- ``d1`` (diffu-GRPO): completion fully masked, real prompt tokens masked with ``prompt_mask_prob``; d1 runs K = 1.

Score modes (which (draw, position) log-probs enter, with which weight; padding positions are never scored, their
output is 0 and the loss mask excludes them):

- ``all`` (DEFAULT): every valid completion position in every draw, masked or not, weight 1/K -- the authors' code.
  It is the default because the presets reproduce the paper, and the paper trained with it; ``masked`` and ``elbo``
  are offered for comparison and variance studies (``python -m stp.variance`` measures all three).
- ``masked``: only positions masked in a draw, averaged over the draws that masked them; a position masked in no
  draw takes its value in one extra fully masked draw (every non-anchor position masked; anchors stay visible, so
  anchors always take this value). That draw is always packed (B more sequences, no host sync): with K = 3 about
  1/8 of the positions of a sample need it, so nearly every sample does.
- ``elbo``: LLaDA's weighted ELBO: draw j contributes ``(l_free / m_j) * log p(y_i | y~_j)`` / K at each masked
  valid position, m_j = masked valid positions of draw j, l_free = valid non-anchor positions. The per-token values
  sum to the sequence ELBO estimate. Without anchors m_j = n_j and l_free = l: exactly LLaDA's ``l / n_j``. With
  anchors the masked count follows the spec's "choose n_j of l, then drop anchors", so the weight is the realised
  ratio, not an exact ELBO of the free tokens (anchors contribute 0 in this mode).

Packing: the K draws (K + 1 in ``masked`` mode) of every sample form a [B * K', P + C] batch (b-major: sequence
``b * K' + j``), run through ONE ``model.backbone`` call, and ``stp_kernels.masked_logprob`` computes log-probs at
the scored rows only: the [rows, vocab] logits are never materialised. When the packed batch would not fit in
``memory_budget`` bytes it is cut into chunks of whole samples (all draws of a sample in one chunk), the chunk size
derived from the budget and a per-sequence activation estimate (``sequence_bytes``). The estimate does not depend on
grad mode, so old (no grad) and current (grad) evaluations chunk identically and agree bit for bit.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from stp_kernels import masked_logprob, noise_masks

__all__ = ["ESTIMATORS", "SCORE_MODES", "DEFAULT_SCORE", "LikelihoodOutput", "per_token_logprobs", "valid_lengths",
           "sequence_bytes", "default_memory_budget", "samples_per_chunk"]

ESTIMATORS = ("stp", "elbo", "d1")
SCORE_MODES = ("all", "masked", "elbo")
MASK_SCHEMES = ("random_count", "block")
DEFAULT_SCORE = "all"


@dataclass
class LikelihoodOutput:
    """Result of ``per_token_logprobs``. B samples, K draws, P prompt length, C completion length."""

    logprobs: torch.Tensor  # [B, C] float32 per-token log-prob estimates; 0 at padding positions (c >= l)
    masks: torch.Tensor  # [B, K, C] bool completion masks of the K draws (True = [MASK])
    prompt_masks: torch.Tensor | None  # [B, K, P] bool prompt masks (d1), else None
    valid: torch.Tensor  # [B, C] bool: positions up to and including the first EOS (the loss mask m)
    lengths: torch.Tensor  # [B] int64 valid lengths l
    num_chunks: int  # body forwards the packed batch took


def valid_lengths(completion_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """[B, C] -> [B] int64: first EOS index + 1, or C when there is no EOS."""
    is_eos = completion_ids == eos_token_id
    first = is_eos.int().argmax(1)
    return torch.where(is_eos.any(1), first + 1, torch.full_like(first, completion_ids.shape[1]))


def _config(model):
    return model.model.config


def sequence_bytes(model, seq_len: int) -> int:
    """Estimated peak bytes one packed sequence of ``seq_len`` tokens costs in a forward WITH grad (the stored
    activations), used for chunking in both grad modes (see module docstring).

    Per layer and token a Llama block saves about 14 H + 4 I values for backward (two RMSNorm inputs and outputs,
    q, k, v, rotated q and k, attention output, o_proj output, residual; gate, up, activation, product): 14 H + 4 I.
    Attention scores and probabilities (heads * L^2 per layer, twice) are added when they are materialised: eager
    attention, and sdpa's math path on CPU. Plus the final hidden state in float32 for the head.
    """
    cfg = _config(model)
    hidden = int(cfg.hidden_size)
    inter = int(getattr(cfg, "intermediate_size", 4 * hidden))
    layers = int(cfg.num_hidden_layers)
    heads = int(cfg.num_attention_heads)
    esize = model.lm_head_weight.element_size()
    per_layer = seq_len * (14 * hidden + 4 * inter) * esize
    if cfg._attn_implementation == "eager" or model.lm_head_weight.device.type == "cpu":
        per_layer += 2 * heads * seq_len * seq_len * esize
    return layers * per_layer + seq_len * hidden * 4


def default_memory_budget(model) -> int:
    """Bytes the packed batch may use by default: half of the device's total memory less twice the weights (weights
    plus gradients or optimizer state of the trainable part); at least 256 MiB. Total (not free) memory, so the
    value is the same at every call of a run and chunking never changes between the old and current policy."""
    device = model.lm_head_weight.device
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
    else:
        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            total = 8 << 30
    return max(256 << 20, int(0.5 * total) - 2 * params)


def samples_per_chunk(model, num_samples: int, draws_per_sample: int, seq_len: int, memory_budget: int) -> int:
    """How many samples (each with all its draws) one body forward may take under ``memory_budget`` bytes (>= 1)."""
    per_sample = draws_per_sample * sequence_bytes(model, seq_len)
    return max(1, min(num_samples, memory_budget // max(per_sample, 1)))


def _check(model, prompt_ids, prompt_attention_mask, completion_ids, anchors, sample_ids, num_draws, estimator,
           score, mask_scheme):
    fn = "stp.likelihood.per_token_logprobs"
    if estimator not in ESTIMATORS:
        raise ValueError(f"{fn}: estimator={estimator!r}; allowed: {', '.join(ESTIMATORS)}")
    if score not in SCORE_MODES:
        raise ValueError(f"{fn}: score={score!r}; allowed: {', '.join(SCORE_MODES)}")
    if mask_scheme not in MASK_SCHEMES:
        raise ValueError(f"{fn}: mask_scheme={mask_scheme!r}; allowed: {', '.join(MASK_SCHEMES)}")
    if score == "elbo" and (estimator == "d1" or mask_scheme != "random_count"):
        raise ValueError(f"{fn}: score='elbo' needs the random-count masks of estimator 'stp' or 'elbo' (its l/n "
                         f"weights assume them), got estimator={estimator!r}, mask_scheme={mask_scheme!r}")
    if anchors is not None and estimator != "stp":
        raise ValueError(f"{fn}: estimator={estimator!r} takes no anchors (only 'stp' does); pass anchors=None")
    if prompt_ids.dim() != 2 or completion_ids.dim() != 2 or prompt_ids.shape[0] != completion_ids.shape[0]:
        raise ValueError(f"{fn}: prompt_ids [B, P] and completion_ids [B, C] must share B, got "
                         f"{tuple(prompt_ids.shape)} and {tuple(completion_ids.shape)}")
    batch = prompt_ids.shape[0]
    if prompt_attention_mask is not None and prompt_attention_mask.shape != prompt_ids.shape:
        raise ValueError(f"{fn}: prompt_attention_mask {tuple(prompt_attention_mask.shape)} must match prompt_ids "
                         f"{tuple(prompt_ids.shape)}")
    if anchors is not None and anchors.shape != completion_ids.shape:
        raise ValueError(f"{fn}: anchors {tuple(anchors.shape)} must match completion_ids "
                         f"{tuple(completion_ids.shape)}")
    if sample_ids is not None and tuple(sample_ids.shape) != (batch,):
        raise ValueError(f"{fn}: sample_ids must be [B={batch}], got {tuple(sample_ids.shape)}")
    if isinstance(num_draws, bool) or not isinstance(num_draws, int) or num_draws < 1:
        raise ValueError(f"{fn}: num_draws={num_draws!r} must be a positive int")


def per_token_logprobs(
    model,
    prompt_ids: torch.Tensor,
    prompt_attention_mask: torch.Tensor | None,
    completion_ids: torch.Tensor,
    *,
    anchors: torch.Tensor | None = None,
    seed: int,
    iteration: int,
    sample_ids: torch.Tensor | None = None,
    num_draws: int = 3,
    estimator: str = "stp",
    score: str = DEFAULT_SCORE,
    mask_scheme: str = "random_count",
    prompt_mask_prob: float = 0.15,
    temperature: float = 1.0,
    memory_budget: int | None = None,
    backend: str | None = None,
) -> LikelihoodOutput:
    """Per-token log-prob estimates of ``completion_ids`` given the prompts, from K packed Monte-Carlo draws.

    Args:
        model: a ``stp.models.DiffusionLM``.
        prompt_ids: [B, P] int64, left-padded; prompt_attention_mask: [B, P] (1 = real) or None (no padding).
        completion_ids: [B, C] int64; the valid length is the first EOS index + 1.
        anchors: [B, C] bool static-prior anchors (estimator "stp" only) or None.
        seed, iteration: the mask counter (see ``stp_kernels.noise_masks``): one seed per rollout, iteration =
            GRPO inner iteration, so old, reference and current policy see the same masks.
        sample_ids: [B] stable sample ids (default 0..B-1); a sample's masks do not depend on its batch position.
        num_draws: K (paper setting 3; d1 uses 1). estimator: "stp", "elbo", "d1". score: "all", "masked",
            "elbo" (module docstring). mask_scheme: "random_count" or "block" (SPG-style) for "stp"/"elbo".
        prompt_mask_prob: d1's prompt masking probability. temperature: logits are divided by it.
        memory_budget: bytes for the packed forward (default ``default_memory_budget(model)``).
        backend: ``stp_kernels.masked_logprob`` backend.

    Returns:
        ``LikelihoodOutput`` (logprobs [B, C] float32, differentiable w.r.t. the model's parameters when grad is on).
    """
    _check(model, prompt_ids, prompt_attention_mask, completion_ids, anchors, sample_ids, num_draws, estimator,
           score, mask_scheme)
    device = completion_ids.device
    batch, p_len = prompt_ids.shape
    c_len = completion_ids.shape[1]
    seq_len = p_len + c_len
    k = num_draws
    mask_id = int(model.mask_token_id)
    if sample_ids is None:
        sample_ids = torch.arange(batch, device=device)
    lengths = valid_lengths(completion_ids, int(model.eos_token_id))
    pos = torch.arange(c_len, device=device)
    valid = pos[None, :] < lengths[:, None]  # [B, C]
    prompt_real = (torch.ones_like(prompt_ids, dtype=torch.bool) if prompt_attention_mask is None
                   else prompt_attention_mask.to(torch.bool))
    free = valid if anchors is None else valid & ~anchors.to(torch.bool)

    # ---- masks [B, K, C] (and [B, K, P] for d1)
    prompt_masks = None
    if estimator == "d1":
        masks, prompt_masks = noise_masks(seed, iteration, sample_ids, lengths, num_draws=k, scheme="d1",
                                          prompt_mask=prompt_real, prompt_mask_prob=prompt_mask_prob,
                                          completion_length=c_len)
    else:
        masks = noise_masks(seed, iteration, sample_ids, lengths, num_draws=k, scheme=mask_scheme,
                            anchors=anchors, completion_length=c_len)

    # ---- per (sample, draw, position) weights [B, K', C]; scored = weight != 0
    hit = masks & valid[:, None, :]
    draw_masks = masks
    if score == "all":
        weights = valid[:, None, :].expand(batch, k, c_len).float() / k
    elif score == "elbo":
        m_j = hit.sum(2, keepdim=True).float()  # [B, K, 1]
        l_free = free.sum(1).float()[:, None, None]
        weights = torch.where(hit, l_free / (k * m_j.clamp(min=1.0)), torch.zeros((), device=device))
    else:  # masked
        count = hit.sum(1).float()  # [B, C]
        weights = hit.float() / count.clamp(min=1.0)[:, None, :]
        if estimator != "d1":  # d1 masks every valid position in every draw: no fallback needed
            fallback = masks.new_ones(batch, 1, c_len) if anchors is None else ~anchors.to(torch.bool)[:, None, :]
            draw_masks = torch.cat([masks, fallback], 1)
            weights = torch.cat([weights, ((count == 0) & valid).float()[:, None, :]], 1)
    kp = draw_masks.shape[1]

    # ---- the packed batch [B, K', P + C]
    comp = torch.where(draw_masks, mask_id, completion_ids[:, None, :])
    prompt = prompt_ids[:, None, :].expand(batch, kp, p_len)
    if prompt_masks is not None:
        pm = prompt_masks if kp == k else torch.cat([prompt_masks, prompt_masks.new_zeros(batch, 1, p_len)], 1)
        prompt = torch.where(pm, mask_id, prompt)
    ids = torch.cat([prompt, comp], 2)  # [B, K', L]
    attn = None
    if prompt_attention_mask is not None:
        attn = torch.cat([prompt_real[:, None, :].expand(batch, kp, p_len),
                          torch.ones(batch, kp, c_len, dtype=torch.bool, device=device)], 2)

    budget = default_memory_budget(model) if memory_budget is None else int(memory_budget)
    per_chunk = samples_per_chunk(model, batch, kp, seq_len, budget)
    weight = model.lm_head_weight
    scored_all = weights != 0
    pieces = []
    for b0 in range(0, batch, per_chunk):
        b1 = min(batch, b0 + per_chunk)
        n_seq = (b1 - b0) * kp
        scored = scored_all[b0:b1].reshape(n_seq, c_len)
        seq_idx, col = scored.nonzero(as_tuple=True)  # row-major: the order masked_scatter fills
        hidden = model.backbone(ids[b0:b1].reshape(n_seq, seq_len),
                                None if attn is None else attn[b0:b1].reshape(n_seq, seq_len))  # [n, L, H]
        targets = completion_ids[b0:b1][seq_idx // kp, col]
        if targets.numel() == 0:
            pieces.append(hidden.new_zeros(b1 - b0, c_len, dtype=torch.float32) + 0.0 * hidden.sum())
            continue
        logp = masked_logprob(hidden, weight, targets, rows=seq_idx * seq_len + p_len + col,
                              temperature=temperature, backend=backend)  # [R] float32
        contrib = logp * weights[b0:b1].reshape(n_seq, c_len)[seq_idx, col]
        # Each (sequence, position) is scored at most once: a scatter without accumulation, then a fixed-order sum
        # over draws -- deterministic on every device (an atomic index_add would not be).
        dense = torch.zeros(n_seq, c_len, dtype=torch.float32, device=device).masked_scatter(scored, contrib)
        pieces.append(dense.view(b1 - b0, kp, c_len).sum(1))
    logprobs = pieces[0] if len(pieces) == 1 else torch.cat(pieces, 0)
    return LikelihoodOutput(logprobs=logprobs, masks=masks, prompt_masks=prompt_masks, valid=valid, lengths=lengths,
                            num_chunks=len(pieces))
