"""The packed estimators against a direct unfused reference: a loop over draws, full logits, log_softmax, gather."""

from __future__ import annotations

import pytest
import torch

from stp.likelihood import per_token_logprobs, valid_lengths
from stp.models import load

B, P, C = 3, 7, 11


@pytest.fixture(scope="module")
def model():
    m = load("tiny")
    m.eval()
    return m


@pytest.fixture(scope="module")
def batch(model):
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(10, 100, (B, P), generator=gen)
    pam = torch.ones(B, P, dtype=torch.long)
    pam[0, :3] = 0
    prompt[0, :3] = model.pad_token_id
    comp = torch.randint(10, 100, (B, C), generator=gen)
    comp[1, 4:] = model.eos_token_id  # l = 5
    comp[2, 9] = model.eos_token_id  # l = 10, one more token after it
    anchors = torch.zeros(B, C, dtype=torch.bool)
    anchors[:, [2, 6]] = True
    return prompt, pam, comp, anchors


def _draw_logp(model, prompt, pam, comp, comp_mask, prompt_mask=None):
    """log p(y_c | draw) for every position: [B, C], from full float64 logits of one draw."""
    ids_p = prompt if prompt_mask is None else torch.where(prompt_mask, model.mask_token_id, prompt)
    ids = torch.cat([ids_p, torch.where(comp_mask, model.mask_token_id, comp)], 1)
    attn = torch.cat([pam, torch.ones_like(comp)], 1)
    logits = model.logits(ids, attn)[:, P:].double()
    return logits.log_softmax(-1).gather(2, comp[..., None])[..., 0]


def _reference(model, prompt, pam, comp, anchors, out, estimator, score):
    k = out.masks.shape[1]
    valid = torch.arange(C)[None] < valid_lengths(comp, model.eos_token_id)[:, None]
    per_draw = torch.stack([_draw_logp(model, prompt, pam, comp, out.masks[:, j],
                                       None if out.prompt_masks is None else out.prompt_masks[:, j])
                            for j in range(k)], 1)  # [B, K, C]
    hit = out.masks & valid[:, None]
    if score == "all":
        res = per_draw.mean(1)
    elif score == "masked":
        cnt = hit.sum(1)
        res = (per_draw * hit).sum(1) / cnt.clamp(min=1)
        full = torch.ones(B, C, dtype=torch.bool) if anchors is None else ~anchors
        res = torch.where(cnt == 0, _draw_logp(model, prompt, pam, comp, full), res)
    else:
        free = valid if anchors is None else valid & ~anchors
        w = free.sum(1)[:, None, None] / hit.sum(2, keepdim=True).clamp(min=1)
        res = (per_draw * hit * w).sum(1) / k
    return torch.where(valid, res, torch.zeros((), dtype=res.dtype))


@pytest.mark.parametrize("estimator,score", [("stp", "all"), ("stp", "masked"), ("stp", "elbo"), ("elbo", "all"),
                                             ("elbo", "masked"), ("elbo", "elbo"), ("d1", "all"), ("d1", "masked")])
def test_against_unfused_reference(model, batch, estimator, score):
    prompt, pam, comp, anchors = batch
    anchors = anchors if estimator == "stp" else None
    k = 1 if estimator == "d1" else 3
    with torch.no_grad():
        out = per_token_logprobs(model, prompt, pam, comp, anchors=anchors, seed=11, iteration=1, num_draws=k,
                                 estimator=estimator, score=score, prompt_mask_prob=0.3)
        ref = _reference(model, prompt, pam, comp, anchors, out, estimator, score)
    assert out.logprobs.dtype == torch.float32 and out.logprobs.shape == (B, C)
    torch.testing.assert_close(out.logprobs.double(), ref, atol=2e-5, rtol=1e-5)
    if anchors is not None:
        assert not (out.masks & anchors[:, None]).any()
    assert torch.equal(out.valid, torch.arange(C)[None] < torch.tensor([C, 5, 10])[:, None])


def test_chunking_and_sample_ids(model, batch):
    prompt, pam, comp, anchors = batch
    kw = dict(anchors=anchors, seed=4, iteration=0, num_draws=3, estimator="stp", score="masked")
    with torch.no_grad():
        whole = per_token_logprobs(model, prompt, pam, comp, **kw)
        chunked = per_token_logprobs(model, prompt, pam, comp, memory_budget=1, **kw)
        # The second sample alone, as another gradient-accumulation micro-batch would hold it.
        alone = per_token_logprobs(model, prompt[1:2], pam[1:2], comp[1:2], sample_ids=torch.tensor([1]),
                                   **{**kw, "anchors": anchors[1:2]})
    assert whole.num_chunks == 1 and chunked.num_chunks == B
    torch.testing.assert_close(chunked.logprobs, whole.logprobs, atol=1e-5, rtol=1e-5)
    assert torch.equal(alone.masks, whole.masks[1:2])
    torch.testing.assert_close(alone.logprobs, whole.logprobs[1:2], atol=1e-5, rtol=1e-5)


def test_gradient_reaches_only_trainable_parameters(model, batch):
    prompt, pam, comp, anchors = batch
    net = load("tiny")
    frozen = {n for n, _ in net.named_parameters() if ".layers.0." in n or n.endswith("embed_tokens.weight")}
    for n, p in net.named_parameters():
        p.requires_grad_(n not in frozen)
    out = per_token_logprobs(net, prompt, pam, comp, anchors=anchors, seed=1, iteration=0, num_draws=2)
    (out.logprobs * torch.randn(B, C, generator=torch.Generator().manual_seed(1))).sum().backward()
    for n, p in net.named_parameters():
        if n in frozen:
            assert p.grad is None, n
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, n


def test_bad_arguments(model, batch):
    prompt, pam, comp, anchors = batch
    with pytest.raises(ValueError, match="takes no anchors"):
        per_token_logprobs(model, prompt, pam, comp, anchors=anchors, seed=0, iteration=0, estimator="elbo")
    with pytest.raises(ValueError, match="score="):
        per_token_logprobs(model, prompt, pam, comp, seed=0, iteration=0, score="nope")
    with pytest.raises(ValueError, match="score='elbo'"):
        per_token_logprobs(model, prompt, pam, comp, seed=0, iteration=0, estimator="d1", score="elbo")
