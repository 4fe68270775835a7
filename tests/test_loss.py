"""GRPO loss: a hand-computed example, advantages, ratio exactly 1 at the first inner iteration, gradient routing."""

from __future__ import annotations

import pytest
import torch

from stp.loss import LikelihoodConfig, RolloutBatch, group_advantages, grpo_loss, policy_loss, rollout_logprobs
from stp.models import load


def test_hand_computed_example():
    # old = ref = 0, so r = exp(logp) and KL = exp(-logp) + logp - 1. epsilon 0.2, beta 0.5, all 4 tokens in m.
    #  (0,0) logp 0.3, A=+1: r=1.3498588 > 1.2 -> clipped term 1.2 wins the min: -1.2;   KL 0.0408182
    #  (0,1) logp -0.2, A=+1: r=0.8187308 inside [0.8, 1.2]:                 -0.8187308; KL 0.0214028
    #  (1,0) logp 0.0, A=-1: r=1:                                             +1;         KL 0
    #  (1,1) logp 0.3, A=-1: r*A=-1.3498588 < clip*A=-1.2, min is r*A:       +1.3498588; KL 0.0408182
    # loss = (-1.2 - 0.8187308 + 1 + 1.3498588 + 0.5 * (0.0408182 + 0.0214028 + 0.0408182)) / 4
    #      = (0.3311280 + 0.0515196) / 4 = 0.0956619
    logp = torch.tensor([[0.3, -0.2], [0.0, 0.3]])
    zeros = torch.zeros(2, 2)
    loss, met = grpo_loss(logp, zeros, zeros, torch.tensor([1.0, -1.0]), torch.ones(2, 2), epsilon=0.2, beta=0.5)
    assert loss.item() == pytest.approx(0.0956619, abs=1e-6)
    assert met["clip_fraction"].item() == pytest.approx(0.25)
    assert met["kl"].item() == pytest.approx(0.1030392 / 4, abs=1e-6)
    assert met["ratio"].item() == pytest.approx((1.3498588 * 2 + 0.8187308 + 1) / 4, abs=1e-6)
    # Masking token (1,1) out: normalised over the 3 remaining tokens.
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    loss, _ = grpo_loss(logp, zeros, zeros, torch.tensor([1.0, -1.0]), mask, epsilon=0.2, beta=0.5)
    assert loss.item() == pytest.approx((-1.2 - 0.8187308 + 1 + 0.5 * (0.0408182 + 0.0214028)) / 3, abs=1e-6)
    with pytest.raises(ValueError, match="needs ref_logprobs"):
        grpo_loss(logp, zeros, None, torch.tensor([1.0, -1.0]), mask, beta=0.1)


def test_group_advantages():
    rewards = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0])
    a = group_advantages(rewards, 3)
    torch.testing.assert_close(a, torch.tensor([-1 / 1.0001, 0.0, 1 / 1.0001, 0.0, 0.0, 0.0]))
    torch.testing.assert_close(group_advantages(rewards, 3, scale_rewards=False),
                               torch.tensor([-1.0, 0.0, 1.0, 0.0, 0.0, 0.0]))
    with pytest.raises(ValueError, match="divisible"):
        group_advantages(rewards, 4)


@pytest.fixture(scope="module")
def rollout():
    model = load("tiny")
    model.eval()
    gen = torch.Generator().manual_seed(3)
    b, p, c = 4, 6, 10
    prompt = torch.randint(10, 100, (b, p), generator=gen)
    pam = torch.ones(b, p, dtype=torch.long)
    pam[1, :2] = 0
    comp = torch.randint(10, 100, (b, c), generator=gen)
    comp[0, 6:] = model.eos_token_id
    anchors = torch.rand(b, c, generator=gen) < 0.2
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.5, 2.0]), 2)
    return model, RolloutBatch(prompt, pam, comp, adv, torch.tensor([7, 8, 9, 10]), anchors)


@pytest.mark.parametrize("estimator,score", [("stp", "all"), ("stp", "masked"), ("elbo", "elbo"), ("d1", "all")])
def test_first_iteration_ratio_exactly_one(rollout, estimator, score):
    model, batch = rollout
    cfg = LikelihoodConfig(estimator=estimator, score=score, num_draws=1 if estimator == "d1" else 3)
    old, ref = rollout_logprobs(model, batch, seed=5, num_iterations=2, likelihood=cfg, beta=0.04, ref_model=model)
    assert old.shape == (2, 4, 10) and not old.requires_grad
    assert not torch.equal(old[0], old[1])  # each inner iteration draws its own masks
    loss, met = policy_loss(model, batch, seed=5, iteration=0, old_logprobs=old, ref_logprobs=ref, likelihood=cfg)
    assert loss.requires_grad
    assert met["ratio"].item() == 1.0 and met["ratio_max"].item() == 1.0  # exactly, not approximately
    assert met["kl"].item() == 0.0 and met["clip_fraction"].item() == 0.0


def test_gradient_flows_only_into_trainable_parameters(rollout):
    _, batch = rollout
    model = load("tiny")
    model.eval()
    frozen = {n for n, _ in model.named_parameters() if "mlp" in n or "lm_head" in n}
    for n, prm in model.named_parameters():
        prm.requires_grad_(n not in frozen)
    cfg = LikelihoodConfig()
    old, _ = rollout_logprobs(model, batch, seed=2, num_iterations=2, likelihood=cfg, beta=0.0)
    loss, _ = policy_loss(model, batch, seed=2, iteration=1, old_logprobs=old, ref_logprobs=None, likelihood=cfg,
                          beta=0.0)
    loss.backward()
    for n, prm in model.named_parameters():
        assert (prm.grad is None) == (n in frozen), n
    assert any(prm.grad.abs().sum() > 0 for n, prm in model.named_parameters() if n not in frozen)
