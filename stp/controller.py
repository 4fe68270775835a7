"""The learned decoding threshold of DiFFPO: a small head on the pooled prompt hidden state that gives a log-normal
distribution over the entropy bound gamma of the EB sampler (``stp.sampler.generate(entropy_bound=...)``).

    f      = mean of the policy's final hidden states over the real prompt tokens   [B, H] (no grad)
    mu, s  = Linear(W2, tanh(Linear(W1, LayerNorm(f))))                               [B], [B]
    log gamma ~ Normal(mu, exp(s)^2)      greedy gamma = exp(mu) (the median)

It is trained by REINFORCE with the group advantages of the rollout (``stp.methods.diffpo``): the reward there adds
``-lambda * NFE / NFE_max``, so a larger gamma (fewer forward passes) is paid when it keeps the answers right. The
draws are keyed by the counter-based generator (seed, sample id), so they do not depend on the batch layout or on a
global RNG. Saved as ``controller.safetensors`` + ``controller.json`` (``save`` / ``load``) beside the adapter.
Evaluation decodes with the median gamma by default; ``SampledThreshold`` decodes with the sampled policy instead
(``stp.eval --controller-gamma sampled``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

from stp_kernels.reference import counter_uniform, row_keys

__all__ = ["ThresholdController", "SampledThreshold", "pooled_prompt_features", "GAMMA_SALT"]

GAMMA_SALT = 0x67616D6D61  # "gamma"
_LOG_SIGMA_RANGE = (-5.0, 2.0)


@torch.no_grad()
def pooled_prompt_features(model, prompt_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """[B, P] left-padded prompts -> [B, H] float32: the mean final hidden state over the real prompt tokens (one
    prompt-only forward of ``model.backbone``)."""
    hidden = model.backbone(prompt_ids, attention_mask).float()  # [B, P, H]
    real = (torch.ones_like(prompt_ids, dtype=torch.float32) if attention_mask is None
            else attention_mask.to(torch.float32))
    return (hidden * real[..., None]).sum(1) / real.sum(1, keepdim=True).clamp(min=1.0)


class ThresholdController(nn.Module):
    """Log-normal policy over gamma given pooled prompt features (module docstring)."""

    def __init__(self, hidden_size: int, width: int = 64, gamma_init: float = 1.0, sigma_init: float = 0.5):
        super().__init__()
        if hidden_size < 1 or width < 1:
            raise ValueError(f"ThresholdController: hidden_size={hidden_size} and width={width} must be >= 1")
        if not (gamma_init > 0 and sigma_init > 0):
            raise ValueError(f"ThresholdController: gamma_init={gamma_init} and sigma_init={sigma_init} must be > 0")
        self.settings = {"hidden_size": int(hidden_size), "width": int(width), "gamma_init": float(gamma_init),
                         "sigma_init": float(sigma_init)}
        self.norm = nn.LayerNorm(hidden_size, elementwise_affine=False)
        self.hidden = nn.Linear(hidden_size, width)
        self.out = nn.Linear(width, 2)
        with torch.no_grad():  # starts at the configured distribution whatever the features
            self.out.weight.zero_()
            self.out.bias.copy_(torch.tensor([math.log(gamma_init), math.log(sigma_init)]))

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, H] -> (mu [B], log_sigma [B]) of log gamma, in float32 also under autocast (the old and current
        log-probs of a draw then agree exactly at the first inner iteration)."""
        with torch.autocast(device_type=features.device.type, enabled=False):
            z = self.out(torch.tanh(self.hidden(self.norm(features.float()))))
        return z[:, 0], z[:, 1].clamp(*_LOG_SIGMA_RANGE)

    def log_prob(self, features: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
        """log q(gamma | prompt) [B] of the log-normal (density of gamma itself, Jacobian included)."""
        mu, log_sigma = self(features)
        x = gamma.float().log()
        return -0.5 * ((x - mu) / log_sigma.exp()) ** 2 - log_sigma - 0.5 * math.log(2 * math.pi) - x

    @torch.no_grad()
    def sample(self, features: torch.Tensor, *, seed: int, sample_ids: torch.Tensor) -> torch.Tensor:
        """[B] gamma drawn per sample from the counter (seed, sample id) by Box-Muller (no global RNG)."""
        mu, log_sigma = self(features)
        keys = row_keys(seed ^ GAMMA_SALT, 0, sample_ids.long())
        u = counter_uniform(keys, torch.arange(2, device=features.device))  # [B, 2] in (0, 1)
        normal = torch.sqrt(-2.0 * torch.log(u[:, 0])) * torch.cos(2 * math.pi * u[:, 1])
        return torch.exp(mu + log_sigma.exp() * normal)

    @torch.no_grad()
    def median(self, features: torch.Tensor) -> torch.Tensor:
        """The greedy threshold exp(mu) [B] (the log-normal's median)."""
        return self(features)[0].exp()

    def save(self, directory: str | Path) -> Path:
        """Write ``controller.safetensors`` and ``controller.json`` into ``directory``; returns the directory."""
        from stp.files import save_tensors, write_file

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        save_tensors(d / "controller.safetensors", {k: v.detach().cpu().contiguous()
                                                    for k, v in self.state_dict().items()})
        write_file(d / "controller.json", json.dumps({"format": 1, **self.settings}, indent=1).encode())
        return d

    @classmethod
    def load(cls, directory: str | Path, device=None) -> ThresholdController:
        """The controller saved by ``save`` in ``directory`` (errors name the missing file)."""
        from stp.files import load_tensors

        d = Path(directory)
        for name in ("controller.json", "controller.safetensors"):
            if not (d / name).is_file():
                raise FileNotFoundError(f"{d / name}: no such file; a controller directory holds controller.json "
                                        f"and controller.safetensors (written at the end of a diffpo run)")
        meta = json.loads((d / "controller.json").read_text())
        ctl = cls(meta["hidden_size"], meta["width"], meta["gamma_init"], meta["sigma_init"])
        ctl.load_state_dict(load_tensors(d / "controller.safetensors"))
        return ctl.to(device) if device is not None else ctl


class SampledThreshold:
    """The controller's sampled policy where an evaluation asks for a threshold: ``median(features)`` returns a draw
    ``controller.sample(features, seed=seed, sample_ids=...)`` instead of the median, with the sample ids counted
    over the rows in the order they are asked (0, 1, 2, ...: the example index when an evaluation decodes its
    examples in order from the first; a resumed evaluation would count from 0 again, so ``stp.eval`` refuses to
    resume one). ``state_dict`` adds the seed, so results files of the median and of the sampled policy have
    different settings."""

    def __init__(self, controller: ThresholdController, seed: int):
        self.controller, self.seed, self.rows = controller, int(seed), 0

    def to(self, device) -> SampledThreshold:
        self.controller.to(device)
        return self

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {**self.controller.state_dict(), "sampled_policy_seed": torch.tensor([self.seed])}

    @torch.no_grad()
    def median(self, features: torch.Tensor) -> torch.Tensor:
        ids = torch.arange(self.rows, self.rows + features.shape[0], device=features.device)
        self.rows += features.shape[0]
        return self.controller.sample(features, seed=self.seed, sample_ids=ids)
