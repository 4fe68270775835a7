"""The command-line tools as a user meets them: ``--help`` and a flag without its value exit through argparse
(status 0 and 2, no traceback); Ctrl-C before training starts says what happens next; resuming says what it
resumes (or that there is nothing to resume) and keeps the run's wall time; the held-out reward reaches
TensorBoard and progress.png."""

from __future__ import annotations

import importlib
import json

import pytest
import torch

import stp.data_order
import stp.trainer
from stp.config import parse_args
from tests._trainer_entry import toy_task_for

CLIS = {  # module: a flag that takes a value
    "stp.train": "--grpo.beta",
    "stp.config": "--grpo.beta",
    "stp.eval": "--task",
    "stp.prior": "--task",
    "stp.pretrain": "--steps",
    "stp.variance": "--task",
}


@pytest.mark.parametrize("module", list(CLIS))
def test_help_exits_0_and_a_flag_without_value_exits_2(module, capsys):
    main = importlib.import_module(module).main
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr()
    assert "usage:" in out.out and "Traceback" not in out.err
    with pytest.raises(SystemExit) as info:
        main([CLIS[module]])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {CLIS[module]}" in err and "expected one argument" in err and "Traceback" not in err
    assert err.startswith("usage: python -m " + module.split(".")[0] + "." + module.split(".")[1])


def test_ctrl_c_before_training_says_what_next(tmp_path, monkeypatch, capsys):
    import stp.models
    from stp.train import main

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(stp.models, "load", interrupted)
    assert main(["--model.name_or_path", "tiny", "--run.output_dir", str(tmp_path / "run")]) == 130
    err = capsys.readouterr().err
    assert "interrupted; no checkpoint was written yet" in err and "Traceback" not in err


TINY = ["--model.name_or_path", "tiny", "--rollout.gen_length", "16", "--rollout.block_length", "16",
        "--rollout.steps", "8", "--grpo.prompts_per_step", "2", "--grpo.num_generations", "2",
        "--grpo.num_iterations", "1", "--estimator.num_draws", "1", "--run.train_examples", "8",
        "--run.eval_examples", "2", "--grpo.warmup_steps", "0", "--grpo.max_steps", "2", "--run.tensorboard", "true"]


def test_resume_messages_heldout_in_tensorboard_and_wall_time(tmp_path, monkeypatch, capsys):
    torch.set_num_threads(1)
    monkeypatch.setattr(stp.data_order, "task_for", toy_task_for(stp.data_order.task_for))
    out = tmp_path / "run"
    first = stp.trainer.train(parse_args([*TINY, "--run.output_dir", str(out), "--run.resume"]))
    err = capsys.readouterr().err
    assert f"--run.resume: no complete checkpoint in {out} (the directory does not exist); training from " in err

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    got = [(e.step, e.value) for e in events.Scalars("eval/reward")]
    assert got == [(0, pytest.approx(first["reward_before"])), (2, pytest.approx(first["reward_after"]))]
    assert (out / "progress.png").stat().st_size > 10_000

    again = stp.trainer.train(parse_args([*TINY, "--run.output_dir", str(out), "--run.resume"]))
    err = capsys.readouterr().err
    assert f"the run in {out} already finished (step 2 of 2)" in err
    assert again["steps"] == 2 and again["reward_after"] == first["reward_after"]
    # The wall time counts the first process (up to its last checkpoint) plus this one: not overwritten.
    state = json.loads(sorted((out / "checkpoints").glob("step-*"))[-1].joinpath("state.json").read_text())
    assert again["wall_seconds"] > state["wall_seconds"] >= first["train_seconds"] > 0
    assert json.loads((out / "summary.json").read_text())["wall_seconds"] == again["wall_seconds"]


def test_progress_plot_marks_the_heldout_reward_and_caps_slow_steps(tmp_path):
    from stp.metrics import plot

    rows = [{"step": s, "iteration": (s - 1) % 2, "reward_mean": 0.1 * s, "time_rollout": 1.0, "time_scoring": 0.5,
             "time_update": 100.0 if s == 3 else 0.2} for s in range(1, 7)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    captured = {}
    real = plt.Figure.savefig

    def keep(fig, *args, **kwargs):
        captured["fig"] = fig
        return real(fig, *args, **kwargs)

    plt.Figure.savefig = keep
    try:
        plot(tmp_path / "metrics.jsonl", tmp_path / "p.png", title="tiny: stp", before=0.2, after=0.5, last_step=6)
    finally:
        plt.Figure.savefig = real
    fig = captured["fig"]
    top, bottom = fig.axes
    assert fig._suptitle.get_text() == "tiny: stp"
    heldout = [line for line in top.lines if line.get_label() == "held-out reward"][0]
    assert list(heldout.get_xdata()) == [0, 6] and list(heldout.get_ydata()) == [0.2, 0.5]
    assert bottom.get_ylim()[1] < 10  # the 100 s step does not set the scale
    assert "slower: step 3" in " ".join(t.get_text() for t in bottom.texts)
    assert not any("/ mu" in t.get_text() for t in bottom.get_legend().get_texts())
