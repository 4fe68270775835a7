"""The answer extractor shared by every task's rewards and evaluation metric.

One function decides what "the answer" of a completion is, so a reward and the metric that reports accuracy can never
disagree about it. It uses plain string search, not a regular expression, so it is linear in the completion's length
and cannot silently fail on multi-line text (d1's extractors differ; see ``stp.tasks._d1``).

An answer left open at the end of the text counts (LLaDA often emits end-of-text where ``</answer>`` belongs, and the
tokenizer's decoding drops it): the answer then runs to the end of the text, or to the first ``<|`` (the text of a
special token such as ``<|eot_id|>``, when special tokens were decoded). Format rewards that credit the closing tag
use :func:`closed_answer_block`, so closing the tag still pays.
"""

from __future__ import annotations

__all__ = ["OPEN", "CLOSE", "answer_block", "closed_answer_block", "has_answer_block"]

OPEN = "<answer>"
CLOSE = "</answer>"
SPECIAL = "<|"


def closed_answer_block(completion: str) -> str | None:
    """Content of the last complete ``<answer>...</answer>`` block, stripped; None when there is none.

    "Last" means: the last ``</answer>``, paired with the last ``<answer>`` before it. Multi-line content is kept.

    >>> closed_answer_block("<reasoning>\\n2+2\\n</reasoning>\\n<answer>\\n4\\n</answer>\\n")
    '4'
    >>> closed_answer_block("<answer>1</answer> then <answer>2</answer>")
    '2'
    >>> closed_answer_block("4") is None, closed_answer_block("<answer>4") is None
    (True, True)
    """
    end = completion.rfind(CLOSE)
    if end < 0:
        return None
    start = completion.rfind(OPEN, 0, end)
    if start < 0:
        return None
    return completion[start + len(OPEN) : end].strip()


def answer_block(completion: str) -> str | None:
    """The answer: the last ``<answer>`` block, closed, or left open at the end of the text; None when there is none.

    An open last block runs to the end of the text (or the first ``<|``); when it is empty, the last complete block
    before it is the answer.

    >>> answer_block("<answer>\\n4\\n</answer>"), answer_block("<answer>\\n4"), answer_block("<answer>\\n4<|eot_id|>")
    ('4', '4', '4')
    >>> answer_block("<answer>1</answer> then <answer>2"), answer_block("<answer>1</answer>\\n<answer>\\n")
    ('2', '1')
    >>> answer_block("4") is None, answer_block("</answer>4") is None
    (True, True)
    """
    start = completion.rfind(OPEN)
    if start < 0:
        return None
    if completion.find(CLOSE, start + len(OPEN)) >= 0:
        return closed_answer_block(completion)
    stop = completion.find(SPECIAL, start + len(OPEN))
    content = completion[start + len(OPEN) : stop if stop >= 0 else len(completion)].strip()
    if content:
        return content
    return closed_answer_block(completion[:start])


def has_answer_block(completion: str) -> bool:
    """Whether the completion holds a complete ``<answer>...</answer>`` block.

    >>> has_answer_block("<answer></answer>"), has_answer_block("<answer>")
    (True, False)
    """
    return closed_answer_block(completion) is not None
