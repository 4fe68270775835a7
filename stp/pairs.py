"""Offline preference pairs with trajectories (dTRPO, docs/method.md 7): ``python -m stp.pairs`` and the library.

For each prompt: sample G completions from the reference model with ``stp.sampler.generate`` (their trajectory
records included), score them with the run's rewards (the trainer's task: built-in, ``run.reward``, ``run.dataset``
or ``stp.Trainer(reward_funcs=..., train_dataset=...)``, weighted and summed exactly as a rollout's), and keep the
best (chosen) and the worst (rejected); a prompt whose G rewards are all equal gives no pair (a "skipped" line
records it, so a rerun does not redo it). The first best and the first worst in sample order are taken, so the
choice is deterministic. Prompts are truncated like training prompts (their last ``max_prompt_length`` tokens).

The JSONL file (``PAIRS_FORMAT`` = 2), one line per prompt::

    {"format": 2, "prompt_id": "<16 hex: stp.prior.prompt_id of the prompt text>", "prompt": "<text>",
     "prompt_ids": [ints], "chosen": SIDE, "rejected": SIDE, "rewards": [G floats],
     "settings": {"model", "task", "gen_length", "block_length", "steps", "temperature", "remasking",
                  "num_generations", "seed", "max_prompt_length", "reward"}}
    SIDE = {"completion_ids": [gen_length ints], "commit_step": [gen_length ints >= 0], "reward": float,
            "sample": index among the G}
    skipped prompt: {"format": 1, "prompt_id": ..., "skipped": "<why>", "rewards": [...], "settings": {...}}

``temperature`` is the sampling temperature; the trainer scores the pairs at it (``dtrpo.temperature`` unset), so
the log-ratios are those of the sampling policy. ``reward`` names the reward functions (module, name and a hash of
their source) or the built-in task's reward: a file built with other rewards is refused.

Resumable: lines are appended, flushed and fsync'ed once per batch of prompts; a rerun skips the prompts already
in the file (pairs and skips alike) and refuses a file written with other settings, naming the setting. Writers take
an exclusive lock (``fcntl.flock`` on PATH.lock) for the whole build, so two processes building the same file take
turns and the second finds the first's prompts done. Loading validates every line and names the file, the line
number and the field of the first bad one.

Command line (checked before the model loads)::

    python -m stp.pairs --model NAME_OR_PATH --task NAME --out PATH.jsonl [--split train] [--source S] [--limit N]
        [--num-generations 8] [--gen-length 32] [--block-length 32] [--steps 16] [--temperature 0.9]
        [--remasking low_confidence|random] [--max-prompt-length N] [--prompt-format chat|compact] [--seed 0]
        [--batch-size 4]
        [--device cpu|cuda[:i]] [--dtype auto|float32|bfloat16|float16]

Decoding runs without temporal pruning. ``--remasking random`` makes the choice of positions independent of the
model, so the newly-unmasked tokens' log-ratio is the whole trajectory log-ratio; with ``low_confidence`` the
trajectory's probability also has a selection term the estimator leaves out (docs/method.md 7 measures it).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import inspect
import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from stp.files import read_keyed_jsonl
from stp.prior import prompt_id, sample_id_of
from stp.seeds import derive_seed

__all__ = ["PAIRS_FORMAT", "SETTING_KEYS", "PairsFileError", "build_pairs", "read_pairs_file", "load_pairs",
           "write_records", "writer_lock", "build_into", "ensure_pairs", "pair_settings", "pairs_path",
           "reward_fingerprint", "main"]

PAIRS_FORMAT = 2
SETTING_KEYS = ("model", "task", "gen_length", "block_length", "steps", "temperature", "remasking",
                "num_generations", "seed", "max_prompt_length", "reward")


class PairsFileError(ValueError):
    """A pairs file line that is not a valid record (names file, line and field)."""


# ------------------------------------------------------------------------------------------------------- building


def reward_fingerprint(task) -> str:
    """What a pairs file's rewards were computed with: a built-in task's name, or each reward function's module,
    qualified name and a hash of its source (its repr when the source is not available) with the weights."""
    funcs = getattr(task, "funcs", None)
    if not funcs:
        return f"task {getattr(task, 'name', type(task).__name__)}" + (" (d1)" if getattr(task, "d1_compat", False)
                                                                       else "")
    parts = []
    for fn in funcs:
        try:
            src = inspect.getsource(fn)
        except (OSError, TypeError):
            src = repr(fn)
        name = f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__name__)}"
        parts.append(f"{name}@{hashlib.sha256(src.encode()).hexdigest()[:12]}")
    return f"functions {', '.join(parts)} weights {list(task.reward_weights())}"


def _rewards(reward, texts: Sequence[str], examples: Sequence[Mapping[str, Any]], comps: torch.Tensor,
             eos: int) -> list[float]:
    """Total rewards of G completions: a task's (``batch_rewards`` weighted and summed as in a rollout:
    ``stp.metrics.total_reward``), or a plain ``reward(text, example)`` callable's."""
    if hasattr(reward, "batch_rewards"):
        from stp.data_order import until_eos
        from stp.metrics import total_reward

        fn = torch.tensor(reward.batch_rewards(list(texts), list(examples), completion_ids=until_eos(comps, eos)),
                          dtype=torch.float32)
        return [float(x) for x in total_reward(fn, reward.reward_weights()).tolist()]
    return [float(reward(t, ex)) for t, ex in zip(texts, examples)]


