"""The entropy-bounded (EB) sampler of ``stp.sampler.generate`` (``entropy_bound``): the commit rule against a
direct reading of it, its limits (gamma = 0: one token per step; a huge gamma: a whole block per step), per-sample
thresholds, anchors, temporal pruning, and its argument errors. Tiny model with random weights from a fixed seed."""

from __future__ import annotations

import pytest
import torch

from stp.models import load
from stp.sampler import Prior, entropy_bounded_commit, generate
from stp_kernels import available_backends


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    m = load("tiny")
    m.eval()
    return m


def _prompts(model, batch=3, width=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    special = {model.mask_token_id, model.eos_token_id, model.pad_token_id}
    allowed = torch.tensor([t for t in range(model.vocab_size) if t not in special])
    return allowed[torch.randint(0, allowed.numel(), (batch, width), generator=gen)]


def _per_step_counts(trace: torch.Tensor, passes: int) -> torch.Tensor:
    """[B, passes] positions committed by each forward pass (anchors excluded)."""
    return torch.stack([(trace == f).sum(1) for f in range(passes)], 1)


def test_commit_rule_is_the_largest_prefix_with_sum_minus_max_below_gamma():
    gen = torch.Generator().manual_seed(1)
    for _ in range(50):
        n = int(torch.randint(1, 12, (1,), generator=gen))
        h = torch.rand(1, n, generator=gen) * 2
        cand = torch.rand(1, n, generator=gen) < 0.7
        gamma = float(torch.rand(1, generator=gen) * 3)
        got = entropy_bounded_commit(h, cand, torch.tensor([gamma]), torch.tensor([n]))[0]
        # direct reading: try every prefix of the sorted candidates
        idx = [i for i in sorted(range(n), key=lambda i: (h[0, i].item(), i)) if cand[0, i]]
        best = 0
        for j in range(1, len(idx) + 1):
            vals = [h[0, i].item() for i in idx[:j]]
            if sum(vals) - max(vals) <= gamma + 1e-6:
                best = j
        best = max(best, 1) if idx else 0
        want = torch.zeros(n, dtype=torch.bool)
        want[idx[:best]] = True
        assert torch.equal(got, want), (h, cand, gamma, got, want)
    # the budget limit: 0 commits nothing, 1 at most one
    h = torch.tensor([[0.1, 0.2, 0.3]])
    cand = torch.ones(1, 3, dtype=torch.bool)
    assert entropy_bounded_commit(h, cand, torch.tensor([10.0]), torch.tensor([0])).sum() == 0
    assert entropy_bounded_commit(h, cand, torch.tensor([10.0]), torch.tensor([1])).tolist() == [[True, False, False]]


@pytest.mark.parametrize("block", [8, 16])
def test_gamma_zero_commits_one_token_per_step(model, block):
    ids = _prompts(model)
    out = generate(model, ids, gen_length=16, block_length=block, steps=16 // block, temperature=0.0,
                   entropy_bound=0.0, seed=0)
    assert out.forward_passes == 16 and out.nfe.tolist() == [16, 16, 16]
    counts = _per_step_counts(out.trace, out.forward_passes)
    assert (counts == 1).all()
    # blocks go left to right: every position of block 0 before any of block 1
    if block == 8:
        assert (out.trace[:, :8].max(1).values < out.trace[:, 8:].min(1).values).all()
    assert not (out.completions == model.mask_token_id).any()


def test_huge_gamma_commits_the_whole_block_in_one_step(model):
    ids = _prompts(model)
    out = generate(model, ids, gen_length=16, block_length=8, steps=2, temperature=0.0, entropy_bound=1e9, seed=0)
    assert out.forward_passes == 2 and out.nfe.tolist() == [2, 2, 2]
    assert (out.trace[:, :8] == 0).all() and (out.trace[:, 8:] == 1).all()


def test_per_sample_gamma_equals_each_sample_decoded_alone(model):
    ids = _prompts(model, batch=3)
    gammas = torch.tensor([0.0, 0.5, 1e9])
    out = generate(model, ids, gen_length=16, block_length=8, steps=2, temperature=0.9, entropy_bound=gammas,
                   seed=3, record_logprobs=True)
    assert out.nfe[0] == 16 and out.nfe[2] == 2 and 2 <= out.nfe[1] <= 16
    for b in range(3):
        alone = generate(model, ids[b:b + 1], gen_length=16, block_length=8, steps=2, temperature=0.9,
                         entropy_bound=float(gammas[b]), seed=3, sample_ids=torch.tensor([b]))
        assert torch.equal(alone.completions[0], out.completions[b])
        assert alone.nfe.item() == out.nfe[b].item()
    # the trajectory record: behaviour log-probs of committed tokens are finite and <= 0
    assert (out.behaviour_logprobs <= 0).all() and torch.isfinite(out.behaviour_logprobs).all()


def test_entropy_bound_with_anchors_and_temporal_pruning(model):
    ids = _prompts(model, batch=2)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[0, [1, 5, 9]] = True
    mask[1, [0, 15]] = True
    tokens = torch.where(mask, _prompts(model, batch=2, width=16, seed=5), torch.zeros(2, 16, dtype=torch.long))
    prior = Prior(tokens=tokens, mask=mask)
    out = generate(model, ids, gen_length=16, block_length=8, steps=2, temperature=0.0, entropy_bound=0.0,
                   prior=prior, seed=0)
    assert torch.equal(out.completions[mask], tokens[mask])  # anchors unchanged
    assert out.nfe.tolist() == [13, 14]  # one step per free position
    assert (out.commit_step[mask] == 0).all()
    # temporal pruning: budget floor(0.75 * 16) = 12 positions (anchors included), then the one-shot fill
    cut = generate(model, ids, gen_length=16, block_length=8, steps=2, temperature=0.0, entropy_bound=0.0,
                   prior=prior, early_stop=0.75, seed=0)
    assert cut.nfe.tolist() == [12 - 3 + 1, 12 - 2 + 1]
    assert cut.num_one_shot.tolist() == [4, 4]
    assert not (cut.completions == model.mask_token_id).any()
    # the steps before the cut decode exactly as without it
    kept = cut.trace < cut.forward_passes - 1
    assert torch.equal(cut.completions[kept & ~mask], out.completions[kept & ~mask])


def test_bad_entropy_bounds_are_refused(model):
    ids = _prompts(model, batch=2)
    kw = dict(gen_length=8, block_length=8, steps=1)
    with pytest.raises(ValueError, match="entropy_bound=-1.0; allowed: a finite number >= 0"):
        generate(model, ids, entropy_bound=-1.0, **kw)
    with pytest.raises(ValueError, match=r"shape \(3,\); allowed: \[B=2\]"):
        generate(model, ids, entropy_bound=torch.zeros(3), **kw)
    with pytest.raises(ValueError, match="outside"):
        generate(model, ids, entropy_bound=torch.tensor([0.0, float("nan")]), **kw)
    with pytest.raises(ValueError, match="confidence_threshold=0.5"):
        generate(model, ids, entropy_bound=1.0, confidence_threshold=0.5, **kw)
    with pytest.raises(ValueError, match="remasking='random'"):
        generate(model, ids, entropy_bound=1.0, remasking="random", **kw)


@pytest.mark.parametrize("backend", available_backends("cpu", op="sample_step"))
def test_every_backend_decodes_eb_like_the_reference(model, backend):
    """The entropies come from each backend's fused pass; a threshold far from any prefix sum commits the same
    positions everywhere (gamma 0 and a huge one are exact limits; 0.5 checks a real cut, with the float32
    entropies of the backends agreeing to ~1e-6)."""
    ids = _prompts(model, batch=2)
    for gamma in (0.0, 0.5, 1e9):
        ref = generate(model, ids, gen_length=16, block_length=8, steps=2, temperature=0.0, entropy_bound=gamma,
                       seed=0, backend="torch")
        got = generate(model, ids, gen_length=16, block_length=8, steps=2, temperature=0.0, entropy_bound=gamma,
                       seed=0, backend=backend)
        assert torch.equal(got.completions, ref.completions) and torch.equal(got.trace, ref.trace), (backend, gamma)
