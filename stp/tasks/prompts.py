"""Prompt formats of the tasks: ``chat`` (the task's own chat prompt with d1's system prompt, the paper's) and
``compact`` (one short user turn: the puzzle and nothing else), which the embedded tiny model is pretrained on
(``stp.pretrain``): d1's ~500-character system prompt is ~500 tokens for its character-level tokenizer."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["PRETRAIN_TASKS", "PROMPT_FORMATS", "PromptError", "compact_prompt", "compact_task", "task_with_prompt"]

PRETRAIN_TASKS = ("sudoku", "countdown", "countdown_small", "chain")  # the tasks with a compact prompt
PROMPT_FORMATS = ("chat", "compact")


class PromptError(ValueError):
    """A task or prompt format without that prompt, naming the value and what is allowed."""


def compact_prompt(task: str, example: Mapping[str, Any]) -> str:
    """The tiny model's prompt text (one user turn, no system prompt): the puzzle and nothing else.

    >>> compact_prompt("sudoku", {"puzzle": "4123030034121034"})
    'sudoku 4123030034121034'
    >>> compact_prompt("countdown", {"nums": [44, 19, 35], "target": 98})
    'countdown 44 19 35 -> 98'
    >>> compact_prompt("countdown_small", {"nums": [7, 12, 3], "target": 16})
    'countdown 07 12 03 -> 16'
    >>> compact_prompt("chain", {"start": 3, "ops": "+7-4"})
    'chain 3\\n+7=?\\n-4=?\\n'
    """
    if task == "sudoku":
        return f"sudoku {example['puzzle']}"
    if task == "countdown_small":  # two digits per number: the same positions in every prompt (its module)
        return f"countdown {' '.join(f'{n:02d}' for n in example['nums'])} -> {example['target']:02d}"
    if task == "countdown":
        return f"countdown {' '.join(str(n) for n in example['nums'])} -> {example['target']}"
    if task == "chain":  # the reasoning's template with '?' results: the same stride (stp.tasks.chain)
        ops = example["ops"]
        return f"chain {example['start']}\n" + "".join(f"{ops[i:i + 2]}=?\n" for i in range(0, len(ops), 2))
    raise PromptError(f"task={task!r}: no compact prompt; allowed: {', '.join(PRETRAIN_TASKS)}")


def compact_task(name: str, *, d1_compat: bool = False):
    """The task ``name`` with ``compact_prompt`` as its prompt text (rewards, metric and data unchanged)."""
    from stp.tasks import TASKS

    if name not in PRETRAIN_TASKS:
        raise PromptError(f"task={name!r}: allowed: {', '.join(PRETRAIN_TASKS)}")
    base = TASKS[name]

    def prompt_text(self, example):
        return compact_prompt(self.name, example)

    cls = type(f"Compact{base.__name__}", (base,), {"prompt_text": prompt_text, "__module__": __name__,
                                                      "__doc__": f"{base.__name__} with the compact prompt."})
    return cls(d1_compat=d1_compat)


def task_with_prompt(name: str, prompt_format: str, *, d1_compat: bool = False):
    """The task ``name`` with its prompts in ``prompt_format``: 'chat' (the task's own, d1's) or 'compact'
    (``compact_task``; sudoku and countdown only). The one place the trainer and ``stp.eval`` pick prompts."""
    from stp.tasks import get_task

    if prompt_format == "compact":
        return compact_task(name, d1_compat=d1_compat)
    if prompt_format == "chat":
        return get_task(name, d1_compat=d1_compat)
    raise PromptError(f"prompt_format={prompt_format!r}: allowed: {', '.join(PROMPT_FORMATS)}")
