"""GRPO with a mask-based likelihood estimator: the shared part of the ``stp``, ``elbo`` and ``d1`` methods.

Objective (``stp.loss``), per rollout of P prompts x G completions, advantages from the task rewards::

    r     = exp(logp_theta - logp_old)                           per token, same Monte-Carlo masks
    KL    = exp(logp_ref - logp_theta) - (logp_ref - logp_theta) - 1      (ref = base = LoRA adapter disabled)
    loss  = sum_tokens m * (-min(r A, clip(r, 1 - eps, 1 + eps) A) + beta KL) / sum_tokens m

with per-token log-probs from the method's estimator (``stp.likelihood``). ``score`` computes the old and reference
log-probs of all mu inner iterations once, right after the rollout (inner iteration ``it`` draws its masks from
(seed, it)); ``loss`` recomputes the current ones with grad on the same masks.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

from .base import Method

__all__ = ["GRPOMethod"]

# The estimator section's fields every estimator reads.
COMMON_ESTIMATOR_FIELDS = ("score", "num_draws", "temperature", "memory_budget")


class GRPOMethod(Method):
    """Token-level GRPO with clipping and a k3 KL penalty; subclasses name the estimator."""

    estimator: ClassVar[str] = ""
    loss_metrics = ("kl", "clip_fraction", "ratio")

    def __init__(self, config):
        super().__init__(config)
        self.likelihood = config.estimator.to_likelihood_config(self.estimator, config.run.backend)

    def summary(self) -> dict:
        return {"estimator": self.estimator}

    def score(self, model, batch, *, seed: int, num_iterations: int, ref_context):
        from stp.loss import rollout_logprobs

        old, ref = rollout_logprobs(model, batch, seed=seed, num_iterations=num_iterations,
                                    likelihood=self.likelihood, beta=self.config.grpo.beta,
                                    ref_context=ref_context)  # [mu, B, C] each
        return {"old": old} if ref is None else {"old": old, "ref": ref}

    def loss(self, model, batch, scores: Mapping, *, seed: int, iteration: int):
        from stp.loss import policy_loss

        g = self.config.grpo
        loss, metrics = policy_loss(model, batch, seed=seed, iteration=iteration, old_logprobs=scores["old"],
                                    ref_logprobs=scores.get("ref"), likelihood=self.likelihood, epsilon=g.epsilon,
                                    beta=g.beta)
        return loss, {k: metrics[k] for k in self.loss_metrics}
