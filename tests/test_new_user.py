"""What a new user meets first: evaluating and exporting a run, the held-out reward's scale, progress, errors in
their own reward functions, install lines, help texts (each test failed before its fix)."""

import json
import math
import os
import re
import shlex
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import stp.models  # noqa: E402
from stp import eval as stp_eval  # noqa: E402
from stp import export as stp_export  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


_TINY: dict = {}


def _tiny():
    """The random tiny model, built once for the tests that only read it (eval mode, no adapter)."""
    if "lm" not in _TINY:
        _TINY["lm"] = stp.models.load("tiny")
    return _TINY["lm"]


def _adapter(directory: Path) -> Path:
    """A LoRA adapter of the random tiny model with non-zero B (peft starts B at 0: a merge would change nothing)."""
    from peft import LoraConfig, get_peft_model

    lm = stp.models.load("tiny")
    torch.manual_seed(0)
    peft_model = get_peft_model(lm.model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.2)
    peft_model.save_pretrained(str(directory))
    return directory


def _fake_run(tmp_path: Path, **rollout) -> Path:
    """A run directory as `python -m stp.train` leaves it (config.yaml + adapter/), on the random tiny model."""
    from stp.config import resolve

    overrides = {"model.name_or_path": "tiny", "run.task": "countdown", **{f"rollout.{k}": v for k, v in
                                                                          rollout.items()}}
    run = tmp_path / "runs" / "mine"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(resolve("tiny", overrides=overrides).to_yaml())
    _adapter(run / "adapter")
    return run


# ------------------------------------------------------------------------------------------- 1: eval of a run


def test_eval_adapter_takes_the_runs_settings_and_warns_on_a_differing_flag(tmp_path, capsys):
    run = _fake_run(tmp_path, gen_length=32, block_length=16, steps=8)
    out = tmp_path / "a.jsonl"
    assert stp_eval.main(["--adapter", str(run / "adapter"), "--limit", "2", "--output", str(out),
                          "--no-progress"]) == 0
    settings = json.loads(stp_eval.summary_path(out).read_text())["settings"]
    # The run's rollout shape and task, not the d1 defaults (gen 256, block 32, steps 128).
    assert (settings["gen_length"], settings["block_length"], settings["steps"]) == (32, 16, 8)
    assert settings["task"] == "countdown" and settings["model"] == "tiny"
    assert settings.get("prompt_format") == "compact" and settings["source"] == "generated"
    err = capsys.readouterr().err
    assert "warning" not in err and f"from {(run / 'config.yaml').resolve()}" in err

    # --run DIR is --adapter DIR/adapter; an explicit flag that differs is used, with a warning naming both values.
    out2 = tmp_path / "b.jsonl"
    assert stp_eval.main(["--run", str(run), "--gen-length", "64", "--limit", "1", "--output", str(out2),
                          "--no-progress"]) == 0
    settings = json.loads(stp_eval.summary_path(out2).read_text())["settings"]
    assert (settings["gen_length"], settings["steps"]) == (64, 32)  # steps follow the new length (gen / 2)
    err = capsys.readouterr().err
    assert "warning: --gen-length 64 differs from the run's rollout.gen_length = 32" in err


def test_eval_without_a_run_keeps_the_d1_defaults(tmp_path, capsys):
    args = stp_eval.build_parser().parse_args(["--model", "tiny", "--task", "gsm8k"])
    stp_eval._run_defaults(args)
    assert (args.gen_length, args.block_length, args.temperature, args.d1_compat) == (256, 32, 0.0, False)
    assert args.steps is None  # gen_length / 2 later, as d1


def test_model_given_an_adapter_or_a_run_says_which_flag(tmp_path, capsys):
    run = _fake_run(tmp_path)
    for flag in (str(run / "adapter"), str(run)):
        with pytest.raises(SystemExit) as e:
            stp_eval.main(["--model", flag, "--task", "sudoku"])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert ("--adapter" if flag.endswith("adapter") else "--run") in err.split("pass it as")[1]
        with pytest.raises(SystemExit):
            stp_export.main(["--model", flag, "--out", str(tmp_path / "x")])
        assert "--adapter" in capsys.readouterr().err.split("error:")[1]


