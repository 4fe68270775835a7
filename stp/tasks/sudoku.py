"""4x4 Sudoku: fill the empty cells so every row, column and 2x2 box holds 1-4 once.

Data schema (JSONL / JSON / CSV / parquet, one example per row):

    puzzle:   str of 16       row-major, digits 0-4, "0" (or ".") for an empty cell (alias ``Puzzle``, d1's CSV)
    solution: str of 16       the solved grid, digits 1-4, agreeing with every given cell (alias ``Solution``)

No hub dataset: d1's 4x4 puzzles are a local CSV (``4x4_sudoku_unique_puzzles.csv``, columns Puzzle, Solution): pass
it as ``data_path``; by default puzzles come from :func:`generate`.

Reward (docs/method.md 5; maximum 1.0): the fraction of the puzzle's empty cells that the 16 digits of the answer fill
correctly (the answer's digits are padded with 0 / cut to 16).
"""

from __future__ import annotations

import functools
import hashlib
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from . import _d1
from .base import Task
from .data import Where, get_str
from .extract import answer_block

__all__ = ["Sudoku", "sudoku_reward", "count_solutions", "all_grids", "generate", "split_of", "SUDOKU_PROMPT"]

SUDOKU_PROMPT = """
Please solve the following 4x4 Sudoku puzzle. The puzzle is provided as a 16-character string reading left-to-right, top-to-bottom, where '0' represents empty cells.

Rules:
- Fill empty cells with digits 1-4
- Each row must contain digits 1-4 exactly once
- Each column must contain digits 1-4 exactly once
- Each 2x2 box must contain digits 1-4 exactly once

Important: Your solution must be a COMPLETE 16-character string with only the digits 1-4, representing your final solved grid.

Respond in this exact format:
<reasoning>
Your step-by-step solving process
</reasoning>
<answer>
[16-character solution string with no spaces or separators]
</answer>
"""  # noqa: E501 (d1's prompt, verbatim)

_DIGITS = "0123456789"


def sudoku_reward(completion: str, example: Mapping[str, Any], *, d1_compat: bool = False) -> float:
    """Fraction of ``example["puzzle"]``'s empty cells that the answer's digits fill as ``example["solution"]`` does.

    >>> ex = {"puzzle": "1034" "3400" "2000" "4300", "solution": "1234" "3412" "2143" "4321"}
    >>> sudoku_reward("<answer>\\n1234\\n3412\\n2143\\n4321\\n</answer>", ex), sudoku_reward("<answer>1234</answer>", ex)
    (1.0, 0.125)
    >>> sudoku_reward("1234341221434321", ex)
    0.0
    """
    puzzle, solution = example["puzzle"], example["solution"]
    if d1_compat:
        return _d1.sudoku_score(completion, puzzle, solution)
    block = answer_block(completion)
    if block is None:
        return 0.0
    digits = "".join(ch for ch in block if ch in _DIGITS)
    if not digits:
        return 0.0
    digits = (digits + "0" * 16)[:16]
    empty = [i for i in range(16) if puzzle[i] == "0"]
    if not empty:
        return 0.0
    return sum(digits[i] == solution[i] for i in empty) / len(empty)


# ---------------------------------------------------------------------------------------------------- generator

_UNITS = (
    [[r * 4 + c for c in range(4)] for r in range(4)]
    + [[r * 4 + c for r in range(4)] for c in range(4)]
    + [[(br + r) * 4 + bc + c for r in range(2) for c in range(2)] for br in (0, 2) for bc in (0, 2)]
)
_PEERS = [sorted({j for unit in _UNITS if i in unit for j in unit} - {i}) for i in range(16)]


def _solutions(cells: list[str], limit: int) -> int:
    try:
        i = cells.index("0")
    except ValueError:
        return 1
    found = 0
    used = {cells[j] for j in _PEERS[i]}
    for d in "1234":
        if d not in used:
            cells[i] = d
            found += _solutions(cells, limit - found)
            cells[i] = "0"
            if found >= limit:
                break
    return found


def count_solutions(puzzle: str, limit: int = 2) -> int:
    """Number of solutions of a puzzle, counting up to ``limit`` (0 if its givens already clash).

    >>> count_solutions("1234341221434321"), count_solutions("0" * 16, limit=5), count_solutions("1100" + "0" * 12)
    (1, 5, 0)
    """
    cells = list(puzzle)
    for i, d in enumerate(cells):
        if d != "0" and any(cells[j] == d for j in _PEERS[i]):
            return 0
    return _solutions(cells, limit)


@functools.cache
def all_grids() -> tuple[str, ...]:
    """All 288 solved 4x4 grids, sorted."""
    out: list[str] = []

    def fill(cells: list[str]) -> None:
        if "0" not in cells:
            out.append("".join(cells))
            return
        i = cells.index("0")
        used = {cells[j] for j in _PEERS[i]}
        for d in "1234":
            if d not in used:
                cells[i] = d
                fill(cells)
                cells[i] = "0"

    fill(["0"] * 16)
    return tuple(sorted(out))


