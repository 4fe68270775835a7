"""Dream's decoding (stp.decoding through stp.sampler.generate) against a reference of Dream's own
``diffusion_generate``, and Dream's embedding padding row.

The reference below is written from Dream's generation code (``_sample`` of Dream-v0's generation_utils.py): the
canvas is the prompt padded with [MASK]; at step i of ``steps`` it runs the model on the whole sequence, shifts the
logits (done by ``DiffusionLM.logits``, checked against Dream's formula in test_models), and either commits each
masked position with probability 1 - s/t (``origin``) or scores the masked positions (temperature, top_p, top_k
filters, then softmax) and commits the ``int(M * (1 - s / t))`` best, M = the batch's masked count / batch size, every
remaining one at the last step. The schedule is computed as Dream computes it (float32 ``linspace``), the scores in
float64 with plain loops over rows and positions. ``origin``'s uniforms come from the counter the sampler uses (a
fixed noise tensor shared by both, as tests/test_sampler.py does for LLaDA's Gumbel noise); Dream draws them from
``torch.rand``, so ``origin`` equals Dream's only given Dream's draws. Ties of confidence go to the earlier position
(Dream's ``topk`` leaves them unspecified).

The model: a random Dream-shaped checkpoint (tests/_models_reference.py) whose [MASK] row of the LM head is zero, so
that [MASK] (logit 0) is never the argmax, as for a trained Dream.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from stp import decoding
from stp.decoding import DreamDecoding
from stp.models import load
from stp.sampler import Prior, generate
from stp_kernels.reference import counter_uniform, row_keys
from tests._models_reference import DREAM_CONFIG, dream_weights, write_checkpoint

MASK = DREAM_CONFIG["mask_token_id"]
PAD = DREAM_CONFIG["pad_token_id"]


@pytest.fixture(scope="module")
def dream(tmp_path_factory):
    weights = dream_weights(DREAM_CONFIG, 11)
    weights["lm_head.weight"][MASK] = 0.0
    path = write_checkpoint(tmp_path_factory.mktemp("dream"), DREAM_CONFIG, weights)
    model = load(str(path))
    model.eval()
    return model


def _prompts(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 90, (batch, length), generator=g)  # ids below the special ones (93..95)


def _filtered_probs(logits: torch.Tensor, temperature: float, top_p, top_k) -> torch.Tensor:
    """Dream's sample_tokens up to the softmax, for one row of float64 logits (plain Python where it loops)."""
    z = logits.clone()
    if temperature > 0:
        z = z / temperature
    if top_p is not None and top_p < 1:
        order = sorted(range(z.numel()), key=lambda v: -float(z[v]))
        p = torch.softmax(z, -1)
        cum, keep = 0.0, set()
        for rank, v in enumerate(order):
            if rank == 0 or cum <= top_p:  # Dream removes a token once the mass before it passed top_p
                keep.add(v)
            cum += float(p[v])
        z = torch.tensor([float(z[v]) if v in keep else -math.inf for v in range(z.numel())], dtype=torch.float64)
    if top_k is not None:
        kth = sorted(z.tolist(), reverse=True)[min(top_k, z.numel()) - 1]
        z = torch.where(z < kth, torch.tensor(-math.inf, dtype=torch.float64), z)
    return torch.softmax(z, -1)


