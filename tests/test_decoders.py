"""Decoders as plug-ins (``stp.decoders``): the plug-in loop against the sampler before the refactor, the registry,
the committed-[MASK] rule of the shared loop, and Fast-dLLM's rule against a reference loop written from it."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import math
import tempfile
from pathlib import Path

import pytest
import torch

from benchmarks import compare_decoding
from stp import decoders
from stp.decoding import DreamDecoding
from stp.models import build_tiny
from stp.sampler import Prior, generate

from . import _sampler_reference

_FIELDS = ("completions", "commit_step", "nfe", "one_shot", "behaviour_logprobs")


def _same(got, ref, what):
    for f in _FIELDS:
        a, b = getattr(got, f), getattr(ref, f)
        assert torch.equal(a, b), f"{what}: {f} differ"
    assert got.forward_passes == ref.forward_passes, f"{what}: forward passes differ"


def _quick(name: str) -> bool:
    """A fifth of the tiny grid for the quick tests: sampled draws, every decoder and cache, alternating extras."""
    return "/t09/" in name and not name.endswith("/plain")


def _grid_equal(models_wanted, quick=False):
    with tempfile.TemporaryDirectory() as tmp:
        ms = compare_decoding.models(Path(tmp)) if models_wanted != {"tiny"} else {"tiny": build_tiny(
            seed=3, num_hidden_layers=2).eval()}
        n = 0
        for name, mkey, kw in compare_decoding.grid(no_mask_vocab=True):
            if mkey not in models_wanted or (quick and not _quick(name)):
                continue
            got = compare_decoding.run_case(ms[mkey], dict(kw, compact=False))
            orig = compare_decoding.generate
            compare_decoding.generate = _sampler_reference.generate
            try:
                ref = compare_decoding.run_case(ms[mkey], kw)
            finally:
                compare_decoding.generate = orig
            for k in ref:
                assert torch.equal(got[k], ref[k]), f"{name}: {k} differ from the sampler before the refactor"
            n += 1
        assert n > 0


def test_plugin_loop_equals_the_loop_before_plugins_tiny_quick():
    """Every decoder and cache mode of the grid (benchmarks.compare_decoding) on the tiny model with anchors and early
    stop, padding, CFG and a vocabulary prior: tokens, commit steps, NFE, one-shot fills and behaviour log-probs bit
    for bit those of the frozen pre-refactor sampler (tests/_sampler_reference); no [MASK] in the vocabulary, where
    the committed-[MASK] fix plays no part."""
    _grid_equal({"tiny"}, quick=True)


@pytest.mark.slow
def test_plugin_loop_equals_the_loop_before_plugins_tiny():
    _grid_equal({"tiny"})


@pytest.mark.slow
def test_plugin_loop_equals_the_loop_before_plugins_micro_checkpoints():
    _grid_equal({"llada", "dream"})


def test_registry_finds_every_decoder_by_name():
    assert list(decoders.DECODERS)[:2] == ["low_confidence", "random"]
    assert {"confidence_threshold", "entropy_bound", "dream", "fast_dllm"} <= set(decoders.DECODERS)
    for name, cls in decoders.DECODERS.items():
        assert cls.name == name and cls.pace in ("schedule", "free")
    with pytest.raises(ValueError, match="decoder 'nope': allowed: low_confidence, random"):
        decoders.get("nope")


@pytest.mark.parametrize("legacy, rule", [
    (dict(), "low_confidence"),
    (dict(remasking="random"), decoders.get("random")),
    (dict(confidence_threshold=0.05), decoders.get("confidence_threshold", threshold=0.05)),
    (dict(entropy_bound=0.7), decoders.get("entropy_bound", gamma=0.7)),
    (dict(dream=DreamDecoding(alg="maskgit_plus")), decoders.get("dream", options=DreamDecoding(alg="maskgit_plus"))),
])
def test_decoder_argument_equals_the_legacy_keywords(legacy, rule):
    model = build_tiny(seed=1, num_hidden_layers=1).eval()
    ids = torch.randint(10, 60, (3, 4), generator=torch.Generator().manual_seed(0))
    base = dict(gen_length=16, block_length=8, steps=8, temperature=0.7, seed=4, record_logprobs=True,
                early_stop=0.8)
    _same(generate(model, ids, decoder=rule, **base), generate(model, ids, **legacy, **base), str(legacy))


def test_decoder_with_a_legacy_keyword_is_refused():
    model = build_tiny(seed=1, num_hidden_layers=1).eval()
    with pytest.raises(ValueError, match="decoder='fast_dllm' cannot be combined with entropy_bound=0.5"):
        generate(model, torch.ones(1, 2, dtype=torch.long) * 10, gen_length=8, block_length=8, steps=8,
                 decoder="fast_dllm", entropy_bound=0.5)
    with pytest.raises(ValueError, match="fast_dllm threshold=1.5; allowed: a number in"):
        generate(model, torch.ones(1, 2, dtype=torch.long) * 10, gen_length=8, block_length=8, steps=8,
                 decoder=decoders.get("fast_dllm", threshold=1.5))


# ------------------------------------------------------------------ a committed [MASK] is not a filled position


class _MaskFirst:
    """A model that predicts its own [MASK] at canvas position 0 in its first ``mask_calls`` forward passes (as an
    untrained model may), and token 5 + p at position p otherwise, with confidence falling with p. Logits = hidden
    states (identity LM head), vocabulary 16, [MASK] = 15."""

    mask_token_id = 15
    vocab_size = 16

    def __init__(self, plen: int, mask_calls: int):
        self.plen, self.mask_calls, self.calls = plen, mask_calls, 0
        self.lm_head_weight = torch.eye(16)

    def backbone(self, x, attn=None):
        self.calls += 1
        batch, total = x.shape
        h = torch.zeros(batch, total, 16)
        for p in range(total - self.plen):
            h[:, self.plen + p, 5 + p] = 6.0 - p
        if self.calls <= self.mask_calls:
            h[:, self.plen, :] = 0.0
            h[:, self.plen, 15] = 12.0
        return h


@pytest.mark.parametrize("rule", ["entropy_bound", "confidence_threshold", "fast_dllm"])
def test_a_committed_mask_does_not_count_toward_the_budget(rule):
    """With temporal pruning, a row stops once floor(tau * L) positions hold real tokens: a step that commits
    [MASK] (the position stays masked) does not count, so exactly the budget is decoded by steps and the rest by
    the one-shot fill."""
    settings = {"entropy_bound": dict(gamma=0.0), "confidence_threshold": dict(threshold=0.999),
                "fast_dllm": dict(threshold=0.999)}[rule]
    model = _MaskFirst(plen=2, mask_calls=1)
    out = generate(model, torch.full((1, 2), 3), gen_length=4, block_length=4, steps=4, early_stop=0.5,
                   decoder=decoders.get(rule, **settings))
    assert out.completions.tolist() == [[5, 6, 7, 8]]
    assert int(out.num_one_shot[0]) == 4 - 2, "the row stopped before decoding its budget of real tokens"
    assert out.commit_step[0].tolist() == [2, 3, 4, 4] and int(out.nfe[0]) == 4


def test_dream_keeps_decoding_a_committed_mask():
    """Dream's diffusion_generate recounts the masked positions at every step: a position whose committed x0 was
    [MASK] is decoded again and the last step commits every masked position (no [MASK] left)."""
    model = _MaskFirst(plen=2, mask_calls=2)
    out = generate(model, torch.full((1, 2), 3), gen_length=4, block_length=4, steps=4,
                   decoder=decoders.get("dream", options=DreamDecoding(alg="maskgit_plus")))
    assert out.completions.tolist() == [[5, 6, 7, 8]]
    # Dream's counts for M masked: int(M (1 - s / t)) at steps 1-3 (0, then 1 [MASK] at pass 2, then 1), then all.
    assert out.commit_step[0].tolist() == [3, 4, 4, 4] and out.forward_passes == 4


# ------------------------------------------------------------------ live-row compaction


def _compact_grid(models_wanted, exact: bool, quick=False):
    with tempfile.TemporaryDirectory() as tmp:
        ms = compare_decoding.models(Path(tmp)) if models_wanted != {"tiny"} else {"tiny": build_tiny(
            seed=3, num_hidden_layers=2).eval()}
        compacted = 0
        for name, mkey, kw in compare_decoding.grid(no_mask_vocab=False):
            if mkey not in models_wanted or (quick and not _quick(name)):
                continue
            model = _CountRows(ms[mkey])
            got = compare_decoding.run_case(model, dict(kw, compact=True))
            rows_on = model.rows
            model.rows = 0
            ref = compare_decoding.run_case(model, dict(kw, compact=False))
            compacted += rows_on < model.rows
            for k in ref:
                if exact or k != "behaviour_logprobs":
                    assert torch.equal(got[k], ref[k]), f"{name}: {k} differ with compaction"
                else:
                    assert torch.allclose(got[k], ref[k], atol=1e-5, rtol=0), f"{name}: log-probs differ"
        assert compacted > (5 if quick else 10), "the grid never compacted"


class _CountRows:
    """The model, with the batch rows of its forward passes counted."""

    def __init__(self, model):
        self._model, self.rows = model, 0

    def __getattr__(self, name):
        return getattr(self._model, name)

    def backbone(self, x, attn=None, **kw):
        self.rows += x.shape[0]
        return self._model.backbone(x, attn, **kw)


def test_compaction_is_exact_on_the_tiny_model_quick():
    _compact_grid({"tiny"}, exact=True, quick=True)


@pytest.mark.slow
def test_compaction_is_exact_on_the_tiny_model():
    """Every option of the grid, [MASK] draws included (early stop, EB with per-sample gamma, thresholds, Dream's
    counts, prefix and dual caches, CFG, padding): with and without live-row compaction the tokens, commit steps,
    NFE, one-shot fills and log-probs are bit for bit equal, while the compacted runs send fewer rows through the
    model. The tiny model's rows are computed independently of their batch on CPU, so equality is bitwise."""
    _compact_grid({"tiny"}, exact=True)


