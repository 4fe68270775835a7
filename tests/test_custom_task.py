"""Your own task: TRL-form reward functions, datasets with a prompt column, their command-line flags and errors, the
built-in tasks through the same call, reasoning-gym, the trackers, and the README example run end to end."""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import pytest
import torch

import stp.trainer
from stp import Trainer
from stp.config import ConfigError, parse_args, resolve
from stp.metrics import total_reward
from stp.tasks import DataError, get_task
from stp.tasks.custom import FunctionTask, load_reward, load_rows, reasoning_gym_reward, rows_of
from stp.tasks.reward_funcs import RewardFuncError, check_columns, score

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--model.name_or_path", "tiny", "--rollout.gen_length", "16", "--rollout.block_length", "16",
        "--rollout.steps", "8", "--grpo.prompts_per_step", "2", "--grpo.num_generations", "2",
        "--grpo.num_iterations", "1", "--estimator.num_draws", "1", "--grpo.max_steps", "2", "--run.eval_examples",
        "2", "--grpo.warmup_steps", "0", "--run.device", "cpu"]


# Reward functions written exactly as TRL's GRPOTrainer documentation writes them: a standard-format one, a
# conversational one (each completion a list holding one assistant message) and one reading a dataset column.
def reward_len(completions, **kwargs):
    return [-abs(20 - len(completion)) for completion in completions]


def format_reward_func(completions, **kwargs):
    pattern = r"^<think>.*?</think><answer>.*?</answer>$"
    completion_contents = [completion[0]["content"] for completion in completions]
    matches = [re.match(pattern, content) for content in completion_contents]
    return [1.0 if match else 0.0 for match in matches]


def reward_func(completions, ground_truth, **kwargs):
    matches = [re.search(r"\\boxed\{(.*?)\}", completion) for completion in completions]
    contents = [match.group(1) if match else "" for match in matches]
    return [1.0 if c == gt else 0.0 for c, gt in zip(contents, ground_truth)]


def only_long(completions, **kwargs):
    """Not applicable (None) to completions shorter than 5 characters."""
    return [None if len(c) < 5 else 1.0 for c in completions]


def test_trl_form_functions_work_unchanged():
    rows = [{"prompt": "a", "ground_truth": "4"}, {"prompt": "b", "ground_truth": "5"}]
    texts = [r"so \boxed{4}", "x" * 20]
    task = FunctionTask(funcs=(reward_len, reward_func, only_long), weights=(0.5, 2.0, 1.0))
    values = task.batch_rewards(texts, rows)
    assert values[0][:2] == [-8.0, 1.0] and values[1][:2] == [0.0, 0.0]
    assert values[0][2] == 1.0 and values[1][2] == 1.0
    assert task.reward_names() == ["reward_len", "reward_func", "only_long"]
    # None = not applicable: left out of the total (TRL's nansum); weights multiply each function's value
    v = score([only_long, reward_len], ["abc", "abcdefgh"], [{"prompt": "p"}, {"prompt": "q"}])
    assert math.isnan(v[0][0]) and v[1][0] == 1.0
    totals = total_reward(torch.tensor(v), (3.0, 1.0))
    assert totals.tolist() == [-17.0, 3.0 - 12.0]

    chat = FunctionTask(funcs=(format_reward_func,), chat=True)
    good = "<think>x</think><answer>y</answer>"
    assert chat.batch_rewards([good, "no"], [{"prompt": [{"role": "user", "content": "q"}]}] * 2) == [[1.0], [0.0]]


