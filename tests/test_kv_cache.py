"""Block KV caching (``stp.models.kv_cache``, ``generate(cache=...)``) against the uncached sampler.

Where the cache is exact, the tokens, commit steps, NFE and behaviour log-probs must equal ``cache="none"``'s:
- a window pass over an unchanged sequence is the full forward at the window's positions (any depth);
- a one-layer model's keys/values depend only on each position's own token, so every cached step is exact and the
  whole decode equals the uncached one, for every option of ``generate`` (anchors, temporal pruning, threshold and
  Dream decoding, the entropy bound with per-sample gamma, classifier-free guidance, left padding, random remasking,
  sampling, log-probs), for the tiny model and for LLaDA- and Dream-layout checkpoints;
- with one step per block every step is a block's first (a full forward).
Deeper models with several steps per block are approximated: there the schedule, NFE and record keep their meaning
and token agreement is measured (benchmarks/RESULTS.md gives it for a trained model). The cached steps add no host
synchronisation (counted at the dispatcher).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from stp.decoding import DreamDecoding
from stp.models import build_tiny, load
from stp.sampler import Prior, generate

from ._compare import assert_close
from ._decoding import random_prompts, vocab_without_mask
from ._models_reference import DREAM_CONFIG, LLADA_CONFIG, dream_weights, llada_weights, write_checkpoint

MODES = ("prefix", "dual")


def _prior(model, batch, gen_length, seed, fraction=0.2):
    gen = torch.Generator().manual_seed(seed + 1)
    tokens = torch.randint(10, model.vocab_size - 10, (batch, gen_length), generator=gen)
    tokens[tokens == model.mask_token_id] = 10
    return Prior(tokens=tokens, mask=torch.rand(batch, gen_length, generator=gen) < fraction)


def _assert_same_decode(got, ref, what):
    bad = got.completions != ref.completions
    assert not bad.any(), f"{what}: {int(bad.sum())} of {bad.numel()} tokens differ, first at {bad.nonzero()[:5]}"
    assert torch.equal(got.commit_step, ref.commit_step), f"{what}: commit steps differ"
    assert torch.equal(got.nfe, ref.nfe) and got.forward_passes == ref.forward_passes, f"{what}: NFE differ"
    assert torch.equal(got.one_shot, ref.one_shot), f"{what}: one-shot fills differ"
    if ref.behaviour_logprobs is not None:
        assert_close(got.behaviour_logprobs, ref.behaviour_logprobs, atol=1e-5, rtol=1e-5,
                     what=f"{what}: behaviour log-probs")


# ------------------------------------------------------------------------------------------------ the window pass


def _checkpoint(tmp_path: Path, layout: str, seed: int, layers: int, attn: str = "sdpa"):
    if layout == "tiny":
        return build_tiny(seed=seed % 1000, num_hidden_layers=layers, attn_implementation=attn)
    if layout == "llada":
        cfg = dict(LLADA_CONFIG, n_layers=layers)
        path = write_checkpoint(tmp_path / "llada", cfg, llada_weights(cfg, seed))
    else:
        cfg = dict(DREAM_CONFIG, num_hidden_layers=layers)
        path = write_checkpoint(tmp_path / "dream", cfg, dream_weights(cfg, seed))
    return load(str(path), attn_implementation=attn)


@pytest.mark.parametrize("layout", ["tiny", "llada", "dream"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_window_pass_equals_full_forward(tmp_path, seed, layout, attn):
    """Over the sequence the cache was filled with, a window pass is the full forward at its positions; after a
    change outside the window it still reads the filled keys/values (so it equals the old full forward, not the
    new one); for one layer a change inside the window is seen exactly."""
    model = _checkpoint(tmp_path, layout, seed, layers=2, attn=attn)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 90, (3, 19), generator=gen)
    pad = torch.ones_like(ids)
    pad[0, :5], pad[2, :1] = 0, 0
    with torch.no_grad():
        for mask in (None, pad):
            full = model.backbone(ids, mask)
            cache = model.new_kv_cache()
            assert torch.equal(model.backbone(ids, mask, kv_cache=cache), full), "the filling pass changed the output"
            for start, stop in ((0, 4), (7, 12), (7, 19), (18, 19)):
                got = model.backbone(ids, mask, kv_cache=cache, window=(start, stop))
                assert_close(got, full[:, start:stop], atol=1e-5, rtol=1e-5,
                             what=f"{layout} {attn} window {(start, stop)} mask={mask is not None}")
            changed = ids.clone()
            changed[:, 14:] = (changed[:, 14:] + 1) % 90
            got = model.backbone(changed, mask, kv_cache=cache, window=(6, 12))
            assert_close(got, full[:, 6:12], atol=1e-5, rtol=1e-5, what=f"{layout}: window reads the cache")
            assert not torch.allclose(got, model.backbone(changed, mask)[:, 6:12], atol=1e-4), \
                f"{layout}: the window pass did not use the cached keys/values"
    one = _checkpoint(tmp_path / "one", layout, seed, layers=1, attn=attn)
    with torch.no_grad():
        cache = one.new_kv_cache()
        one.backbone(ids, pad, kv_cache=cache)
        changed = ids.clone()
        changed[:, 8:12] = (changed[:, 8:12] + 3) % 90
        got = one.backbone(changed, pad, kv_cache=cache, window=(8, 12))
        assert_close(got, one.backbone(changed, pad)[:, 8:12], atol=1e-5, rtol=1e-5,
                     what=f"{layout}: one layer, change inside the window")


def test_window_needs_a_filled_cache():
    model = build_tiny(seed=0, num_hidden_layers=1)
    ids = torch.randint(10, 90, (1, 8))
    with pytest.raises(ValueError, match="needs a kv_cache filled"):
        model.backbone(ids, kv_cache=model.new_kv_cache(), window=(2, 4))
    cache = model.new_kv_cache()
    model.backbone(ids, kv_cache=cache)
    with pytest.raises(ValueError, match=r"window=\(4, 9\); allowed: integers 0 <= start < stop <= 8"):
        model.backbone(ids, kv_cache=cache, window=(4, 9))


# ---------------------------------------------------------------------------------------- generate: exact cases


COMBINATIONS = {
    "greedy": dict(),
    "sampled": dict(temperature=0.9),
    "random remasking": dict(temperature=0.7, remasking="random"),
    "anchors": dict(temperature=0.9, anchors=True),
    "early stop": dict(temperature=0.9, early_stop=0.8),
    "anchors + early stop": dict(temperature=0.9, anchors=True, early_stop=0.9),
    "threshold": dict(temperature=0.5, confidence_threshold=0.05),
    "threshold + early stop": dict(temperature=0.5, confidence_threshold=0.05, early_stop=0.75),
    "cfg": dict(temperature=0.9, cfg_scale=0.5),
    "dream entropy": dict(temperature=0.5, dream=DreamDecoding(alg="entropy")),
    "dream maskgit top-k": dict(temperature=0.5, dream=DreamDecoding(alg="maskgit_plus", top_k=20)),
    # The entropy-bounded sampler: samples reach different blocks at different steps (per-sample gamma).
    "entropy bound": dict(temperature=0.9, entropy_bound=torch.tensor([0.0, 0.7, 50.0])),
    "entropy bound + anchors + early stop": dict(temperature=0.9, entropy_bound=0.5, anchors=True, early_stop=0.9),
}


def _run(model, cache, opts, seed, *, gen_length=24, block_length=8, steps=12, lengths=(5, 9, 3)):
    prompts, mask = random_prompts(model, list(lengths), seed)
    opts = dict(opts)
    prior = _prior(model, len(lengths), gen_length, seed) if opts.pop("anchors", False) else None
    return generate(model, prompts, attention_mask=mask, gen_length=gen_length, block_length=block_length,
                    steps=steps, seed=seed, prior=prior, vocab=vocab_without_mask(model), record_logprobs=True,
                    cache=cache, **opts)


@pytest.mark.parametrize("combo", list(COMBINATIONS))
def test_one_layer_tiny_equals_uncached(seed, combo):
    model = build_tiny(seed=seed % 1000, num_hidden_layers=1)
    ref = _run(model, "none", COMBINATIONS[combo], seed)
    for cache in MODES:
        _assert_same_decode(_run(model, cache, COMBINATIONS[combo], seed), ref, f"{cache} / {combo}")


@pytest.mark.parametrize("layout", ["llada", "dream"])
def test_one_layer_checkpoints_equal_uncached(tmp_path, seed, layout):
    model = _checkpoint(tmp_path, layout, seed, layers=1)
    for combo in ("sampled", "anchors + early stop", "threshold", "cfg"):
        ref = _run(model, "none", COMBINATIONS[combo], seed)
        for cache in MODES:
            _assert_same_decode(_run(model, cache, COMBINATIONS[combo], seed), ref, f"{layout} {cache} / {combo}")


def test_one_step_per_block_equals_uncached(seed):
    """Every step is then a block's first: a full forward, whatever the depth."""
    model = build_tiny(seed=seed % 1000, num_hidden_layers=3)
    for combo in ("sampled", "anchors + early stop", "cfg"):
        ref = _run(model, "none", COMBINATIONS[combo], seed, steps=3)
        for cache in MODES:
            _assert_same_decode(_run(model, cache, COMBINATIONS[combo], seed, steps=3), ref, f"{cache} / {combo}")


