"""The schedule with a confidence threshold: max(schedule k, masked positions above the threshold) per step.

Beyond the paper. Steps per block stay fixed (LLaDA's schedule is a floor); compare ``fast_dllm``, Fast-dLLM's rule,
which has no floor and ends a block when it has no [MASK]."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Decoder, Step, top_k_commit
from .random_remasking import random_scores


@dataclass
class ConfidenceThreshold(Decoder):
    """Commit the most confident max(k, #{confidence > threshold}) masked positions, at most the budget left."""

    threshold: float = 0.9
    random: bool = False  # rank (and threshold) by random uniforms instead of the confidence (remasking="random")

    name = "confidence_threshold"
    fills = True

    def check(self, fn):
        t = self.threshold
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t <= 1:
            raise ValueError(f"{fn}: confidence_threshold must be in (0, 1], got {t!r}")

    def scores(self, x0, confidence, entropy, *, seed, step, row_ids):
        return random_scores(seed, step, row_ids) if self.random else confidence

    def commit(self, s: Step):
        above = (s.still & (s.score > self.threshold)).sum(1)
        return top_k_commit(s.score, s.still, torch.minimum(torch.maximum(s.k, above), s.limit))


DECODER = ConfidenceThreshold
