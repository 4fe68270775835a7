"""masked_logprob: every available backend against a float64 reference on fresh random inputs.

Shapes are odd on purpose (N, H, V not powers of two, V not a multiple of any tile). Triton on a machine without
CUDA runs in its interpreter, so its cases stay small. CUDA cases are marked ``gpu`` and skipped without a GPU.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import stp_kernels
from stp_kernels import available_backends, masked_logprob, masked_logprob_reference
from tests._compare import assert_close, assert_within_torch_error

HAS_CUDA = torch.cuda.is_available()
_gpu = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")]
BACKENDS = [pytest.param("cpu", b, id=f"cpu-{b}") for b in available_backends("cpu")] + [
    pytest.param("cuda", b, id=f"cuda-{b}", marks=_gpu) for b in ("torch", "torch_chunked", "triton", "cuda", "gemm")
]
# The realistic-spread checks in Triton's CPU interpreter take 6-10 s each (2-core CPU, quiet): marked slow there.
BACKENDS_REALISTIC = [pytest.param(*p.values, id=p.id, marks=[*p.marks, pytest.mark.slow]) if p.id == "cpu-triton"
                      else p for p in BACKENDS]


def _interpreted(device: str, backend: str) -> bool:
    return device == "cpu" and backend == "triton"


# name: (N rows of hidden, H, V, layout, vocab fraction, temperature, logit scale, extra outputs with gradients)
CASES = {
    "plain": dict(layout="2d", vocab=None, temperature=1.0, scale=1.0, extras=False),
    "rows3d_temp": dict(layout="3d_rows", vocab=None, temperature=0.7, scale=1.0, extras=False),
    "vocab_rows_extras": dict(layout="2d_rows", vocab=0.45, temperature=1.3, scale=1.0, extras=True),
    "peaked": dict(layout="2d_rows", vocab=None, temperature=1.0, scale=6.0, extras=False),
    "vocab_extras": dict(layout="2d", vocab=0.6, temperature=1.0, scale=2.0, extras=True),
}


def _sizes(device: str, backend: str) -> tuple[int, int, int]:
    if _interpreted(device, backend):
        return 23, 40, 301
    if device == "cuda":
        return 517, 264, 20011
    return 131, 72, 3001


def _make(seed: int, device: str, backend: str, dtype: torch.dtype, case: dict):
    gen = torch.Generator().manual_seed(seed)
    n, hdim, vsize = _sizes(device, backend)
    hidden = torch.randn(n, hdim, generator=gen)
    # Scaled so that logits have a spread of `scale` standard deviations: peaked softmax for large scale.
    weight = torch.randn(vsize, hdim, generator=gen) * (case["scale"] / hdim**0.5)
    rows = vocab = None
    if case["layout"] == "3d_rows":
        hidden = hidden[: (n // 2) * 2].reshape(2, n // 2, hdim)
        total = hidden.shape[0] * hidden.shape[1]
        rows = torch.randint(0, total, (total * 2 // 3,), generator=gen)  # duplicates included
    elif case["layout"] == "2d_rows":
        rows = torch.randperm(n, generator=gen)[: n * 3 // 5]
    num_scored = rows.numel() if rows is not None else hidden.numel() // hdim
    if case["vocab"] is not None:
        vocab = torch.randperm(vsize, generator=gen)[: int(vsize * case["vocab"])].sort().values
        targets = vocab[torch.randint(0, vocab.numel(), (num_scored,), generator=gen)]
    else:
        targets = torch.randint(0, vsize, (num_scored,), generator=gen)
    grads = [torch.randn(num_scored, generator=gen) for _ in range(3)]  # any sign: advantage-weighted RL
    to = dict(device=device)
    return (hidden.to(dtype).to(**to), weight.to(dtype).to(**to), targets.to(**to),
            None if rows is None else rows.to(**to), None if vocab is None else vocab.to(**to),
            [g.to(**to) for g in grads])


def _run(fn, hidden, weight, targets, rows, vocab, grads, case, **kw):
    """Outputs and input gradients for upstream gradients `grads` on (logp[, lse, entropy])."""
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    extras = case["extras"]
    out = fn(h, w, targets, rows=rows, vocab=vocab, temperature=case["temperature"],
             return_lse=extras, return_entropy=extras, **kw)
    outs = list(out) if extras else [out]
    loss = sum((o * g.to(o.dtype)).sum() for o, g in zip(outs, grads))
    loss.backward()
    return [o.detach() for o in outs] + [h.grad, w.grad]


@pytest.mark.parametrize("case_name", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("device,backend", BACKENDS)
def test_matches_float64(device, backend, dtype, case_name, seed):
    case = CASES[case_name]
    hidden, weight, targets, rows, vocab, grads = _make(seed, device, backend, dtype, case)
    if dtype != torch.float32:  # gradients of a batch-mean loss: see _realistic on why the bound needs them O(1)
        grads = [g / targets.numel() ** 0.5 for g in grads]
    ours = _run(masked_logprob, hidden, weight, targets, rows, vocab, grads, case, backend=backend)
    ref = _run(masked_logprob_reference, hidden.double(), weight.double(), targets, rows, vocab, grads, case)
    names = ["logp", "lse", "entropy"][: len(ours) - 2] + ["d_hidden", "d_weight"]
    assert all(o.dtype == torch.float32 for o in ours[:-2]), "outputs must be float32"
    assert ours[-2].dtype == dtype and ours[-1].dtype == dtype, "gradients must come back in the input dtype"
    if dtype == torch.float32:
        for o, r, name in zip(ours, ref, names):
            scale = r.abs().max().item()
            assert_close(o, r, atol=2e-5 * scale + 1e-6, rtol=2e-4, what=f"{backend} {name}")
    else:
        # torch's own bf16 path: bf16 matmul, float32 log-softmax (what a training loop does).
        theirs = _run(masked_logprob_reference, hidden, weight, targets, rows, vocab, grads, case, upcast=None)
        for o, t, r, name in zip(ours, theirs, ref, names):
            atol = _LOWP_ATOL["backward" if name.startswith("d_") else "forward"]
            assert_within_torch_error(o, t, r, atol=atol, what=f"{backend} {name}")


# Accuracy bound for 16-bit inputs, per element: |ours - fp64| <= |torch_same_dtype - fp64| + atol.
_LOWP_ATOL = {"forward": 1e-2, "backward": 1e-2}


def _realistic(seed: int, device: str, backend: str, dtype: torch.dtype):
    """LM-head-like inputs: per-row logit spreads from flat to peaked (largest logit 4 to ~35, entropy ~0 to ~9), a
    vocabulary prior, random per-row upstream gradients of any sign on logp, lse and entropy."""
    gen = torch.Generator().manual_seed(seed)
    n, hdim, vsize = (48, 128, 1500) if _interpreted(device, backend) else (256, 512, 12289)
    hidden = torch.randn(n, hdim, generator=gen) * torch.linspace(0.3, 1.6, n)[:, None]
    weight = torch.randn(vsize, hdim, generator=gen) * (3.0 / hdim**0.5)
    weight[: vsize // 50] *= 2.0  # a few frequent tokens with large logits
    rows = torch.randperm(n, generator=gen)[: n * 4 // 5]
    vocab = torch.randperm(vsize, generator=gen)[: vsize * 3 // 4].sort().values
    targets = vocab[torch.randint(0, vocab.numel(), (rows.numel(),), generator=gen)]
    # Per-row upstream gradients of a loss averaged over the batch: scale 1 / sqrt(R) keeps every gradient element
    # below ~1.5 (a token mean, 1 / R, gives smaller ones still). With sum-reduced unit gradients |d_weight| reaches
    # ~15-20, where one bf16 step (0.06) exceeds atol: there torch against itself with the rows in another order
    # already breaks the element-wise bound, so it would measure summation order, not accuracy.
    grads = [torch.randn(rows.numel(), generator=gen) / rows.numel() ** 0.5 for _ in range(3)]
    to = dict(device=device)
    return (hidden.to(dtype).to(**to), weight.to(dtype).to(**to), targets.to(**to), rows.to(**to), vocab.to(**to),
            [g.to(**to) for g in grads])


@pytest.mark.parametrize("with_vocab", [False, True], ids=["full", "vocab"])
@pytest.mark.parametrize("device,backend", BACKENDS_REALISTIC)
def test_bf16_within_torch_bf16_error_at_realistic_spreads(device, backend, with_vocab, seed):
    """Every output and gradient element within torch's own bf16 error (bf16 matmul, float32 log-softmax, gather;
    autograd rounds the logits' gradient to bf16) plus atol, at logit spreads like a language model's."""
    hidden, weight, targets, rows, vocab, grads = _realistic(seed, device, backend, torch.bfloat16)
    if not with_vocab:
        vocab = None
    case = dict(temperature=1.0, extras=True)
    ours = _run(masked_logprob, hidden, weight, targets, rows, vocab, grads, case, backend=backend)
    ref = _run(masked_logprob_reference, hidden.double(), weight.double(), targets, rows, vocab, grads, case)
    theirs = _run(masked_logprob_reference, hidden, weight, targets, rows, vocab, grads, case, upcast=None)
    assert ref[0].abs().max() > 5 and (ref[2] < 0.5).any() and (ref[2] > 3).any(), "inputs lack the spread"
    assert ours[-1].dtype == torch.bfloat16 and ours[-2].dtype == torch.bfloat16
    for o, t, r, name in zip(ours, theirs, ref, ["logp", "lse", "entropy", "d_hidden", "d_weight"]):
        atol = _LOWP_ATOL["backward" if name.startswith("d_") else "forward"]
        assert_within_torch_error(o, t, r, atol=atol, what=f"{backend} {name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", [b for b in ("torch_chunked", "triton") if b in available_backends("cpu")])
def test_backend_writes_dw_in_the_weight_dtype(backend, dtype, seed):
    """dw leaves the backend in w's dtype (no float32 [V, H] buffer, the autograd cast is a no-op); dh in float32."""
    from stp_kernels import _backends

    module = _backends._load("masked_logprob", backend, "cpu")
    hidden, weight, targets, _, vocab, grads = _make(seed, "cpu", backend, dtype, CASES["vocab_extras"])
    slots = torch.searchsorted(vocab, targets)
    lse, _, mean = module.forward(hidden, weight, vocab, slots, 1.0, True)
    dh, dw = module.backward(hidden, weight, vocab, slots, 1.0, lse, grads[0], grads[1], grads[2], True, True)
    assert dw.dtype == dtype and dw.shape == (vocab.numel(), weight.shape[1])
    assert dh.dtype == torch.float32 and dh.shape == hidden.shape


