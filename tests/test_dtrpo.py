"""dTRPO (docs/method.md 7): the one-step-per-block trajectory estimator (``stp.trajectory_ratio``), its faithfulness
identities, the DPO objective, the pairs file (``stp.pairs``) and the ``dtrpo`` / ``dtrpo-online`` methods in the
shared loop (resume equality).

Models: the embedded tiny model with random weights (seeds 0 and 1), a block-causal variant of it, all float32 on
CPU; fresh sampling seeds per run (``seed`` fixture).
"""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch

from stp.models.tiny import build_tiny
from stp.sampler import Prior, generate
from stp.trajectory_ratio import block_steps, dpo_loss, trajectory_delta, trajectory_logprobs
from tests._decoding import Recording, random_prompts, vocab_without_mask


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ref_model():
    return build_tiny(seed=0, num_hidden_layers=2)


@pytest.fixture(scope="module")
def theta_model():
    return build_tiny(seed=1, num_hidden_layers=2)


def _rollout(model, seed, *, gen_length=8, block_length=4, steps=6, **kw):
    ids, mask = random_prompts(model, [5, 3, 4], seed=seed)
    rec = Recording(model)
    out = generate(rec, ids, attention_mask=mask, gen_length=gen_length, block_length=block_length, steps=steps,
                   temperature=1.0, seed=seed, record_logprobs=True, compact=False, **kw)  # every row in every pass
    return ids, mask, out, rec.calls


def _replay_logprob64(model, calls, prompt_mask, out, temperature=1.0) -> torch.Tensor:
    """[B] log pi(tau) of every sample's tokens under ``model`` from the recorded canvases (each committed token's
    log-prob in the canvas before its pass), float64 logits at ``temperature``."""
    plen = prompt_mask.shape[1]
    attn = torch.cat([prompt_mask, torch.ones_like(out.completions)], 1)
    total = torch.zeros(out.completions.shape[0], dtype=torch.float64)
    with torch.no_grad():
        for f, canvas in enumerate(calls, start=1):
            h = model.backbone(canvas, attn).double()
            logp = torch.log_softmax(h @ model.lm_head_weight.double().T / temperature, -1)[:, plen:]
            tok = logp.gather(2, out.completions[:, :, None])[:, :, 0]
            total += torch.where(out.commit_step == f, tok, torch.zeros_like(tok)).sum(1)
    return total


# ------------------------------------------------------------------------------------------------ the estimator


def test_block_steps_are_a_counter_of_seed_iteration_sample_and_block(seed):
    ids = torch.tensor([7, 3, 1 << 40])
    f = block_steps(seed, 2, ids, num_blocks=5, steps_per_block=4)
    assert f.shape == (3, 5) and f.dtype == torch.long
    lo = torch.arange(5) * 4 + 1
    assert ((f >= lo) & (f < lo + 4)).all()
    assert torch.equal(block_steps(seed, 2, ids.flip(0), 5, 4), f.flip(0))  # keyed by id, not batch position
    many = block_steps(seed, 0, torch.arange(4000), 1, 4)[:, 0]
    counts = torch.bincount(many - 1, minlength=4).float() / 4000
    assert (counts - 0.25).abs().max() < 0.04, counts  # roughly uniform over 1..T_B
    assert not torch.equal(block_steps(seed, 3, torch.arange(64), 5, 4), block_steps(seed, 2, torch.arange(64), 5, 4))