@torch.no_grad()
def build_pairs(model, prompts: Sequence[str], examples: Sequence[Mapping[str, Any]],
                reward: Callable[[str, Mapping[str, Any]], float] | Any, *, num_generations: int, gen_length: int,
                block_length: int, steps: int, temperature: float, remasking: str = "low_confidence", seed: int,
                settings: Mapping[str, Any], backend: str | None = None,
                max_prompt_length: int | None = None) -> list[dict]:
    """One record per prompt (a pair, or a skip when the G rewards tie): G samples each, decoded in one batch.
    The noise of a prompt's samples is keyed by its prompt id, so a prompt yields the same pair in any batch.
    ``reward``: a task (its ``batch_rewards``, as the trainer's rollouts) or a ``reward(text, example)`` callable.
    Prompts longer than ``max_prompt_length`` tokens keep their last ones (as ``stp.data_order.encode_prompts``)."""
    from stp.sampler import generate

    if num_generations < 2:
        raise ValueError(f"build_pairs: num_generations={num_generations}; need >= 2 to compare samples")
    if model.tokenizer is None:
        raise ValueError("build_pairs: the model has no tokenizer; prompts cannot be rendered")
    g = num_generations
    seqs = [model.tokenizer(t, add_special_tokens=False)["input_ids"] for t in prompts]
    if max_prompt_length is not None:
        seqs = [x[-max_prompt_length:] for x in seqs]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), int(model.pad_token_id), dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, width - len(s):] = 1
    pids = [prompt_id(t) for t in prompts]
    sample_ids = torch.tensor([sample_id_of(p) * g + j for p in pids for j in range(g)], dtype=torch.long)
    device = model.device
    out = generate(model, ids.repeat_interleave(g, 0).to(device),
                   attention_mask=mask.repeat_interleave(g, 0).to(device),
                   gen_length=gen_length, block_length=block_length, steps=steps, temperature=temperature,
                   remasking=remasking, seed=derive_seed(seed, "pairs"), sample_ids=sample_ids.to(device),
                   backend=backend)
    comps, commits = out.completions.cpu(), out.commit_step.cpu()
    eos = int(model.eos_token_id)
    records = []
    for i, (text, pid, ex) in enumerate(zip(prompts, pids, examples)):
        rows = range(i * g, (i + 1) * g)
        texts = []
        for r in rows:
            toks = comps[r].tolist()
            toks = toks[:toks.index(eos)] if eos in toks else toks
            texts.append(model.tokenizer.decode(toks, skip_special_tokens=True))
        rewards = _rewards(reward, texts, [ex] * g, comps[i * g:(i + 1) * g], eos)
        base = {"format": PAIRS_FORMAT, "prompt_id": pid, "rewards": rewards, "settings": dict(settings)}
        best, worst = max(range(g), key=lambda j: (rewards[j], -j)), min(range(g), key=lambda j: (rewards[j], j))
        if rewards[best] == rewards[worst]:
            records.append({**base, "skipped": f"all {g} rewards equal ({rewards[best]:g})"})
            continue
        sides = {name: {"completion_ids": comps[i * g + j].tolist(), "commit_step": commits[i * g + j].tolist(),
                        "reward": rewards[j], "sample": j} for name, j in (("chosen", best), ("rejected", worst))}
        records.append({**base, "prompt": text, "prompt_ids": seqs[i], **sides})
    return records


