"""The sampler against a straightforward reference of LLaDA's algorithm, and its pruning options.

The reference below is written from the algorithm (docs/method.md section 0), as LLaDA's own `generate` does it: full
logits, float64 softmax, Gumbel noise as exp(z) / (-log u)^T, a Python loop over rows for top-k. It reads its noise
u from the same counter the sampler uses (`counter_uniform`): a fixed noise tensor shared by both.
The model is the embedded tiny model with random weights from a fixed seed: the comparisons are deterministic.
"""

from __future__ import annotations

import math

import pytest
import torch

from stp.models import load
from stp.sampler import ANCHOR, Prior, generate, transfer_schedule
from stp_kernels.reference import counter_uniform, row_keys
from tests._decoding import random_prompts, vocab_without_mask


@pytest.fixture(scope="module")
def model():
    m = load("tiny")
    m.eval()
    return m


def llada_reference(model, prompt, *, steps, gen_length, block_length, temperature, seed, sample_id=0):
    """LLaDA's generate for one unpadded prompt [1, P], noise u from the shared counter."""
    mask_id = model.mask_token_id
    plen = prompt.shape[1]
    x = torch.full((1, plen + gen_length), mask_id, dtype=torch.long)
    x[:, :plen] = prompt
    num_blocks = gen_length // block_length
    steps_per_block = steps // num_blocks
    vocab = torch.arange(model.vocab_size)
    for nb in range(num_blocks):
        lo, hi = plen + nb * block_length, plen + (nb + 1) * block_length
        block_mask = x[:, lo:hi] == mask_id
        mask_num = block_mask.sum(1, keepdim=True)
        num_transfer = torch.zeros(1, steps_per_block, dtype=torch.long) + mask_num // steps_per_block
        num_transfer[0, : int(mask_num[0, 0] % steps_per_block)] += 1
        for i in range(steps_per_block):
            step = nb * steps_per_block + i
            mask_index = x == mask_id
            logits = model.logits(x).double()
            if temperature > 0:
                row_ids = sample_id * gen_length + torch.arange(-plen, gen_length)  # prompt rows: unused
                u = counter_uniform(row_keys(seed, step, row_ids), vocab).double()[None]
                logits_with_noise = logits.exp() / (-torch.log(u)) ** temperature
            else:
                logits_with_noise = logits
            x0 = logits_with_noise.argmax(-1)
            p = torch.softmax(logits, dim=-1)
            x0_p = p.gather(-1, x0[..., None])[..., 0]
            x0_p[:, hi:] = -math.inf
            x0 = torch.where(mask_index, x0, x)
            confidence = torch.where(mask_index, x0_p, -math.inf)
            transfer = torch.zeros_like(x0, dtype=torch.bool)
            for j in range(confidence.shape[0]):
                _, select = torch.topk(confidence[j], k=int(num_transfer[j, i]))
                transfer[j, select] = True
            x[transfer] = x0[transfer]
    return x


@pytest.mark.slow
@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_equals_llada_reference(model, temperature):
    prompts, _ = random_prompts(model, [7, 7], seed=1)
    kw = dict(steps=16, gen_length=32, block_length=8, temperature=temperature)
    out = generate(model, prompts, seed=11, **kw)
    for b in range(prompts.shape[0]):
        ref = llada_reference(model, prompts[b:b + 1], seed=11, sample_id=b, **kw)
        assert torch.equal(out.sequences[b], ref[0]), f"sample {b} differs from LLaDA's algorithm"
    assert (out.nfe == 16).all() and out.forward_passes == 16 and not out.one_shot.any()