@pytest.mark.slow
def test_compaction_on_micro_checkpoints():
    """The micro LLaDA / Dream checkpoints' forward is batch-invariant only up to float rounding (a row's hidden
    state may differ in the last bit with the batch size on CPU): tokens, commit steps and NFE equal, log-probs
    within 1e-5."""
    _compact_grid({"llada", "dream"}, exact=False)


# ------------------------------------------------------------------ Fast-dLLM's rule against a reference loop


def free_pace_reference(model, prompt, choose, *, gen_length, block_length, temperature, seed, sample_id,
                        early_stop=None, anchors=None):
    """A block-by-block decoding for one unpadded prompt [1, P], written from the rules: each step runs the model on
    the whole sequence, draws x0 (Gumbel-max from the shared counter noise, float64 logits, [MASK] excluded) and
    commits ``choose(candidates, confidence, entropy)`` (a list of positions, most preferred first) among the masked
    positions of the first block that has one; a block ends when it has no [MASK]. With early_stop, at most the
    budget left is committed and the rest is filled by one more pass. Returns completion, commit steps (1-based; 0
    anchors), NFE."""
    from stp.sampler import _FILL_STEP
    from stp_kernels.reference import counter_uniform, row_keys

    mask_id, plen = model.mask_token_id, prompt.shape[1]
    x = torch.cat([prompt, torch.full((1, gen_length), mask_id)], 1)
    commit_step = torch.zeros(gen_length, dtype=torch.long)
    if anchors is not None:
        tokens, where = anchors
        x[0, plen:][where] = tokens[where]
    budget = math.floor(early_stop * gen_length) if early_stop is not None else gen_length
    filled = int((x[0, plen:] != mask_id).sum())
    vocab = torch.arange(model.vocab_size)

    def draw(step):
        with torch.no_grad():
            logits = model.logits(x).double()[0, plen:]
        logits[:, mask_id] = -math.inf
        if temperature > 0:
            u = counter_uniform(row_keys(seed, step, sample_id * gen_length + torch.arange(gen_length)), vocab).double()
            x0 = (logits.exp() / (-torch.log(u)) ** temperature).argmax(-1)
        else:
            x0 = logits.argmax(-1)
        p = torch.softmax(logits, -1)
        entropy = -torch.special.xlogy(p, p).sum(-1)
        return x0, p.gather(1, x0[:, None])[:, 0], entropy

    step = 0
    for b in range(gen_length // block_length):
        lo, hi = b * block_length, (b + 1) * block_length
        while filled < budget and bool((x[0, plen + lo:plen + hi] == mask_id).any()):
            x0, conf, entropy = draw(step)
            cand = [j for j in range(lo, hi) if int(x[0, plen + j]) == mask_id]
            take = choose(cand, conf, entropy)
            for j in take[:budget - filled]:
                x[0, plen + j] = x0[j]
                commit_step[j] = step + 1
            filled += len(take[:budget - filled])
            step += 1
    nfe = step
    left = x[0, plen:] == mask_id
    if bool(left.any()):
        x0, _, _ = draw(_FILL_STEP)
        x[0, plen:][left] = x0[left]
        commit_step[left] = -1  # the one-shot fill: the batch's last pass
        nfe += 1
    return x[0, plen:], commit_step, nfe


def fast_dllm_reference(model, prompt, *, threshold, **kw):
    """Fast-dLLM's threshold decoding: the most confident masked position of the block and every other with
    confidence >= threshold."""
    def choose(cand, conf, entropy):
        order = sorted(cand, key=lambda j: (-float(conf[j]), j))
        return [order[0]] + [j for j in order[1:] if float(conf[j]) >= threshold]
    return free_pace_reference(model, prompt, choose, **kw)


def eb_reference(model, prompt, *, gamma, order, **kw):
    """The entropy-bounded rule: the block's masked positions sorted by entropy (lowest first) or by confidence
    (highest first), and the longest prefix whose entropies have sum - max <= gamma (at least one position)."""
    def choose(cand, conf, entropy):
        key = (lambda j: (float(entropy[j]), j)) if order == "entropy" else (lambda j: (-float(conf[j]), j))
        ranked = sorted(cand, key=key)
        best = 1
        for n in range(1, len(ranked) + 1):
            h = [float(entropy[j]) for j in ranked[:n]]
            if sum(h) - max(h) <= gamma:
                best = n
        return ranked[:best]
    return free_pace_reference(model, prompt, choose, **kw)


def _sharp_case(layers: int, data_seed: int, use_anchors: bool):
    """A tiny model with sharpened predictions (LM head x 30: confidences and entropies spread over their range
    rather than all near the flat values of initialisation), 3 prompts of 4 tokens, optionally a prior's anchors
    over a 16-token canvas, and the vocabulary without [MASK]."""
    model = build_tiny(seed=2, num_hidden_layers=layers).eval()
    with torch.no_grad():
        model.lm_head_weight.mul_(30.0)
    gen = torch.Generator().manual_seed(data_seed)
    ids = torch.randint(10, 60, (3, 4), generator=gen)
    prior = None
    if use_anchors:
        prior = Prior(tokens=torch.randint(10, 60, (3, 16), generator=gen),
                      mask=torch.rand(3, 16, generator=gen) < 0.25)
    vocab = torch.arange(model.vocab_size)
    return model, ids, prior, vocab[vocab != model.mask_token_id]


@pytest.mark.parametrize("temperature, early_stop, use_anchors, layers, cache", [
    (0.0, None, False, 2, "none"), (0.9, None, True, 2, "none"), (0.9, 0.7, True, 2, "none"),
    (0.7, 0.8, True, 1, "dual"), (0.7, None, False, 1, "prefix"),
])
def test_fast_dllm_equals_the_rule(temperature, early_stop, use_anchors, layers, cache):
    """Token for token, commit step for commit step and NFE for NFE against the reference loop above, per sample of
    a batch (anchors, early stop, compaction; one layer with the caches, where they are exact); the steps per
    block vary with the confidences."""
    model, ids, prior, vocab = _sharp_case(layers, 5, use_anchors)  # confidences on both sides of the threshold
    batch, gen_length, block = 3, 16, 8
    threshold = 0.7
    out = generate(model, ids, gen_length=gen_length, block_length=block, steps=4, temperature=temperature,
                   seed=9, early_stop=early_stop, prior=prior, vocab=vocab, cache=cache,
                   decoder=decoders.get("fast_dllm", threshold=threshold))
    per_step = []
    for b in range(batch):
        anchors = None if prior is None else (prior.tokens[b], prior.mask[b])
        comp, steps, nfe = fast_dllm_reference(model, ids[b:b + 1], gen_length=gen_length, block_length=block,
                                               threshold=threshold, temperature=temperature, seed=9, sample_id=b,
                                               early_stop=early_stop, anchors=anchors)
        assert torch.equal(out.completions[b], comp), f"sample {b}: tokens differ from the rule"
        steps = torch.where(steps == -1, out.forward_passes, steps)  # the fill: counted over the batch
        assert torch.equal(out.commit_step[b], steps), f"sample {b}: commit steps differ"
        assert int(out.nfe[b]) == nfe, f"sample {b}: NFE {int(out.nfe[b])} != {nfe}"
        in_steps = steps[(steps > 0) & ~out.one_shot[b]]
        per_step += torch.bincount(in_steps).tolist()
    assert max(per_step) > 1, "no step committed more than one position: the threshold plays no part"
    assert out.forward_passes > 2 * (gen_length // block) or early_stop, "a block per step: the rule plays no part"


@pytest.mark.parametrize("name, gamma, temperature, early_stop, use_anchors, cache", [
    ("entropy_bound", 0.6, 0.0, None, False, "none"), ("entropy_bound_confidence", 0.6, 0.0, None, False, "none"),
    ("entropy_bound_confidence", 0.6, 0.9, 0.7, True, "none"), ("entropy_bound_confidence", 1.5, 0.7, None, True,
                                                                  "dual"),
    ("entropy_bound", 1.5, 0.7, 0.8, False, "prefix"),
])
def test_entropy_bound_in_both_orders_equals_the_rule(name, gamma, temperature, early_stop, use_anchors, cache):
    """Token for token, commit step for commit step and NFE for NFE against the reference loop above (anchors,
    early stop, compaction, the caches on one layer where they are exact); and the two orders commit differently
    somewhere, or the order would play no part."""
    model, ids, prior, vocab = _sharp_case(1, 6, use_anchors)
    batch, gen_length, block = 3, 16, 8
    order = "confidence" if name.endswith("confidence") else "entropy"
    kw = dict(gen_length=gen_length, block_length=block, steps=4, temperature=temperature, seed=9,
              early_stop=early_stop, prior=prior, vocab=vocab, cache=cache)
    out = generate(model, ids, decoder=decoders.get(name, gamma=gamma), **kw)
    other = generate(model, ids, decoder=decoders.get(
        "entropy_bound" if order == "confidence" else "entropy_bound_confidence", gamma=gamma), **kw)
    per_step = []
    for b in range(batch):
        anchors = None if prior is None else (prior.tokens[b], prior.mask[b])
        comp, steps, nfe = eb_reference(model, ids[b:b + 1], gamma=gamma, order=order, gen_length=gen_length,
                                        block_length=block, temperature=temperature, seed=9, sample_id=b,
                                        early_stop=early_stop, anchors=anchors)
        assert torch.equal(out.completions[b], comp), f"sample {b}: tokens differ from the rule"
        steps = torch.where(steps == -1, out.forward_passes, steps)
        assert torch.equal(out.commit_step[b], steps), f"sample {b}: commit steps differ"
        assert int(out.nfe[b]) == nfe, f"sample {b}: NFE {int(out.nfe[b])} != {nfe}"
        per_step += torch.bincount(steps[(steps > 0) & ~out.one_shot[b]]).tolist()
    assert max(per_step) > 1, "no step committed more than one position: gamma plays no part"
    assert not torch.equal(out.commit_step, other.commit_step), "entropy and confidence order commit alike"


def test_confidence_ordered_commit_is_the_largest_passing_prefix(seed):
    """``entropy_bounded_commit`` with a confidence order against every prefix tried directly, on random rows."""
    from stp.decoders.entropy_bound import entropy_bounded_commit

    gen = torch.Generator().manual_seed(seed)
    for _ in range(200):
        n = int(torch.randint(1, 12, (1,), generator=gen))
        h = torch.rand(1, n, generator=gen) * 2
        conf = torch.rand(1, n, generator=gen)
        cand = torch.rand(1, n, generator=gen) < 0.7
        gamma = float(torch.rand(1, generator=gen) * 3)
        limit = int(torch.randint(0, n + 1, (1,), generator=gen))
        got = entropy_bounded_commit(h, cand, torch.tensor([gamma]), torch.tensor([limit]), confidence=conf)[0]
        ranked = [i for i in sorted(range(n), key=lambda i: (-conf[0, i].item(), i)) if cand[0, i]]
        best = 0
        for j in range(1, len(ranked) + 1):
            vals = [h[0, i].item() for i in ranked[:j]]
            if sum(vals) - max(vals) <= gamma + 1e-6:
                best = j
        best = min(max(best, 1) if ranked else 0, limit)
        want = torch.zeros(n, dtype=torch.bool)
        want[ranked[:best]] = True
        assert torch.equal(got, want), (h, conf, cand, gamma, limit, got, want)


# ------------------------------------------------------------------ the group's first pass once


@pytest.mark.parametrize("kw", [
    dict(), dict(cache="dual", early_stop=0.8), dict(cache="prefix", cfg_scale=1.5),
    dict(decoder="entropy_bound", cache="dual", padded=True), dict(decoder="fast_dllm", prior=True),
    dict(dream=DreamDecoding(alg="entropy"), prior=True),
])
def test_the_groups_first_pass_runs_once_per_prompt(kw):
    """Two prompts x G 4 (left padding, shared anchors per prompt): with ``share_first`` the first pass runs 2 rows,
    and tokens, commit steps, NFE, fills and log-probs equal the unshared run bit for bit (tiny model, CPU)."""
    kw = dict(kw)
    model = _CountRows(build_tiny(seed=4, num_hidden_layers=2).eval())
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(10, 60, (2, 5), generator=gen)
    mask = None
    if kw.pop("padded", False):
        mask = torch.ones(2, 5, dtype=torch.long)
        mask[0, :2] = 0
        mask = mask.repeat_interleave(4, 0)
    if kw.pop("prior", False):
        kw["prior"] = Prior(tokens=torch.randint(10, 60, (2, 16), generator=gen).repeat_interleave(4, 0),
                            mask=(torch.rand(2, 16, generator=gen) < 0.3).repeat_interleave(4, 0))
    if isinstance(kw.get("decoder"), str):
        kw["decoder"] = decoders.get(kw["decoder"])
    base = dict(attention_mask=mask, gen_length=16, block_length=8, steps=8, temperature=0.9, seed=3,
                record_logprobs=True, **kw)
    calls = []
    orig = model.backbone

    def spy(x, attn=None, **k):
        calls.append(x.shape[0])
        return orig(x, attn, **k)

    model.backbone = spy
    shared = generate(model, ids.repeat_interleave(4, 0), share_first=True, **base)
    first_rows = calls[0]
    calls.clear()
    plain = generate(model, ids.repeat_interleave(4, 0), share_first=False, **base)
    _same(shared, plain, str(kw))
    assert first_rows == 2 and calls[0] == 8


def test_config_names_the_registered_decoders():
    from stp.config import DECODER_NAMES, RolloutConfig
    from stp.config import ConfigError

    assert set(DECODER_NAMES) == set(decoders.DECODERS)
    rule = RolloutConfig(decoder="fast_dllm", decoder_threshold=0.8).decoder_rule()
    assert isinstance(rule, decoders.DECODERS["fast_dllm"]) and rule.threshold == 0.8
    assert RolloutConfig(decoder="entropy_bound", decoder_gamma=0.3).decoder_rule().gamma == 0.3
    rule = RolloutConfig(decoder="entropy_bound_confidence", decoder_gamma=0.4).decoder_rule()
    assert rule.order == "confidence" and rule.gamma == 0.4
    assert RolloutConfig().decoder_rule() is None
    with pytest.raises(ConfigError, match="rollout.decoder"):
        RolloutConfig(decoder="fast_dllm", remasking="random")
    with pytest.raises(ConfigError, match="rollout.decoder_threshold"):
        RolloutConfig(decoder="fast_dllm", decoder_threshold=0.0)
