"""The starting checkpoint of the embedded default run: masked-diffusion SFT of the tiny model on a task's generator.

``python -m stp.pretrain`` (no arguments) builds exactly the checkpoint that ``ensure_pretrained()`` caches for
``python -m stp.train``; ``--out DIR`` writes it elsewhere. Everything is procedural and seeded: the same settings
give the same weights (CPU, same torch and thread count).

A little over 500 lines: the SFT loop, its settings checks, the checkpoint cache (``ensure_pretrained``,
``resolve_model_name``: the place ``pretrained:TASK`` model names are resolved, above the model layer) and the CLI.

Compact prompt (``compact_prompt``, in ``stp.tasks.prompts``; the tiny model's prompt format). d1's prompts carry a
~500-character system prompt, i.e. ~500 tokens under the tiny model's character-level tokenizer: far too slow for RL
on a CPU. The tiny model gets the puzzle alone, in one user turn of the chat template (no system turn)::

    <|user|>\\nsudoku 4123030034121034<|eos|>\\n<|assistant|>\\n          (29 tokens)
    <|user|>\\ncountdown 44 19 35 -> 98<|eos|>\\n<|assistant|>\\n

``compact_task(name)`` is the task with this prompt (same rewards, metric, data), to pass to
``stp.evaluation.evaluate`` and to the trainer.

Reference completions (``reference_completion``), in the d1 format with the tags as single tokens::

    sudoku:    <reasoning>04 empty</reasoning>\\n<answer>4123234134121234</answer>      (29 tokens)
    countdown: <reasoning>(44+19)+35=98</reasoning>\\n<answer>(44+19)+35</answer>

padded with EOS to ``gen_length`` (so the model learns to stop).

Objective (LLaDA's SFT loss): per example t ~ U(eps, 1]; each completion token (EOS padding included) is masked
with probability t (the t of a batch are stratified: (i + u) / B in a random order); the prompt is never masked; loss =
sum over masked tokens of -log p(token) / t, divided by the number of completion tokens (gen_length), averaged over
the batch. Log-probabilities come from ``stp_kernels.masked_logprob`` at the masked rows only (no full logits).
AdamW, linear warm-up then cosine decay to 10 %. All randomness comes from ``torch.Generator`` objects seeded from
``seed`` (model init, batch order, mask draws) and from the task's seeded generator: no global RNG is read or set.

What SFT is meant to teach: the task's shape (copying the givens, a short reasoning, stopping) and part of the
answer. Two knobs make the SFT corpus imperfect the way real SFT data is:

- ``format_noise``: the fraction of references that write the answer between plain newlines instead of the
  ``<answer>`` tags (same token positions: ``...</reasoning>\n\n4123...1234\n``). The reward reads only a tagged
  answer, so such a completion scores 0. Sudoku's default is 0.6: the SFT corpus writes most answers untagged, and
  the SFT model then writes the untagged form under greedy decoding (held-out reward 0.000) and a tagged one in
  about 1 % of the samples at temperature 0.9, while its digits are as good as those of a model trained on tagged
  answers only. RL has to find the format the reward asks for: the default run's gain is that format compliance,
  not better Sudoku (README, "What the default run shows"). At 0.5 the greedy format depends on the data seed
  (either way round); 0.7 leaves no tagged samples to learn from.
- ``answer_noise``: the fraction of the empty cells of each reference answer replaced by a random digit.
- ``relabel_noise`` (Sudoku only): the fraction of references whose answer is the solution with every digit
  relabelled by the fixed cyclic permutation d -> d % 4 + 1 (``1234`` -> ``2341``), tags intact. The relabelled grid
  is a valid Sudoku, consistent and learnable, but wrong: it contradicts every given and fills no empty cell right
  (reward 0). At 0.6 (``pretrained:sudoku_relabel``, with ``format_noise`` 0) the SFT model writes the relabelled
  grid under greedy decoding and the right one in a good share of its samples at temperature 0.9: a checkpoint
  whose pass@8 is far above its greedy accuracy, on which RL can raise greedy accuracy within CPU minutes (the
  methods' comparison, ``compare-tiny``; numbers in benchmarks/RESULTS.md). A zero ``relabel_noise`` draws nothing
  and is left out of the settings hash, so checkpoints built before the knob existed keep their cache names.

Named checkpoints (``CHECKPOINTS``): ``pretrained:NAME`` is a task's defaults (``pretrained:sudoku``) or a named
variant with its own overrides (``pretrained:sudoku_relabel``: sudoku, ``format_noise`` 0, ``relabel_noise`` 0.6).

Training puzzles come from the generator's train split with ``data_seed`` (1 by default): a different stream from
the one ``stp.train`` draws its RL prompts from (seed 0), and never a held-out (test-split) grid. Numbers are in
``pretrain.json`` of the output and in the module's ``__main__`` report.

Output directory: ``DiffusionLM.save`` files (``config.json``, ``model.safetensors``, tokenizer files) plus
``pretrain.json``: settings, their hash, wall time, the final loss, and the held-out reward / metric (greedy, the
compact prompt, ``eval_examples`` test puzzles) of the initial and of the pretrained model.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

# The prompt formats moved to stp.tasks.prompts; re-exported here for callers of the earlier names.
from stp.tasks.prompts import (  # noqa: F401
    PRETRAIN_TASKS,
    PROMPT_FORMATS,
    PromptError,
    compact_prompt,
    compact_task,
    task_with_prompt,
)

__all__ = ["DEFAULTS", "CHECKPOINTS", "PROMPT_FORMATS", "PretrainError", "compact_prompt", "compact_task",
           "task_with_prompt",
           "reference_completion", "default_settings",
           "settings_hash", "checkpoint_settings", "make_batch", "sft_loss", "pretrain", "ensure_pretrained",
           "default_cache_dir", "main"]

FORMAT_VERSION = 1
INFO_FILE = "pretrain.json"
MASK_EPS = 1e-3

# Defaults per task; every key is a keyword of `pretrain` (and a CLI flag). The model keys go to `build_tiny`.
DEFAULTS: dict[str, dict[str, Any]] = {
    "sudoku": dict(steps=600, batch_size=32, lr=2e-3, weight_decay=0.01, warmup=20, seed=0, gen_length=32,
                   block_length=32, n_train=4000, data_seed=1, answer_noise=0.0, format_noise=0.6, relabel_noise=0.0,
                   curriculum_hold=0, curriculum_grow=0,
                   eval_examples=32, eval_seed=0,
                   hidden_size=128, num_hidden_layers=4, intermediate_size=384, num_attention_heads=4),
    "countdown": dict(steps=600, batch_size=32, lr=2e-3, weight_decay=0.01, warmup=20, seed=0, gen_length=64,
                      block_length=32, n_train=4000, data_seed=1, answer_noise=0.0, format_noise=0.0,
                      relabel_noise=0.0, curriculum_hold=0, curriculum_grow=0, eval_examples=32,
                      eval_seed=0,
                      hidden_size=128, num_hidden_layers=4, intermediate_size=384, num_attention_heads=4),
    # The methods' comparison (stp.tasks.countdown_small): small numbers, + and -, a 32-token canvas, 600 puzzles.
    "countdown_small": dict(steps=600, batch_size=32, lr=2e-3, weight_decay=0.01, warmup=20, seed=0, gen_length=32,
                            block_length=32, n_train=600, data_seed=1, answer_noise=0.0, format_noise=0.0,
                            relabel_noise=0.0, curriculum_hold=0, curriculum_grow=0, eval_examples=32, eval_seed=0,
                            hidden_size=128, num_hidden_layers=4, intermediate_size=384, num_attention_heads=4),
    # The long-answer task (stp.tasks.chain): 108-token completions in a 128-token canvas, blocks of 32.
    "chain": dict(steps=3000, batch_size=16, lr=1e-3, weight_decay=0.01, warmup=100, seed=0, gen_length=128,
                  block_length=32, n_train=4000, data_seed=1, answer_noise=0.0, format_noise=0.0, relabel_noise=0.0,
                  curriculum_hold=1000, curriculum_grow=30, eval_examples=32, eval_seed=0,
                  hidden_size=128, num_hidden_layers=4, intermediate_size=384, num_attention_heads=4),
}
# Named checkpoints: pretrained:NAME -> (task, overrides of its DEFAULTS). A task's name alone is its defaults.
CHECKPOINTS: dict[str, tuple[str, dict[str, Any]]] = {
    # The methods' comparison (compare-tiny): a systematic wrong mode the model prefers greedily (module docstring).
    "sudoku_relabel": ("sudoku", {"format_noise": 0.0, "relabel_noise": 0.6}),
}
MODEL_KEYS = ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads")


class PretrainError(PromptError):
    """A bad setting, naming the argument (or flag), the value and what is allowed."""


# ----------------------------------------------------------------------------------------------- prompt, answers


def _noisy_grid(example: Mapping[str, Any], answer_noise: float, gen: torch.Generator | None) -> str:
    solution = example["solution"]
    if answer_noise <= 0 or gen is None:
        return solution
    cells = list(solution)
    for i, p in enumerate(example["puzzle"]):
        if p == "0" and torch.rand((), generator=gen).item() < answer_noise:
            cells[i] = "1234"[int(torch.randint(0, 4, (), generator=gen))]
    return "".join(cells)


def _relabel(grid: str) -> str:
    """Every digit d -> d % 4 + 1: a valid grid with no cell of ``grid`` kept."""
    return grid.translate(str.maketrans("1234", "2341"))


def reference_completion(task: str, example: Mapping[str, Any], *, answer_noise: float = 0.0,
                         format_noise: float = 0.0, generator: torch.Generator | None = None,
                         relabel_noise: float = 0.0) -> str:
    """The SFT target: a short reasoning and the answer in d1's format; with probability ``format_noise`` (drawn
    from ``generator``) the answer sits between newlines instead of the tags (the same number of tokens); Sudoku:
    with probability ``relabel_noise`` (drawn after it, only when > 0) the grid is relabelled (d -> d % 4 + 1).

    >>> reference_completion("sudoku", {"puzzle": "4123030034121034", "solution": "4123234134121234"})
    '<reasoning>04 empty</reasoning>\\n<answer>4123234134121234</answer>'
    >>> reference_completion("countdown", {"nums": [44, 19, 35], "target": 98, "solution": "(44 + 19) + 35"})
    '<reasoning>(44+19)+35=98</reasoning>\\n<answer>(44+19)+35</answer>'
    """
    bare = format_noise > 0 and generator is not None and torch.rand((), generator=generator).item() < format_noise
    if task == "sudoku":
        empty = example["puzzle"].count("0")
        grid = _noisy_grid(example, answer_noise, generator)
        if relabel_noise > 0 and generator is not None and \
                torch.rand((), generator=generator).item() < relabel_noise:
            grid = _relabel(grid)
        answer = f"\n{grid}\n" if bare else f"<answer>{grid}</answer>"
        return f"<reasoning>{empty:02d} empty</reasoning>\n{answer}"
    if task in ("countdown", "countdown_small"):
        from stp.tasks.countdown import solve

        expr = example.get("solution") or solve(list(example["nums"]), example["target"])
        if expr is None:
            raise PretrainError(f"countdown example {dict(example)!r} has no solution")
        expr = expr.replace(" ", "")
        answer = f"\n{expr}\n" if bare else f"<answer>{expr}</answer>"
        return f"<reasoning>{expr}={example['target']}</reasoning>\n{answer}"
    if task == "chain":  # every step written out (stp.tasks.chain); answer_noise: a wrong final digit
        from stp.tasks.chain import run_chain, steps_text

        digit = run_chain(int(example["start"]), example["ops"])[-1]
        if answer_noise > 0 and generator is not None and torch.rand((), generator=generator).item() < answer_noise:
            digit = (digit + 1 + int(torch.randint(0, 9, (), generator=generator))) % 10
        answer = f"\n{digit}\n" if bare else f"<answer>{digit}</answer>"
        return f"<reasoning>{steps_text(int(example['start']), example['ops'])}</reasoning>\n{answer}"
    raise PretrainError(f"task={task!r}: no reference completion; allowed: {', '.join(PRETRAIN_TASKS)}")


# ------------------------------------------------------------------------------------------------------ settings


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise PretrainError(f"{name}={value!r}: must be an integer >= {minimum}")


def validate_settings(s: Mapping[str, Any], *, flags: bool = False) -> None:
    """Every check that can run before any work; PretrainError naming the argument (``--flag`` with ``flags``)."""
    def n(key: str) -> str:
        return "--" + key.replace("_", "-") if flags else key

    if s["task"] not in PRETRAIN_TASKS:
        raise PretrainError(f"{n('task')}={s['task']!r}: allowed: {', '.join(PRETRAIN_TASKS)}")
    for key, minimum in (("steps", 1), ("batch_size", 1), ("gen_length", 1), ("block_length", 1), ("n_train", 1),
                         ("eval_examples", 0), ("warmup", 0), ("seed", 0), ("data_seed", 0), ("eval_seed", 0),
                         ("hidden_size", 8), ("num_hidden_layers", 1), ("intermediate_size", 1),
                         ("num_attention_heads", 1)):
        _check_int(n(key), s[key], minimum)
    for key, lo, hi, lo_open in (("lr", 0.0, 1.0, True), ("weight_decay", 0.0, 10.0, False),
                                 ("answer_noise", 0.0, 1.0, False), ("format_noise", 0.0, 1.0, False),
                                 ("relabel_noise", 0.0, 1.0, False)):
        v = s[key]
        if (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
                or (v <= lo if lo_open else v < lo) or v > hi):
            raise PretrainError(f"{n(key)}={v!r}: must be a number in {'(' if lo_open else '['}{lo}, {hi}]")
    for key in ("curriculum_hold", "curriculum_grow"):
        _check_int(n(key), s[key], 0)
    if (s["curriculum_hold"] or s["curriculum_grow"]) and s["task"] != "chain":
        raise PretrainError(f"{n('curriculum_hold')}={s['curriculum_hold']}, {n('curriculum_grow')}="
                            f"{s['curriculum_grow']} with {n('task')}={s['task']!r}: allowed: 0 (the length "
                            "curriculum is defined for chain only)")
    if s["curriculum_hold"] and not s["curriculum_grow"]:
        raise PretrainError(f"{n('curriculum_grow')}=0 with {n('curriculum_hold')}={s['curriculum_hold']}: allowed: "
                            ">= 1 (steps per added chain step once the hold ends)")
    if s["relabel_noise"] and s["task"] != "sudoku":
        raise PretrainError(f"{n('relabel_noise')}={s['relabel_noise']!r} with {n('task')}={s['task']!r}: "
                            "allowed: 0 (relabelling is defined for sudoku's digits only)")
    if s["gen_length"] % s["block_length"]:
        raise PretrainError(f"{n('gen_length')}={s['gen_length']} is not a multiple of {n('block_length')}="
                            f"{s['block_length']}; allowed: a positive multiple of the block length")
    if s["hidden_size"] % s["num_attention_heads"] or (s["hidden_size"] // s["num_attention_heads"]) % 2:
        raise PretrainError(f"{n('hidden_size')}={s['hidden_size']} must split into {n('num_attention_heads')}="
                            f"{s['num_attention_heads']} heads of an even size (RoPE)")
    # The longest reference completion must fit the canvas (sudoku: fixed 28 tokens; countdown: up to ~40).
    need = _max_completion_tokens(s["task"])
    if s["gen_length"] < need:
        raise PretrainError(f"{n('gen_length')}={s['gen_length']}: {s['task']} reference completions need up to "
                            f"{need} tokens; allowed: a multiple of {n('block_length')} >= {need}")


def _max_completion_tokens(task: str) -> int:
    # sudoku: 1 + len("10 empty") + 1 + 1 + 1 + 16 + 1; countdown: expressions of three numbers < 100 are at most
    # 12 characters ("(99*99)-99" style, with one pair of brackets): 1 + 12 + 1 + 3 + 1 + 1 + 1 + 12 + 1.
    # countdown_small: "12+12-12" (8) and a target up to 36: 1 + 8 + 1 + 2 + 1 + 1 + 1 + 8 + 1.
    # chain: 1 + 2 + 5 * 20 + 1 + 1 + 3 (stp.tasks.chain, 20 steps).
    return {"sudoku": 29, "countdown_small": 24, "chain": 108}.get(task, 33)


def default_settings(task: str = "sudoku", **overrides) -> dict[str, Any]:
    """The complete settings of a pretraining run: the task's ``DEFAULTS`` updated by ``overrides`` (checked)."""
    if task not in DEFAULTS:
        raise PretrainError(f"task={task!r}: allowed: {', '.join(PRETRAIN_TASKS)}")
    unknown = sorted(set(overrides) - set(DEFAULTS[task]))
    if unknown:
        raise PretrainError(f"unknown setting(s) {unknown}; allowed: {', '.join(DEFAULTS[task])}")
    out = {"task": task, **DEFAULTS[task], **overrides}
    validate_settings(out)
    return out


