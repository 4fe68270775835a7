"""Tasks and rewards (stp.tasks): rewards on hand-written completions, parsers, generators and splits, loaders."""

from __future__ import annotations

import doctest
import importlib
import json
import random
from fractions import Fraction

import pytest

from stp.tasks import DataError, get_task
from stp.tasks import countdown as cd
from stp.tasks import sudoku as sd
from stp.tasks.arith import ExpressionError, evaluate, parse
from stp.tasks.latex import is_equiv, last_boxed

MODULES = ["stp.tasks", "stp.tasks.extract", "stp.tasks.data", "stp.tasks.arith", "stp.tasks.latex", "stp.tasks._d1",
           "stp.tasks.base", "stp.tasks.gsm8k", "stp.tasks.math", "stp.tasks.countdown", "stp.tasks.sudoku"]
TASKS = ["gsm8k", "math", "countdown", "sudoku"]
EXAMPLES = {
    "gsm8k": {"question": "q", "answer": "18"},
    "math": {"problem": "p", "answer": "\\frac{1}{2}"},
    "countdown": {"nums": [44, 19, 35], "target": 98},
    "sudoku": {"puzzle": "1034340020004300", "solution": "1234341221434321"},
}
RIGHT = {
    "gsm8k": "<reasoning>\na\nb\n</reasoning>\n<answer>\n18\n</answer>\n",
    "math": "<reasoning>\na\n</reasoning>\n<answer>\n\\boxed{\\dfrac{1}{2}}\n</answer>\n",
    "countdown": "<reasoning>\na\n</reasoning>\n<answer>\n(44 + 19) + 35\n</answer>\n",
    "sudoku": "<reasoning>\na\n</reasoning>\n<answer>\n1234\n3412\n2143\n4321\n</answer>\n",
}
MAX = {"gsm8k": 4.0, "math": 3.0, "countdown": 1.0, "sudoku": 1.0}


@pytest.mark.parametrize("module", MODULES)
def test_doctests(module):
    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0, f"{result.failed} doctest failures in {module}"


def test_every_reward_function_has_a_doctest_and_one_signature():
    import inspect

    for name in TASKS:
        for fn in get_task(name).reward_functions:
            assert fn.__doc__ and ">>>" in fn.__doc__, f"{fn.__name__} has no doctest"
            params = list(inspect.signature(fn).parameters)
            assert params == ["completion", "example", "d1_compat"], (fn.__name__, params)


def test_get_task_unknown_lists_allowed():
    with pytest.raises(ValueError, match="allowed: gsm8k, math, countdown, sudoku"):
        get_task("nope")


@pytest.mark.parametrize("name", TASKS)
def test_right_answer_gets_max_and_metric_one(name):
    task = get_task(name)
    assert task.reward(RIGHT[name], EXAMPLES[name]) == pytest.approx(MAX[name])
    assert task.metric(RIGHT[name], EXAMPLES[name]) == 1.0
    assert set(task.rewards(RIGHT[name], EXAMPLES[name])) == {f.__name__ for f in task.reward_functions}


@pytest.mark.parametrize("name", TASKS)
def test_wrong_answer_scores_below_right(name):
    wrong = {"gsm8k": "17", "math": "\\boxed{\\frac13}", "countdown": "44 + 19 - 35", "sudoku": "4321432143214321"}
    completion = f"<reasoning>\na\n</reasoning>\n<answer>\n{wrong[name]}\n</answer>\n"
    task = get_task(name)
    assert task.reward(completion, EXAMPLES[name]) < task.reward(RIGHT[name], EXAMPLES[name])
    assert task.metric(completion, EXAMPLES[name]) < 1.0