# ------------------------------------------------------------------------------------------------- 2: export


def test_export_reads_pretrained_names_and_the_adapters_base(tmp_path, monkeypatch):
    """`--model pretrained:TASK` is resolved once and loaded from its directory (it used to be passed on raw);
    without --model the base comes from the adapter's run."""
    import stp.pretrain

    base = tmp_path / "base"
    stp.models.load("tiny").save(str(base))
    monkeypatch.setattr(stp.pretrain, "resolve_model_name", lambda name, **kw: str(base))
    out = tmp_path / "out"
    assert stp_export.main(["--model", "pretrained:sudoku", "--out", str(out), "--quiet"]) == 0
    ids = torch.tensor([[5, 9, 11, 2, 2]])
    with torch.no_grad():
        assert torch.equal(stp.models.load(str(out)).model(ids).logits, stp.models.load(str(base)).model(ids).logits)

    run = _fake_run(tmp_path)
    assert stp_export.adapter_base(run / "adapter") == "tiny"  # config.yaml beside the adapter
    (run / "config.yaml").unlink()
    cfg = json.loads((run / "adapter" / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(base)
    (run / "adapter" / "adapter_config.json").write_text(json.dumps(cfg))
    assert stp_export.adapter_base(run / "adapter") == str(base)  # else adapter_config.json's
    out2 = tmp_path / "out2"
    assert stp_export.main(["--adapter", str(run / "adapter"), "--out", str(out2), "--quiet"]) == 0
    want = stp.models.merge_adapter(stp.models.load(str(base)), run / "adapter")
    with torch.no_grad():
        assert torch.allclose(stp.models.load(str(out2)).model(ids).logits, want.model(ids).logits, atol=1e-5)


def _readme_block(heading: str) -> list[str]:
    """The commands of the first bash block after ``heading`` in the README."""
    part = README.split(heading, 1)[1]
    block = part.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line.split("#")[0].strip() for line in block.splitlines() if line.strip()]


@pytest.mark.slow
def test_readme_evaluate_and_export_recipe(tmp_path, monkeypatch, capsys):
    """The README's evaluate-and-export commands, as written (only --limit lowered), on a short default run: stp.eval
    reproduces the run's own held-out reward and accuracy (summary.json), and the export holds the merged model, its
    adapter naming the base it was trained from."""
    from stp import train as stp_train

    monkeypatch.chdir(tmp_path)
    n = 8
    assert stp_train.main(["--grpo.max_steps", "2", "--run.eval_examples", str(n), "--run.report_to", "none"]) == 0
    summary = json.loads((tmp_path / "runs" / "tiny" / "summary.json").read_text())
    assert json.loads((tmp_path / "runs/tiny/adapter/adapter_config.json").read_text())[
        "base_model_name_or_path"] == "pretrained:sudoku"
    commands = _readme_block("### Evaluate and export a run")
    assert [c.split()[:3] for c in commands] == [["python", "-m", "stp.eval"], ["python", "-m", "stp.export"]]
    evaluate = shlex.split(commands[0].replace("--limit 256", f"--limit {n}"))[3:]
    capsys.readouterr()
    assert stp_eval.main(evaluate + ["--no-progress"]) == 0
    printed = capsys.readouterr().out
    result = json.loads(next(Path("eval_outputs").glob("*.summary.json")).read_text())
    assert result["n"] == n
    assert result["mean_reward"] == pytest.approx(summary["reward_after"], abs=1e-9)
    assert result["accuracy"] == pytest.approx(summary["accuracy_after"], abs=1e-9)
    assert f"mean reward {summary['reward_after']:.4f}" in printed
    assert stp_export.main(shlex.split(commands[1])[3:] + ["--quiet"]) == 0
    from stp.pretrain import load_model

    want = stp.models.merge_adapter(load_model("pretrained:sudoku"), tmp_path / "runs/tiny/adapter")
    ids = torch.tensor([[5, 9, 11, 2, 2, 2]])
    with torch.no_grad():
        got = stp.models.load("merged-tiny").model(ids).logits
        assert torch.allclose(got, want.model(ids).logits, atol=1e-5)


# ------------------------------------------------------------------------------------ 3: one reward everywhere


def _const(completions, **kwargs):
    return [1.0 for _ in completions]


def _flagged(completions, flag, **kwargs):
    return [2.0 if f else None for f in flag]


def test_heldout_reward_is_the_weighted_training_total_and_own_rewards_have_no_accuracy():
    from stp.evaluation import evaluate
    from stp.metrics import total_reward
    from stp.tasks.custom import FunctionTask

    task = FunctionTask(funcs=(_const, _flagged), weights=(1.0, 0.25))
    examples = [{"prompt": f"{i}+{i}=", "flag": i % 2 == 0} for i in range(4)]
    res = evaluate(_tiny(), task, examples, gen_length=32, block_length=32, steps=16,
                   progress=False)
    # Independent reference: 1 + 0.25 * 2 where the flag is set, 1 where _flagged says "not applicable".
    want = [1.5 if ex["flag"] else 1.0 for ex in examples]
    assert [r["reward"] for r in res["records"]] == want
    assert res["mean_reward"] == sum(want) / len(want)
    # ... which is the trainer's total of the same values (stp.metrics.total_reward, NaN = None counts 0).
    values = torch.tensor(task.batch_rewards([r["completion"] for r in res["records"]], examples),
                          dtype=torch.float64)
    assert total_reward(values, task.reward_weights()).tolist() == want
    # Reward functions define a reward, not an accuracy: none is reported (it was the reward, here 1.25 > 1).
    assert res["accuracy"] is None and all(r["metric"] is None for r in res["records"])


def test_own_rewards_on_a_builtin_tasks_examples_keep_its_accuracy():
    from stp.tasks import get_task
    from stp.tasks.custom import FunctionTask

    sudoku = get_task("sudoku")
    ex = sudoku.load("test", source="generated", n=1)[0]
    task = FunctionTask(funcs=(_const,), base=sudoku)
    for text in ("<answer>" + ex["solution"] + "</answer>", "<answer>1234</answer>", "nothing"):
        assert task.metric(text, ex) == sudoku.metric(text, ex)


# ------------------------------------------------------------------------------------------ 5: no learning signal

SMALL = {"model.name_or_path": "tiny", "rollout.gen_length": 16, "rollout.block_length": 16, "rollout.steps": 8,
         "grpo.prompts_per_step": 2, "grpo.num_generations": 2, "grpo.num_iterations": 1, "estimator.num_draws": 1,
         "run.eval_examples": 0, "run.report_to": "none", "grpo.warmup_steps": 0}


def _second_of_first_group(completions, **kwargs):
    """Samples are grouped by prompt, G = 2 in a row: the first group gets (0, 1), the second (0, 0)."""
    return [1.0 if i == 1 else 0.0 for i in range(len(completions))]


def _train(tmp_path, fn, **overrides):
    from stp import Trainer
    from stp.config import resolve

    config = resolve("elbo-tiny", overrides={**SMALL, "run.output_dir": str(tmp_path / "run"), **overrides})
    data = [{"prompt": f"{i}+{i}="} for i in range(8)]
    return Trainer(config, reward_funcs=[fn], train_dataset=data).train(progress=False)


def test_no_learning_signal_warns_then_stops(tmp_path, capsys):
    from stp.metrics import read_metrics
    from stp.trainer import NoLearningSignal

    with pytest.raises(NoLearningSignal, match="no learning signal for 6 steps"):
        _train(tmp_path, _const, **{"grpo.max_steps": 20, "run.max_no_signal_steps": 6})
    err = capsys.readouterr().err
    assert err.count("stp.train: warning: step 5: no learning signal for 5 steps") == 1
    assert "run.max_no_signal_steps = 6" in err
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]  # stopped there, not at step 20
    assert all(r["groups_with_signal"] == 0 and r["reward_std"] == 0 for r in rows)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["stopped_no_signal"] is True and summary["diverged"] is False and summary["steps"] == 6


