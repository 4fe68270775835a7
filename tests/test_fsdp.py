"""FSDP2 on two CPU processes (gloo) through ``accelerate launch``, against one process.

What this torch / accelerate can do on CPU, measured here:
- torch 2.x's FSDP2 (``fully_shard``) runs on CPU over gloo;
- accelerate 1.x does not apply it there: under ``configs/accelerate/fsdp_cpu.yaml`` its state picks MULTI_CPU (DDP)
  and leaves the FSDP plugin out (``test_accelerate_ignores_fsdp_on_cpu``; ``stp.train`` warns);
- with the state set to FSDP after initialisation (tests/_fsdp_entry.py), accelerate's own FSDP2 code prepares the
  trainer's module on CPU, and the run matches one process (``test_fsdp_two_processes_match_one``).
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

import stp.data_order
import stp.trainer
from stp import fsdp
from stp.config import parse_args
from tests._trainer_entry import toy_task_for

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "accelerate" / "fsdp_cpu.yaml"
FLAGS = ["--model.name_or_path", "tiny", "--rollout.gen_length", "16", "--rollout.block_length", "16",
         "--rollout.steps", "8", "--grpo.prompts_per_step", "4", "--grpo.num_generations", "2",
         "--grpo.num_iterations", "2", "--estimator.num_draws", "2", "--run.train_examples", "32",
         "--run.eval_examples", "4", "--run.eval_every", "2", "--run.tensorboard", "false", "--grpo.warmup_steps",
         "0", "--grpo.learning_rate", "0.01"]


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIG), "--main_process_port",
           str(_free_port()), "-m", *args]
    return subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_accelerate_ignores_fsdp_on_cpu():
    """The exact reason a plain ``accelerate launch`` cannot shard on CPU: accelerate chooses MULTI_CPU (gloo DDP)
    and builds no FSDP plugin, although the launcher exported the FSDP config."""
    res = _launch("tests._fsdp_entry", "--state", timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    found = sorted(re.findall(r"accelerate state: rank (\d)/(\d): (\w+), backend (\w+), fsdp plugin (\w+), "
                              r"ACCELERATE_USE_FSDP=(true|false|True|False|1|0)", res.stdout))  # lines may run together
    assert found == [(r, "2", "MULTI_CPU", "gloo", "False", "true") for r in ("0", "1")], res.stdout


def test_check_warns_when_fsdp_was_ignored_and_refuses_fsdp1(monkeypatch, capsys):
    from accelerate.utils import DistributedType

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    fsdp.check(SimpleNamespace(distributed_type=DistributedType.MULTI_CPU, is_main_process=True))
    assert "asks for FSDP but accelerate chose MULTI_CPU" in capsys.readouterr().err
    with pytest.raises(ValueError, match="fsdp_version: 2"):
        fsdp.check(SimpleNamespace(distributed_type=DistributedType.FSDP, is_fsdp2=False, is_main_process=True))
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "false")
    fsdp.check(SimpleNamespace(distributed_type=DistributedType.MULTI_CPU, is_main_process=True))
    assert capsys.readouterr().err == ""


def test_helpers_are_no_ops_without_fsdp():
    model = torch.nn.Linear(3, 2)
    acc = SimpleNamespace(state=SimpleNamespace())
    assert not fsdp.is_sharded(model)
    with fsdp.full_parameters(acc, model):
        pass
    tensors = dict(model.named_parameters())
    assert all(a is not None and torch.equal(a, tensors[k]) for k, a in fsdp.full_tensors(tensors).items())
    assert fsdp.full_lora_state(model, model) is None
    full = torch.randn(2, 3)
    fsdp.copy_into(model.weight, full)
    assert torch.equal(model.weight.detach(), full)


@pytest.mark.slow
def test_fsdp_two_processes_match_one(tmp_path, monkeypatch):
    """4 optimizer steps (2 rollouts, held-out evaluation every 2 steps) in one process, against FSDP2 over two CPU
    processes run as 2 steps + resume to 4 (so saving and loading sharded checkpoints is part of the run).

    The processes share the same sample ids and noise seeds as one process, FSDP averages gradients over the
    processes as DDP does, and each process weights its token-mean loss by its share of the step's loss tokens
    (``stp.trainer._token_weights``: rollout 1's completions end at different lengths on the two processes, where
    an unweighted mean of the two token means differed by about 1% at step 3), so every metric agrees to float
    tolerance, the final weights and AdamW moments too."""
    monkeypatch.setattr(stp.data_order, "task_for", toy_task_for(stp.data_order.task_for))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = tmp_path / "one"
        stp.trainer.train(parse_args([*FLAGS, "--grpo.max_steps", "4", "--run.output_dir", str(one)]))
    finally:
        torch.set_num_threads(threads)

    two = tmp_path / "two"
    for extra in (["--grpo.max_steps", "2"], ["--grpo.max_steps", "4", "--run.resume"]):
        res = _launch("tests._fsdp_entry", *FLAGS, *extra, "--run.output_dir", str(two), "--run.device", "cpu")
        assert res.returncode == 0, res.stderr[-4000:]
        # really sharded: accelerate's FSDP2 path, decoder layers as units, DTensor parameters on both ranks
        proof = re.findall(r"fsdp entry: rank (\d): FSDP, is_fsdp2=True, (\d+) FSDP units, parameter types "
                           r"\['DTensor'\]", res.stderr)
        assert sorted(r for r, _ in proof) == ["0", "1"] and all(int(n) == 5 for _, n in proof), res.stderr[-3000:]
        assert "accelerate chose" not in res.stderr

    r1, r2 = stp.trainer.read_metrics(one / "metrics.jsonl"), stp.trainer.read_metrics(two / "metrics.jsonl")
    assert [r["step"] for r in r2] == [r["step"] for r in r1] == [1, 2, 3, 4]
    for a, b in zip(r1, r2):
        assert (a["rollout"], a["iteration"]) == (b["rollout"], b["iteration"])
        for key in ("reward_mean", "reward_std", "nfe", "completion_tokens", "loss", "kl", "ratio", "clip_fraction",
                    "grad_norm"):
            assert b[key] == pytest.approx(a[key], abs=1e-4, rel=1e-3), (a["step"], key)
    # held-out evaluation under FSDP (main process only, weights gathered on both): step 2 of the first FSDP run
    # was its last step, so the mid-run evaluation exists in the one-process run only; the final ones compare.
    s1 = json.loads((one / "summary.json").read_text())
    s2 = json.loads((two / "summary.json").read_text())
    assert s2["num_processes"] == 2 and s2["steps"] == 4
    assert s2["reward_after"] == pytest.approx(s1["reward_after"], abs=1e-6)

    ck1, ck2 = stp.trainer.last_checkpoint(one), stp.trainer.last_checkpoint(two)
    w1, w2 = load_file(str(ck1 / "trainable.safetensors")), load_file(str(ck2 / "trainable.safetensors"))
    assert set(w1) == set(w2) and len(w1) > 0
    for k in w1:  # whole tensors, not shards
        assert w2[k].shape == w1[k].shape, k
        torch.testing.assert_close(w2[k], w1[k], atol=1e-3, rtol=0, msg=k)
    o1, o2 = load_file(str(ck1 / "optimizer.safetensors")), load_file(str(ck2 / "optimizer.safetensors"))
    assert set(o1) == set(o2)
    for k in o1:
        torch.testing.assert_close(o2[k], o1[k], atol=1e-6, rtol=1e-3, msg=k)
    # the final adapter holds the whole LoRA tensors, equal to the checkpoint's
    adapter = load_file(str(two / "adapter" / "adapter_model.safetensors"))
    by_name = {k.replace(".default.", "."): v for k, v in w2.items()}
    assert set(adapter) == set(by_name)
    assert all(torch.equal(adapter[k], by_name[k]) for k in adapter)
