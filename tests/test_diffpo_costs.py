"""DiFFPO's cost accounting and advantages (docs/method.md section 8): batch passes beside NFE per sample, the NFE
term of the controller's advantages that lambda scales (and that the policy does not see), importance weights
computed from the scored log-probs where the rollout's distribution is not the scored one (classifier-free
guidance, KV cache, LoRA dropout) and the surrogate under a vocabulary prior, the controller clipped with the model,
and the sampled threshold policy of stp.eval. Tiny model with random weights; float64 replays as references."""

from __future__ import annotations

import json

import pytest
import torch

import stp.trainer
from stp.config import parse_args
from stp.controller import SampledThreshold, ThresholdController
from stp.loss import RolloutBatch, group_advantages
from stp.methods import get_method
from stp.metrics import batch_passes, eval_columns, total_reward
from stp.models import load
from stp.sampler import GenerationOutput, generate
from stp.surrogate import two_mf_logprobs
from tests.test_diffpo import _one_thread, model  # noqa: F401  (the same fixtures: one thread, the tiny model)

BASE = ["--method", "diffpo", "--model.name_or_path", "tiny", "--rollout.gen_length", "16",
        "--rollout.block_length", "8", "--rollout.steps", "8", "--rollout.temperature", "0.9",
        "--rollout.early_stop", "none", "--grpo.num_generations", "2"]
T = 0.9


def _method(*flags):
    cfg = parse_args([*BASE, *flags])
    return get_method(cfg.method)(cfg)


def _prompts(model, batch=4, seed=7):
    gen = torch.Generator().manual_seed(seed)
    special = {model.mask_token_id, model.eos_token_id, model.pad_token_id}
    allowed = torch.tensor([t for t in range(model.vocab_size) if t not in special])
    prompts = allowed[torch.randint(0, allowed.numel(), (batch, 5), generator=gen)]
    mask = torch.ones_like(prompts)
    mask[0, :2] = 0  # one left-padded prompt
    prompts[0, :2] = model.pad_token_id
    return prompts, mask, allowed


def _rollout(model, batch=4, seed=7, **kw) -> RolloutBatch:
    prompts, mask, _ = _prompts(model, batch, seed)
    out = generate(model, prompts, attention_mask=mask, gen_length=16, block_length=8, steps=8, temperature=T,
                   seed=seed, record_logprobs=True, **kw)
    return RolloutBatch(prompt_ids=prompts, prompt_attention_mask=mask, completion_ids=out.completions,
                        advantages=group_advantages(torch.arange(batch, dtype=torch.float32), 2),
                        sample_ids=torch.arange(batch), commit_step=out.commit_step,
                        behaviour_logprobs=out.behaviour_logprobs)


def _replay_old(model, batch, tau, vocab=None) -> torch.Tensor:
    """[B, C] float64 2-MF log-probs rebuilt context by context without CFG, cache or dropout: positions with
    s <= tau under [prompt ; all MASK], later ones under [prompt ; z_tau] (anchors: none here)."""
    mask_id = model.mask_token_id
    p_len = batch.prompt_ids.shape[1]
    w = model.lm_head_weight.double()
    if vocab is not None:
        w = w[vocab]
    out = torch.zeros(batch.completion_ids.shape, dtype=torch.float64)
    for b in range(batch.completion_ids.shape[0]):
        y, cs = batch.completion_ids[b], batch.commit_step[b]
        contexts = ((torch.full_like(y, mask_id), cs <= tau[b]), (torch.where(cs > tau[b], mask_id, y), cs > tau[b]))
        for ctx, sel in contexts:
            ids = torch.cat([batch.prompt_ids[b], ctx])[None]
            attn = torch.cat([batch.prompt_attention_mask[b], torch.ones_like(y)])[None]
            with torch.no_grad():
                h = model.backbone(ids, attn)[0, p_len:].double()
            lp = torch.log_softmax(h @ w.T / T, -1)
            slot = y if vocab is None else torch.searchsorted(vocab, y)
            out[b][sel] = lp.gather(1, slot[:, None])[:, 0][sel]
    return out


# ------------------------------------------------------------------------------------------ item 1: batch passes


def test_batch_passes_is_the_mean_over_calls_of_the_slowest_row():
    assert batch_passes([1, 5, 2, 2, 7], 2) == pytest.approx((5 + 2 + 7) / 3)
    assert batch_passes(torch.tensor([3, 3, 3]), 8) == 3.0  # equal rows: batch passes = NFE per sample
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match=f"batch_size={bad!r}; allowed: an integer >= 1"):
            batch_passes([1], bad)