def dream_reference(model, prompt: torch.Tensor, *, gen_length: int, steps: int, alg: str, top_k=None, top_p=None,
                    eps: float = 1e-3, seed: int = 0) -> torch.Tensor:
    """Dream's diffusion_generate at temperature 0 for unpadded prompts [B, P] -> completions [B, gen_length]."""
    batch, plen = prompt.shape
    x = torch.cat([prompt, torch.full((batch, gen_length), MASK)], 1)
    timesteps = torch.linspace(1, eps, steps + 1)  # float32, as Dream
    for i in range(steps):
        mask_index = x == MASK
        with torch.no_grad():
            logits = model.logits(x).double()
        t, s = timesteps[i], timesteps[i + 1]
        if alg == "origin":
            p_transfer = 1 - s / t if i < steps - 1 else 1
            for b in range(batch):
                for pos in range(plen, plen + gen_length):
                    if not mask_index[b, pos]:
                        continue
                    row_id = torch.tensor([b * gen_length + pos - plen])
                    keys = row_keys(seed ^ decoding._ORIGIN_SALT, i, row_id)
                    u = counter_uniform(keys, torch.zeros(1, dtype=torch.long))[0, 0]
                    if u < p_transfer:
                        x[b, pos] = int(_filtered_probs(logits[b, pos], 0.0, top_p, top_k).argmax())
            continue
        num_mask_token = mask_index.sum() / batch
        k = int(num_mask_token * (1 - s / t)) if i < steps - 1 else int(num_mask_token)
        new = x.clone()
        for b in range(batch):
            scored = []
            for pos in range(x.shape[1]):
                if not mask_index[b, pos]:
                    continue
                p = _filtered_probs(logits[b, pos], 0.0, top_p, top_k)
                x0 = int(p.argmax())
                assert x0 != MASK
                if alg == "maskgit_plus":
                    conf = float(p[x0])
                elif alg == "topk_margin":
                    top = sorted(p.tolist(), reverse=True)
                    conf = top[0] - top[1]
                else:
                    conf = sum(float(q) * math.log(float(q) + 1e-10) for q in p)
                scored.append((-conf, pos, x0))
            assert k <= len(scored), "Dream's topk would pick unmasked positions: outside its documented use"
            for _, pos, x0 in sorted(scored)[:k]:
                new[b, pos] = x0
        x = new
    return x[:, plen:]


CASES = [  # (alg, top_k, top_p, gen_length, steps)
    ("entropy", None, None, 12, 12), ("entropy", 5, None, 12, 5), ("entropy", None, 0.9, 12, 7),
    ("maskgit_plus", None, None, 12, 12), ("maskgit_plus", 3, None, 12, 4), ("maskgit_plus", 4, 0.8, 10, 6),
    ("topk_margin", None, None, 12, 12), ("topk_margin", 5, None, 12, 5), ("topk_margin", None, 0.9, 10, 3),
    ("origin", None, None, 12, 12), ("origin", 3, None, 12, 4), ("origin", None, 0.9, 10, 6),
]


@pytest.mark.parametrize("alg, top_k, top_p, gen_length, steps", CASES)
def test_matches_dream_reference(dream, alg, top_k, top_p, gen_length, steps):
    prompt = _prompts(2, 5, seed=steps)
    cfg = DreamDecoding(alg=alg, top_k=top_k, top_p=top_p)
    out = generate(dream, prompt, gen_length=gen_length, block_length=gen_length, steps=steps, temperature=0.0,
                   seed=3, dream=cfg)
    ref = dream_reference(dream, prompt, gen_length=gen_length, steps=steps, alg=alg, top_k=top_k, top_p=top_p,
                          seed=3)
    assert torch.equal(out.completions, ref)
    assert (out.completions != MASK).all()
    if alg != "origin":  # per step: int(M * (1 - s / t)) commits (0 at some early steps), the rest at the last
        assert out.forward_passes == steps
        assert [int((out.trace[0] == i).sum()) for i in range(steps)] == _dream_counts(gen_length, steps)


def _dream_counts(masked: int, steps: int) -> list[int]:
    """Dream's commits per step for one row starting with ``masked`` masked positions (float32 as Dream)."""
    ts = torch.linspace(1, 1e-3, steps + 1)
    out = []
    for i in range(steps):
        k = int(torch.tensor(masked) / 1 * (1 - ts[i + 1] / ts[i])) if i < steps - 1 else masked
        out.append(k)
        masked -= k
    return out


def test_schedule_counts_are_dreams():
    """The count hook follows Dream's arithmetic step by step: float32 timesteps, M * (1 - s / t) truncated, every
    remaining position at the last step."""
    cfg = DreamDecoding(alg="entropy")
    for steps, masked in ((256, 256), (512, 512), (128, 256), (7, 30)):
        ts = decoding.dream_timesteps(steps, 1e-3, "cpu")
        still = torch.zeros(1, masked, dtype=torch.bool)
        left = masked
        for i in range(steps):
            still[:] = False
            still[0, :left] = True
            got = int(decoding.dream_commit_counts(cfg, still, torch.zeros(1, masked), ts, i)[0])
            m = torch.tensor(left * 1, dtype=torch.long) / 1  # Dream: mask_index.sum() / batch, float32
            want = int(m * (1 - ts[i + 1] / ts[i])) if i < steps - 1 else int(m)
            assert got == want
            left -= got
        assert left == 0


