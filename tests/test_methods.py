"""The method interface: the registry, per-method settings, and the smallest complete method of
docs/architecture.md trained end to end by the shared loop (nothing else changed to add it)."""

from __future__ import annotations

import json
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
    exec(compile(code, "docs/architecture.md", "exec", dont_inherit=True), module.__dict__)  # no __future__ of ours
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


# ------------------------------------------------------------------------------------- stp: the prior's free_rule


def _stp_config(path: Path, *flags: str):
    return parse_args(["--method", "stp", "--model.name_or_path", "tiny", "--rollout.gen_length", "16",
                       "--rollout.block_length", "16", "--rollout.steps", "8", "--prior.rho", "0.5",
                       "--prior.path", str(path), *flags])


_MAIN = types.SimpleNamespace(is_main_process=True, wait_for_everyone=lambda: None)
_PROMPTS = ["sudoku 4123030034121034", "countdown 44 19 35 -> 98"]


def test_free_rule_is_a_setting_of_the_stp_method_only(tmp_path):
    from stp.config import ConfigError

    cfg = _stp_config(tmp_path / "p.jsonl")
    assert cfg.prior.free_rule == "inside" and cfg.to_dict()["prior"]["free_rule"] == "inside"
    assert _stp_config(tmp_path / "p.jsonl", "--prior.free_rule", "inclusive").prior.free_rule == "inclusive"
    with pytest.raises(ConfigError, match="prior.free_rule is a setting of method 'stp' only"):
        parse_args(["--method", "d1", "--prior.free_rule", "inclusive"])
    assert "prior" not in parse_args(["--method", "d1"]).to_dict()


@pytest.fixture(scope="module")
def inclusive_priors(tmp_path_factory):
    """A prior file built by the stp method with prior.free_rule=inclusive (tiny model, random weights)."""
    from stp.methods.grpo_stp import ensure_priors
    from stp.models.tiny import build_tiny

    torch.set_num_threads(1)
    path = tmp_path_factory.mktemp("priors") / "priors.jsonl"
    records = ensure_priors(build_tiny(seed=0), _stp_config(path, "--prior.free_rule", "inclusive"), _PROMPTS, _MAIN)
    return path, records


def test_stp_builds_priors_with_its_free_rule_and_reuses_only_a_matching_file(inclusive_priors):
    from stp.config import ConfigError
    from stp.methods.grpo_stp import ensure_priors
    from stp.prior import load_priors

    path, records = inclusive_priors
    assert len(records) == 2 and all(r["settings"]["free_rule"] == "inclusive" for r in records.values())
    assert {pid: r["settings"]["free_rule"] for pid, r in load_priors(path).items()} == dict.fromkeys(records,
                                                                                                     "inclusive")
    # Reused as is (no model: nothing may be built) with the same rule ...
    again = ensure_priors(None, _stp_config(path, "--prior.free_rule", "inclusive"), _PROMPTS, _MAIN)
    assert again == records
    # ... and refused with the other one, naming the file, its value and the configured one.
    with pytest.raises(ConfigError) as info:
        ensure_priors(None, _stp_config(path), _PROMPTS, _MAIN)
    msg = str(info.value)
    assert str(path) in msg and "built with free_rule='inclusive'" in msg and "prior.free_rule='inside'" in msg
    assert info.value.field == "prior.free_rule"
    assert path.read_text().count("\n") == 2  # nothing appended


def test_a_prior_file_without_free_rule_counts_as_inclusive(inclusive_priors, tmp_path):
    from stp.config import ConfigError
    from stp.methods.grpo_stp import ensure_priors

    path, _ = inclusive_priors
    old = tmp_path / "old.jsonl"
    lines = []
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        del rec["settings"]["free_rule"]  # as written before the setting existed
        lines.append(json.dumps(rec) + "\n")
    old.write_text("".join(lines))
    got = ensure_priors(None, _stp_config(old, "--prior.free_rule", "inclusive"), _PROMPTS, _MAIN)
    assert len(got) == 2
    with pytest.raises(ConfigError) as info:
        ensure_priors(None, _stp_config(old), _PROMPTS, _MAIN)
    msg = str(info.value)
    assert str(old) in msg and "free_rule='inclusive' (not recorded" in msg and "prior.free_rule='inside'" in msg