def test_batch_passes_counts_what_the_sampler_ran(model):
    """EB decoding in calls of 2: the passes each call ran (the sampler's own forward_passes) against the per-sample
    NFE; finished rows stay in the batch, so the batch runs more passes than the mean sample uses."""
    prompts, mask, _ = _prompts(model, batch=6, seed=3)
    nfe, ran = [], []
    for lo in range(0, 6, 2):
        out = generate(model, prompts[lo:lo + 2], attention_mask=mask[lo:lo + 2], gen_length=16, block_length=8,
                       steps=8, temperature=T, seed=3, sample_ids=torch.arange(lo, lo + 2),
                       entropy_bound=torch.tensor([0.05, 40.0]))  # one slow row, one fast row per call
        nfe += out.nfe.tolist()
        ran.append(out.forward_passes)
    assert batch_passes(nfe, 2) == pytest.approx(sum(ran) / len(ran))
    assert batch_passes(nfe, 2) > sum(nfe) / len(nfe)


class _OneProcess:
    num_processes = 1

    def gather(self, x):
        return x


def test_rollout_and_eval_metrics_report_batch_passes():
    from stp.metrics import rollout_metrics

    nfe = torch.tensor([4, 9, 2, 2])
    gen = GenerationOutput(sequences=torch.zeros(4, 3, dtype=torch.long), completions=torch.zeros(4, 3,
                           dtype=torch.long), nfe=nfe, one_shot=torch.zeros(4, 3, dtype=torch.bool),
                           num_one_shot=torch.zeros(4, dtype=torch.long), anchors_kept=torch.zeros(4, dtype=torch.long),
                           trace=torch.zeros(4, 3, dtype=torch.long), forward_passes=9)
    state = {"nfe_sum": 0.0, "nfe_count": 0}
    rm = rollout_metrics(_OneProcess(), ["r"], torch.zeros(4, 1), gen, gen.completions, 1, 3, 1.0, 1.0, state)
    assert rm["nfe"] == 4.25 and rm["batch_passes"] == 9.0
    cols = eval_columns({"reward": 0.5, "accuracy": 0.5, "answer_rate": 1.0, "seconds": 1.0, "nfe": 3.0,
                         "batch_passes": 5.0})
    assert cols["eval_nfe"] == 3.0 and cols["eval_batch_passes"] == 5.0


# ------------------------------------------------------------------------------- item 2: lambda sets the trade-off


def _gen(nfe):
    return type("Gen", (), {"nfe": torch.tensor(nfe)})()


def _controller_scores(method, nfe, batch, feats, gamma):
    """The trainer's order: extra rewards (none for the NFE), group advantages of the task reward, then score."""
    torch.manual_seed(0)
    method.controller = ThresholdController(feats.shape[1], width=4, gamma_init=0.5)
    with torch.no_grad():  # a controller that depends on the features (the init's output layer is zero)
        for p in method.controller.parameters():
            p.add_(0.3 * torch.randn_like(p))
    method._pending = (feats, gamma)
    assert method.extra_rewards(_gen(nfe)) == {}
    return method.score(None, batch, seed=1, num_iterations=2, ref_context=None)


def test_nfe_term_is_lambda_times_the_group_centred_nfe_exactly():
    nfe = [4, 12, 16, 16, 1, 31]
    ref = torch.tensor(nfe, dtype=torch.float64).view(3, 2)
    ref = -(ref - ref.mean(1, keepdim=True)) / 16  # NFE_max = gen_length with eb
    for lam in (0.25, 0.5, 1.0, 3.0):
        term = _method("--diffpo.nfe_penalty", str(lam)).nfe_term(torch.tensor(nfe))
        assert torch.allclose(term.double(), lam * ref.reshape(-1), atol=1e-7)
    half = _method("--diffpo.nfe_penalty", "0.25").nfe_term(torch.tensor(nfe))
    assert torch.equal(_method("--diffpo.nfe_penalty", "0.5").nfe_term(torch.tensor(nfe)), 2 * half)


