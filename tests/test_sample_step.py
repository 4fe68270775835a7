"""sample_step: every available backend against the float64 reference, and the counter-based noise itself."""

from __future__ import annotations

import math

import pytest
import torch

from stp_kernels import available_backends, counter_gumbel, sample_step, sample_step_reference
from stp_kernels.reference import counter_uniform, mix32, row_keys
from tests._compare import assert_close

HAS_CUDA = torch.cuda.is_available()
_gpu = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")]
BACKENDS = [pytest.param("cpu", b, id=f"cpu-{b}") for b in available_backends("cpu", op="sample_step")] + [
    pytest.param("cuda", b, id=f"cuda-{b}", marks=_gpu) for b in ("torch", "torch_chunked", "triton", "cuda", "gemm")
]


def _sizes(device, backend):
    if device == "cpu" and backend == "triton":
        return 23, 40, 301
    return (517, 264, 20011) if device == "cuda" else (131, 72, 3001)


def _make(seed, device, backend, dtype, with_vocab):
    gen = torch.Generator().manual_seed(seed)
    n, hdim, vsize = _sizes(device, backend)
    hidden = torch.randn(2, n, hdim, generator=gen)
    weight = torch.randn(vsize, hdim, generator=gen) * (3.0 / hdim**0.5)
    rows = torch.randperm(2 * n, generator=gen)[: n]
    row_ids = torch.randint(0, 2**40, (n,), generator=gen)  # stable identities, beyond 32 bits on purpose
    vocab = torch.randperm(vsize, generator=gen)[: vsize // 2].sort().values if with_vocab else None
    to = dict(device=device)
    return (hidden.to(dtype).to(**to), weight.to(dtype).to(**to), rows.to(**to), row_ids.to(**to),
            None if vocab is None else vocab.to(**to))


def _logits64(hidden, weight, rows, vocab):
    h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows).double()
    ids = torch.arange(weight.shape[0], device=weight.device) if vocab is None else vocab
    return h @ weight.index_select(0, ids).double().T


def _score_gap(hidden, weight, rows, row_ids, vocab, temperature, seed, step):
    """Per row: the gap between the best and second-best float64 reference score (near-ties may differ)."""
    h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows).double()
    ids = torch.arange(weight.shape[0], device=weight.device) if vocab is None else vocab
    z = h @ weight.index_select(0, ids).double().T
    score = z / temperature + counter_gumbel(seed, step, row_ids, ids).double() if temperature > 0 else z
    top2 = score.topk(2, dim=-1).values
    return top2[:, 0] - top2[:, 1]


