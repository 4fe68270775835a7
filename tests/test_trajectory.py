"""The rollout's trajectory record (``stp.sampler.generate``): replaying it rebuilds the canvas before every forward
pass, and the behaviour log-probs equal a float64 recomputation from those canvases.

The model is the embedded tiny model with random weights (fixed seed); a wrapper records the canvas every backbone
call sees, which is the ground truth the replay must reproduce.
"""

from __future__ import annotations

import pytest
import torch

from stp.models import load
from stp.sampler import Prior, generate
from tests._decoding import Recording, random_prompts, vocab_without_mask


@pytest.fixture(scope="module")
def model():
    m = load("tiny")
    m.eval()
    return m


def _anchors(batch: int, length: int, seed: int, vocab_size: int, forbidden: set[int]) -> Prior:
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(batch, length, generator=g) < 0.3
    allowed = torch.tensor([t for t in range(vocab_size) if t not in forbidden])
    tokens = allowed[torch.randint(0, allowed.numel(), (batch, length), generator=g)]
    return Prior(tokens=tokens, mask=mask)


SETTINGS = [
    dict(gen_length=16, block_length=8, steps=8, temperature=0.9),
    dict(gen_length=16, block_length=16, steps=8, temperature=0.9, early_stop=0.7, anchors=True),
    dict(gen_length=12, block_length=4, steps=6, temperature=1.3, confidence_threshold=0.05, early_stop=0.9),
    dict(gen_length=16, block_length=8, steps=16, temperature=0.0, anchors=True),
    dict(gen_length=16, block_length=8, steps=8, temperature=0.7, remasking="random", early_stop=0.5),
]


@pytest.mark.parametrize("settings", SETTINGS)
def test_replaying_the_record_rebuilds_every_canvas(model, settings):
    settings = dict(settings)
    use_anchors = settings.pop("anchors", False)
    ids, attn = random_prompts(model, [5, 3, 7], seed=1)
    L = settings["gen_length"]
    prior = None
    if use_anchors:
        prior = _anchors(3, L, 2, model.vocab_size, {model.mask_token_id, model.eos_token_id, model.pad_token_id})
    vocab = vocab_without_mask(model)
    rec = Recording(model)
    out = generate(rec, ids, attention_mask=attn, prior=prior, seed=11, vocab=vocab, record_logprobs=True,
                   compact=False, **settings)  # every row in every pass: the recorded canvases are the batch's
    plain = generate(model, ids, attention_mask=attn, prior=prior, seed=11, vocab=vocab, **settings)
    assert torch.equal(out.completions, plain.completions) and torch.equal(out.nfe, plain.nfe)
    assert plain.behaviour_logprobs is None and torch.equal(plain.commit_step, out.commit_step)

    steps = out.commit_step
    assert len(rec.calls) == out.forward_passes >= int(steps.max())  # a pass may commit nothing (k = 0)
    if prior is not None:
        if settings.get("early_stop") is None:
            # Without a budget the schedule makes L - anchors commits, all within the passes.
            assert int((steps >= 1).sum()) == prior.mask.numel() - int(prior.mask.sum())
        assert torch.equal(steps == 0, prior.mask)  # anchors: given before step 1, and only they
        assert torch.equal(out.completions[prior.mask], prior.tokens[prior.mask])
    else:
        assert bool((steps >= 1).all())
    plen = ids.shape[1]
    mask_id = model.mask_token_id
    for f, seen in enumerate(rec.calls, start=1):
        rebuilt = torch.where(steps >= f, torch.full_like(out.completions, mask_id), out.completions)
        assert torch.equal(seen[:, plen:], rebuilt), f"canvas before pass {f} differs"
        assert torch.equal(seen[:, :plen], ids)
    # NFE: the passes a sample used; every pass that committed one of its positions is among them.
    distinct = [len(set(row) - {0}) for row in steps.tolist()]
    assert all(d <= n <= out.forward_passes for d, n in zip(distinct, out.nfe.tolist())), (distinct, out.nfe)

    # Behaviour log-probs: log softmax(z / T)[token] over the vocabulary prior, z from the canvas before the pass.
    lp = out.behaviour_logprobs
    assert lp.dtype == torch.float32 and lp.shape == out.completions.shape
    assert bool((lp[steps == 0] == 0).all())
    T = settings["temperature"]
    if T == 0:
        assert bool((lp == 0).all())
        return
    w = model.lm_head_weight.double().index_select(0, vocab)
    expected = torch.zeros_like(lp, dtype=torch.float64)
    for f, seen in enumerate(rec.calls, start=1):
        with torch.no_grad():
            h = model.backbone(seen, torch.cat([attn, torch.ones(3, L, dtype=torch.long)], 1))[:, plen:].double()
        logp = torch.log_softmax(h @ w.T / T, -1)  # [B, L, V']
        slot = torch.searchsorted(vocab, out.completions.contiguous())
        at_f = logp.gather(2, slot[..., None])[..., 0]
        expected = torch.where(steps == f, at_f, expected)
    err = (lp.double() - expected).abs()
    assert float(err.max()) < 1e-4, f"max error {float(err.max()):.3g} at {torch.nonzero(err == err.max())[0].tolist()}"
    assert bool((lp[steps > 0] < 0).all())