def test_doubling_lambda_doubles_the_nfe_part_of_the_controller_update():
    """Sampler mode, inner iteration 0 (rho = 1): the controller's loss is linear in its advantages, so the update
    of lambda = 2 L minus that of L equals the update of L minus that of lambda = 0 (the NFE part doubles), and in
    a group whose task rewards tie the advantage is the NFE term alone, proportional to lambda (the old reward
    penalty gave +-1.41 there whatever lambda)."""
    torch.manual_seed(1)
    feats, gamma = torch.randn(4, 6), torch.tensor([0.3, 2.0, 0.5, 1.5])
    task_rewards = torch.tensor([1.0, 1.0, 0.0, 1.0])  # group 0 ties; group 1 does not
    nfe = [14, 4, 12, 6]
    batch = RolloutBatch(prompt_ids=torch.zeros(4, 1, dtype=torch.long), prompt_attention_mask=None,
                         completion_ids=torch.zeros(4, 16, dtype=torch.long),
                         advantages=group_advantages(task_rewards, 2), sample_ids=torch.arange(4),
                         commit_step=torch.ones(4, 16, dtype=torch.long))
    grads, advs = {}, {}
    for lam in (0.0, 0.4, 0.8):
        m = _method("--diffpo.mode", "sampler", "--diffpo.nfe_penalty", str(lam))
        scores = _controller_scores(m, nfe, batch, feats, gamma)
        loss, metrics = m.loss(None, batch, scores, seed=1, iteration=0)
        m.controller.zero_grad()
        loss.backward()
        grads[lam] = torch.cat([p.grad.flatten() for p in m.controller.parameters()]).double()
        advs[lam] = batch.advantages + (scores["nfe_term"][0] if "nfe_term" in scores else 0)
    assert torch.allclose(grads[0.8] - grads[0.4], grads[0.4] - grads[0.0], atol=1e-6)
    assert (grads[0.4] - grads[0.0]).abs().max() > 1e-4  # the NFE part is not nothing
    assert torch.allclose(advs[0.8][:2], 2 * advs[0.4][:2]) and advs[0.4][0] == pytest.approx(-0.4 * 5 / 16)


def test_the_policy_does_not_see_the_nfe_in_joint_mode(model):
    """Two rollouts that differ only in their NFE: the policy's loss and gradients are bit for bit the same in
    joint mode (the NFE varies with the controller's gamma draw, which the policy does not choose); the
    controller's loss differs. This follows the trainer's path: task reward + extra rewards -> advantages."""
    batch = _rollout(model, entropy_bound=0.3)
    feats, gamma = torch.randn(4, int(model.lm_head_weight.shape[1])), torch.tensor([0.3, 2.0, 0.5, 1.5])
    task_rewards = torch.tensor([[1.0], [1.0], [0.0], [1.0]])
    out = []
    for nfe in ([14, 4, 12, 6], [4, 14, 6, 12]):
        m = _method("--diffpo.mode", "joint", "--diffpo.nfe_penalty", "0.5")
        torch.manual_seed(0)
        m.controller = ThresholdController(feats.shape[1], width=4)
        m._pending = (feats, gamma)
        extra = m.extra_rewards(_gen(nfe))
        rewards = torch.cat([task_rewards, *(v.float()[:, None] for v in extra.values())], 1)
        b = RolloutBatch(**{**batch.__dict__, "advantages": group_advantages(total_reward(rewards), 2)})
        scores = m.score(model, b, seed=1, num_iterations=2, ref_context=None)
        model.zero_grad(set_to_none=True)
        model.requires_grad_(True)
        loss, metrics = m.loss(model, b, scores, seed=1, iteration=1)
        loss.backward()
        out.append((torch.cat([p.grad.flatten() for p in m.controller.parameters()]),
                    [p.grad.clone() for p in model.parameters() if p.grad is not None],
                    loss.detach() - metrics["controller_loss"]))
        model.requires_grad_(False)
    (c1, g1, l1), (c2, g2, l2) = out
    assert torch.equal(l1, l2) and len(g1) == len(g2) > 0 and all(torch.equal(a, b) for a, b in zip(g1, g2))
    assert not torch.equal(c1, c2)


def test_mode_model_puts_the_nfe_term_on_the_policy():
    """Mode model (no controller: the policy's entropies set the NFE): the policy's advantages are A_task + N.
    Token normalisation over completions of 4 and 2 loss tokens, ratio 1: loss = -sum_b A_b |o_b| / 6."""
    m = _method("--diffpo.mode", "model", "--diffpo.nfe_penalty", "0.5", "--diffpo.normalize", "token")
    batch = RolloutBatch(prompt_ids=torch.zeros(2, 1, dtype=torch.long), prompt_attention_mask=None,
                         completion_ids=torch.zeros(2, 4, dtype=torch.long), advantages=torch.zeros(2),
                         sample_ids=torch.arange(2), commit_step=torch.ones(2, 4, dtype=torch.long),
                         behaviour_logprobs=torch.zeros(2, 4))
    valid = torch.tensor([[True] * 4, [True, True, False, False]])
    m._logprobs = lambda model, b, tau: type("S", (), {"logprobs": torch.zeros(2, 4), "valid": valid})()
    m.extra_rewards(_gen([3, 9]))
    scores = m.score(None, batch, seed=0, num_iterations=1, ref_context=None)
    a = 0.5 * 3 / 16
    assert torch.allclose(scores["nfe_term"][0], torch.tensor([a, -a]))
    loss, _ = m.loss(None, batch, scores, seed=0, iteration=0)
    assert loss.item() == pytest.approx(-(a * 4 - a * 2) / 6, abs=1e-7)