GARBAGE = [
    "",
    "x" * 10_000,
    "no tags at all, the answer is 18",
    "<answer>\n\\boxed{\\frac{1}{2}\n</answer>",  # unbalanced braces
    "<answer>{{{{{{{{{{</answer>",
    "<answer>10**10000</answer>",
    "<answer>9e999</answer>",
    "<answer>1/0</answer>",
    "<answer>" + "(" * 5000 + "1" + ")" * 5000 + "</answer>",
    "<answer>" + "-" * 5000 + "1</answer>",
    "<answer>" + "9" * 5000 + "</answer>",
    "\\boxed{" * 3000,
    "</answer><answer>",
    "<answer><answer><answer>",
    "<reasoning>\n" + "\n</reasoning>\n<answer>\n" * 300,
    "\x00\x08\ud7ff\U0001F600 ²³ ١٢٣",
]


@pytest.mark.parametrize("name", TASKS)
@pytest.mark.parametrize("d1_compat", [False, True])
def test_garbage_never_raises_and_earns_no_correctness(name, d1_compat):
    task = get_task(name, d1_compat=d1_compat)
    for completion in GARBAGE:
        values = task.rewards(completion, EXAMPLES[name])
        assert all(isinstance(v, float) for v in values.values())
        if not d1_compat:
            # No correctness credit; what may remain is format credit (MATH: up to 1.0 for tags + a \boxed, even an
            # unclosed one; Countdown: 0.1 for a parseable expression) and, for Sudoku, digits that happen to match.
            if name == "sudoku":
                assert 0.0 <= task.metric(completion, EXAMPLES[name]) < 0.5, completion[:40]
            else:
                assert task.metric(completion, EXAMPLES[name]) == 0.0, completion[:40]
            assert task.reward(completion, EXAMPLES[name]) <= {"gsm8k": 0.5, "math": 1.0, "countdown": 0.1,
                                                                "sudoku": 0.5}[name] + 1e-9, completion[:40]


@pytest.mark.parametrize("name", TASKS)
def test_random_junk_never_raises(name, seed):
    rng = random.Random(seed)
    alphabet = list("0123456789+-*/()[]{}\\.,=$ \n") + ["<answer>", "</answer>", "<reasoning>", "\\boxed{", "\\frac"]
    for compat in (False, True):
        task = get_task(name, d1_compat=compat)
        for _ in range(300):
            text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60)))
            r = task.reward(text, EXAMPLES[name])
            assert r == r and abs(r) < 100


def test_gsm8k_rewards_by_function():
    task = get_task("gsm8k")
    r = task.rewards("<reasoning>\nx\ny\n</reasoning>\n<answer>\n18\n</answer>\n", EXAMPLES["gsm8k"])
    assert r == {"xmlcount_reward": 0.5, "soft_format_reward": 0.5, "strict_format_reward": 0.5,
                 "int_reward": 0.5, "correctness_reward": 2.0}
    d1 = get_task("gsm8k", d1_compat=True).rewards("<reasoning>\nx\ny\n</reasoning>\n<answer>\n18\n</answer>\n",
                                                   EXAMPLES["gsm8k"])
    assert d1["soft_format_reward"] == 0.0 and d1["strict_format_reward"] == 0.0  # the no-DOTALL bug, reproduced
    assert get_task("gsm8k").extract_answer("18") is None
    assert get_task("gsm8k", d1_compat=True).extract_answer("18") == "18"


def test_gsm8k_xmlcount_bounded():
    task = get_task("gsm8k")
    long = "<reasoning>\nx\n</reasoning>\n<answer>\n18\n</answer>\n" + "z" * 9000
    assert task.rewards(long, EXAMPLES["gsm8k"])["xmlcount_reward"] == 0.25
    assert get_task("gsm8k", d1_compat=True).rewards(long, EXAMPLES["gsm8k"])["xmlcount_reward"] < -17


def test_math_format_backspace_bug():
    c = "<answer>\n\\boxed{\\frac{1}{2}}\n</answer>"
    assert get_task("math").rewards(c, EXAMPLES["math"])["format_reward"] == 1.0
    assert get_task("math", d1_compat=True).rewards(c, EXAMPLES["math"])["format_reward"] == 0.75