# -------------------------------------------------------------------------------------------------------- reading


def _int_list(value: Any, n: int | None, low: int | None = None) -> bool:
    return (isinstance(value, list) and (n is None or len(value) == n) and all(
        isinstance(t, int) and not isinstance(t, bool) and (low is None or t >= low) for t in value))


def _check_record(rec: Any, where: str) -> None:
    if not isinstance(rec, dict):
        raise PairsFileError(f"{where}: a line must be a JSON object, got {type(rec).__name__}")
    if rec.get("format") != PAIRS_FORMAT:
        raise PairsFileError(f"{where}: field 'format' is {rec.get('format')!r}; this version reads {PAIRS_FORMAT}")
    if not isinstance(rec.get("prompt_id"), str) or len(rec["prompt_id"]) != 16:
        raise PairsFileError(f"{where}: field 'prompt_id' missing or not a 16-character string")
    settings = rec.get("settings")
    if not isinstance(settings, dict) or any(k not in settings for k in SETTING_KEYS):
        missing = [k for k in SETTING_KEYS if not isinstance(settings, dict) or k not in settings]
        raise PairsFileError(f"{where}: field 'settings' missing or without {missing}")
    if not isinstance(rec.get("rewards"), list) or not all(isinstance(r, (int, float)) and not isinstance(r, bool)
                                                            for r in rec["rewards"]):
        raise PairsFileError(f"{where}: field 'rewards' missing or not a list of numbers")
    if "skipped" in rec:
        if not isinstance(rec["skipped"], str):
            raise PairsFileError(f"{where}: field 'skipped' must be a string (why the prompt has no pair)")
        return
    if not isinstance(rec.get("prompt"), str):
        raise PairsFileError(f"{where}: field 'prompt' missing or not a string")
    if not _int_list(rec.get("prompt_ids"), None, 0) or not rec["prompt_ids"]:
        raise PairsFileError(f"{where}: field 'prompt_ids' missing or not a non-empty list of token ids")
    n = settings["gen_length"]
    for name in ("chosen", "rejected"):
        side = rec.get(name)
        if not isinstance(side, dict):
            raise PairsFileError(f"{where}: field {name!r} missing or not an object")
        if not _int_list(side.get("completion_ids"), n, 0):
            raise PairsFileError(f"{where}: field '{name}.completion_ids' must be {n} token ids (settings.gen_length)")
        if not _int_list(side.get("commit_step"), n, 0):
            raise PairsFileError(f"{where}: field '{name}.commit_step' must be {n} ints >= 0 (settings.gen_length)")
        if not isinstance(side.get("reward"), (int, float)) or isinstance(side.get("reward"), bool):
            raise PairsFileError(f"{where}: field '{name}.reward' missing or not a number")
    if not rec["chosen"]["reward"] > rec["rejected"]["reward"]:
        raise PairsFileError(f"{where}: field 'chosen.reward' ({rec['chosen']['reward']}) must exceed "
                             f"'rejected.reward' ({rec['rejected']['reward']})")


def read_pairs_file(path: str | os.PathLike) -> tuple[list[dict], int]:
    """(every record in file order, skips included; byte length of the complete lines). Any bad line is an error
    naming the file, the line number and the field; an incomplete last line (no newline: a run killed while
    writing it) is left out of both, so that appending after ``good_end`` redoes that prompt."""
    records, good_end, torn = read_keyed_jsonl(path, _check_record, PairsFileError)
    if torn is not None:
        print(f"stp.pairs: {torn}; its prompt is redone", file=sys.stderr)
    return records, good_end


def load_pairs(path: str | os.PathLike, settings: Mapping[str, Any] | None = None) -> list[dict]:
    """The pair records of a file (skips left out), in file order; with ``settings``, every line must have been
    written with those values (an error names the line and the setting)."""
    records, _ = read_pairs_file(path)
    if settings is not None:
        _check_settings(records, settings, Path(path))
    return [r for r in records if "skipped" not in r]


