"""DiFFPO (``stp.methods.diffpo``, ``stp.surrogate``, ``stp.controller``): the d1 limit of the 2-MF surrogate bit
for bit, importance weights of exactly 1 where the surrogate's context is the behaviour context, the controller's
gradient sign on a toy reward that pays for fewer NFE, resume equality with a controller, and bad settings.
Tiny model with random weights from a fixed seed; toy rewards (tests._trainer_entry) for the trainer runs."""

from __future__ import annotations

import contextlib

import pytest
import torch

import stp.checkpoint
import stp.data_order
import stp.files
import stp.trainer
from stp.config import ConfigError, parse_args
from stp.controller import ThresholdController
from stp.loss import RolloutBatch, group_advantages, grpo_loss
from stp.methods import get_method
from stp.models import load
from stp.sampler import generate
from stp.surrogate import draw_tau, num_passes, two_mf_logprobs
from tests._trainer_entry import toy_task_for

BASE = ["--model.name_or_path", "tiny", "--rollout.gen_length", "16", "--rollout.block_length", "8",
        "--rollout.steps", "8", "--rollout.temperature", "0.9", "--rollout.early_stop", "none"]


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setattr(stp.data_order, "task_for", toy_task_for(stp.data_order.task_for))
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model():
    m = load("tiny")
    m.eval()
    return m


def _rollout(model, *, entropy_bound=None, batch=4, seed=7) -> RolloutBatch:
    gen = torch.Generator().manual_seed(seed)
    special = {model.mask_token_id, model.eos_token_id, model.pad_token_id}
    allowed = torch.tensor([t for t in range(model.vocab_size) if t not in special])
    prompts = allowed[torch.randint(0, allowed.numel(), (batch, 5), generator=gen)]
    mask = torch.ones_like(prompts)
    mask[0, :2] = 0  # one left-padded prompt
    prompts[0, :2] = model.pad_token_id
    out = generate(model, prompts, attention_mask=mask, gen_length=16, block_length=8, steps=8, temperature=0.9,
                   seed=seed, record_logprobs=True, entropy_bound=entropy_bound)
    rewards = torch.arange(batch, dtype=torch.float32)
    return RolloutBatch(prompt_ids=prompts, prompt_attention_mask=mask, completion_ids=out.completions,
                        advantages=group_advantages(rewards, 2), sample_ids=torch.arange(batch),
                        commit_step=out.commit_step, behaviour_logprobs=out.behaviour_logprobs)


def _method(*flags):
    cfg = parse_args([*BASE, *flags])
    return get_method(cfg.method)(cfg)


def _loss_and_grads(method, model, batch, scores):
    model.zero_grad(set_to_none=True)
    loss, metrics = method.loss(model, batch, scores, seed=11, iteration=1)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None], metrics


# --------------------------------------------------------------------------------------------------- the d1 limit


@pytest.mark.parametrize("eb", [None, 0.5])
def test_tau_zero_and_unit_weights_reproduce_d1_bit_for_bit(model, eb):
    batch = _rollout(model, entropy_bound=eb)
    d1 = _method("--method", "d1", "--estimator.num_draws", "1", "--estimator.prompt_mask_prob", "0",
                 "--estimator.temperature", "0.9")
    df = _method("--method", "diffpo", "--diffpo.mode", "model", "--diffpo.tau_sampling", "zero",
                 "--diffpo.importance_weights", "false", "--diffpo.normalize", "token", "--diffpo.nfe_penalty", "0")
    model.requires_grad_(True)
    s1 = d1.score(model, batch, seed=11, num_iterations=2, ref_context=contextlib.nullcontext)
    s2 = df.score(model, batch, seed=11, num_iterations=2, ref_context=contextlib.nullcontext)
    assert torch.equal(s1["old"], s2["old"]) and torch.equal(s1["ref"], s2["ref"])
    l1, g1, m1 = _loss_and_grads(d1, model, batch, s1)
    l2, g2, m2 = _loss_and_grads(df, model, batch, s2)
    assert torch.equal(l1, l2) and len(g1) == len(g2) and all(torch.equal(a, b) for a, b in zip(g1, g2))
    assert all(torch.equal(m1[k], m2[k]) for k in ("kl", "clip_fraction", "ratio"))
    # ... and the real surrogate is a different estimator (so the equality above could fail)
    full = _method("--method", "diffpo", "--diffpo.mode", "model", "--diffpo.normalize", "token",
                   "--diffpo.nfe_penalty", "0")
    s3 = full.score(model, batch, seed=11, num_iterations=2, ref_context=contextlib.nullcontext)
    assert (s3["tau"] > 0).any() and not torch.equal(s3["old"], s1["old"])
    model.requires_grad_(False)