# ------------------------------------------------------------------------------ item 3: exact importance weights


@pytest.mark.parametrize("flags, kw", [
    (["--rollout.cfg_scale", "1.5"], {"cfg_scale": 1.5}),
    (["--rollout.cache", "prefix"], {"cache": "prefix"}),
])
def test_weights_at_tau_plus_one_come_from_the_scored_logprobs(model, flags, kw):
    """With CFG or a KV cache the rollout drew from other logits than the surrogate scores: the weight of a token
    committed at tau + 1 is min(C, exp(old - behaviour)) with old the float64 replay, not a forced 1."""
    batch = _rollout(model, batch=6, entropy_bound=0.3, **kw)
    df = _method("--diffpo.mode", "model", "--diffpo.nfe_penalty", "0", *flags)
    scores = df.score(model, batch, seed=3, num_iterations=3, ref_context=None)
    valid = scores["old"][0] != 0
    far = 0.0
    for it in range(3):
        at = (batch.commit_step == scores["tau"][it][:, None] + 1) & valid
        old = _replay_old(model, batch, scores["tau"][it])
        assert torch.allclose(scores["old"][it][valid].double(), old[valid], atol=1e-4)
        ref = torch.exp(old - batch.behaviour_logprobs.double()).clamp(max=2.0)
        assert torch.allclose(scores["weight"][it][at].double(), ref[at], atol=1e-4)
        far = max(far, (old - batch.behaviour_logprobs.double())[at].abs().max().item())
    assert far > 1e-2, far  # a forced w = 1 would be wrong here
    assert not df.exact_unit_weights()


def test_weights_at_tau_plus_one_stay_exactly_one_in_the_exact_setting(model):
    batch = _rollout(model, batch=6, entropy_bound=0.3)
    df = _method("--diffpo.mode", "model", "--diffpo.nfe_penalty", "0")
    assert df.exact_unit_weights()
    scores = df.score(model, batch, seed=3, num_iterations=2, ref_context=None)
    at = (batch.commit_step == scores["tau"][0][:, None] + 1) & (scores["old"][0] != 0)
    assert at.any() and (scores["weight"][0][at] == 1.0).all()


def test_lora_dropout_weights_come_from_the_scored_logprobs(model):
    """LoRA dropout at scoring time (the trainer scores in train mode): old log-probs under a dropout mask differ
    from the rollout's, so the weight at tau + 1 is computed; without dropout it is 1."""
    from stp.policy import setup_trainable

    flags = ["--model.use_lora", "true", "--model.lora_dropout", "0.5", "--diffpo.nfe_penalty", "0",
             "--diffpo.mode", "model"]
    df = _method(*flags)
    lm = load("tiny")
    setup_trainable(lm, df.config, None, "cpu")
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in lm.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    lm.eval()
    batch = _rollout(lm, batch=6, entropy_bound=0.3)
    lm.train()
    torch.manual_seed(1)
    scores = df.score(lm, batch, seed=3, num_iterations=2, ref_context=None)
    at = (batch.commit_step == scores["tau"][0][:, None] + 1) & (scores["old"][0] != 0)
    ref = torch.exp(scores["old"][0] - batch.behaviour_logprobs).clamp(max=2.0)
    assert at.any() and torch.equal(scores["weight"][0][at], ref[at])
    assert (scores["old"][0] - batch.behaviour_logprobs)[at].abs().max() > 1e-3
    assert not df.exact_unit_weights() and _method("--model.use_lora", "true").exact_unit_weights()