@pytest.mark.parametrize("settings", [dict(), dict(early_stop=0.7), dict(anchors=True, early_stop=0.8)])
def test_exact_states_give_the_behaviour_logprobs(ref_model, seed, settings):
    """The rebuilt state before each drawn pass is the canvas the decoder saw: at temperature 1 the exact mode's
    log-probs equal the sampler's behaviour log-probs at every scored position (one-shot fill and anchors too)."""
    settings = dict(settings)
    prior = None
    if settings.pop("anchors", False):
        g = torch.Generator().manual_seed(seed)
        prior = Prior(tokens=torch.randint(10, 60, (3, 8), generator=g), mask=torch.rand(3, 8, generator=g) < 0.3)
    ids, mask, out, _ = _rollout(ref_model, seed, prior=prior, **settings)
    for it in range(3):
        r = trajectory_logprobs(ref_model, ids, mask, out.completions, out.commit_step, seed=seed, iteration=it,
                                block_length=4, steps=6, mode="exact")
        assert r.scored.any()
        assert not (r.scored & (out.commit_step == 0)).any()  # anchors are never scored
        diff = (r.logprobs - out.behaviour_logprobs)[r.scored].abs()
        assert diff.max() < 1e-5, f"{int((diff > 1e-5).sum())} of {diff.numel()} differ, max {diff.max()}"
        assert (r.logprobs[~r.scored] == 0).all()


def _all_fixed_steps(batch: int, num_blocks: int, t_b: int):
    for us in itertools.product(range(1, t_b + 1), repeat=num_blocks):
        yield torch.tensor([b * t_b + u for b, u in enumerate(us)]).expand(batch, num_blocks)


@pytest.mark.parametrize("early_stop", [None, 0.75])
def test_schedule_cancels_and_the_estimator_is_unbiased_by_enumerating_u(ref_model, theta_model, seed, early_stop):
    """Random remasking chooses positions independently of the model, so the trajectory log-ratio is the sum of the
    revealed tokens' log-ratios. Its truth: log pi_theta(tau) from a float64 replay of the recorded canvases minus
    log pi_ref(tau) = the sum of the sampler's behaviour log-probs. Averaged over every u (T_B^N_B draws), the
    estimator equals it; a single draw does not (it is an estimate)."""
    ids, mask, out, calls = _rollout(ref_model, seed, remasking="random", early_stop=early_stop)
    truth = _replay_logprob64(theta_model, calls, mask, out) - out.behaviour_logprobs.double().sum(1)
    deltas = []
    for fixed in _all_fixed_steps(3, 2, 3):
        kw = dict(seed=seed, iteration=0, block_length=4, steps=6, mode="exact", fixed_steps=fixed)
        th = trajectory_logprobs(theta_model, ids, mask, out.completions, out.commit_step, **kw)
        rf = trajectory_logprobs(ref_model, ids, mask, out.completions, out.commit_step, **kw)
        deltas.append(trajectory_delta(th.logprobs.double(), rf.logprobs.double(), th.weights.double()))
    deltas = torch.stack(deltas)  # [9, B]
    assert torch.allclose(deltas.mean(0), truth, atol=2e-4, rtol=1e-5), (deltas.mean(0), truth)
    assert deltas.std(0).max() > 1e-3  # single draws scatter around it


def test_one_step_per_block_has_zero_variance(ref_model, theta_model, seed):
    """T_B = 1 (steps = number of blocks): every draw is the whole trajectory."""
    ids, mask, out, calls = _rollout(ref_model, seed, steps=2)
    truth = _replay_logprob64(theta_model, calls, mask, out) - out.behaviour_logprobs.double().sum(1)
    got = []
    for s in range(4):
        kw = dict(seed=seed + s, iteration=s, block_length=4, steps=2, mode="exact")
        th = trajectory_logprobs(theta_model, ids, mask, out.completions, out.commit_step, **kw)
        rf = trajectory_logprobs(ref_model, ids, mask, out.completions, out.commit_step, **kw)
        assert th.scored.equal(out.commit_step > 0)
        got.append(trajectory_delta(th.logprobs, rf.logprobs, th.weights))
    assert all(torch.equal(g, got[0]) for g in got)
    assert torch.allclose(got[0].double(), truth, atol=2e-4)


