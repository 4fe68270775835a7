"""Every public op gives the same answer for strided, non-contiguous and offset views of every tensor argument, on
every backend (and on both epilogues of ``gemm``): the answer for a view must equal the answer for its contiguous
copy, bit for bit. Kernels that index an argument as if it were contiguous read the wrong elements (a log-prob off by
many nats, another token picked) and fail here."""

from __future__ import annotations

import pytest
import torch

from stp_kernels import _gemm_common as G
from stp_kernels import available_backends, masked_logprob, noise_masks, sample_step

# (backend, gemm epilogue): gemm runs with its torch epilogue (the CPU default) and its Triton epilogue.
ML = [(b, None) for b in available_backends("cpu") if b != "gemm"] + [("gemm", "torch"), ("gemm", "triton")]
SS = [(b, None) for b in available_backends("cpu", op="sample_step") if b != "gemm"] + [
    ("gemm", "torch"), ("gemm", "triton")]
KINDS = ("strided", "transposed", "offset")


def _view(t: torch.Tensor, kind: str) -> torch.Tensor:
    """A view of a fresh copy of ``t`` with the same values but another layout (never contiguous, or offset)."""
    if kind == "strided":  # every other element of a tensor twice as long along dim 0
        base = torch.zeros((2 * t.shape[0],) + tuple(t.shape[1:]), dtype=t.dtype)
        base[::2] = t
        v = base[::2]
    elif kind == "transposed":  # 2-D: column-major; 1-D: a column of a [n, 3] tensor
        if t.dim() == 1:
            base = torch.zeros(t.shape[0], 3, dtype=t.dtype)
            base[:, 1] = t
            v = base[:, 1]
        else:
            v = t.T.contiguous().T
    else:  # offset: storage starts one row (or element) in
        base = torch.zeros((t.shape[0] + 1,) + tuple(t.shape[1:]), dtype=t.dtype)
        base[1:] = t
        v = base[1:]
    assert torch.equal(v, t) and (not v.is_contiguous() or v.storage_offset() > 0)
    return v


def _ml_inputs(seed: int, dtype: torch.dtype, prior: bool):
    gen = torch.Generator().manual_seed(seed)
    n, hdim, vsize = 17, 24, 203
    hidden = torch.randn(n, hdim, generator=gen).to(dtype)
    weight = (torch.randn(vsize, hdim, generator=gen) * (3.0 / hdim**0.5)).to(dtype)
    vocab = torch.randperm(vsize, generator=gen)[:150].sort().values
    rows = torch.randperm(n, generator=gen)[:13]
    targets = vocab[torch.randint(0, vocab.numel(), (13,), generator=gen)]
    return dict(hidden=hidden, weight=weight, targets=targets, rows=rows, vocab=vocab if prior else None)


def _ml_run(args: dict, backend: str):
    """(logp, entropy, d hidden, d weight): the gradients land on the tensors the views were cut from."""
    args = dict(args)
    bases = {}
    for name in ("hidden", "weight"):
        t = args[name]
        base = (t._base if t._base is not None else t).detach().clone().requires_grad_()
        if t._base is not None:
            args[name] = base.as_strided(t.shape, t.stride(), t.storage_offset())
        else:
            args[name] = base
        bases[name] = (base, t)
    logp, ent = masked_logprob(args["hidden"], args["weight"], args["targets"], rows=args["rows"],
                               vocab=args["vocab"], temperature=0.8, backend=backend, return_entropy=True)
    gen = torch.Generator().manual_seed(1)
    (logp * torch.randn(logp.shape, generator=gen) + ent * torch.randn(ent.shape, generator=gen)).sum().backward()
    grads = []
    for name in ("hidden", "weight"):
        base, t = bases[name]
        g = base.grad
        grads.append(g if t._base is None else g.as_strided(t.shape, t.stride(), t.storage_offset()))
    return [logp.detach(), ent.detach()] + grads


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("arg", ["hidden", "weight", "targets", "rows", "vocab", "targets-no-prior"])
@pytest.mark.parametrize("backend,epilogue", ML, ids=[f"{b}-{e}" if e else b for b, e in ML])
def test_masked_logprob_views(backend, epilogue, arg, kind, monkeypatch):
    if epilogue:
        monkeypatch.setattr(G.settings, "epilogue", epilogue)
        monkeypatch.setattr(G.settings, "chunk", 64)
    dtype = torch.bfloat16 if arg in ("hidden", "weight") and kind == "transposed" else torch.float32
    prior = not arg.endswith("-no-prior")  # without a prior the targets reach the kernels as they are
    arg = arg.removesuffix("-no-prior")
    args = _ml_inputs(3, dtype, prior)
    want = _ml_run(args, backend)
    args[arg] = _view(args[arg], kind)
    got = _ml_run(args, backend)
    for name, g, w in zip(("logp", "entropy", "d hidden", "d weight"), got, want):
        assert torch.equal(g, w), f"{backend}: {arg} as a {kind} view changes {name}: max diff " \
                                  f"{(g.double() - w.double()).abs().max().item():.3e}"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("arg", ["hidden", "weight", "rows", "row_ids", "vocab"])
@pytest.mark.parametrize("backend,epilogue", SS, ids=[f"{b}-{e}" if e else b for b, e in SS])
def test_sample_step_views(backend, epilogue, arg, kind, monkeypatch):
    if epilogue:
        monkeypatch.setattr(G.settings, "epilogue", epilogue)
        monkeypatch.setattr(G.settings, "chunk", 64)
    gen = torch.Generator().manual_seed(5)
    n, hdim, vsize = 17, 24, 203
    args = dict(hidden=torch.randn(n, hdim, generator=gen),
                weight=torch.randn(vsize, hdim, generator=gen) * (3.0 / hdim**0.5),
                rows=torch.randperm(n, generator=gen)[:13], row_ids=torch.randint(0, 2**40, (13,), generator=gen),
                vocab=torch.randperm(vsize, generator=gen)[:150].sort().values)

    def run(a):
        return sample_step(a["hidden"], a["weight"], seed=11, step=2, rows=a["rows"], row_ids=a["row_ids"],
                           temperature=0.9, vocab=a["vocab"], backend=backend, return_logp=True,
                           return_entropy=True)

    want = run(args)
    args[arg] = _view(args[arg], kind)
    got = run(args)
    for name, g, w in zip(("x0", "confidence", "logp", "entropy"), got, want):
        assert torch.equal(g, w), f"{backend}: {arg} as a {kind} view changes {name}"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("arg", ["sample_ids", "lengths", "anchors", "prompt_mask"])
def test_noise_masks_views(arg, kind):
    gen = torch.Generator().manual_seed(2)
    b, c, p = 5, 19, 7
    args = dict(sample_ids=torch.randint(0, 2**40, (b,), generator=gen), lengths=torch.randint(1, c + 1, (b,),
                generator=gen), anchors=torch.rand(b, c, generator=gen) < 0.2,
                prompt_mask=torch.rand(b, p, generator=gen) < 0.8)

    def run(a):
        return noise_masks(3, 1, a["sample_ids"], a["lengths"], num_draws=4, scheme="d1", anchors=a["anchors"],
                           prompt_mask=a["prompt_mask"])

    want = run(args)
    args[arg] = _view(args[arg], kind)
    got = run(args)
    for g, w in zip(got, want):
        assert torch.equal(g, w), f"noise_masks: {arg} as a {kind} view changes the masks"
