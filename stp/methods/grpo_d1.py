"""GRPO with d1's estimator (diffu-GRPO): the completion fully masked, real prompt tokens masked with
``estimator.prompt_mask_prob``, one draw in d1's own settings."""

from __future__ import annotations

from .grpo import COMMON_ESTIMATOR_FIELDS, GRPOMethod

__all__ = ["GRPOWithD1", "METHOD"]


class GRPOWithD1(GRPOMethod):
    name = "d1"
    description = "d1 (diffu-GRPO): per-token log-probs of the fully masked completion, prompt tokens masked"
    estimator = "d1"
    settings = {"estimator": (*COMMON_ESTIMATOR_FIELDS, "prompt_mask_prob")}


METHOD = GRPOWithD1