def test_prefix_with_one_block_is_not_exact_for_deep_models(seed):
    """With one block, ``prefix`` caches the prompt only; its keys/values at layers >= 2 still depend on the canvas
    (bidirectional attention), so the decode is close to ``none`` but not exact for a deeper model, while it is
    exact for one layer. Guards the documented claim in both directions."""
    kw = dict(gen_length=16, block_length=16, steps=8, lengths=(6, 6))
    one = build_tiny(seed=seed % 1000, num_hidden_layers=1)
    _assert_same_decode(_run(one, "prefix", {}, seed, **kw), _run(one, "none", {}, seed, **kw), "one layer")
    deep = build_tiny(seed=seed % 1000, num_hidden_layers=3)
    prompts, mask = random_prompts(deep, [6, 6], seed)
    with torch.no_grad():
        x = torch.cat([prompts, torch.full((2, 16), deep.mask_token_id)], 1)
        attn = torch.cat([mask, torch.ones(2, 16, dtype=torch.long)], 1)
        cache = deep.new_kv_cache()
        deep.backbone(x, attn, kv_cache=cache)
        x[:, 6:10] = 20  # commit four canvas tokens
        cached = deep.backbone(x, attn, kv_cache=cache, window=(6, 22))
        assert not torch.allclose(cached, deep.backbone(x, attn)[:, 6:], atol=1e-6), \
            "the prompt's cached keys/values did not depend on the canvas: the model is not bidirectional"


