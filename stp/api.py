"""The Python API in TRL's shape: ``Trainer(config, reward_funcs=[...], train_dataset=..., eval_dataset=...)``.

    from stp import Trainer
    from stp.config import resolve

    def reward_len(completions, **kwargs):
        return [-abs(20 - len(c)) for c in completions]

    Trainer(resolve("tiny"), reward_funcs=[reward_len], train_dataset=[{"prompt": "countdown 1 2 3 -> 6"}]).train()

Reward functions have TRL's ``GRPOTrainer`` signature ``fn(completions, **kwargs) -> list[float | None]``
(``stp.tasks.reward_funcs``); datasets are a ``datasets.Dataset`` or a list of dicts with a ``prompt`` column
(text, or chat messages rendered with the tokenizer's chat template). The run is ``stp.trainer.train``'s.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from stp.config import TrainConfig, resolve

__all__ = ["Trainer"]


class Trainer:
    """One training run of ``config`` (a TrainConfig, a preset name, or None for the default preset) on your
    reward functions and data. ``reward_weights``: one number per function (default all 1); a function returning
    None for a sample leaves it out of that function's term. Without ``train_dataset`` the configured data is used
    (``run.dataset``, else the task's examples); without ``reward_funcs``, ``run.reward``, else the task's."""

    def __init__(self, config: TrainConfig | str | None = None, *, reward_funcs: Sequence[Callable] | None = None,
                 reward_weights: Sequence[float] | None = None, train_dataset: Any = None, eval_dataset: Any = None):
        self.config = config if isinstance(config, TrainConfig) else resolve(config)
        self.reward_funcs = None if reward_funcs is None else list(reward_funcs)
        self.reward_weights = None if reward_weights is None else [float(w) for w in reward_weights]
        self.train_dataset, self.eval_dataset = train_dataset, eval_dataset
        if eval_dataset is not None and train_dataset is None:
            raise ValueError("eval_dataset needs train_dataset (or set run.dataset and run.eval_split)")

    def train(self, *, progress: bool | None = None) -> dict[str, Any]:
        """Run; returns the summary (summary.json). Errors as ``stp.trainer.train``. ``progress``: bars for the
        phases that take time (building priors, held-out evaluations, the training steps); default: when stderr is
        a terminal."""
        import sys

        from stp.policy import quiet_known_warnings
        from stp.trainer import train

        quiet_known_warnings()
        if progress is None:
            progress = sys.stderr.isatty()
        return train(self.config, progress=progress, reward_funcs=self.reward_funcs,
                     reward_weights=self.reward_weights, train_dataset=self.train_dataset,
                     eval_dataset=self.eval_dataset)