@pytest.mark.parametrize("pred, ref", [
    ("\\frac{1}{2}", "0.5"), ("\\dfrac{1}{2}", "\\frac12"), ("\\tfrac12", "1/2"), ("\\left( 3, 4 \\right)", "(3,4)"),
    ("10\\text{ cm}", "10"), ("10 \\text{inches}", "10"), ("90^\\circ", "90"), ("90^{\\circ}", "90"), ("5.", "5"),
    ("x = 7", "7"), ("\\$1{,}000", "1000"), ("1,000", "1000"), ("-\\frac{3}{4}", "-0.75"), ("25\\%", "25"),
    ("\\text{(B)}", "(B)"), ("\\sqrt2", "\\sqrt{2}"), ("6\\text{ cm}^2", "6"), ("\\frac{\\sqrt{3}}{2}", "\\dfrac{\\sqrt3}{2}"),
])
def test_math_equivalent(pred, ref):
    assert is_equiv(pred, ref)


@pytest.mark.parametrize("pred, ref", [
    ("\\frac{1}{3}", "0.33"), ("2", "3"), ("(1,2)", "[1,2]"), ("", ""), ("9e999", "9"), ("x", "y"),
])
def test_math_not_equivalent(pred, ref):
    assert not is_equiv(pred, ref)


def test_last_boxed_nesting():
    assert last_boxed("a \\boxed{1} b \\boxed{\\frac{2}{3}}") == "\\frac{2}{3}"
    assert last_boxed("\\boxed{\\boxed{\\text{A}}}") == "\\text{A}"
    assert last_boxed("\\boxed{{}") is None and last_boxed("\\boxed") is None and last_boxed("\\fbox{4}") == "4"


@pytest.mark.parametrize("text, value", [
    ("1+2*3", 7), ("(1+2)*3", 9), ("-3+10-5", 2), ("8*6/3", 16), ("1/3*3", 1), ("--4", 4), ("((((2))))", 2),
])
def test_arith_strict_values(text, value):
    assert evaluate(text) == Fraction(value)


@pytest.mark.parametrize("text", [
    "", "1+", "(1", "1)", "2**3", "7//2", "1.5", "9e999", "import os", "__import__('os')", "1 2", "(" * 40 + "1" + ")" * 40,
    "1" * 31, "+".join(["1"] * 100), "x",
])
def test_arith_strict_rejects(text):
    with pytest.raises(ExpressionError):
        evaluate(parse(text))


@pytest.mark.parametrize("text", ["1+2*3", "2**-1", "-2**2", "7//2", "(1+\n2)", "1.+.5", "00+1", "2**3**2", "-(3-5)/4"])
def test_arith_python_grammar_matches_eval(text):
    assert evaluate(text, "python") == eval(text)  # noqa: S307 - trusted test literals, the oracle for d1_compat


@pytest.mark.parametrize("text", ["05", "1+\n2", "(1)(2)", "2 3", "1..2", "()", "9**9**9**9"])
def test_arith_python_grammar_rejects_what_eval_rejects(text):
    with pytest.raises(ExpressionError):
        evaluate(text, "python")


def test_countdown_each_number_once():
    ex = {"nums": [2, 2, 5], "target": 9}
    reward = get_task("countdown").reward
    assert reward("<answer>2+2+5</answer>", ex) == 1.0
    assert reward("<answer>2+5+2</answer>", ex) == 1.0
    assert reward("<answer>2+5</answer>", ex) == pytest.approx(0.1)
    assert reward("<answer>2+2+2+5-2</answer>", ex) == pytest.approx(0.1)


