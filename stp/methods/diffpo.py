"""DiFFPO: GRPO on the two-times mean-field (2-MF) surrogate with truncated importance weights, rollouts with the
entropy-bounded (EB) sampler, and a learned per-prompt threshold (docs/method.md section 8).

Objective of inner iteration ``it`` (``stp.loss.grpo_loss`` with token weights), per token k of completion o::

    logp   = 2-MF surrogate log-prob (stp.surrogate): tau ~ U{0..T-1} from (seed, it, sample); tokens committed at
             or before tau scored under [prompt ; all MASK], later ones under [prompt ; z_tau]
    w_k    = min(C, exp(logp_old_k - logp_behaviour_k))       detached; logp_behaviour from the trajectory record
    term_k = w_k * (-min(r A, clip(r, 1 - eps, 1 + eps) A) + beta KL_k)     r, KL (k3) on the same contexts
    loss   = mean_o (1/|o|) sum_k term_k            (diffpo.normalize = token: sum over all tokens / their count)

A token committed at pass tau + 1 is scored under exactly the canvas it was drawn from, by the policy it was drawn
from, when the rollout ran the scoring forward (no ``rollout.cfg_scale``, no KV cache ``rollout.cache``, no LoRA
dropout, no vocabulary prior): its weight is 1 analytically, and it is set to exactly 1 there (the rollout's head
pass and the scoring pass round differently, ~1e-6). In every other setting the rollout's distribution differs from
the scored one and w is computed from the scored log-probs like every other token's (``exact_unit_weights``). The
surrogate scores at ``rollout.temperature``, the distribution the tokens were drawn from, so the weights compare like
with like.

Advantages (docs/method.md section 8). The trainer's group advantages A_task come from the task reward only (no NFE
penalty in the reward). With lambda = ``diffpo.nfe_penalty`` > 0 the NFE enters as its own term::

    N_b = -lambda * (NFE_b - mean_group NFE) / NFE_max        (``nfe_term``; NFE_max = ``nfe_max``)

The controller (modes ``sampler``, ``joint``), which chooses gamma and so the NFE, is trained on A_task + N; the
policy on A_task alone in those modes (the NFE of a group varies mostly with the controller's gamma draws, which the
policy does not choose), and on A_task + N in mode ``model`` (no controller: the policy's entropies set the NFE).
N is not rescaled by the group's spread, so lambda is the exchange rate: saving NFE_max forward passes against the
group is worth lambda units of the (standardised) task advantage, and doubling lambda doubles N exactly.

Threshold controller (``stp.controller``; modes ``sampler`` and ``joint``): before each rollout, a head on the pooled
prompt hidden state draws gamma per completion (log-normal, counter-keyed); it is trained by a clipped REINFORCE
term on its advantages A_task + N: ``-mean_b min(rho_b A_b, clip(rho_b) A_b)`` with rho = q_theta(gamma) / q_old(gamma)
(rho = 1 at inner iteration 0: plain REINFORCE). Mode ``model`` trains only the policy (fixed gamma, or LLaDA's
schedule with ``diffpo.sampler = schedule``); mode ``sampler`` only the controller.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from stp.settings import ConfigError, Section
from stp.settings import setting as _f  # _f(default, help, choices=...): a field with its help text

from .base import Method, RolloutSettings

__all__ = ["DiFFPO", "DiffpoConfig", "METHOD"]

DIFFPO_MODES = ("model", "sampler", "joint")
DIFFPO_SAMPLERS = ("eb", "schedule")
DIFFPO_TAUS = ("uniform", "zero")


@dataclass
class DiffpoConfig(Section):
    """DiFFPO (``stp.methods.diffpo``, docs/method.md section 8): the 2-MF surrogate with truncated importance
    weights, the entropy-bounded sampler and its learned threshold controller."""

    section: ClassVar[str] = "diffpo"

    mode: str = _f("joint", "what is trained: model (the policy, fixed gamma), sampler (the threshold controller "
                   "only), joint (both)", choices=DIFFPO_MODES)
    sampler: str = _f("eb", "rollout sampler: eb (entropy-bounded, threshold gamma) or schedule (LLaDA's fixed "
                      "steps; mode model only)", choices=DIFFPO_SAMPLERS)
    gamma: float = _f(1.0, "entropy bound of the EB sampler in mode model, and the controller's initial median "
                      "gamma otherwise (> 0)")
    gamma_sigma: float = _f(0.5, "initial standard deviation of the controller's log gamma (> 0)")
    controller_width: int = _f(64, "hidden width of the controller head on the pooled prompt hidden state")
    controller_lr: float = _f(1e-2, "AdamW learning rate of the controller (its own parameter group, no weight "
                              "decay, the run's schedule)")
    nfe_penalty: float = _f(0.1, "lambda: the controller's advantages add -lambda * (NFE - group mean NFE) / NFE_max "
                            "(NFE_max = rollout.gen_length with eb, rollout.steps + 1 with schedule), the policy's "
                            "too in mode model; not part of the reward; 0 = off")
    tau_sampling: str = _f("uniform", "split time tau of the 2-MF surrogate: uniform in [0, T) per sample and inner "
                           "iteration, or zero (every token under the fully masked context: d1 without prompt "
                           "masking)", choices=DIFFPO_TAUS)
    importance_weights: bool = _f(True, "multiply each token's term by min(C, pi_old_surrogate / pi_behaviour) "
                                  "(detached); false = weights 1")
    importance_cap: float = _f(2.0, "C, the truncation of the importance weights (>= 1; the paper states none)")
    normalize: str = _f("sequence", "sequence: 1/|o| per completion, then the mean over completions (the paper's); "
                        "token: one mean over every token of the batch (GRPO's, d1's)", choices=("sequence", "token"))

    def __post_init__(self):
        self._coerce_all()
        self._need("gamma", math.isfinite(self.gamma) and self.gamma > 0, "a finite number > 0")
        self._need("gamma_sigma", math.isfinite(self.gamma_sigma) and self.gamma_sigma > 0, "a finite number > 0")
        self._positive("controller_width")
        self._need("controller_lr", 0 < self.controller_lr < 1, "a number in (0, 1)")
        self._need("nfe_penalty", math.isfinite(self.nfe_penalty) and self.nfe_penalty >= 0, "a number >= 0")
        self._need("importance_cap", math.isfinite(self.importance_cap) and self.importance_cap >= 1,
                   "a finite number >= 1")
        self._need("sampler", self.sampler == "eb" or self.mode == "model",
                   f"'eb' with diffpo.mode={self.mode!r} (the controller sets the EB sampler's threshold)")



class DiFFPO(Method):
    name = "diffpo"
    description = ("DiFFPO: 2-MF surrogate with truncated importance weights, EB sampler, learned per-prompt "
                   "threshold")
    settings = {"estimator": ("memory_budget",), "diffpo": None}
    sections = (DiffpoConfig,)
    rollout = RolloutSettings(behaviour_logprobs=True)
    loss_metrics = ("kl", "clip_fraction", "ratio", "weight", "gamma", "controller_loss", "nfe_term")

    def __init__(self, config):
        super().__init__(config)
        self.lm = None
        self.controller = None
        self._pending = None  # (features [B, H], gamma [B]) of the last rollout, read by score
        self._nfe = None  # [B] NFE of the last rollout (extra_rewards), read by score for the NFE term
        # 1/|o| per completion is a mean over samples, not over the step's tokens (stp.methods.base).
        self.token_level_loss = config.diffpo.normalize == "token"

    @classmethod
    def check(cls, config) -> None:
        r, d = config.rollout, config.diffpo
        if r.temperature <= 0:
            raise ConfigError.bad_value("rollout.temperature", r.temperature, "a number > 0 with method 'diffpo' "
                                        "(the surrogate and the importance weights score the sampling distribution; "
                                        "a greedy rollout has none)")
        if d.sampler == "eb":
            if r.confidence_threshold is not None:
                raise ConfigError.bad_value("rollout.confidence_threshold", r.confidence_threshold,
                                            "none with diffpo.sampler 'eb' (the entropy bound picks the positions)")
            if r.remasking != "low_confidence":
                raise ConfigError.bad_value("rollout.remasking", r.remasking,
                                            "'low_confidence' with diffpo.sampler 'eb' (the entropy bound orders "
                                            "the positions)")

    # ------------------------------------------------------------------------------------------ trainer hooks

    def prepare(self, model, prompts: Sequence[str], accelerator) -> None:
        self.lm = model
        d = self.config.diffpo
        if d.mode == "model":
            return
        import torch

        from stp.controller import ThresholdController
        from stp.seeds import derive_seed

        with torch.random.fork_rng(devices=[]):  # initialised from the config, the caller's RNG untouched
            torch.manual_seed(derive_seed(self.config.run.seed, "controller-init"))
            self.controller = ThresholdController(int(model.lm_head_weight.shape[1]), d.controller_width, d.gamma,
                                                  d.gamma_sigma)
        self.controller.to(model.lm_head_weight.device)

    def trainable_modules(self):
        return {} if self.controller is None else {"controller": self.controller}

    def optimizer_groups(self) -> list[dict[str, Any]]:
        if self.controller is None:
            return []
        return [{"params": list(self.controller.parameters()), "lr": self.config.diffpo.controller_lr,
                 "weight_decay": 0.0}]

    def save_artifacts(self, directory) -> None:
        if self.controller is not None:
            self.controller.save(directory / "controller")

    def nfe_max(self) -> int:
        r = self.config.rollout
        return r.gen_length if self.config.diffpo.sampler == "eb" else r.steps + 1

    def sampler_kwargs(self, prompt_ids, sample_ids, *, attention_mask=None, seed: int = 0) -> dict[str, Any]:
        d = self.config.diffpo
        if d.sampler != "eb":
            return {}
        if self.controller is None:
            return {"entropy_bound": float(d.gamma)}
        from stp.controller import pooled_prompt_features

        features = pooled_prompt_features(self.lm, prompt_ids, attention_mask)  # [B, H]
        gamma = self.controller.sample(features, seed=seed, sample_ids=sample_ids)  # [B]
        self._pending = (features, gamma)
        return {"entropy_bound": gamma}

    def eval_kwargs(self) -> dict[str, Any]:
        d = self.config.diffpo
        if d.sampler != "eb":
            return {}
        return {"controller": self.controller} if self.controller is not None else {"entropy_bound": float(d.gamma)}

    def extra_rewards(self, gen) -> dict[str, Any]:
        """No reward term: the NFE enters the advantages as its own term (``nfe_term``), not through the reward,
        whose group standardisation would rescale it; kept here for ``score``."""
        self._nfe = gen.nfe
        return {}

    def nfe_term(self, nfe):
        """[B] float32 ``-lambda * (NFE - mean_group NFE) / NFE_max`` over consecutive groups of
        ``grpo.num_generations`` (module docstring); zeros when lambda is 0."""
        import torch

        g = self.config.grpo.num_generations
        lam = float(self.config.diffpo.nfe_penalty)
        x = nfe.to(torch.float32).view(-1, g)
        return (-lam * (x - x.mean(1, keepdim=True)) / self.nfe_max()).reshape(-1)

    def exact_unit_weights(self) -> bool:
        """True when a token committed at pass tau + 1 is scored under the rollout's own distribution, so its
        importance weight is 1 analytically: no classifier-free guidance and no KV cache in the rollout (both change
        the logits it drew from), no LoRA dropout at scoring time (old log-probs under a dropout mask). The
        trainer's rollouts take no vocabulary prior; a caller that records behaviour log-probs with one scores them
        with ``stp.surrogate.two_mf_logprobs(vocab=...)``."""
        r, m = self.config.rollout, self.config.model
        return r.cfg_scale == 0 and r.cache == "none" and not (m.use_lora and m.lora_dropout > 0)

    def summary(self) -> dict:
        d = self.config.diffpo
        return {"estimator": "2mf" if d.tau_sampling == "uniform" else "2mf-tau0", "diffpo_mode": d.mode,
                "diffpo_sampler": d.sampler}

    # ------------------------------------------------------------------------------------------ scoring, loss

    def _taus(self, batch, seed: int, iteration: int):
        import torch

        from stp.surrogate import draw_tau, num_passes

        if self.config.diffpo.tau_sampling == "zero":
            return torch.zeros_like(batch.sample_ids)
        return draw_tau(seed, iteration, batch.sample_ids, num_passes(batch.commit_step))

    def _logprobs(self, model, batch, tau):
        from stp.surrogate import two_mf_logprobs

        return two_mf_logprobs(model, batch.prompt_ids, batch.prompt_attention_mask, batch.completion_ids,
                               batch.commit_step, tau=tau, anchors=batch.anchors,
                               temperature=self.config.rollout.temperature,
                               memory_budget=self.config.estimator.memory_budget, backend=self.config.run.backend)

    def importance_weights(self, old, behaviour, commit_step, tau):
        """[B, C] detached ``min(C, exp(old - behaviour))``; exactly 1 where the token was committed at tau + 1 when
        that is exact (``exact_unit_weights``), computed like the others otherwise."""
        import torch

        w = torch.exp(old - behaviour).clamp(max=self.config.diffpo.importance_cap)
        if not self.exact_unit_weights():
            return w
        return torch.where(commit_step == tau[:, None] + 1, torch.ones_like(w), w)

    def score(self, model, batch, *, seed: int, num_iterations: int, ref_context):
        import torch

        with torch.no_grad():  # old, reference and weights are constants of the loss
            return self._score(model, batch, seed=seed, num_iterations=num_iterations, ref_context=ref_context)

    def _score(self, model, batch, *, seed: int, num_iterations: int, ref_context):
        import torch

        d, beta = self.config.diffpo, self.config.grpo.beta
        taus = torch.stack([self._taus(batch, seed, it) for it in range(num_iterations)])  # [mu, B]
        out = {"tau": taus}
        if d.nfe_penalty > 0:
            if self._nfe is None:
                raise RuntimeError("diffpo: score called without the rollout's NFE (extra_rewards) while "
                                   "diffpo.nfe_penalty > 0")
            term = self.nfe_term(self._nfe.to(batch.advantages.device))
            out["nfe_term"] = term[None].expand(num_iterations, -1).contiguous()  # [mu, B]
        self._nfe = None
        if d.mode != "sampler":
            out["old"] = torch.stack([self._logprobs(model, batch, taus[it]).logprobs
                                      for it in range(num_iterations)])  # [mu, B, C]
            if ref_context is not None and beta != 0:
                with ref_context():
                    out["ref"] = torch.stack([self._logprobs(model, batch, taus[it]).logprobs
                                              for it in range(num_iterations)])
            if d.importance_weights:
                out["weight"] = torch.stack([self.importance_weights(out["old"][it], batch.behaviour_logprobs,
                                                                     batch.commit_step, taus[it])
                                             for it in range(num_iterations)])
        if self.controller is not None:
            if self._pending is None:
                raise RuntimeError("diffpo: score called without a rollout drawn through sampler_kwargs")
            features, gamma = self._pending
            self._pending = None
            with torch.no_grad():
                logq = self.controller.log_prob(features, gamma)
            out["features"] = features[None].expand(num_iterations, *features.shape).contiguous()
            out["gamma"] = gamma[None].expand(num_iterations, -1).contiguous()
            out["logq_old"] = logq[None].expand(num_iterations, -1).contiguous()
        return out

    def loss(self, model, batch, scores: Mapping, *, seed: int, iteration: int):
        import torch

        from stp.loss import grpo_loss

        d, g = self.config.diffpo, self.config.grpo
        zero = torch.zeros((), device=batch.completion_ids.device)
        metrics = {k: zero for k in self.loss_metrics}
        total = zero
        if d.mode != "sampler":
            cur = self._logprobs(model, batch, scores["tau"][iteration])
            w = scores["weight"][iteration] if "weight" in scores else None
            ref = scores["ref"][iteration] if "ref" in scores else None
            adv = batch.advantages
            if self.controller is None and "nfe_term" in scores:  # mode model: the policy sets the NFE
                adv = adv + scores["nfe_term"][iteration].to(adv.dtype)
            total, m = grpo_loss(cur.logprobs, scores["old"][iteration], ref, adv, cur.valid,
                                 epsilon=g.epsilon, beta=g.beta if ref is not None else 0.0, token_weights=w,
                                 normalize=d.normalize)
            metrics.update({k: m[k] for k in ("kl", "clip_fraction", "ratio")})
            if w is not None:
                v = cur.valid.to(w.dtype)
                metrics["weight"] = (w * v).sum() / v.sum().clamp(min=1.0)
            else:
                metrics["weight"] = torch.ones((), device=zero.device)
        if self.controller is not None:
            logq = self.controller.log_prob(scores["features"][iteration], scores["gamma"][iteration])
            rho = torch.exp(logq - scores["logq_old"][iteration])
            adv = batch.advantages.to(rho.dtype)
            if "nfe_term" in scores:
                adv = adv + scores["nfe_term"][iteration].to(rho.dtype)
            c_loss = -torch.minimum(rho * adv, rho.clamp(1 - g.epsilon, 1 + g.epsilon) * adv).mean()
            total = total + c_loss
            metrics["controller_loss"] = c_loss.detach()
            metrics["gamma"] = scores["gamma"][iteration].mean()
        elif d.sampler == "eb":
            metrics["gamma"] = torch.full((), d.gamma, device=zero.device)
        if "nfe_term" in scores:
            metrics["nfe_term"] = scores["nfe_term"][iteration].abs().mean()
        return total, metrics


METHOD = DiFFPO