def settings_hash(settings: Mapping[str, Any]) -> str:
    """16 hex digits: SHA-256 of the canonical JSON of the settings, the format version and the torch version. A
    zero ``relabel_noise``, ``curriculum_hold`` or ``curriculum_grow`` is left out (off: the checkpoints made before
    these knobs keep their hash)."""
    settings = {k: v for k, v in settings.items()
                if not (k in ("relabel_noise", "curriculum_hold", "curriculum_grow") and not v)}
    blob = json.dumps({**settings, "format": FORMAT_VERSION, "torch": torch.__version__.split("+")[0]},
                      sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------- data, loss


def _encode_examples(tokenizer, task, examples: Sequence[Mapping[str, Any]], gen_length: int, answer_noise: float,
                     generator: torch.Generator | None, format_noise: float = 0.0, relabel_noise: float = 0.0):
    """Left-padded prompts [N, P] with their mask, and EOS-padded reference completions [N, gen_length]."""
    prompts, completions = [], []
    for ex in examples:
        prompt = task.format_prompt(ex, tokenizer)
        prompts.append(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        text = reference_completion(task.name, ex, answer_noise=answer_noise, format_noise=format_noise,
                                    generator=generator, relabel_noise=relabel_noise)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) > gen_length:
            raise PretrainError(f"gen_length={gen_length}: the reference completion {text!r} has {len(ids)} tokens")
        completions.append(ids + [tokenizer.eos_token_id] * (gen_length - len(ids)))
    width = max(len(p) for p in prompts)
    prompt_ids = torch.full((len(prompts), width), tokenizer.pad_token_id, dtype=torch.long)
    prompt_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for r, p in enumerate(prompts):
        prompt_ids[r, width - len(p):] = torch.tensor(p, dtype=torch.long)
        prompt_mask[r, width - len(p):] = 1
    return prompt_ids, prompt_mask, torch.tensor(completions, dtype=torch.long)


def make_batch(model, task: str, examples: Sequence[Mapping[str, Any]], gen_length: int) -> dict[str, torch.Tensor]:
    """A batch {prompt_ids, prompt_mask, completion} of reference completions for ``examples``."""
    ids, mask, comp = _encode_examples(model.tokenizer, compact_task(task), examples, gen_length, 0.0, None)
    return {"prompt_ids": ids, "prompt_mask": mask, "completion": comp}


def sft_loss(model, batch: Mapping[str, torch.Tensor], generator: torch.Generator, *, eps: float = MASK_EPS,
             backend: str | None = None) -> torch.Tensor:
    """LLaDA's SFT loss on one batch (see the module docstring); mask draws from ``generator``."""
    from stp_kernels import masked_logprob

    prompt_ids, prompt_mask, completion = batch["prompt_ids"], batch["prompt_mask"], batch["completion"]
    b, g = completion.shape
    p = prompt_ids.shape[1]
    # Stratified draws (each t is U(eps, 1] marginally; the batch covers (eps, 1] evenly): lower variance.
    u = (torch.arange(b, dtype=torch.float64) + torch.rand((), generator=generator, dtype=torch.float64)) / b
    t = (eps + (1.0 - eps) * u[torch.randperm(b, generator=generator)]).float()
    masked = torch.rand(b, g, generator=generator) < t[:, None]
    noisy = completion.masked_fill(masked, model.mask_token_id)
    ids = torch.cat([prompt_ids, noisy], 1)
    attn = None
    if not bool(prompt_mask.all()):
        attn = torch.cat([prompt_mask, torch.ones_like(completion)], 1)
    hidden = model.backbone(ids, attn)  # [B, P + G, H]
    rb, rc = masked.nonzero(as_tuple=True)
    if rb.numel() == 0:  # nothing masked anywhere (all t tiny): a zero loss that still has a graph
        return hidden.sum() * 0.0
    rows = rb * (p + g) + p + rc
    logp = masked_logprob(hidden, model.lm_head_weight, completion[rb, rc], rows=rows, backend=backend)
    return -(logp / t[rb]).sum() / (b * g)


class _ChainCurriculum:
    """Chain's length curriculum (``curriculum_hold`` / ``curriculum_grow``). A fresh model's attention over a
    20-step chain in a 128-token canvas is spread over ~240 positions and carries little gradient towards the one
    token a step's result needs (the result above it); on chains of 4 operations in a canvas of their own length
    (~60 positions) the 4-layer model learns to compute a step within a few hundred steps, and the skill carries
    over as the length grows (measured: stp.tasks.chain's docstring). Each optimizer step trains on one length: 4
    operations for the first ``curriculum_hold`` steps,
    then the longest length allowed grows by one every ``curriculum_grow`` steps up to ``stp.tasks.chain.N_STEPS``;
    from then on half the steps are full-length chains in the full canvas (the ordinary batches, ``None`` here)
    and half a uniform shorter length. Short chains come from the train split (``data_seed``-keyed streams, 100 per
    length: 4 operations of +-1 allow 112 train puzzles) in a canvas of exactly their reference length (5 n + 8
    tokens); the draws come from a generator seeded from ``seed``."""

    SHORTEST, HELD = 4, 4
    PER_LENGTH = 100

    def __init__(self, tokenizer, ctask, s: Mapping[str, Any]):
        from stp.tasks.chain import N_STEPS, generate

        self.hold, self.grow, self.full = s["curriculum_hold"], s["curriculum_grow"], N_STEPS
        self.gen = torch.Generator().manual_seed(s["seed"] * 1_000_003 + 3)
        self.pools = {}
        for n in range(self.SHORTEST, N_STEPS):
            examples = generate(self.PER_LENGTH, "train", s["data_seed"] * 1000 + n, n_steps=n)
            ids, mask, comp = _encode_examples(tokenizer, ctask, examples, 5 * n + 8, 0.0, None)
            self.pools[n] = {"prompt_ids": ids, "prompt_mask": mask, "completion": comp}

    def length(self, step: int) -> int:
        """The number of operations of this step's chains (``full`` = the ordinary batches)."""
        top = self.HELD if step < self.hold else min(self.full, self.HELD + (step - self.hold) // self.grow)
        if top == self.full and torch.rand((), generator=self.gen).item() < 0.5:
            return self.full
        return int(torch.randint(self.SHORTEST, min(top, self.full - 1) + 1, (), generator=self.gen))

    def batch(self, step: int, size: int) -> dict[str, torch.Tensor] | None:
        n = self.length(step)
        if n == self.full:
            return None
        pool = self.pools[n]
        pick = torch.randint(0, pool["completion"].shape[0], (size,), generator=self.gen)
        return {k: v[pick] for k, v in pool.items()}


def _lr_factor(step: int, steps: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


# ------------------------------------------------------------------------------------------------------ training


def _evaluate(model, task, examples, settings) -> dict[str, float]:
    from stp.evaluation import evaluate

    g = settings["gen_length"]
    res = evaluate(model, task, examples, gen_length=g, block_length=settings["block_length"], steps=g // 2,
                   batch_size=min(32, len(examples)), progress=False)
    return {"reward": res["mean_reward"], "metric": res["accuracy"], "eos_rate": res["eos_rate"],
            "format_rate": sum(r["answer"] is not None for r in res["records"]) / len(res["records"]),
            "seconds": res["seconds"], "example_completion": res["records"][0]["completion"]}


def pretrain(task: str = "sudoku", *, out_dir: str | os.PathLike, progress: bool = True, overwrite: bool = False,
             **settings) -> Path:
    """Masked-diffusion SFT of a fresh tiny model on ``task``'s generator; writes ``out_dir`` and returns it.

    ``settings``: any key of ``DEFAULTS[task]`` (steps, batch_size, lr, weight_decay, warmup, seed, gen_length,
    block_length, n_train, data_seed, answer_noise, format_noise, relabel_noise, eval_examples, eval_seed and the
    model sizes); the rest keep
    their defaults. ``out_dir`` must not exist or be empty (``overwrite`` replaces it); it is written atomically
    (a temporary sibling directory renamed at the end).
    """
    from tqdm.auto import tqdm

    from stp.models import build_tiny

    s = default_settings(task, **settings)
    out_dir = Path(out_dir).expanduser()
    if out_dir.exists() and not overwrite and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise PretrainError(f"out_dir={str(out_dir)!r} exists and is not empty (pass overwrite=True / --overwrite)")
    start = time.time()
    seed = s["seed"]
    model = build_tiny(seed, **{k: s[k] for k in MODEL_KEYS}, num_key_value_heads=s["num_attention_heads"])
    ctask = compact_task(task)
    tokenizer = model.tokenizer
    train = ctask.load("train", source="generated", n=s["n_train"], seed=s["data_seed"])
    test = ctask.load("test", source="generated", n=s["eval_examples"], seed=s["eval_seed"]) if s["eval_examples"] \
        else []
    noise_gen = torch.Generator().manual_seed(seed * 1_000_003 + 17)
    prompt_ids, prompt_mask, completion = _encode_examples(tokenizer, ctask, train, s["gen_length"],
                                                           s["answer_noise"], noise_gen, s["format_noise"],
                                                           s["relabel_noise"])

    before = _evaluate(model, ctask, test, s) if test else None
    curriculum = _ChainCurriculum(tokenizer, ctask, s) if s["curriculum_hold"] else None

    order_gen = torch.Generator().manual_seed(seed * 1_000_003 + 1)
    mask_gen = torch.Generator().manual_seed(seed * 1_000_003 + 2)
    decay = [p for name, p in model.named_parameters() if p.ndim >= 2 and "embed" not in name]
    no_decay = [p for name, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in name)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": s["weight_decay"]},
                             {"params": no_decay, "weight_decay": 0.0}], lr=s["lr"], betas=(0.9, 0.99))
    model.train()
    n, bs = len(train), s["batch_size"]
    perm, pos = torch.randperm(n, generator=order_gen), 0
    losses: list[float] = []

    def _next_batch() -> dict[str, torch.Tensor]:
        """The next ``bs`` training examples in the epoch's order (a new order each epoch)."""
        nonlocal perm, pos
        idx: list[int] = []
        while len(idx) < bs:
            if pos >= n:
                perm, pos = torch.randperm(n, generator=order_gen), 0
            take = perm[pos:pos + bs - len(idx)]
            idx = [*idx, *take.tolist()]
            pos += len(take)
        idx_t = torch.tensor(idx)
        pm = prompt_mask[idx_t]
        cut = int((pm.sum(1).max()).item())  # drop the columns of left padding no row of this batch uses
        return {"prompt_ids": prompt_ids[idx_t][:, -cut:], "prompt_mask": pm[:, -cut:],
                "completion": completion[idx_t]}

    bar = tqdm(range(s["steps"]), desc=f"pretrain {task}", unit="step", disable=not progress, dynamic_ncols=True)
    for step in bar:
        # a batch of short chains in their own short canvas (the length curriculum), else the ordinary batch
        batch = curriculum.batch(step, bs) if curriculum is not None else None
        if batch is None:
            batch = _next_batch()
        for group in opt.param_groups:
            group["lr"] = s["lr"] * _lr_factor(step, s["steps"], s["warmup"])
        loss = sft_loss(model, batch, mask_gen)
        if not torch.isfinite(loss):
            raise RuntimeError(f"pretrain: non-finite loss {loss.item()} at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.item()))
        if step % 10 == 0 or step == s["steps"] - 1:
            bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}")
    bar.close()
    model.eval()
    train_seconds = time.time() - start

    after = _evaluate(model, ctask, test, s) if test else None
    info = {
        "format": FORMAT_VERSION,
        "settings": s,
        "settings_hash": settings_hash(s),
        "prompt_format": "compact: one user turn '" + compact_prompt(task, train[0]) + "' (stp.pretrain."
                         "compact_prompt), no system prompt",
        "example_prompt": ctask.format_prompt(train[0], tokenizer),
        "example_completion": reference_completion(task, train[0]),
        "parameters": sum(p.numel() for p in model.parameters()),
        "loss_first10": sum(losses[:10]) / len(losses[:10]),
        "loss_last10": sum(losses[-10:]) / len(losses[-10:]),
        "train_seconds": train_seconds,
        "wall_seconds": time.time() - start,
        "eval": {"examples": len(test), "split": "test", "greedy": True, "gen_length": s["gen_length"],
                 "block_length": s["block_length"], "steps": s["gen_length"] // 2, "before": before, "after": after},
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "command": "python -m stp.pretrain " + " ".join(_cli_args(s)),
    }
    _write_atomic(out_dir, model, info, overwrite=overwrite)
    return out_dir


def _write_atomic(out_dir: Path, model, info: Mapping[str, Any], *, overwrite: bool) -> None:
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        model.save(tmp)
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=2, default=str) + "\n")
        if out_dir.exists():
            if overwrite or (out_dir.is_dir() and not any(out_dir.iterdir())):
                shutil.rmtree(out_dir) if out_dir.is_dir() else out_dir.unlink()
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _cli_args(s: Mapping[str, Any]) -> list[str]:
    """The flags that differ from the task's defaults (so the command reproduces these settings)."""
    out = [] if s["task"] == "sudoku" else ["--task", s["task"]]
    for key, default in DEFAULTS[s["task"]].items():
        if s[key] != default:
            out += ["--" + key.replace("_", "-"), str(s[key])]
    return out