# ------------------------------------------------------------------------------------- generate: approximate


@pytest.mark.parametrize("combo", ["sampled", "anchors + early stop", "threshold", "cfg", "dream entropy",
                                   "entropy bound"])
def test_deep_model_keeps_schedule_and_record(seed, combo):
    """Where the cache approximates, the decode still follows the schedule and its record: every position filled,
    anchors kept, NFE and forward passes those of ``none`` (schedule fixed up front) unless the counts follow the
    canvas, commit steps consistent with the trace, log-probs finite and <= 0."""
    model = build_tiny(seed=seed % 1000, num_hidden_layers=2)
    opts = COMBINATIONS[combo]
    ref = _run(model, "none", opts, seed)
    data_dependent = any(k in opts for k in ("confidence_threshold", "dream", "entropy_bound"))
    for cache in MODES:
        out = _run(model, cache, opts, seed)
        assert (out.completions != model.mask_token_id).all(), f"{cache}/{combo}: masked positions left"
        if not data_dependent:
            assert torch.equal(out.nfe, ref.nfe), f"{cache}/{combo}: NFE {out.nfe} vs {ref.nfe}"
            # Tokens committed per forward pass: the fixed schedule's.
            per_pass = torch.stack([(out.commit_step == f).sum(1) for f in range(out.forward_passes + 1)], 1)
            ref_pass = torch.stack([(ref.commit_step == f).sum(1) for f in range(ref.forward_passes + 1)], 1)
            assert torch.equal(per_pass, ref_pass), f"{cache}/{combo}: commits per pass differ"
        assert torch.equal(out.commit_step, out.trace + 1)
        assert (out.behaviour_logprobs <= 0).all() and torch.isfinite(out.behaviour_logprobs).all()
        agreement = (out.completions == ref.completions).float().mean().item()
        print(f"{cache}/{combo}: token agreement with none {agreement:.3f}")