@pytest.mark.parametrize("device,backend", BACKENDS_REALISTIC)
def test_fp32_at_realistic_spreads(device, backend, seed):
    """The same inputs in float32 against float64: |ours - fp64| <= 1e-5 forward, 5e-4 backward (absolute), plus
    float32's own relative rounding of each value."""
    hidden, weight, targets, rows, vocab, grads = _realistic(seed, device, backend, torch.float32)
    case = dict(temperature=1.0, extras=True)
    ours = _run(masked_logprob, hidden, weight, targets, rows, vocab, grads, case, backend=backend)
    ref = _run(masked_logprob_reference, hidden.double(), weight.double(), targets, rows, vocab, grads, case)
    for o, r, name in zip(ours, ref, ["logp", "lse", "entropy", "d_hidden", "d_weight"]):
        atol = 5e-4 if name.startswith("d_") else 1e-5 * (1 + r.abs().max().item())
        assert_close(o, r, atol=atol, rtol=1e-5, what=f"{backend} fp32 {name}")


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_deterministic(device, backend, seed):
    case = CASES["vocab_rows_extras"]
    inputs = _make(seed, device, backend, torch.float32, case)
    first = _run(masked_logprob, *inputs, case, backend=backend)
    second = _run(masked_logprob, *inputs, case, backend=backend)
    for a, b in zip(first, second):
        assert torch.equal(a, b), f"{backend}: two identical calls differ (max diff {(a - b).abs().max().item()})"


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_zero_upstream_gradient_gives_zero_gradients(device, backend, seed):
    case = CASES["plain"]
    hidden, weight, targets, rows, vocab, grads = _make(seed, device, backend, torch.float32, case)
    outs = _run(masked_logprob, hidden, weight, targets, rows, vocab, [torch.zeros_like(grads[0])], case,
                backend=backend)
    assert not outs[-2].any() and not outs[-1].any()


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("which", ["hidden", "weight"])
def test_gradient_for_one_input_only(device, backend, which, seed):
    case = CASES["plain"]
    hidden, weight, targets, _, _, grads = _make(seed, device, backend, torch.float32, case)
    h = hidden.clone().requires_grad_(which == "hidden")
    w = weight.clone().requires_grad_(which == "weight")
    masked_logprob(h, w, targets, backend=backend).backward(grads[0])
    ref = _run(masked_logprob_reference, hidden.double(), weight.double(), targets, None, None, grads, case)
    got, other = (h.grad, w.grad) if which == "hidden" else (w.grad, h.grad)
    expected = ref[-2] if which == "hidden" else ref[-1]
    assert other is None
    assert_close(got, expected, atol=2e-5 * expected.abs().max().item() + 1e-6, rtol=2e-4, what=f"d_{which}")


