"""GPU risks closed on the CPU: TF32 cannot leak into the ops, the first-use self-check is per dtype and covers the
chunk pipeline, the side-stream loop joins when a chunk raises, and every slower path is reported once.

TF32 is simulated: a CPU matmul that rounds float32 operands to TF32's 10-bit mantissa whenever the process asks for
TF32 CUDA matmuls, which is what cuBLAS does on an Ampere or later GPU."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
import warnings

import pytest
import torch

from stp_kernels import _backends, _fp32, _selfcheck, _status, backend_status, gemm, gemm_sample_step, masked_logprob
from stp_kernels import _gemm_common as G
from stp_kernels.reference import masked_logprob_reference

CPU = torch.device("cpu")


def _tf32(x: torch.Tensor) -> torch.Tensor:
    """Round float32 to TF32 (10 explicit mantissa bits), to nearest."""
    bits = x.contiguous().view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32).view_as(x)


@pytest.fixture
def simulated_tf32(monkeypatch):
    """torch.mm / addmm / @ round float32 operands to TF32 while the process's CUDA matmul precision is TF32."""
    real_mm, real_addmm, real_matmul = torch.mm, torch.addmm, torch.Tensor.__matmul__

    def lowered(*ts):
        if _fp32._cuda_matmul_precision() != "tf32":
            return ts
        return tuple(_tf32(t) if isinstance(t, torch.Tensor) and t.dtype == torch.float32 else t for t in ts)

    monkeypatch.setattr(torch, "mm", lambda a, b, **kw: real_mm(*lowered(a, b), **kw))
    monkeypatch.setattr(torch, "addmm", lambda c, a, b, **kw: real_addmm(c, *lowered(a, b), **kw))
    monkeypatch.setattr(torch.Tensor, "__matmul__", lambda a, b: real_matmul(*lowered(a, b)))


@contextlib.contextmanager
def tf32_on():
    torch.set_float32_matmul_precision("high")  # what training scripts write
    try:
        yield
    finally:
        torch.set_float32_matmul_precision("highest")


@pytest.fixture
def fresh(monkeypatch):
    monkeypatch.setenv("STP_KERNEL_SELFCHECK", "1")
    monkeypatch.delenv("STP_KERNEL_BACKEND", raising=False)
    _backends._reset_self_check()
    yield
    _backends._reset_self_check()