def test_countdown_generator_split_and_solutions():
    train, test = cd.generate(400, "train", seed=1), cd.generate(100, "test", seed=1)
    key = lambda p: (tuple(sorted(p["nums"])), p["target"])  # noqa: E731
    assert not {key(p) for p in train} & {key(p) for p in test}
    assert not {p["solution"] for p in train} & {p["solution"] for p in test}
    assert len({key(p) for p in train}) == 400 and len({key(p) for p in test}) == 100
    for p in train[:100] + test:
        assert len(p["nums"]) == 3 and 1 <= p["target"] <= 100
        assert cd.check_expression(p["solution"], p["nums"], p["target"]) == 1.0
    # a different seed still never crosses the split, and the same seed is reproducible
    assert not {key(p) for p in cd.generate(200, "test", seed=7)} & {key(p) for p in train}
    assert cd.generate(20, "test", seed=1) == test[:20]


def test_sudoku_generator_split_unique_and_reproducible():
    assert len(sd.all_grids()) == 288 and all(sd.valid_grid(g) for g in sd.all_grids())
    train, test = sd.generate(300, "train", seed=3), sd.generate(100, "test", seed=3)
    assert not {p["puzzle"] for p in train} & {p["puzzle"] for p in test}
    assert not {p["solution"] for p in train} & {p["solution"] for p in test}
    assert len({p["puzzle"] for p in test}) == 100
    for p in train + test:
        assert sd.count_solutions(p["puzzle"]) == 1
        assert 4 <= p["puzzle"].count("0") <= 10
        assert all(a in ("0", b) for a, b in zip(p["puzzle"], p["solution"]))
    assert sd.generate(10, "test", seed=3) == test[:10]
    assert not {p["solution"] for p in sd.generate(100, "test", seed=99)} & {p["solution"] for p in train}


def test_load_generated_default_sizes():
    assert len(get_task("sudoku").load("test")) == 256
    assert len(get_task("countdown").load("test", source="generated")) == 256
    assert len(get_task("countdown").load("train", source="generated", n=50)) == 50