class _BlockCausal(torch.nn.Module):
    """The tiny model with block-causal attention in its ordinary forward: the prompt sees the prompt, completion
    block b sees the prompt and blocks <= b (a block-diffusion model). It declares it, as ``packed`` requires."""

    block_causal = True

    def __init__(self, base, c_len: int, block_length: int):
        super().__init__()
        self.base, self.c_len, self.block_length = base, c_len, block_length

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.base, name)

    def backbone(self, ids, attn=None):
        batch, seq = ids.shape
        p_len = seq - self.c_len
        real = torch.ones(batch, p_len, dtype=torch.bool) if attn is None else attn[:, :p_len].bool()
        blk = torch.cat([torch.full((p_len,), -1), torch.arange(self.c_len) // self.block_length])
        allowed = (blk[None, :] <= blk[:, None]) & (blk[None, :] >= -1)
        allowed = allowed[None].expand(batch, seq, seq).clone()
        allowed[:, :, :p_len] &= real[:, None, :]
        pos = torch.cat([(real.long().cumsum(1) - 1).clamp(min=0),
                         real.long().sum(1, keepdim=True) + torch.arange(self.c_len)[None]], 1)
        return self.base.backbone_4d(ids, allowed, pos)


def test_packed_equals_exact_on_a_block_causal_model(seed):
    model = _BlockCausal(build_tiny(seed=2, num_hidden_layers=2), c_len=12, block_length=4)
    ids, mask = random_prompts(model.base, [6, 3, 5], seed=seed)
    # Never sample [MASK] itself (a random model may): such a position would be committed outside its block's window,
    # which 'packed' refuses.
    vocab = vocab_without_mask(model.base)
    out = generate(model, ids, attention_mask=mask, gen_length=12, block_length=4, steps=6, temperature=1.0,
                   seed=seed, vocab=vocab)
    for it in range(2):
        kw = dict(seed=seed, iteration=it, block_length=4, steps=6)
        ex = trajectory_logprobs(model, ids, mask, out.completions, out.commit_step, mode="exact", **kw)
        pk = trajectory_logprobs(model, ids, mask, out.completions, out.commit_step, mode="packed", **kw)
        assert ex.num_sequences == 3 * 3 and pk.num_sequences == 3
        assert torch.equal(ex.scored, pk.scored) and ex.scored.any()
        diff = (ex.logprobs - pk.logprobs).abs()
        assert diff.max() < 2e-5, f"{int((diff > 2e-5).sum())} differ, max {diff.max()}"


def test_backbone_4d_with_a_full_pattern_is_the_backbone(ref_model, seed):
    ids, mask = random_prompts(ref_model, [6, 3], seed=seed)
    ids = torch.cat([ids, torch.randint(10, 60, (2, 5))], 1)
    attn = torch.cat([mask, torch.ones(2, 5, dtype=torch.long)], 1)
    allowed = attn.bool()[:, None, :].expand(2, ids.shape[1], ids.shape[1]).contiguous()
    pos = (attn.cumsum(1) - 1).clamp(min=0)
    a = ref_model.backbone(ids, attn)
    b = ref_model.backbone_4d(ids, allowed, pos)
    assert (a - b)[attn.bool()].abs().max() < 1e-5


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", ["llada", "tiny"])
def test_backbone_4d_runs_two_copies_on_repeated_position_ids(tmp_path, seed, family, attn):
    """Two sequences in one row, each attending only to itself on the same position ids, give each sequence's own
    hidden states: the 4-D pattern and the position ids reach the attention (LLaDA checkpoint and tiny model)."""
    from stp.models import load
    from tests._models_reference import LLADA_CONFIG, llada_weights, write_checkpoint

    if family == "llada":
        model = load(str(write_checkpoint(tmp_path / "llada", LLADA_CONFIG, llada_weights(LLADA_CONFIG, seed))),
                     attn_implementation=attn)
        vocab = LLADA_CONFIG["vocab_size"]
    else:
        model, vocab = build_tiny(seed=0, num_hidden_layers=2, attn_implementation=attn), 100
    n = 7
    gen = torch.Generator().manual_seed(seed)
    a, b = torch.randint(0, vocab, (2, 1, n), generator=gen)
    blk = torch.arange(2 * n) // n
    allowed = (blk[:, None] == blk[None, :])[None]
    pos = torch.arange(n).repeat(2)[None]
    with torch.no_grad():
        both = model.backbone_4d(torch.cat([a, b], 1), allowed, pos)
        assert (both[:, :n] - model.backbone(a)).abs().max() < 1e-5
        assert (both[:, n:] - model.backbone(b)).abs().max() < 1e-5


def test_packed_refuses_what_it_cannot_represent(ref_model, seed):
    ids, mask, out, _ = _rollout(ref_model, seed, early_stop=0.25)
    kw = dict(seed=seed, iteration=0, block_length=4, steps=6)
    declared = build_tiny(seed=0, num_hidden_layers=1)
    declared.block_causal = True  # past the model check: the record is what is refused
    with pytest.raises(ValueError, match=r"mode 'packed' needs every position committed inside its own block"):
        trajectory_logprobs(declared, ids, mask, out.completions, out.commit_step, mode="packed", **kw)
    dream_like = build_tiny(seed=0, num_hidden_layers=1)
    dream_like.shift_logits, dream_like.name, dream_like.family = True, "dream-micro", "dream"
    dream_like.block_causal = True
    ids, mask, out, _ = _rollout(ref_model, seed)
    with pytest.raises(ValueError, match=r"mode 'packed' needs a model whose logits are not shifted; model "
                                         r"'dream-micro' \(family 'dream'\)"):
        trajectory_logprobs(dream_like, ids, mask, out.completions, out.commit_step, mode="packed", **kw)
    with pytest.raises(ValueError, match="mode='nope'; allowed: exact, packed"):
        trajectory_logprobs(ref_model, ids, mask, out.completions, out.commit_step, mode="nope", **kw)


# ------------------------------------------------------------------------------------------------ the objective


def test_dpo_at_the_reference_is_log2_and_its_gradient_flips_with_the_pair(ref_model, seed):
    ids, mask, out, _ = _rollout(ref_model, seed)
    ids, mask, comp, commit = ids[:2], mask[:2], out.completions[:2], out.commit_step[:2]
    kw = dict(seed=seed, iteration=0, block_length=4, steps=6, mode="exact", sample_ids=torch.tensor([0, 1]))
    with torch.no_grad():
        ref = trajectory_logprobs(ref_model, ids, mask, comp, commit, **kw)
    grads = []
    for order in ([0, 1], [1, 0]):
        ref_model.zero_grad(set_to_none=True)
        o = torch.tensor(order)
        cur = trajectory_logprobs(ref_model, ids[o], mask[o], comp[o], commit[o], **{**kw, "sample_ids": o})
        loss, metrics = dpo_loss(cur.logprobs, ref.logprobs[o], ref.weights[o], torch.full((2,), 8), beta=0.5)
        assert abs(loss.item() - math.log(2)) < 1e-6 and abs(metrics["margin"].item()) < 1e-6
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in ref_model.parameters() if p.grad is not None]))
    ref_model.zero_grad(set_to_none=True)
    assert grads[0].abs().max() > 0
    assert torch.allclose(grads[0], -grads[1], atol=1e-7, rtol=1e-4)


