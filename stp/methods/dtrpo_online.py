"""dTRPO online: the token-level GRPO loss of docs/method.md 4 on the newly-unmasked tokens' ratios (method.md 7).

Per rollout the shared loop samples and rewards as for GRPO; per inner iteration ``it`` one step per block is drawn
from (mask seed of the rollout, it, sample id, block) (``stp.trajectory_ratio.block_steps``), and the old,
reference and current policies are all evaluated on the states before those steps::

    r_i   = exp(log mu_theta(y_i | state) - log mu_old(y_i | state))     i revealed at a drawn step
    loss  = sum_i w_i (-min(r_i A, clip(r_i, 1 - eps, 1 + eps) A) + beta KL_i) / sum_i d_i

with w_i = the estimator's weight (T_B at a drawn step, 1 beyond the windows; ``dtrpo.block_mean`` divides both by
T_B) and d_i = 1 at every decoded position (commit_step > 0) up to and including the first EOS. The numerator is the
unbiased one-step-per-block estimate of the sum of those tokens' terms over the whole trajectories, the denominator
their count, so the loss estimates the per-token mean of the GRPO loss over the trajectories (T_B does not cancel,
as it did when the denominator was sum_i w_i). The token set is the shared loop's (the GRPO family's, and the one
the trainer weights micro-batches and processes by: ``stp.trainer``): tokens after the first EOS are left out.
The offline method's Delta keeps them, as it is the log-ratio of the whole trajectory, every decoded position
included (docs/method.md 7 says why the two differ). Log-probs are at the sampling temperature
(``rollout.temperature``) unless ``dtrpo.temperature`` says otherwise. Old and reference terms of all mu iterations
are computed once after the rollout. The metrics (``kl``, ``clip_fraction``, ``ratio``) are means over the scored
tokens.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

from .base import Method
from .dtrpo import TRAJECTORY_SETTINGS, check_model, check_trajectory_settings, trajectory_kwargs

__all__ = ["DTRPOOnline", "METHOD"]


class DTRPOOnline(Method):
    name = "dtrpo-online"
    description = "GRPO on dTRPO's newly-unmasked token ratios (one drawn step per block; old/ref/current same u)"
    settings: ClassVar = {"dtrpo": TRAJECTORY_SETTINGS, "estimator": ("memory_budget",)}
    loss_metrics = ("kl", "clip_fraction", "ratio")

    @classmethod
    def check(cls, config) -> None:
        from stp.settings import ConfigError

        check_trajectory_settings(config, "dtrpo-online")
        if config.rollout.confidence_threshold is not None and config.dtrpo.mode == "packed":
            raise ConfigError.bad_value("rollout.confidence_threshold", config.rollout.confidence_threshold,
                                        "none with dtrpo.mode 'packed' (data-dependent decoding skips passes)")

    def prepare(self, model, prompts, accelerator) -> None:
        check_model(self.config, model)

    def summary(self) -> dict:
        return {"estimator": f"trajectory-{self.config.dtrpo.mode}"}

    def _logprobs(self, model, batch, seed: int, iteration: int):
        from stp.trajectory_ratio import trajectory_logprobs

        return trajectory_logprobs(model, batch.prompt_ids, batch.prompt_attention_mask, batch.completion_ids,
                                   batch.commit_step, seed=seed, iteration=iteration, sample_ids=batch.sample_ids,
                                   **trajectory_kwargs(self.config))

    def score(self, model, batch, *, seed: int, num_iterations: int, ref_context):
        import torch

        with torch.no_grad():
            outs = [self._logprobs(model, batch, seed, it) for it in range(num_iterations)]
            scores = {"old": torch.stack([o.logprobs for o in outs]),
                      "w": torch.stack([o.weights for o in outs])}  # [mu, B, C] each
            if ref_context is not None:
                with ref_context():
                    scores["ref"] = torch.stack([self._logprobs(model, batch, seed, it).logprobs
                                                 for it in range(num_iterations)])
        return scores

    def loss(self, model, batch, scores: Mapping, *, seed: int, iteration: int):
        import torch

        from stp.likelihood import valid_lengths
        from stp.loss import grpo_loss

        g = self.config.grpo
        cur = self._logprobs(model, batch, seed, iteration)
        ref = scores["ref"][iteration] if "ref" in scores else None
        w = scores["w"][iteration]
        beta = g.beta if ref is not None else 0.0
        c_len = batch.completion_ids.shape[1]
        valid = (torch.arange(c_len, device=batch.completion_ids.device)[None, :]
                 < valid_lengths(batch.completion_ids, int(model.eos_token_id))[:, None])
        decoded = (batch.commit_step > 0) & valid  # the trajectories' tokens through the first EOS: the denominator
        loss, _ = grpo_loss(cur.logprobs, scores["old"][iteration], ref, batch.advantages, decoded,
                            epsilon=g.epsilon, beta=beta, token_weights=w * decoded)
        with torch.no_grad():
            _, metrics = grpo_loss(cur.logprobs, scores["old"][iteration], ref, batch.advantages, (w > 0) & decoded,
                                   epsilon=g.epsilon, beta=beta)
        return loss, {k: metrics[k] for k in self.loss_metrics}


METHOD = DTRPOOnline
