"""GRPO with the ELBO estimator ("GRPO with ELBO", the paper's main baseline): K random-count masks, no anchors."""

from __future__ import annotations

from .grpo import COMMON_ESTIMATOR_FIELDS, GRPOMethod

__all__ = ["GRPOWithELBO", "METHOD"]


class GRPOWithELBO(GRPOMethod):
    name = "elbo"
    description = "GRPO, per-token log-probs from K random-count masks (no anchors, no spatial pruning)"
    estimator = "elbo"
    settings = {"estimator": (*COMMON_ESTIMATOR_FIELDS, "mask_scheme")}


METHOD = GRPOWithELBO
