"""``python -m stp_kernels.acceptance --smoke``: the GPU acceptance command's code path on CPU at tiny shapes."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from stp_kernels import available_backends

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_smoke_run_writes_a_passing_table(tmp_path):
    out = tmp_path / "acceptance.md"
    env = {k: v for k, v in os.environ.items() if k not in ("STP_KERNEL_BACKEND", "TRITON_INTERPRET")}
    res = subprocess.run([sys.executable, "-m", "stp_kernels.acceptance", "--smoke", "--out", str(out)], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    text = out.read_text()
    assert text == res.stdout.rstrip("\n") + "\n"  # the same table on stdout and in --out
    assert text.startswith("## stp_kernels acceptance (smoke")
    assert "torch 2." in text and "triton" in text
    for heading in ("### First-use self-check", "### masked_logprob correctness and determinism",
                    "### masked_logprob time and peak memory", "### sample_step"):
        assert heading in text, heading
    rows = text.splitlines()
    compiled = [b for b in ("triton", "gemm", "cpu") if b in available_backends("cpu")]
    for backend in compiled:
        assert f"| masked_logprob | {backend} | passed |" in rows, backend
    for backend in [b for b in available_backends("cpu") if b != "torch"]:
        checked = [r for r in rows if r.startswith(("| head ", "| ragged ")) and f"| {backend} |" in r]
        assert len(checked) == 2 and all(r.endswith("| yes | yes |") for r in checked), checked
        timed = [r for r in rows if r.startswith(f"| stp {backend} |")]
        assert len(timed) == 1 and timed[0].count(" / ") == 4, timed
    assert any(r.startswith("| cuBLAS floor (h @ W.T; ") for r in rows)
    assert any(r.startswith("| naive torch |") for r in rows)
    sampled = [r for r in rows if r.startswith(("| 8 | gemm |", "| 23 | gemm |"))]
    assert len(sampled) == 2 and all(r.endswith("| yes |") for r in sampled), sampled
    assert rows[-1].startswith("Result: PASS")


def test_without_a_gpu_the_full_run_says_how_to_proceed():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    from stp_kernels import acceptance

    assert acceptance.main([]) == 2