# ---------------------------------------------------------------------------------------------------------- cache


def default_cache_dir() -> Path:
    """``$STP_CACHE_DIR/pretrained``, else ``$XDG_CACHE_HOME/stp/pretrained``, else ``~/.cache/stp/pretrained``."""
    if os.environ.get("STP_CACHE_DIR"):
        return Path(os.environ["STP_CACHE_DIR"]).expanduser() / "pretrained"
    base = Path(os.environ["XDG_CACHE_HOME"]).expanduser() if os.environ.get("XDG_CACHE_HOME") else \
        Path.home() / ".cache"
    return base / "stp" / "pretrained"


def cached_path(task: str = "sudoku", cache_dir: str | os.PathLike | None = None, **settings) -> Path:
    """Where ``ensure_pretrained`` keeps the checkpoint of these settings: ``<cache_dir>/<task>-<settings hash>``."""
    s = default_settings(task, **settings)
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return root / f"{task}-{settings_hash(s)}"


def _complete(path: Path, want: str) -> bool:
    try:
        info = json.loads((path / INFO_FILE).read_text())
    except (OSError, ValueError):
        return False
    return info.get("settings_hash") == want and (path / "model.safetensors").is_file()


def ensure_pretrained(task: str = "sudoku", cache_dir: str | os.PathLike | None = None, *, progress: bool = True,
                      **settings) -> Path:
    """The cached starting checkpoint for ``task`` (default settings unless overridden), built on first use.

    Building happens in a temporary directory renamed into place, so an interrupted build leaves no checkpoint
    behind and two processes racing both end with the same complete directory."""
    s = default_settings(task, **settings)
    path = cached_path(task, cache_dir, **settings)
    want = settings_hash(s)
    if _complete(path, want):
        return path
    if path.exists():  # not ours or incomplete (cannot come from our atomic writes): move it aside, rebuild
        stale = path.with_name(f".{path.name}.stale-{os.getpid()}")
        os.rename(path, stale)
        shutil.rmtree(stale, ignore_errors=True)
    print(f"stp.pretrain: building the starting checkpoint {path} (once; "
          f"`python -m stp.pretrain {' '.join(_cli_args(s))}` rebuilds it)", file=sys.stderr)
    try:
        pretrain(task, out_dir=path, progress=progress, **{k: v for k, v in s.items() if k != "task"})
    except OSError:
        if _complete(path, want):  # another process finished first
            return path
        raise
    return path


