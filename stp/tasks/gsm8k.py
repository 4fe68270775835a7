"""GSM8K: grade-school math word problems with an integer answer.

Data schema (JSONL / JSON / CSV / parquet, one example per row):

    question: str             the problem
    answer:   str | int       the final answer ("72"), or a full GSM8K solution ending in "#### 72"

A full solution is kept as ``solution``; ``answer`` becomes its final answer without thousands commas ("1,080" ->
"1080"). ``d1_compat`` takes its reference from ``solution`` as d1 does (text after the first "####", commas kept).

Hub: ``openai/gsm8k`` (config ``main``), splits train (7473) and test (1319).

Rewards (docs/method.md 5, d1 protocol; maximum 0.5 + 0.5 + 0.5 + 0.5 + 2.0 = 4.0):

    xmlcount_reward    0.125 per tag line used exactly once, less 0.001 per character after the answer
    soft_format_reward 0.5 if the completion starts <reasoning>...</reasoning> <answer>...</answer>
    strict_format_reward 0.5 if it is exactly "<reasoning>\\n...\\n</reasoning>\\n<answer>\\n...\\n</answer>\\n"
    int_reward         0.5 if the extracted answer is an integer
    correctness_reward 2.0 if the extracted answer equals the reference (as numbers)
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any, ClassVar

from . import _d1
from .base import SYSTEM_PROMPT, Task
from .data import Where, get_str, load_hub
from .extract import answer_block
from .latex import last_boxed

__all__ = [
    "GSM8K",
    "parse_number",
    "xmlcount_reward",
    "soft_format_reward",
    "strict_format_reward",
    "int_reward",
    "correctness_reward",
]

# ASCII digits only (re.ASCII): "１８" (full-width) or "١٨" (Arabic-Indic) is not an answer, as in Sudoku.
_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?", re.ASCII)
_THOUSANDS = re.compile(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?", re.ASCII)
_MAX_NUMBER_CHARS = 64


def parse_number(text: str | None) -> Decimal | None:
    """The number an answer states: ASCII digits with an optional sign, decimals, thousands commas, a leading ``$``,
    a trailing period, or wrapped in ``\\boxed{}``; None for anything else (words, units, ``9e999``, ``10**10000``,
    non-ASCII digits such as ``１８``).

    >>> parse_number("1,234"), parse_number("$18."), parse_number("\\\\boxed{-3}"), parse_number("18 apples")
    (Decimal('1234'), Decimal('18'), Decimal('-3'), None)
    """
    if text is None:
        return None
    s = text.strip()
    if "\\boxed" in s:
        boxed = last_boxed(s)
        if boxed is None:
            return None
        s = boxed.strip()
    s = s.replace("\\$", "").lstrip("$").rstrip(".").strip()
    if len(s) > _MAX_NUMBER_CHARS:
        return None
    if _THOUSANDS.fullmatch(s):
        s = s.replace(",", "")
    if not _NUMBER.fullmatch(s):
        return None
    try:
        return Decimal(s)
    except InvalidOperation:  # pragma: no cover - the pattern admits only valid decimals
        return None


def _is_integer_literal(text: str | None) -> bool:
    value = parse_number(text)
    return value is not None and value == value.to_integral_value() and "." not in (text or "").strip().rstrip(".")


# ------------------------------------------------------------------------------------------------------- rewards


def xmlcount_reward(completion: str, example: Mapping[str, Any], *, d1_compat: bool = False) -> float:
    """0.125 for each of ``<reasoning>\\n``, ``\\n</reasoning>\\n``, ``\\n<answer>\\n``, ``\\n</answer>`` present exactly
    once, less 0.001 per character after the closing tag (twice, as d1 does), each tag's credit floored at 0.

    Fixed (vs d1): the trailing-text penalty counts only text after ``</answer>`` (d1 counts the whole completion
    when it has no ``"\\n</answer>\\n"``) and cannot push a tag's credit below 0 (d1's is unbounded).

    >>> xmlcount_reward("<reasoning>\\nr\\n</reasoning>\\n<answer>\\n4\\n</answer>", {})
    0.5
    >>> xmlcount_reward("<reasoning>\\nr\\n</reasoning>\\n<answer>\\n4\\n</answer>\\nxx", {})
    0.496
    >>> round(xmlcount_reward("x" * 300 + "\\n<answer>\\n4\\n</answer>", {}, d1_compat=True), 3)
    -0.07
    """
    if d1_compat:
        return _d1.count_xml(completion)
    count = 0.0
    if completion.count("<reasoning>\n") == 1:
        count += 0.125
    if completion.count("\n</reasoning>\n") == 1:
        count += 0.125
    close = completion.rfind("\n</answer>")
    trailing = len(completion[close + len("\n</answer>") :].removeprefix("\n")) if close >= 0 else 0
    if completion.count("\n<answer>\n") == 1:
        count += max(0.0, 0.125 - trailing * 0.001)
    if completion.count("\n</answer>") == 1:
        count += max(0.0, 0.125 - trailing * 0.001)
    return round(count, 6)


# The formats, read with re.DOTALL (reasoning spans lines; d1 published them without it). Matched by string scans
# equivalent to ``re.match`` of
#   soft    r"<reasoning>.*?</reasoning>\s*<answer>.*?</answer>"
#   strict  r"^<reasoning>\n.*?\n</reasoning>\n<answer>\n.*?\n</answer>\n$"
# because the regexes backtrack quadratically on texts such as "</reasoning><answer>" repeated.
_MID = "\n</reasoning>\n<answer>\n"
_TAIL = "\n</answer>\n"


def _soft_match(text: str) -> bool:
    if not text.startswith("<reasoning>"):
        return False
    last_close = text.rfind("</answer>")
    n = len(text)
    p = text.find("</reasoning>", 11)
    while p >= 0:
        q = p + 12
        while q < n and text[q].isspace():  # \s for str patterns is str.isspace
            q += 1
        if text.startswith("<answer>", q):
            return last_close >= q + 8
        p = text.find("</reasoning>", p + 1)
    return False


def _strict_match(text: str) -> bool:
    if not text.startswith("<reasoning>\n"):
        return False
    if text.endswith(_TAIL):
        end = len(text) - len(_TAIL)
    elif text.endswith(_TAIL + "\n"):  # "$" also matches before a final newline
        end = len(text) - len(_TAIL) - 1
    else:
        return False
    p = text.find(_MID, 12)
    return 0 <= p and p + len(_MID) <= end


def soft_format_reward(completion: str, example: Mapping[str, Any], *, d1_compat: bool = False) -> float:
    """0.5 if the completion starts with ``<reasoning>...</reasoning>``, then ``<answer>...</answer>`` (any text).

    >>> soft_format_reward("<reasoning>a\\nb</reasoning> <answer>4</answer>", {})
    0.5
    >>> soft_format_reward("<reasoning>a\\nb</reasoning> <answer>4</answer>", {}, d1_compat=True)
    0.0
    """
    if d1_compat:
        return _d1.soft_format(completion)
    return 0.5 if _soft_match(completion) else 0.0


def strict_format_reward(completion: str, example: Mapping[str, Any], *, d1_compat: bool = False) -> float:
    """0.5 if the completion is exactly ``<reasoning>\\n...\\n</reasoning>\\n<answer>\\n...\\n</answer>\\n``.

    >>> strict_format_reward("<reasoning>\\na\\nb\\n</reasoning>\\n<answer>\\n4\\n</answer>\\n", {})
    0.5
    >>> strict_format_reward("<reasoning>\\na\\nb\\n</reasoning>\\n<answer>\\n4\\n</answer>\\n", {}, d1_compat=True)
    0.0
    """
    if d1_compat:
        return _d1.strict_format(completion)
    return 0.5 if _strict_match(completion) else 0.0


def int_reward(completion: str, example: Mapping[str, Any], *, d1_compat: bool = False) -> float:
    """0.5 if the extracted answer is an integer (sign and thousands commas allowed).

    >>> int_reward("<answer>\\n-3\\n</answer>", {}), int_reward("<answer>3.5</answer>", {}), int_reward("18", {})
    (0.5, 0.0, 0.0)
    """
    if d1_compat:
        return _d1.int_reward(completion)
    return 0.5 if _is_integer_literal(answer_block(completion)) else 0.0


def correctness_reward(completion: str, example: Mapping[str, Any], *, d1_compat: bool = False) -> float:
    """2.0 if the extracted answer equals ``example["answer"]`` as a number (string equality if not numeric).

    d1_compat: string equality with d1's reference (:func:`d1_reference`), thousands commas included.

    >>> correctness_reward("<reasoning>\\n...\\n</reasoning>\\n<answer>\\n1,000\\n</answer>", {"answer": "1000"})
    2.0
    >>> correctness_reward("<answer>\\n1,000\\n</answer>", {"answer": "1000"}, d1_compat=True)
    0.0
    """
    if d1_compat:
        return _d1.correctness(completion, d1_reference(example))
    return 2.0 if _same_answer(answer_block(completion), str(example["answer"])) else 0.0


def d1_reference(example: Mapping[str, Any]) -> str:
    """The reference d1 compares with: ``text.split("####")[1].strip()`` of the raw GSM8K solution when the example
    keeps one (``solution``), else ``example["answer"]`` as given.

    >>> d1_reference({"answer": "1080", "solution": "3 * 360 = 1,080\\n#### 1,080"}), d1_reference({"answer": 7})
    ('1,080', '7')
    """
    solution = example.get("solution")
    if isinstance(solution, str) and "####" in solution:
        return _d1.gsm8k_reference(solution)
    return str(example["answer"])


def _same_answer(prediction: str | None, reference: str) -> bool:
    if prediction is None:
        return False
    a, b = parse_number(prediction), parse_number(reference)
    if b is None:
        return prediction.strip() == reference.strip()
    return a is not None and a == b


# --------------------------------------------------------------------------------------------------------- task


def final_answer(answer: str) -> str:
    """The final answer of a GSM8K solution (the text after ``####``), or the answer itself.

    >>> final_answer("She has 3 + 4 = <<3+4=7>>7 apples.\\n#### 7"), final_answer("72")
    ('7', '72')
    """
    return answer.split("####")[-1].strip().replace(",", "") if "####" in answer else answer.strip()


@dataclass(frozen=True)
class GSM8K(Task):
    name: ClassVar[str] = "gsm8k"
    reward_functions: ClassVar = (
        xmlcount_reward,
        soft_format_reward,
        strict_format_reward,
        int_reward,
        correctness_reward,
    )

    def extract_answer(self, completion: str) -> str | None:
        """The content of the last ``<answer>`` block (d1_compat: d1's split, the whole text when tags are missing)."""
        return _d1.extract_xml_answer(completion) if self.d1_compat else answer_block(completion)

    def metric(self, completion: str, example: Mapping[str, Any]) -> float:
        return correctness_reward(completion, example, d1_compat=self.d1_compat) / 2.0

    def parse_row(self, row: Mapping[str, Any], where: Where) -> dict:
        question = get_str(row, ("question",), where)
        raw = get_str(row, ("answer",), where, allow_int=True)
        answer = final_answer(raw)
        if not answer:
            raise where.error("answer", "empty final answer after '####'")
        extra = {"solution": raw} if "####" in raw else {}
        return {**row, **extra, "question": question, "answer": answer}

    def load_hub(self, split: str) -> list[dict]:
        return load_hub("openai/gsm8k", split, self.parse_row, config="main")

    def prompt_text(self, example: Mapping[str, Any]) -> str:
        return SYSTEM_PROMPT + "\n\n" + example["question"]