def test_blocks_decode_left_to_right_and_prior_and_budget(dream):
    prompt = _prompts(2, 4, seed=9)
    cfg = DreamDecoding(alg="entropy", top_k=5)
    out = generate(dream, prompt, gen_length=16, block_length=8, steps=8, temperature=0.0, seed=0, dream=cfg)
    first_block_done = out.trace[:, :8].max(1).values
    assert (out.trace[:, 8:].min(1).values > first_block_done).all()
    assert (out.completions != MASK).all() and out.forward_passes == 8
    # Anchors of a prior stay; rows with different anchor counts decode only their masked positions.
    tokens = torch.full((2, 16), 7)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[0, [1, 2, 3]] = True
    mask[1, 10] = True
    out = generate(dream, prompt, gen_length=16, block_length=16, steps=8, temperature=0.0, seed=0, dream=cfg,
                   prior=Prior(tokens=tokens, mask=mask))
    assert (out.completions[mask] == 7).all() and (out.trace[mask] == -1).all()
    assert (out.completions != MASK).all()
    # Temporal pruning: stop at floor(tau * L) filled positions, then one fill pass.
    out = generate(dream, prompt, gen_length=16, block_length=16, steps=16, temperature=0.0, seed=0, dream=cfg,
                   early_stop=0.5)
    assert (out.one_shot.sum(1) == 8).all() and (out.completions != MASK).all()
    filled = torch.tensor(_dream_counts(16, 16)).cumsum(0)
    assert (out.nfe == int((filled < 8).sum()) + 1 + 1).all()  # steps until the budget is reached, + the fill


def test_temperature_sampling(dream):
    prompt = _prompts(3, 4, seed=2)
    base = dict(gen_length=12, block_length=12, steps=6, seed=5)
    # top_k = 1 leaves one token per position: sampling at any temperature is then the greedy decode.
    one = DreamDecoding(alg="maskgit_plus", top_k=1)
    greedy = generate(dream, prompt, temperature=0.0, dream=one, **base).completions
    assert torch.equal(generate(dream, prompt, temperature=1.5, dream=one, **base).completions, greedy)
    cfg = DreamDecoding(alg="entropy", top_p=0.95)
    a = generate(dream, prompt, temperature=1.0, dream=cfg, **base).completions
    b = generate(dream, prompt[1:], temperature=1.0, dream=cfg, sample_ids=torch.tensor([1, 2]), **base).completions
    assert torch.equal(a[1:], b)  # a sample's draws depend on (seed, sample id), not on its batch
    c = generate(dream, prompt, temperature=1.0, dream=cfg, **{**base, "seed": 6}).completions
    assert not torch.equal(a, c)
    assert not torch.equal(a, generate(dream, prompt, temperature=0.0, dream=cfg, **base).completions)


@pytest.mark.parametrize("kwargs, message", [
    (dict(dream=DreamDecoding(alg="greedy")), "dream.alg='greedy'; allowed: origin, maskgit_plus, topk_margin, "
                                               "entropy"),
    (dict(dream=DreamDecoding(top_k=0)), "dream.top_k=0; allowed: None or an integer >= 1"),
    (dict(dream=DreamDecoding(top_k=2.0)), r"dream.top_k=2.0; allowed: None or an integer >= 1"),
    (dict(dream=DreamDecoding(top_p=1.5)), r"dream.top_p=1.5; allowed: None or a number in \(0, 1\]"),
    (dict(dream=DreamDecoding(top_p=0)), r"dream.top_p=0; allowed"),
    (dict(dream=DreamDecoding(eps=0)), r"dream.eps=0; allowed: a number in \(0, 1\)"),
    (dict(dream=DreamDecoding(eps=1.0)), r"dream.eps=1.0; allowed"),
    (dict(dream="entropy"), "dream must be a stp.decoding.DreamDecoding or None, got str"),
    (dict(dream=DreamDecoding(), remasking="random"), "remasking='random' is LLaDA's option"),
    (dict(dream=DreamDecoding(), confidence_threshold=0.9), "confidence_threshold=0.9 cannot be combined with dream"),
])
def test_bad_arguments(dream, kwargs, message):
    with pytest.raises(ValueError, match=message):
        generate(dream, _prompts(1, 3), gen_length=8, block_length=8, steps=4, **kwargs)


