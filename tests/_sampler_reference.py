"""Frozen copy of stp/sampler.py before decoders became plug-ins (stp.decoders): the reference loop that
tests/test_decoders.py compares the plug-in loop against, token for token. Not to be edited (it includes the one
change that landed beside the refactor: behaviour log-probs from sample_step's sampling pass, not a second pass)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from stp import decoding
from stp_kernels import _validate, sample_step
from stp_kernels.reference import counter_uniform, row_keys

__all__ = ["Prior", "GenerationOutput", "generate", "transfer_schedule", "behaviour_logprob", "entropy_bounded_commit",
           "ANCHOR", "CACHE_MODES"]

ANCHOR = -1  # trace value of anchor positions (never decoded)
_FILL_STEP = 0x7FFFFFFF  # noise counter of the one-shot fill, distinct from every regular step
_RANDOM_REMASK_SALT = 0x5EED0F


@dataclass
class Prior:
    """Static-prior anchors for a batch: ``tokens`` [B, L'] token ids and ``mask`` [B, L'] bool (True = anchor),
    L' <= gen_length; positions beyond L' start masked."""

    tokens: torch.Tensor
    mask: torch.Tensor


@dataclass
class GenerationOutput:
    """Result of ``generate``. Shapes: B samples, P prompt length (padded), L = gen_length."""

    sequences: torch.Tensor  # [B, P + L] int64: prompt (left-padded as given) then the completion
    completions: torch.Tensor  # [B, L] int64
    nfe: torch.Tensor  # [B] int64: forward passes whose output this sample used (steps until done + the fill)
    one_shot: torch.Tensor  # [B, L] bool: positions filled by the one-shot step of temporal pruning
    num_one_shot: torch.Tensor  # [B] int64
    anchors_kept: torch.Tensor  # [B] int64: anchors placed (all are kept unchanged)
    trace: torch.Tensor  # [B, L] int64: forward-pass index that committed each position; ANCHOR (-1) for anchors
    forward_passes: int  # forward passes the batch ran (the maximum of nfe)
    commit_step: torch.Tensor | None = None  # [B, L] int64: 1-based pass that committed each position, 0 = anchor
    behaviour_logprobs: torch.Tensor | None = None  # [B, L] float32 (record_logprobs=True): log-prob of each token
    # under the distribution it was drawn from (temperature and vocabulary prior applied; 0 at T = 0 and anchors)


# Rows of logits materialised at once by behaviour_logprob (float32: 64 MiB).
_LOGPROB_CHUNK_ELEMENTS = 1 << 24


def behaviour_logprob(hidden: torch.Tensor, weight: torch.Tensor, tokens: torch.Tensor, temperature: float,
                      vocab: torch.Tensor | None = None) -> torch.Tensor:
    """log softmax(hidden @ weight[vocab].T / T)[token] per row, float32 [R] (0 at T = 0: the greedy draw is
    deterministic). Computed in row chunks of at most ``_LOGPROB_CHUNK_ELEMENTS`` logits, with no host sync: the
    fused ``stp_kernels.masked_logprob`` would avoid the logits but validates its inputs with one sync per call."""
    if temperature == 0:
        return torch.zeros(tokens.shape[0], dtype=torch.float32, device=hidden.device)
    w = weight if vocab is None else weight.index_select(0, vocab)
    slots = tokens if vocab is None else torch.searchsorted(vocab, tokens)
    rows = max(1, _LOGPROB_CHUNK_ELEMENTS // w.shape[0])
    w_t = w.float().T  # [H, V'], cast once per call, not once per row chunk
    out = []
    for i in range(0, hidden.shape[0], rows):
        z = hidden[i:i + rows].float() @ w_t / temperature  # [rows, V']
        out.append(torch.log_softmax(z, dim=-1).gather(1, slots[i:i + rows, None])[:, 0])
    return torch.cat(out)


def transfer_schedule(masked_counts: torch.Tensor, steps: int) -> torch.Tensor:
    """LLaDA's linear schedule: [B] masked counts -> [B, steps] tokens per step (base + 1 for the first remainder)."""
    base = masked_counts // steps
    remainder = masked_counts % steps
    idx = torch.arange(steps, device=masked_counts.device)
    return base[:, None] + (idx[None, :] < remainder[:, None]).long()


