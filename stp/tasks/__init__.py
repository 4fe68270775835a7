"""Tasks and rewards: GSM8K, MATH, Countdown (3 numbers) and 4x4 Sudoku, under the d1 protocol (docs/method.md 5).

    >>> from stp.tasks import get_task
    >>> task = get_task("countdown")
    >>> task.reward("<reasoning>\\n2*4=8, 8-3=5\\n</reasoning>\\n<answer>\\n2*4-3\\n</answer>", {"nums": [2, 3, 4], "target": 5})
    1.0

Each task object offers ``reward``, ``rewards``, ``extract_answer``, ``metric``, ``load``, ``format_prompt`` (see
``stp.tasks.base.Task``); ``get_task(name, d1_compat=True)`` reproduces d1's published reward code, bugs included.
"""

from __future__ import annotations

from .base import SYSTEM_PROMPT, Task
from .chain import Chain
from .countdown import Countdown
from .countdown_small import SmallCountdown
from .data import DataError
from .gsm8k import GSM8K
from .math import MATH
from .sudoku import Sudoku

__all__ = ["TASKS", "SYSTEM_PROMPT", "DataError", "Task", "get_task"]

TASKS: dict[str, type[Task]] = {cls.name: cls for cls in (GSM8K, MATH, Countdown, Sudoku, SmallCountdown,
                                                              Chain)}


def get_task(name: str, *, d1_compat: bool = False) -> Task:
    """The task called ``name`` ("gsm8k", "math", "countdown", "sudoku", "countdown_small", "chain").

    >>> get_task("gsm8k").name, get_task("math", d1_compat=True).d1_compat
    ('gsm8k', True)
    >>> get_task("mbpp")
    Traceback (most recent call last):
    ...
    ValueError: unknown task 'mbpp'; allowed: gsm8k, math, countdown, sudoku, countdown_small, chain
    """
    try:
        cls = TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; allowed: {', '.join(TASKS)}") from None
    return cls(d1_compat=d1_compat)
