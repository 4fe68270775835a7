"""Your own task: TRL-form reward functions (``stp.tasks.reward_funcs``) over rows with a ``prompt`` column, and
where those come from on the command line (``--run.reward MODULE:FUNCTION``, ``--run.dataset NAME_OR_PATH``)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from .base import Task
from .reward_funcs import RewardFuncError, score

__all__ = ["FunctionTask"]


@dataclass(frozen=True)
class FunctionTask(Task):
    """A task made of TRL-form reward functions and prompts from the rows' ``prompt`` column (text as is; chat
    messages through the tokenizer's chat template), or from ``base``'s prompt format when the rows are a built-in
    task's examples. Its ``metric`` (accuracy) is ``base``'s when the rows are a built-in task's examples, else
    None: reward functions define a reward, not an accuracy. Without ``base`` every completion counts as an answer
    (the functions, not the task, read answers)."""

    funcs: tuple[Callable, ...] = ()
    weights: tuple[float, ...] | None = None
    base: Task | None = None
    chat: bool = False
    name: ClassVar[str] = "custom"
    reward_functions: ClassVar = ()

    def __post_init__(self):
        if not self.funcs:
            raise RewardFuncError("no reward functions; allowed: one or more fn(completions, **kwargs) -> list")
        if self.weights is not None and len(self.weights) != len(self.funcs):
            raise RewardFuncError(f"{len(self.weights)} reward weights for {len(self.funcs)} reward functions; "
                                  "allowed: one weight per function, in the same order")

    def reward_funcs(self) -> tuple[Callable, ...]:
        return self.funcs

    def reward_weights(self) -> tuple[float, ...]:
        return self.weights if self.weights is not None else tuple(1.0 for _ in self.funcs)

    def _completion(self, text: str) -> Any:
        return [{"role": "assistant", "content": text}] if self.chat else text

    def rewards(self, completion: str, example: Mapping[str, Any]) -> dict[str, float]:
        if not isinstance(completion, str):
            raise TypeError(f"completion must be a str, got {type(completion).__name__}")
        values = score(self.funcs, [self._completion(completion)], [example])[0]
        return dict(zip(self.reward_names(), values))

    def reward(self, completion: str, example: Mapping[str, Any]) -> float:
        values = self.rewards(completion, example).values()
        return sum(w * v for w, v in zip(self.reward_weights(), values) if not math.isnan(v))

    def batch_rewards(self, completions: Sequence[str], examples: Sequence[Mapping[str, Any]], *,
                      completion_ids: Sequence[Sequence[int]] | None = None) -> list[list[float]]:
        return score(self.funcs, [self._completion(c) for c in completions], examples, completion_ids=completion_ids)

    def extract_answer(self, completion: str) -> str | None:
        return self.base.extract_answer(completion) if self.base is not None else completion

    def metric(self, completion: str, example: Mapping[str, Any]) -> float | None:
        return self.base.metric(completion, example) if self.base is not None else None

    def format_prompt(self, example: Mapping[str, Any], tokenizer: Any = None) -> list[dict[str, str]] | str:
        if self.base is not None:
            return self.base.format_prompt(example, tokenizer)
        prompt = example["prompt"]
        if isinstance(prompt, str):
            return prompt
        if tokenizer is None:
            return list(prompt)
        if not getattr(tokenizer, "chat_template", None):
            raise RewardFuncError(f"the prompts are chat messages but {type(tokenizer).__name__} has no chat "
                                  "template; allowed: plain-text prompts, or a tokenizer with a chat template")
        return tokenizer.apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=True)



# ------------------------------------------------------------------------------------------- reward functions by name


def load_reward(spec: str) -> Callable:
    """``MODULE:FUNCTION`` (an importable module, or a ``.py`` file path) -> the function. Errors name the module,
    the function and, for a module that does not compile, its file, line and column."""
    import importlib
    import importlib.util
    import sys
    from pathlib import Path

    module_name, sep, func = spec.rpartition(":")
    if not sep or not module_name or not func:
        raise RewardFuncError(f"reward {spec!r}: allowed: MODULE:FUNCTION (an importable module or a .py file)")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name).expanduser()
            if not path.is_file():
                raise RewardFuncError(f"reward {spec!r}: file {module_name!r} not found")
            name = f"stp_user_rewards_{path.stem}"
            loader_spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(loader_spec)
            sys.modules[name] = module
            loader_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except SyntaxError as e:
        raise RewardFuncError(f"reward {spec!r}: module {module_name!r} does not compile: {e.filename}:{e.lineno}:"
                              f"{e.offset}: {e.msg}") from None
    except ModuleNotFoundError as e:
        if e.name is not None and not module_name.startswith(e.name):  # the module imports something missing
            raise RewardFuncError(f"reward {spec!r}: module {module_name!r} imports {e.name!r}, which is not "
                                  "installed") from e
        raise RewardFuncError(f"reward {spec!r}: module {module_name!r} not found ({e}); allowed: an importable "
                              "module (on PYTHONPATH or in the working directory) or a path to a .py file") from None
    fn = getattr(module, func, None)
    if fn is None or not callable(fn):
        have = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_")
                      and getattr(v, "__module__", None) == module.__name__)
        what = "has no function" if fn is None else "has a non-callable"
        raise RewardFuncError(f"reward {spec!r}: module {module_name!r} ({getattr(module, '__file__', '?')}) {what} "
                              f"{func!r}; its functions: {', '.join(have) or '(none)'}")
    return fn


# ------------------------------------------------------------------------------------------------------ datasets


def load_rows(spec: str, split: str, *, n: int | None = None, seed: int = 0) -> list[dict]:
    """The rows of ``split`` of a dataset through ``datasets``: a directory written by ``save_to_disk`` (a Dataset,
    or a DatasetDict holding ``split``), a .json/.jsonl/.csv/.parquet file (the whole file is the split), or a hub
    name (needs a network). ``reasoning_gym:NAME`` makes ``n`` procedural examples (``load_reasoning_gym``). Every
    row must have a ``prompt`` (a string or a list of chat messages)."""
    from pathlib import Path

    from .data import DataError

    if spec.startswith("reasoning_gym:"):
        return load_reasoning_gym(spec.removeprefix("reasoning_gym:"), split, n=n, seed=seed)
    try:
        import datasets
    except ImportError as exc:
        raise DataError(f"dataset {spec!r} needs the `datasets` package: pip install -e '.[data]'") from exc
    path = Path(spec).expanduser()
    if path.is_dir():
        try:
            data = datasets.load_from_disk(str(path))
        except Exception as exc:
            raise DataError(f"{path}: not a dataset saved with save_to_disk ({type(exc).__name__}: {exc})") from None
        if isinstance(data, datasets.DatasetDict):
            if split not in data:
                raise DataError(f"{path}: no split {split!r}; splits: {', '.join(data)}")
            data = data[split]
        source = str(path)
    elif path.is_file():
        kinds = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
        kind = kinds.get(path.suffix.lower())
        if kind is None:
            raise DataError(f"{path}: unknown data file type {path.suffix!r}; use .json, .jsonl, .csv or .parquet")
        try:
            data = datasets.load_dataset(kind, data_files=str(path), split="train")
        except Exception as exc:
            raise DataError(f"{path}: could not read it as {kind} ({type(exc).__name__}: {exc})") from None
        source = str(path)
    else:
        try:
            data = datasets.load_dataset(spec, split=split)
        except Exception as exc:
            raise DataError(f"dataset {spec!r} split {split!r}: not a local directory or file, and the hub could not "
                            f"load it ({type(exc).__name__}: {exc})") from None
        source = f"hub:{spec}[{split}]"
    return rows_of(data, source, n=n)


def rows_of(data: Any, source: str, *, n: int | None = None) -> list[dict]:
    """A ``datasets.Dataset`` or a sequence of dicts as a list of dicts, each with a ``prompt`` (a string or a
    list of ``{"role", "content"}`` messages); the first bad row is named with its number."""
    from .data import DataError

    if isinstance(data, Mapping) or isinstance(data, str):
        raise DataError(f"{source}: expected a datasets.Dataset or a list of dicts, got {type(data).__name__}")
    columns = getattr(data, "column_names", None)
    if columns is not None and "prompt" not in columns:
        raise DataError(f"{source}: no 'prompt' column; columns: {', '.join(columns)}")
    rows = []
    for i, row in enumerate(data, start=1):
        if n is not None and len(rows) >= n:
            break
        if not isinstance(row, Mapping):
            raise DataError(f"{source}: row {i}: expected a dict with a 'prompt', got {type(row).__name__}")
        prompt = row.get("prompt")
        ok = isinstance(prompt, str) or (isinstance(prompt, (list, tuple)) and prompt and all(
            isinstance(m, Mapping) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in prompt))
        if not ok:
            raise DataError(f"{source}: row {i}: field 'prompt': expected a string or a list of chat messages "
                            f"{{'role': ..., 'content': ...}}, got {prompt!r:.80}")
        rows.append(dict(row))
    if not rows:
        raise DataError(f"{source}: no rows")
    return rows


def load_reasoning_gym(name: str, split: str, *, n: int | None, seed: int) -> list[dict]:
    """``n`` examples of reasoning-gym's procedural dataset ``name`` (default 1000), the split drawn from its own
    seed (train and test never share a seed); rows keep the question as ``prompt`` (one user message), the
    reference ``answer`` and the generator's ``metadata``, which ``reasoning_gym_reward`` scores with."""
    from .data import DataError

    try:
        import reasoning_gym
    except ImportError as exc:
        raise DataError(f"dataset 'reasoning_gym:{name}' needs reasoning-gym: pip install -e '.[reasoning-gym]'"
                        ) from exc
    from stp.seeds import derive_seed

    try:
        data = reasoning_gym.create_dataset(name, size=n or 1000, seed=derive_seed(seed, "reasoning_gym", split))
    except Exception as exc:
        raise DataError(f"dataset 'reasoning_gym:{name}': {type(exc).__name__}: {exc}") from None
    return [{"prompt": [{"role": "user", "content": e["question"] + REASONING_GYM_SUFFIX}], "answer": e["answer"],
             "metadata": e["metadata"]} for e in data]


REASONING_GYM_SUFFIX = "\nGive the final answer inside <answer> </answer> tags."


def reasoning_gym_reward(completions: Sequence[Any], answer: Sequence[str], metadata: Sequence[Mapping],
                         **kwargs: Any) -> list[float]:
    """reasoning-gym's own verifier (``score_answer`` of the example's generator) on the text inside the last
    ``<answer>`` tags (reasoning-gym's ``extract_answer``); 0 when there is none."""
    import reasoning_gym
    from reasoning_gym.utils import extract_answer

    out = []
    for completion, ref, meta in zip(completions, answer, metadata):
        text = completion if isinstance(completion, str) else completion[0]["content"]
        found = extract_answer(text)
        entry = {"answer": ref, "metadata": meta}
        out.append(0.0 if found is None else float(
            reasoning_gym.get_score_answer_fn(meta["source_dataset"])(found, entry)))
    return out