@pytest.mark.parametrize("with_vocab", [False, True], ids=["full", "vocab"])
@pytest.mark.parametrize("temperature", [0.0, 0.7, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("device,backend", BACKENDS)
def test_matches_float64(device, backend, dtype, temperature, with_vocab, seed):
    hidden, weight, rows, row_ids, vocab = _make(seed, device, backend, dtype, with_vocab)
    step = seed % 1000
    x0, conf, logp, entropy = sample_step(hidden, weight, seed=seed, step=step, rows=rows, row_ids=row_ids,
                                          temperature=temperature, vocab=vocab, backend=backend, return_logp=True,
                                          return_entropy=True)
    ref_x0, ref_conf, ref_entropy = sample_step_reference(hidden, weight, seed=seed, step=step, rows=rows,
                                                          row_ids=row_ids, temperature=temperature, vocab=vocab,
                                                          return_entropy=True)
    assert x0.dtype == torch.int64 and conf.dtype == torch.float32 and entropy.dtype == torch.float32
    # The entropy of the untempered softmax over the (prior-restricted) vocabulary, at every row. It is lse - mean,
    # a difference of two numbers of the logits' size, so its float32 error scales with the largest logit.
    z_max = _logits64(hidden, weight, rows, vocab).abs().amax(-1)
    bad = ~((entropy.double() - ref_entropy.double()).abs() <= 2e-6 * (1 + z_max))  # NaN is bad too
    assert not bad.any(), f"{backend} entropy: error > 2e-6 (1 + max |z|) at rows {bad.nonzero()[:5, 0].tolist()}"
    # Asking for the entropy changes nothing else.
    x0_only, conf_only = sample_step(hidden, weight, seed=seed, step=step, rows=rows, row_ids=row_ids,
                                     temperature=temperature, vocab=vocab, backend=backend)
    assert torch.equal(x0_only, x0) and torch.equal(conf_only, conf)
    differ = x0 != ref_x0
    if differ.any():  # allowed only where the float64 scores of the top two candidates are a near-tie
        gap = _score_gap(hidden, weight, rows, row_ids, vocab, temperature, seed, step)
        assert (gap[differ] < 1e-4).all(), f"{backend}: x0 differs at rows {differ.nonzero()[:5, 0].tolist()}"
    same = ~differ
    assert_close(conf[same], ref_conf[same], atol=1e-6, rtol=1e-4, what=f"{backend} confidence")
    assert_close(logp[same].exp(), conf[same], atol=1e-7, rtol=1e-6, what=f"{backend} logp")
    if vocab is not None:
        assert torch.isin(x0, vocab).all(), "x0 outside the vocabulary prior"


def _entropy64(z: torch.Tensor) -> torch.Tensor:
    """-sum p log p of softmax(z) in float64, written independently of the reference's lse - mean."""
    logp = torch.log_softmax(z.double(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_entropy_of_peaked_and_flat_rows(device, backend, seed):
    """Rows from nearly one-hot (entropy ~ 0: lse and mean cancel) to uniform (entropy = log Vs), realistic logit
    spreads (max logit ~ 30), with the output tuple in the documented order."""
    gen = torch.Generator().manual_seed(seed)
    n, hdim, vsize = _sizes(device, backend)
    hidden = torch.randn(n, hdim, generator=gen)
    # Per-row logit spread from 0 (uniform) to 30 standard deviations' worth (peaked).
    hidden *= torch.linspace(0.0, 1.0, n)[:, None] ** 2 * 10.0
    weight = torch.randn(vsize, hdim, generator=gen) * (3.0 / hdim**0.5)
    vocab = torch.randperm(vsize, generator=gen)[: vsize * 2 // 3].sort().values
    for voc in (None, vocab):
        out = sample_step(hidden.to(device), weight.to(device), seed=seed, step=1, temperature=0.8,
                          vocab=None if voc is None else voc.to(device), backend=backend, return_entropy=True)
        assert len(out) == 3
        ids = torch.arange(vsize) if voc is None else voc
        z = hidden.double() @ weight.index_select(0, ids).double().T
        expected = _entropy64(z)
        assert expected[0].item() == pytest.approx(math.log(ids.numel()), abs=1e-9)
        assert expected[-1].item() < 0.5 * expected[0].item()  # the rows do span peaked to flat
        atol = 2e-6 * (1 + z.abs().amax(-1))
        err = (out[2].cpu().double() - expected).abs()
        assert (err <= atol).all() and torch.isfinite(out[2]).all(), (
            f"{backend}: entropy error {err.max().item():.3e} at row {err.argmax().item()}")
        both = sample_step(hidden.to(device), weight.to(device), seed=seed, step=1, temperature=0.8,
                           vocab=None if voc is None else voc.to(device), backend=backend, return_logp=True,
                           return_entropy=True)
        assert len(both) == 4 and torch.equal(both[3], out[2]) and torch.equal(both[0], out[0])
        assert_close(both[2].exp(), both[1], atol=1e-7, rtol=1e-6, what=f"{backend} logp is the 3rd output")


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_deterministic_and_batch_independent(device, backend, seed):
    hidden, weight, rows, row_ids, vocab = _make(seed, device, backend, torch.float32, True)
    kw = dict(seed=seed, step=3, temperature=0.9, vocab=vocab, backend=backend)
    a = sample_step(hidden, weight, rows=rows, row_ids=row_ids, **kw)
    b = sample_step(hidden, weight, rows=rows, row_ids=row_ids, **kw)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    # The same rows sampled in another order (another batch layout) get the same draws.
    perm = torch.randperm(rows.numel(), generator=torch.Generator().manual_seed(seed)).to(rows.device)
    c = sample_step(hidden, weight, rows=rows[perm], row_ids=row_ids[perm], **kw)
    assert torch.equal(c[0], a[0][perm])


def test_noise_is_gumbel_and_keyed_by_every_counter():
    tokens = torch.arange(20000)
    g = counter_gumbel(1234, 7, torch.arange(50), tokens)
    assert abs(g.mean().item() - 0.5772) < 0.01 and abs(g.var().item() - torch.pi**2 / 6) < 0.03
    u = counter_uniform(row_keys(1234, 7, torch.arange(50)), tokens)
    assert 0 < u.min().item() and u.max().item() < 1
    hist = torch.histc(u, bins=10, min=0, max=1) / u.numel()
    assert (hist - 0.1).abs().max().item() < 0.005, hist
    # Changing any counter changes the draw.
    rows = torch.arange(50)
    for other in (counter_gumbel(1235, 7, rows, tokens), counter_gumbel(1234, 8, rows, tokens),
                  counter_gumbel(1234, 7, rows + 1, tokens), counter_gumbel(1234 + 2**32, 7, rows, tokens)):
        assert (other != g).float().mean() > 0.99


def test_mix32_matches_python_integers():
    xs = [0, 1, 2**31 - 1, 2**31, 2**32 - 1, 0xDEADBEEF]
    assert mix32(torch.tensor(xs)).tolist() == [mix32(x) for x in xs]
    # Fixed values from an independent uint32 implementation (numpy, wrapping multiply): the kernels in csrc/ and
    # triton/ reproduce these bit for bit.
    assert mix32(0x12345678) == 0xF5E71C96 and mix32(1) == 0x688990C0


def test_gumbel_max_samples_the_softmax(seed):
    """Over many draws, x0 ~ softmax(z / T): chi-square-like check on a 6-token vocabulary."""
    torch.manual_seed(seed)
    weight = torch.randn(6, 8)
    hidden = torch.randn(1, 8).expand(20000, 8).contiguous()
    temperature = 0.8
    x0, _ = sample_step(hidden, weight, seed=seed, step=0, temperature=temperature, backend="torch_chunked")
    freq = torch.bincount(x0, minlength=6).float() / x0.numel()
    expected = torch.softmax(hidden[0] @ weight.T / temperature, -1)
    assert (freq - expected).abs().max().item() < 0.015, (freq, expected)


BAD = {
    "negative temperature": (dict(temperature=-1.0), ValueError, "temperature must be a finite number >= 0"),
    "float seed": (dict(seed=1.5), TypeError, "seed must be an int"),
    "row_ids length": (dict(row_ids=torch.arange(3)), ValueError, "row_ids has 3 entries but 4 rows"),
    "rows range": (dict(rows=torch.tensor([0, 1, 99, 2])), ValueError, r"rows must lie in \[0, 10\)"),
    "vocab unsorted": (dict(vocab=torch.tensor([3, 1])), ValueError, "sorted strictly increasing"),
    "empty rows": (dict(rows=torch.zeros(0, dtype=torch.long)), ValueError, "no rows to sample"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_is_named(name):
    change, exc, message = BAD[name]
    kw = dict(seed=1, step=0, rows=torch.tensor([0, 3, 9, 4]), temperature=1.0)
    kw.update(change)
    with pytest.raises(exc, match=message):
        sample_step(torch.randn(2, 5, 8), torch.randn(30, 8), **kw)


def _unmix32(y: int) -> int:
    """Inverse of lowbias32 (``reference.mix32``) on Python ints."""
    y ^= y >> 16
    y = (y * pow(0x846CA68B, -1, 2**32)) & 0xFFFFFFFF
    y ^= (y >> 15) ^ (y >> 30)
    y = (y * pow(0x7FEB352D, -1, 2**32)) & 0xFFFFFFFF
    return y ^ (y >> 16)


def _row_id_with_bits(seed: int, step: int, token: int, bits: int) -> int:
    """A row identity whose counter draws exactly ``bits`` for ``token`` at (seed, step): inverts the key chain
    key = mix32(call_key ^ mix32(r_lo ^ mix32(r_hi))) and bits = mix32(key ^ mix32(token)) with r_hi = 0."""
    from stp_kernels.reference import call_key

    key = _unmix32(bits) ^ mix32(token)
    return _unmix32(_unmix32(key) ^ call_key(seed, step)) ^ mix32(0)


@pytest.mark.parametrize("backend", available_backends("cpu", op="sample_step"))
def test_extreme_noise_draws_stay_finite(backend):
    """bits 0xFFFFFFFF and 0 are the extremes of the uniform draw. With 24 bits the top one rounded to u = 1.0 in
    float32, gave +inf Gumbel noise and let an arbitrary token win whatever its logit (probability 2**-24 per
    row and token, ~0.75% of rows per step at LLaDA's vocabulary). Both must give finite noise on every backend."""
    assert all(_unmix32(mix32(x)) == x for x in (0, 1, 0xDEADBEEF, 0xFFFFFFFF))
    seed, step, vsize, top, bottom = 99, 3, 64, 5, 9
    ids = torch.tensor([_row_id_with_bits(seed, step, top, 0xFFFFFFFF), _row_id_with_bits(seed, step, bottom, 0)])
    keys = row_keys(seed, step, ids)
    bits = mix32(keys[:, None] ^ mix32(torch.tensor([top, bottom]))[None, :])
    assert bits[0, 0].item() == 0xFFFFFFFF and bits[1, 1].item() == 0
    u = counter_uniform(keys, torch.tensor([top, bottom]))
    assert u[0, 0].item() == 1 - 2**-24 and u[1, 1].item() == 2**-24  # exact, strictly inside (0, 1)
    g = counter_gumbel(seed, step, ids, torch.arange(vsize))
    assert torch.isfinite(g).all() and g.max().item() < 16.7 and g.min().item() > -2.9
    # Logits are column 0 of the weight (hidden = e_0). Row 0: the token drawing the top noise sits 50 below every
    # other token, so it can never win (its score is at most -50 + 16.64 < the others' minimum of -2.82).
    # Row 1: the token drawing the bottom noise sits 40 above the rest, so it must win (37.2 > 16.64).
    hidden = torch.zeros(2, 4)
    hidden[:, 0] = 1.0
    weights = []
    for tok, logit in ((top, -50.0), (bottom, 40.0)):
        w = torch.zeros(vsize, 4)
        w[tok, 0] = logit
        weights.append(w)
    for row, (w, tok) in enumerate(zip(weights, (top, bottom))):
        x0, conf = sample_step(hidden[row : row + 1], w, seed=seed, step=step, row_ids=ids[row : row + 1],
                               temperature=1.0, backend=backend)
        assert torch.isfinite(conf).all()
        if row == 0:
            assert x0.item() != tok, f"{backend}: the token with +inf-prone noise was drawn against a 50-logit gap"
        else:
            assert x0.item() == tok, f"{backend}: the bottom noise draw is not finite ({x0.item()} won)"


@pytest.mark.parametrize("with_vocab", [False, True], ids=["full", "vocab"])
@pytest.mark.parametrize("temperature", [0.0, 0.7, 1.3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("device,backend", BACKENDS + [pytest.param("cpu", "gemm-triton", id="cpu-gemm-triton")])
def test_tempered_logp_of_the_draw_matches_float64(device, backend, dtype, temperature, with_vocab, seed,
                                                    monkeypatch):
    """log softmax(z / T)[x0] from the sampling pass equals float64 computed from the same inputs, at the token the
    backend drew (so near-ties cannot matter), and 0 at T = 0; the other outputs are unchanged by asking for it."""
    if backend == "gemm-triton":
        from stp_kernels import _gemm_common as G

        monkeypatch.setattr(G.settings, "epilogue", "triton")
        monkeypatch.setattr(G.settings, "chunk", 64)
        backend = "gemm"
    hidden, weight, rows, row_ids, vocab = _make(seed, device, "triton", dtype, with_vocab)
    kw = dict(seed=seed, step=3, rows=rows, row_ids=row_ids, temperature=temperature, vocab=vocab, backend=backend)
    x0, conf, logp, ent, tlogp = sample_step(hidden, weight, return_logp=True, return_entropy=True,
                                             return_tempered_logp=True, **kw)
    plain = sample_step(hidden, weight, return_logp=True, return_entropy=True, **kw)
    for a, b in zip((x0, conf, logp, ent), plain):
        assert torch.equal(a, b)
    assert tlogp.dtype == torch.float32 and tlogp.shape == x0.shape
    if temperature == 0.0:
        assert torch.equal(tlogp, torch.zeros_like(tlogp))
        return
    z = _logits64(hidden, weight, rows, vocab)
    slots = x0 if vocab is None else torch.searchsorted(vocab, x0)
    want = torch.log_softmax(z / temperature, -1).gather(1, slots[:, None])[:, 0]
    assert_close(tlogp, want, atol=2e-5, rtol=2e-5, what=f"{backend} tempered log-prob")
    # the reference and the sampler's second-pass helper say the same
    from stp.sampler import behaviour_logprob

    h_rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows)
    assert_close(behaviour_logprob(h_rows, weight, x0, temperature, vocab), want, atol=2e-5, rtol=2e-5,
                 what="behaviour_logprob")
