"""The ``gemm`` backends (library matmul per vocabulary chunk + fused epilogue) against float64 references.

Both epilogues run here: torch (the CPU default) and Triton (through its interpreter on CPU). The chunk is set small
and odd so that small shapes cover many chunks and a ragged last chunk. The generic backend tests in
test_masked_logprob.py / test_sample_step.py also run ``gemm`` (default settings) through the public ops.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from stp_kernels import _gemm_common as G
from stp_kernels import gemm, gemm_sample_step, masked_logprob, masked_logprob_reference, torch_chunked
from stp_kernels.reference import counter_gumbel, row_keys
from tests._compare import assert_close, assert_within_torch_error

EPILOGUES = ["torch", "triton"]


@pytest.fixture
def chunked(monkeypatch):
    """Set the gemm settings for one test: (epilogue, chunk)."""

    def apply(epilogue: str, chunk: int = 37) -> None:
        monkeypatch.setattr(G.settings, "epilogue", epilogue)
        monkeypatch.setattr(G.settings, "chunk", chunk)

    return apply


def _inputs(seed: int, dtype: torch.dtype, n: int = 23, hdim: int = 40, vsize: int = 301, vocab: float | None = None,
            scale: float = 2.0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, hdim, generator=gen).to(dtype)
    weight = (torch.randn(vsize, hdim, generator=gen) * (scale / hdim**0.5)).to(dtype)
    ids = None
    if vocab is not None:
        ids = torch.randperm(vsize, generator=gen)[: int(vsize * vocab)].sort().values
        targets = ids[torch.randint(0, ids.numel(), (n,), generator=gen)]
    else:
        targets = torch.randint(0, vsize, (n,), generator=gen)
    grads = [torch.randn(n, generator=gen) for _ in range(3)]
    return hidden, weight, targets, ids, grads


def _outputs_and_grads(fn, hidden, weight, targets, vocab, grads, temperature, **kw):
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    outs = fn(h, w, targets, vocab=vocab, temperature=temperature, return_lse=True, return_entropy=True, **kw)
    sum((o * g.to(o.dtype)).sum() for o, g in zip(outs, grads)).backward()
    return [o.detach() for o in outs] + [h.grad, w.grad]


@pytest.mark.parametrize("vocab", [None, 0.45], ids=["full", "prior"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("epilogue", EPILOGUES)
def test_masked_logprob_matches_float64(epilogue, dtype, temperature, vocab, seed, chunked):
    chunked(epilogue)
    hidden, weight, targets, ids, grads = _inputs(seed, dtype, vocab=vocab)
    if dtype != torch.float32:  # a batch-mean loss's gradients (O(1) entries), as in test_masked_logprob's bf16 bound
        grads = [g / targets.numel() ** 0.5 for g in grads]
    ours = _outputs_and_grads(masked_logprob, hidden, weight, targets, ids, grads, temperature, backend="gemm")
    ref = _outputs_and_grads(masked_logprob_reference, hidden.double(), weight.double(), targets, ids, grads,
                             temperature)
    names = ["logp", "lse", "entropy", "d_hidden", "d_weight"]
    assert ours[3].dtype == dtype and ours[4].dtype == dtype
    if dtype == torch.float32:
        for o, r, name in zip(ours, ref, names):
            assert_close(o, r, atol=2e-5 * r.abs().max().item() + 1e-6, rtol=2e-4, what=f"gemm/{epilogue} {name}")
    else:
        theirs = _outputs_and_grads(masked_logprob_reference, hidden, weight, targets, ids, grads, temperature,
                                    upcast=None)
        for o, t, r, name in zip(ours, theirs, ref, names):
            assert_within_torch_error(o, t, r, atol=1e-2, ulps=1, what=f"gemm/{epilogue} {name}")


@pytest.mark.parametrize("epilogue", EPILOGUES)
def test_contract_level_against_torch_chunked(epilogue, seed, chunked):
    """forward/backward called directly, every (need_dh, need_dw) and b = None, against torch_chunked."""
    chunked(epilogue, chunk=64)
    hidden, weight, targets, ids, _ = _inputs(seed, torch.float32, n=19, vocab=0.6)
    slots = torch.searchsorted(ids, targets)
    gen = torch.Generator().manual_seed(seed + 1)
    g_tgt, a, b = (torch.randn(19, generator=gen) for _ in range(3))
    for want_mean in (False, True):
        ours = gemm.forward(hidden, weight, ids, slots, 1.25, want_mean)
        theirs = torch_chunked.forward(hidden, weight, ids, slots, 1.25, want_mean)
        assert (ours[2] is None) == (not want_mean)
        for o, t in zip(ours, theirs):
            if t is not None:
                assert_close(o, t, atol=1e-5, rtol=1e-5, what=f"forward want_mean={want_mean}")
    lse = theirs[0]
    for need_dh, need_dw in ((True, True), (True, False), (False, True)):
        for bb in (None, b):
            dh, dw = gemm.backward(hidden, weight, ids, slots, 1.25, lse, g_tgt, a, bb, need_dh, need_dw)
            rdh, rdw = torch_chunked.backward(hidden, weight, ids, slots, 1.25, lse, g_tgt, a, bb, need_dh, need_dw)
            assert (dh is None) == (not need_dh) and (dw is None) == (not need_dw)
            if need_dh:
                assert_close(dh, rdh, atol=1e-5 * rdh.abs().max().item(), rtol=1e-4, what="dh")
            if need_dw:
                assert dw.shape == (ids.numel(), weight.shape[1]) and dw.dtype == weight.dtype
                assert_close(dw, rdw, atol=1e-5 * rdw.abs().max().item(), rtol=1e-4, what="dw")


def test_epilogues_agree_and_runs_are_bitwise_identical(seed, chunked):
    hidden, weight, targets, ids, grads = _inputs(seed, torch.float32, vocab=0.7)
    runs = []
    for epilogue in ("torch", "triton", "triton"):
        chunked(epilogue, chunk=50)
        runs.append(_outputs_and_grads(masked_logprob, hidden, weight, targets, ids, grads, 0.9, backend="gemm"))
    for a, b in zip(runs[1], runs[2]):
        assert torch.equal(a, b), "two identical calls differ"
    for a, b in zip(runs[0], runs[1]):
        assert_close(a, b, atol=1e-5 * b.abs().max().item() + 1e-7, rtol=1e-5, what="torch vs triton epilogue")


def test_forward_and_backward_cost_exactly_8_nhv_flops(seed, chunked):
    """Forward 2 N H V, backward 6 N H V: one logits recomputation and the two gradient products, no hi/lo split.
    Counted at the contract level (the custom op is opaque to the counter)."""
    chunked("torch", chunk=100)
    n, hdim, vsize = 31, 24, 450
    hidden, weight, targets, _, grads = _inputs(seed, torch.float32, n=n, hdim=hdim, vsize=vsize)
    with FlopCounterMode(display=False) as fwd_count:
        lse, _, _ = gemm.forward(hidden, weight, None, targets, 1.0, False)
    with FlopCounterMode(display=False) as bwd_count:
        gemm.backward(hidden, weight, None, targets, 1.0, lse, grads[0], -grads[0], grads[1], True, True)
    assert fwd_count.get_total_flops() == 2 * n * hdim * vsize
    assert bwd_count.get_total_flops() == 6 * n * hdim * vsize


def test_bad_settings_are_named(chunked):
    hidden, weight, targets, _, _ = _inputs(0, torch.float32)
    chunked("fast")
    with pytest.raises(ValueError, match="settings.epilogue = 'fast'; allowed: auto, triton, torch"):
        masked_logprob(hidden, weight, targets, backend="gemm")
    chunked("torch", chunk=0)
    with pytest.raises(ValueError, match="settings.chunk = 0; it must be None or an int >= 1"):
        masked_logprob(hidden, weight, targets, backend="gemm")


def test_chunk_scales_with_rows(monkeypatch):
    """Default chunk: 2**24 float32 logits per buffer (64 MiB), at least 4096 slots, a multiple of 256."""
    monkeypatch.setattr(G.settings, "chunk", None)
    monkeypatch.setattr(G.settings, "chunk_elements", 1 << 24)
    assert [G.chunk_size(r) for r in (1, 512, 2048, 3000, 4096, 8192)] == [1 << 24, 32768, 8192, 5632, 4096, 4096]
    assert all(G.chunk_size(r) * r <= (1 << 24) + 256 * r for r in range(1, 4097, 97))  # the stated memory bound
    assert len(G.chunks(126464, 2048)) == 16 and G.chunks(126464, 2048)[-1] == (122880, 126464)
    monkeypatch.setattr(G.settings, "chunk", 1000)
    assert G.chunk_size(2048) == 1000


# ------------------------------------------------------------------------------------------------ sample_step


def _sample_reference(hidden, weight, ids, keys_seed, step, row_ids, temperature):
    """float64 logits; the float32 noise added to float32 tempered logits as the kernels do (and the reference)."""
    tokens = torch.arange(weight.shape[0]) if ids is None else ids
    z = hidden.double() @ weight.index_select(0, tokens).double().T
    if temperature > 0:
        score = (z.float() / temperature + counter_gumbel(keys_seed, step, row_ids, tokens)).double()
    else:
        score = z
    p = torch.softmax(z, -1)
    return score, z, torch.logsumexp(z, -1), (p * z).sum(-1)


@pytest.mark.parametrize("vocab", [None, 0.5], ids=["full", "prior"])
@pytest.mark.parametrize("temperature", [0.0, 0.7, 1.3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("epilogue", EPILOGUES)
def test_sample_step_matches_float64(epilogue, dtype, temperature, vocab, seed, chunked):
    chunked(epilogue, chunk=41)
    hidden, weight, _, ids, _ = _inputs(seed, dtype, n=29, vsize=397, vocab=vocab, scale=3.0)
    gen = torch.Generator().manual_seed(seed)
    row_ids = torch.randint(0, 2**40, (hidden.shape[0],), generator=gen)
    step = seed % 977
    keys = row_keys(seed, step, row_ids)
    greedy = temperature == 0.0
    slot, z_sel, lse, mean = gemm_sample_step.forward(hidden, weight, ids, keys, 0.0 if greedy else 1 / temperature,
                                                      greedy, True)
    score, z, ref_lse, ref_mean = _sample_reference(hidden, weight, ids, seed, step, row_ids, temperature)
    assert slot.dtype == torch.int64 and z_sel.dtype == lse.dtype == mean.dtype == torch.float32
    ref_slot = score.argmax(-1)
    differ = slot != ref_slot
    if differ.any():  # only at near-ties of the two best float64 scores
        top2 = score.topk(2, -1).values
        gap = top2[:, 0] - top2[:, 1]
        assert (gap[differ] < 1e-4).all(), f"slot differs at rows {differ.nonzero()[:5, 0].tolist()}"
    assert_close(z_sel, z.gather(1, slot[:, None])[:, 0], atol=1e-5, rtol=1e-5, what="z_sel")
    assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5, what="lse")
    assert_close(mean, ref_mean, atol=1e-5, rtol=1e-5, what="mean logit")


@pytest.mark.parametrize("epilogue", EPILOGUES)
def test_sample_step_outputs_forms_and_determinism(epilogue, seed, chunked):
    chunked(epilogue, chunk=64)
    hidden, weight, _, ids, _ = _inputs(seed, torch.float32, n=17, vsize=300, vocab=0.7)
    keys = row_keys(seed, 2, torch.arange(17))
    full = gemm_sample_step.forward(hidden, weight, ids, keys, 1.1, False, True)
    again = gemm_sample_step.forward(hidden, weight, ids, keys, 1.1, False, True)
    no_mean = gemm_sample_step.forward(hidden, weight, ids, keys, 1.1, False, False)
    assert all(torch.equal(a, b) for a, b in zip(full, again)), "two identical calls differ"
    assert len(no_mean) == 4 and no_mean[3] is None
    for a, b in zip(full[:3], no_mean[:3]):
        assert torch.equal(a, b), "asking for the mean changed another output"


# ------------------------------------------------------------------------------------------------ CUDA (skipped here)

HAS_CUDA = torch.cuda.is_available()


@pytest.mark.gpu
@pytest.mark.parametrize("overlap", [True, False], ids=["two_streams", "one_stream"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("epilogue", EPILOGUES)
@pytest.mark.parametrize("vocab", [None, 0.45], ids=["full", "prior"])
def test_cuda_masked_logprob_matches_float64(vocab, epilogue, dtype, overlap, seed, chunked, monkeypatch):
    if not HAS_CUDA:
        pytest.skip("needs a CUDA device")
    chunked(epilogue, chunk=1000)
    monkeypatch.setattr(G.settings, "overlap", overlap)
    hidden, weight, targets, ids, grads = _inputs(seed, dtype, n=517, hdim=264, vsize=20011, vocab=vocab)
    to = dict(device="cuda")
    hidden, weight, targets = hidden.to(**to), weight.to(**to), targets.to(**to)
    ids = None if ids is None else ids.to(**to)
    grads = [g.to(**to) / (targets.numel() ** 0.5 if dtype != torch.float32 else 1.0) for g in grads]
    ours = _outputs_and_grads(masked_logprob, hidden, weight, targets, ids, grads, 0.8, backend="gemm")
    again = _outputs_and_grads(masked_logprob, hidden, weight, targets, ids, grads, 0.8, backend="gemm")
    assert all(torch.equal(a, b) for a, b in zip(ours, again)), "two identical calls differ"
    ref = _outputs_and_grads(masked_logprob_reference, hidden.double(), weight.double(), targets, ids, grads, 0.8)
    names = ["logp", "lse", "entropy", "d_hidden", "d_weight"]
    if dtype == torch.float32:
        for o, r, name in zip(ours, ref, names):
            assert_close(o, r, atol=2e-5 * r.abs().max().item() + 1e-6, rtol=2e-4, what=f"cuda gemm {name}")
    else:
        theirs = _outputs_and_grads(masked_logprob_reference, hidden, weight, targets, ids, grads, 0.8, upcast=None)
        for o, t, r, name in zip(ours, theirs, ref, names):
            assert_within_torch_error(o, t, r, atol=1e-2, ulps=1, what=f"cuda gemm {name}")


@pytest.mark.gpu
@pytest.mark.parametrize("temperature", [0.0, 0.7])
@pytest.mark.parametrize("epilogue", EPILOGUES)
def test_cuda_sample_step_matches_float64(epilogue, temperature, seed, chunked):
    if not HAS_CUDA:
        pytest.skip("needs a CUDA device")
    chunked(epilogue, chunk=1000)
    hidden, weight, _, ids, _ = _inputs(seed, torch.bfloat16, n=333, hdim=264, vsize=20011, vocab=0.5, scale=3.0)
    hidden, weight, ids = hidden.cuda(), weight.cuda(), ids.cuda()
    row_ids = torch.randint(0, 2**40, (hidden.shape[0],), generator=torch.Generator().manual_seed(seed)).cuda()
    keys = row_keys(seed, 5, row_ids)
    greedy = temperature == 0.0
    slot, z_sel, lse, mean = gemm_sample_step.forward(hidden, weight, ids, keys, 0.0 if greedy else 1 / temperature,
                                                      greedy, True)
    score, z, ref_lse, ref_mean = _sample_reference(hidden, weight, ids, seed, 5, row_ids, temperature)
    differ = slot != score.argmax(-1)
    if differ.any():
        top2 = score.topk(2, -1).values
        assert ((top2[:, 0] - top2[:, 1])[differ] < 1e-4).all(), "slot differs away from a near-tie"
    assert_close(z_sel, z.gather(1, slot[:, None])[:, 0], atol=1e-4, rtol=1e-4, what="z_sel")
    assert_close(lse, ref_lse, atol=1e-4, rtol=1e-5, what="lse")
    assert_close(mean, ref_mean, atol=1e-4, rtol=1e-5, what="mean logit")
