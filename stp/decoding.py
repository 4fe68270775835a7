"""Dream's decoding (``diffusion_generate`` of Dream-v0-Base/Instruct-7B) as an option of ``stp.sampler.generate``.

``stp.sampler.generate`` decodes as LLaDA by default. With ``dream=DreamDecoding(...)`` it decodes as Dream's own
``diffusion_generate`` instead, through two hooks: how to score each masked position (:func:`dream_sample`) and how
many positions to commit at a step (:func:`dream_commit_counts`). What Dream does, and what this module does:

Schedule. Dream takes ``steps`` steps over ``timesteps = linspace(1, eps, steps + 1)`` (float32, ``eps`` = 1e-3) and
at step i (t = timesteps[i], s = timesteps[i + 1]) commits ``int(M * (1 - s / t))`` tokens, where M is the number of
masked positions, and every remaining one (``int(M)``) at the last step. The counts follow the canvas as it is
decoded, not a table fixed up front. With ``block_length < gen_length`` the same schedule runs within each block over
``steps_per_block`` steps and M counts the masked positions up to the end of the block; with one block (Dream's own
setting) it is Dream's schedule exactly.

M per row. Dream's code uses the batch's average masked count ``mask_index.sum() / B`` for every row. In Dream's
own use every row has the same count (same canvas length, no anchors), so the average is each row's count; here M
is each row's own count, the same number in that case, while a sample then decodes the same in any batch and a row
with fewer masked positions than the average (anchors of a prior, a finished sample under temporal pruning) is
never asked for more tokens than it has: where Dream's ``topk`` would then pick unmasked positions and overwrite
them with [MASK], this module commits only masked positions.

Scores. Logits (the model's dtype, then float32) are divided by the temperature when it is > 0, filtered by
``top_p`` (nucleus: the smallest set of most probable tokens whose probability passes top_p; the first token is
always kept) and then ``top_k`` (tokens below the k-th largest logit removed), and turned into probabilities p over
the remaining tokens. x0 = argmax p at temperature 0 (ties to the lowest id), else a draw from p by Gumbel-max with
the counter noise of ``stp_kernels`` (seed, step, sample, position, token), so no global RNG is used. The
confidence that ranks positions (highest committed first; ties to the earlier position, where Dream's ``topk``
leaves the order unspecified):

- ``maskgit_plus``: p(x0);
- ``topk_margin``: p(top 1) - p(top 2);
- ``entropy``: sum_v p_v log(p_v + 1e-10), the negative entropy (Dream-Instruct's recommended algorithm);
- ``origin``: no ranking: each masked position is committed independently with probability ``1 - s / t`` (all at
  the last step); Dream draws ``torch.rand``, this module a counter uniform u per (seed, step, sample, position).
  The score returned is -u and the commit count the number of masked positions with u < 1 - s / t, so committing
  the top-scoring positions commits exactly those. ``origin`` draws its positions at random even at temperature 0,
  so it equals Dream's ``diffusion_generate`` token for token only given Dream's draws (the same uniforms, as
  tests/test_dream_decoding.py feeds both); a run of Dream's own code draws other positions and decodes otherwise.

A position whose committed x0 is [MASK] itself (only an untrained model predicts it) stays masked, is not counted
as decoded and is decoded again at the next step, as in Dream's code (which recounts the masked positions).

Not offered: ``alg_temp`` > 0 (Dream's random choice of positions weighted by confidence; Dream's default is 0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from stp_kernels.reference import counter_gumbel, counter_uniform, row_keys

__all__ = ["DREAM_ALGORITHMS", "DreamDecoding", "dream_timesteps", "dream_sample", "dream_commit_counts"]

DREAM_ALGORITHMS = ("origin", "maskgit_plus", "topk_margin", "entropy")
_ORIGIN_SALT = 0x0D1E5A  # counter seed offset of origin's per-position uniforms (distinct from every other draw)
_ROW_CHUNK = 512  # rows of [rows, vocab] logits materialised at once


@dataclass(frozen=True)
class DreamDecoding:
    """Dream's decoding options (Dream's ``diffusion_generate`` arguments of the same names)."""

    alg: str = "entropy"  # origin, maskgit_plus, topk_margin or entropy (Dream-Instruct recommends entropy)
    top_k: int | None = None  # confidence and sampling over the k largest logits only (None = all)
    top_p: float | None = None  # nucleus filter in (0, 1] applied before top_k (None or 1 = off)
    eps: float = 1e-3  # the schedule's final timestep: timesteps = linspace(1, eps, steps + 1)

    def check(self, fn: str) -> None:
        """Raise ValueError naming the field, its value and what is allowed."""
        if self.alg not in DREAM_ALGORITHMS:
            raise ValueError(f"{fn}: dream.alg={self.alg!r}; allowed: {', '.join(DREAM_ALGORITHMS)}")
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int)
                                       or self.top_k < 1):
            raise ValueError(f"{fn}: dream.top_k={self.top_k!r}; allowed: None or an integer >= 1")
        if self.top_p is not None and (isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float))
                                       or not 0 < self.top_p <= 1):
            raise ValueError(f"{fn}: dream.top_p={self.top_p!r}; allowed: None or a number in (0, 1]")
        if isinstance(self.eps, bool) or not isinstance(self.eps, (int, float)) or not 0 < self.eps < 1:
            raise ValueError(f"{fn}: dream.eps={self.eps!r}; allowed: a number in (0, 1)")


def dream_timesteps(steps: int, eps: float, device: torch.device | str) -> torch.Tensor:
    """[steps + 1] float32 ``linspace(1, eps, steps + 1)`` on ``device`` (computed where Dream computes it, so the
    counts ``int(M * (1 - s / t))`` round exactly as Dream's do)."""
    return torch.linspace(1, eps, steps + 1, device=device)


def _filter(logits: torch.Tensor, top_p: float | None, top_k: int | None) -> torch.Tensor:
    """Dream's nucleus then top-k filters: removed logits become -inf."""
    if top_p is not None and top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        drop = cum > top_p
        drop[..., 1:] = drop[..., :-1].clone()  # keep the token that crosses top_p
        drop[..., 0] = False
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), -math.inf)
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    return logits


