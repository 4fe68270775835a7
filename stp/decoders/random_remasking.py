"""LLaDA's random remasking: each step commits k masked positions chosen uniformly at random."""

from __future__ import annotations

import torch

from stp_kernels.reference import counter_uniform, row_keys

from .base import Decoder, Step, top_k_commit

_RANDOM_REMASK_SALT = 0x5EED0F  # counter seed offset of the positions' uniforms (distinct from the token draws)


def random_scores(seed: int, step: int, row_ids: torch.Tensor) -> torch.Tensor:
    """[R] float32 counter uniforms per (seed, step, row): random ranks of the positions."""
    keys = row_keys(seed ^ _RANDOM_REMASK_SALT, step, row_ids)
    return counter_uniform(keys, torch.zeros(1, dtype=torch.long, device=row_ids.device))[:, 0]


class RandomRemasking(Decoder):
    """k from the linear schedule; positions ranked by a counter uniform per (seed, step, sample, position)."""

    name = "random"
    fixed_counts = True

    def scores(self, x0, confidence, entropy, *, seed, step, row_ids):
        return random_scores(seed, step, row_ids)

    def commit(self, s: Step):
        return top_k_commit(s.score, s.still, s.k)


DECODER = RandomRemasking
