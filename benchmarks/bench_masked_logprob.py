"""masked_logprob against the alternatives, forward and forward+backward, time and peak memory side by side.

    pytest benchmarks/bench_masked_logprob.py --benchmark-only            # CPU: N=2048, H=256, V=32768, fp32
    pytest benchmarks/bench_masked_logprob.py --benchmark-only --full     # also torch.compile
    STP_BENCH_MD=out.md pytest benchmarks/ --benchmark-only               # also write the table

On a GPU the shapes are LLaDA-8B's head (H=4096, V=126464, N in {2048, 4096}, bf16) and each row also reports the
fraction of the matmul floor: 2*N*H*V flops (forward) or 8*N*H*V (forward+backward: a backward that does not keep
the [N, V] logits recomputes them, then dh and dW) at the bf16 matmul rate measured in the same run. Each step
synchronises the device inside the timed function.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks._memory import measure_in_subprocess
from benchmarks._report import full
from benchmarks._variants import make_inputs, step, variants

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cuda":
    SHAPES = [(2048, 4096, 126464, "bfloat16"), (4096, 4096, 126464, "bfloat16")]
else:
    SHAPES = [(2048, 256, 32768, "float32")]
# torch.compile compiles for minutes on a CPU (twice: here and in the memory measurement): --full only.
VARIANTS = [v for v in variants(DEVICE) if full() or v != "torch_compile"]
MODES = ["fwd", "fwd_bwd"]

_rate: dict[str, float] = {}


def _bf16_matmul_flops_per_s() -> float:
    """Measured dense bf16 matmul rate (8192^3) on this GPU, once per run."""
    if "bf16" not in _rate:
        a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
        for _ in range(3):
            a @ b
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(20):
            a @ b
        end.record()
        torch.cuda.synchronize()
        _rate["bf16"] = 20 * 2 * 8192**3 / (start.elapsed_time(end) / 1e3)
    return _rate["bf16"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"N{s[0]}-H{s[1]}-V{s[2]}-{s[3]}")
@pytest.mark.parametrize("variant", VARIANTS)
def test_masked_logprob(benchmark, record, variant, shape, mode):
    n, h, v, dtype = shape
    run = step(variants(DEVICE)[variant], make_inputs(n, h, v, getattr(torch, dtype), DEVICE), mode)
    group = f"masked_logprob {mode} N={n} H={h} V={v} {dtype} ({DEVICE})"
    benchmark.group = group
    rounds = 5 if DEVICE == "cpu" else 20
    benchmark.pedantic(run, rounds=rounds, warmup_rounds=2 if variant != "torch_compile" else 3)
    peak = measure_in_subprocess(variant, mode, n, h, v, dtype, DEVICE)
    median_ms = benchmark.stats.stats.median * 1e3
    floor_ms = None
    if DEVICE == "cuda":
        floor_ms = (2 if mode == "fwd" else 8) * n * h * v / _bf16_matmul_flops_per_s() * 1e3
    benchmark.extra_info.update(peak_mib=peak, floor_ms=floor_ms)
    row = {"median ms": median_ms, "peak MiB": peak}
    if DEVICE == "cuda":
        row["floor fraction"] = floor_ms / median_ms
    record(group=group, variant=variant, base="naive_torch", **row)