def _check_settings(records: Sequence[dict], settings: Mapping[str, Any], path: Path) -> None:
    for lineno, rec in enumerate(records, start=1):
        for key, ours in settings.items():
            theirs = rec["settings"].get(key)
            if theirs != ours:
                raise PairsFileError(f"{path}: record {lineno} (prompt {rec['prompt_id']}) field 'settings.{key}' is "
                                     f"{theirs!r}, this run has {ours!r}; one file holds one setting: use another "
                                     f"file or the same setting")


def write_records(path: Path, records: Sequence[dict]) -> None:
    """Append ``records`` as lines, flushed and fsync'ed (a kill loses at most this batch)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write("".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records))
        f.flush()
        os.fsync(f.fileno())


def _prepare_file(path: Path, settings: Mapping[str, Any]) -> set[str]:
    """The prompt ids already in ``path`` (checked against ``settings``); a torn last line is cut off first."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        return set()
    records, good_end = read_pairs_file(path)
    _check_settings(records, settings, path)
    if good_end != path.stat().st_size:
        with open(path, "r+b") as f:
            f.truncate(good_end)
            f.flush()
            os.fsync(f.fileno())
    if good_end and not path.read_bytes().endswith(b"\n"):
        with open(path, "ab") as f:
            f.write(b"\n")
    return {r["prompt_id"] for r in records}


@contextlib.contextmanager
def writer_lock(path: Path):
    """The exclusive lock of the writers of ``path`` (``fcntl.flock`` on PATH.lock; waits for another holder)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def build_into(path: Path, model, todo: Sequence[tuple[str, Mapping[str, Any]]], reward, *, settings: Mapping,
               batch_size: int, progress: bool = True, backend: str | None = None) -> None:
    """Build the records of the (prompt text, example) items ``todo`` not yet in ``path``, appending per batch,
    under the writers' lock (``writer_lock``). ``reward``: as ``build_pairs``."""
    with writer_lock(path):
        _build_into(path, model, todo, reward, settings=settings, batch_size=batch_size, progress=progress,
                    backend=backend)


def _build_into(path, model, todo, reward, *, settings, batch_size, progress, backend) -> None:
    from tqdm.auto import tqdm

    done = _prepare_file(path, settings)
    queued, items = set(done), []
    for text, ex in todo:
        pid = prompt_id(text)
        if pid not in queued:
            queued.add(pid)
            items.append((text, ex))
    s = settings
    with tqdm(total=len(items), unit="prompt", desc="pairs", file=sys.stderr, disable=not progress or not items) as bar:
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            recs = build_pairs(model, [t for t, _ in chunk], [e for _, e in chunk], reward,
                               num_generations=s["num_generations"], gen_length=s["gen_length"],
                               block_length=s["block_length"], steps=s["steps"], temperature=s["temperature"],
                               remasking=s["remasking"], seed=s["seed"], settings=s, backend=backend,
                               max_prompt_length=s["max_prompt_length"])
            write_records(path, recs)
            bar.update(len(chunk))


def ensure_pairs(model, cfg, prompts: Sequence[str], accelerator, *, task=None,
                 rows: Sequence[Mapping[str, Any]] | None = None) -> tuple[Path, list[dict]]:
    """The trainer's pairs (``dtrpo`` method): the file ``pairs_path(...)``, built first with the reference model
    (``model``: the base, before the adapter) for the run's prompts (the first ``dtrpo.pair_prompts`` distinct ones)
    on the main process, then loaded and checked against the run's settings everywhere.

    ``task`` and ``rows`` are the run's (the trainer's task, whose rewards score the samples, and the example of each
    prompt, in the order of ``prompts``); without them the configured built-in task and data."""
    from stp.data_order import load_data, task_for
    from stp.tasks import get_task

    if task is None or rows is None:
        task = task_for(cfg)
        all_rows, _ = load_data(cfg, get_task(cfg.run.task, d1_compat=cfg.run.d1_compat))
        by_text = {}
        for row in all_rows:
            by_text.setdefault(task.format_prompt(row, model.tokenizer), row)
        rows = [by_text[t] for t in prompts]
    if len(rows) != len(prompts):
        raise ValueError(f"ensure_pairs: {len(rows)} example rows for {len(prompts)} prompts; one per prompt")
    example = {}
    for text, row in zip(prompts, rows):
        example.setdefault(text, row)
    wanted = list(example)
    if cfg.dtrpo.pair_prompts is not None:
        wanted = wanted[:cfg.dtrpo.pair_prompts]
    settings = pair_settings(cfg, task)
    path = pairs_path(cfg, settings, [(t, example[t]) for t in wanted])
    if accelerator.is_main_process:
        done = {r["prompt_id"] for r in read_pairs_file(path)[0]} if path.exists() else set()
        missing = [t for t in wanted if prompt_id(t) not in done]
        if missing:
            print(f"stp.train: building dTRPO pairs for {len(missing)} prompts into {path}", file=sys.stderr)
            build_into(path, model, [(t, example[t]) for t in missing], task, settings=settings,
                       batch_size=cfg.dtrpo.build_batch_size, progress=True, backend=cfg.run.backend)
    accelerator.wait_for_everyone()
    mine = {prompt_id(t) for t in wanted}
    pairs = [r for r in load_pairs(path, settings) if r["prompt_id"] in mine]  # a shared file may hold more
    if not pairs:
        raise PairsFileError(f"{path}: no pairs (every prompt's {settings['num_generations']} rewards tied); raise "
                             f"grpo.num_generations or rollout.temperature, or use more prompts")
    return path, pairs


