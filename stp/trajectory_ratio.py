"""Trajectory log-ratios of a masked diffusion LM's rollouts, reduced to one step per block (dTRPO, docs/method.md 7).

A rollout's trajectory record (``stp.sampler.GenerationOutput.commit_step``, s(i) = the 1-based forward pass that
committed completion position i; 0 = anchor) fixes every intermediate state: the canvas before pass f is the
completion with each position i where s(i) >= f set to [MASK]. When the choice of positions does not depend on the
model (it cancels in the ratio), the trajectory log-ratio of two policies is a sum over passes of the newly revealed
tokens' log-ratios::

    log pi_theta(tau) - log pi_ref(tau) = sum_f sum_{i: s(i) = f} [log mu_theta - log mu_ref](y_i | state before f)

With N_B blocks of T_B passes each (pass f belongs to the window of block (f - 1) // T_B), ONE pass per block is
drawn, f_b = (b - 1) T_B + u_b with u_b ~ UniformInt{1..T_B} from the counter-based RNG keyed by (seed, iteration,
sample id, block), and the window's sum is estimated by T_B times that pass's term. Passes beyond the N_B T_B windows
(the one-shot fill of temporal pruning, or the passes of the entropy-bounded sampler after the last window) are
always scored, each at its own state, with weight 1. Every pass lies in exactly one window or beyond them all, so the
estimate is unbiased over u for ANY record: its mean over all T_B^N_B choices of u is the sum over every pass
(enumerated in tests/test_dtrpo.py against a float64 replay, schedule, early stop and entropy-bounded records).
Confidence-ordered decoding, early stop and thresholds only change which tokens a pass holds. ``block_mean``
weights every scored pass T_B times less (1 in a window, 1 / T_B beyond): the unbiased estimate of the trajectory
log-ratio divided by T_B, one scale for every pass. Anchors (s = 0) are conditioning, never scored.

``trajectory_logprobs`` returns the per-token log mu(y_i | state before s(i)) at the scored positions and their
weights; the log-ratio of two policies on the same u is ``sum(weights * (logp_a - logp_b))`` (``trajectory_delta``).
Only scored rows go through the LM head (``stp_kernels.masked_logprob``); the [rows, vocab] logits never exist.

Two evaluation modes, one body forward each (chunked by whole samples under ``memory_budget`` like
``stp.likelihood``):

- ``exact``: each sample's N_B drawn states as N_B sequences [prompt ; state] (plus one per distinct pass beyond
  the windows, when a record has them), later blocks all [MASK] exactly as the decoder saw them. Costs N_B sequences of
  P + C tokens per sample.
- ``packed``: one sequence [prompt ; noisy copy ; clean copy] of P + 2C tokens per sample with a block-diffusion
  attention pattern: noisy block b sees the prompt, the clean blocks < b and itself; clean block b sees the prompt
  and the clean blocks <= b; the prompt sees the prompt; both copies reuse the completion's position ids. The noisy
  copy holds block b as it was before f_b. This is the state the decoder saw only for a model whose own attention is
  block-causal (block b never sees later blocks, the prompt never sees the completion); such a model declares it
  with a ``block_causal = True`` attribute. For a bidirectional model (LLaDA, Dream, the tiny model) the decoder's
  state had the later blocks masked and the prompt attending to the canvas, which the packed sequence shows neither
  of: a bias that more draws do not remove, so ``packed`` refuses such models by name. Every position must be
  committed inside its own block's window (no one-shot fill reaching into later blocks): records breaking that are
  refused by name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from stp.likelihood import default_memory_budget, samples_per_chunk
from stp_kernels import masked_logprob
from stp_kernels.reference import counter_uniform, row_keys

__all__ = ["MODES", "U_SALT", "TrajectoryLogprobs", "block_steps", "trajectory_logprobs", "trajectory_delta",
           "dpo_loss", "selection_logprob"]

MODES = ("exact", "packed")
U_SALT = 0x64747270_6F5F7562  # "dtrpo_ub" in ASCII: a stream apart from the sampler's and the masks'
_MAX_BLOCKS = 1 << 12


@dataclass
class TrajectoryLogprobs:
    """Result of ``trajectory_logprobs``. B samples, C completion length, N_B blocks."""

    logprobs: torch.Tensor  # [B, C] float32 log mu(y_i | state before s(i)) at scored positions, 0 elsewhere
    weights: torch.Tensor  # [B, C] float32: T_B in a window, 1 beyond (block_mean: 1, 1 / T_B) where scored, else 0
    scored: torch.Tensor  # [B, C] bool: positions committed at a drawn pass (or beyond the windows)
    steps: torch.Tensor  # [B, N_B] int64 drawn passes f_b (1-based)
    num_sequences: int  # packed sequences of the body forward(s) (all chunks)
    num_chunks: int  # body forwards


def block_steps(seed: int, iteration: int, sample_ids: torch.Tensor, num_blocks: int,
                steps_per_block: int) -> torch.Tensor:
    """[B, N_B] int64 drawn passes f_b = b * T_B + u_b (b 0-based, u_b in 1..T_B), a pure function of (seed,
    iteration, sample id, block): the same for old, reference and current policy, in any batch position, process or
    micro-batch. Counter: ``row_keys(seed ^ U_SALT, iteration, sample_id * 4096 + b)`` at token counter 0."""
    if not 1 <= num_blocks <= _MAX_BLOCKS:
        raise ValueError(f"block_steps: num_blocks={num_blocks} must be in [1, {_MAX_BLOCKS}]")
    if steps_per_block < 1:
        raise ValueError(f"block_steps: steps_per_block={steps_per_block} must be >= 1")
    device = sample_ids.device
    blocks = torch.arange(num_blocks, device=device)
    rows = sample_ids.long()[:, None] * _MAX_BLOCKS + blocks[None, :]  # [B, N_B]
    keys = row_keys((int(seed) ^ U_SALT) & ((1 << 64) - 1), int(iteration), rows.reshape(-1))
    u = counter_uniform(keys, torch.zeros(1, dtype=torch.long, device=device))[:, 0].view_as(rows)
    draw = torch.minimum((u * steps_per_block).floor().long(), torch.full_like(rows, steps_per_block - 1))
    return blocks[None, :] * steps_per_block + draw + 1


def _check(prompt_ids, prompt_attention_mask, completion_ids, commit_step, block_length, steps, mode, sample_ids,
           fixed_steps):
    fn = "stp.trajectory_ratio.trajectory_logprobs"
    if mode not in MODES:
        raise ValueError(f"{fn}: mode={mode!r}; allowed: {', '.join(MODES)}")
    if prompt_ids.dim() != 2 or completion_ids.dim() != 2 or prompt_ids.shape[0] != completion_ids.shape[0]:
        raise ValueError(f"{fn}: prompt_ids [B, P] and completion_ids [B, C] must share B, got "
                         f"{tuple(prompt_ids.shape)} and {tuple(completion_ids.shape)}")
    if commit_step is None or commit_step.shape != completion_ids.shape:
        got = None if commit_step is None else tuple(commit_step.shape)
        raise ValueError(f"{fn}: commit_step (the rollout's trajectory record) must be [B, C] like completion_ids "
                         f"{tuple(completion_ids.shape)}, got {got}")
    if prompt_attention_mask is not None and prompt_attention_mask.shape != prompt_ids.shape:
        raise ValueError(f"{fn}: prompt_attention_mask {tuple(prompt_attention_mask.shape)} must match prompt_ids "
                         f"{tuple(prompt_ids.shape)}")
    c_len = completion_ids.shape[1]
    if block_length < 1 or c_len % block_length:
        raise ValueError(f"{fn}: block_length={block_length} must divide the completion length {c_len}")
    blocks = c_len // block_length
    if steps < 1 or steps % blocks:
        raise ValueError(f"{fn}: steps={steps} must be a positive multiple of the number of blocks ({blocks})")
    if sample_ids is not None and tuple(sample_ids.shape) != (prompt_ids.shape[0],):
        raise ValueError(f"{fn}: sample_ids must be [B={prompt_ids.shape[0]}], got {tuple(sample_ids.shape)}")
    if fixed_steps is not None and tuple(fixed_steps.shape) != (prompt_ids.shape[0], blocks):
        raise ValueError(f"{fn}: fixed_steps must be [B, N_B] = [{prompt_ids.shape[0]}, {blocks}], got "
                         f"{tuple(fixed_steps.shape)}")
    return blocks, steps // blocks


def _packed_pattern(prompt_real: torch.Tensor, c_len: int, block_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The block-diffusion attention pattern [B, S, S] (S = P + 2C) and position ids [B, S] of [prompt ; noisy ;
    clean] (see the module docstring)."""
    batch, p_len = prompt_real.shape
    device = prompt_real.device
    blk = torch.arange(c_len, device=device) // block_length  # [C]
    seq = p_len + 2 * c_len
    allowed = torch.zeros(batch, seq, seq, dtype=torch.bool, device=device)
    key_prompt = prompt_real[:, None, :]  # [B, 1, P]: padding is never a key
    allowed[:, :, :p_len] = key_prompt  # every query sees the real prompt
    noisy, clean = slice(p_len, p_len + c_len), slice(p_len + c_len, seq)
    allowed[:, noisy, noisy] = blk[:, None] == blk[None, :]
    allowed[:, noisy, clean] = blk[None, :] < blk[:, None]
    allowed[:, clean, clean] = blk[None, :] <= blk[:, None]
    pos_prompt = (prompt_real.long().cumsum(1) - 1).clamp(min=0)
    pos_comp = prompt_real.long().sum(1, keepdim=True) + torch.arange(c_len, device=device)[None, :]
    return allowed, torch.cat([pos_prompt, pos_comp, pos_comp], 1)