def test_dpo_length_normalisation_and_shape_errors():
    logp = torch.tensor([[-1.0, -2.0, 0.0], [-3.0, 0.0, 0.0]])
    ref = torch.tensor([[-2.0, -2.0, 0.0], [-1.0, 0.0, 0.0]])
    w = torch.tensor([[2.0, 2.0, 0.0], [2.0, 0.0, 0.0]])
    lengths = torch.tensor([2, 3])
    loss, m = dpo_loss(logp, ref, w, lengths, beta=1.0)
    assert m["delta_chosen"].item() == 2.0 and m["delta_rejected"].item() == -4.0
    assert abs(loss.item() - (-torch.nn.functional.logsigmoid(torch.tensor(6.0))).item()) < 1e-6
    _, m = dpo_loss(logp, ref, w, lengths, beta=1.0, length_normalize=True)
    assert m["delta_chosen"].item() == 1.0 and abs(m["delta_rejected"].item() + 4 / 3) < 1e-6
    with pytest.raises(ValueError, match="must share one"):
        dpo_loss(logp[:1], ref[:1], w[:1], lengths[:1], beta=1.0)
    with pytest.raises(ValueError, match=r"lengths must be \[2P=2\]"):
        dpo_loss(logp, ref, w, lengths[:1], beta=1.0)