def checkpoint_settings(name: str) -> tuple[str, dict[str, Any]]:
    """``pretrained:NAME`` (or NAME) -> (task, overrides of its defaults): a task's name, or a ``CHECKPOINTS`` entry.

    >>> checkpoint_settings("pretrained:sudoku_relabel")
    ('sudoku', {'format_noise': 0.0, 'relabel_noise': 0.6})
    """
    key = name.split(":", 1)[1] if name.startswith("pretrained:") else name
    if key in CHECKPOINTS:
        task, overrides = CHECKPOINTS[key]
        return task, dict(overrides)
    if key in DEFAULTS:
        return key, {}
    raise PretrainError(f"pretrained:{key}: no such checkpoint; allowed: "
                        f"{', '.join('pretrained:' + k for k in (*DEFAULTS, *CHECKPOINTS))}")


def resolve_model_name(name: str, *, progress: bool = True) -> str:
    """``pretrained:NAME`` (a task, or a ``CHECKPOINTS`` name) -> the cached checkpoint directory (built on first use
    by ``ensure_pretrained``); any other name unchanged. The model layer (``stp.models.load``) does not build
    checkpoints: callers resolve here."""
    if name.startswith("pretrained:"):
        task, overrides = checkpoint_settings(name)
        return str(ensure_pretrained(task=task, progress=progress, **overrides))
    return name