def _problem(seed=0, n=19, hdim=96, vsize=300, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    h = (torch.randn(n, hdim, generator=gen) * 3).to(dtype)
    w = (torch.randn(vsize, hdim, generator=gen) * (3.0 / hdim**0.5)).to(dtype)
    return h, w, torch.randint(0, vsize, (n,), generator=gen)


# ------------------------------------------------------------------------------------------------ item 2: TF32


def test_simulated_tf32_really_rounds(simulated_tf32):
    """The simulation bites: with the flag on, a float32 product outside the ops is ~1e-3 off."""
    h, w, _ = _problem()
    exact = h.double() @ w.double().T
    with tf32_on():
        err = ((h @ w.T).double() - exact).abs().max().item() / exact.abs().max().item()
    assert err > 1e-4, err
    assert ((h @ w.T).double() - exact).abs().max().item() / exact.abs().max().item() < 1e-5


@pytest.mark.slow  # the forced self-check runs Triton's interpreter (~7 s on the busy 2-core machine)
def test_tf32_flag_neither_fails_the_self_check_nor_reaches_the_ops(simulated_tf32, fresh):
    h, w, t = _problem()
    ref = masked_logprob_reference(h.double(), w.double(), t)
    off = masked_logprob(h, w, t, backend="gemm")
    with tf32_on(), warnings.catch_warnings():
        warnings.simplefilter("error")  # no self-check warning
        verdicts = _backends.self_check("masked_logprob", "cpu", force=True)
        on = masked_logprob(h, w, t, backend="gemm")
        chunked = masked_logprob(h, w, t, backend="torch_chunked")
        assert torch.get_float32_matmul_precision() == "high"  # the caller's setting is back
    assert verdicts["gemm"] == "passed", verdicts
    assert torch.equal(on, off)
    for got in (on, chunked):  # float32 accuracy (TF32 would be ~1e-3 relative)
        assert ((got.double() - ref).abs() / (1 + ref.abs())).max().item() < 2e-6


def test_exact_fp32_restores_every_api_family():
    """torch raises when a process mixes the legacy and new TF32 APIs: the ops write through the one in use and
    leave the setting, as read back through that API, unchanged (one fresh process per way of turning TF32 on)."""
    code = r"""
import os, sys, torch
from stp_kernels._fp32 import exact_fp32, _cuda_matmul_precision
for way in ("off", "allow_tf32", "high", "medium", "new", "new_generic"):
    pid = os.fork()
    if pid:
        os.waitpid(pid, 0)
        continue
    if way == "allow_tf32": torch.backends.cuda.matmul.allow_tf32 = True
    if way == "high": torch.set_float32_matmul_precision("high")
    if way == "medium": torch.set_float32_matmul_precision("medium")
    if way == "new": torch.backends.cuda.matmul.fp32_precision = "tf32"
    if way == "new_generic": torch.backends.fp32_precision = "tf32"
    def read():
        out = []
        for f in (torch._C._get_cublas_allow_tf32, torch.get_float32_matmul_precision,
                  lambda: torch._C._get_fp32_precision_getter("cuda", "matmul")):
            try:
                out.append(f())
            except RuntimeError:
                out.append("raises")
        return out
    before = read()
    with exact_fp32():
        inside = _cuda_matmul_precision()
    ok = inside in ("ieee", "none") and read() == before
    print("ok" if ok else f"{way}: inside {inside}, before {before}, after {read()}", flush=True)
    os._exit(0)
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.split() == ["ok"] * 6, res.stdout + res.stderr[-3000:]


def test_self_check_is_per_dtype(fresh, monkeypatch):
    """A float32-only failure disables the backend for float32 only; bfloat16 keeps it."""
    real = gemm.forward

    def wrong_in_fp32(h, *args):
        lse, tgt, mean = real(h, *args)
        return (lse + 1.0 if h.dtype == torch.float32 else lse), tgt, mean

    monkeypatch.setattr(gemm, "forward", wrong_in_fp32)
    monkeypatch.setattr(_selfcheck, "dtypes_checked", lambda dev: (torch.float32, torch.bfloat16))
    monkeypatch.setitem(_backends._DEFAULT_ORDER, "cpu", ("gemm", "torch_chunked"))
    with pytest.warns(RuntimeWarning, match=r"'gemm' failed .* disabled for float32 in this process \(passed: "
                                            r"bfloat16\)"):
        name32, _ = _backends.resolve("masked_logprob", None, CPU, torch.float32)
    name16, _ = _backends.resolve("masked_logprob", None, CPU, torch.bfloat16)
    assert (name32, name16) == ("torch_chunked", "gemm")
    assert backend_status("cpu", dtype=torch.bfloat16)["gemm"] == "available"
    assert backend_status("cpu", dtype=torch.float32)["gemm"].startswith("disabled")
    with pytest.raises(RuntimeError, match="self-check"):
        masked_logprob(*_problem(), backend="gemm")
    h, w, t = _problem(dtype=torch.bfloat16)
    masked_logprob(h, w, t, backend="gemm")  # runs


# ------------------------------------------------------------------------------------------------ item 4: self-check


def test_self_check_runs_several_chunks_and_a_ragged_tail(fresh, monkeypatch):
    widths = []
    real = G.mm_f32

    def record(a, b, out):
        widths.append(out.shape[1])
        return real(a, b, out)

    monkeypatch.setattr(G, "mm_f32", record)
    before = G.settings.chunk
    t0 = time.perf_counter()
    for op in ("masked_logprob", "sample_step"):
        widths.clear()
        verdict = _backends.self_check(op, "cpu", force=True)["gemm"]
        assert verdict == "passed", verdict
        assert len(widths) >= 2 * 2 and len(set(widths)) == 2 and widths[-1] < widths[0], (op, widths)
    elapsed = time.perf_counter() - t0
    print(f"self-check of both ops, every CPU backend: {elapsed:.2f} s")
    assert G.settings.chunk == before  # the setting is restored


def test_named_backend_is_still_checked_once(fresh, monkeypatch):
    calls = []
    real = gemm_sample_step.forward

    def off_by_one(*args):
        calls.append(1)
        slot, z_sel, lse, mean = real(*args)
        return (slot + 1) % 5, z_sel, lse, mean

    monkeypatch.setattr(gemm_sample_step, "forward", off_by_one)
    from stp_kernels import sample_step

    h, w = torch.randn(3, 8), torch.randn(20, 8)
    with pytest.warns(RuntimeWarning, match="self-check"):
        with pytest.raises(RuntimeError, match=r"backend='gemm' cannot run .* self-check"):
            sample_step(h, w, seed=0, step=0, backend="gemm")
    checked = len(calls)
    assert checked >= 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(RuntimeError, match="self-check"):
            sample_step(h, w, seed=0, step=0, backend="gemm")
    assert len(calls) == checked  # not checked again


class _RecordingPipeline(G.Pipeline):
    """The two-stream pipeline's control flow on the CPU: two buffers, no streams; joins are counted."""

    joins = 0

    def __init__(self, device):
        self.on = True

    def mark(self, on_side=False):
        return None

    def wait(self, event, on_side=False):
        pass

    def side(self):
        return contextlib.nullcontext()

    def join(self):
        type(self).joins += 1


def test_pipeline_joins_when_a_chunk_raises(monkeypatch):
    monkeypatch.setattr(G, "Pipeline", _RecordingPipeline)
    monkeypatch.setattr(G.settings, "chunk", 64)
    monkeypatch.setattr(G.settings, "epilogue", "torch")
    h, w, t = _problem()
    # Without a failure the overlapping control flow gives the float64 answer.
    lse, tgt, _ = gemm.forward(h, w, None, t, 1.0, False)
    ref = torch.logsumexp(h.double() @ w.double().T, -1)
    assert (lse.double() - ref).abs().max() < 1e-4
    _RecordingPipeline.joins = 0
    seen = []
    real_fold, real_grad = G.torch_fold_lse, G.torch_logit_grad

    def fold_fails_at_chunk_2(z, start, *args):
        seen.append(start)
        if len(seen) == 2:
            raise RuntimeError("made-up failure in an epilogue")
        return real_fold(z, start, *args)

    monkeypatch.setattr(G, "torch_fold_lse", fold_fails_at_chunk_2)
    with pytest.raises(RuntimeError, match="made-up failure"):
        gemm.forward(h, w, None, t, 1.0, False)
    assert _RecordingPipeline.joins == 1
    seen.clear()

    def grad_fails_at_chunk_2(z, start, *args):
        seen.append(start)
        if len(seen) == 2:
            raise RuntimeError("made-up failure in an epilogue")
        return real_grad(z, start, *args)

    monkeypatch.setattr(G, "torch_logit_grad", grad_fails_at_chunk_2)
    g = torch.ones(h.shape[0])
    with pytest.raises(RuntimeError, match="made-up failure"):
        gemm.backward(h, w, None, t, 1.0, lse, g, -g, None, True, True)
    assert _RecordingPipeline.joins == 2


# ------------------------------------------------------------------------------------------------ item 3: fallbacks


@pytest.fixture
def no_fallbacks_yet(monkeypatch):
    monkeypatch.setattr(_status, "_fallbacks", {})
    monkeypatch.setattr(G, "_fp32_out", {})
    monkeypatch.setattr(gemm, "_inplace_acc", {})


def _fallback_warnings(record):
    return [str(w.message) for w in record if "runs a slower path" in str(w.message)]


def test_missing_fp32_output_overload_is_reported_once(no_fallbacks_yet, monkeypatch):
    """A torch without mm(out_dtype=float32) for 16-bit operands (simulated: the CPU build has no such kernel, and
    the probe is made to expect one here) makes gemm upcast every chunk: one warning, and backend_status says so."""
    monkeypatch.setattr(G, "_LIBRARY_DEVICES", ("cuda", "cpu"))
    h, w, t = _problem(dtype=torch.bfloat16)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        first = masked_logprob(h, w, t, backend="gemm")
        again = masked_logprob(h, w, t, backend="gemm")
    messages = _fallback_warnings(record)
    assert len(messages) == 1 and "upcast to float32" in messages[0] and "torch >= 2.8" in messages[0], messages
    assert torch.equal(first, again)
    status = backend_status("cpu")["gemm"]
    assert status.startswith("available (fallback: ") and "out_dtype=float32" in status, status


def test_scratch_accumulation_is_reported_once(no_fallbacks_yet):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert gemm._acc_inplace_ok(CPU, torch.bfloat16) is False  # the CPU build has no addmm(out_dtype)
        assert gemm._acc_inplace_ok(CPU, torch.bfloat16) is False
    messages = _fallback_warnings(record)
    assert len(messages) == 1 and "scratch buffer" in messages[0], messages
    assert "scratch buffer" in backend_status("cpu")["gemm"]


def test_missing_triton_epilogue_is_reported_once(no_fallbacks_yet, monkeypatch):
    """On CUDA, epilogue 'auto' falls back to the torch epilogues when Triton cannot run: reported."""
    monkeypatch.setattr(_status, "_triton_env_ok", lambda dev: "triton is not installed (made up for the test)")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert G.epilogue_module(torch.device("cuda")) is None
        assert G.epilogue_module(torch.device("cuda")) is None
    messages = _fallback_warnings(record)
    assert len(messages) == 1 and "torch epilogues" in messages[0], messages
    assert "torch epilogues" in _status._fallbacks[("gemm", "cuda")]


def test_torch_floor_matches_the_fast_path():
    """pyproject's torch floor is the first torch with the out_dtype overloads the gemm fast path calls."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    floor = re.search(r'"torch>=(\d+)\.(\d+)"', text)
    assert floor and (int(floor[1]), int(floor[2])) >= (2, 8), floor
    assert "out_dtype" in torch.mm.__doc__ or "out_dtype" in str(torch.ops.aten.mm.dtype._schema)


# ------------------------------------------------------------------------------------------------ item 6: no sync


@contextlib.contextmanager
def no_host_sync(monkeypatch):
    """Every way torch reads a device value back to the host raises (the no-sync path must not use any)."""

    def sync(*args, **kwargs):
        raise AssertionError("host sync")

    with monkeypatch.context() as m:
        for name in ("tolist", "item", "__bool__", "__int__", "__float__", "nonzero"):
            m.setattr(torch.Tensor, name, sync)
        yield


@pytest.mark.parametrize("backend", ["gemm", "torch_chunked", "torch"])
def test_masked_logprob_without_host_sync_poisons_bad_rows(backend, monkeypatch):
    gen = torch.Generator().manual_seed(4)
    h, w = torch.randn(9, 16, generator=gen), torch.randn(50, 16, generator=gen)
    vocab = torch.arange(0, 50, 2)
    t = vocab[torch.randint(0, 25, (6,), generator=gen)]
    rows = torch.tensor([0, 2, 4, 6, 8, 1])
    good = masked_logprob(h, w, t, rows=rows, vocab=vocab, backend=backend, return_entropy=True)
    bad_t, bad_rows = t.clone(), rows.clone()
    bad_t[1], bad_t[3], bad_rows[4] = 51, 3, 9  # outside [0, V), not in the prior, outside hidden
    with no_host_sync(monkeypatch):
        lp, ent = masked_logprob(h, w, bad_t, rows=bad_rows, vocab=vocab, backend=backend, return_entropy=True,
                                 check_inputs=False)
        unsorted = masked_logprob(h, w, t, vocab=vocab.flip(0), rows=rows, backend=backend, check_inputs=False)
    poisoned = torch.tensor([False, True, False, True, True, False])
    for got, want in ((lp, good[0]), (ent, good[1])):
        assert torch.isnan(got[poisoned]).all() and torch.equal(got[~poisoned], want[~poisoned])
    assert torch.isnan(unsorted).all()
    with pytest.raises(ValueError, match=r"targets must lie in \[0, 50\)"):  # CPU default: the raising checks
        masked_logprob(h, w, bad_t, rows=rows, vocab=vocab, backend=backend)


def test_sample_step_without_host_sync_poisons_bad_rows(monkeypatch):
    from stp_kernels import sample_step

    gen = torch.Generator().manual_seed(4)
    h, w = torch.randn(9, 16, generator=gen), torch.randn(50, 16, generator=gen)
    rows = torch.tensor([0, 2, 4, 6, 8, 1])
    good = sample_step(h, w, seed=1, step=0, rows=rows, temperature=0.7, backend="gemm", return_tempered_logp=True)
    bad = rows.clone()
    bad[2] = -1
    with no_host_sync(monkeypatch):
        got = sample_step(h, w, seed=1, step=0, rows=bad, row_ids=rows, temperature=0.7, backend="gemm",
                          return_tempered_logp=True, check_inputs=False)
    keep = torch.arange(6) != 2
    assert got[0][2] == -1 and all(torch.isnan(g[2]) for g in got[1:])
    assert all(torch.equal(g[keep], w_[keep]) for g, w_ in zip(got, good))
    # nothing to check (no rows, no prior): the plain call, no sync either
    with no_host_sync(monkeypatch):
        plain = sample_step(h, w, seed=1, step=0, temperature=0.7, backend="gemm", check_inputs=False)
    assert torch.equal(plain[0], sample_step(h, w, seed=1, step=0, temperature=0.7, backend="gemm")[0])
