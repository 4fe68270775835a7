"""Countdown with 3 numbers: combine the numbers with + - * / into an expression equal to the target.

Data schema (JSONL / JSON / CSV / parquet, one example per row):

    nums:   list[int] of 3    the numbers (alias ``numbers``; CSV: "[44, 19, 35]" or "44,19,35")
    target: int               the target
    d1's test file rows ``{"input": "44,19,35", "output": 98}`` are accepted as they are.

Hub: ``Jiayi-Pan/Countdown-Tasks-3to4`` (train split only, filtered to 3 numbers). d1's 256-problem test set is a
local file (``countdown_cd3_test.jsonl``): pass it as ``data_path``, or use ``source="generated"``.

Reward (docs/method.md 5; maximum 1.0): 1.0 if the answer is an expression that uses each given number exactly once and
equals the target (|error| < 1e-5); 0.1 if an expression is present but wrong; 0 otherwise. Parsed by
``stp.tasks.arith``, never ``eval``. An expression inside ``\\boxed{}`` in the answer counts (d1's evaluation prompt
asks for one), with ``\\times``, ``\\cdot`` and ``\\div`` read as ``*``, ``*`` and ``/``.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Mapping
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, ClassVar

from . import _d1
from .arith import ExpressionError, evaluate, parse
from .base import SYSTEM_PROMPT, Task
from .data import Where, get_int, get_int_list, load_hub
from .extract import answer_block
from .latex import last_boxed

__all__ = ["Countdown", "countdown_reward", "check_expression", "answer_expression", "solve", "generate", "split_of"]


def check_expression(text: str | None, nums: list[int], target: int) -> float:
    """1.0 right, 0.1 an expression but wrong (wrong numbers, wrong value, division by zero), 0.0 not an expression.

    >>> check_expression("(44 + 19) + 35", [44, 19, 35], 98), check_expression("44 + 19", [44, 19, 35], 98)
    (1.0, 0.1)
    >>> check_expression("44+19+35=98", [44, 19, 35], 98), check_expression("10**10000", [10, 10000, 1], 98)
    (0.0, 0.0)
    """
    if not text:
        return 0.0
    try:
        expression = parse(text, "strict")
    except ExpressionError:
        return 0.0
    if sorted(expression.literals) != sorted(Fraction(v) for v in nums):
        return 0.1
    try:
        value = evaluate(expression, "strict")
    except ExpressionError:
        return 0.1
    return 1.0 if abs(value - target) < Fraction(1, 100_000) else 0.1


def countdown_reward(completion: str, example: Mapping[str, Any], *, d1_compat: bool = False) -> float:
    """Countdown reward of the last ``<answer>`` block against ``example["nums"]`` and ``example["target"]``.

    Fixed (vs d1): "an expression is present" means the answer parses as one; d1 gives 0.1 to any tagged text
    (prose, an equation with "=", an empty answer). d1's evaluation also accepted ``**``, ``//`` and decimals
    through Python ``eval``; here only + - * / on integer literals count. Policy (not in d1's reward): an answer
    left open at the end of the text, and a ``\\boxed{}`` expression inside the answer, count.

    >>> ex = {"nums": [2, 3, 4], "target": 5}
    >>> countdown_reward("<answer>\\n2*4-3\\n</answer>", ex), countdown_reward("<answer>2*4</answer>", ex)
    (1.0, 0.1)
    >>> countdown_reward("<answer>no idea</answer>", ex), countdown_reward("<answer>no idea</answer>", ex, d1_compat=True)
    (0.0, 0.1)
    """
    nums, target = list(example["nums"]), example["target"]
    if d1_compat:
        return float(_d1.countdown_score(completion, target, nums))
    return check_expression(answer_expression(answer_block(completion)), nums, target)


_LATEX_OPS = (("\\times", "*"), ("\\cdot", "*"), ("\\div", "/"))


def answer_expression(block: str | None) -> str | None:
    """The expression an answer block states: the content of its last ``\\boxed{}`` when it has one, with LaTeX's
    ``\\times``, ``\\cdot``, ``\\div`` as ``*``, ``*``, ``/``; None when there is no answer.

    >>> answer_expression("\\\\boxed{44 + 19 + 35}"), answer_expression("$\\\\boxed{(6 \\\\times 8) \\\\div 3}$")
    ('44 + 19 + 35', '(6 * 8) / 3')
    """
    if block is None:
        return None
    if "\\boxed" in block or "\\fbox" in block:
        boxed = last_boxed(block)
        if boxed is not None:
            block = boxed
    for latex, op in _LATEX_OPS:
        block = block.replace(latex, op)
    return block


# ---------------------------------------------------------------------------------------------------- generator


def _combos(nums: tuple[int, ...]) -> dict[Fraction, str]:
    """Every value reachable from all of ``nums`` (each once), with one expression for it."""
    if len(nums) == 1:
        return {Fraction(nums[0]): str(nums[0])}
    out: dict[Fraction, str] = {}
    n = len(nums)
    for mask in range(1, 2**n - 1):
        left = tuple(nums[i] for i in range(n) if mask >> i & 1)
        right = tuple(nums[i] for i in range(n) if not mask >> i & 1)
        for a, ea in _combos(left).items():
            for b, eb in _combos(right).items():
                ea_, eb_ = (f"({ea})" if len(left) > 1 else ea), (f"({eb})" if len(right) > 1 else eb)
                candidates = [(a + b, f"{ea_} + {eb_}"), (a - b, f"{ea_} - {eb_}"), (a * b, f"{ea_} * {eb_}")]
                if b != 0:
                    candidates.append((a / b, f"{ea_} / {eb_}"))
                for value, expr in candidates:
                    out.setdefault(value, expr)
    return out


def solve(nums: list[int], target: int) -> str | None:
    """An expression using each number once that equals ``target``, or None.

    >>> solve([44, 19, 35], 98) is not None, solve([1, 1, 1], 100)
    (True, None)
    """
    return _combos(tuple(nums)).get(Fraction(target))


def split_of(nums: list[int], target: int, test_fraction: float) -> str:
    """The split a puzzle belongs to: a hash of (sorted numbers, target), independent of any seed."""
    key = f"countdown:{sorted(nums)}:{target}".encode()
    bucket = int.from_bytes(hashlib.sha256(key).digest()[:8], "big") / 2**64
    return "test" if bucket < test_fraction else "train"


def generate(
    n: int,
    split: str,
    seed: int = 0,
    *,
    num_range: tuple[int, int] = (1, 99),
    target_range: tuple[int, int] = (1, 100),
    test_fraction: float = 0.1,
) -> list[dict]:
    """``n`` distinct Countdown puzzles of one split, each with a solution.

    How the split is guaranteed: every puzzle (sorted numbers, target) is assigned to train or test by a SHA-256 hash
    of that key (:func:`split_of`), never by the seed or by generation order. A puzzle of one split can therefore
    never appear in the other, whatever the seeds and sizes; and as an expression determines both its numbers and its
    value, no solution of a test puzzle is a solution of a train puzzle either. Within a split, puzzles are distinct.

    Each puzzle: 3 numbers drawn uniformly from ``num_range``; the target drawn uniformly among the distinct integer
    values in ``target_range`` reachable with all three (so it is solvable), with the solution stored.

    >>> [p["nums"] + [p["target"]] for p in generate(2, "test", seed=0)] == [p["nums"] + [p["target"]] for p in generate(2, "test", seed=0)]
    True
    """
    def draw(rng: random.Random):
        nums = [rng.randint(*num_range) for _ in range(3)]
        reachable = _combos(tuple(nums))
        targets = sorted(
            int(v) for v in reachable if v.denominator == 1 and target_range[0] <= v <= target_range[1]
        )
        if not targets:
            return None
        target = rng.choice(targets)
        return nums, target, reachable[Fraction(target)]

    return distinct_puzzles(n, split, f"countdown:{split}:{seed}", draw, test_fraction,
                            "widen num_range/target_range")


def distinct_puzzles(n: int, split: str, rng_name: str, draw, test_fraction: float, hint: str) -> list[dict]:
    """``n`` distinct puzzles of ``split`` from ``draw(rng) -> (nums, target, solution) | None`` (None: no puzzle
    from this draw), with ``random.Random(rng_name)``. A draw is kept when its key (sorted numbers, target) is new
    and :func:`split_of` puts it in ``split``; ``hint`` ends the error when too few distinct puzzles exist."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    rng = random.Random(rng_name)
    seen: set[tuple] = set()
    out: list[dict] = []
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 200 * n + 1000:
            raise RuntimeError(f"could not make {n} distinct {split} puzzles; {hint}")
        drawn = draw(rng)
        if drawn is None:
            continue
        nums, target, solution = drawn
        key = (tuple(sorted(nums)), target)
        if key in seen or split_of(nums, target, test_fraction) != split:
            continue
        seen.add(key)
        out.append({"nums": nums, "target": target, "solution": solution})
    return out


# --------------------------------------------------------------------------------------------------------- task


@dataclass(frozen=True)
class Countdown(Task):
    name: ClassVar[str] = "countdown"
    reward_functions: ClassVar = (countdown_reward,)

    def extract_answer(self, completion: str) -> str | None:
        """The expression of the last ``<answer>`` block, unboxed (d1_compat: d1's last regex match)."""
        return _d1.extract_solution(completion) if self.d1_compat else answer_expression(answer_block(completion))

    def metric(self, completion: str, example: Mapping[str, Any]) -> float:
        return 1.0 if countdown_reward(completion, example, d1_compat=self.d1_compat) == 1.0 else 0.0

    def parse_row(self, row: Mapping[str, Any], where: Where) -> dict:
        nums = get_int_list(row, ("nums", "numbers", "input"), where)
        if len(nums) != 3:
            field = next(f for f in ("nums", "numbers", "input") if f in row)
            raise where.error(field, f"expected 3 numbers, got {len(nums)}: {nums}")
        target = get_int(row, ("target", "output"), where)
        return {**row, "nums": nums, "target": target}

    def load_hub(self, split: str) -> list[dict]:
        if split != "train":
            raise RuntimeError(
                "Jiayi-Pan/Countdown-Tasks-3to4 has only a train split; for the test set pass d1's "
                "countdown_cd3_test.jsonl as data_path, or use source='generated'"
            )
        return load_hub("Jiayi-Pan/Countdown-Tasks-3to4", "train", self.parse_row, keep=lambda r: len(r["nums"]) == 3)

    def generate(self, split: str, *, n: int | None = None, seed: int = 0) -> list[dict]:
        return generate(n if n is not None else (256 if split == "test" else 10_000), split, seed)

    def prompt_text(self, example: Mapping[str, Any]) -> str:
        nums, target = list(example["nums"]), example["target"]
        return (
            f"{SYSTEM_PROMPT}\nUsing only the numbers {nums}, create an arithmetic expression that evaluates to "
            f"exactly {target}. You must use all numbers from the list, and each number must be used exactly once. "
            "You may use the operations +, -, *, and / as needed. After reasoning, provide only your final "
            "expression inside <answer></answer> tags without including an equals sign or the target number. "
            "For example, if the numbers are [2, 3, 4] and the target is 5, a valid answer is: "
            "<answer>\n2*4-3\n</answer>"
        )