def trajectory_logprobs(
    model,
    prompt_ids: torch.Tensor,
    prompt_attention_mask: torch.Tensor | None,
    completion_ids: torch.Tensor,
    commit_step: torch.Tensor,
    *,
    seed: int,
    iteration: int,
    block_length: int,
    steps: int,
    sample_ids: torch.Tensor | None = None,
    mode: str = "exact",
    block_mean: bool = False,
    temperature: float = 1.0,
    memory_budget: int | None = None,
    backend: str | None = None,
    fixed_steps: torch.Tensor | None = None,
) -> TrajectoryLogprobs:
    """Per-token log-probs of the tokens revealed at one drawn pass per block (module docstring).

    Args:
        model: a ``stp.models.DiffusionLM`` (``packed`` also needs ``backbone_4d``: no shifted logits).
        prompt_ids: [B, P] int64, left-padded; prompt_attention_mask: [B, P] (1 = real) or None.
        completion_ids: [B, C] int64 completions; commit_step: [B, C] int64 trajectory record (0 = anchor).
        seed, iteration, sample_ids: the counter of the drawn passes (``block_steps``).
        block_length, steps: the rollout's decoding (C / block_length blocks of steps / blocks passes each).
        mode: "exact" or "packed" (a model declaring ``block_causal = True`` only). block_mean: every weight
            divided by T_B (1 in a window, 1 / T_B beyond).
        temperature: logits are divided by it. memory_budget: bytes per body forward (default: as
            ``stp.likelihood``). backend: ``masked_logprob`` backend.
        fixed_steps: [B, N_B] passes to use instead of drawing them (tests enumerate u with it).

    Returns:
        ``TrajectoryLogprobs``; ``logprobs`` is differentiable w.r.t. the model's parameters when grad is on.
    """
    num_blocks, t_b = _check(prompt_ids, prompt_attention_mask, completion_ids, commit_step, block_length, steps,
                             mode, sample_ids, fixed_steps)
    device = completion_ids.device
    batch, p_len = prompt_ids.shape
    c_len = completion_ids.shape[1]
    mask_id = int(model.mask_token_id)
    if sample_ids is None:
        sample_ids = torch.arange(batch, device=device)
    s = commit_step.to(device=device, dtype=torch.long)
    f = fixed_steps.to(device) if fixed_steps is not None else block_steps(seed, iteration, sample_ids, num_blocks,
                                                                           t_b)  # [B, N_B]
    prompt_real = (torch.ones_like(prompt_ids, dtype=torch.bool) if prompt_attention_mask is None
                   else prompt_attention_mask.to(torch.bool))
    weight_in, weight_beyond = (1.0, 1.0 / t_b) if block_mean else (float(t_b), 1.0)
    window = (s - 1).clamp(min=0) // t_b  # [B, C]: the block whose window holds each commit pass
    beyond = s > steps  # passes after the last window: always scored, each at its own state
    in_window = (s >= 1) & ~beyond
    drawn = f.gather(1, window.clamp(max=num_blocks - 1))  # [B, C] the drawn pass of that window
    scored = (in_window & (s == drawn)) | beyond
    weights = torch.where(beyond, weight_beyond, torch.where(scored, weight_in, 0.0)).float()

    if mode == "exact":
        # States [B, K', C]: K' = N_B drawn passes, then one state per distinct pass beyond the windows (the
        # entropy-bounded sampler can run several; each is scored at the state before itself), sample by sample in
        # pass order, padded with a state nothing is scored at.
        n_extra = 0
        never = steps + c_len + 2  # after every pass of any record (at most steps + C + 1 passes)
        rank = torch.zeros_like(s)
        state_steps = f
        if bool(beyond.any()):  # one host sync per call
            vals = torch.where(beyond, s, never).sort(1).values  # [B, C]
            first = torch.ones_like(vals, dtype=torch.bool)
            first[:, 1:] = vals[:, 1:] != vals[:, :-1]
            distinct = torch.where(first & (vals < never), vals, never).sort(1).values  # [B, C], distinct first
            n_extra = int((distinct < never).sum(1).max())  # the second host sync
            extra_steps = distinct[:, :n_extra]  # [B, n_extra]
            rank = (extra_steps[:, None, :] < s[:, :, None]).sum(2)  # [B, C] index of a position's pass beyond
            state_steps = torch.cat([f, extra_steps], 1)
        kp = state_steps.shape[1]
        comp = torch.where(s[:, None, :] >= state_steps[:, :, None], mask_id, completion_ids[:, None, :])
        ids = torch.cat([prompt_ids[:, None, :].expand(batch, kp, p_len), comp], 2)  # [B, K', P + C]
        # Which state scores each position: its window's state, or its own pass's state beyond the windows.
        which = torch.where(beyond, num_blocks + rank, window.clamp(max=num_blocks - 1))  # [B, C]
        at = torch.zeros(batch, kp, c_len, dtype=torch.bool, device=device)
        at.scatter_(1, which[:, None, :], scored[:, None, :])
        seq_len = p_len + c_len
        attn = None
        if prompt_attention_mask is not None:
            attn = torch.cat([prompt_real[:, None, :].expand(batch, kp, p_len),
                              torch.ones(batch, kp, c_len, dtype=torch.bool, device=device)], 2)
        budget = default_memory_budget(model) if memory_budget is None else int(memory_budget)
        per_chunk = samples_per_chunk(model, batch, kp, seq_len, budget)
        pieces, chunks = [], 0
        for b0 in range(0, batch, per_chunk):
            b1 = min(batch, b0 + per_chunk)
            n_seq = (b1 - b0) * kp
            seq_idx, col = at[b0:b1].reshape(n_seq, c_len).nonzero(as_tuple=True)
            hidden = model.backbone(ids[b0:b1].reshape(n_seq, seq_len),
                                    None if attn is None else attn[b0:b1].reshape(n_seq, seq_len))
            chunks += 1
            pieces.append(_scatter(hidden, model.lm_head_weight, completion_ids[b0:b1], seq_idx // kp, col,
                                   seq_idx * seq_len + p_len + col, b1 - b0, c_len, temperature, backend))
        return TrajectoryLogprobs(logprobs=torch.cat(pieces, 0), weights=weights, scored=scored, steps=f,
                                  num_sequences=batch * kp, num_chunks=chunks)

    # ---- packed: [prompt ; noisy ; clean], one sequence per sample
    if not getattr(model, "block_causal", False):
        raise ValueError(f"stp.trajectory_ratio: mode 'packed' scores block b without the later masked blocks and "
                         f"without the prompt attending to the canvas, which is the decoder's state only for a "
                         f"block-causal model; model {getattr(model, 'name', type(model).__name__)!r} does not declare "
                         f"block_causal = True (LLaDA, Dream and the tiny model attend bidirectionally: the packed "
                         f"scores are biased there, by an amount more draws do not shrink); use mode 'exact'")
    model.check_backbone_4d("packed")  # the model's own limits before the record's
    outside = (s >= 1) & (window != torch.arange(c_len, device=device)[None, :] // block_length)
    if bool((outside | beyond).any()):  # one host sync per call
        b, c = (outside | beyond).nonzero()[0].tolist()
        raise ValueError(f"stp.trajectory_ratio: mode 'packed' needs every position committed inside its own "
                         f"block's window; sample {b} position {c} (block {c // block_length}) was committed at pass "
                         f"{int(s[b, c])} (windows of {t_b} passes, {steps} in all): such records (one-shot fill of "
                         f"temporal pruning, data-dependent decoding) need mode 'exact'")
    f_own = f.repeat_interleave(block_length, 1)  # [B, C] the drawn pass of each position's block
    noisy = torch.where(s >= f_own, mask_id, completion_ids)
    ids = torch.cat([prompt_ids, noisy, completion_ids], 1)  # [B, P + 2C]
    allowed, position_ids = _packed_pattern(prompt_real, c_len, block_length)
    seq_len = p_len + 2 * c_len
    budget = default_memory_budget(model) if memory_budget is None else int(memory_budget)
    per_chunk = samples_per_chunk(model, batch, 1, seq_len, budget)
    pieces, chunks = [], 0
    for b0 in range(0, batch, per_chunk):
        b1 = min(batch, b0 + per_chunk)
        seq_idx, col = scored[b0:b1].nonzero(as_tuple=True)
        hidden = model.backbone_4d(ids[b0:b1], allowed[b0:b1], position_ids[b0:b1], mode="packed")
        chunks += 1
        pieces.append(_scatter(hidden, model.lm_head_weight, completion_ids[b0:b1], seq_idx, col,
                               seq_idx * seq_len + p_len + col, b1 - b0, c_len, temperature, backend))
    return TrajectoryLogprobs(logprobs=torch.cat(pieces, 0), weights=weights, scored=scored, steps=f,
                              num_sequences=batch, num_chunks=chunks)


def _scatter(hidden, weight, completion_ids, sample, col, rows, n, c_len, temperature, backend) -> torch.Tensor:
    """log-probs at the scored ``rows`` of ``hidden``, placed at [sample, col] of an [n, C] float32 tensor (each
    position is scored at most once: a scatter without accumulation, deterministic)."""
    if rows.numel() == 0:
        return hidden.new_zeros(n, c_len, dtype=torch.float32) + 0.0 * hidden.sum()
    logp = masked_logprob(hidden, weight, completion_ids[sample, col], rows=rows, temperature=temperature,
                          backend=backend)  # [R] float32
    out = torch.zeros(n, c_len, dtype=torch.float32, device=hidden.device)
    return out.index_put((sample, col), logp)


def trajectory_delta(logp: torch.Tensor, logp_ref: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """[B] estimated trajectory log-ratios sum_i w_i (logp_i - logp_ref_i) (both on the same drawn passes)."""
    return (weights * (logp - logp_ref)).sum(1)


def dpo_loss(logp: torch.Tensor, ref_logp: torch.Tensor, weights: torch.Tensor, lengths: torch.Tensor, *,
             beta: float, length_normalize: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DPO on trajectory log-ratios. Rows come in pairs [chosen 0, rejected 0, chosen 1, ...] ([2P, C] each)::

        Delta = sum_i w_i (logp_i - ref_logp_i)       (/ lengths, with length_normalize)
        loss  = mean_pairs -log sigmoid(beta * (Delta_chosen - Delta_rejected))

    ``lengths`` [2P]: each completion's real length, its tokens up to and including the first EOS
    (``stp.likelihood.valid_lengths``; the whole completion without an EOS), read only with ``length_normalize``.
    At logp = ref_logp every Delta is 0 and the loss is log 2. Returns (loss, metrics: ``accuracy`` (pairs with a
    positive margin), ``margin`` (mean beta * (Delta_w - Delta_l)), ``delta_chosen``, ``delta_rejected``), metrics
    detached 0-d tensors."""
    if logp.shape != ref_logp.shape or logp.shape != weights.shape or logp.shape[0] % 2:
        raise ValueError(f"dpo_loss: logp {tuple(logp.shape)}, ref_logp {tuple(ref_logp.shape)} and weights "
                         f"{tuple(weights.shape)} must share one [2P, C] shape (chosen/rejected rows interleaved)")
    if tuple(lengths.shape) != (logp.shape[0],):
        raise ValueError(f"dpo_loss: lengths must be [2P={logp.shape[0]}] (each completion's length through its first "
                         f"EOS), got {tuple(lengths.shape)}")
    delta = trajectory_delta(logp, ref_logp.to(logp.dtype), weights.to(logp.dtype))  # [2P]
    if length_normalize:
        delta = delta / lengths.to(delta.device).clamp(min=1).to(delta.dtype)
    dw, dl = delta[0::2], delta[1::2]
    z = beta * (dw - dl)
    loss = -torch.nn.functional.logsigmoid(z).mean()
    with torch.no_grad():
        metrics = {"accuracy": (z > 0).float().mean(), "margin": z.mean(), "delta_chosen": dw.mean(),
                   "delta_rejected": dl.mean()}
    return loss, metrics


@torch.no_grad()
def selection_logprob(model, prompt_ids: torch.Tensor, prompt_attention_mask: torch.Tensor | None,
                      completion_ids: torch.Tensor, commit_step: torch.Tensor, *, block_length: int, steps: int,
                      temperature: float, vocab: torch.Tensor | None = None) -> torch.Tensor:
    """[B] float64: the selection term of a low-confidence-remasking trajectory, the part of log pi(tau) that the
    newly-unmasked tokens' log-probs leave out (docs/method.md 7). The sampler (``stp.sampler``, schedule mode, no
    anchors, no early stop) draws x_j ~ softmax(z_j / T) at every still-masked position j of the pass's block and
    commits the k most confident, confidence softmax(z_j)[x_j] (untempered). Given the revealed tokens y_S, the
    other candidates j must have drawn a token less confident than c = min_{i in S} softmax(z_i)[y_i]::

        log P(selection | y_S) = sum_f sum_{j in M_f - S_f} log sum_{v: softmax(z_j)_v < c_f} softmax(z_j / T)_v

    (ties of confidence, of probability 0 for continuous logits, are ignored). Full forward passes, one per pass of
    the schedule, float64 head: a measuring tool, not a training path. ``vocab``: the sampler's vocabulary prior."""
    fn = "stp.trajectory_ratio.selection_logprob"
    if not temperature > 0:
        raise ValueError(f"{fn}: temperature={temperature}; allowed: > 0 (greedy decoding selects deterministically)")
    num_blocks, t_b = _check(prompt_ids, prompt_attention_mask, completion_ids, commit_step, block_length, steps,
                             "exact", None, None)
    s = commit_step.long()
    if bool(((s < 1) | (s > steps)).any()):
        raise ValueError(f"{fn}: every position must be committed by one of the {steps} scheduled passes (no anchors, "
                         f"no one-shot fill); commit steps range over [{int(s.min())}, {int(s.max())}]")
    batch, p_len = prompt_ids.shape
    c_len = completion_ids.shape[1]
    ids = torch.arange(model.lm_head_weight.shape[0], device=completion_ids.device) if vocab is None else vocab
    head = model.lm_head_weight.index_select(0, ids.to(model.lm_head_weight.device)).double()
    slot = (ids.to(completion_ids.device)[None, None, :] == completion_ids[:, :, None]).int().argmax(-1)  # [B, C]
    attn = None
    if prompt_attention_mask is not None:
        attn = torch.cat([prompt_attention_mask, torch.ones_like(completion_ids)], 1)
    block_of = torch.arange(c_len, device=completion_ids.device) // block_length
    total = torch.zeros(batch, dtype=torch.float64, device=completion_ids.device)
    for f in range(1, steps + 1):
        masked, sel = s >= f, s == f
        cand = masked & ~sel & (block_of == (f - 1) // t_b)[None, :]
        if not bool((cand.any(1) & sel.any(1)).any()):
            continue
        canvas = torch.where(masked, int(model.mask_token_id), completion_ids)
        h = model.backbone(torch.cat([prompt_ids, canvas], 1), attn)[:, p_len:].double()
        z = h @ head.T  # [B, C, V']
        p, q = torch.softmax(z, -1), torch.softmax(z / temperature, -1)
        conf = p.gather(2, slot[:, :, None])[:, :, 0]
        c_min = torch.where(sel, conf, torch.full_like(conf, math.inf)).min(1).values  # [B]; inf: nothing revealed
        below = torch.where(p < c_min[:, None, None], q, torch.zeros_like(q)).sum(-1)  # [B, C]
        total += torch.where(cand, below.log(), torch.zeros_like(below)).sum(1)
    return total
