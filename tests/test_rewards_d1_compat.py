"""``d1_compat=True`` equals d1's published reward code, data loading included.

Every expected value below is worked out by hand from d1's code (diffu-grpo/reward_func.py, math500_utils.py,
data_utils.py), as the comment on each case says; none is computed by this project's code. Python's ``eval`` serves as
an oracle only on generated texts that are small and cheap to evaluate.
"""

from __future__ import annotations

import json
import random
import re

import pytest

from stp.tasks import _d1, get_task

GSM = get_task("gsm8k", d1_compat=True)
MATH = get_task("math", d1_compat=True)
CD = get_task("countdown", d1_compat=True)


def _load(task, tmp_path, rows):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return task.load("train", path)


# --------------------------------------------------------------------------------------- GSM8K: the reference


def test_gsm8k_reference_keeps_thousands_commas_as_d1_loads_it(tmp_path):
    # d1 data_utils.get_gsm8k_questions: answer = extract_hash_answer(x["answer"]) = text.split("####")[1].strip(),
    # so "1,080" with its comma; reward_func.correctness_reward_func: 2.0 iff extract_xml_answer(r) == answer.
    (row,) = _load(GSM, tmp_path, [{"question": "q", "answer": "3 * 360 = 1080\n#### 1,080"}])
    with_comma = "<reasoning>\nr\n</reasoning>\n<answer>\n1,080\n</answer>\n"
    without = "<reasoning>\nr\n</reasoning>\n<answer>\n1080\n</answer>\n"
    assert GSM.rewards(with_comma, row)["correctness_reward"] == 2.0  # "1,080" == "1,080"
    assert GSM.rewards(without, row)["correctness_reward"] == 0.0  # "1080" != "1,080"
    assert GSM.metric(with_comma, row) == 1.0 and GSM.metric(without, row) == 0.0
    # The default mode compares numbers, both ways.
    default = get_task("gsm8k")
    assert default.rewards(with_comma, row)["correctness_reward"] == default.rewards(without, row)[
        "correctness_reward"] == 2.0


def test_gsm8k_reference_is_the_text_after_the_first_hashes():
    # extract_hash_answer: split("####")[1], the text between the first and a second "####".
    ex = {"question": "q", "answer": "7", "solution": "a\n#### 7 #### 8"}
    assert GSM.rewards("<answer>7</answer>", ex)["correctness_reward"] == 2.0


# ---------------------------------------------------------------------------------- MATH: the reference answer


@pytest.mark.parametrize("solution, completion, expected", [
    # last_boxed_only_string: "\\boxed " in the text -> "\\boxed " + text after it up to "$"; remove_boxed then cuts
    # "\\boxed ": the reference is "{5}". A completion "\\boxed{5}" gives "5" != "{5}"; "$\\boxed {5}$" gives "{5}";
    # without a "$" the completion's text runs on to its end: "{5}</answer>".
    ("So the answer is $\\boxed {5}$.", "<answer>\\boxed{5}</answer>", 0.0),
    ("So the answer is $\\boxed {5}$.", "<answer>$\\boxed {5}$</answer>", 2.0),
    ("So the answer is $\\boxed {5}$.", "<answer>\\boxed {5}</answer>", 0.0),
    # "\\boxed 5 apples" with no "$": the reference is "5 apples", strip_string -> "5apples" != "5".
    ("which is \\boxed 5 apples", "<answer>\\boxed{5}</answer>", 0.0),
    # rfind("\\boxed") finds the \boxed; an \fbox after it is ignored: the reference is "3".
    ("First \\boxed{3}, then \\fbox{5}", "<answer>\\boxed{3}</answer>", 2.0),
    ("First \\boxed{3}, then \\fbox{5}", "<answer>\\boxed{5}</answer>", 0.0),
    # Only an \fbox: the brace scan returns "\\fbox{5}", which remove_boxed leaves as it is.
    ("so \\fbox{5}", "<answer>\\boxed{5}</answer>", 0.0),
    ("so \\fbox{5}", "<answer>\\fbox{5}</answer>", 2.0),
])
def test_math_reference_through_d1_helpers(tmp_path, solution, completion, expected):
    # d1 data_utils.get_math_questions passes x["solution"]; correctness_reward_func_math applies
    # remove_boxed(last_boxed_only_string(a)) to it, and the same to the completion.
    (row,) = _load(MATH, tmp_path, [{"problem": "p", "solution": solution}])
    assert MATH.rewards(completion, row)["correctness_reward"] == expected