@pytest.mark.parametrize("name", ["gsm8k", "math", "countdown", "sudoku"])
@pytest.mark.parametrize("d1_compat", [False, True])
def test_builtin_tasks_score_through_the_same_call_bit_for_bit(name, d1_compat):
    task = get_task(name, d1_compat=d1_compat)
    examples = {"gsm8k": {"question": "q", "answer": "18"}, "math": {"problem": "p", "answer": "\\frac{1}{2}"},
                "countdown": {"nums": [2, 3, 4], "target": 5}, "sudoku": {"puzzle": "4123030034121034",
                                                                          "solution": "4123342121433412"}}
    ex = examples[name]
    texts = ["<reasoning>\nx\n</reasoning>\n<answer>\n18\n</answer>\n", "<answer>\\boxed{0.5}</answer>",
             "<answer>\n2*4-3\n</answer>", "<answer>\n4123342121433412\n</answer>", "", "junk 12"]
    via_trl = task.batch_rewards(texts, [ex] * len(texts))
    direct = [list(task.rewards(t, ex).values()) for t in texts]
    assert via_trl == direct
    assert task.reward_names() == [fn.__name__ for fn in task.reward_functions]


def test_bad_column_names_function_file_and_line():
    with pytest.raises(RewardFuncError) as e:
        check_columns([reward_len, reward_func], ["prompt", "answer"], "run.dataset 'x.jsonl'")
    msg = str(e.value)
    assert "reward_func" in msg and "test_custom_task.py:" in msg and "'ground_truth'" in msg
    assert "columns: answer" in msg and "run.dataset 'x.jsonl'" in msg
    line = int(re.search(r"test_custom_task\.py:(\d+)", msg).group(1))
    assert Path(__file__).read_text().splitlines()[line - 1].startswith("def reward_func(")
    check_columns([reward_len, reward_func], ["prompt", "ground_truth"], "x")  # fine


def test_bad_return_values_are_named():
    def wrong_length(completions, **kwargs):
        return [1.0]

    def a_string(completions, **kwargs):
        return ["high"] * len(completions)

    with pytest.raises(RewardFuncError, match=r"wrong_length \(.*test_custom_task\.py:\d+\) returned list of 1"):
        score([wrong_length], ["a", "b"], [{}, {}])
    with pytest.raises(RewardFuncError, match="a_string .* returned 'high' for sample 0"):
        score([a_string], ["a"], [{}])


def test_load_reward_module_file_and_errors(tmp_path, monkeypatch):
    good = tmp_path / "my_rewards.py"
    good.write_text("def shortness(completions, **kwargs):\n    return [1.0 / (1 + len(c)) for c in completions]\n")
    fn = load_reward(f"{good}:shortness")
    assert fn(["ab"]) == [1 / 3]
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load_reward("my_rewards:shortness")(["a"]) == [0.5]
    with pytest.raises(RewardFuncError, match=r"module 'my_rewards' .*has no function 'lenght'; its functions: "
                                              r"shortness"):
        load_reward("my_rewards:lenght")
    with pytest.raises(RewardFuncError, match="module 'no_such_module_xyz' not found"):
        load_reward("no_such_module_xyz:f")
    (tmp_path / "needs_pkg.py").write_text("import no_such_package_xyz\n")
    with pytest.raises(RewardFuncError, match="module 'needs_pkg' imports 'no_such_package_xyz', which is not"):
        load_reward("needs_pkg:f")
    broken = tmp_path / "broken.py"
    broken.write_text("def f(completions, **kwargs):\n    return [1.0 for c in completions\n")
    with pytest.raises(RewardFuncError, match=r"broken\.py:2:\d+: .*never closed"):
        load_reward(f"{broken}:f")
    with pytest.raises(RewardFuncError, match="file .*missing.py' not found"):
        load_reward(str(tmp_path / "missing.py") + ":f")
    with pytest.raises(ConfigError, match="run.reward.*MODULE:FUNCTION"):
        parse_args(["--run.reward", "no_colon"])


