"""The interface every task offers, and the d1 prompts.

A task is a frozen dataclass holding one switch, ``d1_compat``. Its reward functions are module-level pure functions
with one signature::

    fn(completion: str, example: Mapping[str, Any], *, d1_compat: bool = False) -> float

``Task.reward`` is their sum (docs/method.md 5), ``Task.rewards`` the per-function values, and ``Task.metric`` the
evaluation score, built on the same ``Task.extract_answer`` the rewards use.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

from .data import Where, read_file

__all__ = ["SYSTEM_PROMPT", "RewardFn", "Task", "render_prompt"]

# d1's system prompt (diffu-grpo/data_utils.py). d1 puts it at the top of the *user* turn, not in a system turn;
# kept that way so prompts, and thus numbers, match.
SYSTEM_PROMPT = """
Respond in the following format:
<reasoning>
...
</reasoning>
<answer>
...
</answer>
"""


class RewardFn(Protocol):
    __name__: str

    def __call__(self, completion: str, example: Mapping[str, Any], *, d1_compat: bool = False) -> float: ...


def render_prompt(content: str, tokenizer: Any = None) -> list[dict[str, str]] | str:
    """The chat messages for one user turn; rendered to text with the tokenizer's chat template when one is given."""
    messages = [{"role": "user", "content": content}]
    if tokenizer is None:
        return messages
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"{type(tokenizer).__name__} has no chat template; pass tokenizer=None to get the chat messages, "
            "or set tokenizer.chat_template"
        )
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


@dataclass(frozen=True)
class Task:
    """One task: data, prompt, answer extraction, rewards and metric.

    Attributes:
        d1_compat: False (default) uses this project's fixed rewards; True reproduces d1's published reward code,
            bugs included (``stp.tasks._d1``), so published numbers can be reproduced.
    """

    d1_compat: bool = False

    name: ClassVar[str]
    reward_functions: ClassVar[tuple[Callable[..., float], ...]]
    splits: ClassVar[tuple[str, ...]] = ("train", "test")
    default_source: ClassVar[str] = "hub"

    # -------------------------------------------------------------------------------------------- rewards, metric

    def rewards(self, completion: str, example: Mapping[str, Any]) -> dict[str, float]:
        """Each reward function's value, by function name."""
        if not isinstance(completion, str):
            raise TypeError(f"completion must be a str, got {type(completion).__name__}")
        return {fn.__name__: float(fn(completion, example, d1_compat=self.d1_compat)) for fn in self.reward_functions}

    def reward(self, completion: str, example: Mapping[str, Any]) -> float:
        """The total reward: the sum of the task's reward functions."""
        return sum(self.rewards(completion, example).values())

    def reward_funcs(self) -> tuple[Callable[..., list[float]], ...]:
        """The reward functions in TRL's form ``fn(completions, **columns) -> list[float | None]``
        (``stp.tasks.custom``): the trainer scores every task, built-in or not, through these."""
        from .reward_funcs import trl_form

        return tuple(trl_form(fn, self.d1_compat) for fn in self.reward_functions)

    def reward_weights(self) -> tuple[float, ...]:
        """One weight per reward function (the total is the weighted sum; built-in tasks: all 1)."""
        return tuple(1.0 for _ in self.reward_functions)

    def reward_names(self) -> list[str]:
        """The reward functions' names, made unique with a ``_2``, ``_3`` suffix (metrics columns)."""
        from .reward_funcs import func_name

        names: list[str] = []
        for fn in self.reward_funcs():
            name, k = func_name(fn), 2
            while name in names:
                name, k = f"{func_name(fn)}_{k}", k + 1
            names.append(name)
        return names

    def batch_rewards(self, completions: Sequence[str], examples: Sequence[Mapping[str, Any]], *,
                      completion_ids: Sequence[Sequence[int]] | None = None) -> list[list[float]]:
        """[B][F] values of ``reward_funcs`` on B completion texts and their examples (NaN = not applicable)."""
        from .reward_funcs import score

        return score(self.reward_funcs(), completions, examples, completion_ids=completion_ids)

    def extract_answer(self, completion: str) -> str | None:
        raise NotImplementedError

    def metric(self, completion: str, example: Mapping[str, Any]) -> float:
        """Evaluation score of one completion in [0, 1] (accuracy; Sudoku: fraction of empty cells right)."""
        raise NotImplementedError

    # ----------------------------------------------------------------------------------------------- data, prompt

    def parse_row(self, row: Mapping[str, Any], where: Where) -> dict:
        """Validate one raw row and return the normalised example (schema in the task module's docstring)."""
        raise NotImplementedError

    def format_prompt(self, example: Mapping[str, Any], tokenizer: Any = None) -> list[dict[str, str]] | str:
        """Chat messages (one user turn with d1's prompt), or the rendered text when a tokenizer is given."""
        return render_prompt(self.prompt_text(example), tokenizer)

    def prompt_text(self, example: Mapping[str, Any]) -> str:
        raise NotImplementedError

    def load(
        self,
        split: str,
        data_path: str | Path | None = None,
        *,
        source: str | None = None,
        n: int | None = None,
        seed: int = 0,
    ) -> list[dict]:
        """A split as a list of example dicts.

        Args:
            split: "train" or "test".
            data_path: a local .jsonl / .json / .csv / .parquet file (``--data PATH``); the split name is then only
                recorded, the whole file is the split.
            source: "file", "hub" or "generated" (Countdown, Sudoku). Default: "file" when ``data_path`` is given,
                else the task's default source. Nothing falls back silently: a hub that cannot be reached is an error.
            n: keep the first ``n`` examples (generators: how many to make).
            seed: generator seed.
        """
        if split not in self.splits:
            raise ValueError(f"{self.name}: unknown split {split!r}; allowed: {', '.join(self.splits)}")
        if source is None:
            source = "file" if data_path is not None else self.default_source
        if source == "file":
            if data_path is None:
                raise ValueError(f"{self.name}: source='file' needs data_path")
            rows = read_file(data_path, self.parse_row)
        elif source == "hub":
            rows = self.load_hub(split)
        elif source == "generated":
            rows = self.generate(split, n=n, seed=seed)
        else:
            raise ValueError(f"{self.name}: unknown source {source!r}; allowed: 'file', 'hub', 'generated'")
        return rows if n is None else rows[:n]

    def load_hub(self, split: str) -> list[dict]:
        raise NotImplementedError

    def generate(self, split: str, *, n: int | None = None, seed: int = 0) -> list[dict]:
        raise ValueError(f"{self.name}: no procedural generator; use source='hub' or data_path=PATH")

