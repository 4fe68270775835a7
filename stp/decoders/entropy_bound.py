"""Entropy-bounded (EB) decoding, DiFFPO's sampler: each step sorts the masked positions of a sample's current
block by predictive entropy H and commits the largest prefix with ``sum H - max H <= gamma`` (at least one
position). gamma is a float or a [B] tensor (one threshold per sample, e.g. drawn by a learned controller).

The EB sampler's paper orders positions by an error proxy, entropy or confidence; the bound on the prefix is always
on the entropies. ``order="confidence"`` (registered as ``entropy_bound_confidence``,
``stp.decoders.entropy_bound_confidence``) sorts by the confidence of the draw, highest first, and bounds the same
sum over that order."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from .base import Decoder, Step

_FN = "stp.sampler.generate"


def entropy_bounded_commit(entropy: torch.Tensor, candidates: torch.Tensor, gamma: torch.Tensor,
                           limit: torch.Tensor, confidence: torch.Tensor | None = None) -> torch.Tensor:
    """Which positions one EB step commits: [B, n] bool.

    Per row, the ``candidates`` sorted by ``entropy`` (ascending, stable) -- or, given ``confidence``, by it
    (descending, stable) -- and the largest prefix with ``sum H - max H <= gamma`` taken; at least one position when
    the row has a candidate, at most ``limit`` (the temporal-pruning budget left; 0 commits nothing). Adding a
    position to a prefix never lowers ``sum H - max H`` (with h <= max it grows by h, else it becomes the old sum),
    so in any order the accepted positions are a prefix and the count is how many prefixes pass. In entropy order
    the prefix ending at j has max H = H_j, and ``sum H - max H`` is the sum of the entropies before j. No host sync.

    Args:
        entropy: [B, n] float predictive entropies (>= 0; rounding below 0 is clamped).
        candidates: [B, n] bool; gamma: [B] float thresholds; limit: [B] int64 most commits per row.
        confidence: [B, n] float, the order (highest first); None orders by entropy.
    """
    h = entropy.float().clamp(min=0.0).masked_fill(~candidates, math.inf)
    if confidence is None:
        order = h.argsort(dim=1, stable=True)
    else:
        order = confidence.float().masked_fill(~candidates, -math.inf).argsort(dim=1, descending=True, stable=True)
    sorted_h = h.gather(1, order)
    finite = torch.isfinite(sorted_h)
    vals = torch.where(finite, sorted_h, torch.zeros_like(sorted_h))
    if confidence is None:
        before = vals.cumsum(1) - vals  # sum of the smaller entropies before each sorted position
    else:
        before = vals.cumsum(1) - vals.cummax(1).values  # sum - max of each prefix
    count = ((before <= gamma[:, None].float()) & finite).sum(1)
    count = torch.minimum(count.clamp(min=1) * candidates.any(1), limit.long())
    positions = torch.arange(h.shape[1], device=h.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(1, order, positions)
    return (rank < count[:, None]) & candidates


@dataclass
class EntropyBound(Decoder):
    """EB decoding with threshold ``gamma`` (a float >= 0 or a [B] tensor of them)."""

    gamma: float | torch.Tensor = 0.1

    name = "entropy_bound"
    order: ClassVar[str] = "entropy"  # the sort: "entropy" (lowest first) or "confidence" (highest first)
    pace = "free"
    fills = True
    needs_entropy = True

    def check(self, fn):
        g = self.gamma
        if isinstance(g, torch.Tensor):
            return  # shape and range checked in bind, against the batch
        if isinstance(g, bool) or not isinstance(g, (int, float)) or not (math.isfinite(g) and g >= 0):
            raise ValueError(f"{fn}: entropy_bound={g!r}; allowed: a finite number >= 0, a [B] tensor of them, or "
                             f"None (off)")

    def bind(self, batch, device):
        """gamma as a float32 [B] tensor on ``device``; a tensor is range-checked with one host sync per call."""
        g = self.gamma
        if isinstance(g, torch.Tensor):
            if tuple(g.shape) not in ((batch,), ()):
                raise ValueError(f"{_FN}: entropy_bound tensor has shape {tuple(g.shape)}; allowed: [B={batch}] "
                                 f"(one gamma per sample) or a scalar")
            gamma = g.to(device=device, dtype=torch.float32).expand(batch).contiguous()
            if not bool((torch.isfinite(gamma) & (gamma >= 0)).all()):
                raise ValueError(f"{_FN}: entropy_bound holds values outside [0, inf) (min {gamma.min().item()!r}); "
                                 f"allowed: finite numbers >= 0")
        else:
            gamma = torch.full((batch,), float(g), dtype=torch.float32, device=device)
        return _Bound(gamma) if self.order == "entropy" else _BoundByConfidence(gamma)

    def scores(self, x0, confidence, entropy, *, seed, step, row_ids):
        return entropy  # EB ranks by entropy (ascending) in commit

    def commit(self, s: Step):
        raise RuntimeError("EntropyBound.commit: bind() the rule to a batch first")


@dataclass
class _Bound(EntropyBound):
    def bind(self, batch, device):
        return self

    def commit(self, s: Step):
        gamma = self.gamma if s.rows is None else self.gamma.index_select(0, s.rows)
        return entropy_bounded_commit(s.score, s.candidates, gamma, s.limit)


@dataclass
class _BoundByConfidence(_Bound):
    """The confidence-ordered rule bound to a batch: ``scores`` keeps this step's entropies for ``commit`` (the loop
    hands ``commit`` one score, the confidence; ``draw`` and ``commit`` of a step run back to back)."""

    _entropy: torch.Tensor | None = field(default=None, repr=False)

    def scores(self, x0, confidence, entropy, *, seed, step, row_ids):
        self._entropy = entropy
        return confidence

    def commit(self, s: Step):
        gamma = self.gamma if s.rows is None else self.gamma.index_select(0, s.rows)
        entropy = self._entropy.view_as(s.score)
        return entropy_bounded_commit(entropy, s.candidates, gamma, s.limit, confidence=s.score)


DECODER = EntropyBound
