"""Token-level GRPO with clipping and a k3 KL penalty (docs/method.md section 4), with TRL's names.

    A_g   = (R_g - mean_group(R)) / (std_group(R) + 1e-4)      (scale_rewards=False: d1's std-free advantages)
    r     = exp(logp_theta - logp_old)                         per token, same masks (same seed and iteration)
    KL    = exp(logp_ref - logp_theta) - (logp_ref - logp_theta) - 1
    loss  = sum_tokens m * (-min(r A, clip(r, 1 - epsilon, 1 + epsilon) A) + beta KL) / sum_tokens m

m = completion tokens up to and including the first EOS (anchors included), normalised over every token of the
batch. Each rollout batch is reused for ``num_iterations`` (mu) optimizer steps; inner iteration ``it`` draws its
masks from (seed, it), and ``rollout_logprobs`` computes the old and reference log-probs of all mu iterations once,
right after the rollout, without grad. At ``it = 0`` the policy has not moved, so ``policy_loss`` reproduces the old
log-probs bit for bit (same masks, same packing and chunking, deterministic scatter) and the ratio is exactly 1 --
for a model without active dropout (LoRA dropout in train mode makes every evaluation differ, as in TRL).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, fields

import torch

from .likelihood import DEFAULT_SCORE, ESTIMATORS, MASK_SCHEMES, SCORE_MODES, per_token_logprobs

__all__ = ["LikelihoodConfig", "RolloutBatch", "group_advantages", "grpo_loss", "batch_logprobs", "rollout_logprobs",
           "policy_loss"]


@dataclass
class LikelihoodConfig:
    """How per-token log-probs are estimated (``stp.likelihood.per_token_logprobs``)."""

    estimator: str = "stp"  # "stp" (anchors never masked), "elbo" (no anchors), "d1"
    num_draws: int = 3  # K masks per sample (paper setting 3; d1: 1)
    score: str = DEFAULT_SCORE  # "all" (the authors' code), "masked", "elbo"
    mask_scheme: str = "random_count"  # or "block" (SPG-style)
    prompt_mask_prob: float = 0.15  # d1's prompt masking probability
    temperature: float = 1.0  # logits are divided by it
    memory_budget: int | None = None  # bytes for the packed forward (None: derived from the device and model)
    backend: str | None = None  # stp_kernels.masked_logprob backend

    def __post_init__(self):
        for field, value, allowed in (("estimator", self.estimator, ESTIMATORS), ("score", self.score, SCORE_MODES),
                                      ("mask_scheme", self.mask_scheme, MASK_SCHEMES)):
            if value not in allowed:
                raise ValueError(f"LikelihoodConfig.{field}={value!r}; allowed: {', '.join(allowed)}")
        if isinstance(self.num_draws, bool) or not isinstance(self.num_draws, int) or self.num_draws < 1:
            raise ValueError(f"LikelihoodConfig.num_draws={self.num_draws!r}; must be a positive int")
        if not 0.0 <= self.prompt_mask_prob <= 1.0:
            raise ValueError(f"LikelihoodConfig.prompt_mask_prob={self.prompt_mask_prob}; must lie in [0, 1]")
        if not self.temperature > 0:
            raise ValueError(f"LikelihoodConfig.temperature={self.temperature}; must be > 0")


@dataclass
class RolloutBatch:
    """One rollout's tensors. B = prompts x num_generations samples, P prompt length, C completion length."""

    prompt_ids: torch.Tensor  # [B, P] int64, left-padded
    prompt_attention_mask: torch.Tensor | None  # [B, P] (1 = real) or None
    completion_ids: torch.Tensor  # [B, C] int64
    advantages: torch.Tensor  # [B] float32
    sample_ids: torch.Tensor  # [B] int64 stable ids (the mask counter's sample index)
    anchors: torch.Tensor | None = None  # [B, C] bool
    commit_step: torch.Tensor | None = None  # [B, C] int64: the rollout's trajectory record (stp.sampler)
    behaviour_logprobs: torch.Tensor | None = None  # [B, C] float32, when the method asked the sampler for them

    def slice(self, rows: slice) -> RolloutBatch:
        """The samples ``rows`` (a micro-batch) of every tensor."""
        return RolloutBatch(**{f.name: None if (v := getattr(self, f.name)) is None else v[rows]
                               for f in fields(self)})


