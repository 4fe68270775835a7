"""GPU acceptance of stp_kernels in one command, with nothing but the installed project:

    python -m stp_kernels.acceptance --out acceptance.md        # one H100/H200: under 8 minutes
    python -m stp_kernels.acceptance --smoke                     # the same code on CPU at tiny shapes (CI)

What it does, in order (every step prints progress to stderr; the markdown table goes to stdout and ``--out``):
1. The first-use self-check of every compiled backend (``stp_kernels.self_check``).
2. ``masked_logprob`` correctness of every backend at LLaDA-8B's head (N=2048, H=4096, V=126464, bf16) and at a
   ragged shape with a vocabulary prior and a temperature, forward and backward with random per-row upstream
   gradients on log p and the entropy, against float64 computed from the same inputs. Bound, per tensor in the
   2-norm: ||ours - fp64|| <= ||torch_same_dtype - fp64|| + atol ||fp64||, where torch_same_dtype is what a
   training loop writes ((h @ W.T).float().log_softmax(-1).gather(...), autograd in the input dtype).
3. Bitwise determinism: two identical forward+backward calls of every backend give identical bits.
4. Time (min / median / max over repeats, each repeat CUDA-synchronised) and peak memory (max allocated minus
   allocated before) of forward and forward+backward at LLaDA's head for every backend, naive torch,
   torch.compile of the naive code, and Liger-Kernel and cut-cross-entropy when installed (``pip install
   stp[gpu]``), as fractions of the cuBLAS floor measured in the same run: forward = one h @ W.T; forward+backward
   = two h @ W.T (forward, and the recomputation a memory-bounded backward needs) + dz @ W + dz^T @ h, i.e.
   8 N H V flops (2.12 and 8.49 TFLOP at LLaDA's head).
5. ``sample_step`` at 512 and 2048 rows (temperature 0.7): tokens against a float64 oracle (equal except at
   near-ties), time against its floor, one h @ W.T.
Exit status 1 when any self-check, bound or determinism check fails.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import importlib.util
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import _backends
from .masked_logprob import masked_logprob
from .reference import counter_gumbel
from .sample_step import sample_step


@dataclass(frozen=True)
class Plan:
    """Shapes and repeat counts of one run."""

    device: str
    dtype: torch.dtype
    head: tuple[int, int, int]  # (N, H, V): LLaDA-8B's head on GPU
    ragged: tuple[int, int, int]  # odd sizes, run with a vocabulary prior and a temperature
    sample_rows: tuple[int, ...]
    repeats: int  # timed repeats per variant (fewer when one repeat is slow: see ``_time``)
    budget_s: float  # time cap of the repeats of one variant
    compile: bool  # include torch.compile (compilation takes tens of seconds on CPU: off in --smoke)


GPU_PLAN = Plan("cuda", torch.bfloat16, (2048, 4096, 126464), (1531, 1000, 32003), (512, 2048), 7, 6.0, True)
SMOKE_PLAN = Plan("cpu", torch.bfloat16, (23, 40, 301), (19, 24, 257), (8, 23), 2, 2.0, False)
ATOL = 1e-3  # relative to ||fp64||: room for the float32 rounding of outputs that torch computes in float32 too


def _log(msg: str) -> None:
    print(f"[acceptance {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------------------------ variants


def _naive(h, w, t):
    return torch.log_softmax((h @ w.T).float(), dim=-1).gather(1, t[:, None])[:, 0]


def _variants(plan: Plan) -> dict[str, Callable]:
    """name -> fn(h, w, t) -> per-row log p (or a per-row loss for the peers)."""
    out: dict[str, Callable] = {"naive torch": _naive}
    if plan.compile:
        out["torch.compile"] = torch.compile(_naive, dynamic=False)
    for name in _backends.available_backends(plan.device, op="masked_logprob"):
        if name == "torch":
            continue
        out[f"stp {name}"] = (lambda b: lambda h, w, t: masked_logprob(h, w, t, backend=b))(name)
        if name == "gemm":  # the fixed 4096-slot chunk of earlier versions, against the chunk scaled with the rows
            out["stp gemm (chunk 4096)"] = _fixed_chunk(4096)
    if plan.device == "cuda" and importlib.util.find_spec("liger_kernel") is not None:
        out["liger-kernel"] = _liger
    if plan.device == "cuda" and importlib.util.find_spec("cut_cross_entropy") is not None:
        out["cut-cross-entropy"] = _cce
    return out


def _fixed_chunk(chunk: int) -> Callable:
    from . import _gemm_common as G

    def fn(h, w, t):
        before = G.settings.chunk
        G.settings.chunk = chunk
        try:
            return masked_logprob(h, w, t, backend="gemm")
        finally:
            G.settings.chunk = before

    return fn


_liger_loss = None


def _liger(h, w, t):
    # Liger computes its gradient inside the forward, for a scalar loss: timed as a throughput peer (sum).
    global _liger_loss
    if _liger_loss is None:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        _liger_loss = LigerFusedLinearCrossEntropyLoss(reduction="sum")
    return -_liger_loss(w, h, t)


def _cce(h, w, t):
    from cut_cross_entropy import linear_cross_entropy

    return -linear_cross_entropy(h, w, t, reduction="sum")


# ------------------------------------------------------------------------------------------------ measurement


@dataclass
class Timing:
    ms: list[float]
    peak_mib: float | None

    def cell(self) -> str:
        return f"{min(self.ms):.2f} / {statistics.median(self.ms):.2f} / {max(self.ms):.2f}"


def _time(fn: Callable[[], object], plan: Plan, warmup: int = 1) -> Timing:
    """Repeats of fn, each synchronised; stops early once the repeats took ``plan.budget_s``. Peak memory on CUDA:
    the maximum allocated during one repeat minus what was allocated before it."""
    for _ in range(warmup):
        fn()
    _sync(plan.device)
    peak = None
    if plan.device == "cuda":
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    times: list[float] = []
    spent = 0.0
    while len(times) < plan.repeats and (spent < plan.budget_s or len(times) < 2):
        _sync(plan.device)
        start = time.perf_counter()
        fn()
        _sync(plan.device)
        times.append((time.perf_counter() - start) * 1e3)
        spent += times[-1] / 1e3
    return Timing(times, peak)


def _inputs(plan: Plan, n: int, hdim: int, vsize: int, seed: int, prior: bool):
    gen = torch.Generator().manual_seed(seed)
    dev = plan.device
    h = torch.randn(n, hdim, generator=gen).to(device=dev, dtype=plan.dtype)
    w = (torch.randn(vsize, hdim, generator=gen) * (4.0 / hdim**0.5)).to(device=dev, dtype=plan.dtype)
    vocab = torch.randperm(vsize, generator=gen)[: vsize // 2].sort().values.to(dev) if prior else None
    if vocab is not None:
        t = vocab[torch.randint(0, vocab.numel(), (n,), generator=gen).to(dev)]
    else:
        t = torch.randint(0, vsize, (n,), generator=gen).to(dev)
    g = [torch.randn(n, generator=gen).to(dev) for _ in range(2)]
    return h, w, t, vocab, g


def _run_ours(backend: str | None, h, w, t, vocab, g, temperature: float, upcast=None):
    """(logp, entropy, dh, dw) for upstream gradients g on (logp, entropy); backend None: torch autograd in the
    input dtype (``upcast=None``) or in float64 (``upcast=torch.float64``, inputs cast by the caller)."""
    from .reference import masked_logprob_reference

    hh = h.detach().clone().requires_grad_()
    ww = w.detach().clone().requires_grad_()
    if backend is None:
        logp, ent = masked_logprob_reference(hh, ww, t, vocab=vocab, temperature=temperature, upcast=upcast,
                                             return_entropy=True)
    else:
        logp, ent = masked_logprob(hh, ww, t, vocab=vocab, temperature=temperature, backend=backend,
                                   return_entropy=True)
    ((logp * g[0].to(logp.dtype)).sum() + (ent * g[1].to(ent.dtype)).sum()).backward()
    return [logp.detach(), ent.detach(), hh.grad, ww.grad]


def _correctness(plan: Plan, name: str, shape: tuple[int, int, int], prior: bool, temperature: float,
                 lines: list[str]) -> bool:
    n, hdim, vsize = shape
    h, w, t, vocab, g = _inputs(plan, n, hdim, vsize, seed=1, prior=prior)
    _log(f"correctness {name}: float64 oracle")
    ref = _run_ours(None, h.double(), w.double(), t, vocab, g, temperature, upcast=torch.float64)
    theirs = _run_ours(None, h, w, t, vocab, g, temperature, upcast=None)
    ok = True
    torch_err = [(x.double() - r).norm().item() for x, r in zip(theirs, ref)]
    ref_norm = [r.norm().item() for r in ref]
    for backend in _backends.available_backends(plan.device, op="masked_logprob"):
        if backend == "torch":
            continue
        _log(f"correctness {name}: {backend}")
        try:
            first = _run_ours(backend, h, w, t, vocab, g, temperature)
            second = _run_ours(backend, h, w, t, vocab, g, temperature)
        except Exception as exc:  # reported in the table; the run goes on with the other backends
            lines.append(f"| {name} | {backend} | error: {type(exc).__name__}: {str(exc)[:120]} | | | | | no | - |")
            ok = False
            continue
        errs = [(x.double() - r).norm().item() for x, r in zip(first, ref)]
        within = all(e <= te + ATOL * rn for e, te, rn in zip(errs, torch_err, ref_norm))
        within = within and all(bool(torch.isfinite(x).all()) for x in first)
        same = all(torch.equal(a, b) for a, b in zip(first, second))
        ok = ok and within and same
        cells = [f"{e / max(rn, 1e-30):.2e} ({te / max(rn, 1e-30):.2e})"
                 for e, te, rn in zip(errs, torch_err, ref_norm)]
        lines.append(f"| {name} | {backend} | " + " | ".join(cells) + f" | {'yes' if within else 'NO'} | "
                     f"{'yes' if same else 'NO'} |")
        del first, second
    del ref, theirs
    return ok


def _floors(plan: Plan, h, w) -> tuple[float, float]:
    """cuBLAS (or CPU BLAS) medians in ms: forward h @ W.T; forward+backward 2 x h @ W.T + dz @ W + dz^T @ h."""
    dz = torch.randn(h.shape[0], w.shape[0], device=h.device).to(h.dtype)
    fwd = statistics.median(_time(lambda: h @ w.T, plan).ms)
    dh = statistics.median(_time(lambda: dz @ w, plan).ms)
    dw = statistics.median(_time(lambda: dz.T @ h, plan).ms)
    return fwd, 2 * fwd + dh + dw


def _timings(plan: Plan, lines: list[str]) -> None:
    n, hdim, vsize = plan.head
    h, w, t, _, g = _inputs(plan, n, hdim, vsize, seed=2, prior=False)
    _log("cuBLAS floor")
    floor_fwd, floor_fb = _floors(plan, h, w)
    flops = 2 * n * hdim * vsize
    lines.append(f"| cuBLAS floor (h @ W.T; 2 h @ W.T + dz @ W + dz^T @ h) | {floor_fwd:.2f} | - | 1.00 | "
                 f"{floor_fb:.2f} | - | 1.00 |")
    hg = h.detach().clone().requires_grad_()
    wg = w.detach().clone().requires_grad_()
    for name, fn in _variants(plan).items():
        _log(f"time {name}")
        try:
            def fwd(fn=fn):
                with torch.no_grad():
                    fn(h, w, t)

            def fwd_bwd(fn=fn):
                hg.grad = wg.grad = None
                out = fn(hg, wg, t)
                (out.sum() if out.dim() == 0 else (out * g[0]).sum()).backward()

            warm = 2 if name == "torch.compile" else 1
            a = _time(fwd, plan, warmup=warm)
            b = _time(fwd_bwd, plan, warmup=warm)
        except Exception as exc:
            lines.append(f"| {name} | error: {type(exc).__name__}: {str(exc)[:120]} | | | | | |")
            continue
        hg.grad = wg.grad = None
        mem = (lambda x: "-" if x.peak_mib is None else f"{x.peak_mib:.0f}")
        lines.append(f"| {name} | {a.cell()} | {mem(a)} | {floor_fwd / statistics.median(a.ms):.2f} | "
                     f"{b.cell()} | {mem(b)} | {floor_fb / statistics.median(b.ms):.2f} |")
    lines.append("")
    lines.append(f"Floor rates: forward {flops / (floor_fwd * 1e-3) / 1e12:.1f} TFLOP/s "
                 f"({flops / 1e12:.3f} TFLOP), forward+backward {4 * flops / (floor_fb * 1e-3) / 1e12:.1f} "
                 f"TFLOP/s ({4 * flops / 1e12:.3f} TFLOP).")


def _sample_checks(plan: Plan, lines: list[str]) -> bool:
    _, hdim, vsize = plan.head
    ok = True
    temperature = 0.7
    for rows in plan.sample_rows:
        h, w, _, _, _ = _inputs(plan, rows, hdim, vsize, seed=3, prior=False)
        row_ids = torch.arange(rows, device=plan.device) * 1000003
        z = h.double() @ w.double().T
        score = z / temperature + counter_gumbel(11, 4, row_ids, torch.arange(vsize, device=plan.device)).double()
        top2 = score.topk(2, -1).values
        near_tie = (top2[:, 0] - top2[:, 1]) < 1e-3
        ref = score.argmax(-1)
        conf_ref = torch.softmax(z, -1).gather(1, ref[:, None])[:, 0]
        del z, score
        floor = statistics.median(_time(lambda h=h, w=w: h @ w.T, plan).ms)
        lines.append(f"| {rows} | cuBLAS floor (h @ W.T) | {floor:.2f} | 1.00 | - | - |")
        for backend in _backends.available_backends(plan.device, op="sample_step"):
            if backend == "torch" and rows > 512:
                continue
            _log(f"sample_step {rows} rows: {backend}")
            try:
                def run(h=h, w=w, row_ids=row_ids, backend=backend):
                    return sample_step(h, w, seed=11, step=4, row_ids=row_ids, temperature=temperature,
                                       backend=backend)

                x0, conf = run()
                x1, _ = run()
                timing = _time(run, plan)
            except Exception as exc:
                lines.append(f"| {rows} | {backend} | error: {type(exc).__name__}: {str(exc)[:120]} | | | |")
                ok = False
                continue
            wrong = int(((x0 != ref) & ~near_tie).sum())
            same = ref == x0
            conf_err = (conf[same].double() - conf_ref[same]).abs().max().item() if bool(same.any()) else 0.0
            good = wrong == 0 and torch.equal(x0, x1) and conf_err < 1e-3
            ok = ok and good
            lines.append(f"| {rows} | {backend} | {timing.cell()} | {floor / statistics.median(timing.ms):.2f} | "
                         f"{wrong} of {rows} off (near-ties {int(near_tie.sum())}); conf err {conf_err:.1e}; "
                         f"repeatable {'yes' if torch.equal(x0, x1) else 'NO'} | {'yes' if good else 'NO'} |")
    return ok


def _header(plan: Plan) -> str:
    if plan.device == "cuda":
        dev = torch.cuda.get_device_name()
    else:
        dev = f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"
    try:  # the installed version, without importing triton (its CPU interpreter must be chosen before the import)
        tri = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        tri = "absent"
    return (f"Device: {dev}; torch {torch.__version__}, triton {tri}, python {platform.python_version()}; "
            f"{datetime.date.today().isoformat()}")


def run(plan: Plan, smoke: bool) -> tuple[str, bool]:
    """The whole acceptance; returns (markdown, passed)."""
    started = time.perf_counter()
    lines = [f"## stp_kernels acceptance{' (smoke, CPU, tiny shapes)' if smoke else ''}", "", _header(plan), "",
             f"Command: `python -m stp_kernels.acceptance{' --smoke' if smoke else ''}`", ""]
    ok = True

    lines += ["### First-use self-check", "", "| op | backend | verdict |", "|---|---|---|"]
    for op in ("masked_logprob", "sample_step"):
        _log(f"self-check {op}")
        for name, verdict in _backends.self_check(op, plan.device, force=True).items():
            ok = ok and verdict == "passed"
            lines.append(f"| {op} | {name} | {verdict[:200]} |")

    lines += ["", "### GPU risks: TF32, per-dtype status, slower paths", "",
              "The self-check again with TF32 turned on for the process (`torch.set_float32_matmul_precision('high')`"
              ", as training scripts do): the ops must stay exact float32. Then each backend's status per dtype, "
              "with any slower path it reported (`backend_status`).", "", "| what | backend | result |",
              "|---|---|---|"]
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        for op in ("masked_logprob", "sample_step"):
            _log(f"self-check {op} with TF32 on")
            for name, verdict in _backends.self_check(op, plan.device, force=True).items():
                ok = ok and verdict == "passed"
                lines.append(f"| {op} self-check, TF32 on | {name} | {verdict[:200]} |")
    finally:
        torch.set_float32_matmul_precision(before)
    for dtype in (torch.float32, torch.bfloat16):
        for name, status in _backends.backend_status(plan.device, dtype=dtype).items():
            lines.append(f"| status, {str(dtype).replace('torch.', '')} | {name} | {status[:300]} |")

    lines += ["", "### masked_logprob correctness and determinism",
              "",
              f"Relative 2-norm error against float64 (torch's own {str(plan.dtype).replace('torch.', '')} error in "
              f"parentheses); bound ||ours - fp64|| <= ||torch - fp64|| + {ATOL:g} ||fp64||; forward+backward with "
              "random per-row gradients on log p and the entropy.", "",
              "| shape | backend | log p | entropy | d hidden | d weight | within bound | bitwise repeatable |",
              "|---|---|---|---|---|---|---|---|"]
    n, hd, v = plan.head
    ok = _correctness(plan, f"head N={n} H={hd} V={v}", plan.head, False, 1.0, lines) and ok
    n, hd, v = plan.ragged
    ok = _correctness(plan, f"ragged N={n} H={hd} V={v}, prior V/2, T=0.7", plan.ragged, True, 0.7, lines) and ok

    n, hd, v = plan.head
    lines += ["", f"### masked_logprob time and peak memory, N={n} H={hd} V={v} "
              f"{str(plan.dtype).replace('torch.', '')}", "",
              "ms as min / median / max; floor fraction = floor median / median (1.00 = at the floor). Liger-Kernel "
              "and cut-cross-entropy run with a summed loss (their gradient is computed for a scalar loss).", "",
              "| variant | fwd ms | fwd peak MiB | fwd floor fraction | fwd+bwd ms | fwd+bwd peak MiB | "
              "fwd+bwd floor fraction |", "|---|---|---|---|---|---|---|"]
    _timings(plan, lines)

    lines += ["", f"### sample_step, H={hd} V={v}, temperature 0.7", "",
              "| rows | backend | ms (min / median / max) | floor fraction | tokens vs float64 | ok |",
              "|---|---|---|---|---|---|"]
    ok = _sample_checks(plan, lines) and ok
    lines += ["", f"Result: {'PASS' if ok else 'FAIL'} ({time.perf_counter() - started:.0f} s)"]
    return "\n".join(lines) + "\n", ok


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m stp_kernels.acceptance", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, no torch.compile: checks the code path")
    ap.add_argument("--out", help="also write the markdown table to this file")
    args = ap.parse_args(argv)
    if args.smoke:
        plan = SMOKE_PLAN
    else:
        if not torch.cuda.is_available():
            print("stp_kernels.acceptance: no CUDA device; run it on a GPU, or pass --smoke for the CPU code path",
                  file=sys.stderr)
            return 2
        plan = GPU_PLAN
    text, ok = run(plan, args.smoke)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
        _log(f"written to {args.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