def pair_settings(cfg, task=None) -> dict[str, Any]:
    """The settings a trainer's pairs file must have been written with (``SETTING_KEYS``); ``task``: the run's
    (default: the configured built-in one)."""
    if task is None:
        from stp.data_order import task_for

        task = task_for(cfg)
    r = cfg.rollout
    return {"model": cfg.model.name_or_path, "task": cfg.run.task, "gen_length": r.gen_length,
            "block_length": r.block_length, "steps": r.steps, "temperature": r.temperature,
            "remasking": r.remasking, "num_generations": cfg.grpo.num_generations, "seed": cfg.run.seed,
            "max_prompt_length": r.max_prompt_length, "reward": reward_fingerprint(task)}


def pairs_path(cfg, settings: Mapping[str, Any], items: Sequence[tuple[str, Mapping[str, Any]]]) -> Path:
    """The run's pairs file: ``cfg.dtrpo.pairs_file(cfg)``; with ``dtrpo.pairs_path`` 'cache' its name also carries a
    hash of the pair settings (rewards included), the prompts and examples the pairs are built from,
    ``dtrpo.pair_prompts`` and ``grpo.max_steps``, so runs share a cached file only when it holds their pairs."""
    path = Path(cfg.dtrpo.pairs_file(cfg))
    if cfg.dtrpo.pairs_path != "cache":
        return path
    key = json.dumps([dict(settings), [[t, dict(ex)] for t, ex in items], cfg.dtrpo.pair_prompts, cfg.grpo.max_steps],
                     sort_keys=True, default=repr)
    return path.with_name(f"{path.stem}-{hashlib.sha256(key.encode()).hexdigest()[:12]}{path.suffix}")


# ------------------------------------------------------------------------------------------------------------ CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m stp.pairs", description="Sample G completions per prompt from the "
                                "reference model and write best-vs-worst preference pairs with their trajectories "
                                "(JSONL; resumable).")
    p.add_argument("--model", required=True, help="model name or directory (pretrained:TASK, tiny, a path, ...)")
    p.add_argument("--task", required=True, help="task whose prompts and reward are used")
    p.add_argument("--out", required=True, help="the JSONL file (appended to; existing prompts are skipped)")
    p.add_argument("--split", default="train", help="data split [train]")
    p.add_argument("--source", default=None, help="data source: file, hub or generated [the task's default]")
    p.add_argument("--data", default=None, help="a local data file (with --source file)")
    p.add_argument("--limit", default=None, help="use the first N prompts [all]")
    p.add_argument("--num-generations", default="8", help="G samples per prompt [8]")
    p.add_argument("--gen-length", default="32", help="completion length [32]")
    p.add_argument("--block-length", default="32", help="block length [32]")
    p.add_argument("--steps", default="16", help="denoising steps [16]")
    p.add_argument("--temperature", default="0.9", help="sampling temperature [0.9]")
    p.add_argument("--remasking", default="low_confidence", help="low_confidence or random (the position choice "
                   "does not depend on the model: the trajectory log-ratio is exactly the newly-unmasked tokens' "
                   "one) [low_confidence]")
    p.add_argument("--max-prompt-length", default=None, help="keep the last N prompt tokens, as training [all]")
    p.add_argument("--prompt-format", default="chat", help="chat or compact (sudoku, countdown) [chat]")
    p.add_argument("--seed", default="0", help="sampling seed [0]")
    p.add_argument("--batch-size", default="4", help="prompts per batch (G samples each) [4]")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N [cpu]")
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16 [auto]")
    return p


