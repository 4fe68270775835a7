"""Dream's decoding (``diffusion_generate``): Dream's schedule per block and its origin / maskgit_plus /
topk_margin / entropy scores with top_k / top_p (``stp.decoding`` has the scores and counts, and what differs from
Dream's code)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from stp import decoding

from .base import Decoder, Step, top_k_commit


@dataclass
class Dream(Decoder):
    """Dream's ``diffusion_generate`` rule; ``options`` are Dream's arguments (``stp.decoding.DreamDecoding``)."""

    options: decoding.DreamDecoding = decoding.DreamDecoding()

    name = "dream"

    def check(self, fn):
        if not isinstance(self.options, decoding.DreamDecoding):
            raise ValueError(f"{fn}: dream must be a stp.decoding.DreamDecoding or None, got "
                             f"{type(self.options).__name__}")
        self.options.check(fn)

    def draw(self, h, ctx, *, step, row_ids):
        x0, conf, lp = decoding.dream_sample(h, ctx.weight, self.options, temperature=ctx.temperature, seed=ctx.seed,
                                             step=step, row_ids=row_ids, vocab=ctx.vocab)
        return x0, conf, (lp if ctx.record_logprobs else None)

    def commit(self, s: Step):
        timesteps = decoding.dream_timesteps(s.steps_per_block, self.options.eps, s.still.device)
        kd = decoding.dream_commit_counts(self.options, s.still, s.score, timesteps, s.step_in_block)
        return top_k_commit(s.score, s.still, torch.minimum(kd, s.limit))


DECODER = Dream
