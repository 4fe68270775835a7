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


def assert_within_torch_error(actual: torch.Tensor, torch_lowp: torch.Tensor, ref: torch.Tensor, *, what: str,
                              factor: float = 2.0, atol: float = 1e-5) -> None:
    """Low-precision check: ||ours - fp64|| <= factor * ||torch_same_dtype - fp64|| + atol * ||fp64|| (per tensor,
    in the 2-norm), plus no NaN/inf. Judges our error against the error torch itself makes in that dtype."""
    assert actual.shape == ref.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(ref.shape)}"
    ours = (actual.double() - ref).norm().item()
    theirs = (torch_lowp.double() - ref).norm().item()
    bound = factor * theirs + atol * ref.norm().item()
    finite = bool(torch.isfinite(actual).all())
    assert finite and ours <= bound, (
        f"{what}: error {ours:.3e} > bound {bound:.3e} (torch's own error {theirs:.3e}); "
        f"{describe(actual, ref, (actual.double() - ref).abs() > (torch_lowp.double() - ref).abs().max())}")
