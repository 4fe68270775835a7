"""The run's data: training and held-out rows, the task with its prompt format, the prompt order, and the text <->
token conversions of the loop. The data order of epoch e is a permutation from ``derive_seed(run.seed, "data", e)``;
nothing reads a global RNG."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from stp.seeds import derive_seed

if TYPE_CHECKING:
    from stp.config import TrainConfig

__all__ = ["DataOrder", "PromptTexts", "load_data", "task_for", "custom_task", "encode_prompts", "decode"]


class DataOrder:
    """The prompt sequence: epoch e visits the N training examples in ``randperm(N)`` seeded by (seed, "data", e).
    Position q (prompts consumed so far) maps to example ``perm(q // N)[q % N]``; nothing else is stored."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed
        self._perms: dict[int, list[int]] = {}

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(derive_seed(self.seed, "data", epoch))
            self._perms[epoch] = torch.randperm(self.n, generator=g).tolist()
        return self._perms[epoch]

    def take(self, position: int, count: int) -> list[int]:
        return [self._perm(q // self.n)[q % self.n] for q in range(position, position + count)]


class PromptTexts:
    """Example index -> the task's prompt text for it (rendered once, then cached)."""

    def __init__(self, task, rows: Sequence[dict], tokenizer):
        self.task, self.rows, self.tokenizer = task, rows, tokenizer
        self._texts: dict[int, str] = {}

    def __call__(self, i: int) -> str:
        if i not in self._texts:
            self._texts[i] = self.task.format_prompt(self.rows[i], self.tokenizer)
        return self._texts[i]


def load_data(cfg: TrainConfig, task) -> tuple[list[dict], list[dict]]:
    """(training examples, held-out examples). With ``run.data_path`` the training rows come from that file; the
    held-out rows from ``run.data_source`` when it is 'hub' or 'generated', else the file's last ``eval_examples``
    rows (then left out of training)."""
    run = cfg.run
    n_eval = run.eval_examples
    if run.data_path is not None:
        rows = task.load("train", run.data_path, source="file")
        if run.data_source in ("hub", "generated"):
            held = task.load("test", source=run.data_source, n=n_eval) if n_eval else []
        else:
            k = min(n_eval, len(rows) // 2)
            held, rows = (rows[len(rows) - k:], rows[:len(rows) - k]) if k else ([], rows)
        if run.train_examples is not None:
            rows = rows[:run.train_examples]
        return rows, held
    source = run.data_source
    train_rows = task.load("train", source=source, n=run.train_examples)
    held = task.load("test", source=source, n=n_eval) if n_eval else []
    return train_rows, held


def encode_prompts(tokenizer, texts: Sequence[str], pad_id: int, max_len: int | None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Texts -> left-padded ids [N, P] and mask [N, P]; longer prompts keep their LAST max_len tokens (TRL)."""
    seqs = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    if max_len is not None:
        seqs = [s[-max_len:] for s in seqs]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, width - len(s):] = 1
    return ids, mask


def decode(tokenizer, completions: torch.Tensor, eos: int) -> list[str]:
    """[B, L] -> texts up to the first EOS (exclusive), special tokens skipped (as stp.eval)."""
    out = []
    for toks in completions.tolist():
        toks = toks[:toks.index(eos)] if eos in toks else toks
        out.append(tokenizer.decode(toks, skip_special_tokens=True))
    return out


def until_eos(completions: torch.Tensor, eos: int) -> list[list[int]]:
    """[B, L] -> each completion's token ids up to the first EOS (exclusive), as TRL's ``completion_ids``."""
    out = []
    for toks in completions.tolist():
        out.append(toks[:toks.index(eos)] if eos in toks else toks)
    return out


def task_for(cfg: TrainConfig):
    """The task with the prompts of ``run.prompt_format`` (the tiny model reads the compact prompt of
    ``stp.tasks.prompts``: d1's ~500-character system prompt is ~500 tokens for its character-level tokenizer)."""
    from stp.tasks.prompts import task_with_prompt

    return task_with_prompt(cfg.run.task, cfg.run.prompt_format, d1_compat=cfg.run.d1_compat)


def custom_task(cfg: TrainConfig, reward_funcs=None, reward_weights=None, train_dataset=None, eval_dataset=None):
    """(task, training rows, held-out rows) for your own reward functions and data (``stp.tasks.custom``), from
    the arguments of ``stp.Trainer`` or else ``run.reward`` / ``run.dataset``; None when neither is given (the
    built-in task). Rewards without data train on the configured task's examples and prompts; data without rewards
    needs ``reasoning_gym:NAME`` (its verifier). The reward functions' parameters are checked against the columns
    here, before any model loads."""
    from stp.config import ConfigError
    from stp.tasks import custom
    from stp.tasks.reward_funcs import check_columns

    run = cfg.run
    dataset = run.dataset if train_dataset is None else None
    if reward_funcs is None and not run.reward and train_dataset is None and dataset is None:
        return None
    funcs = list(reward_funcs) if reward_funcs is not None else [custom.load_reward(s) for s in run.reward]
    if reward_weights is None and run.reward_weights:
        reward_weights = [float(w) for w in run.reward_weights]
    if not funcs and dataset is not None and dataset.startswith("reasoning_gym:"):
        funcs = [custom.reasoning_gym_reward]
    if not funcs:
        raise ConfigError.bad_value("run.reward", "", "one or more MODULE:FUNCTION with your own data (only "
                                    "reasoning_gym:NAME brings its own verifier)")
    n_eval = run.eval_examples
    base = None
    if train_dataset is not None:
        rows = custom.rows_of(train_dataset, "train_dataset")
        held = custom.rows_of(eval_dataset, "eval_dataset") if eval_dataset is not None else None
        source = "train_dataset"
    elif dataset is not None:
        rows = custom.load_rows(dataset, run.dataset_split, n=run.train_examples, seed=run.seed)
        held = (custom.load_rows(dataset, run.eval_split, n=n_eval or None, seed=run.seed)
                if run.eval_split is not None else None)
        source = f"run.dataset {dataset!r}"
    else:
        from stp.tasks import get_task

        base = task_for(cfg)
        rows, held = load_data(cfg, get_task(run.task, d1_compat=run.d1_compat))
        source = f"task {run.task!r}"
    if held is None:  # the training rows' last eval_examples are held out
        k = min(n_eval, len(rows) // 2)
        held, rows = (rows[len(rows) - k:], rows[:len(rows) - k]) if k else ([], rows)
    if run.train_examples is not None:
        rows = rows[:run.train_examples]
    held = held[:n_eval]
    columns = list(dict.fromkeys(k for row in rows for k in row))
    check_columns(funcs, columns, source)
    chat = base is None and not isinstance(rows[0]["prompt"], str)
    weights = None if reward_weights is None else tuple(float(w) for w in reward_weights)
    return custom.FunctionTask(funcs=tuple(funcs), weights=weights, base=base, chat=chat), rows, held
