"""The first-use self-check: forced on CPU here ($STP_KERNEL_SELFCHECK=1); backends made to fail on purpose (wrong
numbers, or an exception) are disabled with one warning each, and dispatch moves to the next backend."""

from __future__ import annotations

import warnings

import pytest
import torch

import stp_kernels
from stp_kernels import _backends, available_backends, masked_logprob, masked_logprob_reference, sample_step

CPU = torch.device("cpu")


@pytest.fixture
def fresh(monkeypatch):
    """Self-check forced on CPU, verdicts forgotten before and after the test."""
    monkeypatch.setenv("STP_KERNEL_SELFCHECK", "1")
    monkeypatch.delenv("STP_KERNEL_BACKEND", raising=False)
    _backends._reset_self_check()
    yield
    _backends._reset_self_check()


def _messages(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, RuntimeWarning)
            and "self-check" in str(w.message)]


def test_every_compiled_backend_passes(fresh):
    for op in ("masked_logprob", "sample_step"):
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            verdicts = _backends.self_check(op, "cpu")
        assert not _messages(record)
        expected = {b for b in ("triton", "gemm", "cpu") if b in available_backends("cpu", op=op)}
        assert set(verdicts) == expected and set(verdicts.values()) == {"passed"}, verdicts


def test_failing_backends_are_disabled_with_one_warning_and_skipped(fresh, monkeypatch):
    from stp_kernels import _cpu, gemm

    if "cpu" not in available_backends("cpu"):
        pytest.skip("C++ extension not built")
    import stp_kernels.triton.masked_logprob as triton_ml

    real_forward = _cpu.forward

    def wrong_numbers(*args):
        lse, tgt_logit, mean = real_forward(*args)
        return lse + 0.5, tgt_logit, mean

    def raises(*args):
        raise RuntimeError("illegal memory access (made up for the test)")

    monkeypatch.setattr(_cpu, "forward", wrong_numbers)
    monkeypatch.setattr(triton_ml, "forward", raises)
    # A default order where the next backend after the broken one is a checked one that passes.
    monkeypatch.setitem(_backends._DEFAULT_ORDER, "cpu", ("cpu", "triton", "gemm", "torch_chunked"))

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        name, module = _backends.resolve("masked_logprob", None, CPU)
    messages = _messages(record)
    assert name == "gemm" and module is gemm
    assert len(messages) == 2, messages
    assert any("'cpu'" in m and "forward lse" in m and "max error" in m for m in messages), messages
    assert any("'triton'" in m and "illegal memory access" in m for m in messages), messages

    status = stp_kernels.backend_status("cpu")
    assert status["cpu"].startswith("disabled") and "forward lse" in status["cpu"]
    assert "illegal memory access" in status["triton"]
    assert status["gemm"] == "available"
    assert "cpu" not in available_backends("cpu") and "gemm" in available_backends("cpu")

    with pytest.raises(RuntimeError, match=r"backend='cpu' cannot run on cpu tensors here: disabled: failed"):
        _backends.resolve("masked_logprob", "cpu", CPU)

    # Once per process: later calls neither re-check nor warn again, and compute through the next backend.
    gen = torch.Generator().manual_seed(0)
    h, w, t = torch.randn(7, 16, generator=gen), torch.randn(90, 16, generator=gen), torch.randint(0, 90, (7,))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        out = masked_logprob(h, w, t)
    assert not _messages(record)
    assert (out.double() - masked_logprob_reference(h.double(), w.double(), t)).abs().max() < 1e-4


def test_wrong_sample_is_caught(fresh, monkeypatch):
    from stp_kernels import gemm_sample_step

    real_forward = gemm_sample_step.forward

    def off_by_one(h, w, vocab_ids, keys, inv_temp, greedy, want_mean):
        slot, z_sel, lse, mean = real_forward(h, w, vocab_ids, keys, inv_temp, greedy, want_mean)
        return (slot + 1) % 5, z_sel, lse, mean

    monkeypatch.setattr(gemm_sample_step, "forward", off_by_one)
    with pytest.warns(RuntimeWarning, match=r"backend 'gemm' failed its first-use self-check for sample_step"):
        verdicts = _backends.self_check("sample_step", "cpu")
    assert verdicts["gemm"].startswith("AssertionError") and "below the best" in verdicts["gemm"]
    with pytest.raises(RuntimeError, match="self-check"):
        sample_step(torch.randn(3, 8), torch.randn(20, 8), seed=0, step=0, backend="gemm")
    # The default on CPU still samples (torch_chunked), equal to the reference in this greedy case.
    h, w = torch.randn(3, 8), torch.randn(20, 8)
    assert torch.equal(sample_step(h, w, seed=0, step=0)[0], (h @ w.T).argmax(-1))


def test_environment_switch(monkeypatch):
    _backends._reset_self_check()
    try:
        monkeypatch.setenv("STP_KERNEL_SELFCHECK", "auto")
        _backends.resolve("masked_logprob", None, CPU)
        assert ("masked_logprob", "cpu") not in _backends._self_checked  # auto: CUDA devices only
        monkeypatch.setenv("STP_KERNEL_SELFCHECK", "0")
        _backends.resolve("masked_logprob", None, CPU)
        assert ("masked_logprob", "cpu") not in _backends._self_checked
        monkeypatch.setenv("STP_KERNEL_SELFCHECK", "sometimes")
        with pytest.raises(ValueError, match=r"STP_KERNEL_SELFCHECK='sometimes' is not allowed"):
            _backends.resolve("masked_logprob", None, CPU)
    finally:
        _backends._reset_self_check()


def test_package_import_leaves_triton_unimported():
    """Triton's CPU interpreter must be chosen before triton is imported: importing stp_kernels (dispatch, self-check,
    gemm, acceptance) must not import it."""
    import os
    import subprocess
    import sys

    code = ("import sys, torch, stp_kernels, stp_kernels.gemm, stp_kernels.gemm_sample_step, stp_kernels.acceptance\n"
            "print('triton' in sys.modules)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "False"
