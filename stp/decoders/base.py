"""The decoder interface: which masked positions a step commits, from that step's draw.

The rollout loop (``stp.sampler.generate``) owns what every rule shares: the canvas, the blocks, the anchors of a
prior, temporal pruning (the budget), the KV caches, the trajectory record, the one-shot fill. A decoder owns only
the rule: how a step scores the positions it drew (``draw``) and which of them it commits (``commit``).

Two paces of the loop, chosen by the decoder's ``pace``:

- ``"schedule"``: LLaDA's blocks, ``steps // num_blocks`` steps per block, every sample in the same block. The loop
  gives each step LLaDA's linear-schedule count ``Step.k``. A decoder with ``fixed_counts = True`` commits exactly
  that many (the loop then caps the table at the budget before the first pass: no host synchronisation in the
  loop); otherwise its counts follow the canvas and the loop synchronises once per step to skip finished blocks.
- ``"free"``: each sample decodes its own current block (the first block holding a [MASK]) until the block has no
  [MASK] left; the number of steps follows the decoder's commits (at most ``gen_length``, then the one-shot fill).
  The candidates ``Step.candidates`` are the masked positions of each sample's current block.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from stp_kernels import sample_step

__all__ = ["Decoder", "Draw", "Step", "top_k_commit"]


@dataclass
class Draw:
    """What a decoder's ``draw`` needs besides the hidden states (fixed for the whole call)."""

    weight: torch.Tensor  # [V, H] LM head
    seed: int
    temperature: float
    vocab: torch.Tensor | None  # sorted token ids of a vocabulary prior (None = all)
    backend: str | None
    record_logprobs: bool


@dataclass
class Step:
    """One step's draw over ``n`` candidate positions of ``B`` rows, as the loop hands it to ``commit``."""

    x0: torch.Tensor  # [B, n] int64 drawn tokens
    score: torch.Tensor  # [B, n] float32 the decoder's score (``draw``), -inf at positions not still masked
    still: torch.Tensor  # [B, n] bool: still [MASK]
    candidates: torch.Tensor  # [B, n] bool: positions this step may commit (still masked, in the row's block)
    k: torch.Tensor  # [B] int64 LLaDA's schedule count of this step (with fixed_counts: capped at the budget)
    limit: torch.Tensor  # [B] int64 most commits this step: budget left, 0 for a finished row
    step_in_block: int  # 0-based step within the block (schedule pace)
    steps_per_block: int
    rows: torch.Tensor | None  # [B] int64 indices of these rows in the caller's batch (None: the whole batch)


def top_k_commit(score: torch.Tensor, still: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """[B, n] bool: per row the ``k`` highest ``score`` positions that are ``still`` masked (stable: ties to the
    earlier position). No Python loop, no host sync."""
    order = score.argsort(dim=1, descending=True, stable=True)
    idx = torch.arange(score.shape[1], device=score.device)
    rank = torch.empty_like(order).scatter_(1, order, idx.expand(score.shape[0], -1))
    return (rank < k[:, None]) & still


class Decoder:
    """A decoding rule. Subclasses set ``name`` (the ``--rollout.decoder`` value) and implement ``commit``."""

    name: ClassVar[str] = ""
    pace: ClassVar[str] = "schedule"  # "schedule" or "free" (module docstring)
    fixed_counts: ClassVar[bool] = False  # schedule pace: commits exactly Step.k (counts known up front)
    fills: ClassVar[bool] = False  # positions may be left masked without temporal pruning: one-shot fill them
    needs_entropy: ClassVar[bool] = False  # draw asks sample_step for the predictive entropy too

    def check(self, fn: str) -> None:
        """Raise ValueError naming the setting, its value and what is allowed."""

    def bind(self, batch: int, device: torch.device) -> "Decoder":
        """Per-call preparation (e.g. per-sample settings as [B] tensors on ``device``); returns the bound rule."""
        return self

    def scores(self, x0: torch.Tensor, confidence: torch.Tensor, entropy: torch.Tensor | None, *, seed: int,
               step: int, row_ids: torch.Tensor) -> torch.Tensor:
        """The score that ranks positions (higher commits first), [R]; default: the confidence softmax(z)[x0]."""
        return confidence

    def draw(self, h: torch.Tensor, ctx: Draw, *, step: int, row_ids: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """x0 [R], score [R] and (with ``ctx.record_logprobs``) the behaviour log-prob [R] for hidden states [R, H].
        Default: ``stp_kernels.sample_step`` (Gumbel-max over the counter noise) and ``scores``."""
        out = sample_step(h, ctx.weight, seed=ctx.seed, step=step, row_ids=row_ids, temperature=ctx.temperature,
                          vocab=ctx.vocab, backend=ctx.backend, check_inputs=False, return_entropy=self.needs_entropy,
                          return_tempered_logp=ctx.record_logprobs)
        x0 = out[0]
        score = self.scores(x0, out[1], out[2] if self.needs_entropy else None, seed=ctx.seed, step=step,
                            row_ids=row_ids)
        lp = out[-1] if ctx.record_logprobs else None  # the draw's tempered log-prob, from the sampling pass
        return x0, score, lp

    def commit(self, s: Step) -> torch.Tensor:
        """[B, n] bool: the positions to commit (a subset of ``s.candidates``, at most ``s.limit`` per row)."""
        raise NotImplementedError


NEG_INF = -math.inf