def test_math_solution_without_a_box_is_d1s_whole_text(tmp_path):
    # last_boxed_only_string returns the whole string when it has neither \boxed nor \fbox.
    (row,) = _load(MATH, tmp_path, [{"problem": "p", "solution": "It is 12"}])
    assert MATH.rewards("It is 12", row)["correctness_reward"] == 2.0
    with pytest.raises(Exception, match="no balanced"):
        _load(get_task("math"), tmp_path, [{"problem": "p", "solution": "It is 12"}])


def test_math_unclosed_reference_box_is_an_error_as_in_d1():
    # last_boxed_only_string -> None; remove_boxed(None) raises TypeError outside any try in d1.
    with pytest.raises(ValueError, match="d1_compat"):
        MATH.rewards("<answer>\\boxed{5}</answer>", {"problem": "p", "answer": "5", "solution": "\\boxed{5"})


# ------------------------------------------------------------------------------------ Countdown: eval's syntax

C = {"nums": [44, 19, 35], "target": 98}


@pytest.mark.parametrize("expression, expected", [
    # compute_score: extract_solution -> validate_equation (digits 44, 19, 35) -> evaluate_equation: the character
    # check r"^[\d+\-*/().\s]+$" passes any \s; then eval raises SyntaxError on characters Python's tokenizer
    # rejects (format_score 0.1) and returns 98 where it accepts them (score 1.0).
    ("44\v+ 19 + 35", 0.1),  # vertical tab: "invalid non-printable character U+000B"
    ("44\x1c+ 19 + 35", 0.1),  # file separator: \s for str patterns, not Python whitespace
    ("44\xa0+ 19 + 35", 0.1),  # no-break space
    ("44\u2003+ 19 + 35", 0.1),  # em space
    ("44\x0c+ 19 + 35", 1.0),  # form feed is Python whitespace
    ("44\t+ 19 + 35", 1.0),
    ("(44\n+ 19 + 35)", 1.0),  # a line break inside parentheses
    ("44\n+ 19 + 35", 0.1),  # a line break ends the expression: SyntaxError
    ("44\r+ 19 + 35", 0.1),
    ("٤٤ + 19 + 35", 0.1),  # Arabic-Indic digits pass \d and int(), not Python's tokenizer
])
def test_countdown_whitespace_as_eval_reads_it(expression, expected):
    assert CD.reward(f"<answer>\n{expression}\n</answer>", C) == expected


@pytest.mark.parametrize("expression, example, expected", [
    # d1 has no size limits; only Python's own: its tokenizer allows 200 nested parentheses, refuses 201.
    ("(" * 33 + "44 + 19 + 35" + ")" * 33, C, 1.0),
    ("(" * 200 + "44 + 19 + 35" + ")" * 200, C, 1.0),
    ("(" * 201 + "44 + 19 + 35" + ")" * 201, C, 0.1),
    ("44" + " " * 600 + "+ 19 + 35", C, 1.0),  # longer than 512 characters
    ("44 + " + "+-" * 100 + "19 + 35", C, 1.0),  # 200 unary signs, 100 of them minus: +19
    ("--" * 60 + "44 + 19 + 35", C, 1.0),  # more than 128 tokens
    ("--" * 700 + "(44 + 19 + 35)", C, 1.0),  # 1,400 unary signs: eval compiles them (its limit is near 3,000)
    ("1" * 40 + " + 2 + 3", {"nums": [int("1" * 40), 2, 3], "target": int("1" * 40) + 5}, 1.0),  # 40-digit literal
    # Powers: eval computes them exactly. 2**200000 has 200,001 bits; to the power 0 it is 1.
    ("(2**200000)**0", {"nums": [2, 200000, 0], "target": 1}, 1.0),
    ("2**200000 // 2**199999", {"nums": [2, 200000, 2, 199999], "target": 2}, 0.1),  # four numbers: not decided
    ("3 ** 40000 - 3 ** 40000 + 7", {"nums": [3, 40000, 3, 40000, 7], "target": 7}, 1.0),  # 63,400 bits: exact
    # 2**3**20 has 3,486,784,401 bits (d1 builds it, ~0.4 GB); times 0 it is 0, plus 1 it is not the target.
    ("2**3**20 * 0", {"nums": [2, 3, 20, 0], "target": 0}, 1.0),
    ("2**3**20 + 1", {"nums": [2, 3, 20, 1], "target": 1}, 0.1),
    # 3 / 2**2**30: a true division by a 2**30-bit integer is 0.0 in Python.
    ("3 / 2**2**30", {"nums": [3, 2, 2, 30], "target": 0}, 1.0),
    ("2**2**30 / 3", {"nums": [3, 2, 2, 30], "target": 0}, 0.1),  # OverflowError: too large for a float
    ("2**2**30 * 1.0", {"nums": [2, 2, 30, 1, 0], "target": 0}, 0.1),  # OverflowError converting to float
    ("1**(2**3**20)", {"nums": [1, 2, 3, 20], "target": 1}, 1.0),
    ("(0-1)**(3**3**20)", {"nums": [0, 1, 3, 3, 20], "target": -1}, 1.0),  # odd power of -1
    # 9**9**9**9: d1's eval never finishes (the result would need more than 2**65536 bits); any result it could
    # reach is format_score: MemoryError is caught by its bare except.
    ("9**9**9**9", {"nums": [9, 9, 9, 9], "target": 1}, 0.1),
])
def test_countdown_no_size_limits_in_compat(expression, example, expected):
    assert CD.reward(f"<answer>{expression}</answer>", example) == expected


