"""A faithful re-implementation of d1's reward code path (``d1_compat=True``), bugs included, for reproducing numbers.

Reference: d1 (Zhao et al., 2025), ``diffu-grpo/reward_func.py`` and ``diffu-grpo/math500_utils.py`` as published with
the paper. Function for function, each behaves as the original on one completion, with exactly three changes that do
not alter any reward:

- printing and random logging are dropped (rewards stay pure);
- Countdown's ``eval(equation, {"__builtins__": None}, {})`` is replaced by ``stp.tasks.arith`` with the ``python``
  grammar, which accepts the same expressions over d1's allowed characters and returns the same int/float value. Where
  ``eval`` would raise, the parser raises too, and d1 then scores ``format_score`` either way. A power too large to
  compute (``99**99**99``) is refused instead of hanging; its value could never equal a Countdown target, so d1 would
  score it ``format_score`` as well;
- a completion is a plain string (d1 unpacks ``completion[0]["content"]`` in a batch loop).

The bugs kept on purpose, and fixed in the task modules (see docs/rewards.md):

1. MATH format: ``"\\boxed" in r`` is written without a raw string, so ``"\\b"`` is a backspace character and the test
   looks for ``"\\x08oxed"``: it is always False, and every completion gets the 0.5 "no box" credit.
2. GSM8K soft/strict format: ``re.match`` without ``re.DOTALL``, so ``.`` stops at a newline; any multi-line
   reasoning makes the soft check fail, and the strict check passes only for one-line reasoning and answer.
3. ``extract_xml_answer`` returns the whole completion when it has no ``<answer>`` tag, so a bare ``"18"`` earns
   correctness and integer rewards; MATH compares the whole completion when it has no ``\\boxed``.
4. ``count_xml`` penalises the *whole* completion (0.001 per character, unbounded) when it has ``"\\n<answer>\\n"``
   but not ``"\\n</answer>\\n"``, so long completions get large negative rewards.
"""

from __future__ import annotations

import re

from .arith import ExpressionError, evaluate, parse

# --------------------------------------------------------------------------------------------------- GSM8K (gist)


def extract_xml_answer(text: str) -> str:
    """The text between the last ``<answer>`` and the next ``</answer>``; the whole text when tags are missing."""
    answer = text.split("<answer>")[-1]
    answer = answer.split("</answer>")[0]
    return answer.strip()


def correctness(text: str, answer: str) -> float:
    return 2.0 if extract_xml_answer(text) == answer else 0.0


def int_reward(text: str) -> float:
    return 0.5 if extract_xml_answer(text).isdigit() else 0.0


# Published without re.DOTALL (bug 2).
_STRICT = r"^<reasoning>\n.*?\n</reasoning>\n<answer>\n.*?\n</answer>\n$"
_SOFT = r"<reasoning>.*?</reasoning>\s*<answer>.*?</answer>"


def strict_format(text: str) -> float:
    return 0.5 if re.match(_STRICT, text) else 0.0


def soft_format(text: str) -> float:
    return 0.5 if re.match(_SOFT, text) else 0.0


def count_xml(text: str) -> float:
    count = 0.0
    if text.count("<reasoning>\n") == 1:
        count += 0.125
    if text.count("\n</reasoning>\n") == 1:
        count += 0.125
    if text.count("\n<answer>\n") == 1:
        count += 0.125
        count -= len(text.split("\n</answer>\n")[-1]) * 0.001  # bug 4: whole text when the split finds nothing
    if text.count("\n</answer>") == 1:
        count += 0.125
        count -= (len(text.split("\n</answer>")[-1]) - 1) * 0.001
    return count


# ------------------------------------------------------------------------------------------- MATH (math500_utils)


def boxed_in_answer(text: str) -> float:
    reward = 0.0
    try:
        r = text.split("<answer>")[1].split("</answer>")[0]
        reward += 1.0
    except IndexError:
        r = text
    reward += 1.0 if "\x08oxed" in r else 0.5  # bug 1: d1 wrote "\boxed", i.e. backspace + "oxed"
    return reward


def math_format(text: str) -> float:
    return boxed_in_answer(text) * 0.5


def remove_boxed(s: str) -> str:
    if "\\boxed " in s:  # raises TypeError on None, which the caller catches (d1 does the same)
        left = "\\boxed "
        assert s[: len(left)] == left
        return s[len(left) :]
    left = "\\boxed{"
    if s[: len(left)] == left and s[-1:] == "}":
        return s[len(left) : -1]
    return s


def last_boxed_only_string(string: str) -> str | None:
    idx = string.rfind("\\boxed")
    if "\\boxed " in string:
        return "\\boxed " + string.split("\\boxed ")[-1].split("$")[0]
    if idx < 0:
        idx = string.rfind("\\fbox")
        if idx < 0:
            return string  # bug 3: no box -> the whole text
    depth, i = 0, idx
    while i < len(string):
        if string[i] == "{":
            depth += 1
        if string[i] == "}":
            depth -= 1
            if depth == 0:
                return string[idx : i + 1]
        i += 1
    return None