@pytest.mark.parametrize("backend", [b for b in available_backends("cpu") if b != "triton"])
def test_many_tiles_and_row_blocks(backend, seed, monkeypatch):
    """Rows beyond one row block and a vocabulary of many tiles, with the target on tile edges."""
    import stp_kernels.torch_chunked as tc

    monkeypatch.setattr(tc, "_BLOCK_ELEMS", 1 << 14)  # force many small tiles in torch_chunked
    gen = torch.Generator().manual_seed(seed)
    n, hdim, vsize = 2500, 8, 2049  # the C++ kernel's row block is 2048 rows at this H
    hidden = torch.randn(n, hdim, generator=gen)
    weight = torch.randn(vsize, hdim, generator=gen)
    targets = torch.randint(0, vsize, (n,), generator=gen)
    targets[:4] = torch.tensor([0, 1023, 1024, vsize - 1])
    g = torch.randn(n, generator=gen)
    ours = _run(masked_logprob, hidden, weight, targets, None, None, [g], CASES["plain"], backend=backend)
    ref = _run(masked_logprob_reference, hidden.double(), weight.double(), targets, None, None, [g], CASES["plain"])
    for o, r, name in zip(ours, ref, ["logp", "d_hidden", "d_weight"]):
        assert_close(o, r, atol=2e-5 * r.abs().max().item() + 1e-6, rtol=2e-4, what=f"{backend} {name}")