def _validate(args) -> dict[str, Any]:
    def fail(flag: str, value: Any, allowed: str):
        raise SystemExit(f"stp.pairs: error: {flag}={value!r}; allowed: {allowed}")

    def as_int(flag: str, value: Any, low: int = 1) -> int:
        try:
            v = int(value)
        except (TypeError, ValueError):
            fail(flag, value, f"an integer >= {low}")
        if v < low:
            fail(flag, value, f"an integer >= {low}")
        return v

    v: dict[str, Any] = {}
    v["num_generations"] = as_int("--num-generations", args.num_generations, 2)
    v["gen_length"] = as_int("--gen-length", args.gen_length)
    v["block_length"] = as_int("--block-length", args.block_length)
    v["steps"] = as_int("--steps", args.steps)
    v["seed"] = as_int("--seed", args.seed, 0)
    v["batch_size"] = as_int("--batch-size", args.batch_size)
    v["limit"] = None if args.limit is None else as_int("--limit", args.limit)
    v["max_prompt_length"] = (None if args.max_prompt_length is None
                              else as_int("--max-prompt-length", args.max_prompt_length))
    if v["gen_length"] % v["block_length"]:
        fail("--block-length", v["block_length"], f"a divisor of --gen-length {v['gen_length']}")
    if v["steps"] % (v["gen_length"] // v["block_length"]):
        fail("--steps", v["steps"], f"a multiple of the number of blocks ({v['gen_length'] // v['block_length']})")
    try:
        v["temperature"] = float(args.temperature)
    except ValueError:
        fail("--temperature", args.temperature, "a number >= 0")
    if not v["temperature"] >= 0:
        fail("--temperature", args.temperature, "a number >= 0")
    if args.remasking not in ("low_confidence", "random"):
        fail("--remasking", args.remasking, "low_confidence, random")
    if args.prompt_format not in ("chat", "compact"):
        fail("--prompt-format", args.prompt_format, "chat, compact")
    if args.dtype not in ("auto", "float32", "bfloat16", "float16"):
        fail("--dtype", args.dtype, "auto, float32, bfloat16, float16")
    if args.device != "cpu" and not args.device.startswith("cuda"):
        fail("--device", args.device, "cpu, cuda, cuda:N")
    from stp.tasks import TASKS

    if args.task not in TASKS:
        fail("--task", args.task, ", ".join(TASKS))
    out = Path(args.out)
    if out.exists() and not out.is_file():
        fail("--out", args.out, "a file path (this is a directory)")
    return v


def main(argv: Sequence[str] | None = None) -> int:
    from stp.pretrain import load_model
    from stp.tasks.prompts import task_with_prompt

    args = _parser().parse_args(argv)
    v = _validate(args)
    out = Path(args.out)
    task = task_with_prompt(args.task, args.prompt_format)
    settings = {"model": args.model, "task": args.task, "gen_length": v["gen_length"],
                "block_length": v["block_length"], "steps": v["steps"], "temperature": v["temperature"],
                "remasking": args.remasking, "num_generations": v["num_generations"], "seed": v["seed"],
                "max_prompt_length": v["max_prompt_length"], "reward": reward_fingerprint(task)}
    try:
        if out.exists():  # a bad or foreign file fails before the model loads
            _check_settings(read_pairs_file(out)[0], settings, out)
        examples = task.load(args.split, args.data, source=args.source, n=v["limit"])
        dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
        model = load_model(args.model, dtype=dtype, device=torch.device(args.device))
        if model.tokenizer is None:
            raise SystemExit(f"stp.pairs: error: model {args.model!r} has no tokenizer; prompts cannot be rendered")
        todo = [(task.format_prompt(ex, model.tokenizer), ex) for ex in examples]
        build_into(out, model, todo, task, settings=settings, batch_size=v["batch_size"])
        records, _ = read_pairs_file(out)
    except PairsFileError as e:
        raise SystemExit(f"stp.pairs: error: {e}") from None
    n_pairs = sum("skipped" not in r for r in records)
    print(f"stp.pairs: {out}: {n_pairs} pairs, {len(records) - n_pairs} prompts skipped (tied rewards)",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
