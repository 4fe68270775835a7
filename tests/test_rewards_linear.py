"""Every reward, in both modes, takes time linear in the completion's length, on inputs crafted against regexes.

Each crafted completion is timed at 64 KB and 128 KB (best of three, so a busy machine adds little): a linear reward
at most about doubles, a quadratic one quadruples. The test fails when the 128 KB time exceeds 3x the 64 KB time and
is above 50 ms (below that, timer noise dominates and nothing is quadratic at these sizes: a quadratic scan of 128 KB
takes seconds).
"""

from __future__ import annotations

import time

import pytest

from stp.tasks import get_task

EXAMPLES = {
    "gsm8k": {"question": "q", "answer": "18"},
    "math": {"problem": "p", "answer": "\\frac{1}{2}"},
    "countdown": {"nums": [44, 19, 35], "target": 98},
    "sudoku": {"puzzle": "1034340020004300", "solution": "1234341221434321"},
}

# Each unit repeated to the size; the name says what it attacks.
CRAFTED = {
    "open-tags": "<answer>",
    "close-open": "</reasoning><answer>",
    "close-open-lines": "\n</reasoning>\n<answer>\n",
    "reasoning-then-tags": "<reasoning>" + "</reasoning> <answer>",
    "boxes": "\\boxed{",
    "fracs": "\\frac{1}{",
    "mixed": "<answer>\\boxed{1</reasoning>\n<answer>(((",
}


def _completion(unit: str, size: int) -> str:
    if unit.startswith("<reasoning>"):
        head, unit = "<reasoning>", unit[len("<reasoning>"):]
        return head + unit * ((size - len(head)) // len(unit))
    return "<reasoning>" + unit * (size // len(unit))


def _best_time(fn, text: str) -> float:
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        fn(text)
        best = min(best, time.perf_counter() - start)
    return best


@pytest.mark.parametrize("name", list(EXAMPLES))
@pytest.mark.parametrize("d1_compat", [False, True])
@pytest.mark.parametrize("attack", list(CRAFTED))
def test_reward_time_is_linear(name, d1_compat, attack):
    task = get_task(name, d1_compat=d1_compat)
    example = EXAMPLES[name]

    def run(text):
        task.rewards(text, example)
        task.metric(text, example)

    small, large = _completion(CRAFTED[attack], 64 * 1024), _completion(CRAFTED[attack], 128 * 1024)
    t_small, t_large = _best_time(run, small), _best_time(run, large)
    assert t_large < 0.05 or t_large < 3 * t_small, (
        f"{name} d1_compat={d1_compat} {attack}: {t_small * 1e3:.1f} ms at 64 KB, {t_large * 1e3:.1f} ms at 128 KB")