# ------------------------------------------------------------------------------------------------ the pairs file


def _toy_reward(text, example):
    return sum(c.isdigit() for c in text) / max(1, len(text))


SETTINGS = {"model": "tiny", "task": "sudoku", "gen_length": 8, "block_length": 4, "steps": 4, "temperature": 1.0,
            "remasking": "low_confidence", "num_generations": 3, "seed": 0, "max_prompt_length": None,
            "reward": "toy"}


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory, ref_model):
    from stp.pairs import build_into

    torch.set_num_threads(1)
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    todo = [(f"sudoku {i}{i + 3}0{i}", {}) for i in range(6)]
    build_into(path, ref_model, todo, _toy_reward, settings=SETTINGS, batch_size=4, progress=False)
    return path, todo


def test_pairs_are_best_vs_worst_and_resume_skips_done_prompts(pairs_file, ref_model, tmp_path):
    from stp.pairs import build_into, load_pairs, read_pairs_file

    path, todo = pairs_file
    records, _ = read_pairs_file(path)
    assert len(records) == 6
    for rec in records:
        if "skipped" in rec:
            assert len(set(rec["rewards"])) == 1
            continue
        assert rec["chosen"]["reward"] == max(rec["rewards"]) and rec["rejected"]["reward"] == min(rec["rewards"])
        assert len(rec["chosen"]["commit_step"]) == 8 and max(rec["chosen"]["commit_step"]) <= 4
    assert load_pairs(path, SETTINGS) == [r for r in records if "skipped" not in r]
    # Resume: a copy with its last line torn and one line missing gets exactly those two redone, identically.
    lines = path.read_text().splitlines(keepends=True)
    part = tmp_path / "part.jsonl"
    part.write_text("".join(lines[:4]) + lines[5][:20])
    build_into(part, ref_model, todo, _toy_reward, settings=SETTINGS, batch_size=4, progress=False)
    got = sorted(part.read_text().splitlines())
    assert got == sorted(path.read_text().splitlines())
    size = part.stat().st_size
    build_into(part, ref_model, todo, _toy_reward, settings=SETTINGS, batch_size=4, progress=False)
    assert part.stat().st_size == size  # nothing left to do


@pytest.mark.parametrize("edit, match", [
    (lambda r: r.pop("settings"), r":2: field 'settings' missing"),
    (lambda r: r["chosen"].__setitem__("commit_step", [1, 2]), r":2: field 'chosen.commit_step' must be 8 ints"),
    (lambda r: r["rejected"]["completion_ids"].__setitem__(0, "x"), r":2: field 'rejected.completion_ids' must be"),
    (lambda r: r.__setitem__("format", 9), r":2: field 'format' is 9"),
    (lambda r: r["chosen"].__setitem__("reward", -5.0), r":2: field 'chosen.reward' \(-5.0\) must exceed"),
    (lambda r: r.__setitem__("prompt_ids", []), r":2: field 'prompt_ids' missing or not a non-empty list"),
])
def test_a_bad_pairs_line_is_named_with_file_line_and_field(pairs_file, tmp_path, edit, match):
    from stp.pairs import PairsFileError, load_pairs

    path, _ = pairs_file
    recs = [json.loads(x) for x in path.read_text().splitlines()]
    pair = next(r for r in recs if "skipped" not in r)
    other = next(r for r in recs if r is not pair)
    edit(pair)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(other) + "\n" + json.dumps(pair) + "\n")
    with pytest.raises(PairsFileError, match=str(bad).replace(".", r"\.") + match):
        load_pairs(bad)