def _check_args(prompt_ids, attention_mask, gen_length, block_length, steps, temperature, remasking, prior,
                early_stop, cfg_scale, confidence_threshold, dream=None):
    fn = "stp.sampler.generate"
    if prompt_ids.dim() != 2:
        raise ValueError(f"{fn}: prompt_ids must be [B, P], got shape {tuple(prompt_ids.shape)}")
    if attention_mask is not None and attention_mask.shape != prompt_ids.shape:
        raise ValueError(f"{fn}: attention_mask has shape {tuple(attention_mask.shape)}, prompt_ids "
                         f"{tuple(prompt_ids.shape)}; they must match")
    for name, value in (("gen_length", gen_length), ("block_length", block_length), ("steps", steps)):
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{fn}: {name} must be a positive int, got {value!r}")
    if gen_length % block_length:
        raise ValueError(f"{fn}: gen_length={gen_length} is not divisible by block_length={block_length}")
    num_blocks = gen_length // block_length
    if steps % num_blocks:
        raise ValueError(f"{fn}: steps={steps} is not divisible by the number of blocks "
                         f"(gen_length / block_length = {num_blocks})")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"{fn}: temperature must be a finite number >= 0, got {temperature!r}")
    if remasking not in ("low_confidence", "random"):
        raise ValueError(f"{fn}: remasking={remasking!r}; allowed: 'low_confidence', 'random'")
    if early_stop is not None and not (isinstance(early_stop, (int, float)) and 0 < early_stop <= 1):
        raise ValueError(f"{fn}: early_stop (tau) must be in (0, 1], got {early_stop!r}")
    if cfg_scale < 0:
        raise ValueError(f"{fn}: cfg_scale must be >= 0, got {cfg_scale!r}")
    if confidence_threshold is not None and not 0 < confidence_threshold <= 1:
        raise ValueError(f"{fn}: confidence_threshold must be in (0, 1], got {confidence_threshold!r}")
    if dream is not None:
        if not isinstance(dream, decoding.DreamDecoding):
            raise ValueError(f"{fn}: dream must be a stp.decoding.DreamDecoding or None, got {type(dream).__name__}")
        dream.check(fn)
        if remasking != "low_confidence":
            raise ValueError(f"{fn}: remasking={remasking!r} is LLaDA's option; with dream set, dream.alg chooses "
                             f"the positions (leave remasking='low_confidence')")
        if confidence_threshold is not None:
            raise ValueError(f"{fn}: confidence_threshold={confidence_threshold!r} cannot be combined with dream "
                             f"(Dream's schedule fixes the count per step); allowed with dream: None")
    if prior is not None:
        if prior.tokens.shape != prior.mask.shape or prior.tokens.dim() != 2:
            raise ValueError(f"{fn}: prior.tokens {tuple(prior.tokens.shape)} and prior.mask "
                             f"{tuple(prior.mask.shape)} must both be [B, L'] of the same shape")
        if prior.tokens.shape[0] != prompt_ids.shape[0]:
            raise ValueError(f"{fn}: prior has {prior.tokens.shape[0]} rows, the batch has {prompt_ids.shape[0]}")
        if prior.tokens.shape[1] > gen_length:
            raise ValueError(f"{fn}: the prior covers {prior.tokens.shape[1]} positions, longer than the canvas "
                             f"(gen_length={gen_length})")
    return num_blocks, steps // num_blocks