def test_float16_cpu(seed):
    case = CASES["vocab_rows_extras"]
    hidden, weight, targets, rows, vocab, grads = _make(seed, "cpu", "cpu", torch.float16, case)
    ref = _run(masked_logprob_reference, hidden.double(), weight.double(), targets, rows, vocab, grads, case)
    for backend in [b for b in available_backends("cpu") if b != "triton"]:
        ours = _run(masked_logprob, hidden, weight, targets, rows, vocab, grads, case, backend=backend)
        for o, r in zip(ours[:3], ref[:3]):  # outputs are float32 computed from fp16 inputs: float32 accuracy
            assert_close(o, r, atol=1e-4, rtol=1e-4, what=f"{backend} fp16 output")
        for o, r in zip(ours[3:], ref[3:]):  # gradients are rounded to fp16
            assert_close(o, r, atol=1e-3 * r.abs().max().item(), rtol=2e-3, what=f"{backend} fp16 gradient")


# ---------------------------------------------------------------- dispatch, fallback, errors


def test_expected_backends_are_available():
    """CI sets STP_EXPECT_BACKENDS to what its machine must offer (here: torch, torch_chunked, cpu, triton)."""
    expected = os.environ.get("STP_EXPECT_BACKENDS", "torch,torch_chunked").split(",")
    status = stp_kernels.backend_status("cpu")
    missing = {b: status[b] for b in expected if status.get(b) != "available"}
    assert not missing, f"backends expected here but unavailable: {missing}"


