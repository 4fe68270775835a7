"""MATH (MATH500 for evaluation): competition problems with a LaTeX answer in ``\\boxed{}``.

Data schema (JSONL / JSON / CSV / parquet, one example per row):

    problem:  str             the problem (LaTeX)
    answer:   str | int       the reference answer ("\\frac{1}{2}"); or, instead,
    solution: str             a worked solution whose last \\boxed{} holds the answer (d1's training data)

Hub: test = ``HuggingFaceH4/MATH-500`` (500); train = ``ankner/math-500`` train split (d1's training source), whose
rows carry ``solution``. Rows keep their ``solution``: ``d1_compat`` takes its reference from it with d1's own helpers
(:func:`d1_reference`), as d1's data loader passes the solution column to its reward.

Rewards (docs/method.md 5, d1 protocol; maximum 2.0 + 1.0 = 3.0):

    correctness_reward 2.0 if the last \\boxed{} of the completion is equivalent to the reference (the project's
                       LaTeX normalisation, else math-verify's symbolic comparison; d1_compat: d1's own)
    format_reward      0.5 x ([<answer>...</answer> present] + [\\boxed in the answer: 1, else 0.5])

The format term is 0.25 even for an empty completion ("else 0.5"): that is d1's formula, kept as is; a constant
offset changes no GRPO advantage.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from . import _d1
from .base import SYSTEM_PROMPT, Task
from .data import Where, get_str, load_hub
from .extract import closed_answer_block
from .latex import MAX_ANSWER_CHARS, is_equiv, last_boxed

__all__ = ["MATH", "verified_equal", "correctness_reward", "format_reward", "reference_answer", "d1_reference"]

MATH_INSTRUCTION = (
    "You are a math expert. You will be given a question to solve. Solve it step by step. "
    "Wrap the final answer in a \\boxed{}. \n\n"
)


def reference_answer(example: Mapping[str, Any]) -> str:
    """The reference answer: ``example["answer"]``, unwrapped if it is itself ``\\boxed{...}``.

    >>> reference_answer({"answer": "\\\\boxed{\\\\frac{1}{2}}"})
    '\\\\frac{1}{2}'
    """
    answer = str(example["answer"])
    boxed = last_boxed(answer) if "\\boxed" in answer else None
    return boxed if boxed is not None else answer


def d1_reference(example: Mapping[str, Any]) -> str:
    """The reference d1 compares with: ``remove_boxed(last_boxed_only_string(...))`` (d1's helpers) of the raw
    ``solution`` when the example has one, else of ``example["answer"]``. d1's helpers read ``\\boxed {5}`` as
    ``{5}``, ``\\boxed 5`` up to the next ``$``, and an ``\\fbox`` only when there is no ``\\boxed`` at all.

    >>> d1_reference({"answer": "5", "solution": "So $\\\\boxed {5}$."}), d1_reference({"answer": "\\\\frac12"})
    ('{5}', '\\\\frac12')
    """
    solution = example.get("solution")
    source = solution if isinstance(solution, str) and solution else str(example["answer"])
    return _d1.math_reference(source)


def correctness_reward(completion: str, example: Mapping[str, Any], *, d1_compat: bool = False) -> float:
    """2.0 if the last ``\\boxed{}`` in the completion is equivalent to the reference answer (``stp.tasks.latex``).

    >>> ex = {"answer": "\\\\frac{1}{2}"}
    >>> correctness_reward("<answer>\\n$\\\\boxed{0.5}$\\n</answer>", ex), correctness_reward("1/2", ex)
    (2.0, 0.0)
    >>> correctness_reward("\\\\frac{1}{2}", ex, d1_compat=True)  # d1: no box -> compares the whole completion
    2.0
    """
    if d1_compat:
        return _d1.math_correctness(completion, d1_reference(example))
    prediction, reference = last_boxed(completion), reference_answer(example)
    return 2.0 if is_equiv(prediction, reference) or verified_equal(prediction, reference) else 0.0


# math-verify's LaTeX parser takes time exponential in the nesting of parentheses (measured on a busy 2-core CPU,
# load 11: depth 2 0.13 s, 3 0.3 s, 4 0.55 s, 5 past 2 s; braces, as in nested \frac, cost little): deeper answers are
# not handed to it, and in the main thread its parse and comparison together are cut off after VERIFY_SECONDS.
MAX_VERIFY_DEPTH = 3
VERIFY_SECONDS = 1.0


def bracket_depth(text: str) -> int:
    """The deepest nesting of ``(`` and ``[`` in ``text`` (either closing bracket closes one level; braces are not
    counted).

    >>> bracket_depth("\\\\frac{1}{2}"), bracket_depth("((x+1)(x-1))"), bracket_depth("\\\\left(\\\\frac{(1)}{2}\\\\right]")
    (0, 2, 2)
    """
    depth = deepest = 0
    for c in text:
        if c in "([":
            depth += 1
            deepest = max(deepest, depth)
        elif c in ")]" and depth:
            depth -= 1
    return deepest


def _quiet_math_verify() -> None:
    """Drop math-verify's "Timeout is disabled" log line (the time box here replaces its own alarm)."""
    import logging

    for name in ("math_verify.parser", "math_verify.grader"):
        logger = logging.getLogger(name)
        if not any(getattr(f, "stp_quiet", False) for f in logger.filters):
            def keep(record: logging.LogRecord) -> bool:
                return not str(record.msg).startswith("Timeout is disabled")

            keep.stp_quiet = True
            logger.addFilter(keep)


class _Expired(BaseException):
    """Raised by the time box's alarm; a BaseException, so that no ``except Exception`` inside math-verify eats it."""


class _time_box:  # noqa: N801 - a context manager
    """Raise _Expired after ``seconds`` (``signal.setitimer``: main thread only, and only while no other interval
    timer runs; elsewhere nothing is cut off and the two caps of ``verified_equal`` alone bound the time)."""

    def __init__(self, seconds: float):
        self.seconds, self.armed, self.old = seconds, False, None

    def __enter__(self) -> _time_box:
        import signal

        if (threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer")
                and signal.getitimer(signal.ITIMER_REAL)[0] == 0):
            def expire(signum, frame):
                raise _Expired

            self.old = signal.signal(signal.SIGALRM, expire)
            signal.setitimer(signal.ITIMER_REAL, self.seconds)
            self.armed = True
        return self

    def __exit__(self, *exc) -> None:
        import signal

        if self.armed:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, self.old)


def verified_equal(prediction: str | None, reference: str) -> bool:
    """math-verify's symbolic equivalence (``x+1`` = ``1+x``, ``\\\\sqrt{8}`` = ``2\\\\sqrt{2}``, sets in any order),
    asked when ``stp.tasks.latex.is_equiv``'s spellings and exact numbers do not already match. Never equal:
    answers longer than ``MAX_ANSWER_CHARS`` or nested deeper than ``MAX_VERIFY_DEPTH`` parentheses / brackets
    (math-verify's parse time grows exponentially with that nesting), and, in the main thread, a parse and
    comparison that take more than ``VERIFY_SECONDS`` together (``signal.setitimer``; other threads rely on the two
    caps).

    >>> verified_equal("1+x", "x+1"), verified_equal("\\\\sqrt{8}", "2\\\\sqrt{2}"), verified_equal("3", "4")
    (True, True, False)
    """
    if prediction is None or len(prediction) > MAX_ANSWER_CHARS or len(reference) > MAX_ANSWER_CHARS:
        return False
    if bracket_depth(prediction) > MAX_VERIFY_DEPTH or bracket_depth(reference) > MAX_VERIFY_DEPTH:
        return False
    try:
        from math_verify import parse, verify
    except ImportError as exc:
        raise ImportError("MATH's correctness reward compares answers with math-verify, which is not installed: "
                          "pip install -e '.[math]' (or use d1_compat, d1's own comparison)") from exc
    _quiet_math_verify()
    try:
        with _time_box(VERIFY_SECONDS):
            gold = parse(f"${reference}$", parsing_timeout=None)
            pred = parse(f"${prediction}$", parsing_timeout=None)
            return bool(gold and pred and verify(gold, pred, timeout_seconds=None))
    except _Expired:  # cut off: not shown equal in time
        return False
    except Exception:  # a parse it cannot finish is not an equal answer
        return False


def format_reward(completion: str, example: Mapping[str, Any], *, d1_compat: bool = False) -> float:
    """0.5 x ([answer tags present] + [``\\boxed`` inside the answer, else 0.5]); the whole completion is searched
    for ``\\boxed`` when it has no answer tags.

    Fixed (vs d1): d1 tests ``"\\boxed" in r`` without a raw string, i.e. for a backspace character followed by
    "oxed", which never occurs, so the box credit was always the 0.5 fallback (maximum 0.75 instead of 1.0).

    >>> format_reward("<answer>\\n\\\\boxed{2}\\n</answer>", {}), format_reward("<answer>\\n2\\n</answer>", {})
    (1.0, 0.75)
    >>> format_reward("<answer>\\n\\\\boxed{2}\\n</answer>", {}, d1_compat=True), format_reward("", {})
    (0.75, 0.25)
    """
    if d1_compat:
        return _d1.math_format(completion)
    block = closed_answer_block(completion)
    searched = completion if block is None else block
    return 0.5 * ((block is not None) + (1.0 if "\\boxed" in searched else 0.5))


@dataclass(frozen=True)
class MATH(Task):
    name: ClassVar[str] = "math"
    reward_functions: ClassVar = (correctness_reward, format_reward)

    def extract_answer(self, completion: str) -> str | None:
        """The content of the last ``\\boxed{}`` (d1_compat: d1's ``remove_boxed(last_boxed_only_string(...))``)."""
        if not self.d1_compat:
            return last_boxed(completion)
        try:
            return _d1.remove_boxed(_d1.last_boxed_only_string(completion))
        except Exception:
            return completion

    def metric(self, completion: str, example: Mapping[str, Any]) -> float:
        return correctness_reward(completion, example, d1_compat=self.d1_compat) / 2.0

    def parse_row(self, row: Mapping[str, Any], where: Where) -> dict:
        problem = get_str(row, ("problem", "question"), where)
        if row.get("answer") not in (None, ""):
            answer = get_str(row, ("answer",), where, allow_int=True)
        else:
            solution = get_str(row, ("answer", "solution"), where)
            answer = last_boxed(solution)
            if answer is None and self.d1_compat:  # d1 takes the row as it is; its reference is then the solution
                try:
                    answer = _d1.math_reference(solution)
                except ValueError as exc:
                    raise where.error("solution", str(exc)) from None
            if answer is None:
                raise where.error("solution", "no answer given and no balanced \\boxed{...} in the solution")
        return {**row, "problem": problem, "answer": answer}

    def load_hub(self, split: str) -> list[dict]:
        if split == "test":
            return load_hub("HuggingFaceH4/MATH-500", "test", self.parse_row)
        return load_hub("ankner/math-500", split, self.parse_row)

    def prompt_text(self, example: Mapping[str, Any]) -> str:
        return f"{SYSTEM_PROMPT}\n\n{MATH_INSTRUCTION}{example['problem']}"
