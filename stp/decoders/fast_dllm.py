"""Fast-dLLM's parallel decoding (threshold rule): each step commits the most confident masked position of the
sample's current block and every other one whose confidence is at least the threshold; a block ends when it has no
[MASK] left, so the steps per block follow the confidences (no schedule, ``steps`` unused).

Fast-dLLM (NVlabs, ``get_transfer_index`` with ``threshold``) keeps the top-1 and drops the others whose confidence
is below the threshold: a confidence equal to it is committed. Temporal pruning caps the commits at the budget left.
"""

from __future__ import annotations

from dataclasses import dataclass

from .base import Decoder, Step, top_k_commit


@dataclass
class FastDLLM(Decoder):
    """Top-1 plus every candidate with confidence >= threshold, per step; blocks end when fully decoded."""

    threshold: float = 0.9

    name = "fast_dllm"
    pace = "free"
    fills = True

    def check(self, fn):
        t = self.threshold
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t <= 1:
            raise ValueError(f"{fn}: fast_dllm threshold={t!r}; allowed: a number in (0, 1]")

    def commit(self, s: Step):
        score = s.score.masked_fill(~s.candidates, float("-inf"))
        count = (s.candidates & (score >= self.threshold)).sum(1).clamp(min=1) * s.candidates.any(1)
        return top_k_commit(score, s.candidates, count.minimum(s.limit))


DECODER = FastDLLM