def test_pairs_file_errors_beyond_a_field(pairs_file, tmp_path):
    from stp.pairs import PairsFileError, load_pairs

    path, _ = pairs_file
    lines = path.read_text().splitlines()
    bad = tmp_path / "bad.jsonl"
    bad.write_text(lines[0] + "\n{not json\n" + lines[1] + "\n")
    with pytest.raises(PairsFileError, match=r"bad\.jsonl:2: corrupt line: not valid JSON"):
        load_pairs(bad)
    bad.write_text(lines[0] + "\n" + lines[0] + "\n")
    with pytest.raises(PairsFileError, match=r"bad\.jsonl:2: field 'prompt_id' \w+ already at line 1"):
        load_pairs(bad)
    with pytest.raises(PairsFileError, match=r"record 1 .* field 'settings.steps' is 4, this run has 8"):
        load_pairs(path, {**SETTINGS, "steps": 8})


def test_pairs_command_line_checks_flags_before_loading(tmp_path, capsys):
    from stp.pairs import main

    with pytest.raises(SystemExit, match=r"--block-length=3; allowed: a divisor of --gen-length 8"):
        main(["--model", "tiny", "--task", "sudoku", "--out", str(tmp_path / "p.jsonl"), "--gen-length", "8",
              "--block-length", "3"])
    with pytest.raises(SystemExit, match=r"--task='nope'; allowed:"):
        main(["--model", "tiny", "--task", "nope", "--out", str(tmp_path / "p.jsonl")])


# ------------------------------------------------------------------------------------------------ in the trainer


class _Killed(Exception):
    pass


def _train_flags(out, *extra):
    return ["--model.name_or_path", "tiny", "--rollout.gen_length", "16", "--rollout.block_length", "8",
            "--rollout.steps", "4", "--rollout.early_stop", "none", "--grpo.num_generations", "3",
            "--grpo.prompts_per_step", "2", "--grpo.warmup_steps", "0", "--grpo.learning_rate", "0.01",
            "--run.train_examples", "8", "--run.eval_examples", "0", "--run.tensorboard", "false",
            "--run.output_dir", str(out), *extra]


@pytest.fixture
def _toy_task(monkeypatch):
    import stp.data_order
    from tests._trainer_entry import toy_task_for

    monkeypatch.setattr(stp.data_order, "task_for", toy_task_for(stp.data_order.task_for))