def test_surrogate_scores_under_the_vocabulary_prior(model):
    """generate(vocab=V) records behaviour log-probs over V; the surrogate with vocab=V scores the tokens committed
    at tau + 1 to the same values (and the float64 replay over V everywhere); without V it does not."""
    _, _, allowed = _prompts(model)
    vocab = allowed[::2].sort().values
    batch = _rollout(model, batch=4, entropy_bound=0.3, vocab=vocab)
    tau = (batch.commit_step.max(1).values // 2).clamp(min=0)
    at = (batch.commit_step == tau[:, None] + 1)
    args = (model, batch.prompt_ids, batch.prompt_attention_mask, batch.completion_ids, batch.commit_step)
    with_v = two_mf_logprobs(*args, tau=tau, temperature=T, vocab=vocab)
    at &= with_v.valid
    assert at.any()
    assert torch.allclose(with_v.logprobs[at], batch.behaviour_logprobs[at], atol=1e-4)
    replay = _replay_old(model, batch, tau, vocab=vocab)
    assert torch.allclose(with_v.logprobs[with_v.valid].double(), replay[with_v.valid], atol=1e-4)
    without = two_mf_logprobs(*args, tau=tau, temperature=T)
    assert (without.logprobs[at] - batch.behaviour_logprobs[at]).abs().max() > 1e-2


# ------------------------------------------------------------------ item 4: clipping, the sampled threshold policy


def test_sampler_mode_clips_the_controller_with_the_model(tmp_path):
    """Mode sampler: only the controller has gradients, so the logged (pre-clip) norm is the controller's: it was
    left out of the clipping before (norm 0)."""
    out = tmp_path / "s"
    stp.trainer.train(parse_args([*BASE, "--diffpo.mode", "sampler", "--rollout.steps", "4",
                                  "--grpo.prompts_per_step", "2", "--grpo.num_iterations", "1",
                                  "--grpo.max_steps", "2", "--run.train_examples", "4", "--run.eval_examples", "0",
                                  "--run.tensorboard", "false", "--run.output_dir", str(out)]))
    rows = stp.trainer.read_metrics(out / "metrics.jsonl")
    assert all(r["grad_norm"] is not None and r["grad_norm"] > 0 for r in rows)


def test_sampled_threshold_draws_per_example_index():
    ctl = ThresholdController(6, width=4, gamma_init=0.7, sigma_init=0.5)
    f = torch.randn(5, 6)
    policy = SampledThreshold(ctl, seed=9)
    got = torch.cat([policy.median(f[:2]), policy.median(f[2:])])  # two calls: ids 0-1, then 2-4
    assert torch.equal(got, ctl.sample(f, seed=9, sample_ids=torch.arange(5)))
    assert not torch.allclose(got, ctl.median(f))
    assert "sampled_policy_seed" in policy.state_dict()


def test_eval_cli_sampled_controller(tmp_path, capsys):
    from stp.eval import main

    common = ["--model", "tiny", "--task", "sudoku", "--gen-length", "16", "--block-length", "8", "--limit", "3",
              "--source", "generated", "--no-progress", "--sampler", "eb", "--batch-size", "2"]
    ctl = ThresholdController(load("tiny").lm_head_weight.shape[1], width=4, gamma_init=0.25, sigma_init=1.0)
    ctl.save(tmp_path / "ctl")
    out = tmp_path / "s.jsonl"
    assert main([*common, "--controller", str(tmp_path / "ctl"), "--controller-gamma", "sampled", "--output",
                 str(out), "--seed", "4"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    gammas = [r["gamma"] for r in rows]
    assert len(set(gammas)) == 3 and all(abs(g - 0.25) > 1e-6 for g in gammas)  # drawn, not the median
    text = capsys.readouterr().out
    nfe = [r["nfe"] for r in rows]
    assert f"{batch_passes(nfe, 2):.1f} passes per batch" in text
    # a partly written file is not resumed with the sampled policy
    out.write_text(out.read_text().splitlines(keepends=True)[0])
    with pytest.raises(SystemExit):
        main([*common, "--controller", str(tmp_path / "ctl"), "--controller-gamma", "sampled", "--output", str(out),
              "--seed", "4"])
    assert "is not resumed" in capsys.readouterr().err



def test_benchmark_paired_standard_error_against_a_float64_reference():
    from benchmarks.eb_tradeoff import paired

    a, b = [1.0, 0.5, 0.25, 1.0, 0.0], [0.5, 0.5, 0.0, 0.75, 0.25]
    d = torch.tensor(a, dtype=torch.float64) - torch.tensor(b, dtype=torch.float64)
    mean, se = paired(a, b)
    assert mean == pytest.approx(d.mean().item(), abs=1e-12)
    assert se == pytest.approx((d.std(unbiased=True) / len(a) ** 0.5).item(), abs=1e-12)
    with pytest.raises(ValueError, match="need the same puzzles"):
        paired([1.0, 2.0], [1.0])
