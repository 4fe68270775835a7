"""The answer extractor shared by every task's rewards and evaluation metric.

One function decides what "the answer" of a completion is, so a reward and the metric that reports accuracy can never
disagree about it. It uses plain string search, not a regular expression, so it is linear in the completion's length
and cannot silently fail on multi-line text (d1's extractors differ; see ``stp.tasks._d1``).
"""

from __future__ import annotations

__all__ = ["OPEN", "CLOSE", "answer_block", "has_answer_block"]

OPEN = "<answer>"
CLOSE = "</answer>"


def answer_block(completion: str) -> str | None:
    """Content of the last complete ``<answer>...</answer>`` block, stripped; None when there is none.

    "Last" means: the last ``</answer>``, paired with the last ``<answer>`` before it. Multi-line content is kept.

    >>> answer_block("<reasoning>\\n2+2\\n</reasoning>\\n<answer>\\n4\\n</answer>\\n")
    '4'
    >>> answer_block("<answer>1</answer> then <answer>2</answer>")
    '2'
    >>> answer_block("4") is None, answer_block("<answer>4") is None, answer_block("</answer>4<answer>") is None
    (True, True, True)
    """
    end = completion.rfind(CLOSE)
    if end < 0:
        return None
    start = completion.rfind(OPEN, 0, end)
    if start < 0:
        return None
    return completion[start + len(OPEN) : end].strip()


def has_answer_block(completion: str) -> bool:
    """Whether the completion holds a complete ``<answer>...</answer>`` block.

    >>> has_answer_block("<answer></answer>"), has_answer_block("<answer>")
    (True, False)
    """
    return answer_block(completion) is not None
