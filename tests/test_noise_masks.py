"""noise_masks: a pure function of integers (processes, batch splits), the schemes' invariants, no global RNG."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from stp_kernels import noise_masks

LENGTHS = torch.tensor([9, 1, 17, 12, 17])
IDS = torch.tensor([3, 70, 5, 2**40, 11])


def _masks(seed=123, it=2, ids=IDS, lengths=LENGTHS, c=17, **kw):
    return noise_masks(seed, it, ids, lengths, num_draws=4, completion_length=c, **kw)


def test_identical_in_another_process():
    code = ("import torch, sys; from stp_kernels import noise_masks; "
            "m = noise_masks(123, 2, torch.tensor([3, 70, 5, 2**40, 11]), torch.tensor([9, 1, 17, 12, 17]), "
            "num_draws=4, completion_length=17); "
            "sys.stdout.write(''.join('1' if v else '0' for v in m.flatten().tolist()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    here = "".join("1" if v else "0" for v in _masks().flatten().tolist())
    assert out == here


def test_batch_split_and_position_invariant():
    full = _masks()
    perm = torch.tensor([4, 2, 0])
    # Another micro-batch: a subset, reordered, padded to a longer completion length.
    part = _masks(ids=IDS[perm], lengths=LENGTHS[perm], c=25)
    assert torch.equal(part[:, :, :17], full[perm])
    assert part[:, :, 17:].all()  # padding always masked
    d1_full, p_full = _masks(scheme="d1", prompt_mask=torch.ones(5, 6, dtype=torch.bool))
    # Left padding does not move the prompt counters: a wider prompt with 3 padding columns gives the same masks.
    pm = torch.ones(3, 9, dtype=torch.bool)
    pm[:, :3] = False
    _, p_part = _masks(ids=IDS[perm], lengths=LENGTHS[perm], scheme="d1", prompt_mask=pm)
    assert torch.equal(p_part[:, :, 3:], p_full[perm]) and not p_part[:, :, :3].any()


def test_depends_on_every_integer():
    base = _masks()
    assert not torch.equal(base, _masks(seed=124))
    assert not torch.equal(base, _masks(it=3))
    assert not torch.equal(base[:, 0], base[:, 1])


@pytest.mark.parametrize("scheme", ["random_count", "block", "d1"])
def test_anchors_never_masked_and_global_rng_untouched(scheme):
    gen = torch.Generator().manual_seed(0)
    anchors = torch.rand(5, 17, generator=gen) < 0.3
    state = torch.get_rng_state()
    out = _masks(scheme=scheme, anchors=anchors, prompt_mask=torch.ones(5, 4, dtype=torch.bool))
    assert torch.equal(state, torch.get_rng_state())
    masks = out[0] if scheme == "d1" else out
    assert not (masks & anchors[:, None]).any()
    pos = torch.arange(17)
    assert masks[(pos[None] >= LENGTHS[:, None])[:, None].expand_as(masks) & ~anchors[:, None]].all()


def test_random_count_distribution():
    # n_j ~ UniformInt{1..l}: the masked count of a length-8 completion is uniform over 1..8.
    n = 4000
    m = noise_masks(7, 0, torch.arange(n), torch.full((n,), 8), num_draws=1, completion_length=8)
    counts = torch.bincount(m.sum((1, 2)), minlength=9)
    assert counts[0] == 0
    assert ((counts[1:].float() / n - 1 / 8).abs() < 0.025).all(), counts
    # each position equally likely to be masked (mean rate (l + 1) / (2 l) = 9/16)
    assert ((m.float().mean((0, 1)) - 9 / 16).abs() < 0.04).all()


def test_d1_prompt_rate_and_validation():
    n = 2000
    _, pm = noise_masks(1, 0, torch.arange(n), torch.full((n,), 4), num_draws=1, completion_length=4, scheme="d1",
                        prompt_mask=torch.ones(n, 10, dtype=torch.bool), prompt_mask_prob=0.15)
    assert abs(pm.float().mean().item() - 0.15) < 0.01
    with pytest.raises(ValueError, match="lengths must lie"):
        noise_masks(1, 0, torch.arange(2), torch.tensor([0, 3]), num_draws=1, completion_length=4)
    with pytest.raises(ValueError, match="scheme"):
        noise_masks(1, 0, torch.arange(2), torch.tensor([1, 3]), num_draws=1, completion_length=4, scheme="x")
    with pytest.raises(ValueError, match="prompt_mask"):
        noise_masks(1, 0, torch.arange(2), torch.tensor([1, 3]), num_draws=1, completion_length=4, scheme="d1")


def test_block_scheme_structure():
    m = noise_masks(3, 0, torch.arange(200), torch.full((200,), 40), num_draws=1, completion_length=40,
                    scheme="block", block_length=8)[:, 0]
    first = m.int().argmax(1)
    block = first // 8
    pos = torch.arange(40)
    assert not (m & (pos[None] < (block * 8)[:, None])).any()  # clean before the chosen block
    assert m[pos[None] >= ((block + 1) * 8)[:, None]].all()  # fully masked after it
