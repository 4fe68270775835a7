"""dTRPO as its paper means it (docs/method.md 7): fresh steps every epoch, the run's own rewards and data in the
pairs, no biased ``packed`` on bidirectional models, scoring at the sampling temperature, real-length normalisation,
every pass beyond the windows at its own state (the entropy-bounded sampler's records), the pairs file keyed by
prompt id and safe for concurrent writers, and dtrpo-online's weights.

The central identity, checked by enumeration: the mean of the estimate over every choice of one step per block is
the full trajectory's newly-unmasked log-ratio, from a float64 replay of the canvases the decoder saw.
Models: the embedded tiny model with random weights, float32 on CPU.
"""

from __future__ import annotations

import itertools
import math
import multiprocessing

import pytest
import torch

from stp.models.tiny import build_tiny
from stp.sampler import generate
from stp.trajectory_ratio import dpo_loss, trajectory_delta, trajectory_logprobs
from tests._decoding import Recording, random_prompts
from tests.test_dtrpo import _one_thread, ref_model, theta_model  # noqa: F401  (the same fixtures)
from tests.test_dtrpo import _replay_logprob64 as _replay64  # the float64 replay of the sampled trajectories


def _cfg(*extra, method="dtrpo"):
    from stp.config import parse_args

    return parse_args(["--method", method, "--model.name_or_path", "tiny", "--grpo.num_iterations", "1",
                       "--rollout.gen_length", "8", "--rollout.block_length", "4", "--rollout.steps", "4",
                       "--rollout.early_stop", "none", "--grpo.num_generations", "3", "--grpo.prompts_per_step", "2",
                       *extra])


# ------------------------------------------------------------------ the identity, entropy-bounded records included


RECORDS = {
    "eb-gamma0": dict(entropy_bound=0.0),  # one token per pass: 8 passes, 4 of them beyond 2 windows of 2
    "eb-gamma0.7": dict(entropy_bound=0.7),
    "early-stop-random": dict(early_stop=0.6, remasking="random"),  # one-shot fill after the last window
    "schedule-random": dict(remasking="random"),
}


@pytest.mark.parametrize("block_mean", [False, True])
@pytest.mark.parametrize("record", list(RECORDS))
def test_mean_over_every_step_choice_is_the_trajectory_log_ratio(ref_model, theta_model, seed, record, block_mean):
    """exact mode: averaged over all T_B^N_B choices of the drawn steps, the estimate equals the sum over EVERY pass
    of the newly revealed tokens' log-ratio (float64 replay of the recorded canvases under both models), also when a
    record has several passes after the last window (the entropy-bounded sampler) or a one-shot fill; with
    ``block_mean`` it equals that sum / T_B."""
    ids, mask = random_prompts(ref_model, [5, 3, 4], seed=seed)
    rec = Recording(ref_model)
    out = generate(rec, ids, attention_mask=mask, gen_length=8, block_length=4, steps=4, temperature=1.0, seed=seed,
                   compact=False, **RECORDS[record])  # every row in every pass: the recorded canvases are the batch's
    steps, t_b = 4, 2  # the estimator's windows: 2 blocks of 2 passes
    if record == "eb-gamma0":
        beyond = [len(set(r[r > steps].tolist())) for r in out.commit_step]
        assert max(beyond) >= 2, beyond  # several passes beyond the windows
    truth = _replay64(theta_model, rec.calls, mask, out) - _replay64(ref_model, rec.calls, mask, out)
    deltas = []
    for us in itertools.product(range(1, t_b + 1), repeat=2):
        fixed = torch.tensor([b * t_b + u for b, u in enumerate(us)]).expand(3, 2)
        kw = dict(seed=seed, iteration=0, block_length=4, steps=steps, mode="exact", fixed_steps=fixed,
                  block_mean=block_mean)
        th = trajectory_logprobs(theta_model, ids, mask, out.completions, out.commit_step, **kw)
        rf = trajectory_logprobs(ref_model, ids, mask, out.completions, out.commit_step, **kw)
        assert torch.equal(th.weights, rf.weights)
        deltas.append(trajectory_delta(th.logprobs.double(), rf.logprobs.double(), th.weights.double()))
    mean = torch.stack(deltas).mean(0)
    want = truth / t_b if block_mean else truth
    assert torch.allclose(mean, want, atol=2e-5, rtol=1e-5), (mean, want)


# ------------------------------------------------------------------------------------ item 1: fresh steps per epoch