def group_advantages(rewards: torch.Tensor, num_generations: int, *, scale_rewards: bool = True,
                     eps: float = 1e-4) -> torch.Tensor:
    """[B] rewards, consecutive groups of ``num_generations`` -> [B] float32 advantages (R - mean) / (std + eps),
    std unbiased as in TRL and d1; ``scale_rewards=False`` gives d1's R - mean."""
    if rewards.dim() != 1 or num_generations < 1 or rewards.numel() % num_generations:
        raise ValueError(f"group_advantages: rewards {tuple(rewards.shape)} must be 1-D with a length divisible by "
                         f"num_generations={num_generations}")
    grouped = rewards.float().view(-1, num_generations)
    centred = grouped - grouped.mean(1, keepdim=True)
    if scale_rewards:
        std = grouped.std(1, keepdim=True) if num_generations > 1 else torch.zeros_like(centred[:, :1])
        centred = centred / (std + eps)
    return centred.reshape(-1)


def grpo_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, ref_logprobs: torch.Tensor | None,
              advantages: torch.Tensor, completion_mask: torch.Tensor, *, epsilon: float = 0.2,
              beta: float = 0.04, token_weights: torch.Tensor | None = None,
              normalize: str = "token") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The token-level GRPO loss from per-token log-probs [B, C] (old / ref without grad), advantages [B] and the
    loss mask [B, C]. Returns (scalar loss, metrics): ``clip_fraction`` (tokens where the clipped term is active),
    ``kl`` (mean k3 KL; 0 when beta is 0 and no reference is given), ``ratio`` (mean ratio), ``ratio_max``, all
    detached 0-d tensors (no host sync; call ``.item()`` when logging).

    DiFFPO's options (defaults leave the GRPO loss above unchanged, bit for bit): ``token_weights`` [B, C] multiply
    each token's whole term (clipped surrogate + beta KL; used detached: truncated importance weights);
    ``normalize="sequence"`` averages each completion's terms over its own tokens (1/|o|) and then over the
    completions, instead of one mean over every token of the batch."""
    if normalize not in ("token", "sequence"):
        raise ValueError(f"grpo_loss: normalize={normalize!r}; allowed: 'token', 'sequence'")
    if token_weights is not None and token_weights.shape != logprobs.shape:
        raise ValueError(f"grpo_loss: token_weights {tuple(token_weights.shape)} must match logprobs "
                         f"{tuple(logprobs.shape)}")
    if logprobs.shape != old_logprobs.shape or logprobs.shape != completion_mask.shape:
        raise ValueError(f"grpo_loss: logprobs {tuple(logprobs.shape)}, old_logprobs {tuple(old_logprobs.shape)} and "
                         f"completion_mask {tuple(completion_mask.shape)} must have one shape [B, C]")
    if beta != 0 and ref_logprobs is None:
        raise ValueError(f"grpo_loss: beta={beta} needs ref_logprobs (pass beta=0 to train without a reference)")
    m = completion_mask.to(logprobs.dtype)
    denom = m.sum().clamp(min=1.0)
    adv = advantages.to(logprobs.dtype)[:, None]
    ratio = torch.exp(logprobs - old_logprobs)
    clipped = torch.clamp(ratio, 1.0 - epsilon, 1.0 + epsilon)
    per_token = -torch.minimum(ratio * adv, clipped * adv)
    kl = torch.zeros_like(logprobs)
    if ref_logprobs is not None:
        delta = ref_logprobs - logprobs
        kl = torch.exp(delta) - delta - 1.0
        if beta != 0:
            per_token = per_token + beta * kl
    if token_weights is not None:
        per_token = per_token * token_weights.detach().to(per_token.dtype)
    if normalize == "token":
        loss = (per_token * m).sum() / denom
    else:
        loss = ((per_token * m).sum(1) / m.sum(1).clamp(min=1.0)).mean()
    with torch.no_grad():
        is_clipped = ((ratio < 1.0 - epsilon) & (adv < 0)) | ((ratio > 1.0 + epsilon) & (adv > 0))
        metrics = {
            "clip_fraction": (is_clipped.to(m.dtype) * m).sum() / denom,
            "kl": (kl.detach() * m).sum() / denom,
            "ratio": (ratio.detach() * m).sum() / denom,
            "ratio_max": torch.where(m.bool(), ratio.detach(), torch.zeros_like(ratio)).max(),
        }
    return loss, metrics


def batch_logprobs(model, batch: RolloutBatch, *, seed: int, iteration: int, config: LikelihoodConfig):
    """``per_token_logprobs`` of a rollout batch on the masks of (seed, iteration); anchors only for ``stp``."""
    cfg = asdict(config)
    return per_token_logprobs(model, batch.prompt_ids, batch.prompt_attention_mask, batch.completion_ids,
                              anchors=batch.anchors if config.estimator == "stp" else None, seed=seed,
                              iteration=iteration, sample_ids=batch.sample_ids, **cfg)


@torch.no_grad()
def rollout_logprobs(model, batch: RolloutBatch, *, seed: int, num_iterations: int, likelihood: LikelihoodConfig,
                     beta: float = 0.04, ref_model=None,
                     ref_context: Callable[[], AbstractContextManager] | None = None,
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Old and reference per-token log-probs for inner iterations 0..num_iterations-1, once per rollout, no grad.

    The reference is ``ref_model`` if given, else ``model`` evaluated inside ``ref_context()`` (e.g. peft's
    ``model.model.disable_adapter`` for "base = adapter disabled"); with beta = 0 and neither given, no reference
    is computed. Returns (old [mu, B, C] float32, ref [mu, B, C] float32 or None).
    """
    if isinstance(num_iterations, bool) or not isinstance(num_iterations, int) or num_iterations < 1:
        raise ValueError(f"rollout_logprobs: num_iterations={num_iterations!r} must be a positive int")
    old = torch.stack([batch_logprobs(model, batch, seed=seed, iteration=it, config=likelihood).logprobs
                       for it in range(num_iterations)])
    if ref_model is None and ref_context is None:
        if beta != 0:
            raise ValueError(f"rollout_logprobs: beta={beta} needs ref_model or ref_context")
        return old, None
    ref_net = ref_model if ref_model is not None else model
    with (ref_context() if ref_model is None else nullcontext()):
        ref = torch.stack([batch_logprobs(ref_net, batch, seed=seed, iteration=it, config=likelihood).logprobs
                           for it in range(num_iterations)])
    return old, ref


def policy_loss(model, batch: RolloutBatch, *, seed: int, iteration: int, old_logprobs: torch.Tensor,
                ref_logprobs: torch.Tensor | None, likelihood: LikelihoodConfig, epsilon: float = 0.2,
                beta: float = 0.04) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss of inner iteration ``iteration``: current log-probs (with grad) on the masks of (seed, iteration)
    against ``old_logprobs[iteration]`` and ``ref_logprobs[iteration]`` ([mu, B, C] from ``rollout_logprobs``)."""
    if not 0 <= iteration < old_logprobs.shape[0]:
        raise ValueError(f"policy_loss: iteration={iteration} outside the {old_logprobs.shape[0]} precomputed ones")
    cur = batch_logprobs(model, batch, seed=seed, iteration=iteration, config=likelihood)
    ref = None if ref_logprobs is None else ref_logprobs[iteration]
    return grpo_loss(cur.logprobs, old_logprobs[iteration], ref, batch.advantages, cur.valid, epsilon=epsilon,
                     beta=beta)
