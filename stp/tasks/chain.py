"""Chain: a running sum modulo 10 written out step by step, the long-answer task of the tiny model.

A puzzle is a start digit and 20 operations ``+d`` or ``-d`` (d in 1-9); the answer is the digit reached by applying
them in order, modulo 10. The reference completion (``stp.pretrain``) writes every step on its own line in a fixed
template, then the answer::

    <reasoning>3
    +7=0
    -4=6
    ...
    </reasoning>
    <answer>6</answer>

108 tokens under the tiny model's character tokenizer (tags are single tokens), in a 128-token canvas decoded in
blocks of 32 (64 steps): four blocks, the last one partly EOS padding. The paper's shape (a 256-token canvas) was
the first design, 32 steps and 168 tokens; its SFT ran at ~6 s per step of 32 examples on the busy 2-core machine,
beyond the CPU budget, so the chain is 20 steps and the canvas half the paper's.
Four of every five reasoning tokens are fixed by the template and the prompt (the operator, the operand, ``=``, the
newline), the fifth is a step's result, which depends on the line above: a model is confident about most tokens and
unsure of few, as LLaDA is about the tags and restated facts of its ``<reasoning>`` text. The answer needs the chain:
one wrong step makes every later result, and the answer, wrong (``+d`` and ``-d`` are permutations of the digits,
so an error is never undone by a later step), and a model of this size cannot add 20 digits in one token.

Generated operations are ``+1`` or ``-1`` (``MAX_OPERAND`` = 1; ``generate(..., max_operand=9)`` draws up to
``+-9``, and data files may hold any digit 1-9). With operands up to 9 the tiny model does not learn to compute a
step within a CPU budget: after 1,600 SFT steps (and in longer runs) the result digit stayed at its marginal
distribution whatever the line above held, because neither the previous result nor the operand alone says anything
about the next result (only the pair does), so no gradient leads attention to either. With +-1 the previous result
alone narrows the next one to two digits; the model learns to attend to it, then to the sign. The SFT adds a length
curriculum (``stp.pretrain``: chains of 4 operations in their own short canvas first, then longer ones) for the
same reason: on 20-step chains in a 128-token canvas the attention of a fresh model is spread over ~240 positions.
The answer is then the start plus the count of ``+1`` minus the count of ``-1``, modulo 10: a model that skips the
chain would have to count 20 signs exactly in one token.

The tiny model's compact prompt writes the operations as a template with the same stride as the reasoning lines
(``chain 3\\n+7=?\\n-4=?\\n...``, ``stp.tasks.prompts.compact_prompt``): each operand then sits at one fixed offset
from the line that copies it, as Sudoku's grid does, so copying is easy and the difficulty is the arithmetic.

What it is: a synthetic, procedurally generated task for CPU-sized measurements of the methods at the paper's rollout
shape, with a reasoning part that carries the computation. What it is not: natural-language reasoning, or a
benchmark of a model's mathematical ability; the reward reads only the answer (as d1's do), not the reasoning.

Data schema (JSONL / JSON / CSV / parquet, one example per row):

    start:  int 0-9          the start digit
    ops:    str              the operations, two characters each: "+" or "-" then a digit 1-9 ("+7-4+2")
    answer: int 0-9          optional; recomputed from start and ops, and a stored value that disagrees is an error

Reward (maximum 1.0): 1.0 if the last ``<answer>`` block is the answer digit, 0.1 if it is another single digit,
0 otherwise (no answer block, or not one digit). Metric: 1 when the reward is 1.

Splits: a SHA-256 hash of (start, ops) puts 30 % of all puzzles in test (:func:`split_of`), independent of any seed;
a held-out puzzle is never a training one. 10 x 2^20 (about 10^7) generated puzzles exist: 4,256 distinct draws
are all but certain to be new.
Default sizes: 256 test puzzles, 4000 train puzzles.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from .base import SYSTEM_PROMPT, Task
from .data import Where, get_int, get_str
from .extract import answer_block

__all__ = ["Chain", "chain_reward", "run_chain", "steps_text", "generate", "split_of", "N_STEPS", "TEST_FRACTION"]

N_STEPS = 20
MAX_OPERAND = 1  # generated operands are +-1 .. +-MAX_OPERAND (data files may hold any digit 1-9): module docstring
MODULUS = 10
TEST_FRACTION = 0.3
_OPS_RE = re.compile(r"(?:[+-][1-9])+")


def run_chain(start: int, ops: str) -> list[int]:
    """The running values after each operation (mod 10).

    >>> run_chain(3, "+7-4+9")
    [0, 6, 5]
    """
    values, x = [], start
    for i in range(0, len(ops), 2):
        d = int(ops[i + 1])
        x = (x + d if ops[i] == "+" else x - d) % MODULUS
        values.append(x)
    return values


def steps_text(start: int, ops: str) -> str:
    """The reasoning's lines: the start digit, then one ``OPd=R`` line per operation.

    >>> steps_text(3, "+7-4")
    '3\\n+7=0\\n-4=6\\n'
    """
    values = run_chain(start, ops)
    return f"{start}\n" + "".join(f"{ops[2 * i:2 * i + 2]}={v}\n" for i, v in enumerate(values))


def split_of(start: int, ops: str, test_fraction: float = TEST_FRACTION) -> str:
    """The split a puzzle belongs to: a hash of (start, ops), independent of any seed."""
    key = f"chain:{start}:{ops}".encode()
    bucket = int.from_bytes(hashlib.sha256(key).digest()[:8], "big") / 2**64
    return "test" if bucket < test_fraction else "train"


def generate(n: int, split: str, seed: int = 0, *, n_steps: int = N_STEPS,
             max_operand: int = MAX_OPERAND) -> list[dict]:
    """``n`` distinct puzzles of ``split``: a start digit and ``n_steps`` operations, each uniform over
    ``+1..+max_operand`` and ``-1..-max_operand``, with their answer. Draws from
    ``random.Random(f"chain:{split}:{seed}")``; a draw is kept when :func:`split_of` puts it in ``split`` and it is
    new.

    >>> generate(2, "test") == generate(2, "test"), len(generate(1, "train", n_steps=5)[0]["ops"])
    (True, 10)
    >>> sorted({op for ex in generate(20, "train", max_operand=3) for op in ex["ops"][1::2]})
    ['1', '2', '3']
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if n_steps < 1:
        raise ValueError(f"n_steps={n_steps!r}: must be >= 1")
    if not 1 <= max_operand <= 9:
        raise ValueError(f"max_operand={max_operand!r}: must be 1-9")
    rng = random.Random(f"chain:{split}:{seed}")
    seen: set[tuple[int, str]] = set()
    out: list[dict] = []
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 200 * n + 1000:
            raise RuntimeError(f"could not make {n} distinct {split} chains of {n_steps} steps; use more steps")
        start = rng.randint(0, MODULUS - 1)
        ops = "".join(rng.choice("+-") + str(rng.randint(1, max_operand)) for _ in range(n_steps))
        if (start, ops) in seen or split_of(start, ops) != split:
            continue
        seen.add((start, ops))
        out.append({"start": start, "ops": ops, "answer": run_chain(start, ops)[-1]})
    return out