def test_datasets_from_save_to_disk_files_and_lists(tmp_path):
    datasets = pytest.importorskip("datasets")  # the data extra; installed by the test extra
    rows = [{"prompt": f"q{i}", "ground_truth": str(i)} for i in range(6)]
    ds = datasets.Dataset.from_list(rows)
    ds.save_to_disk(str(tmp_path / "one"))
    assert load_rows(str(tmp_path / "one"), "train") == rows
    datasets.DatasetDict({"train": ds, "test": ds.select(range(2))}).save_to_disk(str(tmp_path / "two"))
    assert len(load_rows(str(tmp_path / "two"), "test")) == 2
    with pytest.raises(DataError, match="no split 'validation'; splits: train, test"):
        load_rows(str(tmp_path / "two"), "validation")
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert load_rows(str(tmp_path / "d.jsonl"), "train", n=3) == rows[:3]
    (tmp_path / "d.csv").write_text("prompt,ground_truth\nq0,0\nq1,1\n")
    assert load_rows(str(tmp_path / "d.csv"), "train")[1]["prompt"] == "q1"
    ds.to_parquet(str(tmp_path / "d.parquet"))
    assert load_rows(str(tmp_path / "d.parquet"), "train") == rows
    datasets.Dataset.from_list([{"question": "q"}]).save_to_disk(str(tmp_path / "noprompt"))
    with pytest.raises(DataError, match="no 'prompt' column; columns: question"):
        load_rows(str(tmp_path / "noprompt"), "train")
    with pytest.raises(DataError, match="row 2: field 'prompt'"):
        rows_of([{"prompt": "ok"}, {"prompt": 3}], "train_dataset")
    with pytest.raises(DataError, match="unknown data file type '.txt'"):
        (tmp_path / "d.txt").write_text("x")
        load_rows(str(tmp_path / "d.txt"), "train")


def test_reasoning_gym_rows_and_verifier():
    pytest.importorskip("reasoning_gym")  # the reasoning_gym extra; installed by the test extra
    rows = load_rows("reasoning_gym:leg_counting", "train", n=3, seed=1)
    assert len(rows) == 3 and rows[0]["prompt"][0]["role"] == "user"
    assert rows != load_rows("reasoning_gym:leg_counting", "test", n=3, seed=1)  # its own seed per split
    answers = [[{"role": "assistant", "content": f"<answer>{r['answer']}</answer>"}] for r in rows]
    got = reasoning_gym_reward(answers, [r["answer"] for r in rows], [r["metadata"] for r in rows])
    assert got == [1.0, 1.0, 1.0]
    wrong = reasoning_gym_reward(["<answer>-1</answer>", "none"], [rows[0]["answer"]] * 2, [rows[0]["metadata"]] * 2)
    assert wrong == [0.0, 0.0]
    with pytest.raises(DataError, match="reasoning_gym:no_such_generator"):
        load_rows("reasoning_gym:no_such_generator", "train", n=2)


def test_config_flags():
    cfg = parse_args(["--run.reward", "a:f", "--run.reward", "b.py:g,c:h", "--run.reward_weights", "1,0.5,2",
                      "--run.dataset", "d", "--run.eval_split", "test"])
    assert cfg.run.reward == ("a:f", "b.py:g", "c:h") and cfg.run.reward_weights == ("1", "0.5", "2")
    with pytest.raises(ConfigError, match="run.reward_weights.*1 finite numbers"):
        parse_args(["--run.reward", "a:f", "--run.reward_weights", "1,2"])
    with pytest.raises(ConfigError, match="run.eval_split.*without run.dataset"):
        parse_args(["--run.eval_split", "test"])
    with pytest.raises(ConfigError, match="run.report_to"):
        parse_args(["--run.report_to", "comet"])


def test_missing_tracker_package_is_refused(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match="run.report_to='wandb'.*wandb is not"):
        parse_args(["--run.report_to", "wandb"]).check_environment()


