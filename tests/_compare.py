"""Comparisons whose failures explain themselves (count, first indices, max and mean error, NaN/inf)."""

from __future__ import annotations

import torch


def describe(actual: torch.Tensor, expected: torch.Tensor, bad: torch.Tensor) -> str:
    err = (actual.double() - expected.double()).abs()
    idx = bad.nonzero()[:5].tolist()
    return (f"{int(bad.sum())} of {bad.numel()} elements differ; first at {idx}; "
            f"max err {err.max().item():.3e}, mean err {err.mean().item():.3e}; "
            f"NaN/inf in actual: {int((~torch.isfinite(actual)).sum())}, in expected: "
            f"{int((~torch.isfinite(expected)).sum())}")


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, atol: float, rtol: float, what: str) -> None:
    """Element-wise |actual - expected| <= atol + rtol * |expected|, no NaN/inf anywhere."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.double(), expected.double()
    bad = ~((a - e).abs() <= atol + rtol * e.abs()) | ~torch.isfinite(a)
    assert not bad.any(), f"{what}: {describe(actual, expected, bad)} (atol {atol}, rtol {rtol})"


def assert_within_torch_error(actual: torch.Tensor, torch_lowp: torch.Tensor, ref: torch.Tensor, *, atol: float,
                              what: str, ulps: float = 0.0) -> None:
    """Low-precision check, element by element: |ours - fp64| <= |torch_same_dtype - fp64| + atol, no NaN/inf.

    Judges our error against the error torch itself makes in that dtype at the same element (cut-cross-entropy's
    criterion); ``atol`` absorbs the elements where torch happens to land closer than one rounding of ours.
    ``ulps`` adds that many units in the last place of ``actual``'s dtype at the element's magnitude: for outputs
    rounded once from float32 sums taken in another order than torch's, where entries above ~1 make one bf16 step
    (2**-7 relative) larger than an absolute ``atol``."""
    assert actual.shape == ref.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(ref.shape)}"
    ours = (actual.double() - ref.double()).abs()
    theirs = (torch_lowp.double() - ref.double()).abs()
    if ulps:
        _, exponent = torch.frexp(ref.double().abs().clamp_min(torch.finfo(actual.dtype).tiny))
        # |x| in [2**(e-1), 2**e): one step of the dtype there is eps * 2**(e-1)
        theirs = theirs + ulps * torch.finfo(actual.dtype).eps * torch.ldexp(torch.ones_like(theirs), exponent - 1)
    bad = ~(ours <= theirs + atol) | ~torch.isfinite(actual)
    if bad.any():
        i = int((ours - theirs).argmax())
        raise AssertionError(
            f"{what}: {describe(actual, ref, bad)}; worst element {i}: ours {actual.flatten()[i].item():.6g}, "
            f"torch {torch_lowp.flatten()[i].item():.6g}, fp64 {ref.flatten()[i].item():.6g} (atol {atol})")