def dream_sample(hidden: torch.Tensor, weight: torch.Tensor, cfg: DreamDecoding, *, temperature: float, seed: int,
                 step: int, row_ids: torch.Tensor, vocab: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x0 [R] int64, confidence [R] float32 (module docstring) and the behaviour log-prob [R] float32 of x0 under
    the distribution it was drawn from (temperature, top_p / top_k filtering and ``vocab`` applied; 0 at T = 0,
    where the draw is deterministic, as in ``stp.sampler``'s trajectory record) for hidden states [R, H] and LM head
    [V, H].

    ``row_ids`` [R]: counter identities of the rows (sample id * gen_length + canvas position), as for
    ``stp_kernels.sample_step``; ``vocab``: sorted token ids allowed (None = all). [rows, V] logits are
    materialised, ``_ROW_CHUNK`` rows at a time (Dream's own code materialises them for the whole sequence)."""
    x0_parts, conf_parts, logp_parts = [], [], []
    allowed = None
    if vocab is not None:
        allowed = torch.zeros(weight.shape[0], dtype=torch.bool, device=weight.device)
        allowed[vocab] = True
    token_ids = torch.arange(weight.shape[0], device=weight.device)
    for lo in range(0, hidden.shape[0], _ROW_CHUNK):
        h, rid = hidden[lo:lo + _ROW_CHUNK], row_ids[lo:lo + _ROW_CHUNK]
        logits = F.linear(h, weight).float()
        if allowed is not None:
            logits = logits.masked_fill(~allowed, -math.inf)
        if temperature > 0:
            logits = logits / temperature
        logits = _filter(logits, cfg.top_p, cfg.top_k)
        probs = torch.softmax(logits, dim=-1)
        if temperature > 0:
            x0 = (logits + counter_gumbel(seed, step, rid, token_ids)).argmax(-1)
        else:
            x0 = probs.argmax(-1)
        if cfg.alg == "maskgit_plus":
            conf = probs.gather(-1, x0[:, None])[:, 0]
        elif cfg.alg == "topk_margin":
            top2 = probs.topk(2, dim=-1).values
            conf = top2[:, 0] - top2[:, 1]
        elif cfg.alg == "entropy":
            conf = (probs * torch.log(probs + 1e-10)).sum(-1)
        else:  # origin: -u, so that the positions with the smallest u rank first
            keys = row_keys(seed ^ _ORIGIN_SALT, step, rid)
            conf = -counter_uniform(keys, torch.zeros(1, dtype=torch.long, device=rid.device))[:, 0]
        x0_parts.append(x0)
        conf_parts.append(conf.float())
        logp_parts.append(torch.log_softmax(logits, -1).gather(-1, x0[:, None])[:, 0] if temperature > 0
                          else torch.zeros_like(conf, dtype=torch.float32))
    return torch.cat(x0_parts), torch.cat(conf_parts), torch.cat(logp_parts)


def dream_commit_counts(cfg: DreamDecoding, still: torch.Tensor, conf: torch.Tensor, timesteps: torch.Tensor,
                        i: int) -> torch.Tensor:
    """[B] tokens to commit at step ``i`` of ``len(timesteps) - 1`` (module docstring), from ``still`` [B, n] (the
    positions still masked) and, for ``origin``, the scores -u of :func:`dream_sample` ([B, n])."""
    last = i == timesteps.shape[0] - 2
    t, s = timesteps[i], timesteps[i + 1]
    if cfg.alg == "origin":
        if last:
            return still.sum(1)
        return (still & (-conf < 1 - s / t)).sum(1)
    masked = still.sum(1)
    if last:
        return masked
    return (masked.float() * (1 - s / t)).long()