def chain_reward(completion: str, example: Mapping[str, Any], *, d1_compat: bool = False) -> float:
    """1.0 if the last ``<answer>`` block is the answer digit, 0.1 another single digit, 0 otherwise. (d1 has no such
    task: ``d1_compat`` changes nothing.)

    >>> ex = {"start": 3, "ops": "+7-4", "answer": 6}
    >>> chain_reward("<reasoning>3\\n+7=0\\n-4=6\\n</reasoning>\\n<answer>6</answer>", ex)
    1.0
    >>> chain_reward("<answer>5</answer>", ex), chain_reward("<answer>65</answer>", ex), chain_reward("6", ex)
    (0.1, 0.0, 0.0)
    """
    block = answer_block(completion)
    if block is None or len(block) != 1 or not block.isdigit():
        return 0.0
    answer = example.get("answer")
    if answer is None:
        answer = run_chain(int(example["start"]), str(example["ops"]))[-1]
    return 1.0 if int(block) == int(answer) else 0.1


@dataclass(frozen=True)
class Chain(Task):
    """A running sum mod 10 over 20 steps of +-1 (procedurally generated; no hub dataset)."""

    name: ClassVar[str] = "chain"
    reward_functions: ClassVar = (chain_reward,)
    default_source: ClassVar[str] = "generated"

    def extract_answer(self, completion: str) -> str | None:
        return answer_block(completion)

    def metric(self, completion: str, example: Mapping[str, Any]) -> float:
        return 1.0 if chain_reward(completion, example) == 1.0 else 0.0

    def parse_row(self, row: Mapping[str, Any], where: Where) -> dict:
        start = get_int(row, ("start",), where)
        if not 0 <= start < MODULUS:
            raise where.error("start", f"must be a digit 0-9, got {start}")
        ops = get_str(row, ("ops",), where)
        if not _OPS_RE.fullmatch(ops):
            raise where.error("ops", f"must be operations '+d' / '-d' with d in 1-9 (e.g. '+7-4+2'), got {ops!r}")
        answer = run_chain(start, ops)[-1]
        if row.get("answer") is not None:
            stored = get_int(row, ("answer",), where)
            if stored != answer:
                raise where.error("answer", f"{stored} disagrees with start {start} and ops {ops!r}, which give "
                                  f"{answer}")
        return {**row, "start": start, "ops": ops, "answer": answer}

    def load_hub(self, split: str) -> list[dict]:
        raise RuntimeError(f"{self.name}: no hub dataset; use source='generated' (the default) or data_path=PATH")

    def generate(self, split: str, *, n: int | None = None, seed: int = 0) -> list[dict]:
        return generate(n if n is not None else (256 if split == "test" else 4000), split, seed)

    def prompt_text(self, example: Mapping[str, Any]) -> str:
        start, ops = example["start"], example["ops"]
        return (
            f"{SYSTEM_PROMPT}\nStart from the digit {start} and apply the operations {ops} in order, two characters "
            "each (+ or - and a digit), keeping only the last digit of every result (modulo 10). In the reasoning, "
            "write one line per operation as OPERATION=RESULT, e.g. +7=0. Put only the final digit inside "
            "<answer></answer> tags."
        )