def split_of(solution: str, test_fraction: float) -> str:
    """The split of a solved grid: a hash of the grid, independent of any seed."""
    bucket = int.from_bytes(hashlib.sha256(f"sudoku4:{solution}".encode()).digest()[:8], "big") / 2**64
    return "test" if bucket < test_fraction else "train"


def generate(
    n: int,
    split: str,
    seed: int = 0,
    *,
    empty_range: tuple[int, int] = (4, 10),
    test_fraction: float = 0.25,
) -> list[dict]:
    """``n`` distinct 4x4 puzzles with a unique solution, of one split.

    How the split is guaranteed: the 288 solved grids are divided into train and test by a SHA-256 hash of the grid
    (:func:`split_of`; about ``test_fraction`` of them in test), never by the seed. A puzzle is made only from a grid
    of its own split, and since each puzzle has exactly one solution, a test puzzle can never equal a train puzzle,
    and no test solution is a train solution, whatever the seeds and sizes. Within a split, puzzles are distinct.

    Each puzzle: a random grid of the split; cells removed in random order, each removal kept only if the solution
    stays unique, until the drawn number of empty cells (uniform in ``empty_range``) is reached.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    grids = [g for g in all_grids() if split_of(g, test_fraction) == split]
    rng = random.Random(f"sudoku:{split}:{seed}")
    seen: set[str] = set()
    out: list[dict] = []
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 50 * n + 1000:
            raise RuntimeError(f"could not make {n} distinct {split} puzzles with empty_range={empty_range}")
        solution = rng.choice(grids)
        want = rng.randint(*empty_range)
        cells = list(solution)
        order = list(range(16))
        rng.shuffle(order)
        removed = 0
        for i in order:
            if removed == want:
                break
            keep, cells[i] = cells[i], "0"
            if count_solutions("".join(cells)) == 1:
                removed += 1
            else:
                cells[i] = keep
        puzzle = "".join(cells)
        if removed < empty_range[0] or puzzle in seen:
            continue
        seen.add(puzzle)
        out.append({"puzzle": puzzle, "solution": solution})
    return out


def valid_grid(grid: str) -> bool:
    """Whether 16 characters form a solved 4x4 grid."""
    return len(grid) == 16 and all(sorted(grid[i] for i in unit) == list("1234") for unit in _UNITS)


# --------------------------------------------------------------------------------------------------------- task


@dataclass(frozen=True)
class Sudoku(Task):
    name: ClassVar[str] = "sudoku"
    reward_functions: ClassVar = (sudoku_reward,)
    default_source: ClassVar[str] = "generated"

    def extract_answer(self, completion: str) -> str | None:
        """The digits of the last ``<answer>`` block (d1_compat: of d1's last regex match)."""
        if self.d1_compat:
            return _d1.extract_answer_sudoku(completion)
        block = answer_block(completion)
        return None if block is None else "".join(ch for ch in block if ch in _DIGITS)

    def metric(self, completion: str, example: Mapping[str, Any]) -> float:
        return sudoku_reward(completion, example, d1_compat=self.d1_compat)

    def parse_row(self, row: Mapping[str, Any], where: Where) -> dict:
        puzzle = get_str(row, ("puzzle", "Puzzle"), where).strip().replace(".", "0")
        solution = get_str(row, ("solution", "Solution"), where).strip()
        pf = "puzzle" if "puzzle" in row else "Puzzle"
        sf = "solution" if "solution" in row else "Solution"
        if len(puzzle) != 16 or any(ch not in "01234" for ch in puzzle):
            raise where.error(pf, f"expected 16 characters from 0-4 ('.' or '0' = empty), got {puzzle!r:.40}")
        if not valid_grid(solution):
            raise where.error(sf, f"not a solved 4x4 grid of 16 digits 1-4: {solution!r:.40}")
        if any(p != "0" and p != s for p, s in zip(puzzle, solution)):
            raise where.error(sf, "disagrees with a given cell of the puzzle")
        return {**row, "puzzle": puzzle, "solution": solution}

    def load_hub(self, split: str) -> list[dict]:
        raise RuntimeError(
            "no hub dataset for 4x4 Sudoku: pass d1's 4x4_sudoku_unique_puzzles.csv (or any file with puzzle, "
            "solution) as data_path, or use source='generated'"
        )

    def generate(self, split: str, *, n: int | None = None, seed: int = 0) -> list[dict]:
        return generate(n if n is not None else (256 if split == "test" else 2_000), split, seed)

    def prompt_text(self, example: Mapping[str, Any]) -> str:
        return f"{SUDOKU_PROMPT}\n\nSolve the following Sudoku puzzle: {example['puzzle']}\n"
