"""Countdown with 3 small numbers and + / - only: the task of the methods' comparison (``benchmarks/methods.py``).

The same prompt, answer format, reward (1.0 if the answer uses each number once and equals the target, 0.1 an
expression but wrong, 0 none) and metric as :mod:`stp.tasks.countdown` (any of + - * / is accepted in an answer),
with a smaller generator: 3 numbers from 1-12 and a target ``a + b + c``, ``a + b - c``, ``a - b + c`` or
``a - b - c`` (numbers in the prompt's order, target >= 1), the solution stored in that form with two digits per
number (``07+05-03``: the strict parser reads ``07`` as 7). The tiny model's compact prompt writes every number with
two digits too (``countdown 07 05 03 -> 09``, ``stp.tasks.prompts.compact_prompt``), so each number sits at the same
position in every prompt and answer, as the Sudoku grid does: copying them is then easy for the tiny model, which
otherwise (numbers of one or two digits) does not learn to copy them within a few CPU minutes of SFT.

Why a second Countdown. On full Countdown (numbers up to 99, targets up to 100, four operations) the embedded tiny
model, pretrained for a few CPU minutes, solves none of the held-out puzzles, greedy or among 8 samples: RL has
nothing to reinforce. Here an answer is a choice of two signs that the model must check with small additions: the
pretrained model gets some greedy answers right and many more among its samples (pass@8 far above greedy accuracy:
``python -m benchmarks.pass_at_k``), which is what RL with a binary reward can sharpen.

Splits: about 1,260 distinct puzzles (sorted numbers, target) exist; a SHA-256 hash of that key puts 30 % of them in
test (:func:`stp.tasks.countdown.split_of`), so no held-out puzzle, in any order of its numbers, is a training one.
Default sizes: 256 test puzzles, 600 train puzzles. Data schema for files: as Countdown (``nums``, ``target``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import ClassVar

from .countdown import Countdown, distinct_puzzles

__all__ = ["SmallCountdown", "generate", "NUM_RANGE", "TEST_FRACTION"]

NUM_RANGE = (1, 12)
TEST_FRACTION = 0.3


def generate(n: int, split: str, seed: int = 0) -> list[dict]:
    """``n`` distinct puzzles of ``split``: numbers uniform in ``NUM_RANGE``, the target uniform over the distinct
    values >= 1 of ``a +- b +- c``, the solution the first sign pattern (``+ +``, ``+ -``, ``- +``, ``- -``) that
    reaches it (two digits per number). Distinct = distinct (sorted numbers, target), the key :func:`split_of` hashes.

    >>> [e["solution"] for e in generate(2, "test")] == [e["solution"] for e in generate(2, "test")]
    True
    """
    def draw(rng: random.Random):
        a, b, c = (rng.randint(*NUM_RANGE) for _ in range(3))
        reach: dict[int, str] = {}
        for sb in "+-":
            for sc in "+-":
                value = a + (b if sb == "+" else -b) + (c if sc == "+" else -c)
                if value >= 1:
                    reach.setdefault(value, f"{a:02d}{sb}{b:02d}{sc}{c:02d}")
        if not reach:
            return None
        target = rng.choice(sorted(reach))
        return [a, b, c], target, reach[target]

    return distinct_puzzles(n, split, f"countdown_small:{split}:{seed}", draw, TEST_FRACTION,
                            "about 1,260 exist, 30 % of them test")


@dataclass(frozen=True)
class SmallCountdown(Countdown):
    """Countdown with numbers 1-12 and targets a +- b +- c (procedurally generated; no hub dataset)."""

    name: ClassVar[str] = "countdown_small"
    default_source: ClassVar[str] = "generated"

    def load_hub(self, split: str) -> list[dict]:
        raise RuntimeError(f"{self.name}: no hub dataset; use source='generated' (the default) or data_path=PATH")

    def generate(self, split: str, *, n: int | None = None, seed: int = 0) -> list[dict]:
        """``n`` distinct puzzles of ``split`` (default 256 test / 600 train), each with a stored solution.

        >>> ex = SmallCountdown().generate("test", n=2)
        >>> all(1 <= v <= 12 for e in ex for v in e["nums"]) and all(e["target"] >= 1 for e in ex)
        True
        """
        return generate(n if n is not None else (256 if split == "test" else 600), split, seed)