# ------------------------------------------------------------------------------------------- no host sync


class _SyncCounter(TorchDispatchMode):
    """Counts the aten ops that read a device value on the host (``.item()``, ``bool(t)``, ``nonzero``...)."""

    SYNC_OPS = ("_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2", "repeat_interleave")

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.split(".")[0] in self.SYNC_OPS:
            self.count += 1
        return func(*args, **(kwargs or {}))


def _syncs(model, cache, steps, **opts):
    with _SyncCounter() as counter:
        _run(model, cache, opts, 7, gen_length=16, block_length=8, steps=steps)
    return counter.count


@pytest.mark.parametrize("opts", [dict(), dict(early_stop=0.9, anchors=True), dict(cfg_scale=0.5),
                                  dict(entropy_bound=0.5)])
def test_cached_steps_add_no_host_sync(opts):
    model = build_tiny(seed=0, num_hidden_layers=2)
    for steps in (4, 8):
        base = _syncs(model, "none", steps, **opts)
        for cache in MODES:
            got = _syncs(model, cache, steps, **opts)
            assert got == base, f"cache={cache}, steps={steps}: {got} host reads, none has {base}"
    assert _syncs(model, "dual", 4, **opts) == _syncs(model, "dual", 8, **opts), "host reads grow with the steps"


# ------------------------------------------------------------------------------------------------ errors


def test_bad_cache_arguments():
    model = build_tiny(seed=0, num_hidden_layers=1)
    prompts, _ = random_prompts(model, [4], 0)
    with pytest.raises(ValueError, match="cache='full'; allowed: 'none', 'prefix', 'dual'"):
        generate(model, prompts, gen_length=8, block_length=8, steps=4, cache="full")

    class NoCache(torch.nn.Module):
        mask_token_id = model.mask_token_id
        lm_head_weight = model.lm_head_weight

        def backbone(self, x, attn=None):
            return model.backbone(x, attn)

    with pytest.raises(ValueError, match="cache='dual' needs a model with a block KV cache.*NoCache"):
        generate(NoCache(), prompts, gen_length=8, block_length=8, steps=4, cache="dual")
    ref = generate(model, prompts, gen_length=8, block_length=8, steps=4, seed=1)
    assert torch.equal(generate(NoCache(), prompts, gen_length=8, block_length=8, steps=4, seed=1).completions,
                       ref.completions)


# ------------------------------------------------------------------------------------- config and command lines


def test_rollout_cache_setting():
    from stp import config as C
    from stp import sampler

    assert C.CACHE_MODES == sampler.CACHE_MODES
    assert C.RolloutConfig(cache="dual").cache == "dual"
    with pytest.raises(C.ConfigError, match="rollout.cache='full' is not allowed; allowed: one of 'none', 'prefix'"):
        C.RolloutConfig(cache="full")
    for name, preset in C.PRESETS.items():
        cache = C.resolve(preset=name).rollout.cache
        assert cache in C.CACHE_MODES
        if preset.method == "d1":
            assert cache == "none", f"{name}: d1's rollouts have no KV cache"
    assert C.resolve(preset="tiny", overrides={"rollout.cache": "prefix"}).rollout.cache == "prefix"


def test_eval_settings_name_the_cache():
    from stp.evaluation import EvalError, eval_settings, evaluate
    from stp.tasks import get_task

    task = get_task("sudoku")
    base = dict(gen_length=32, block_length=32, steps=16, temperature=0.0, max_prompt_length=0, seed=0)
    assert "cache" not in eval_settings(task, **base)  # older results files keep their hash
    assert eval_settings(task, **base, cache="dual")["cache"] == "dual"
    with pytest.raises(EvalError, match="cache='full'; allowed: 'none', 'prefix', 'dual'"):
        evaluate(None, task, [], gen_length=32, block_length=32, steps=16, cache="full")


