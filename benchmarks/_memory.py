"""Peak memory of one benchmark step, measured in a fresh process so variants cannot share freed buffers.

CPU: peak resident set (VmHWM) during the step minus the resident set before it. glibc is told to serve every
allocation over 64 KiB with mmap (MALLOC_MMAP_THRESHOLD_), so freed buffers return to the OS and a warm-up run
leaves no cached pages that would hide a later allocation. CUDA: torch.cuda.max_memory_allocated during the step
minus the memory allocated before it.

    python -m benchmarks._memory --variant stp_cpu --mode fwd_bwd --n 2048 --h 256 --v 32768 --dtype float32
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")


def cpu_step_peak_mib(run) -> float:
    """Peak extra resident memory in MiB of one more call of ``run`` (warmed up by the caller), on this process."""
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS counter (VmHWM) of this process
    base = _status_kib("VmRSS")
    run()
    return (_status_kib("VmHWM") - base) / 1024


def peak_in_subprocess(module: str, args: list[str], what: str) -> float:
    """``python -m module *args`` in a fresh process with glibc returning freed buffers to the OS; its last stdout
    line is ``{"peak_mib": ...}``."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    res = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=1800)
    if res.returncode != 0:
        raise RuntimeError(f"memory measurement of {what} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])["peak_mib"]


def measure(variant: str, mode: str, n: int, h: int, v: int, dtype: str, device: str) -> float:
    """Peak extra memory in MiB of one step (after one warm-up step)."""
    import torch

    from benchmarks._variants import make_inputs, step, variants

    inputs = make_inputs(n, h, v, getattr(torch, dtype), device)
    run = step(variants(device)[variant], inputs, mode)
    run()  # warm-up: lazy initialisation, compilation, thread pools
    inputs["hidden"].grad = inputs["weight"].grad = None  # every variant pays for its own gradients
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    return cpu_step_peak_mib(run)


def measure_in_subprocess(variant: str, mode: str, n: int, h: int, v: int, dtype: str, device: str) -> float:
    return peak_in_subprocess("benchmarks._memory", ["--variant", variant, "--mode", mode, "--n", str(n), "--h", str(h),
                                                     "--v", str(v), "--dtype", dtype, "--device", device], variant)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", required=True)
    p.add_argument("--mode", choices=["fwd", "fwd_bwd"], required=True)
    p.add_argument("--n", type=int, required=True)
    p.add_argument("--h", type=int, required=True)
    p.add_argument("--v", type=int, required=True)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    a = p.parse_args()
    print(json.dumps({"peak_mib": measure(a.variant, a.mode, a.n, a.h, a.v, a.dtype, a.device)}))


if __name__ == "__main__":
    main()
