"""The method interface: the registry, per-method settings, and the smallest complete method of
docs/architecture.md trained end to end by the shared loop (nothing else changed to add it)."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest
import torch

import stp.data_order
import stp.methods
import stp.trainer
from stp.config import parse_args
from stp.methods import METHODS, Method, get_method
from tests._trainer_entry import toy_task_for

ROOT = Path(__file__).resolve().parents[1]


def test_registry_finds_the_grpo_methods_without_torch_at_import():
    assert list(METHODS)[:3] == ["stp", "elbo", "d1"]
    assert all(issubclass(m, Method) for m in METHODS.values())
    assert get_method("d1").rollout.anchors is False and get_method("stp").rollout.anchors is True
    with pytest.raises(ValueError, match="allowed: stp, elbo, d1"):
        get_method("nope")
    import subprocess

    code = "import sys, stp.config, stp.methods; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def _example_module() -> types.ModuleType:
    text = (ROOT / "docs" / "architecture.md").read_text()
    code = re.search(r"```python\n# stp/methods/reinforce_d1.py\n(.*?)```", text, re.S).group(1)
    module = types.ModuleType("stp.methods.reinforce_d1")
    module.__package__ = "stp.methods"
    exec(compile(code, "docs/architecture.md", "exec"), module.__dict__)
    return module


def test_the_documented_smallest_method_trains(tmp_path, monkeypatch):
    torch.set_num_threads(1)
    cls = _example_module().METHOD
    monkeypatch.setitem(stp.methods.METHODS, cls.name, cls)
    monkeypatch.setattr(stp.data_order, "task_for", toy_task_for(stp.data_order.task_for))
    cfg = parse_args(["--method", "reinforce-d1", "--model.name_or_path", "tiny", "--rollout.gen_length", "16",
                      "--rollout.block_length", "16", "--rollout.steps", "8", "--grpo.prompts_per_step", "2",
                      "--grpo.num_generations", "2", "--grpo.num_iterations", "2", "--grpo.max_steps", "3",
                      "--run.train_examples", "8", "--run.eval_examples", "0", "--run.tensorboard", "false",
                      "--grpo.warmup_steps", "0", "--grpo.learning_rate", "0.01", "--grpo.beta", "0",
                      "--run.output_dir", str(tmp_path / "run"), "--run.save_every", "1"])
    assert "prior" not in cfg.to_dict() and "mask_scheme" not in cfg.to_dict()["estimator"]
    summary = stp.trainer.train(cfg)
    rows = stp.trainer.read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert summary["method"] == "reinforce-d1" and [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["logp"] is not None and r["logp"] < 0 and r["loss"] is not None for r in rows)
    assert rows[0]["anchor_fraction"] == 0