def test_environment_override(monkeypatch):
    from stp_kernels import _backends

    monkeypatch.setenv("STP_KERNEL_BACKEND", "torch_chunked")
    assert _backends.resolve("masked_logprob", None, torch.device("cpu"))[0] == "torch_chunked"
    assert _backends.resolve("masked_logprob", "torch", torch.device("cpu"))[0] == "torch"  # argument wins
    monkeypatch.setenv("STP_KERNEL_BACKEND", "fastest")
    with pytest.raises(ValueError, match=r"STP_KERNEL_BACKEND=.*'fastest'.*allowed"):
        _backends.resolve("masked_logprob", None, torch.device("cpu"))


def test_default_backend_on_cpu_is_not_the_interpreter():
    from stp_kernels import _backends

    name, _ = _backends.resolve("masked_logprob", None, torch.device("cpu"))
    assert name in ("cpu", "torch_chunked")
    if "cpu" in available_backends("cpu"):
        assert name == "cpu"


def test_works_without_extension_or_triton():
    """The package imports and computes correctly with neither the compiled extension nor triton."""
    code = (
        "import sys; sys.modules['stp_kernels._C_cpu'] = None; sys.modules['triton'] = None\n"
        "import torch, stp_kernels as K\n"
        "s = K.backend_status('cpu'); assert s['cpu'] != 'available' and s['triton'] != 'available', s\n"
        "h = torch.randn(9, 16, dtype=torch.float64).float(); w = torch.randn(50, 16); t = torch.randint(0, 50, (9,))\n"
        "ref = K.masked_logprob_reference(h.double(), w.double(), t)\n"
        "out = K.masked_logprob(h, w, t)\n"
        "assert (out.double() - ref).abs().max() < 1e-4\n"
        "print(K.available_backends('cpu'))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "STP_KERNEL_BACKEND"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "['torch', 'torch_chunked', 'gemm']"  # gemm falls back to its torch epilogue


def _valid():
    h = torch.randn(2, 5, 8)
    w = torch.randn(30, 8)
    return dict(hidden=h, weight=w, targets=torch.randint(0, 30, (4,)), rows=torch.tensor([0, 3, 9, 4]))


BAD_INPUTS = {
    "hidden 1-D": (dict(hidden=torch.randn(8)), ValueError, "hidden must be"),
    "hidden int": (dict(hidden=torch.ones(2, 5, 8, dtype=torch.int32)), TypeError, "hidden has dtype"),
    "weight H": (dict(weight=torch.randn(30, 7)), ValueError, "weight must be"),
    "weight dtype": (dict(weight=torch.randn(30, 8, dtype=torch.float64)), TypeError, "weight has dtype"),
    "target range": (dict(targets=torch.tensor([0, 1, 30, 2])), ValueError, r"targets must lie in \[0, 30\)"),
    "negative target": (dict(targets=torch.tensor([0, -1, 3, 2])), ValueError, "targets must lie"),
    "target float": (dict(targets=torch.zeros(4)), TypeError, "targets must hold integers"),
    "rows length": (dict(rows=torch.tensor([0, 1])), ValueError, "rows has 2 entries but targets has 4"),
    "rows range": (dict(rows=torch.tensor([0, 1, 10, 2])), ValueError, r"rows must lie in \[0, 10\)"),
    "rows 2-D": (dict(rows=torch.zeros(2, 2, dtype=torch.long)), ValueError, "rows must be 1-D"),
    "empty rows": (dict(rows=torch.zeros(0, dtype=torch.long), targets=torch.zeros(0, dtype=torch.long)),
                   ValueError, "no rows to score"),
    "no rows, wrong count": (dict(rows=None), ValueError, "targets has 4 entries but hidden has 10 rows"),
    "vocab unsorted": (dict(vocab=torch.tensor([5, 3, 9])), ValueError, "sorted strictly increasing"),
    "vocab missing target": (dict(vocab=torch.arange(0, 30, 2), targets=torch.tensor([0, 2, 3, 4])), ValueError,
                             "every target must be in vocab"),
    "vocab range": (dict(vocab=torch.tensor([1, 40])), ValueError, r"vocab ids must lie in \[0, 30\)"),
    "temperature": (dict(temperature=0.0), ValueError, "temperature must be a finite number > 0"),
    "backend name": (dict(backend="fast"), ValueError, "'fast' is not a backend"),
    "cuda on cpu tensors": (dict(backend="cuda"), RuntimeError, "'cuda' cannot run on cpu tensors"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_is_named(name):
    change, exc, message = BAD_INPUTS[name]
    args = _valid()
    args.update(change)
    hidden, weight, targets = args.pop("hidden"), args.pop("weight"), args.pop("targets")
    with pytest.raises(exc, match=message):
        masked_logprob(hidden, weight, targets, **args)


@pytest.mark.skipif("cpu" not in available_backends("cpu"), reason="C++ extension not built")
def test_cpu_extension_checks_its_arguments():
    """The binding is strict on its own: wrong dtype or shape is an error, never a crash in the kernel."""
    from stp_kernels import _cpu

    h, w = torch.randn(4, 8), torch.randn(30, 8)
    with pytest.raises(RuntimeError, match="tgt must have dtype"):
        _cpu.forward(h, w, None, torch.zeros(4, dtype=torch.int32), 1.0, False)
    with pytest.raises(RuntimeError, match=r"tgt must have shape \[4\]"):
        _cpu.forward(h, w, None, torch.zeros(3, dtype=torch.long), 1.0, False)
    with pytest.raises(RuntimeError, match="contiguous"):
        _cpu.forward(h.T.contiguous().T, w, None, torch.zeros(4, dtype=torch.long), 1.0, False)


@pytest.mark.parametrize("backend", [b for b in available_backends("cpu") if b != "torch"])
def test_torch_compile_traces_the_op_without_graph_break(backend, seed):
    """The backends run behind torch.library custom ops with fake implementations and registered autograd."""
    from stp_kernels.masked_logprob import _fwd_op

    def logp_and_entropy(h, w, t):
        lse, tgt_logit, mean = _fwd_op(h, w, None, t, 1.0 / 0.8, True, backend)
        return tgt_logit - lse, lse - mean

    case = dict(CASES["plain"], temperature=0.8, extras=True)
    hidden, weight, targets, _, _, grads = _make(seed, "cpu", backend, torch.float32, case)
    compiled = torch.compile(logp_and_entropy, backend="aot_eager", fullgraph=True)
    outs = []
    for fn in (logp_and_entropy, compiled):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        logp, ent = fn(h, w, targets)
        ((logp * grads[0]).sum() + (ent * grads[1]).sum()).backward()
        outs.append([logp.detach(), ent.detach(), h.grad, w.grad])
    for eager, comp in zip(*outs):
        assert torch.equal(eager, comp), "compiled and eager results differ"
    ref = _run(masked_logprob_reference, hidden.double(), weight.double(), targets, None, None,
               [grads[0], torch.zeros_like(grads[0]), grads[1]], case)
    for o, r in zip(outs[0], [ref[0], ref[2], ref[3], ref[4]]):
        assert_close(o, r, atol=2e-5 * r.abs().max().item() + 1e-6, rtol=2e-4, what=f"{backend} compiled")