@pytest.mark.filterwarnings("ignore::SyntaxWarning")
def test_countdown_python_value_matches_eval_on_random_expressions(seed):
    rng = random.Random(seed)
    pieces = ["1", "2", "3", "7", "10", "0", "2.5", ".5", "1.", "+", "-", "*", "/", "//", "**", "(", ")", " ", "\t",
              "\n", "...", "()", "\x0c"]
    checked = 0
    for _ in range(3000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 12))).strip()
        if not text or text.count("**") > 1:
            continue  # one power at most: eval, the oracle, stays fast
        try:
            want = ("value", eval(text, {"__builtins__": None}, {}))  # noqa: S307 - generated, the d1 oracle
        except Exception as exc:  # noqa: BLE001
            want = ("error", type(exc).__name__)
        try:
            got = ("value", _d1.python_value(text))
        except Exception as exc:  # noqa: BLE001
            got = ("error", type(exc).__name__)
        if want[0] == "value" and got[0] == "value" and isinstance(got[1], _d1._Huge):
            assert isinstance(want[1], int) and want[1].bit_length() > _d1.HUGE_BITS, text
            continue
        assert got[0] == want[0], (text, got, want)
        if want[0] == "value":
            assert type(got[1]) is type(want[1]) and (got[1] == want[1] or got[1] != got[1]), (text, got, want)
        checked += 1
    assert checked > 1000


# ---------------------------------------------------------------------- d1's regexes, read by linear scans


STRICT = r"^<reasoning>\n.*?\n</reasoning>\n<answer>\n.*?\n</answer>\n$"
SOFT = r"<reasoning>.*?</reasoning>\s*<answer>.*?</answer>"
TAGGED = r"<answer>(.*?)</answer>"
PARTS = ["<reasoning>", "</reasoning>", "<answer>", "</answer>", "\n", " ", "x", "\t", "\v", "\n\n", "<", ">"]


def _random_texts(seed, n=4000):
    rng = random.Random(seed)
    for _ in range(n):
        yield "".join(rng.choice(PARTS) for _ in range(rng.randint(0, 10)))
    # and the well-formed shapes, with every one-line / two-line variant
    for a in ("", "r", "r\ns"):
        for b in ("", "4", "4\n5"):
            for tail in ("", "\n", "\n\n", "x"):
                yield f"<reasoning>\n{a}\n</reasoning>\n<answer>\n{b}\n</answer>{tail}"
                yield f"<reasoning>{a}</reasoning> \n<answer>{b}</answer>{tail}"


def test_d1_format_scans_equal_d1_regexes(seed):
    for text in _random_texts(seed):
        assert _d1.strict_format(text) == (0.5 if re.match(STRICT, text) else 0.0), repr(text)
        assert _d1.soft_format(text) == (0.5 if re.match(SOFT, text) else 0.0), repr(text)
        matches = re.findall(TAGGED, text, re.DOTALL)
        assert _d1.extract_solution(text) == (matches[-1].strip() if matches else None), repr(text)


def test_default_format_scans_equal_dotall_regexes(seed):
    from stp.tasks import gsm8k

    for text in _random_texts(seed):
        assert gsm8k._strict_match(text) == bool(re.match(STRICT, text, re.DOTALL)), repr(text)
        assert gsm8k._soft_match(text) == bool(re.match(SOFT, text, re.DOTALL)), repr(text)