def test_tau_draws_are_counter_keyed_and_in_range(model):
    batch = _rollout(model, entropy_bound=0.3, batch=6)
    passes = num_passes(batch.commit_step)
    taus = torch.stack([draw_tau(5, it, batch.sample_ids, passes) for it in range(50)])
    assert (taus >= 0).all() and (taus < passes).all() and len(set(taus.flatten().tolist())) > 3
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    assert torch.equal(draw_tau(5, 2, batch.sample_ids[perm], passes[perm]), taus[2][perm])
    assert not torch.equal(draw_tau(5, 3, batch.sample_ids, passes), taus[2]) or not torch.equal(
        draw_tau(6, 2, batch.sample_ids, passes), taus[2])


def test_two_contexts_score_what_the_surrogate_says(model):
    batch = _rollout(model, entropy_bound=0.3)
    tau = num_passes(batch.commit_step) // 2
    out = two_mf_logprobs(model, batch.prompt_ids, batch.prompt_attention_mask, batch.completion_ids,
                          batch.commit_step, tau=tau, temperature=0.9)
    assert out.num_sequences == 4 + int((tau > 0).sum())
    # one sample scored alone against a direct build of its two contexts
    b = 1
    mask_id = model.mask_token_id
    y = batch.completion_ids[b]
    a_ctx = torch.full_like(y, mask_id)
    b_ctx = torch.where(batch.commit_step[b] > tau[b], mask_id, y)
    prompt = batch.prompt_ids[b]
    for ctx, which in ((a_ctx, ~out.in_b[b]), (b_ctx, out.in_b[b])):
        h = model.backbone(torch.cat([prompt, ctx])[None])[0, prompt.numel():].float()
        lp = torch.log_softmax(h @ model.lm_head_weight.float().T / 0.9, -1).gather(1, y[:, None])[:, 0]
        sel = which & out.valid[b]
        assert torch.allclose(out.logprobs[b][sel], lp[sel], atol=1e-5)


# ------------------------------------------------------------------------------------------ importance weights


def test_weights_are_exactly_one_for_tokens_committed_at_tau_plus_one(model):
    batch = _rollout(model, entropy_bound=0.3, batch=6)
    df = _method("--method", "diffpo", "--diffpo.mode", "model", "--diffpo.nfe_penalty", "0")
    scores = df.score(model, batch, seed=3, num_iterations=4, ref_context=None)
    valid = scores["old"][0] != 0
    hits = 0
    for it in range(4):
        at = (batch.commit_step == scores["tau"][it][:, None] + 1) & valid
        hits += int(at.sum())
        assert (scores["weight"][it][at] == 1.0).all()
        # the surrogate really scores them under their behaviour context: the log-probs agree to rounding
        assert torch.allclose(scores["old"][it][at], batch.behaviour_logprobs[at], atol=1e-4)
        later = (batch.commit_step > scores["tau"][it][:, None] + 1) & valid
        assert (scores["weight"][it][later] <= 2.0).all()
    assert hits > 0
    later = (batch.commit_step > scores["tau"][0][:, None] + 1) & valid
    assert (scores["weight"][0][later] != 1.0).any()  # elsewhere the weights do correct something


def test_weighted_loss_options():
    lp = torch.randn(3, 5)
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[0, 2:] = False
    adv = torch.tensor([1.0, -1.0, 0.5])
    plain, _ = grpo_loss(lp, lp, None, adv, mask, beta=0)
    ones, _ = grpo_loss(lp, lp, None, adv, mask, beta=0, token_weights=torch.ones(3, 5))
    assert torch.equal(plain, ones)
    seq, _ = grpo_loss(lp, lp, None, adv, mask, beta=0, normalize="sequence")
    assert torch.allclose(seq, -(adv).mean())  # ratio 1: each completion's mean term is -A
    with pytest.raises(ValueError, match="normalize='x'; allowed: 'token', 'sequence'"):
        grpo_loss(lp, lp, None, adv, mask, normalize="x")


# --------------------------------------------------------------------------------------------------- controller