def _fake_pairs(n, c_len=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    pairs = []
    for p in range(n):
        side = {"completion_ids": torch.randint(10, 60, (c_len,), generator=gen).tolist(),
                "commit_step": (torch.randperm(c_len, generator=gen) % 4 + 1).tolist(), "reward": 1.0}
        pairs.append({"prompt_id": f"{p * 7919 + 11:016x}", "prompt_ids": [12, 13, 14 + p],
                      "chosen": dict(side), "rejected": {**side, "reward": 0.0}})
    return pairs


def test_steps_are_fresh_every_epoch_keyed_by_epoch_and_prompt_id(seed):
    """A pair's drawn steps change from epoch to epoch (over the epochs every pass of every window is visited),
    are a pure function of (run seed, epoch, prompt id, side, block): the same in a new process (resume) and
    whatever the pair's place in the file."""
    from stp.methods.dtrpo import DTRPO

    cfg = _cfg("--rollout.gen_length", "8", "--rollout.steps", "8", "--run.seed", str(seed))  # 2 blocks, T_B 4
    pairs = _fake_pairs(5)
    m = DTRPO(cfg)
    m.pairs = pairs
    n = len(pairs)
    epochs = 64  # a value of 4 missed in 64 epochs: probability 4 (3/4)^64 < 1e-7 per (pair, side, block)
    ids = torch.tensor([2 * (e * n + p) + k for e in range(epochs) for p in range(n) for k in (0, 1)])
    steps = m.visit_steps(ids, 2, 4).view(epochs, n, 2, 2)  # [epoch, pair, side, block]
    lo = torch.tensor([1, 5])
    assert ((steps >= lo) & (steps < lo + 4)).all()
    for p in range(n):
        for k in (0, 1):
            for b in range(2):
                assert len(set(steps[:, p, k, b].tolist())) == 4, steps[:, p, k, b]  # every pass visited
    assert not torch.equal(steps[0], steps[1])
    again = DTRPO(cfg)
    again.pairs = list(reversed(pairs))  # another file order: pair p is now at n - 1 - p
    other = torch.tensor([2 * (e * n + (n - 1 - p)) + k for e in range(epochs) for p in range(n) for k in (0, 1)])
    assert torch.equal(again.visit_steps(other, 2, 4).view(epochs, n, 2, 2), steps)
    # The batches: visit ids say (epoch, pair); a batch across the epoch boundary holds both epochs.
    m._perms.clear()
    batch, metrics = m.next_batch(2, rank=0, world=1, device="cpu")  # pairs 4, 5 of the sequence: epochs 0 and 1
    visit = batch.sample_ids // 2
    assert (visit // n).tolist() == [0, 0, 1, 1] and metrics["pair_epoch"] == 4 / 5


@pytest.fixture(scope="module")
def lora_pairs():
    """A LoRA-wrapped tiny model (adapter weights perturbed away from the base) and a few real pairs of the base."""
    from stp.pairs import build_pairs
    from stp.policy import add_lora

    torch.set_num_threads(1)
    base = build_tiny(seed=3, num_hidden_layers=2)
    recs = build_pairs(base, [f"sudoku {i}{i + 3}0{i}" for i in range(6)], [{}] * 6, _toy_reward, num_generations=3,
                       gen_length=8, block_length=4, steps=4, temperature=0.9, seed=0, settings={})
    pairs = [r for r in recs if "skipped" not in r]
    assert len(pairs) >= 2
    cfg = _cfg("--dtrpo.length_normalize", "true")
    lm = build_tiny(seed=3, num_hidden_layers=2)
    add_lora(lm, cfg)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in lm.model.named_parameters():
            if "lora_" in name:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    return base, lm, pairs, cfg


def _toy_reward(text, example):
    return sum(c.isdigit() for c in text) / max(1, len(text))


def test_reference_terms_are_the_base_on_the_visits_fresh_steps(lora_pairs):
    """``score`` gives the base model's log-probs (adapter disabled) on each visit's own drawn steps, and the loss
    normalises by each completion's length through the first EOS (dtrpo.length_normalize)."""
    from stp.likelihood import valid_lengths
    from stp.methods.dtrpo import DTRPO, trajectory_kwargs

    base, lm, pairs, cfg = lora_pairs
    m = DTRPO(cfg)
    m.pairs = pairs
    n = len(pairs)
    kw = trajectory_kwargs(cfg)
    assert kw["temperature"] == 0.9  # item 4: the sampling temperature
    for r in (0, n):  # epoch 0, then epoch 1 or 2: other steps
        batch, _ = m.next_batch(r, rank=0, world=1, device="cpu")
        scores = m.score(lm, batch, seed=0, num_iterations=1, ref_context=None)
        fixed = m.visit_steps(batch.sample_ids, 2, 2)
        with torch.no_grad():
            want = trajectory_logprobs(base, batch.prompt_ids, batch.prompt_attention_mask, batch.completion_ids,
                                       batch.commit_step, seed=0, iteration=0, fixed_steps=fixed, **kw)
            cur = trajectory_logprobs(lm, batch.prompt_ids, batch.prompt_attention_mask, batch.completion_ids,
                                      batch.commit_step, seed=0, iteration=0, fixed_steps=fixed, **kw)
        assert torch.equal(scores["weights"][0], want.weights)
        assert (scores["ref"][0] - want.logprobs).abs().max() < 1e-6
        assert (cur.logprobs - want.logprobs).abs().max() > 1e-3  # the adapter does change them
        with torch.no_grad():
            loss, _ = m.loss(lm, batch, scores, seed=0, iteration=0)
        lengths = valid_lengths(batch.completion_ids, int(lm.eos_token_id)).double()
        delta = trajectory_delta(cur.logprobs.double(), want.logprobs.double(), want.weights.double()) / lengths
        z = cfg.dtrpo.beta * (delta[0::2] - delta[1::2])
        assert abs(loss.item() - (-torch.nn.functional.logsigmoid(z)).mean().item()) < 1e-5


# ------------------------------------------------------------------------ item 2: the run's own rewards and data


def test_pairs_are_built_from_the_trainers_reward_functions_and_dataset(tmp_path):
    """``stp.Trainer(reward_funcs=..., train_dataset=...)`` with method dtrpo: the pairs are scored by exactly those
    functions on those rows (a reward of -1000 stays -1000), and the settings name the functions."""
    from stp import Trainer
    from stp.config import parse_args
    from stp.pairs import load_pairs

    def odd_penalty(completions, **kwargs):
        return [-1000.0 if len(c) % 2 else float(len(c)) for c in completions]

    rows = [{"prompt": f"countdown {i} {i + 2} -> {2 * i + 2}"} for i in range(8)]
    pairs = tmp_path / "pairs.jsonl"
    cfg = parse_args(["--method", "dtrpo", "--model.name_or_path", "tiny", "--rollout.gen_length", "16",
                      "--rollout.block_length", "8", "--rollout.steps", "4", "--rollout.early_stop", "none",
                      "--grpo.num_generations", "4", "--grpo.prompts_per_step", "2", "--grpo.num_iterations", "1",
                      "--grpo.max_steps", "1", "--run.eval_examples", "0", "--run.tensorboard", "false",
                      "--run.output_dir", str(tmp_path / "out"), "--dtrpo.pairs_path", str(pairs)])
    Trainer(cfg, reward_funcs=[odd_penalty], train_dataset=rows).train()
    recs = load_pairs(pairs)
    tok = build_tiny(seed=0, num_hidden_layers=1).tokenizer
    assert recs
    seen = set()
    for rec in recs:
        assert rec["settings"]["reward"].startswith("functions ") and "odd_penalty@" in rec["settings"]["reward"]
        for side in ("chosen", "rejected"):
            toks = rec[side]["completion_ids"]
            eos = tok.eos_token_id
            toks = toks[:toks.index(eos)] if eos in toks else toks
            text = tok.decode(toks, skip_special_tokens=True)
            assert rec[side]["reward"] == odd_penalty([text])[0]
        seen.update(rec["rewards"])
        assert rec["prompt"] in {r["prompt"] for r in rows}
    assert all(r == -1000.0 or (r >= 0 and r == int(r)) for r in seen), seen


def test_cached_pairs_file_names_rewards_data_pair_prompts_and_max_steps(tmp_path, monkeypatch):
    from stp.pairs import pair_settings, pairs_path

    monkeypatch.setenv("STP_CACHE_DIR", str(tmp_path))
    cfg = _cfg("--dtrpo.pairs_path", "cache")
    settings = pair_settings(cfg)
    items = [("sudoku 1", {"puzzle": "1"}), ("sudoku 2", {"puzzle": "2"})]
    p0 = pairs_path(cfg, settings, items)
    assert p0.parent == tmp_path / "pairs" and p0 == pairs_path(cfg, dict(settings), list(items))
    others = [pairs_path(cfg, {**settings, "reward": "functions m.f@0123"}, items),
              pairs_path(cfg, settings, [items[0], ("sudoku 2", {"puzzle": "3"})]),
              pairs_path(cfg, settings, items[:1]),
              pairs_path(_cfg("--dtrpo.pairs_path", "cache", "--dtrpo.pair_prompts", "5"), settings, items),
              pairs_path(_cfg("--dtrpo.pairs_path", "cache", "--grpo.max_steps", "7"), settings, items)]
    assert len({p0, *others}) == 6
    explicit = _cfg("--dtrpo.pairs_path", str(tmp_path / "mine.jsonl"))
    assert pairs_path(explicit, settings, items) == tmp_path / "mine.jsonl"


# ---------------------------------------------------------------------------- item 3: packed on bidirectional models


def test_packed_is_refused_for_a_bidirectional_model(ref_model, seed):
    from stp.config import ConfigError
    from stp.methods.dtrpo import DTRPO

    ids, mask = random_prompts(ref_model, [5, 3], seed=seed)
    out = generate(ref_model, ids, attention_mask=mask, gen_length=8, block_length=4, steps=4, temperature=1.0,
                   seed=seed)
    with pytest.raises(ValueError, match=r"model 'tiny[^']*' does not declare block_causal = True .* attend "
                                         r"bidirectionally.* use mode 'exact'"):
        trajectory_logprobs(ref_model, ids, mask, out.completions, out.commit_step, seed=seed, iteration=0,
                            block_length=4, steps=4, mode="packed")
    with pytest.raises(ConfigError, match=r"dtrpo.mode='packed' .* exact for model 'tiny': it attends "
                                          r"bidirectionally"):
        DTRPO(_cfg("--dtrpo.mode", "packed")).prepare(ref_model, ["x"], accelerator=None)


# ------------------------------------------------------------------------------------ item 4: sampling temperature


def test_scores_are_at_the_sampling_temperature(ref_model, seed):
    """Sampled at T = 0.9, the exact mode at the configuration's temperature gives the sampler's behaviour log-probs
    (the policy that drew the trajectory); at T = 1 it does not. ``dtrpo.temperature`` overrides."""
    from stp.methods.dtrpo import trajectory_kwargs

    cfg = _cfg("--rollout.temperature", "0.9")
    kw = trajectory_kwargs(cfg)
    assert kw["temperature"] == 0.9
    assert trajectory_kwargs(_cfg("--dtrpo.temperature", "1.0"))["temperature"] == 1.0
    ids, mask = random_prompts(ref_model, [5, 3, 4], seed=seed)
    out = generate(ref_model, ids, attention_mask=mask, gen_length=8, block_length=4, steps=4, temperature=0.9,
                   seed=seed, record_logprobs=True)
    for temperature, close in ((kw["temperature"], True), (1.0, False)):
        r = trajectory_logprobs(ref_model, ids, mask, out.completions, out.commit_step, seed=seed, iteration=0,
                                **{**kw, "temperature": temperature})
        diff = (r.logprobs - out.behaviour_logprobs)[r.scored].abs().max()
        assert (diff < 1e-5) == close, (temperature, diff)


def test_pairs_file_records_and_checks_the_sampling_temperature(tmp_path, ref_model):
    from stp.pairs import PairsFileError, build_into, load_pairs

    settings = {"model": "tiny", "task": "sudoku", "gen_length": 8, "block_length": 4, "steps": 4, "temperature": 0.9,
                "remasking": "low_confidence", "num_generations": 2, "seed": 0, "max_prompt_length": None,
                "reward": "toy"}
    path = tmp_path / "p.jsonl"
    build_into(path, ref_model, [("sudoku 12", {}), ("sudoku 34", {})], _toy_reward, settings=settings,
               batch_size=2, progress=False)
    assert all(r["settings"]["temperature"] == 0.9 for r in load_pairs(path, settings))
    with pytest.raises(PairsFileError, match=r"field 'settings.temperature' is 0.9, this run has 1.0"):
        load_pairs(path, {**settings, "temperature": 1.0})


def test_greedy_rollouts_need_a_scoring_temperature():
    from stp.config import ConfigError

    with pytest.raises(ConfigError, match=r"dtrpo.temperature=None .* a number > 0 with method 'dtrpo' when "
                                          r"rollout.temperature is 0.0"):
        _cfg("--rollout.temperature", "0")
    _cfg("--rollout.temperature", "0", "--dtrpo.temperature", "0.5")


# -------------------------------------------------------------------------------- item 5: real-length normalisation


def test_length_normalisation_divides_by_the_length_through_the_first_eos():
    from stp.likelihood import valid_lengths

    eos = 3
    comp = torch.tensor([[5, 6, eos, eos, eos, eos], [5, 6, 7, 8, 9, eos]])  # lengths 3 and 6
    logp = torch.tensor([[-1.0, -1.0, -1.0, -1.0, 0.0, 0.0], [-2.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    ref = torch.zeros_like(logp)
    w = (logp != 0).float() * 2
    _, m = dpo_loss(logp, ref, w, valid_lengths(comp, eos), beta=1.0, length_normalize=True)
    assert abs(m["delta_chosen"].item() - (-8.0 / 3)) < 1e-6 and abs(m["delta_rejected"].item() - (-4.0 / 6)) < 1e-6


# ---------------------------------------------------------------------------- item 8: prompt ids, lock, truncation


def _build_in_child(path, barrier, todo, settings):
    torch.set_num_threads(1)
    from stp.pairs import build_into

    model = build_tiny(seed=0, num_hidden_layers=1)
    barrier.wait()
    build_into(path, model, todo, _toy_reward, settings=settings, batch_size=1, progress=False)


def test_two_processes_building_one_pairs_file_take_turns(tmp_path):
    from stp.pairs import read_pairs_file

    settings = {"model": "tiny", "task": "sudoku", "gen_length": 8, "block_length": 4, "steps": 4, "temperature": 1.0,
                "remasking": "low_confidence", "num_generations": 2, "seed": 0, "max_prompt_length": None,
                "reward": "toy"}
    todo = [(f"sudoku {i}{i}", {}) for i in range(4)]
    path = tmp_path / "p.jsonl"
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_build_in_child, args=(path, barrier, todo, settings)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    records, _ = read_pairs_file(path)  # a prompt written twice would be an error naming the line
    assert sorted(r["prompt_id"] for r in records) == sorted({r["prompt_id"] for r in records})
    assert len(records) == 4


def test_pair_prompts_are_truncated_like_training_prompts(ref_model):
    from stp.data_order import encode_prompts
    from stp.pairs import build_pairs

    texts = ["sudoku 1234 5678 1234", "sudoku 12"]
    recs = build_pairs(ref_model, texts, [{}, {}], lambda t, e: float(len(t)), num_generations=3, gen_length=8,
                       block_length=4, steps=4, temperature=1.0, seed=0, settings={}, max_prompt_length=6)
    ids, mask = encode_prompts(ref_model.tokenizer, texts, int(ref_model.pad_token_id), 6)
    for i, rec in enumerate(recs):
        if "skipped" not in rec:
            assert rec["prompt_ids"] == ids[i][mask[i].bool()].tolist()
            assert len(rec["prompt_ids"]) <= 6


# ------------------------------------------------------------------------------------- item 9: dtrpo-online weights


def test_online_loss_is_the_weighted_sum_over_the_trajectory_tokens(ref_model, seed):
    """At theta = old the clipped term is -A per token: the loss is sum_i w_i (-A) over the scored tokens divided by
    the count of decoded tokens through the first EOS, so T_B does not cancel (block_mean gives 1 / T_B of it)."""
    from stp.likelihood import valid_lengths
    from stp.loss import RolloutBatch
    from stp.methods.dtrpo_online import DTRPOOnline

    ids, mask = random_prompts(ref_model, [5, 3, 4, 4], seed=seed)
    out = generate(ref_model, ids, attention_mask=mask, gen_length=8, block_length=4, steps=4, temperature=1.0,
                   seed=seed)
    comp = out.completions.clone()
    comp[0, 3:] = ref_model.eos_token_id  # a completion ending early: its EOS padding is left out
    # No sum of these with per-sample token counts 0..8 (not all 0) is 0: the loss cannot vanish by cancellation.
    adv = torch.tensor([1.0, -0.37, 2.13, -1.29])
    batch = RolloutBatch(prompt_ids=ids, prompt_attention_mask=mask, completion_ids=comp, advantages=adv,
                         sample_ids=torch.arange(4), commit_step=out.commit_step)
    valid = torch.arange(8)[None, :] < valid_lengths(comp, int(ref_model.eos_token_id))[:, None]
    decoded = (out.commit_step > 0) & valid
    losses = {}
    for block_mean in ("false", "true"):
        cfg = _cfg("--dtrpo.block_mean", block_mean, "--grpo.beta", "0", "--rollout.temperature", "1.0",
                   method="dtrpo-online")
        m = DTRPOOnline(cfg)
        with torch.no_grad():
            scores = m.score(ref_model, batch, seed=seed, num_iterations=1, ref_context=None)
            loss, metrics = m.loss(ref_model, batch, scores, seed=seed, iteration=0)
        w = scores["w"][0]
        want = (w * decoded * -adv[:, None]).sum() / decoded.sum()
        assert abs(loss.item() - want.item()) < 1e-6, (loss, want)
        assert abs(metrics["ratio"].item() - 1.0) < 1e-6
        losses[block_mean] = loss.item()
    assert abs(losses["false"] - 2 * losses["true"]) < 1e-6  # T_B = 2
    assert math.isfinite(losses["false"]) and losses["false"] != 0


# ------------------------------------------------------------------- item 6: the selection term of low-confidence


def _all_trajectories(c_len, vocab):
    """Every (commit order, tokens) of a one-token-per-pass decode of ``c_len`` positions: commit_step [N, C] and
    completion_ids [N, C]."""
    steps, comps = [], []
    for order in itertools.permutations(range(c_len)):
        s = [0] * c_len
        for f, pos in enumerate(order, start=1):
            s[pos] = f
        for toks in itertools.product(vocab.tolist(), repeat=c_len):
            steps.append(s)
            comps.append(list(toks))
    return torch.tensor(steps), torch.tensor(comps)


def _factorised64(model, prompt, commit, comp, temperature, vocab):
    """[N] sum over passes of log softmax(z / T)[y_i] over ``vocab`` at the state before the pass, float64."""
    n, c_len = comp.shape
    ids = prompt.expand(n, -1)
    slot = (vocab[None, None, :] == comp[:, :, None]).int().argmax(-1)
    head = model.lm_head_weight.index_select(0, vocab).double()
    total = torch.zeros(n, dtype=torch.float64)
    with torch.no_grad():
        for f in range(1, int(commit.max()) + 1):
            canvas = torch.where(commit >= f, int(model.mask_token_id), comp)
            h = model.backbone(torch.cat([ids, canvas], 1))[:, ids.shape[1]:].double()
            logq = torch.log_softmax(h @ head.T / temperature, -1).gather(2, slot[:, :, None])[:, :, 0]
            total += torch.where(commit == f, logq, torch.zeros_like(logq)).sum(1)
    return total


@pytest.mark.slow
def test_selection_term_makes_low_confidence_trajectories_a_distribution_the_sampler_follows(ref_model, seed):
    """Three positions decoded one per pass over a 3-token vocabulary: 3! orders x 27 token strings. With the
    selection term, exp(factorised + selection) sums to 1 over them and matches the sampler's frequencies over 6000
    draws; the factorised (newly-unmasked) log-probs alone sum to 3! = 6."""
    from stp.trajectory_ratio import selection_logprob

    vocab = torch.tensor([20, 31, 42])
    t = 0.8
    prompt, _ = random_prompts(ref_model, [4], seed=seed)
    commit, comp = _all_trajectories(3, vocab)
    n = comp.shape[0]
    fact = _factorised64(ref_model, prompt, commit, comp, t, vocab)
    sel = selection_logprob(ref_model, prompt.expand(n, -1), None, comp, commit, block_length=3, steps=3,
                            temperature=t, vocab=vocab)
    assert abs(fact.exp().sum().item() - 6.0) < 1e-9
    prob = (fact + sel).exp()
    assert abs(prob.sum().item() - 1.0) < 1e-9, prob.sum()
    draws = 6000
    out = generate(ref_model, prompt.expand(draws, -1), gen_length=3, block_length=3, steps=3, temperature=t,
                   seed=seed, sample_ids=torch.arange(draws), vocab=vocab)
    key = {(tuple(c.tolist()), tuple(x.tolist())): i for i, (c, x) in enumerate(zip(commit, comp))}
    counts = torch.zeros(n, dtype=torch.float64)
    for c, x in zip(out.commit_step, out.completions):
        counts[key[(tuple(c.tolist()), tuple(x.tolist()))]] += 1
    freq = counts / draws
    tv = 0.5 * (freq - prob).abs().sum().item()
    wrong = 0.5 * (freq - fact.exp() / 6).abs().sum().item()  # without the selection term, orders equally likely
    print(f"total variation {tv:.4f}, without the selection term {wrong:.4f}")
    assert tv < 0.09 and tv < wrong / 3, (tv, wrong)  # multinomial noise: about 0.04 at 6000 draws