@pytest.mark.slow
def test_command_line_run_with_saved_dataset_and_reward_file(tmp_path, capsys):
    datasets = pytest.importorskip("datasets")
    from stp.train import main

    rows = [{"prompt": [{"role": "user", "content": f"sudoku {i:016d}"}], "target": str(i % 4 + 1)}
            for i in range(8)]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "data"))
    (tmp_path / "rw.py").write_text(
        "def has_target(completions, target, **kwargs):\n"
        "    return [float(t in c[0]['content']) for c, t in zip(completions, target)]\n\n\n"
        "def length(completions, **kwargs):\n"
        "    return [len(c[0]['content']) / 16 for c in completions]\n")
    out = tmp_path / "run"
    rc = main([*TINY, "--run.dataset", str(tmp_path / "data"), "--run.reward", f"{tmp_path / 'rw.py'}:has_target",
               "--run.reward", f"{tmp_path / 'rw.py'}:length", "--run.reward_weights", "1,0.25",
               "--run.output_dir", str(out), "--run.report_to", "none"])
    assert rc == 0, capsys.readouterr().err
    rows_out = stp.trainer.read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows_out] == [1, 2]
    r = rows_out[0]
    assert r["reward_mean"] == pytest.approx(r["reward/has_target_mean"] + 0.25 * r["reward/length_mean"], abs=1e-6)
    assert not (out / "tensorboard").exists()  # report_to none
    # a reward function naming a column the data lacks: exit 2 before any model loads, naming all of it
    (tmp_path / "bad.py").write_text("\n\ndef needs(completions, solution, **kwargs):\n    return [0.0]\n")
    rc = main([*TINY, "--run.dataset", str(tmp_path / "data"), "--run.reward", f"{tmp_path / 'bad.py'}:needs",
               "--run.output_dir", str(tmp_path / "bad")])
    err = capsys.readouterr().err
    assert rc == 2 and re.search(r"needs \(.*bad\.py:3\) takes column 'solution'.*columns: target", err), err


def readme_example() -> str:
    """The Python block of README's "Your own task" section."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## Your own task"):]
    section = section[:section.index("\n## ", 1)]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.slow
def test_readme_example_runs(tmp_path, monkeypatch, capsys):
    """README's example as written (the tiny model's cached checkpoint, 10 steps) in a scratch directory; the reward
    function is a TRL-form one reading a column. On a quiet 2-core CPU it takes well under 2 minutes."""
    code = readme_example()
    assert "def keeps_givens(completions, puzzle, **kwargs):" in code
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["readme"])
    exec(compile(code, "README.md", "exec"), {"__name__": "__readme__"})  # noqa: S102 - the project's own README
    printed = capsys.readouterr().out
    before, after = map(float, re.search(r"held-out reward ([\d.]+) -> ([\d.]+)", printed).groups())
    summary = json.loads((tmp_path / "runs" / "own" / "summary.json").read_text())
    assert summary["steps"] == 10 and summary["reward_before"] == pytest.approx(before, abs=1e-3)
    assert summary["task"] == "own: keeps_givens"
    assert 0 <= before <= 1 and 0 <= after <= 1
    rows = stp.trainer.read_metrics(tmp_path / "runs" / "own" / "metrics.jsonl")
    assert "reward/keeps_givens_mean" in rows[0]


def test_trainer_api_checks_before_loading(tmp_path):
    cfg = resolve("tiny", overrides={"run.output_dir": str(tmp_path)})
    with pytest.raises(RewardFuncError, match="takes column 'ground_truth'"):
        Trainer(cfg, reward_funcs=[reward_func], train_dataset=[{"prompt": "x"}, {"prompt": "y"}]).train()
    with pytest.raises(RewardFuncError, match="2 reward weights for 1 reward functions"):
        Trainer(cfg, reward_funcs=[reward_len], reward_weights=[1, 2], train_dataset=[{"prompt": "x"}]).train()
    with pytest.raises(DataError, match="train_dataset: row 1: field 'prompt'"):
        Trainer(cfg, reward_funcs=[reward_len], train_dataset=[{"text": "x"}]).train()
