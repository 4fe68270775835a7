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

__all__ = ["DataOrder", "PromptTexts", "load_data", "task_for", "encode_prompts", "decode"]


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


def task_for(cfg: TrainConfig):
    """The task with the prompts of ``run.prompt_format`` (the tiny model reads the compact prompt of
    ``stp.tasks.prompts``: d1's ~500-character system prompt is ~500 tokens for its character-level tokenizer)."""
    from stp.tasks.prompts import task_with_prompt

    return task_with_prompt(cfg.run.task, cfg.run.prompt_format, d1_compat=cfg.run.d1_compat)