def _write(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


def test_load_jsonl_all_tasks(tmp_path):
    files = {
        "gsm8k": [{"question": "q1", "answer": "So 3+4=7.\n#### 7"}, {"question": "q2", "answer": 12}],
        "math": [{"problem": "p", "answer": "\\frac{1}{2}"}, {"problem": "p2", "solution": "so \\boxed{3}."}],
        "countdown": [{"nums": [1, 2, 3], "target": 6}, {"input": "4,5,6", "output": "15"}],
        "sudoku": [{"puzzle": "1034340020004300", "solution": "1234341221434321"},
                   {"Puzzle": "1.343.0020004300", "Solution": "1234341221434321"}],
    }
    for name, rows in files.items():
        loaded = get_task(name).load("test", data_path=_write(tmp_path / f"{name}.jsonl", rows))
        assert len(loaded) == 2
    assert get_task("gsm8k").load("test", tmp_path / "gsm8k.jsonl")[0]["answer"] == "7"
    assert get_task("math").load("test", tmp_path / "math.jsonl")[1]["answer"] == "3"
    assert get_task("countdown").load("test", tmp_path / "countdown.jsonl")[1] ["nums"] == [4, 5, 6]
    assert get_task("sudoku").load("test", tmp_path / "sudoku.jsonl")[1]["puzzle"] == "1034300020004300"


def test_load_csv(tmp_path):
    p = tmp_path / "cd.csv"
    p.write_text('nums,target\n"[44, 19, 35]",98\n"1,2,3",6\n', encoding="utf-8")
    assert get_task("countdown").load("test", p) == [{"nums": [44, 19, 35], "target": 98},
                                                      {"nums": [1, 2, 3], "target": 6}]
    s = tmp_path / "sd.csv"
    s.write_text("Puzzle,Solution\n1034340020004300,1234341221434321\n", encoding="utf-8")
    assert get_task("sudoku").load("test", s)[0]["solution"] == "1234341221434321"


@pytest.mark.parametrize("name, rows, line, field", [
    ("gsm8k", [{"question": "q", "answer": "1"}, {"question": "q"}], 2, "answer"),
    ("gsm8k", [{"question": 5, "answer": "1"}], 1, "question"),
    ("math", [{"problem": "p", "answer": "1"}, {"problem": "p", "answer": "2"}, {"problem": "p", "solution": "no box"}],
     3, "solution"),
    ("countdown", [{"nums": [1, 2, 3], "target": 6}, {"nums": [1, 2], "target": 3}], 2, "nums"),
    ("countdown", [{"nums": [1, 2, 3], "target": "abc"}], 1, "target"),
    ("countdown", [{"nums": [1, 2, 3.5], "target": 6}], 1, "nums"),
    ("sudoku", [{"puzzle": "1034340020004300", "solution": "1234341221434322"}], 1, "solution"),
    ("sudoku", [{"puzzle": "103434002000430", "solution": "1234341221434321"}], 1, "puzzle"),
    ("sudoku", [{"puzzle": "2034340020004300", "solution": "1234341221434321"}], 1, "solution"),
])
def test_malformed_row_names_file_line_field(tmp_path, name, rows, line, field):
    path = _write(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError) as err:
        get_task(name).load("train", path)
    message = str(err.value)
    assert f"{path}:{line}:" in message and f"field {field!r}" in message, message


def test_malformed_csv_and_json_lines(tmp_path):
    p = tmp_path / "bad.csv"
    p.write_text("nums,target\n\"1,2,3\",6\n\"1,2,3\",x\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"bad.csv:3: field 'target'"):
        get_task("countdown").load("test", p)
    j = tmp_path / "bad.jsonl"
    j.write_text('{"question": "q", "answer": "1"}\n{not json}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad.jsonl:2: field '<row>': invalid JSON"):
        get_task("gsm8k").load("test", j)


def test_parquet_needs_pyarrow_or_loads(tmp_path):
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        with pytest.raises(ImportError, match="pip install pyarrow"):
            get_task("gsm8k").load("test", _touch(tmp_path / "x.parquet"))
        return
    path = tmp_path / "x.parquet"
    pq.write_table(pa.table({"question": ["q"], "answer": ["4"]}), path)
    assert get_task("gsm8k").load("test", path)[0]["answer"] == "4"


def _touch(path):
    path.write_bytes(b"PAR1")
    return path


def test_hub_errors_are_explicit():
    with pytest.raises(RuntimeError, match="data_path"):
        get_task("sudoku").load("test", source="hub")
    with pytest.raises(RuntimeError, match="data_path"):
        get_task("countdown").load("test", source="hub")
    with pytest.raises(ValueError, match="unknown split"):
        get_task("gsm8k").load("dev")


def test_prompts():
    msgs = get_task("countdown").format_prompt({"nums": [2, 3, 4], "target": 5})
    assert msgs[0]["role"] == "user" and "Using only the numbers [2, 3, 4]" in msgs[0]["content"]
    assert msgs[0]["content"].startswith("\nRespond in the following format:\n<reasoning>")
    assert "\\boxed{}" in get_task("math").format_prompt({"problem": "1+1?", "answer": "2"})[0]["content"]
    assert "Solve the following Sudoku puzzle: 1034" in get_task("sudoku").format_prompt(EXAMPLES["sudoku"])[0]["content"]

    class Tok:
        chat_template = "x"

        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            assert tokenize is False and add_generation_prompt is True
            return "<user>" + messages[0]["content"] + "<assistant>"

    assert get_task("gsm8k").format_prompt({"question": "q?"}, Tok()).endswith("q?<assistant>")

    class NoTemplate:
        chat_template = None

    with pytest.raises(ValueError, match="chat template"):
        get_task("gsm8k").format_prompt({"question": "q?"}, NoTemplate())


def test_reward_rejects_non_string():
    with pytest.raises(TypeError, match="str"):
        get_task("gsm8k").reward([{"content": "x"}], EXAMPLES["gsm8k"])