def test_the_no_signal_streak_survives_a_resume(tmp_path, capsys):
    """The streak is checkpointed: 3 steps without signal, a stop, a resume with a higher max_steps: the run stops
    at 6 steps in all (the limit), not 6 steps after the resume."""
    from stp.metrics import read_metrics
    from stp.trainer import NoLearningSignal

    _train(tmp_path, _const, **{"grpo.max_steps": 3, "run.max_no_signal_steps": 6, "run.save_every": 1})
    with pytest.raises(NoLearningSignal, match="no learning signal for 6 steps"):
        _train(tmp_path, _const, **{"grpo.max_steps": 20, "run.max_no_signal_steps": 6, "run.save_every": 1,
                                    "run.resume": True})
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]


def test_groups_with_signal_counts_the_groups_whose_rewards_differ(tmp_path, capsys):
    from stp.metrics import read_metrics

    _train(tmp_path, _second_of_first_group, **{"grpo.max_steps": 2, "run.max_no_signal_steps": 1})
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["groups_with_signal"] for r in rows] == [0.5, 0.5]  # group 1 (0, 1) has signal, group 2 (0, 0) not
    assert "no learning signal" not in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ 6: extras


def _extras() -> dict[str, list[str]]:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]


def test_every_readme_install_line_names_extras_that_exist_hyphenated():
    """pip 23.2 (a Python 3.11 venv's) skips an extra spelled with '_' ('does not provide the extra'); every extra
    of pyproject is hyphenated, and every `pip install ...[extras]` of the README, docs and error messages names
    existing ones."""
    extras = _extras()
    assert all(re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", name) for name in extras), sorted(extras)
    texts = [README, *(p.read_text() for p in (ROOT / "docs").glob("*.md")),
             *(p.read_text() for p in (ROOT / "stp").rglob("*.py"))]
    found = []
    for text in texts:
        for line in re.findall(r"pip install[^`\n]*", text):
            for spec in re.findall(r"""['"]?(\S*?)\[([^\]]+)\]""", line):
                target, names = spec
                if target.strip("'\"") in ("-e .", ".", "stp", "") or target.endswith("."):
                    found += [(line, n.strip()) for n in names.split(",")]
    assert len(found) >= 5  # test, math, reasoning-gym, gpu, data at least
    missing = [(line, n) for line, n in found if n not in extras]
    assert not missing, missing
    # The self-references inside pyproject too ("stp[data,math,reasoning-gym]").
    for deps in extras.values():
        for dep in deps:
            m = re.fullmatch(r"stp\[([^\]]+)\]", dep)
            if m:
                assert all(n in extras for n in m.group(1).split(",")), dep


# ------------------------------------------------------------------------------------- 7: your own reward function


def _readme_reward_function():
    """The README's reward function (the "Your own task" example up to its data), executed."""
    code = README.split("## Your own task", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    namespace: dict = {}
    exec(compile(code.split("\npuzzles = ")[0], "README.md", "exec"), namespace)
    return namespace["keeps_givens"]


def test_readme_reward_function_reads_text_and_chat_completions():
    from stp.tasks import get_task

    fn = _readme_reward_function()
    ex = get_task("sudoku").load("train", source="generated", n=1)[0]
    puzzle, solution = ex["puzzle"], ex["solution"]
    wrong = "".join("1" if c != "1" else "2" for c in solution)  # every cell changed
    # Reference by hand: the solution keeps every given, `wrong` none; fewer than 16 digits scores 0.
    want = [1.0, 0.0, 0.0]
    texts = [f"grid {solution}", wrong, "123"]
    assert fn(texts, puzzle=[puzzle] * 3) == want
    assert fn([[{"role": "assistant", "content": t}] for t in texts], puzzle=[puzzle] * 3) == want


def _raises_on_chat(completions, **kwargs):
    return [len(c[0]["content"]) for c in completions]


def test_exception_in_a_reward_function_names_it_and_what_it_got():
    from stp.tasks.reward_funcs import RewardFuncError, score

    with pytest.raises(RewardFuncError) as e:
        score([_raises_on_chat], ["abc", "de"], [{"prompt": "p", "puzzle": "x"}, {"prompt": "q", "puzzle": "y"}])
    msg = str(e.value)
    line = _raises_on_chat.__code__.co_firstlineno + 1
    assert f"_raises_on_chat ({__file__}:{line - 1})" in msg  # the function, its file and line
    assert "raised TypeError: string indices must be integers" in msg
    assert f"at {__file__}:{line} ('return [len(c[0][\"content\"]) for c in completions]')" in msg
    assert "completions = 2 strings (plain-text prompts), the first 'abc'; columns puzzle" in msg
    assert isinstance(e.value.__cause__, TypeError)


# ------------------------------------------------------------------------------------ 9: rewards fast on any input


def test_math_reward_of_a_deeply_nested_box_never_reaches_math_verify(monkeypatch):
    """The crafted completion that took 2.0 s: a \\boxed{} holding parentheses nested 199 deep."""
    import time

    import math_verify

    from stp.tasks import get_task
    from stp.tasks.math import MAX_VERIFY_DEPTH, bracket_depth

    def refuse(*args, **kwargs):
        raise AssertionError("math-verify must not see an answer nested this deep")

    monkeypatch.setattr(math_verify, "parse", refuse)
    task = get_task("math")
    for depth in (MAX_VERIFY_DEPTH + 1, 199):
        text = "<answer>\\boxed{" + "(" * depth + "1" + ")" * depth + "}</answer>"
        assert bracket_depth(text) == depth
        t0 = time.perf_counter()
        assert task.rewards(text, {"answer": "2"}) == {"correctness_reward": 0.0, "format_reward": 1.0}
        assert time.perf_counter() - t0 < 0.5


def test_bracket_depth_against_enumeration():
    import itertools

    from stp.tasks.math import bracket_depth

    for n in range(7):
        for chars in itertools.product("([)]x{", repeat=n):
            text = "".join(chars)
            depths, d = [0], 0
            for c in text:  # reference: the running count of ( and [ (never below 0), its maximum
                d = d + 1 if c in "([" else max(d - 1, 0) if c in ")]" else d
                depths.append(d)
            assert bracket_depth(text) == max(depths)


def test_math_verify_is_time_boxed(monkeypatch):
    import time

    import math_verify

    from stp.tasks.math import VERIFY_SECONDS, verified_equal

    def slow(*args, **kwargs):
        time.sleep(5)
        return ["x"]

    monkeypatch.setattr(math_verify, "parse", slow)
    t0 = time.perf_counter()
    assert verified_equal("x+1", "1+x") is False
    assert time.perf_counter() - t0 < VERIFY_SECONDS + 0.5
    import signal

    assert signal.getitimer(signal.ITIMER_REAL)[0] == 0  # the timer is off again


def test_python_value_leaves_the_recursion_limit_alone(monkeypatch):
    from stp.tasks import _d1

    limit = sys.getrecursionlimit()
    real = sys.setrecursionlimit

    def refuse(n):
        raise AssertionError("an ordinary answer must not change the interpreter's recursion limit")

    monkeypatch.setattr(sys, "setrecursionlimit", refuse)
    for text in ("(1+2)*3", "-" * 200 + "7", "2**-1 // 3", "((((((1))))))/4"):
        assert _d1.python_value(text) == eval(text, {"__builtins__": None}, {})
    monkeypatch.setattr(sys, "setrecursionlimit", real)
    deep = "-" * 1501 + "3"  # deeper than the tree conversion's own check: raised for that parse only
    assert _d1.python_value(deep) == eval(deep, {"__builtins__": None}, {}) == -3
    assert sys.getrecursionlimit() == limit


# ------------------------------------------------------------------------------------------- 11: the small ones


def _rows(n: int) -> list[dict]:
    return [{"step": s, "iteration": (s - 1) % 2, "reward_mean": s / 20, "eval_reward": None, "time_rollout": 1.0,
             "time_scoring": 0.5, "time_update": 0.2} for s in range(1, n + 1)]


def test_progress_png_points_labels_legends_and_ticks():
    import matplotlib

    matplotlib.use("Agg")
    from stp.metrics import progress_figure

    fig = progress_figure(_rows(10), title="t", before=0.0, after=0.5, last_step=10)
    a, b = fig.axes
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    lo, hi = b.get_xlim()
    assert all(float(t).is_integer() for t in b.get_xticks() if lo <= t <= hi)  # no 2.5, 7.5
    held = next(line for line in a.get_lines() if line.get_label().startswith("held-out"))
    assert held.get_linestyle() == "None" and list(held.get_xdata()) == [0, 10]  # points, not a trend line
    assert "0.000 before, 0.500 after step 10" in a.get_title() and not a.texts  # numbers off the curves
    for ax in (a, b):  # legends above their panels, not over the curves' ends
        assert ax.get_legend().get_window_extent(renderer).y0 >= ax.get_window_extent(renderer).y1 - 1
    assert a.get_legend().get_window_extent(renderer).y0 >= a.title.get_window_extent(renderer).y1 - 1


def test_help_names_and_documents_every_flag(capsys):
    from stp_kernels import acceptance

    with pytest.raises(SystemExit) as e:
        acceptance.main(["--help"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("usage: python -m stp_kernels.acceptance")
    from stp.prior import _parser

    undocumented = [a.option_strings for a in _parser()._actions if not a.help]
    assert not undocumented, undocumented
    helps = {a.dest: a.help for a in _parser()._actions}
    assert "1 - rho" in helps["rho"] and "answer_low_confidence" in helps["strategy"]


def test_preset_typo_suggests_the_preset():
    from stp.config import ConfigError, parse_args

    with pytest.raises(ConfigError, match=r"did you mean elbo-tiny\?"):
        parse_args(["--preset", "elbo-tyni"])


def test_no_future_warning_when_evaluating_an_adapter(tmp_path):
    import warnings

    run = _fake_run(tmp_path)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert stp_eval.main(["--run", str(run), "--limit", "1", "--output", str(tmp_path / "o.jsonl"),
                              "--no-progress"]) == 0
    assert not [str(w.message) for w in seen if issubclass(w.category, FutureWarning)]


def test_an_error_mid_run_starts_on_its_own_line_and_names_the_reward_function(tmp_path, monkeypatch, capsys):
    from stp import train as stp_train

    (tmp_path / "my_rewards.py").write_text("def broken(completions, **kwargs):\n"
                                            "    return [c[0]['content'] for c in completions]\n")
    monkeypatch.chdir(tmp_path)
    flags = [f"--{k}={v}" for k, v in SMALL.items()]
    code = stp_train.main(["--preset", "elbo-tiny", *flags, "--grpo.max_steps", "1", "--run.reward",
                           "my_rewards.py:broken", "--run.output_dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2
    assert "\nstp.train: error: reward function stp_user_rewards_my_rewards:broken (" in err
    assert f"my_rewards.py:2 (\"return [c[0]['content'] for c in completions]\")" in err
    assert "it was given completions = " in err


# -------------------------------------------------------------------------------------------- 4: progress bars


def test_python_api_shows_progress_on_a_terminal(monkeypatch):
    import stp.trainer
    from stp import Trainer

    seen = []
    monkeypatch.setattr(stp.trainer, "train", lambda config, progress, **kw: seen.append(progress) or {})
    for tty in (True, False):
        monkeypatch.setattr(sys.stderr, "isatty", lambda tty=tty: tty)
        Trainer("tiny").train()
    Trainer("tiny").train(progress=True)
    assert seen == [True, False, True]


def test_prior_building_and_heldout_evaluation_show_bars(capsys):
    from stp.config import resolve
    from stp.metrics import evaluate_heldout
    from stp.prior import build_priors, build_progress
    from stp.tasks.prompts import task_with_prompt

    lm = _tiny()
    with build_progress(True):
        build_priors(lm, ["1+1=", "2+2=", "3+3="], rho=0.95, strategy="low_confidence", gen_length=16,
                     block_length=16, steps=8, seed=0)
    err = capsys.readouterr().err
    assert "static priors" in err and "3prompt" in err.replace(" ", "")
    with build_progress(False):  # off: nothing
        build_priors(lm, ["1+1="], rho=0.95, strategy="low_confidence", gen_length=16, block_length=16, steps=8,
                     seed=0)
    assert "static priors" not in capsys.readouterr().err
    task = task_with_prompt("sudoku", "compact")
    cfg = resolve("tiny", overrides={"rollout.gen_length": 16, "rollout.block_length": 16, "rollout.steps": 8})
    evaluate_heldout(lm, task, task.load("test", source="generated", n=2), cfg, progress=True)
    assert "eval sudoku" in capsys.readouterr().err


def test_train_shows_every_phase(tmp_path, capsys):
    from stp.config import resolve
    from stp.trainer import train

    config = resolve("tiny", overrides={**SMALL, "run.eval_examples": 2, "grpo.max_steps": 1,
                                        "prior.path": str(tmp_path / "priors.jsonl"),
                                        "run.output_dir": str(tmp_path / "run")})
    train(config, progress=True)
    err = capsys.readouterr().err
    assert "static priors" in err and err.count("eval sudoku") >= 2 and "RL tiny" in err


def test_prior_given_an_adapter_says_what_to_do(tmp_path, capsys):
    from stp import prior

    run = _fake_run(tmp_path)
    with pytest.raises(SystemExit) as e:
        prior.main(["--model", str(run / "adapter"), "--task", "sudoku", "--out", str(tmp_path / "p.jsonl")])
    assert e.value.code == 2
    assert "is a LoRA adapter, not a model" in capsys.readouterr().err


# --------------------------------------------------------------------------------------- 10: benchmarks' default


def _pytest(*args: str) -> str:
    import subprocess

    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    env.pop("STP_BENCH_FULL", None)
    res = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args], capture_output=True,
                         text=True, env=env, cwd=ROOT, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res.stdout


@pytest.mark.slow
def test_benchmarks_quick_default_full_flag_and_tables_as_groups_end():
    quick = _pytest("benchmarks/", "--benchmark-only", "--collect-only", "-q").splitlines()
    full = _pytest("benchmarks/", "--benchmark-only", "--collect-only", "-q", "--full").splitlines()
    quick, full = [x for x in quick if "::" in x], [x for x in full if "::" in x]
    assert set(quick) < set(full)
    assert {x for x in full if "torch_compile" in x or "llada_proportioned" in x} == set(full) - set(quick)
    # The variants of a group are contiguous: fwd's five, then fwd_bwd's.
    modes = [x.rsplit("-", 1)[1] for x in quick if "test_masked_logprob" in x]
    assert modes == sorted(modes, key=lambda m: modes.index(m))
    out = _pytest("benchmarks/bench_sampler.py", "--benchmark-only", "-k", "sample_step", "-q")
    done = out.index("(group done in")
    assert done < out.index("stp benchmark summary") and "**sample_step" in out[done:out.index("stp benchmark")]
