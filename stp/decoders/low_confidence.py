"""LLaDA's low-confidence remasking: each step commits the schedule's k most confident masked positions."""

from __future__ import annotations

from .base import Decoder, Step, top_k_commit


class LowConfidence(Decoder):
    """LLaDA's default: k from the linear schedule, the k highest softmax(z)[x0] (no host sync in the loop)."""

    name = "low_confidence"
    fixed_counts = True

    def commit(self, s: Step):
        return top_k_commit(s.score, s.still, s.k)


DECODER = LowConfidence