def test_embedding_padding_row_is_not_trained(dream, tmp_path):
    """Dream's embedding has padding_idx = pad_token_id: a full fine-tuning step leaves that row as loaded."""
    model = load(str(write_checkpoint(tmp_path / "d", DREAM_CONFIG, dream_weights(DREAM_CONFIG, 4))))
    emb = model.model.get_input_embeddings()
    assert emb.padding_idx == PAD
    model.train()
    before = emb.weight.detach().clone()
    ids = torch.tensor([[PAD, 5, 6, PAD, MASK, MASK, 7, PAD]])
    opt = torch.optim.SGD([p for p in model.model.parameters() if p.requires_grad], lr=0.5)
    loss = torch.nn.functional.cross_entropy(model.logits(ids)[0], torch.tensor([1, 2, 3, 4, 5, 6, 7, 8]))
    loss.backward()
    opt.step()
    after = emb.weight.detach()
    assert torch.equal(after[PAD], before[PAD])
    assert not torch.equal(after[5], before[5]) and not torch.equal(after[MASK], before[MASK])


# ------------------------------------------------------------------------------------------------ stp.eval flags


def _no_call(*a, **k):
    raise AssertionError("must not be called: the flags are checked first")


@pytest.mark.parametrize("extra, needle", [
    (["--top-k", "3"], "--top-k 3: applies to Dream's decoding only; allowed with --alg llada: no --top-k"),
    (["--alg", "llada", "--top-p", "0.9"], "--top-p 0.9: applies to Dream's decoding only"),
    (["--dream-eps", "0.01"], "--dream-eps 0.01: applies to Dream's decoding only"),
    (["--alg", "entropy", "--top-k", "0"], "--top-k 0: must be an integer >= 1"),
    (["--alg", "origin", "--top-p", "1.5"], "--top-p 1.5: must be a number in (0, 1]"),
    (["--alg", "topk_margin", "--top-p", "nan"], "--top-p nan: must be a number in (0, 1]"),
    (["--alg", "maskgit_plus", "--dream-eps", "1"], "--dream-eps 1.0: must be a number in (0, 1)"),
    (["--alg", "greedy"], "argument --alg: invalid choice: 'greedy'"),
])
def test_eval_flags_checked_before_loading(extra, needle, tmp_path, monkeypatch, capsys):
    import stp.models
    import stp.sampler
    from stp.eval import main

    monkeypatch.setattr(stp.models, "load", _no_call)
    monkeypatch.setattr(stp.sampler, "generate", _no_call)
    with pytest.raises(SystemExit) as exc:
        main(["--model", "tiny", "--task", "countdown", "--source", "generated", "--limit", "2",
              "--output", str(tmp_path / "o.jsonl"), *extra])
    assert exc.value.code == 2
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()


def test_eval_runs_dream_decoding(tmp_path, monkeypatch):
    """--alg entropy --top-k 4 reaches generate() as DreamDecoding and is part of the settings (a file made with
    LLaDA's decoding, whose settings have no such field, is another setting)."""
    import stp.sampler
    from stp.eval import ResumeError, main, read_results

    seen = []
    real = stp.sampler.generate

    def spy(*a, **k):
        seen.append(k.get("dream"))
        return real(*a, **k)

    monkeypatch.setattr(stp.sampler, "generate", spy)
    out = tmp_path / "o.jsonl"
    argv = ["--model", "tiny", "--task", "sudoku", "--source", "generated", "--limit", "2", "--gen-length", "16",
            "--block-length", "16", "--steps", "8", "--no-progress", "--device", "cpu", "--output", str(out)]
    assert main([*argv, "--alg", "entropy", "--top-k", "4"]) == 0
    assert seen == [DreamDecoding(alg="entropy", top_k=4, top_p=None, eps=1e-3)]
    row = [json.loads(line) for line in out.read_text().splitlines()][0]
    assert row["settings"]["dream"] == {"alg": "entropy", "top_k": 4, "top_p": None, "eps": 1e-3}
    llada = {k: v for k, v in row["settings"].items() if k != "dream"}
    with pytest.raises(ResumeError, match=r"'dream': file has \{'alg': 'entropy'.*this run \(absent\)"):
        read_results(out, llada)