def test_step_benchmark_divides_the_rollout_over_its_optimizer_steps():
    from benchmarks.train_step_phases import _per_step

    rows = [{"rollout": r, "iteration": i, "time_rollout": 10.0 * (r + 1), "time_scoring": 2.0,
             "time_update": 1.0 + i, "nfe": 16.0} for r in range(3) for i in range(2)]
    out = _per_step(rows)  # rollout 0 is warm-up; mu = 2
    assert out["mu"] == 2
    assert out["rollout"] == [10.0, 15.0] and out["scoring"] == [1.0, 1.0] and out["update"] == [1.5, 1.5]
    assert out["total"] == [12.5, 17.5]


def test_trainer_rolls_out_with_the_configured_cache(tmp_path, monkeypatch):
    """``rollout.cache`` reaches every training rollout (and a run with it trains); the held-out evaluation keeps
    decoding without a cache."""
    import stp.data_order
    import stp.sampler
    import stp.trainer
    from stp.config import parse_args
    from tests._trainer_entry import toy_task_for

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(stp.data_order, "task_for", toy_task_for(stp.data_order.task_for))
    seen, real = [], stp.sampler.generate

    def spy(*args, **kwargs):
        seen.append(kwargs.get("cache", "none"))
        return real(*args, **kwargs)

    monkeypatch.setattr(stp.sampler, "generate", spy)
    out = tmp_path / "run"
    cfg = parse_args(["--model.name_or_path", "tiny", "--rollout.gen_length", "16", "--rollout.block_length", "8",
                      "--rollout.steps", "8", "--rollout.cache", "dual", "--grpo.prompts_per_step", "2",
                      "--grpo.num_generations", "2", "--grpo.num_iterations", "2", "--grpo.max_steps", "4",
                      "--run.train_examples", "16", "--run.eval_examples", "2", "--run.tensorboard", "false",
                      "--run.output_dir", str(out)])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        stp.trainer.train(cfg)
    finally:
        torch.set_num_threads(threads)
    rows = stp.trainer.read_metrics(out / "metrics.jsonl")
    assert len(rows) == 4 and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    assert seen.count("dual") == 2, f"rollouts: 2 expected with cache='dual', generate saw {seen}"
    assert set(seen) == {"dual", "none"}, f"the held-out evaluation should decode without a cache: {seen}"


def test_eval_command_line_takes_the_cache():
    from stp.eval import build_parser

    args = build_parser().parse_args(["--model", "tiny", "--task", "sudoku", "--cache", "prefix"])
    assert args.cache == "prefix"
    assert build_parser().parse_args(["--model", "tiny", "--task", "sudoku"]).cache == "none"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--model", "tiny", "--task", "sudoku", "--cache", "full"])


@pytest.mark.parametrize("layout", ["tiny", "llada", "dream"])
def test_a_refilled_cache_keeps_the_positions(tmp_path, layout):
    """A second fill of the same cache (the next block's first step) runs at positions 0.. as the first: its kept
    keys/values are the full forward's, so a later window pass of a one-layer model is exact (before the fix, a
    refill without padding took its positions after the cached length, and every block after the first was decoded
    from keys rotated by the sequence length)."""
    model = _checkpoint(tmp_path, layout, 3, layers=1)
    ids = torch.randint(0, 90, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cache = model.new_kv_cache()
        model.backbone(ids, None, kv_cache=cache)
        ids[:, 4:12] = 33
        model.backbone(ids, None, kv_cache=cache, window=(4, 12))
        refill = model.backbone(ids, None, kv_cache=cache)
        assert_close(refill, model.backbone(ids), atol=1e-6, rtol=1e-6, what=f"{layout}: the refill")
        changed = ids.clone()
        changed[:, 12:14] = 81
        got = model.backbone(changed, None, kv_cache=cache, window=(12, 20))
        assert_close(got, model.backbone(changed)[:, 12:20], atol=1e-5, rtol=1e-5,
                     what=f"{layout}: window after a refill")