def _fix_fracs(string: str) -> str:
    substrs = string.split("\\frac")
    new_str = substrs[0]
    for substr in substrs[1:]:
        new_str += "\\frac"
        if substr[0] == "{":  # IndexError on "\frac" at the end: is_equiv falls back to raw equality
            new_str += substr
        else:
            if len(substr) < 2:
                return string
            a, b = substr[0], substr[1]
            if b != "{":
                new_str += "{" + a + "}{" + b + "}" + substr[2:]
            else:
                new_str += "{" + a + "}" + b + substr[2:]
    return new_str


def _fix_a_slash_b(string: str) -> str:
    if len(string.split("/")) != 2:
        return string
    a, b = string.split("/")
    a, b = int(a), int(b)  # ValueError escapes to is_equiv, as in d1 (only AssertionError is caught there)
    if string != f"{a}/{b}":
        return string
    return "\\frac{" + str(a) + "}{" + str(b) + "}"


def _remove_right_units(string: str) -> str:
    if "\\text{ " in string:
        splits = string.split("\\text{ ")
        assert len(splits) == 2
        return splits[0]
    return string


def _fix_sqrt(string: str) -> str:
    if "\\sqrt" not in string:
        return string
    splits = string.split("\\sqrt")
    new_string = splits[0]
    for split in splits[1:]:
        if split[0] != "{":  # IndexError on a trailing "\sqrt", caught by is_equiv
            new_string += "\\sqrt{" + split[0] + "}" + split[1:]
        else:
            new_string += "\\sqrt" + split
    return new_string


def strip_string(string: str) -> str:
    string = string.replace("\n", "").replace("\\!", "").replace("\\\\", "\\")
    string = string.replace("tfrac", "frac").replace("dfrac", "frac")
    string = string.replace("\\left", "").replace("\\right", "")
    string = string.replace("^{\\circ}", "").replace("^\\circ", "")
    string = string.replace("\\$", "")
    string = _remove_right_units(string)
    string = string.replace("\\%", "")
    string = string.replace(" .", " 0.").replace("{.", "{0.")
    if len(string) == 0:
        return string
    if string[0] == ".":
        string = "0" + string
    if len(string.split("=")) == 2 and len(string.split("=")[0]) <= 2:
        string = string.split("=")[1]
    string = _fix_sqrt(string)
    string = string.replace(" ", "")
    string = _fix_fracs(string)
    if string == "0.5":
        string = "\\frac{1}{2}"
    string = _fix_a_slash_b(string)
    return string


def is_equiv(str1: str | None, str2: str | None) -> bool:
    if str1 is None and str2 is None:
        return True
    if str1 is None or str2 is None:
        return False
    try:
        return strip_string(str1) == strip_string(str2)
    except Exception:
        return str1 == str2


def math_correctness(text: str, reference: str) -> float:
    ref = remove_boxed(last_boxed_only_string(reference))
    try:
        r = remove_boxed(last_boxed_only_string(text))
    except Exception:  # d1: bare `except: pass`, leaving the whole completion
        r = text
    return 2.0 if is_equiv(r, ref) else 0.0


# --------------------------------------------------------------------------------------------------- Countdown


def extract_solution(text: str) -> str | None:
    matches = re.findall(r"<answer>(.*?)</answer>", text, re.DOTALL)
    return matches[-1].strip() if matches else None


def validate_equation(equation: str, numbers: list[int]) -> bool:
    try:
        used = [int(n) for n in re.findall(r"\d+", equation)]
    except ValueError:  # more than 4300 digits
        return False
    return sorted(used) == sorted(numbers)


def evaluate_equation(equation: str):
    if not re.match(r"^[\d+\-*/().\s]+$", equation):
        return None
    try:
        return evaluate(parse(equation, "python"), "python")
    except ExpressionError:
        return None


def countdown_score(text: str, target: int, numbers: list[int], format_score: float = 0.1, score: float = 1.0) -> float:
    equation = extract_solution(text)
    if equation is None:
        return 0.0
    if not validate_equation(equation, numbers):
        return format_score
    result = evaluate_equation(equation)
    if result is None:
        return format_score
    try:
        return score if abs(result - target) < 1e-5 else format_score
    except Exception:
        return format_score


# ------------------------------------------------------------------------------------------------------ Sudoku


def extract_answer_sudoku(text: str) -> str | None:
    matches = re.findall(r"<answer>(.*?)</answer>", text, re.DOTALL)
    if matches:
        return "".join(ch for ch in matches[-1].strip() if ch.isdigit())
    return None


def sudoku_score(text: str, puzzle: str, solution: str) -> float:
    answer = extract_answer_sudoku(text)
    if answer is None or len(answer) == 0:
        return 0.0
    answer = (answer + "0" * 16)[:16]
    empty = [i for i in range(16) if puzzle[i] == "0"]
    if not empty:
        return 0.0
    return sum(1 for i in empty if answer[i] == solution[i]) / len(empty)
