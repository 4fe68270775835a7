"""The Triton kernels' Gumbel noise with the GPU's fast log2: exhaustive bounds and error over every possible u, with
the hardware log2's error emulated at its worst; the kernel's formula equals its torch mirror; and the sampled
distribution is the softmax (chi-square over many draws)."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from stp_kernels import _gemm_common as G
from stp_kernels import sample_step
from stp_kernels.reference import counter_uniform, gumbel_fast
from stp_kernels.triton.sample_step import _gumbel_from_u

LOW, HIGH = -2.82, 16.64  # the documented bounds of the noise (reference.py)


def _all_u() -> torch.Tensor:
    """Every value the counter can give: u = (k + 0.5) 2**-23, k = 0 .. 2**23 - 1 (float32, exact)."""
    return (torch.arange(1 << 23, dtype=torch.float32) + 0.5) * 2.0**-23


@pytest.mark.slow  # ~6 s on the busy machine: 2**23 values three times
@pytest.mark.parametrize("error", [0.0, 1.0, -1.0], ids=["exact", "plus", "minus"])
def test_every_u_stays_in_bounds_and_close_to_exact(error):
    """lg2.approx.f32 (PTX ISA): absolute error <= 2**-22 for x in [0.5, 2), relative 2**-22 elsewhere; emulated
    here as log2(x) + error * 2**-22 * max(1, |log2 x|), the worst sign throughout."""

    def log2(x):
        exact = torch.log2(x.double())
        return (exact + error * 2.0**-22 * exact.abs().clamp_min(1.0)).float()

    u = _all_u()
    g = gumbel_fast(u, log2)
    exact = -torch.log(-torch.log(u.double()))
    assert torch.isfinite(g).all()
    assert g.min().item() >= LOW and g.max().item() <= HIGH, (g.min().item(), g.max().item())
    err = (g.double() - exact).abs().max().item()
    print(f"log2 error {error:+} * 2**-22: max |noise - exact| = {err:.2e}")
    rel = ((g.double() - exact).abs() - 1e-6 - 3e-7 * exact.abs()).max().item()
    assert rel <= 0, rel  # |error| <= 1e-6 + 3e-7 |g|: a few float32 ulps (4.2e-6 at g = 15.5 in the worst case)
    if error == 0.0:  # the accurate log's own float32 noise, for scale
        assert (-torch.log(-torch.log(u)) - exact).abs().max().item() < 2e-6


@triton.jit
def _noise_kernel(u_ptr, w_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    u = tl.load(u_ptr + offs, mask=mask, other=0.5)
    w = tl.load(w_ptr + offs, mask=mask, other=0.5)
    tl.store(out_ptr + offs, _gumbel_from_u(u, w, False), mask=mask)


def test_kernel_formula_equals_its_torch_mirror():
    k = torch.cat([torch.tensor([0, 1, 2, (1 << 21) - 1, 1 << 21, (1 << 21) + 1, (1 << 23) - 2, (1 << 23) - 1]),
                   torch.randint(0, 1 << 23, (2000,), generator=torch.Generator().manual_seed(0))])
    u = (k.float() + 0.5) * 2.0**-23
    w = ((8388607.0 - k.float()) + 0.5) * 2.0**-23
    out = torch.empty_like(u)
    _noise_kernel[(triton.cdiv(u.numel(), 256),)](u, w, out, u.numel(), BLOCK=256)
    assert torch.allclose(out, gumbel_fast(u), rtol=0, atol=1e-6), (out - gumbel_fast(u)).abs().max()
    assert out[0].item() >= LOW and out[7].item() <= HIGH and torch.isfinite(out).all()


@pytest.mark.slow  # ~10 s on the busy 2-core machine: 1200 rows through the Triton epilogue in the interpreter
@pytest.mark.parametrize("temperature", [0.8])
def test_sampled_distribution_is_the_softmax(temperature, monkeypatch):
    """R rows with the same logits and distinct row ids: the drawn tokens' counts against R softmax(z / T)."""
    monkeypatch.setattr(G.settings, "epilogue", "triton")
    rows, vsize, hdim = 1200, 6, 8
    gen = torch.Generator().manual_seed(7)
    weight = torch.randn(vsize, hdim, generator=gen)
    hidden = torch.randn(1, hdim, generator=gen).expand(rows, hdim).contiguous()
    x0, _ = sample_step(hidden, weight, seed=123, step=0, row_ids=torch.arange(rows) * 7919, temperature=temperature,
                        backend="gemm")
    p = torch.softmax((hidden[0].double() @ weight.double().T) / temperature, -1)
    counts = torch.bincount(x0, minlength=vsize).double()
    expected = rows * p
    chi2 = ((counts - expected) ** 2 / expected).sum()
    pvalue = torch.special.gammaincc(torch.tensor((vsize - 1) / 2.0, dtype=torch.float64), chi2 / 2).item()
    print(f"chi-square {chi2.item():.2f} with {vsize - 1} dof, p = {pvalue:.3f}")
    assert pvalue > 1e-3, (counts.tolist(), expected.tolist())
    # the uniforms themselves are the counter's (unchanged by the fast log)
    u = counter_uniform(torch.arange(3), torch.arange(5))
    assert ((u > 0) & (u < 1)).all()
