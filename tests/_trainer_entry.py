"""Test helper: ``python -m tests._trainer_entry [stp.train flags]`` is ``python -m stp.train`` with a toy reward.

A randomly initialised tiny model never earns a Countdown reward, so every advantage would be 0 and nothing would
train. The toy reward functions depend on the completion text only (fraction of digits; shortness), so groups get
distinct rewards and the loop does real updates; everything else is the real trainer. ``toy_task_patch()`` applies
the same patch in-process (tests use it through monkeypatch).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any


def digit_fraction(completion: str, example: Mapping[str, Any], *, d1_compat: bool = False) -> float:
    return sum(c.isdigit() for c in completion) / max(1, len(completion))


def shortness(completion: str, example: Mapping[str, Any], *, d1_compat: bool = False) -> float:
    return 1.0 / (1.0 + len(completion) / 8.0)


def toy_task_for(original):
    def _task_for(cfg):
        base = original(cfg)
        cls = type(f"Toy{type(base).__name__}", (type(base),), {
            "reward_functions": (digit_fraction, shortness), "__module__": __name__})
        return cls(d1_compat=base.d1_compat)

    return _task_for


def toy_task_patch() -> None:
    import stp.data_order

    stp.data_order.task_for = toy_task_for(stp.data_order.task_for)


if __name__ == "__main__":
    import torch

    torch.set_num_threads(1)
    toy_task_patch()
    from stp.train import main

    sys.exit(main())