def _entropy_bound_arg(entropy_bound, prompt_ids, remasking, confidence_threshold, dream) -> torch.Tensor | None:
    """``entropy_bound`` as a float32 [B] tensor on the prompts' device (None stays None), with its rules checked.
    A tensor argument is range-checked with one host sync, once per call."""
    fn = "stp.sampler.generate"
    if entropy_bound is None:
        return None
    for name, value, off in (("dream", dream, None), ("confidence_threshold", confidence_threshold, None),
                             ("remasking", remasking, "low_confidence")):
        if value != off:
            raise ValueError(f"{fn}: entropy_bound cannot be combined with {name}={value!r} (the entropy bound "
                             f"chooses how many and which positions); allowed with entropy_bound: {off!r}")
    batch = prompt_ids.shape[0]
    if isinstance(entropy_bound, torch.Tensor):
        if tuple(entropy_bound.shape) not in ((batch,), ()):
            raise ValueError(f"{fn}: entropy_bound tensor has shape {tuple(entropy_bound.shape)}; allowed: [B={batch}] "
                             f"(one gamma per sample) or a scalar")
        gamma = entropy_bound.to(device=prompt_ids.device, dtype=torch.float32).expand(batch).contiguous()
        if not bool((torch.isfinite(gamma) & (gamma >= 0)).all()):
            raise ValueError(f"{fn}: entropy_bound holds values outside [0, inf) (min {gamma.min().item()!r}); "
                             f"allowed: finite numbers >= 0")
        return gamma
    if isinstance(entropy_bound, bool) or not isinstance(entropy_bound, (int, float)) or not (
            math.isfinite(entropy_bound) and entropy_bound >= 0):
        raise ValueError(f"{fn}: entropy_bound={entropy_bound!r}; allowed: a finite number >= 0, a [B] tensor of "
                         f"them, or None (off)")
    return torch.full((batch,), float(entropy_bound), dtype=torch.float32, device=prompt_ids.device)


