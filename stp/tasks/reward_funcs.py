"""Reward functions in TRL's form, the one way every task's rewards are computed.

A reward function has the signature of TRL's ``GRPOTrainer``::

    fn(completions, **kwargs) -> list[float | None]

``completions`` holds one entry per sample (a string for plain-text prompts; for chat-message prompts a list with
one assistant message, ``[{"role": "assistant", "content": text}]``, as TRL passes them); ``prompts`` the prompts,
``completion_ids`` the generated token ids, and every other dataset column arrives as a keyword argument of the same
name, one value per sample. A ``None`` means "not applicable to this sample": it counts as nothing in the total
(TRL's ``nansum``) and is left out of that function's mean. The total reward is the weighted sum.

The built-in tasks go through the same call: ``Task.reward_funcs`` wraps each of their reward functions in this form
(``trl_form``), so ``score`` computes every run's rewards; ``stp.tasks.custom`` builds a task from your own.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

__all__ = ["PASSED", "RewardFuncError", "trl_form", "score", "check_columns", "where_defined", "func_name"]

# The keyword arguments the trainer passes besides the dataset's columns (TRL's names).
PASSED = ("prompts", "completions", "completion_ids")


class RewardFuncError(ValueError):
    """A reward function that cannot be used: names the function, its file and line, and what is wrong."""


def func_name(fn: Callable) -> str:
    return getattr(fn, "__name__", None) or type(fn).__name__


def where_defined(fn: Callable) -> str:
    """``module:name (file:line)`` of a function, for error messages."""
    target = inspect.unwrap(fn)
    if not (inspect.isfunction(target) or inspect.ismethod(target)):
        target = type(target).__call__ if callable(target) else target
    try:
        file = inspect.getsourcefile(target) or "?"
        line = inspect.getsourcelines(target)[1]
    except (OSError, TypeError):
        file, line = "?", 0
    return f"{getattr(fn, '__module__', '?')}:{func_name(fn)} ({file}:{line})"


def trl_form(fn: Callable[..., float], d1_compat: bool) -> Callable[..., list[float]]:
    """A built-in reward ``fn(completion, example, *, d1_compat)`` as a TRL-form function of the same name: the
    example is rebuilt from the columns, the values are the built-in's, unchanged."""

    def reward(completions: Sequence[str], **columns: Any) -> list[float]:
        names = [n for n in columns if n not in PASSED]
        rows = [{n: columns[n][i] for n in names} for i in range(len(completions))]
        return [float(fn(c, ex, d1_compat=d1_compat)) for c, ex in zip(completions, rows)]

    reward.__name__ = fn.__name__
    reward.__qualname__ = fn.__qualname__
    reward.__module__ = fn.__module__
    reward.__wrapped__ = fn  # where_defined names the built-in's own file and line
    return reward


def check_columns(funcs: Sequence[Callable], columns: Sequence[str], source: str) -> None:
    """Every parameter a reward function names without a default must be a dataset column or one the trainer
    passes (``prompts``, ``completions``, ``completion_ids``); otherwise a RewardFuncError names the function, its
    file and line, the column, and the columns there are."""
    have = set(columns) | set(PASSED)
    for fn in funcs:
        if not callable(fn):
            raise RewardFuncError(f"reward function {fn!r} is not callable; allowed: a function "
                                  "fn(completions, **kwargs) -> list[float | None]")
        try:
            params = inspect.signature(fn).parameters.values()
        except (TypeError, ValueError):
            continue
        for p in params:
            if p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL) or p.default is not p.empty:
                continue
            if p.name not in have:
                raise RewardFuncError(
                    f"reward function {where_defined(fn)} takes column {p.name!r}, which {source} does not have; "
                    f"columns: {', '.join(sorted(set(columns) - {'prompt'})) or '(none)'}, plus "
                    f"{', '.join(PASSED)}")


def _as_float(value: Any, fn: Callable, i: int) -> float:
    if value is None:
        return math.nan
    if isinstance(value, bool) or not isinstance(value, (int, float)) and not hasattr(value, "__float__"):
        raise RewardFuncError(f"reward function {where_defined(fn)} returned {value!r:.60} for sample {i}; "
                              "allowed: a number or None (not applicable)")
    return float(value)


def _given(completions: Sequence[Any], columns: Mapping[str, Sequence[Any]]) -> str:
    """What a reward function was called with, in one line: the completions' form and first value, the columns."""
    first = completions[0] if completions else None
    if isinstance(first, str):
        form = "strings (plain-text prompts)"
    elif isinstance(first, (list, tuple)):
        form = 'lists of chat messages [{"role": "assistant", "content": ...}] (chat prompts)'
    else:
        form = f"{type(first).__name__} values"
    cols = ", ".join(columns) or "(none)"
    return (f"completions = {len(completions)} {form}, the first {first!r:.80}; columns {cols}, plus prompts "
            f"and completion_ids")


def _raised(fn: Callable, e: Exception, completions: Sequence[Any], columns: Mapping[str, Sequence[Any]]) -> str:
    """The message for an exception raised inside a reward function: the function (module, name, file, line), the
    exception and the line of its code that raised it, and what it was given."""
    import traceback

    frames = traceback.extract_tb(e.__traceback__)[1:]  # [0] is score()'s call
    try:
        own = inspect.getsourcefile(inspect.unwrap(fn))
    except TypeError:
        own = None
    mine = [f for f in frames if own is not None and f.filename == own] or frames
    at = f" at {mine[-1].filename}:{mine[-1].lineno} ({(mine[-1].line or '').strip()!r:.100})" if mine else ""
    return (f"reward function {where_defined(fn)} raised {type(e).__name__}: {e}{at}; it was given "
            f"{_given(completions, columns)}")


def score(funcs: Sequence[Callable], completions: Sequence[Any], rows: Sequence[Mapping[str, Any]], *,
          prompts: Sequence[Any] | None = None, completion_ids: Sequence[Sequence[int]] | None = None,
          ) -> list[list[float]]:
    """[B][F] values of the reward functions on B samples (NaN where a function returned None). ``rows`` are the
    samples' dataset rows; their fields other than ``prompt`` are the keyword arguments."""
    names = list(dict.fromkeys(k for row in rows for k in row if k != "prompt" and k not in PASSED))
    columns = {n: [row.get(n) for row in rows] for n in names}
    extra: dict[str, Any] = {"prompts": list(prompts) if prompts is not None else [row.get("prompt") for row in rows]}
    if completion_ids is not None:
        extra["completion_ids"] = [list(c) for c in completion_ids]
    out: list[list[float]] = [[] for _ in completions]
    for fn in funcs:
        try:
            values = fn(completions=list(completions), **extra, **columns)
        except RewardFuncError:
            raise
        except Exception as e:  # the user's code: say whose, where, and on what
            raise RewardFuncError(_raised(fn, e, completions, columns)) from e
        if inspect.isawaitable(values):
            raise RewardFuncError(f"reward function {where_defined(fn)} is asynchronous; allowed: a plain function")
        if not isinstance(values, (list, tuple)) or len(values) != len(completions):
            got = f"{type(values).__name__} of {len(values)}" if hasattr(values, "__len__") else repr(values)[:60]
            raise RewardFuncError(f"reward function {where_defined(fn)} returned {got}; allowed: a list of "
                                  f"{len(completions)} numbers or None, one per completion")
        for i, v in enumerate(values):
            out[i].append(_as_float(v, fn, i))
    return out
