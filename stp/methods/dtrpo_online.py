"""dTRPO online: the token-level GRPO loss of docs/method.md 4 on the newly-unmasked tokens' ratios (method.md 7).

Per rollout the shared loop samples and rewards as for GRPO; per inner iteration ``it`` one step per block is drawn
from (mask seed of the rollout, it, sample id, block) (``stp.trajectory_ratio.block_steps``), and the old,
reference and current policies are all evaluated on the states before those steps::

    r_i   = exp(log mu_theta(y_i | state) - log mu_old(y_i | state))     i revealed at a drawn step
    loss  = sum_i m_i (-min(r_i A, clip(r_i, 1 - eps, 1 + eps) A) + beta KL_i) / sum_i m_i

with m_i = the estimator's weight (T_B, or 1 with ``dtrpo.block_mean``) at revealed positions up to and including
the first EOS, 0 elsewhere. Old and reference terms of all mu iterations are computed once after the rollout.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

from .base import Method
from .dtrpo import TRAJECTORY_SETTINGS, trajectory_kwargs

__all__ = ["DTRPOOnline", "METHOD"]


class DTRPOOnline(Method):
    name = "dtrpo-online"
    description = "GRPO on dTRPO's newly-unmasked token ratios (one drawn step per block; old/ref/current same u)"
    settings: ClassVar = {"dtrpo": TRAJECTORY_SETTINGS, "estimator": ("temperature", "memory_budget")}
    loss_metrics = ("kl", "clip_fraction", "ratio")

    @classmethod
    def check(cls, config) -> None:
        from stp.settings import ConfigError

        if config.dtrpo.mode == "packed" and config.rollout.early_stop is not None:
            raise ConfigError.bad_value("rollout.early_stop", config.rollout.early_stop, "none with dtrpo.mode "
                                        "'packed' (the one-shot fill commits positions outside their block's window)")
        if config.rollout.confidence_threshold is not None and config.dtrpo.mode == "packed":
            raise ConfigError.bad_value("rollout.confidence_threshold", config.rollout.confidence_threshold,
                                        "none with dtrpo.mode 'packed' (data-dependent decoding skips passes)")

    def summary(self) -> dict:
        return {"estimator": f"trajectory-{self.config.dtrpo.mode}"}

    def _logprobs(self, model, batch, seed: int, iteration: int):
        from stp.trajectory_ratio import trajectory_logprobs

        return trajectory_logprobs(model, batch.prompt_ids, batch.prompt_attention_mask, batch.completion_ids,
                                   batch.commit_step, seed=seed, iteration=iteration, sample_ids=batch.sample_ids,
                                   **trajectory_kwargs(self.config))

    def score(self, model, batch, *, seed: int, num_iterations: int, ref_context):
        import torch

        from stp.likelihood import valid_lengths

        with torch.no_grad():
            outs = [self._logprobs(model, batch, seed, it) for it in range(num_iterations)]
            valid = (torch.arange(batch.completion_ids.shape[1], device=batch.completion_ids.device)[None, :]
                     < valid_lengths(batch.completion_ids, int(model.eos_token_id))[:, None])
            scores = {"old": torch.stack([o.logprobs for o in outs]),
                      "m": torch.stack([o.weights * valid for o in outs])}  # [mu, B, C] each
            if ref_context is not None:
                with ref_context():
                    scores["ref"] = torch.stack([self._logprobs(model, batch, seed, it).logprobs
                                                 for it in range(num_iterations)])
        return scores

    def loss(self, model, batch, scores: Mapping, *, seed: int, iteration: int):
        from stp.loss import grpo_loss

        g = self.config.grpo
        cur = self._logprobs(model, batch, seed, iteration)
        ref = scores["ref"][iteration] if "ref" in scores else None
        loss, metrics = grpo_loss(cur.logprobs, scores["old"][iteration], ref, batch.advantages,
                                  scores["m"][iteration], epsilon=g.epsilon, beta=g.beta if ref is not None else 0.0)
        return loss, {k: metrics[k] for k in self.loss_metrics}


METHOD = DTRPOOnline