def test_trace_follows_the_schedule(model):
    prompts, _ = random_prompts(model, [5, 5, 5], seed=2)
    out = generate(model, prompts, steps=12, gen_length=24, block_length=8, seed=3, temperature=0.7,
                   vocab=vocab_without_mask(model))
    per_step = torch.stack([(out.trace == s).sum(1) for s in range(12)], 1)  # [B, steps]
    expected = transfer_schedule(torch.full((3,), 8), 4).repeat(1, 3)  # 3 blocks x 4 steps
    assert torch.equal(per_step, expected)
    # a position is committed while its block is decoded
    block_of_step = torch.arange(12) // 4
    assert torch.equal(block_of_step[out.trace], (torch.arange(24) // 8).expand(3, -1))


def test_anchors_are_kept_and_excluded_from_transfers(model):
    prompts, _ = random_prompts(model, [6, 6], seed=4)
    gen = torch.Generator().manual_seed(5)
    lp = 20  # the prior covers the first 20 of 32 canvas positions
    tokens = torch.randint(10, model.vocab_size - 10, (2, lp), generator=gen)
    mask = torch.rand(2, lp, generator=gen) < 0.5
    out = generate(model, prompts, steps=16, gen_length=32, block_length=8, seed=6, temperature=0.8,
                   prior=Prior(tokens=tokens, mask=mask), vocab=vocab_without_mask(model))
    comp = out.completions
    assert torch.equal(comp[:, :lp][mask], tokens[mask]), "an anchor changed"
    assert torch.equal(out.trace[:, :lp] == ANCHOR, mask)
    assert torch.equal(out.anchors_kept, mask.sum(1))
    assert (comp != model.mask_token_id).all()
    # transfer counts: each block's schedule runs over its non-anchor positions only
    masked = torch.ones(2, 32, dtype=torch.bool)
    masked[:, :lp] = ~mask
    k = transfer_schedule(masked.view(2, 4, 8).sum(-1).reshape(-1), 4).view(2, 16)
    assert torch.equal(torch.stack([(out.trace == s).sum(1) for s in range(16)], 1), k)


@pytest.mark.slow
def test_early_stop_saves_the_expected_forward_passes(model):
    """L=256, block 32, 128 steps, tau=0.95: 2 tokens per step, budget floor(0.95*256) = 243 filled positions.
    After 121 steps 242 are filled; step 122 transfers 1 (reaching 243) and the sample is done; one more forward
    fills the remaining 13 positions. NFE = 122 + 1 = 123 instead of 128."""
    prompts, _ = random_prompts(model, [4, 4], seed=7)
    out = generate(model, prompts, steps=128, gen_length=256, block_length=32, early_stop=0.95, seed=8,
                   temperature=0.5, vocab=vocab_without_mask(model))
    assert out.nfe.tolist() == [123, 123] and out.forward_passes == 123
    assert out.num_one_shot.tolist() == [13, 13]
    assert torch.equal(out.one_shot, out.trace == 122)
    assert ((out.trace >= 0) & (out.trace < 122)).sum(1).tolist() == [243, 243]
    assert (out.completions != model.mask_token_id).all()


def test_early_stop_landing_exactly_on_the_budget_stops_there(model):
    """L=64, block 16, 32 steps (2 tokens per step), tau=0.95: budget floor(60.8) = 60 = 48 + 2 * 6, reached exactly
    at step 29 with its whole k: the sample stops there, NFE = 30 + the fill = 31. (The STP authors' code marks a
    sample done only when its count would pass the budget: it would run step 30, commit nothing there, and count
    32.)"""
    prompts, _ = random_prompts(model, [4], seed=3)
    out = generate(model, prompts, steps=32, gen_length=64, block_length=16, early_stop=0.95, seed=2,
                   vocab=vocab_without_mask(model))
    assert out.nfe.tolist() == [31] and out.forward_passes == 31
    assert (out.trace == 29).sum().item() == 2 and torch.equal(out.one_shot, out.trace == 30)
    assert ((out.trace >= 0) & ~out.one_shot).sum().item() == 60


@pytest.mark.slow
def test_early_stop_with_anchors_counts_them_in_the_budget(model):
    prompts, _ = random_prompts(model, [4], seed=9)
    mask = torch.zeros(1, 64, dtype=torch.bool)
    mask[0, :40:2] = True  # 20 anchors
    tokens = torch.full((1, 64), 12)
    out = generate(model, prompts, steps=32, gen_length=64, block_length=16, early_stop=0.75, seed=1,
                   prior=Prior(tokens=tokens, mask=mask), vocab=vocab_without_mask(model))
    budget = math.floor(0.75 * 64)
    decoded = ((out.trace >= 0) & ~out.one_shot).sum().item()
    assert decoded + 20 == budget
    assert out.num_one_shot.item() == 64 - budget
    assert out.nfe.item() < 32 + 1


@pytest.mark.slow
def test_mixed_prompt_lengths_equal_one_by_one(model):
    lengths = [3, 9, 6]
    prompts, mask = random_prompts(model, lengths, seed=10)
    kw = dict(steps=8, gen_length=16, block_length=8, seed=21, temperature=0.8)
    batch = generate(model, prompts, attention_mask=mask, **kw)
    for b, n in enumerate(lengths):
        alone = generate(model, prompts[b:b + 1, -n:], sample_ids=torch.tensor([b]), **kw)
        assert torch.equal(batch.completions[b], alone.completions[0]), f"prompt {b} (length {n}) differs"


@pytest.mark.slow
def test_random_remasking_and_threshold_decoding(model):
    prompts, _ = random_prompts(model, [5, 5], seed=12)
    rnd = generate(model, prompts, steps=16, gen_length=32, block_length=8, seed=2, remasking="random",
                   vocab=vocab_without_mask(model))
    assert (rnd.completions != model.mask_token_id).all()
    thr = generate(model, prompts, steps=16, gen_length=32, block_length=8, seed=2, confidence_threshold=0.02,
                   vocab=vocab_without_mask(model))
    assert (thr.completions != model.mask_token_id).all()
    assert (thr.nfe <= 16).all() and thr.forward_passes <= 16
    per_step = torch.stack([(thr.trace == s).sum(1) for s in range(thr.forward_passes)], 1)
    assert (per_step.sum(1) == 32).all()


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(gen_length=30, block_length=8, steps=8), "gen_length=30 is not divisible by block_length=8"),
        (dict(gen_length=32, block_length=8, steps=10), "steps=10 is not divisible by the number of blocks"),
        (dict(gen_length=32, block_length=8, steps=8, early_stop=1.5), r"early_stop \(tau\) must be in \(0, 1\]"),
        (dict(gen_length=32, block_length=8, steps=8, remasking="top"), "remasking='top'"),
        (dict(gen_length=8, block_length=8, steps=8,
              prior=Prior(tokens=torch.zeros(1, 9, dtype=torch.long), mask=torch.ones(1, 9, dtype=torch.bool))),
         "longer than the canvas"),
        (dict(gen_length=8, block_length=8, steps=8, vocab=torch.tensor([5, 3, 9])), "sorted strictly increasing"),
    ],
)
def test_bad_arguments(model, kwargs, message):
    prompts, _ = random_prompts(model, [4], seed=0)
    with pytest.raises(ValueError, match=message):
        generate(model, prompts, **kwargs)