@pytest.mark.parametrize("pays_for", ["fewer_nfe", "more_nfe"])
def test_controller_gradient_moves_gamma_the_right_way(pays_for):
    torch.manual_seed(0)
    features = torch.randn(8, 12)
    ctl = ThresholdController(12, width=8, gamma_init=1.0, sigma_init=0.5)
    opt = torch.optim.SGD(ctl.parameters(), lr=0.05)
    start = ctl.median(features).mean().item()
    group = 8
    for step in range(40):
        feats = features.repeat_interleave(group, 0)  # 8 prompts x 8 draws
        gamma = ctl.sample(feats, seed=step, sample_ids=torch.arange(feats.shape[0]))
        nfe = 32.0 / (1.0 + gamma)  # a larger bound commits more per step: fewer forward passes
        reward = -nfe / 32 if pays_for == "fewer_nfe" else nfe / 32
        adv = group_advantages(reward, group)
        loss = -(adv * ctl.log_prob(feats, gamma)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    end = ctl.median(features).mean().item()
    assert (end > 1.5 * start) if pays_for == "fewer_nfe" else (end < start / 1.5), (start, end)


def test_controller_save_load_and_errors(tmp_path):
    ctl = ThresholdController(6, width=4, gamma_init=0.7, sigma_init=0.3)
    f = torch.randn(3, 6)
    assert torch.allclose(ctl.median(f), torch.full((3,), 0.7))
    ctl.save(tmp_path / "c")
    back = ThresholdController.load(tmp_path / "c")
    assert all(torch.equal(a, b) for a, b in zip(ctl.state_dict().values(), back.state_dict().values()))
    with pytest.raises(FileNotFoundError, match="controller.json: no such file"):
        ThresholdController.load(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="gamma_init=0"):
        ThresholdController(6, gamma_init=0)


# ------------------------------------------------------------------------------------------- trainer and resume


TRAIN = ["--method", "diffpo", "--model.name_or_path", "tiny", "--rollout.gen_length", "16",
         "--rollout.block_length", "8", "--rollout.steps", "4", "--grpo.prompts_per_step", "2",
         "--grpo.num_generations", "2", "--grpo.num_iterations", "2", "--run.train_examples", "8",
         "--run.eval_examples", "2", "--run.tensorboard", "false", "--grpo.warmup_steps", "0",
         "--grpo.learning_rate", "0.01", "--diffpo.gamma", "0.5", "--diffpo.nfe_penalty", "0.5"]


class _Killed(Exception):
    pass


def _untimed(rows):
    return [{k: v for k, v in r.items() if k not in stp.trainer.TIMING_KEYS} for r in rows]


def test_joint_run_resumes_bit_for_bit_with_its_controller(tmp_path, monkeypatch):
    flags = ["--grpo.max_steps", "4", "--run.save_every", "1"]
    ref = tmp_path / "ref"
    summary = stp.trainer.train(parse_args([*TRAIN, *flags, "--run.output_dir", str(ref)]))
    assert summary["method"] == "diffpo"
    rows = stp.trainer.read_metrics(ref / "metrics.jsonl")
    assert all(r["gamma"] is not None and r["gamma"] > 0 for r in rows)
    # the NFE enters the controller's advantages as its own term, not the reward (no reward/nfe_penalty column)
    assert all("reward/nfe_penalty_mean" not in r and r["nfe_term"] >= 0 for r in rows)
    assert all(r["batch_passes"] >= r["nfe"] for r in rows) and summary["batch_passes_per_rollout"] >= \
        summary["nfe_per_sample"]
    ctl_files = {p.name for p in (ref / "controller").iterdir()}
    assert ctl_files == {"controller.json", "controller.safetensors"} and (ref / "adapter").is_dir()
    saved = stp.files.load_tensors(ref / "controller" / "controller.safetensors")
    assert not torch.equal(saved["out.weight"], torch.zeros_like(saved["out.weight"]))  # it was trained

    out = tmp_path / "killed"
    real_save = stp.checkpoint.save_checkpoint

    def save(path, step, **kw):
        if step == 2:
            raise _Killed
        return real_save(path, step, **kw)

    monkeypatch.setattr(stp.checkpoint, "save_checkpoint", save)
    with pytest.raises(_Killed):  # dies at step 2: resumes from step 1, between the inner iterations of rollout 0
        stp.trainer.train(parse_args([*TRAIN, *flags, "--run.output_dir", str(out)]))
    monkeypatch.setattr(stp.checkpoint, "save_checkpoint", real_save)
    assert (stp.trainer.last_checkpoint(out) / "method_modules.safetensors").is_file()
    stp.trainer.train(parse_args([*TRAIN, *flags, "--run.output_dir", str(out), "--run.resume"]))
    assert _untimed(stp.trainer.read_metrics(out / "metrics.jsonl")) == _untimed(rows)
    for name in ("trainable.safetensors", "method_modules.safetensors"):
        a = stp.files.load_tensors(stp.trainer.last_checkpoint(ref) / name)
        b = stp.files.load_tensors(stp.trainer.last_checkpoint(out) / name)
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------------- settings


@pytest.mark.parametrize("flags, message", [
    (["--diffpo.mode", "sampler", "--diffpo.sampler", "schedule"], "diffpo.sampler='schedule' is not allowed"),
    (["--rollout.temperature", "0"], "rollout.temperature=0.0 is not allowed"),
    (["--diffpo.importance_cap", "0.5"], "diffpo.importance_cap=0.5 is not allowed; allowed: a finite number >= 1"),
    (["--diffpo.gamma", "0"], "diffpo.gamma=0.0 is not allowed"),
    (["--diffpo.mode", "fast"], "diffpo.mode='fast'"),
    (["--rollout.confidence_threshold", "0.9"], "rollout.confidence_threshold=0.9 is not allowed"),
])
def test_bad_settings_are_refused_with_the_field(flags, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_args(["--method", "diffpo", *flags])


def test_diffpo_settings_belong_to_diffpo():
    with pytest.raises(ConfigError, match="diffpo.gamma is a setting of method 'diffpo' only"):
        parse_args(["--method", "d1", "--diffpo.gamma", "2"])
    assert "diffpo" not in parse_args(["--method", "stp"]).to_dict()
    assert parse_args(["--method", "diffpo"]).to_dict()["diffpo"]["importance_cap"] == 2.0


# ---------------------------------------------------------------------------------------------------- stp.eval


def test_eval_cli_eb_flags(tmp_path, capsys):
    from stp.eval import main

    common = ["--model", "tiny", "--task", "sudoku", "--gen-length", "16", "--block-length", "8", "--limit", "3",
              "--source", "generated", "--no-progress"]
    for flags, message in ((["--sampler", "eb"], "needs exactly one of --gamma G"),
                           (["--gamma", "1"], "--gamma 1.0: needs --sampler eb"),
                           (["--sampler", "eb", "--gamma", "-1"], "--gamma -1.0: must be a finite number >= 0"),
                           (["--sampler", "eb", "--controller", str(tmp_path / "none")], "controller.json: no such")):
        with pytest.raises(SystemExit) as info:
            main([*common, *flags, "--output", str(tmp_path / "x.jsonl")])
        assert info.value.code == 2
        assert message in capsys.readouterr().err
    # a saved controller decodes each prompt with its median gamma, recorded per row
    ctl = ThresholdController(load("tiny").lm_head_weight.shape[1], width=4, gamma_init=0.25)
    ctl.save(tmp_path / "ctl")
    assert main([*common, "--sampler", "eb", "--controller", str(tmp_path / "ctl"), "--output",
                 str(tmp_path / "c.jsonl")]) == 0
    import json

    rows = [json.loads(line) for line in (tmp_path / "c.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(abs(r["gamma"] - 0.25) < 1e-6 for r in rows)
    assert all("controller" in r["settings"] and r["settings"]["model"] == "tiny" for r in rows)
    assert "mean gamma 0.250" in capsys.readouterr().out


def test_sampler_mode_trains_only_the_controller(tmp_path):
    out = tmp_path / "sampler"
    stp.trainer.train(parse_args([*TRAIN, "--diffpo.mode", "sampler", "--grpo.max_steps", "2", "--run.eval_examples",
                                  "0", "--run.output_dir", str(out)]))
    rows = stp.trainer.read_metrics(out / "metrics.jsonl")
    assert all(r["kl"] == 0 and r["controller_loss"] is not None for r in rows)
    lora = stp.files.load_tensors(stp.trainer.last_checkpoint(out) / "trainable.safetensors")
    assert all(not v.any() for k, v in lora.items() if "lora_B" in k)  # the adapter never moved from its zero init
    ctl = stp.files.load_tensors(out / "controller" / "controller.safetensors")
    assert ctl["out.weight"].abs().sum() > 0