@pytest.mark.slow
def test_dtrpo_resumes_bit_for_bit(tmp_path, monkeypatch, _toy_task):
    """Offline dTRPO through the shared loop: pairs built on first use, shuffled epochs over them; a run killed
    while writing checkpoint 2 and resumed equals the uninterrupted one (metrics and weights, bitwise)."""
    import stp.checkpoint
    import stp.files
    import stp.trainer
    from stp.config import parse_args

    pairs = tmp_path / "pairs.jsonl"
    flags = ["--method", "dtrpo", "--grpo.num_iterations", "1", "--grpo.max_steps", "4", "--run.save_every", "1",
             "--dtrpo.pairs_path", str(pairs), "--dtrpo.pair_prompts", "3"]
    ref = tmp_path / "ref"
    summary = stp.trainer.train(parse_args(_train_flags(ref, *flags)))
    assert summary["method"] == "dtrpo" and summary["steps"] == 4 and 1 <= summary["pairs"] <= 3
    rows = stp.trainer.read_metrics(ref / "metrics.jsonl")
    assert abs(rows[0]["loss"] - math.log(2)) < 1e-5  # step 1: theta = ref
    assert all(r["reward_chosen"] > r["reward_rejected"] for r in rows)
    assert rows[-1]["loss"] < rows[0]["loss"]

    out = tmp_path / "killed"
    real_save = stp.checkpoint.save_checkpoint

    def save(path, step, **kw):
        if step == 2:
            raise _Killed
        return real_save(path, step, **kw)

    monkeypatch.setattr(stp.checkpoint, "save_checkpoint", save)
    with pytest.raises(_Killed):
        stp.trainer.train(parse_args(_train_flags(out, *flags)))
    monkeypatch.setattr(stp.checkpoint, "save_checkpoint", real_save)
    stp.trainer.train(parse_args(_train_flags(out, *flags, "--run.resume")))
    untimed = [{k: v for k, v in r.items() if k not in stp.trainer.TIMING_KEYS} for r in rows]
    again = [{k: v for k, v in r.items() if k not in stp.trainer.TIMING_KEYS}
             for r in stp.trainer.read_metrics(out / "metrics.jsonl")]
    assert again == untimed
    ta = stp.files.load_tensors(stp.trainer.last_checkpoint(ref) / "trainable.safetensors")
    tb = stp.files.load_tensors(stp.trainer.last_checkpoint(out) / "trainable.safetensors")
    assert all(torch.equal(ta[k], tb[k]) for k in ta)


def test_dtrpo_online_trains_with_ratio_one_at_the_first_iteration(tmp_path, _toy_task):
    import stp.trainer
    from stp.config import parse_args

    out = tmp_path / "online"
    stp.trainer.train(parse_args(_train_flags(out, "--method", "dtrpo-online", "--grpo.num_iterations", "2",
                                              "--grpo.max_steps", "2", "--run.save_every", "0")))
    rows = stp.trainer.read_metrics(out / "metrics.jsonl")
    assert [r["iteration"] for r in rows] == [0, 1]
    assert abs(rows[0]["ratio"] - 1.0) < 1e-6 and rows[0]["kl"] < 1e-8 and rows[0]["clip_fraction"] == 0


def test_dtrpo_settings_are_checked():
    from stp.config import ConfigError, parse_args

    with pytest.raises(ConfigError, match=r"grpo.num_iterations=2 is not allowed; allowed: 1 with method 'dtrpo'"):
        parse_args(["--method", "dtrpo", "--grpo.num_iterations", "2"])
    with pytest.raises(ConfigError, match=r"rollout.early_stop=0.95 .* none with dtrpo.mode 'packed'"):
        parse_args(["--method", "dtrpo", "--grpo.num_iterations", "1", "--dtrpo.mode", "packed"])
    with pytest.raises(ConfigError, match=r"dtrpo.beta is a setting of method 'dtrpo' only"):
        parse_args(["--method", "stp", "--dtrpo.beta", "0.2"])
    assert "dtrpo" not in parse_args([]).to_dict()


def test_pairs_command_line_writes_and_resumes(tmp_path, capsys):
    from stp.pairs import main, read_pairs_file

    out = tmp_path / "p.jsonl"
    args = ["--model", "tiny", "--task", "sudoku", "--out", str(out), "--limit", "3", "--num-generations", "2",
            "--gen-length", "8", "--block-length", "4", "--steps", "4", "--prompt-format", "compact",
            "--source", "generated"]
    assert main(args) == 0
    records, _ = read_pairs_file(out)
    assert len(records) == 3 and all(r["settings"]["steps"] == 4 for r in records)
    assert "pairs," in capsys.readouterr().err
    before = out.read_bytes()
    assert main(args) == 0 and out.read_bytes() == before  # every prompt already there
    with pytest.raises(SystemExit, match=r"field 'settings.steps' is 4, this run has 8"):
        main([a if a != "4" or args[i - 1] != "--steps" else "8" for i, a in enumerate(args)])