def entropy_bounded_commit(entropy: torch.Tensor, candidates: torch.Tensor, gamma: torch.Tensor,
                           limit: torch.Tensor) -> torch.Tensor:
    """Which positions one EB step commits: [B, n] bool.

    Per row, the ``candidates`` sorted by ``entropy`` (ascending, stable) and the largest prefix with
    ``sum H - max H <= gamma`` taken; at least one position when the row has a candidate, at most ``limit`` (the
    temporal-pruning budget left; 0 commits nothing). In ascending order the prefix ending at j has max H = H_j, so
    ``sum H - max H`` is the sum of the entropies before j: non-decreasing in j, hence the accepted positions are a
    prefix and the count is how many of these exclusive sums are <= gamma. No host sync.

    Args:
        entropy: [B, n] float predictive entropies (>= 0; rounding below 0 is clamped).
        candidates: [B, n] bool; gamma: [B] float thresholds; limit: [B] int64 most commits per row.
    """
    h = entropy.float().clamp(min=0.0).masked_fill(~candidates, math.inf)
    order = h.argsort(dim=1, stable=True)
    sorted_h = h.gather(1, order)
    finite = torch.isfinite(sorted_h)
    vals = torch.where(finite, sorted_h, torch.zeros_like(sorted_h))
    before = vals.cumsum(1) - vals  # sum of the smaller entropies before each sorted position
    count = ((before <= gamma[:, None].float()) & finite).sum(1)
    count = torch.minimum(count.clamp(min=1) * candidates.any(1), limit.long())
    positions = torch.arange(h.shape[1], device=h.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(1, order, positions)
    return (rank < count[:, None]) & candidates
CACHE_MODES = ("none", "prefix", "dual")


class _StepForward:
    """How each step's final hidden states are computed: the cache mode and classifier-free guidance.

    ``none``: every step runs the whole sequence. ``prefix`` / ``dual`` (block KV caching, ``stp.models.kv_cache``):
    the first step the sampler runs in a block is a full forward that also fills the cache (its candidates are every
    canvas position up to the block's end, as without a cache); each later step of the block runs only the block and
    everything after it (``prefix``: the prompt and the finished blocks come from the cache) or only the block
    (``dual``: the masked suffix, anchors included, comes from the cache too), and its candidates are the block's
    positions alone. A position of an earlier block left masked (x0 was [MASK] itself: only an untrained model) is
    therefore a candidate again only at the next block's first step. Each step is one forward pass whatever its
    length: NFE counts are those of ``none``. Nothing here reads a device value (no host synchronisation).
    """

    def __init__(self, model, x: torch.Tensor, attn: torch.Tensor | None, uncond: torch.Tensor | None, *, plen: int,
                 block_length: int, steps_per_block: int, cache: str, cfg_scale: float) -> None:
        fn = "stp.sampler.generate"
        if cache not in CACHE_MODES:
            raise ValueError(f"{fn}: cache={cache!r}; allowed: {', '.join(map(repr, CACHE_MODES))}")
        if cache != "none" and not callable(getattr(model, "new_kv_cache", None)):
            raise ValueError(f"{fn}: cache={cache!r} needs a model with a block KV cache (stp.models.DiffusionLM's "
                             f"new_kv_cache / backbone(kv_cache=, window=)); {type(model).__name__} has none: use "
                             f"cache='none'")
        self.model, self.x, self.attn, self.uncond = model, x, attn, uncond
        self.plen, self.block_length, self.steps_per_block = plen, block_length, steps_per_block
        self.cache, self.cfg_scale = cache, cfg_scale
        self.canvas_idx = torch.arange(x.shape[1] - plen, device=x.device)
        self.kv = self.kv_uncond = None
        if cache != "none":
            self.kv = model.new_kv_cache()
            self.kv_uncond = model.new_kv_cache() if cfg_scale > 0 else None
        self.filled_block = -1  # the block whose first step filled the cache

    def _cached(self, block: int) -> bool:
        return self.cache != "none" and block == self.filled_block

    def positions(self, lo: int, hi: int) -> torch.Tensor:
        """Canvas positions whose tokens the step computes (its commit candidates) when the batch's samples are in
        blocks ``lo..hi`` (the schedule: one block, ``lo == hi``; the entropy-bounded sampler: each sample at its
        own pace)."""
        end = (hi + 1) * self.block_length
        return self.canvas_idx[lo * self.block_length:end] if self._cached(lo) else self.canvas_idx[:end]

    def _run(self, x: torch.Tensor, kv, canvas_pos: torch.Tensor, window: tuple[int, int] | None) -> torch.Tensor:
        batch = x.shape[0]
        if window is not None:  # [B, stop - start, H]; the block's rows come first
            h = self.model.backbone(x, self.attn, kv_cache=kv, window=window)[:, :canvas_pos.numel()]
            return h.reshape(batch * canvas_pos.numel(), -1)
        h = self.model.backbone(x, self.attn) if kv is None else self.model.backbone(x, self.attn, kv_cache=kv)
        return h[:, self.plen + canvas_pos].reshape(batch * canvas_pos.numel(), -1)

    def hidden(self, lo: int, hi: int, canvas_pos: torch.Tensor) -> torch.Tensor:
        """Final hidden states [B * len(canvas_pos), H] of ``positions(lo, hi)`` on the current canvas (guidance
        folded in), running the pass the cache mode calls for. The cache is filled when the lowest block ``lo``
        changes: every position before it is then committed in every live sample, and positions after block ``hi``
        are still as at the fill (masked or anchors), so a cached step recomputes blocks ``lo..hi`` (``dual``) or
        everything from ``lo`` on (``prefix``)."""
        window = None
        if self._cached(lo):
            start = self.plen + lo * self.block_length
            stop = self.x.shape[1] if self.cache == "prefix" else self.plen + (hi + 1) * self.block_length
            window = (start, stop)
        elif self.cache != "none":
            self.filled_block = lo  # this full forward fills the cache for the later steps from block lo
        h = self._run(self.x, self.kv, canvas_pos, window)
        if self.cfg_scale > 0:
            # Logits are linear in the hidden state, so guidance on logits equals guidance on hidden states.
            un_x = torch.where(self.uncond, self.model.mask_token_id, self.x)
            un_h = self._run(un_x, self.kv_uncond, canvas_pos, window)
            h = un_h + (self.cfg_scale + 1.0) * (h - un_h)
        return h

    def full(self) -> torch.Tensor:
        """Hidden states of every canvas position from a full forward (the one-shot fill), the cache untouched."""
        h = self._run(self.x, None, self.canvas_idx, None)
        if self.cfg_scale > 0:
            un_x = torch.where(self.uncond, self.model.mask_token_id, self.x)
            un_h = self._run(un_x, None, self.canvas_idx, None)
            h = un_h + (self.cfg_scale + 1.0) * (h - un_h)
        return h


@torch.no_grad()
def generate(
    model,
    prompt_ids: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None = None,
    gen_length: int,
    block_length: int,
    steps: int,
    temperature: float = 0.0,
    remasking: str = "low_confidence",
    prior: Prior | None = None,
    early_stop: float | None = None,
    seed: int | None = None,
    sample_ids: torch.Tensor | None = None,
    cfg_scale: float = 0.0,
    confidence_threshold: float | None = None,
    vocab: torch.Tensor | None = None,
    record_logprobs: bool = False,
    backend: str | None = None,
    dream: decoding.DreamDecoding | None = None,
    entropy_bound: float | torch.Tensor | None = None,
    cache: str = "none",
) -> GenerationOutput:
    """Decode completions for a batch of (left-padded) prompts.

    Args:
        model: a ``stp.models.DiffusionLM`` (``backbone``, ``lm_head_weight``, ``mask_token_id``).
        prompt_ids: [B, P] int64, left-padded; attention_mask: [B, P] (1 = real token) or None (no padding).
        gen_length, block_length, steps: canvas length, block size, total denoising steps (LLaDA's meaning).
        temperature: Gumbel-max temperature (0 = greedy). remasking: "low_confidence" or "random".
        prior: anchors (spatial pruning). early_stop: tau of temporal pruning (None = off).
        seed: noise seed (None: drawn from torch's default generator). sample_ids: [B] stable ids for the noise
            counter (default 0..B-1); the same (seed, sample id) decodes the same way in any batch.
        cfg_scale: classifier-free guidance (0 = off); the unconditional pass masks the prompt.
        confidence_threshold: beyond the paper (off by default): also commit every masked position of the block
            whose confidence exceeds it (the schedule's k is a floor, the budget still applies).
        vocab: sorted token ids of a vocabulary prior for sampling (None = full vocabulary).
        record_logprobs: also record the behaviour log-prob of every committed token (one more LM-head pass per
            step, see ``behaviour_logprob``); the commit steps are always recorded.
        backend: ``stp_kernels`` backend for ``sample_step``.
        dream: decode as Dream's ``diffusion_generate`` (``stp.decoding``: Dream's schedule per block and its
            origin / maskgit_plus / topk_margin / entropy scores, with top_k / top_p) instead of LLaDA's
            low-confidence remasking; with ``block_length == gen_length`` it is Dream's own setting.
        entropy_bound: gamma of the entropy-bounded sampler (module docstring): a float >= 0 or a [B] tensor of
            them; None = off (LLaDA's schedule). ``steps`` is then unused; not combinable with ``dream``,
            ``confidence_threshold`` or ``remasking="random"``.
        cache: block KV caching (Fast-dLLM's approximation; ``_StepForward`` gives the passes): "none" (every step
            runs the whole sequence), "prefix" (keys/values of the prompt and finished blocks computed at the block's
            first step and reused for its other steps, which run the block and the suffix) or "dual" (the masked
            suffix cached too: the other steps run the block alone). Works with every option above, the
            entropy bound included (its samples may be in different blocks: a cached step then runs blocks from the
            lowest to the furthest, see ``_StepForward.hidden``); the cached keys/values are exact only for a
            one-layer model or one step per block, elsewhere close (measured in benchmarks/RESULTS.md).
    """
    num_blocks, steps_per_block = _check_args(prompt_ids, attention_mask, gen_length, block_length, steps,
                                              temperature, remasking, prior, early_stop, cfg_scale,
                                              confidence_threshold, dream)
    gamma = _entropy_bound_arg(entropy_bound, prompt_ids, remasking, confidence_threshold, dream)
    eb = gamma is not None
    device = prompt_ids.device
    batch, plen = prompt_ids.shape
    total = plen + gen_length
    mask_id = int(model.mask_token_id)
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())
    if sample_ids is None:
        sample_ids = torch.arange(batch, device=device)
    sample_ids = sample_ids.to(device=device, dtype=torch.long)
    weight = model.lm_head_weight
    if vocab is not None:  # checked once here: sample_step then skips its per-call (host-syncing) range checks
        checks = _validate.Checks("stp.sampler.generate")
        vocab = _validate.vocab_arg("stp.sampler.generate", vocab, weight.shape[0], device, checks)
        checks.run()

    # ---- canvas: prompt, then [MASK] with anchors in place
    x = torch.full((batch, total), mask_id, dtype=torch.long, device=device)
    x[:, :plen] = prompt_ids
    anchor = torch.zeros(batch, gen_length, dtype=torch.bool, device=device)
    if prior is not None:
        lp = prior.tokens.shape[1]
        anchor[:, :lp] = prior.mask.to(device=device, dtype=torch.bool)
        canvas = x[:, plen:plen + lp]
        x[:, plen:plen + lp] = torch.where(anchor[:, :lp], prior.tokens.to(device), canvas)
    # Without padding the model gets no mask at all (sdpa's fastest path); with padding, [B, P + L] key mask.
    attn = None
    prompt_real = torch.ones(batch, plen, dtype=torch.bool, device=device)
    if attention_mask is not None:
        attn = torch.ones(batch, total, dtype=torch.long, device=device)
        attn[:, :plen] = attention_mask.to(device=device, dtype=torch.long)
        prompt_real = attn[:, :plen].bool()

    # ---- the schedule, fixed up front: transfers per (sample, global step), cut at the early-stop budget
    masked_per_block = (~anchor).view(batch, num_blocks, block_length).sum(-1)  # [B, nb]
    k_sched = transfer_schedule(masked_per_block.reshape(-1), steps_per_block).view(batch, -1)  # [B, steps]
    anchors_kept = anchor.sum(1)
    budget = math.floor(early_stop * gen_length) if early_stop is not None else gen_length
    filled_before = anchors_kept[:, None] + k_sched.cumsum(1) - k_sched  # filled positions before each step
    k_budget = (budget - filled_before).clamp(min=0).minimum(k_sched)
    # Done after the first step whose transfers reach the budget (with no early stop: after the last step).
    reached = filled_before + k_budget >= budget
    total_steps = k_sched.shape[1]
    done_step = torch.where(reached.any(1), reached.long().argmax(1), torch.full_like(anchors_kept, total_steps - 1))
    last_step = int(done_step.max().item()) if early_stop is not None else total_steps - 1  # the one sync
    active = torch.arange(total_steps, device=device)[None, :] <= done_step[:, None]  # [B, steps]

    trace = torch.full((batch, gen_length), ANCHOR, dtype=torch.long, device=device)
    nfe = torch.zeros(batch, dtype=torch.long, device=device)
    one_shot = torch.zeros(batch, gen_length, dtype=torch.bool, device=device)
    filled = anchors_kept.clone()
    canvas_idx = torch.arange(gen_length, device=device)

    uncond = torch.cat([prompt_real, torch.zeros_like(anchor)], 1) if cfg_scale > 0 else None  # masked by CFG
    forward = _StepForward(model, x, attn, uncond, plen=plen, block_length=block_length,
                           steps_per_block=steps_per_block, cache=cache, cfg_scale=cfg_scale)

    logprobs = torch.zeros(batch, gen_length, dtype=torch.float32, device=device) if record_logprobs else None

    def sample(h: torch.Tensor, canvas_pos: torch.Tensor, step: int):
        row_ids = (sample_ids[:, None] * gen_length + canvas_pos[None, :]).reshape(-1)
        if dream is not None:  # hook: Dream's scores (stp.decoding)
            x0, conf, lp = decoding.dream_sample(h, weight, dream, temperature=temperature, seed=seed, step=step,
                                                 row_ids=row_ids, vocab=vocab)
            n = canvas_pos.numel()
            return x0.view(batch, n), conf.view(batch, n), (lp.view(batch, n) if record_logprobs else None)
        out = sample_step(h, weight, seed=seed, step=step, row_ids=row_ids, temperature=temperature, vocab=vocab,
                          backend=backend, check_inputs=False, return_entropy=eb,
                          return_tempered_logp=record_logprobs)
        x0, conf = out[0], out[1]
        if eb:  # the entropy rides in the confidence slot's place: EB ranks by it (see the loop)
            conf = out[2]
        if remasking == "random":
            keys = row_keys(seed ^ _RANDOM_REMASK_SALT, step, row_ids)
            conf = counter_uniform(keys, torch.zeros(1, dtype=torch.long, device=device))[:, 0]
        n = canvas_pos.numel()
        lp = out[-1].view(batch, n) if record_logprobs else None  # from the sampling pass, no second one
        return x0.view(batch, n), conf.view(batch, n), lp

    data_dependent = confidence_threshold is not None or dream is not None  # counts follow the canvas: no table
    timesteps = decoding.dream_timesteps(steps_per_block, dream.eps, device) if dream is not None else None
    forward_passes = 0
    for step in range(gen_length if eb else total_steps):
        # Candidates: every canvas position up to the end of this step's block. Positions of earlier blocks are all
        # committed, except where x0 was [MASK] itself (possible for an untrained model): as in LLaDA's algorithm,
        # such a position stays masked and competes again. Fixed shapes: no host sync.
        lo = hi = step // steps_per_block
        if eb:  # each sample's current block = its first block with a masked position; the one sync of the step
            masked_now = x[:, plen:] == mask_id  # [B, L]
            live = (filled < budget) & masked_now.any(1)
            block_of = masked_now.int().argmax(1) // block_length  # [B]
            any_live, hi, lo = torch.stack([live.any().long(), (block_of * live).max(),
                                            torch.where(live, block_of, num_blocks).min()]).tolist()
            if not any_live:
                break
        canvas_pos = forward.positions(lo, hi)  # with a filled KV cache: the blocks lo..hi only
        if not (eb or data_dependent):
            if step > last_step:
                break
            live, kk = active[:, step], k_budget[:, step]
        elif not eb:  # data-dependent transfers: one sync per step to skip finished blocks and stop when all are done
            live = filled < budget
            if not bool(((x[:, plen + canvas_pos] == mask_id).any(1) & live).any()):
                continue
        x0, conf, lp = sample(forward.hidden(lo, hi, canvas_pos), canvas_pos, step)
        still = x[:, plen + canvas_pos] == mask_id  # [B, block]
        conf = torch.where(still, conf, torch.full_like(conf, -math.inf))
        if confidence_threshold is not None:
            above = (still & (conf > confidence_threshold)).sum(1)
            kk = torch.minimum(torch.maximum(k_sched[:, step], above), budget - filled) * live
        elif dream is not None:  # hook: Dream's count for this step of the block
            kd = decoding.dream_commit_counts(dream, still, conf, timesteps, step % steps_per_block)
            kk = torch.minimum(kd, budget - filled) * live
        if eb:  # conf holds the entropies here (see sample)
            in_block = (canvas_pos // block_length)[None, :] == block_of[:, None]
            commit = entropy_bounded_commit(conf, still & in_block, gamma, (budget - filled) * live)
        else:
            # Top-k per row without a Python loop: each position's rank by confidence (stable sort).
            order = conf.argsort(dim=1, descending=True, stable=True)
            rank = torch.empty_like(order).scatter_(1, order, canvas_idx[:canvas_pos.numel()].expand(batch, -1))
            commit = (rank < kk[:, None]) & still
        x[:, plen + canvas_pos] = torch.where(commit, x0, x[:, plen + canvas_pos])
        trace[:, canvas_pos] = torch.where(commit, forward_passes, trace[:, canvas_pos])
        if logprobs is not None:
            logprobs[:, canvas_pos] = torch.where(commit, lp, logprobs[:, canvas_pos])
        filled += commit.sum(1)
        nfe += live.long()
        forward_passes += 1

    remaining = x[:, plen:] == mask_id
    if (early_stop is not None or confidence_threshold is not None or eb) and bool(remaining.any()):  # one sync
        x0, _, lp = sample(forward.full(), canvas_idx, _FILL_STEP)
        x[:, plen:] = torch.where(remaining, x0, x[:, plen:])
        if logprobs is not None:
            logprobs = torch.where(remaining, lp, logprobs)
        one_shot = remaining
        trace = torch.where(remaining, forward_passes, trace)
        nfe += remaining.any(1).long()
        forward_passes += 1
    completions = x[:, plen:]
    return GenerationOutput(sequences=x, completions=completions, nfe=nfe, one_shot=one_shot,
                            num_one_shot=one_shot.sum(1), anchors_kept=anchors_kept, trace=trace,
                            forward_passes=forward_passes, commit_step=trace + 1, behaviour_logprobs=logprobs)
