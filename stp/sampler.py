"""Block-wise masked-diffusion decoding (LLaDA's ``generate``) with spatial and temporal pruning.

Semantics (docs/method.md sections 0-2). The completion canvas of ``gen_length`` positions follows the prompt and starts
as ``[MASK]`` everywhere except at the anchors of a static prior (spatial pruning), which are placed before the
first step and never changed. The canvas is decoded in blocks of ``block_length``, left to right, with
``steps // num_blocks`` steps per block. Each step runs the model once on the whole sequence, samples
``x0 = argmax(z / T + Gumbel)`` (argmax z at T = 0) with the fused ``stp_kernels.sample_step`` (float32 noise from a
counter of (seed, step, sample id, position, token), so a sample's draws do not depend on its batch), scores
confidence = softmax(z)[x0] from the untempered logits, and commits the k most confident still-masked positions up
to the end of the current block, k from LLaDA's linear schedule over the block's masked count (anchors excluded).
Committed tokens are never re-masked (a committed x0 that is [MASK] itself, which only an untrained model samples,
leaves its position masked to compete again, exactly as in LLaDA's algorithm). With ``early_stop=tau`` (temporal
pruning) a sample stops once floor(tau * gen_length) canvas positions are filled (anchors included; the last step
transfers only up to that budget); when every sample has stopped, one more forward pass fills every remaining
``[MASK]`` with its sampled x0. A sample's NFE counts the forward passes it used: the steps until it stopped, plus
the fill when it had positions left.

Decoding rules are plug-ins (``stp.decoders``, ``generate(decoder=...)``): this loop owns what every rule shares
(canvas, blocks, anchors, temporal pruning, KV caches, the record, the one-shot fill) and a rule decides which
positions a step commits from the step's draw. The legacy keywords ``remasking``, ``confidence_threshold``,
``entropy_bound`` and ``dream`` select the matching rule. A committed x0 that is [MASK] leaves its position masked
and is not counted toward the budget (the row keeps decoding it; the fixed-k schedule's table, fixed before the
first pass, is LLaDA's and unaffected).

Two savings that change no output: live-row compaction (``compact``; a step runs the model only on the rows that
can still commit: a sample that reached its budget or whose current block has nothing masked leaves the forward,
its KV-cache rows with it) and the group's shared first pass (``share_first``; equal canvases at the first pass --
a prompt's G samples -- run once). Both are bit-identical wherever a row's forward does not depend on its batch
(the tiny model on CPU; a few checkpoints differ there in the last float bit, see ``generate``).

NFE against the paper: the STP authors' code marks a sample done only when its count would pass the budget, so a
sample that lands exactly on it runs one more forward pass that commits nothing; this sampler stops on reaching it
(same tokens, one forward pass fewer for such a sample). At the paper's setting (256 tokens, block 32, 128 steps,
tau 0.95: budget 243, reached in the last block, decoded 2 tokens per step, 1 in some steps when it holds anchors)
that is every sample whose prior holds an odd number of anchors in the last block, or 14, 16 or 18 (a completion
that ended before the last block has none there and never lands exactly): the share of rollouts depends on the
priors.

The trajectory record (``GenerationOutput.commit_step`` and, with ``record_logprobs=True``,
``behaviour_logprobs``) says how each completion was drawn, so that trajectory methods can rebuild any intermediate
state: ``commit_step[b, i] = f >= 1`` when forward pass f (1-based, counted over the batch) committed position i, the
one-shot fill included as its own pass; 0 for anchors (given before step 1). The canvas before pass f is the
completion with every position whose commit step is >= f set to [MASK] (anchors stay). The behaviour log-prob of a
committed token is log softmax(z / T)[x0] over the vocabulary prior (the distribution the Gumbel-max draw samples
from); at T = 0 the draw is the deterministic argmax and its log-prob is defined as 0 (probability 1, the T -> 0
limit when the maximum is unique); anchors get 0. Both are gathered on device, without host synchronisation.

With ``cache="prefix"`` or ``"dual"`` (block KV caching, ``_StepForward``) only a block's first step runs the whole
sequence; its other steps run the block (and, for ``prefix``, the suffix) against keys/values kept from that first
step, an approximation for a bidirectional model (exact for one layer or one step per block). Schedule, NFE and the
trajectory record keep their meaning.

Because the transfer counts depend only on the masked counts at block starts (known from the anchors), the whole
schedule -- including the step at which each sample reaches its budget -- is fixed before the first forward pass:
the step loop needs no host synchronisation. Only the optional confidence-threshold mode and Dream's decoding
(``dream``, ``stp.decoding``: counts that follow the canvas) synchronise once per step.

Entropy-bounded (EB) decoding (``entropy_bound=gamma``, DiFFPO's sampler): instead of the schedule, each step sorts
the still-masked positions of a sample's current block (the first block holding a masked position; blocks still
go left to right) by predictive entropy H (from the same fused ``sample_step`` pass as x0, no second pass over the
logits) and commits the largest prefix with ``sum H - max H <= gamma`` (``entropy_bounded_commit``; at least one
position per step, so gamma = 0 decodes one token per step and a huge gamma a whole block per step). gamma is a
float or a [B] tensor (one threshold per sample, e.g. drawn by a learned controller). ``steps`` is not used: the
step count follows the entropies, at most ``gen_length`` (a sample whose draws keep returning [MASK] is filled by
the one-shot pass after that). Anchors are never candidates; temporal pruning caps the commits at the budget as in
the schedule mode. Host syncs: exactly one per step (a two-element read of "any sample live" and "the furthest
current block", which bounds the window the head runs on), plus the one-shot fill's check once at the end.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from stp import decoders, decoding
from stp.decoders.entropy_bound import entropy_bounded_commit
from stp_kernels import _validate

__all__ = ["Prior", "GenerationOutput", "generate", "transfer_schedule", "behaviour_logprob", "entropy_bounded_commit",
           "ANCHOR", "CACHE_MODES"]

ANCHOR = -1  # trace value of anchor positions (never decoded)
_FILL_STEP = 0x7FFFFFFF  # noise counter of the one-shot fill, distinct from every regular step


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


def _check_args(prompt_ids, attention_mask, gen_length, block_length, steps, temperature, prior, early_stop,
                cfg_scale):
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
    if early_stop is not None and not (isinstance(early_stop, (int, float)) and 0 < early_stop <= 1):
        raise ValueError(f"{fn}: early_stop (tau) must be in (0, 1], got {early_stop!r}")
    if cfg_scale < 0:
        raise ValueError(f"{fn}: cfg_scale must be >= 0, got {cfg_scale!r}")
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


def _decoder_arg(decoder, remasking, confidence_threshold, entropy_bound, dream) -> decoders.Decoder:
    """The decoding rule: ``decoder`` (a name or a ``stp.decoders.Decoder``) or the one the legacy keyword arguments
    select (``stp.decoders.from_options``); checked."""
    fn = "stp.sampler.generate"
    if decoder is None:
        rule = decoders.from_options(fn, remasking=remasking, confidence_threshold=confidence_threshold,
                                     entropy_bound=entropy_bound, dream=dream)
    else:
        legacy = dict(remasking=(remasking, "low_confidence"), confidence_threshold=(confidence_threshold, None),
                      entropy_bound=(entropy_bound, None), dream=(dream, None))
        for name, (value, off) in legacy.items():
            if (value is not None) if off is None else value != off:
                raise ValueError(f"{fn}: decoder={decoder!r} cannot be combined with {name}={value!r} (the "
                                 f"decoder's own settings choose the rule); leave {name} at {off!r}")
        rule = decoders.get(decoder) if isinstance(decoder, str) else decoder
        if not isinstance(rule, decoders.Decoder):
            raise ValueError(f"{fn}: decoder must be a name ({', '.join(decoders.DECODERS)}) or a "
                             f"stp.decoders.Decoder, got {type(decoder).__name__}")
    rule.check(fn)
    return rule


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
                 block_length: int, steps_per_block: int, cache: str, cfg_scale: float,
                 share_first: bool = False) -> None:
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
        self.kv_rows, self.kv_rows_count = None, x.shape[0]  # the batch rows the cache holds (None: all)
        self.share_first = share_first  # run the first pass once per distinct sequence

    def _cached(self, block: int) -> bool:
        return self.cache != "none" and block == self.filled_block

    def positions(self, lo: int, hi: int) -> torch.Tensor:
        """Canvas positions whose tokens the step computes (its commit candidates) when the batch's samples are in
        blocks ``lo..hi`` (the schedule: one block, ``lo == hi``; the entropy-bounded sampler: each sample at its
        own pace)."""
        start, end = self.span(lo, hi)
        return self.canvas_idx[start:end]

    def span(self, lo: int, hi: int) -> tuple[int, int]:
        """``positions(lo, hi)`` as the canvas range [start, end) (the positions are always contiguous)."""
        return (lo * self.block_length if self._cached(lo) else 0), (hi + 1) * self.block_length

    def _rows(self, rows: torch.Tensor | None):
        """The canvas, padding mask and CFG mask of the given rows (None: every row)."""
        if rows is None:
            return self.x, self.attn, self.uncond
        pick = lambda t: None if t is None else t.index_select(0, rows)  # noqa: E731
        return pick(self.x), pick(self.attn), pick(self.uncond)

    def _keep_rows(self, rows: torch.Tensor | None) -> None:
        """Compact the kept keys/values to ``rows`` (live-row compaction): rows only leave between two fills, so
        ``rows`` is a subset of the rows the cache holds; their positions there are found by ``searchsorted``."""
        if rows is None or self.kv_rows_count == rows.numel():
            return
        where = rows if self.kv_rows is None else torch.searchsorted(self.kv_rows, rows)
        for kv in (self.kv, self.kv_uncond):
            if kv is not None:
                kv.select_rows(where)
        self.kv_rows, self.kv_rows_count = rows, rows.numel()

    def _run(self, x: torch.Tensor, attn, kv, canvas_pos: torch.Tensor, window: tuple[int, int] | None
             ) -> torch.Tensor:
        batch = x.shape[0]
        if window is not None:  # [B, stop - start, H]; the block's rows come first
            h = self.model.backbone(x, attn, kv_cache=kv, window=window)[:, :canvas_pos.numel()]
            return h.reshape(batch * canvas_pos.numel(), -1)
        h = self.model.backbone(x, attn) if kv is None else self.model.backbone(x, attn, kv_cache=kv)
        n = canvas_pos.numel()
        if canvas_pos is self.canvas_idx or canvas_pos._base is self.canvas_idx:  # a range: a slice, not a gather
            start = self.plen + canvas_pos.storage_offset() - self.canvas_idx.storage_offset()
            return h[:, start:start + n].reshape(batch * n, -1)
        return h[:, self.plen + canvas_pos].reshape(batch * n, -1)

    def hidden(self, lo: int, hi: int, canvas_pos: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Final hidden states [R * len(canvas_pos), H] of ``positions(lo, hi)`` on the current canvas (guidance
        folded in) for the batch rows ``rows`` (sorted indices; None = all B), running the pass the cache mode calls
        for. The cache is filled when the lowest block ``lo`` changes: every position before it is then committed in
        every live sample, and positions after block ``hi`` are still as at the fill (masked or anchors), so a cached
        step recomputes blocks ``lo..hi`` (``dual``) or everything from ``lo`` on (``prefix``). A fill keeps the
        rows it ran; a cached step on fewer rows first drops the others' keys/values."""
        window = None
        if self._cached(lo):
            start = self.plen + lo * self.block_length
            stop = self.x.shape[1] if self.cache == "prefix" else self.plen + (hi + 1) * self.block_length
            window = (start, stop)
            self._keep_rows(rows)
        elif self.cache != "none":
            self.filled_block = lo  # this full forward fills the cache for the later steps from block lo
            self.kv_rows = rows
            self.kv_rows_count = self.x.shape[0] if rows is None else rows.numel()
        x, attn, uncond = self._rows(rows)
        share = None
        if self.share_first and window is None:
            self.share_first = False  # the first pass only: later canvases differ by their draws
            share = self._distinct(x, attn)
        h = self._run_shared(x, attn, self.kv, canvas_pos, window, share)
        if self.cfg_scale > 0:
            # Logits are linear in the hidden state, so guidance on logits equals guidance on hidden states.
            un_x = torch.where(uncond, self.model.mask_token_id, x)
            un_h = self._run_shared(un_x, attn, self.kv_uncond, canvas_pos, window, share)
            h = un_h + (self.cfg_scale + 1.0) * (h - un_h)
        return h

    @staticmethod
    def _distinct(x: torch.Tensor, attn: torch.Tensor | None):
        """(first row of each distinct sequence, each row's distinct index) when some rows are equal (a group's
        samples of one prompt before their first draw), else None. One host sync."""
        key = x if attn is None else torch.cat([x, attn.to(x.dtype)], 1)
        uniq, inverse = torch.unique(key, dim=0, return_inverse=True)
        if uniq.shape[0] == x.shape[0]:
            return None
        order = torch.arange(x.shape[0], device=x.device)
        first = torch.full((uniq.shape[0],), x.shape[0], dtype=torch.long, device=x.device)
        first = first.scatter_reduce(0, inverse, order, reduce="amin")
        return first, inverse

    def _run_shared(self, x, attn, kv, canvas_pos, window, share) -> torch.Tensor:
        """``_run``, over the distinct rows only when ``share`` is given (results and kept keys/values copied to
        their equal rows)."""
        if share is None:
            return self._run(x, attn, kv, canvas_pos, window)
        first, inverse = share
        h = self._run(x.index_select(0, first), None if attn is None else attn.index_select(0, first), kv,
                      canvas_pos, window)
        if kv is not None:
            kv.select_rows(inverse)
        n = canvas_pos.numel()
        return h.view(first.numel(), n, -1).index_select(0, inverse).reshape(x.shape[0] * n, -1)

    def full(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states of every canvas position of ``rows`` from a full forward (the one-shot fill), the cache
        untouched."""
        x, attn, uncond = self._rows(rows)
        h = self._run(x, attn, None, self.canvas_idx, None)
        if self.cfg_scale > 0:
            un_x = torch.where(uncond, self.model.mask_token_id, x)
            un_h = self._run(un_x, attn, None, self.canvas_idx, None)
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
    decoder: decoders.Decoder | str | None = None,
    compact: bool = True,
    share_first: bool = True,
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
        decoder: the decoding rule (``stp.decoders``): a name (``low_confidence``, ``random``,
            ``confidence_threshold``, ``entropy_bound``, ``dream``, ``fast_dllm``, ...; its default settings) or a
            ``stp.decoders.Decoder`` with its settings, e.g. ``stp.decoders.get("fast_dllm", threshold=0.9)``. None
            (default): the rule that ``remasking``, ``confidence_threshold``, ``entropy_bound`` and ``dream`` select
            (they must stay at their defaults when ``decoder`` is given).
        compact: live-row compaction: a step runs the model only on the rows that can still commit (a sample that
            stopped, or whose current block has no [MASK] left, leaves the forward); exact (same tokens, commit
            steps, NFE and log-probs as ``compact=False``) wherever the model's rows are computed independently of
            their batch (checked on CPU in tests/test_decoders.py).
        share_first: the batch's first pass runs once per distinct sequence (a group's G samples of one prompt start
            from the same canvas: prompt, [MASK] and the same anchors) and its hidden states (and kept keys/values)
            are copied to the equal rows; the draws still differ per sample id. Exact where ``compact`` is.
    """
    num_blocks, steps_per_block = _check_args(prompt_ids, attention_mask, gen_length, block_length, steps,
                                              temperature, prior, early_stop, cfg_scale)
    rule = _decoder_arg(decoder, remasking, confidence_threshold, entropy_bound, dream)
    device = prompt_ids.device
    batch, plen = prompt_ids.shape
    rule = rule.bind(batch, device)
    free = rule.pace == "free"  # each sample at its own block (stp.decoders.base)
    fixed = not free and rule.fixed_counts  # the schedule's counts, known before the first pass
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
    done_list = done_step.tolist() if early_stop is not None else None  # the one sync (host copy of the table)
    last_step = max(done_list) if early_stop is not None else total_steps - 1
    active = torch.arange(total_steps, device=device)[None, :] <= done_step[:, None]  # [B, steps]

    trace = torch.full((batch, gen_length), ANCHOR, dtype=torch.long, device=device)
    nfe = torch.zeros(batch, dtype=torch.long, device=device)
    one_shot = torch.zeros(batch, gen_length, dtype=torch.bool, device=device)
    filled = anchors_kept.clone()
    canvas_idx = torch.arange(gen_length, device=device)

    uncond = torch.cat([prompt_real, torch.zeros_like(anchor)], 1) if cfg_scale > 0 else None  # masked by CFG
    forward = _StepForward(model, x, attn, uncond, plen=plen, block_length=block_length,
                           steps_per_block=steps_per_block, cache=cache, cfg_scale=cfg_scale, share_first=share_first)

    logprobs = torch.zeros(batch, gen_length, dtype=torch.float32, device=device) if record_logprobs else None
    ctx = decoders.Draw(weight=weight, seed=seed, temperature=temperature, vocab=vocab, backend=backend,
                        record_logprobs=record_logprobs)

    row_ids_of = [None, None, None]  # (canvas_pos, rows, row ids): reused while the step's range and rows stay

    def sample(h: torch.Tensor, canvas_pos: torch.Tensor, step: int, rows: torch.Tensor | None):
        if row_ids_of[0] is canvas_pos and row_ids_of[1] is rows:
            row_ids = row_ids_of[2]
        else:
            ids = sample_ids if rows is None else sample_ids.index_select(0, rows)
            row_ids = (ids[:, None] * gen_length + canvas_pos[None, :]).reshape(-1)
            row_ids_of[:] = canvas_pos, rows, row_ids
        r = row_ids.numel() // canvas_pos.numel()
        x0, score, lp = rule.draw(h, ctx, step=step, row_ids=row_ids)
        n = canvas_pos.numel()
        return x0.view(r, n), score.view(r, n), (lp.view(r, n) if lp is not None else None)

    def widen(t: torch.Tensor, rows: torch.Tensor | None, fill) -> torch.Tensor:
        """A [R, n] result of the live rows as [B, n], ``fill`` in the other rows (which commit nothing)."""
        if rows is None:
            return t
        out = torch.full((batch, t.shape[1]), fill, dtype=t.dtype, device=device)
        return out.index_copy_(0, rows, t)

    def pick(t: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        return t if rows is None else t.index_select(0, rows)

    no_k = torch.zeros(batch, dtype=torch.long, device=device)  # the free pace has no schedule count
    all_rows = torch.arange(batch, device=device)
    rows = None  # live-row compaction: the rows this step runs (None = all)
    forward_passes = 0
    span, canvas_pos = None, None  # the step's canvas range [a, b) and its positions (kept while the range stays)
    for step in range(gen_length if free else total_steps):
        # Candidates: every canvas position up to the end of this step's block. Positions of earlier blocks are all
        # committed, except where x0 was [MASK] itself (possible for an untrained model): as in LLaDA's algorithm,
        # such a position stays masked and competes again. Fixed shapes: no host sync.
        lo = hi = step // steps_per_block
        if free:  # each sample's current block = its first block with a masked position; the one sync of the step
            masked_now = x[:, plen:] == mask_id  # [B, L]
            live = (filled < budget) & masked_now.any(1)
            block_of = masked_now.int().argmax(1) // block_length  # [B]
            any_live, hi, lo = torch.stack([live.any().long(), (block_of * live).max(),
                                            torch.where(live, block_of, num_blocks).min()]).tolist()
            if not any_live:
                break
            if compact:
                rows = live.nonzero()[:, 0]
        if forward.span(lo, hi) != span:  # with a filled KV cache: the blocks lo..hi only
            span, canvas_pos = forward.span(lo, hi), forward.positions(lo, hi)
        a, b = plen + span[0], plen + span[1]  # the step's canvas range in x (a slice: no index tensors)
        if fixed:
            if step > last_step:
                break
            live, kk = active[:, step], k_budget[:, step]
            if compact and done_list is not None:
                n_live = sum(d >= step for d in done_list)  # host copy of the table: no sync
                if n_live < batch and (rows is None or rows.numel() != n_live):
                    rows = torch.tensor([b for b, d in enumerate(done_list) if d >= step], device=device)
        elif not free:  # data-dependent transfers: one sync per step to skip finished blocks and stop when all are done
            live = filled < budget
            runs = (x[:, plen + canvas_pos] == mask_id).any(1) & live
            if compact:
                rows = runs.nonzero()[:, 0]  # rows with nothing to commit leave the forward
                if rows.numel() == 0:
                    continue
                if rows.numel() == batch:
                    rows = None
            elif not bool(runs.any()):
                continue
            kk = k_sched[:, step]
        else:
            kk = no_k
        if rows is not None and rows.numel() == batch:
            rows = None
        x0, score, lp = sample(forward.hidden(lo, hi, canvas_pos, rows), canvas_pos, step, rows)
        still = pick(x[:, a:b], rows) == mask_id  # [R, block]
        score = score.masked_fill(~still, -math.inf)
        candidates = still
        if free:
            candidates = still & ((canvas_pos // block_length)[None, :] == pick(block_of, rows)[:, None])
        limit = kk if fixed else (budget - filled) * live
        commit = rule.commit(decoders.Step(x0=x0, score=score, still=still, candidates=candidates, k=pick(kk, rows),
                                           limit=pick(limit, rows), step_in_block=step % steps_per_block,
                                           steps_per_block=steps_per_block, rows=rows))
        commit, x0 = widen(commit, rows, False), widen(x0, rows, mask_id)
        x[:, a:b] = torch.where(commit, x0, x[:, a:b])
        trace[:, span[0]:span[1]].masked_fill_(commit, forward_passes)
        if logprobs is not None:
            logprobs[:, span[0]:span[1]] = torch.where(commit, widen(lp, rows, 0.0), logprobs[:, span[0]:span[1]])
        if not fixed:  # the fixed schedule's counts are known: filled is read only by the other paces
            filled += (commit & (x0 != mask_id)).sum(1)  # a committed [MASK] leaves its position masked
        nfe += live
        forward_passes += 1

    remaining = x[:, plen:] == mask_id
    if (early_stop is not None or rule.fills) and bool(remaining.any()):  # one sync
        fill_rows = remaining.any(1).nonzero()[:, 0] if compact else None
        if fill_rows is not None and fill_rows.numel() == batch:
            fill_rows = None
        x0, _, lp = sample(forward.full(fill_rows), canvas_idx, _FILL_STEP, fill_rows)
        x[:, plen:] = torch.where(remaining, widen(x0, fill_rows, mask_id), x[:, plen:])
        if logprobs is not None:
            logprobs = torch.where(remaining, widen(lp, fill_rows, 0.0), logprobs)
        one_shot = remaining
        trace = torch.where(remaining, forward_passes, trace)
        nfe += remaining.any(1).long()
        forward_passes += 1
    completions = x[:, plen:]
    return GenerationOutput(sequences=x, completions=completions, nfe=nfe, one_shot=one_shot,
                            num_one_shot=one_shot.sum(1), anchors_kept=anchors_kept, trace=trace,
                            forward_passes=forward_passes, commit_step=trace + 1, behaviour_logprobs=logprobs)
