"""The entropy-bounded (EB) sampler of ``stp.sampler.generate`` (``entropy_bound``): the commit rule against a
direct reading of it, its limits (gamma = 0: one token per step; a huge gamma: a whole block per step), per-sample
thresholds, anchors, temporal pruning, and its argument errors. Tiny model with random weights from a fixed seed."""

from __future__ import annotations

import pytest
import torch

import stp.decoders.base
import stp.decoders.entropy_bound
from stp.models import load
from stp.sampler import Prior, entropy_bounded_commit, generate
from stp_kernels import available_backends

from tests._decoding import Recording


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    m = load("tiny")
    m.eval()
    return m


def _prompts(model, batch=3, width=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    special = {model.mask_token_id, model.eos_token_id, model.pad_token_id}
    allowed = torch.tensor([t for t in range(model.vocab_size) if t not in special])
    return allowed[torch.randint(0, allowed.numel(), (batch, width), generator=gen)]


def _per_step_counts(trace: torch.Tensor, passes: int) -> torch.Tensor:
    """[B, passes] positions committed by each forward pass (anchors excluded)."""
    return torch.stack([(trace == f).sum(1) for f in range(passes)], 1)


def test_commit_rule_is_the_largest_prefix_with_sum_minus_max_below_gamma():
    gen = torch.Generator().manual_seed(1)
    for _ in range(50):
        n = int(torch.randint(1, 12, (1,), generator=gen))
        h = torch.rand(1, n, generator=gen) * 2
        cand = torch.rand(1, n, generator=gen) < 0.7
        gamma = float(torch.rand(1, generator=gen) * 3)
        got = entropy_bounded_commit(h, cand, torch.tensor([gamma]), torch.tensor([n]))[0]
        # direct reading: try every prefix of the sorted candidates
        idx = [i for i in sorted(range(n), key=lambda i: (h[0, i].item(), i)) if cand[0, i]]
        best = 0
        for j in range(1, len(idx) + 1):
            vals = [h[0, i].item() for i in idx[:j]]
            if sum(vals) - max(vals) <= gamma + 1e-6:
                best = j
        best = max(best, 1) if idx else 0
        want = torch.zeros(n, dtype=torch.bool)
        want[idx[:best]] = True
        assert torch.equal(got, want), (h, cand, gamma, got, want)
    # the budget limit: 0 commits nothing, 1 at most one
    h = torch.tensor([[0.1, 0.2, 0.3]])
    cand = torch.ones(1, 3, dtype=torch.bool)
    assert entropy_bounded_commit(h, cand, torch.tensor([10.0]), torch.tensor([0])).sum() == 0
    assert entropy_bounded_commit(h, cand, torch.tensor([10.0]), torch.tensor([1])).tolist() == [[True, False, False]]


@pytest.mark.parametrize("block", [8, 16])
def test_gamma_zero_commits_one_token_per_step(model, block):
    ids = _prompts(model)
    out = generate(model, ids, gen_length=16, block_length=block, steps=16 // block, temperature=0.0,
                   entropy_bound=0.0, seed=0)
    assert out.forward_passes == 16 and out.nfe.tolist() == [16, 16, 16]
    counts = _per_step_counts(out.trace, out.forward_passes)
    assert (counts == 1).all()
    # blocks go left to right: every position of block 0 before any of block 1
    if block == 8:
        assert (out.trace[:, :8].max(1).values < out.trace[:, 8:].min(1).values).all()
    assert not (out.completions == model.mask_token_id).any()


def test_huge_gamma_commits_the_whole_block_in_one_step(model):
    ids = _prompts(model)
    out = generate(model, ids, gen_length=16, block_length=8, steps=2, temperature=0.0, entropy_bound=1e9, seed=0)
    assert out.forward_passes == 2 and out.nfe.tolist() == [2, 2, 2]
    assert (out.trace[:, :8] == 0).all() and (out.trace[:, 8:] == 1).all()


def test_per_sample_gamma_equals_each_sample_decoded_alone(model):
    ids = _prompts(model, batch=3)
    gammas = torch.tensor([0.0, 0.5, 1e9])
    out = generate(model, ids, gen_length=16, block_length=8, steps=2, temperature=0.9, entropy_bound=gammas,
                   seed=3, record_logprobs=True)
    assert out.nfe[0] == 16 and out.nfe[2] == 2 and 2 <= out.nfe[1] <= 16
    for b in range(3):
        alone = generate(model, ids[b:b + 1], gen_length=16, block_length=8, steps=2, temperature=0.9,
                         entropy_bound=float(gammas[b]), seed=3, sample_ids=torch.tensor([b]))
        assert torch.equal(alone.completions[0], out.completions[b])
        assert alone.nfe.item() == out.nfe[b].item()
    # the trajectory record: behaviour log-probs of committed tokens are finite and <= 0
    assert (out.behaviour_logprobs <= 0).all() and torch.isfinite(out.behaviour_logprobs).all()


def test_entropy_bound_with_anchors_and_temporal_pruning(model):
    ids = _prompts(model, batch=2)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[0, [1, 5, 9]] = True
    mask[1, [0, 15]] = True
    tokens = torch.where(mask, _prompts(model, batch=2, width=16, seed=5), torch.zeros(2, 16, dtype=torch.long))
    prior = Prior(tokens=tokens, mask=mask)
    out = generate(model, ids, gen_length=16, block_length=8, steps=2, temperature=0.0, entropy_bound=0.0,
                   prior=prior, seed=0)
    assert torch.equal(out.completions[mask], tokens[mask])  # anchors unchanged
    assert out.nfe.tolist() == [13, 14]  # one step per free position
    assert (out.commit_step[mask] == 0).all()
    # temporal pruning: budget floor(0.75 * 16) = 12 positions (anchors included), then the one-shot fill
    cut = generate(model, ids, gen_length=16, block_length=8, steps=2, temperature=0.0, entropy_bound=0.0,
                   prior=prior, early_stop=0.75, seed=0)
    assert cut.nfe.tolist() == [12 - 3 + 1, 12 - 2 + 1]
    assert cut.num_one_shot.tolist() == [4, 4]
    assert not (cut.completions == model.mask_token_id).any()
    # the steps before the cut decode exactly as without it
    kept = cut.trace < cut.forward_passes - 1
    assert torch.equal(cut.completions[kept & ~mask], out.completions[kept & ~mask])


def test_bad_entropy_bounds_are_refused(model):
    ids = _prompts(model, batch=2)
    kw = dict(gen_length=8, block_length=8, steps=1)
    with pytest.raises(ValueError, match="entropy_bound=-1.0; allowed: a finite number >= 0"):
        generate(model, ids, entropy_bound=-1.0, **kw)
    with pytest.raises(ValueError, match=r"shape \(3,\); allowed: \[B=2\]"):
        generate(model, ids, entropy_bound=torch.zeros(3), **kw)
    with pytest.raises(ValueError, match="outside"):
        generate(model, ids, entropy_bound=torch.tensor([0.0, float("nan")]), **kw)
    with pytest.raises(ValueError, match="confidence_threshold=0.5"):
        generate(model, ids, entropy_bound=1.0, confidence_threshold=0.5, **kw)
    with pytest.raises(ValueError, match="remasking='random'"):
        generate(model, ids, entropy_bound=1.0, remasking="random", **kw)


# Float32 entropies near log(V) have an ulp of ~5e-7; every backend is within a few ulps of the float64 value. A
# backend whose entropy is within ENT_TOL of it can order two positions against float64 only when their float64
# entropies are within 2 * ENT_TOL (TIE): such a near-tie may go either way, and two correct backends may then decode
# differently from there on (the tiny model's random weights give near-uniform, near-tied entropies).
ENT_TOL = 5e-6
TIE = 2 * ENT_TOL
TOKEN_TOL = 1e-5  # a committed token's float64 logit is within this of the largest (T = 0: argmax up to rounding)


def _candidates(masked: torch.Tensor, block: int) -> torch.Tensor:
    """[L] bool: the EB step's candidates for one sample, the masked positions of its first block holding one."""
    cand = torch.zeros_like(masked)
    if masked.any():
        cur = int(masked.int().argmax()) // block
        cand[cur * block:(cur + 1) * block] = masked[cur * block:(cur + 1) * block]
    return cand


def _eb_replay(model, ids, gamma, backend):
    """Decode with the entropy bound (T = 0, gen 16, block 8) through ``backend`` and check every forward pass
    against a float64 replay of the pass, from the hidden states the decoder gave ``sample_step`` and the canvas the
    model saw (both recorded during the run):

    - the backend's entropies are within ENT_TOL of the float64 ones and its x0 are float64 argmaxes (up to
      TOKEN_TOL); the committed tokens are too;
    - the committed set is an entropy-bounded commit up to rounding: the candidates are the still-masked positions
      of the sample's current block (its first block holding a masked position); the committed ones have the
      lowest float64 entropies up to TIE; their count is the number of exclusive prefix sums of the sorted
      entropies <= gamma (at least 1) for gamma moved by the rounding slack either way.

    Returns (output, recorded canvases, float64 entropies [passes, B, L], +inf beyond each pass's rows)."""
    rec = Recording(model)
    calls = []
    real = stp.decoders.base.sample_step

    def recording_sample_step(hidden, weight, **kwargs):
        out = real(hidden, weight, **kwargs)
        calls.append((hidden.clone(), out[0].clone(), out[2].clone()))
        return out

    stp.decoders.base.sample_step = recording_sample_step
    try:
        # every row in every pass (no compaction, no shared first pass): the replay reads [B, n] per pass
        out = generate(rec, ids, gen_length=16, block_length=8, steps=2, temperature=0.0, entropy_bound=gamma,
                       seed=0, backend=backend, compact=False, share_first=False)
    finally:
        stp.decoders.base.sample_step = real
    states = rec.calls
    batch, plen = ids.shape
    length, block = 16, 8
    weight = model.lm_head_weight.double()
    assert len(states) == len(calls) == out.forward_passes and not out.one_shot.any(), (backend, gamma)  # no fill
    ent64 = torch.full((len(calls), batch, length), torch.inf, dtype=torch.float64)
    for f, (x, (hid, x0_b, h_b)) in enumerate(zip(states, calls)):
        n = hid.shape[0] // batch  # the pass computed canvas positions 0..n-1
        z = (hid.double() @ weight.T).view(batch, n, -1)
        p = z.softmax(-1)
        h64 = torch.logsumexp(z, -1) - (p * z).sum(-1)  # [B, n]
        ent64[f, :, :n] = h64
        err = (h_b.double().view(batch, n) - h64).abs().max().item()
        assert err <= ENT_TOL, (backend, gamma, f, "entropy off by", err)
        zmax = z.max(-1).values
        x0_gap = (zmax - z.gather(-1, x0_b.view(batch, n, 1))[..., 0]).max().item()
        assert x0_gap <= TOKEN_TOL, (backend, gamma, f, "x0 is not the argmax; logit gap", x0_gap)
        masked = x[:, plen:] == model.mask_token_id
        for b in range(batch):
            committed = out.trace[b] == f
            assert torch.equal(states[f + 1][b, plen:] if f + 1 < len(states) else out.completions[b],
                               torch.where(committed, out.completions[b], x[b, plen:])), (backend, gamma, f, b)
            cand = _candidates(masked[b], block)
            assert not (committed & ~cand).any(), (backend, gamma, f, b, "commits a non-candidate")
            if not cand.any():
                assert not committed.any()
                continue
            assert not cand[n:].any(), (backend, gamma, f, b, "the pass did not compute a candidate")
            committed, cand = committed[:n], cand[:n]
            tok = out.completions[b, :n][committed]
            gap = (zmax[b, committed] - z[b, committed].gather(-1, tok[:, None])[:, 0]).max().item()
            assert gap <= TOKEN_TOL, (backend, gamma, f, b, "committed token is not the argmax; gap", gap)
            e = h64[b]
            rest = cand & ~committed
            if rest.any():
                spread = (e[committed].max() - e[rest].min()).item()
                assert spread <= TIE, (backend, gamma, f, b, "a lower-entropy position was passed over by", spread)
            srt = e[cand].sort().values
            before = srt.cumsum(0) - srt
            slack = srt.numel() * ENT_TOL
            lo = max(1, int((before <= gamma - slack).sum()))
            hi = max(1, int((before <= gamma + slack).sum()))
            assert lo <= int(committed.sum()) <= hi, (backend, gamma, f, b, int(committed.sum()), lo, hi)
    return out, states, ent64


def _same_as_reference_or_split_at_a_tie(model, ids, gamma, backend):
    """Both runs pass the float64 replay; they agree exactly until the first pass at which their commits differ
    (if any); at that pass both saw the same canvas, and every position one committed and the other not is within
    TIE, in float64, of every such position of the other (a near-tie broken differently by rounding), or, when the
    counts differ, gamma is within the rounding slack of a prefix sum. Returns that pass, or None."""
    ref, ref_states, ent = _eb_replay(model, ids, gamma, "torch")
    got, got_states, _ = _eb_replay(model, ids, gamma, backend)
    split = next((f for f in range(min(ref.forward_passes, got.forward_passes))
                  if not torch.equal(ref.trace == f, got.trace == f)), None)
    if split is None:
        assert torch.equal(got.completions, ref.completions) and torch.equal(got.trace, ref.trace), (backend, gamma)
        assert torch.equal(got.nfe, ref.nfe) and got.forward_passes == ref.forward_passes
        return None
    for f in range(split + 1):  # the same canvases up to and including the split pass
        assert torch.equal(ref_states[f], got_states[f]), (backend, gamma, f)
    for b in range(ids.shape[0]):
        mine, theirs = ref.trace[b] == split, got.trace[b] == split
        if torch.equal(mine, theirs):
            continue
        e = ent[split, b]
        if int(mine.sum()) == int(theirs.sum()):
            gap = (e[mine & ~theirs][:, None] - e[theirs & ~mine][None, :]).abs().max().item()
            assert gap <= TIE, (backend, gamma, split, b, "commits differ at entropies apart by", gap)
        else:
            cand = _candidates(ref_states[split][b, ids.shape[1]:] == model.mask_token_id, 8)
            srt = e[cand].sort().values
            before = srt.cumsum(0) - srt
            assert ((before - gamma).abs() <= srt.numel() * ENT_TOL).any(), (backend, gamma, split, b)
    return split


@pytest.mark.parametrize("backend", available_backends("cpu", op="sample_step"))
def test_every_backend_decodes_eb_like_the_reference(model, backend, seed):
    """The entropies come from each backend's fused pass. Every run is checked against a float64 replay at each step
    (``_eb_replay``), and against the torch backend's run: exactly equal, or equal until a step where the two
    committed different positions of a near-tie (float64 entropies within TIE; float32 rounding of ~5e-7 decides
    those: at gamma 0 Triton's interpreter commits two such positions of the first prompt in the other order). The
    prompts: two fixed ones and a fresh one per run. gamma 0 and 1e9 are the limits, 10 a real cut (the entropies
    are near log V ~ 4.65: three positions per step)."""
    ids = torch.cat([_prompts(model, batch=2), _prompts(model, batch=1, seed=seed)])
    for gamma in (0.0, 10.0, 1e9):
        _same_as_reference_or_split_at_a_tie(model, ids, gamma, backend)


def _perturbed(monkeypatch, change, backend="torch"):
    """Make the sampler's ``sample_step`` return ``change(x0, entropy)`` in place of its x0 and entropy when it runs
    on ``backend``."""
    real = stp.decoders.base.sample_step

    def wrapped(*args, **kwargs):
        out = list(real(*args, **kwargs))
        if kwargs.get("return_entropy") and kwargs.get("backend") == backend:
            out[0], out[2] = change(out[0], out[2])
        return tuple(out)

    monkeypatch.setattr(stp.decoders.base, "sample_step", wrapped)


def test_the_backend_check_catches_wrong_entropies_tokens_and_orders(model, monkeypatch):
    """Negative controls of the check above: entropies off by 1e-3 on every other row, a wrong token, or the
    highest entropy committed first are each refused; a backend within rounding of the float64 entropies that breaks
    near-ties differently (rounded to a coarser grid) passes, though its decoding departs from the torch backend's."""
    ids = _prompts(model, batch=2)
    with monkeypatch.context() as mp:
        _perturbed(mp, lambda x0, h: (x0, h + 1e-3 * (torch.arange(h.numel()) % 2)))
        with pytest.raises(AssertionError, match="entropy off by"):
            _eb_replay(model, ids, 0.0, "torch")
    with monkeypatch.context() as mp:
        _perturbed(mp, lambda x0, h: (torch.where(torch.arange(x0.numel()) == 3, (x0 + 1) % model.vocab_size, x0),
                                      h))
        with pytest.raises(AssertionError, match="argmax"):
            _eb_replay(model, ids, 0.0, "torch")
    with monkeypatch.context() as mp:  # the commit rule itself reversed: highest entropy first
        real_commit = stp.decoders.entropy_bound.entropy_bounded_commit
        mp.setattr(stp.decoders.entropy_bound, "entropy_bounded_commit",
                   lambda h, c, g, lim: real_commit(10 - h, c, g, lim))
        with pytest.raises(AssertionError, match="passed over"):
            _eb_replay(model, ids, 0.0, "torch")
    with monkeypatch.context() as mp:  # entropies rounded to a 2^-18 grid (error <= 1.9e-6): ties broken by position
        _perturbed(mp, lambda x0, h: (x0, torch.round(h * 2.0**18) / 2.0**18), backend="torch_chunked")
        assert _same_as_reference_or_split_at_a_tie(model, ids, 0.0, "torch_chunked") is not None