def load_model(name: str, **kwargs):
    """``stp.models.load`` after ``resolve_model_name`` (``pretrained:TASK`` included)."""
    from stp.models import load

    return load(resolve_model_name(name), **kwargs)


# ------------------------------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    d = DEFAULTS["sudoku"]
    p = argparse.ArgumentParser(
        prog="python -m stp.pretrain",
        description="Masked-diffusion SFT of the embedded tiny model on a task's generator: the starting checkpoint "
                    "of the default RL run. With no --out, writes the cache directory ensure_pretrained() uses.")
    p.add_argument("--task", default="sudoku", help=f"one of: {', '.join(PRETRAIN_TASKS)} [sudoku]")
    p.add_argument("--out", default=None, metavar="DIR", help="output directory [the ensure_pretrained cache path]")
    p.add_argument("--cache-dir", default=None, metavar="DIR", help="cache root when --out is not given "
                   "[$STP_CACHE_DIR/pretrained or ~/.cache/stp/pretrained]")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty output directory")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    helps = {"steps": "optimizer steps", "batch_size": "examples per step", "lr": "peak AdamW learning rate",
             "weight_decay": "AdamW weight decay", "warmup": "linear warm-up steps", "seed": "model/order/mask seed",
             "gen_length": "completion canvas length (multiple of --block-length)", "block_length": "block length",
             "n_train": "generated training puzzles", "data_seed": "seed of the training-puzzle generator",
             "answer_noise": "fraction of reference empty cells replaced by a random digit",
             "format_noise": "fraction of references that write the answer bare, without the <answer> tags",
             "relabel_noise": "sudoku: fraction of references whose grid is relabelled d -> d %% 4 + 1 (wrong)",
             "curriculum_hold": "chain: steps on chains of 4 operations before the length grows (0: no curriculum)",
             "curriculum_grow": "chain: steps per added operation once the hold ends",
             "eval_examples": "held-out test puzzles scored at the end (0: none)",
             "eval_seed": "seed of the held-out puzzle generator", "hidden_size": "model width",
             "num_hidden_layers": "layers", "intermediate_size": "MLP width", "num_attention_heads": "heads"}
    for key, default in d.items():
        typ = float if isinstance(default, float) else int
        p.add_argument("--" + key.replace("_", "-"), dest=key, type=typ, default=None,
                       help=f"{helps[key]} [{default} for sudoku" + (
                           f", {DEFAULTS['countdown'][key]} for countdown]" if DEFAULTS['countdown'][key] != default
                           else "]"))
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    overrides = {k: getattr(args, k) for k in DEFAULTS["sudoku"] if getattr(args, k) is not None}
    try:
        if args.task not in PRETRAIN_TASKS:
            raise PretrainError(f"--task {args.task!r}: allowed: {', '.join(PRETRAIN_TASKS)}")
        s = {"task": args.task, **DEFAULTS[args.task], **overrides}
        validate_settings(s, flags=True)
        out = Path(args.out).expanduser() if args.out else cached_path(args.task, args.cache_dir, **overrides)
        if out.exists() and not args.overwrite and (not out.is_dir() or any(out.iterdir())):
            raise PretrainError(f"--out {str(out)!r}: exists and is not empty; pass --overwrite to replace it")
    except PretrainError as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    path = pretrain(args.task, out_dir=out, progress=not args.no_progress, overwrite=args.overwrite, **overrides)
    info = json.loads((path / INFO_FILE).read_text())
    ev = info["eval"]
    print(f"wrote {path} in {info['wall_seconds']:.1f} s (training {info['train_seconds']:.1f} s); loss "
          f"{info['loss_first10']:.3f} -> {info['loss_last10']:.3f}")
    if ev["before"] is not None:
        for name in ("before", "after"):
            e = ev[name]
            print(f"  held-out ({ev['examples']} test puzzles, greedy, gen {ev['gen_length']}) {name:6s}: reward "
                  f"{e['reward']:.3f}, metric {e['metric']:.3f}, answer-format {e['format_rate']:.2f}, "
                  f"EOS {e['eos_rate']:.2f}; e.g. {e['example_completion']!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
