"""``python -m stp.acceptance --smoke``: the whole-stack GPU acceptance command's code path on CPU at tiny shapes
(every online method x every rollout cache through stp.trainer.train, and the Dream-shaped forward)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from stp import acceptance

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow  # ~25 s on a quiet 2-core CPU, ~50 s with the machine busy
def test_smoke_run_writes_a_passing_table(tmp_path):
    out = tmp_path / "stack.md"
    env = {k: v for k, v in os.environ.items() if k not in ("STP_KERNEL_BACKEND",)}
    res = subprocess.run([sys.executable, "-m", "stp.acceptance", "--smoke", "--out", str(out)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    text = out.read_text()
    assert text == res.stdout.rstrip("\n") + "\n"
    rows = text.splitlines()
    assert rows[0] == "## stp whole-stack acceptance (smoke, CPU)"
    for method in acceptance.METHODS:
        for cache in acceptance.CACHES:
            row = [r for r in rows if r.startswith(f"| {method} | {cache} | CPU")]
            assert len(row) == 1, (method, cache)
            cells = row[0].split(" | ")
            assert sum(" / " in c for c in cells) == 6, row  # rollout, scoring, update, step, tokens/s, NFE
    assert any(r.startswith("| tiny Dream-like shapes") and r.count(" / ") == 4 for r in rows)
    assert "Estimate of the GPU run from flops (not measured)" in text
    assert rows[-1].startswith("Result: PASS")


def test_gpu_plan_is_the_paper_setting_and_fits_the_budget():
    plan = acceptance.GPU_PLAN
    assert (plan.gen, plan.block, plan.steps, plan.group, plan.lora_r) == (256, 32, 128, 6, 128)
    assert acceptance.LLADA_8B.params() == pytest.approx(8.0e9, rel=0.05)  # LLaDA-8B: 8.0 B parameters
    assert acceptance.DREAM_7B.params() == pytest.approx(7.6e9, rel=0.05)  # Qwen2-7B shapes: 7.6 B
    assert acceptance.estimate_gpu_seconds()["total_s"] < 8 * 60


def test_without_a_gpu_the_full_run_says_how_to_proceed():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert acceptance.main([]) == 2
