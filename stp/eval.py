"""d1 protocol evaluation (docs/method.md 5): ``python -m stp.eval --model PATH --task NAME --gen-length 256``.

Protocol (defaults, as d1): greedy decoding (temperature 0), block length 32, steps = gen_length / 2, the task's test
split; gen lengths 128 / 256 / 512 are the published ones (any positive multiple of the block length is accepted).
Prompts are the task's chat prompts (``Task.format_prompt`` with the model's tokenizer), tokenized without extra
special tokens (the chat template already has them), left-padded into batches with an attention mask.

Long prompts: the default is no limit (``max_prompt_length=0``), as d1's evaluation script does; the 200-token
limit (docs/method.md 4) is a rollout setting. With a limit, a longer prompt is TRUNCATED FROM THE LEFT, keeping
its last tokens (the question's end and the assistant turn opener), as the d1 / TRL trainers do; a warning gives the
count before generation starts and every row records ``prompt_truncated``. It is never skipped: skipping would change
the denominator of the accuracy.

Completions are decoded up to the first EOS (exclusive), skipping special tokens, and scored with the task's
``extract_answer``, ``metric`` and ``rewards``. Each sample's noise counter is keyed by its example index
(``sample_ids``), so results do not depend on the batch size or on which examples share a batch.

Output, one JSON object per line (``--output``, default ``eval_outputs/<task>_<gen_length>_<model>[+<adapter>].jsonl``,
see ``default_output``: another model or adapter gets another file)::

    index             int    position of the example in the loaded split (after --limit: the first N)
    id                any    the example's "id" / "unique_id" / "idx" field if it has one, else the index
    settings_hash     str    16 hex digits: SHA-256 of the canonical JSON of ``settings``
    settings          dict   what determines the results (model, dtype, task, d1_compat, split, data, source,
                             data_seed, gen_length, block_length, steps, temperature, remasking,
                             max_prompt_length, seed; with a Dream --alg also dream: alg, top_k, top_p,
                             eps); not the batch size, device or --limit
    example_sha       str    16 hex digits of the example's canonical JSON (detects a changed data file)
    example           dict   the example itself (question / nums, target / puzzle, solution ...)
    prompt            str    the rendered chat prompt (before any truncation)
    prompt_tokens     int    its length in tokens (before truncation)
    prompt_truncated  bool   whether it was cut to max_prompt_length
    completion        str    the decoded completion up to the first EOS
    completion_tokens int    tokens before the first EOS
    hit_eos           bool   whether an EOS was generated within gen_length
    answer            str?   ``task.extract_answer(completion)``
    metric            float  ``task.metric(completion, example)`` (accuracy; Sudoku: fraction of cells right)
    rewards           dict   ``task.rewards(completion, example)``: each reward function by name
    reward            float  their sum
    nfe               int    forward passes used for this sample

Resume: rows are keyed by (settings_hash, index). A rerun with the same output file reads it first, skips every
example already written and appends the rest (rows are flushed and fsynced after every batch, so a killed run loses
at most the batch in flight). A file written with different settings is refused, naming each differing setting (use
another ``--output`` or ``--overwrite``); so is a row whose example differs from the one now at that index. A corrupt
LAST line (a write cut short by a kill) is reported with its line number, dropped from the file and regenerated; a
corrupt line anywhere else is an error, never skipped silently.

At the end the accuracy (mean metric over the examples of this run, resumed rows included) is printed with the model,
the adapter and the answer rate (the fraction of completions whose answer the task could read at all: an accuracy of
0.0 with an answer rate of 0.0 means no answer was readable, not that every answer was wrong), and a summary JSON
(settings, accuracy, answer rate, counts, mean rewards, seconds) is written next to the output as
``<stem>.summary.json``.
``evaluate`` is the library entry (the trainer uses it for held-out reward, with or without an output file).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from stp import models, sampler
from stp.decoding import DREAM_ALGORITHMS, DreamDecoding
from stp.pretrain import load_model
from stp.tasks import TASKS, DataError, Task

__all__ = ["EvalError", "EvalWarning", "ResumeError", "evaluate", "eval_settings", "settings_hash",
           "read_results", "summary_path", "default_output", "main", "D1_GEN_LENGTHS", "DEFAULT_BLOCK_LENGTH",
           "DEFAULT_MAX_PROMPT_LENGTH"]

FORMAT_VERSION = 1
D1_GEN_LENGTHS = (128, 256, 512)
DEFAULT_BLOCK_LENGTH = 32
DEFAULT_MAX_PROMPT_LENGTH = 0  # d1's evaluation does not truncate prompts
DTYPES = {"auto": None, "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_ID_FIELDS = ("id", "unique_id", "idx")


class EvalError(ValueError):
    """A bad setting or input, with the flag / value / allowed values named."""


class ResumeError(EvalError):
    """An existing output file that cannot be resumed (other settings, other data, a corrupt line)."""


class EvalWarning(UserWarning):
    """Something the user should know that does not stop the run (truncated prompts, a dropped corrupt line)."""


# ------------------------------------------------------------------------------------------------------ settings


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str, ensure_ascii=False)


def _sha(obj: Any) -> str:
    return hashlib.sha256(_canonical(obj).encode()).hexdigest()[:16]


def settings_hash(settings: Mapping[str, Any]) -> str:
    """16 hex digits identifying ``settings`` (SHA-256 of its canonical JSON)."""
    return _sha(dict(settings))


def eval_settings(task: Task, *, gen_length: int, block_length: int, steps: int, temperature: float,
                  max_prompt_length: int, seed: int, remasking: str = "low_confidence",
                  identity: Mapping[str, Any] | None = None, dream: DreamDecoding | None = None) -> dict[str, Any]:
    """Everything that determines the results of a run (written into every row and hashed for resume).

    ``identity`` adds who/what is evaluated (model, dtype, split, data, source, data_seed...); the decoding fields
    always come from the arguments."""
    out: dict[str, Any] = dict(identity or {})
    out.update(format=FORMAT_VERSION, task=task.name, d1_compat=bool(task.d1_compat), gen_length=int(gen_length),
               block_length=int(block_length), steps=int(steps), temperature=float(temperature), remasking=remasking,
               max_prompt_length=int(max_prompt_length), seed=int(seed))
    if dream is not None:  # absent for LLaDA's decoding: results files made before the option keep their hash
        out["dream"] = dataclasses.asdict(dream)
    return out


def check_decoding(*, gen_length: Any, block_length: Any, steps: Any, temperature: Any = 0.0,
                   max_prompt_length: Any = 0, batch_size: Any = 1, flags: bool = False) -> None:
    """Validate the decoding settings; the message names the flag (``flags=True``) or argument, value and allowed."""
    def name(arg: str) -> str:
        return "--" + arg.replace("_", "-") if flags else arg

    for arg, value in (("gen_length", gen_length), ("block_length", block_length), ("steps", steps),
                       ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise EvalError(f"{name(arg)}={value!r}: must be a positive integer")
    if gen_length % block_length:
        raise EvalError(f"{name('gen_length')}={gen_length} is not a multiple of {name('block_length')}="
                        f"{block_length}; allowed: a positive multiple of the block length (d1 protocol: "
                        f"{', '.join(map(str, D1_GEN_LENGTHS))} with block length {DEFAULT_BLOCK_LENGTH})")
    blocks = gen_length // block_length
    if steps % blocks:
        raise EvalError(f"{name('steps')}={steps} is not a multiple of the number of blocks ({name('gen_length')} / "
                        f"{name('block_length')} = {blocks}); allowed: a positive multiple of {blocks} (d1: "
                        f"gen_length / 2 = {gen_length // 2})")
    if (isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not math.isfinite(temperature)
            or temperature < 0):
        raise EvalError(f"{name('temperature')}={temperature!r}: must be a finite number >= 0 (d1 protocol: 0, "
                        f"greedy)")
    if isinstance(max_prompt_length, bool) or not isinstance(max_prompt_length, int) or max_prompt_length < 0:
        raise EvalError(f"{name('max_prompt_length')}={max_prompt_length!r}: must be an integer >= 0 (0 = no limit)")


# ------------------------------------------------------------------------------------------------- output file


def summary_path(output: str | os.PathLike) -> Path:
    """``results.jsonl`` -> ``results.summary.json`` (same folder)."""
    output = Path(output)
    stem = output.stem if output.suffix == ".jsonl" else output.name
    return output.with_name(stem + ".summary.json")


def _slug(name_or_path: str) -> str:
    """A file-name-safe short name of a model or adapter: a local directory by its last path components and a hash
    of its resolved path (two runs' ``adapter`` directories, or two ``checkpoint`` folders, must not share a file),
    anything else (``tiny``, ``pretrained:sudoku``, a Hub id) by its name."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        resolved = path.resolve()
        parts = [p for p in resolved.parts[-2:] if p not in ("/", "")]
        label = "-".join(parts) if resolved.name in ("adapter", "final", "model") else resolved.name
        name = f"{label}-{hashlib.sha256(str(resolved).encode()).hexdigest()[:6]}"
    else:
        name = name_or_path.replace("/", "--")
    return "".join(c if c.isalnum() or c in "-._" else "-" for c in name).strip("-.") or "model"


def default_output(task: str, gen_length: int, model: str, adapter: str | None = None) -> Path:
    """``eval_outputs/<task>_<gen_length>_<model>[+<adapter>].jsonl``: one file per evaluated model and adapter, so
    evaluating another model (or the same base with another adapter) never meets the first one's results file.

    >>> str(default_output("sudoku", 32, "pretrained:sudoku"))
    'eval_outputs/sudoku_32_pretrained-sudoku.jsonl'
    >>> str(default_output("gsm8k", 256, "GSAI-ML/LLaDA-8B-Instruct"))
    'eval_outputs/gsm8k_256_GSAI-ML--LLaDA-8B-Instruct.jsonl'
    """
    name = _slug(model) + (f"+{_slug(adapter)}" if adapter is not None else "")
    return Path("eval_outputs") / f"{task}_{gen_length}_{name}.jsonl"


def _settings_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    """'name': file has X, this run Y; ... for every setting that differs."""
    def show(d: Mapping[str, Any], k: str) -> str:
        return repr(d[k]) if k in d else "(absent)"

    keys = sorted(set(old) | set(new))
    diffs = [f"{k!r}: file has {show(old, k)}, this run {show(new, k)}"
             for k in keys if k not in old or k not in new or old[k] != new[k]]
    return "; ".join(diffs) or "(same values, different hash)"


def read_results(path: str | os.PathLike, settings: Mapping[str, Any], *, examples: Sequence[Mapping] | None = None,
                 repair: bool = True) -> dict[int, dict]:
    """The rows already in ``path`` (index -> row), checked against this run; {} when the file does not exist.

    Raises ResumeError for rows made with other settings (naming the differing settings), rows whose example differs
    from ``examples[index]``, duplicate indices, and corrupt lines other than the last. A corrupt last line (an
    interrupted write) is reported with a warning naming its line number and, with ``repair``, cut from the file
    (as is a missing final newline added), so that appended rows stay valid JSONL.
    """
    path = Path(path)
    if not path.exists():
        return {}
    if not path.is_file():
        raise ResumeError(f"--output {path}: exists and is not a file")
    want = settings_hash(settings)
    data = path.read_bytes()
    rows: dict[int, dict] = {}
    lines: dict[int, int] = {}
    pos, lineno, good_end = 0, 0, 0
    while pos < len(data):
        nl = data.find(b"\n", pos)
        end = len(data) if nl < 0 else nl + 1
        raw, lineno, last = data[pos:end], lineno + 1, end >= len(data)
        try:
            row = json.loads(raw)
            if not isinstance(row, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            if last:
                warnings.warn(f"{path}:{lineno}: corrupt last line ({len(raw)} bytes, {e}), left by an interrupted "
                              f"run; {'dropped from the file' if repair else 'ignored'}, its example will be "
                              f"generated again", EvalWarning, stacklevel=2)
                break
            raise ResumeError(f"{path}:{lineno}: not a valid JSON row ({e}); it is not the last line, so not an "
                              f"interrupted write: fix or delete the file, or pass another --output") from None
        pos = end
        good_end = end
        index, got = row.get("index"), row.get("settings_hash")
        if isinstance(index, bool) or not isinstance(index, int) or not isinstance(got, str):
            raise ResumeError(f"{path}:{lineno}: not a stp.eval result row (needs an integer 'index' and a "
                              f"'settings_hash'); pass another --output")
        if got != want:
            old = row.get("settings")
            detail = _settings_diff(old, settings) if isinstance(old, dict) else f"hash {got} vs {want}"
            raise ResumeError(f"{path}:{lineno}: written with different settings, refusing to mix results: {detail}. "
                              f"Use another --output, or --overwrite to start this file again")
        if index in rows:
            raise ResumeError(f"{path}:{lineno}: example index {index} is already on line {lines[index]}; the file "
                              f"was written by two runs at once? Fix or delete it")
        if examples is not None and 0 <= index < len(examples) and row.get("example_sha") != _sha(examples[index]):
            raise ResumeError(f"{path}:{lineno}: the row for example index {index} was made from a different example "
                              f"than the one now at that index (the data changed); use another --output or "
                              f"--overwrite")
        rows[index] = row
        lines[index] = lineno
    if repair and (good_end < len(data) or (good_end and not data[:good_end].endswith(b"\n"))):
        with open(path, "r+b") as f:
            f.truncate(good_end)
            if good_end and not data[:good_end].endswith(b"\n"):
                f.seek(good_end)
                f.write(b"\n")
            f.flush()
            os.fsync(f.fileno())
    return rows


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------------- evaluation


def _example_id(example: Mapping[str, Any], index: int) -> Any:
    for field in _ID_FIELDS:
        if example.get(field) is not None:
            return example[field]
    return index


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def evaluate(
    model,
    task: Task,
    examples: Sequence[Mapping[str, Any]],
    *,
    gen_length: int,
    block_length: int = DEFAULT_BLOCK_LENGTH,
    steps: int | None = None,
    batch_size: int = 8,
    output: str | os.PathLike | None = None,
    temperature: float = 0.0,
    max_prompt_length: int = DEFAULT_MAX_PROMPT_LENGTH,
    seed: int = 0,
    remasking: str = "low_confidence",
    identity: Mapping[str, Any] | None = None,
    progress: bool = True,
    backend: str | None = None,
    dream: DreamDecoding | None = None,
) -> dict[str, Any]:
    """Generate and score completions for ``examples``; resumable when ``output`` is given.

    Args:
        model: a ``stp.models.DiffusionLM`` with a tokenizer (put in eval mode during the call, then restored).
            May be None when ``output`` already holds every example (nothing to generate).
        task: the task (its ``d1_compat`` is part of the settings).
        examples: the examples; row ``index`` is the position in this sequence.
        gen_length, block_length, steps: decoding (steps default gen_length // 2, as d1).
        batch_size: prompts per ``generate`` call (not part of the settings: results do not depend on it).
        output: JSONL file to write (and resume from); None keeps results in memory only.
        temperature: 0 = greedy (d1 protocol). max_prompt_length: longer prompts are cut from the left; 0 = off.
        seed: the sampler's noise seed (only matters for temperature > 0 or random remasking).
        identity: extra settings naming what is evaluated (the CLI passes model, dtype, split, data, source,
            data_seed); default ``{"model": model.name, "dtype": <model dtype>}``.
        progress: show a tqdm bar. backend: ``stp_kernels`` backend for the sampler.
        dream: decode as Dream's ``diffusion_generate`` (``stp.decoding.DreamDecoding``) instead of LLaDA's
            low-confidence remasking; part of the settings.

    Returns:
        dict with ``accuracy`` (mean metric), ``n``, ``n_generated``, ``n_resumed``, ``n_prompt_truncated``,
        ``n_answered``, ``answer_rate`` (the fraction whose ``answer`` the task could extract),
        ``accuracy_of_answered`` (mean metric of those; None when there are none),
        ``mean_reward``, ``mean_rewards`` (per reward function), ``mean_nfe``, ``mean_completion_tokens``,
        ``eos_rate``, ``seconds``, ``settings``, ``settings_hash``, ``output``, ``summary`` (path or None) and
        ``records`` (the rows, by index).
    """
    start = time.time()
    steps = gen_length // 2 if steps is None and isinstance(gen_length, int) else steps
    check_decoding(gen_length=gen_length, block_length=block_length, steps=steps, temperature=temperature,
                   max_prompt_length=max_prompt_length, batch_size=batch_size)
    if dream is not None:
        try:
            dream.check("stp.eval.evaluate")
        except ValueError as e:
            raise EvalError(str(e)) from None
    if model is not None:
        ident = {"model": getattr(model, "name", type(model).__name__),
                 "dtype": str(model.dtype).removeprefix("torch.")}
    else:
        ident = {}
    ident.update(identity or {})
    settings = eval_settings(task, gen_length=gen_length, block_length=block_length, steps=steps,
                             temperature=temperature, max_prompt_length=max_prompt_length, seed=seed,
                             remasking=remasking, identity=ident, dream=dream)
    shash = settings_hash(settings)
    examples = list(examples)
    output = Path(output) if output is not None else None

    done: dict[int, dict] = {}
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        done = read_results(output, settings, examples=examples)
    records: dict[int, dict] = {i: row for i, row in done.items() if 0 <= i < len(examples)}
    n_resumed = len(records)
    pending = [i for i in range(len(examples)) if i not in records]

    if pending:
        if model is None:
            raise EvalError(f"no model given, and {len(pending)} of {len(examples)} examples still need generating")
        tokenizer = getattr(model, "tokenizer", None)
        if tokenizer is None:
            raise EvalError(f"model {settings.get('model')!r} has no tokenizer; stp.eval needs one to format and "
                            f"decode prompts (save the model directory with its tokenizer files)")
        if not getattr(tokenizer, "chat_template", None):
            raise EvalError(f"model {settings.get('model')!r}: its tokenizer has no chat template; the task prompts "
                            f"are chat prompts (set tokenizer.chat_template or add it to tokenizer_config.json)")
        n_generated = _generate_pending(model, task, examples, pending, records, settings, shash, output,
                                        gen_length=gen_length, block_length=block_length, steps=steps,
                                        batch_size=batch_size, temperature=temperature,
                                        max_prompt_length=max_prompt_length, seed=seed, remasking=remasking,
                                        progress=progress, n_resumed=n_resumed, backend=backend, dream=dream)
    else:
        n_generated = 0

    rows = [records[i] for i in range(len(examples))]
    reward_names = list(rows[0]["rewards"]) if rows else []
    answered = [r for r in rows if r["answer"] is not None]
    result: dict[str, Any] = {
        "task": task.name,
        "accuracy": _mean([r["metric"] for r in rows]),
        "n": len(rows),
        "n_generated": n_generated,
        "n_resumed": n_resumed,
        "n_prompt_truncated": sum(bool(r.get("prompt_truncated")) for r in rows),
        # What a low accuracy is made of: how often the task could read an answer at all, and how good those were.
        "n_answered": len(answered),
        "answer_rate": _mean([1.0 if r["answer"] is not None else 0.0 for r in rows]),
        "accuracy_of_answered": _mean([r["metric"] for r in answered]) if answered else None,
        "mean_reward": _mean([r["reward"] for r in rows]),
        "mean_rewards": {k: _mean([r["rewards"][k] for r in rows]) for k in reward_names},
        "mean_nfe": _mean([r["nfe"] for r in rows]),
        "mean_completion_tokens": _mean([r["completion_tokens"] for r in rows]),
        "eos_rate": _mean([float(r["hit_eos"]) for r in rows]),
        "seconds": time.time() - start,
        "batch_size": batch_size,
        "settings": settings,
        "settings_hash": shash,
        "output": str(output) if output is not None else None,
        "summary": None,
    }
    if output is not None:
        spath = summary_path(output)
        result["summary"] = str(spath)
        _write_json_atomic(spath, {**result, "stp_eval_format": FORMAT_VERSION,
                                   "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    result["records"] = rows
    return result


def _encode(tokenizer, task: Task, example: Mapping[str, Any], max_prompt_length: int):
    prompt = task.format_prompt(example, tokenizer)
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if not ids:
        raise EvalError(f"the prompt of example {example!r:.80} tokenized to nothing")
    truncated = 0 < max_prompt_length < len(ids)
    return prompt, len(ids), (ids[-max_prompt_length:] if truncated else ids), truncated


def _generate_pending(model, task, examples, pending, records, settings, shash, output, *, gen_length, block_length,
                      steps, batch_size, temperature, max_prompt_length, seed, remasking, progress, n_resumed,
                      backend, dream=None) -> int:
    from tqdm.auto import tqdm

    tokenizer = model.tokenizer
    eos, pad = int(model.eos_token_id), int(model.pad_token_id)
    encoded = {i: _encode(tokenizer, task, examples[i], max_prompt_length) for i in pending}
    n_trunc = sum(e[3] for e in encoded.values())
    if n_trunc:
        longest = max(e[1] for e in encoded.values())
        warnings.warn(f"{n_trunc} of {len(pending)} prompts are longer than max_prompt_length={max_prompt_length} "
                      f"tokens (longest {longest}) and are truncated from the left (their rows say "
                      f"prompt_truncated; 0 disables the limit)", EvalWarning, stacklevel=3)
    was_training = model.training
    model.eval()
    out_file = open(output, "a", encoding="utf-8") if output is not None else None
    bar = tqdm(total=len(examples), initial=n_resumed, desc=f"eval {task.name}", unit="ex", disable=not progress,
               dynamic_ncols=True)
    metric_sum = sum(records[i]["metric"] for i in records if 0 <= i < len(examples))
    n_scored = len(records)
    try:
        for b in range(0, len(pending), batch_size):
            batch = pending[b:b + batch_size]
            width = max(len(encoded[i][2]) for i in batch)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for r, i in enumerate(batch):
                row_ids = encoded[i][2]
                ids[r, width - len(row_ids):] = torch.tensor(row_ids, dtype=torch.long)
                mask[r, width - len(row_ids):] = 1
            device = model.device
            out = sampler.generate(model, ids.to(device), attention_mask=mask.to(device), gen_length=gen_length,
                                   block_length=block_length, steps=steps, temperature=temperature,
                                   remasking=remasking, seed=seed, sample_ids=torch.tensor(batch, device=device),
                                   backend=backend, dream=dream)
            completions = out.completions.tolist()
            nfe = out.nfe.tolist()
            lines = []
            for r, i in enumerate(batch):
                toks = completions[r]
                hit_eos = eos in toks
                toks = toks[:toks.index(eos)] if hit_eos else toks
                text = tokenizer.decode(toks, skip_special_tokens=True)
                example = examples[i]
                prompt, prompt_tokens, _, truncated = encoded[i]
                rewards = task.rewards(text, example)
                row = {
                    "index": i,
                    "id": _example_id(example, i),
                    "settings_hash": shash,
                    "settings": settings,
                    "example_sha": _sha(example),
                    "example": dict(example),
                    "prompt": prompt,
                    "prompt_tokens": prompt_tokens,
                    "prompt_truncated": truncated,
                    "completion": text,
                    "completion_tokens": len(toks),
                    "hit_eos": hit_eos,
                    "answer": task.extract_answer(text),
                    "metric": float(task.metric(text, example)),
                    "rewards": rewards,
                    "reward": sum(rewards.values()),
                    "nfe": int(nfe[r]),
                }
                records[i] = row
                metric_sum += row["metric"]
                lines.append(json.dumps(row, default=str, ensure_ascii=False) + "\n")
            if out_file is not None:
                out_file.write("".join(lines))
                out_file.flush()
                os.fsync(out_file.fileno())
            n_scored += len(batch)
            bar.update(len(batch))
            bar.set_postfix(acc=f"{metric_sum / n_scored:.3f}")
    finally:
        bar.close()
        if out_file is not None:
            out_file.close()
        model.train(was_training)
    return len(pending)


# ---------------------------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m stp.eval",
        description="Evaluate a masked diffusion LM on a task under the d1 protocol (greedy, block 32, "
                    "steps = gen_length / 2); writes per-example JSONL (resumable) and a summary JSON.")
    p.add_argument("--model", required=True, help="'tiny', 'pretrained:TASK', a local model directory, or a Hub id")
    p.add_argument("--adapter", default=None, metavar="DIR",
                   help="a LoRA adapter directory to merge into --model first (the 'adapter' directory of a "
                        "`python -m stp.train` run)")
    p.add_argument("--task", required=True, help=f"one of: {', '.join(TASKS)}")
    p.add_argument("--prompt-format", default=None, choices=("chat", "compact"),
                   help="chat: the task's chat prompt (d1's); compact: stp.pretrain's one-line prompt (sudoku, "
                        "countdown), which the embedded tiny model reads [compact for the tiny model, else chat]")
    p.add_argument("--gen-length", type=int, default=256,
                   help="completion length; d1: 128, 256, 512 (any multiple of --block-length) [256]")
    p.add_argument("--block-length", type=int, default=DEFAULT_BLOCK_LENGTH, help="block length [32]")
    p.add_argument("--steps", type=int, default=None, help="denoising steps [gen_length / 2]")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature [0 = greedy]")
    p.add_argument("--alg", default="llada", choices=("llada", *DREAM_ALGORITHMS),
                   help="decoding: llada (LLaDA's low-confidence remasking, d1 protocol) or one of Dream's "
                        "diffusion_generate algorithms (Dream-Instruct recommends entropy; Dream's own setting is "
                        "one block: --block-length equal to --gen-length) [llada]")
    p.add_argument("--top-k", type=int, default=None, metavar="K",
                   help="Dream algorithms: confidence and sampling over the K largest logits [all]")
    p.add_argument("--top-p", type=float, default=None, metavar="P",
                   help="Dream algorithms: nucleus filter in (0, 1] before --top-k [off]")
    p.add_argument("--dream-eps", type=float, default=None, metavar="EPS",
                   help="Dream algorithms: final timestep of the schedule linspace(1, EPS, steps + 1) [0.001]")
    p.add_argument("--split", default="test", help="split to evaluate [test]")
    p.add_argument("--data", default=None, metavar="PATH",
                   help="local .jsonl/.json/.csv/.parquet file (the whole file is the split)")
    p.add_argument("--source", default=None, choices=("file", "hub", "generated"),
                   help="data source [file with --data, else the task's default]")
    p.add_argument("--data-seed", type=int, default=0, help="seed of procedural generators (--source generated) [0]")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="evaluate the first N examples only")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per generate call [8]")
    p.add_argument("--max-prompt-length", type=int, default=DEFAULT_MAX_PROMPT_LENGTH,
                   help="longer prompts are cut from the left to this many tokens; 0 = no limit (default, as d1)")
    p.add_argument("--output", default=None, metavar="PATH.jsonl",
                   help="results file [eval_outputs/<task>_<gen_length>_<model>[+<adapter>].jsonl]; resumed if it "
                        "exists")
    p.add_argument("--overwrite", action="store_true", help="delete an existing --output first instead of resuming")
    p.add_argument("--device", default=None, help="torch device [cuda if available, else cpu]")
    p.add_argument("--dtype", default="auto", help=f"one of: {', '.join(DTYPES)} [auto = the checkpoint's]")
    p.add_argument("--seed", type=int, default=0, help="sampler noise seed (matters only for temperature > 0) [0]")
    p.add_argument("--d1-compat", action="store_true", help="score with d1's published reward code, bugs included")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _is_tiny(model: str) -> bool:
    """Whether --model names the embedded tiny model ('tiny', 'pretrained:TASK' or a directory saved from it)."""
    if model == "tiny" or model.startswith("pretrained:"):
        return True
    config = Path(model).expanduser() / "config.json"
    try:
        return config.is_file() and json.loads(config.read_text()).get("stp_family") == "tiny"
    except (OSError, ValueError):
        return False


def _validate_args(args: argparse.Namespace) -> tuple[Task, torch.device]:
    """Every check that can run before loading data or the model; EvalError naming the flag, value and allowed."""
    if args.task not in TASKS:
        raise EvalError(f"--task {args.task!r}: unknown task; allowed: {', '.join(TASKS)}")
    from stp.tasks.prompts import PRETRAIN_TASKS, task_with_prompt

    if args.prompt_format is None:
        args.prompt_format = "compact" if _is_tiny(args.model) and args.task in PRETRAIN_TASKS else "chat"
    if args.prompt_format == "compact" and args.task not in PRETRAIN_TASKS:
        raise EvalError(f"--prompt-format compact with --task {args.task!r}: the compact prompt exists for "
                        f"{', '.join(PRETRAIN_TASKS)}; allowed for {args.task}: chat")
    task = task_with_prompt(args.task, args.prompt_format, d1_compat=args.d1_compat)
    if args.steps is None:
        args.steps = args.gen_length // 2 if args.gen_length > 0 else args.gen_length
    check_decoding(gen_length=args.gen_length, block_length=args.block_length, steps=args.steps,
                   temperature=args.temperature, max_prompt_length=args.max_prompt_length,
                   batch_size=args.batch_size, flags=True)
    args.dream = _dream_from_flags(args)
    if args.split not in task.splits:
        raise EvalError(f"--split {args.split!r}: unknown split for {task.name}; allowed: {', '.join(task.splits)}")
    if args.limit is not None and args.limit <= 0:
        raise EvalError(f"--limit {args.limit}: must be a positive integer (omit it for the whole split)")
    if args.data is not None:
        if args.source not in (None, "file"):
            raise EvalError(f"--source {args.source!r} with --data: a data file is source 'file'")
        if not Path(args.data).is_file():
            raise EvalError(f"--data {args.data!r}: no such file")
    elif args.source == "file":
        raise EvalError("--source 'file' needs --data PATH")
    if args.dtype not in DTYPES:
        raise EvalError(f"--dtype {args.dtype!r}: allowed: {', '.join(DTYPES)}")
    if args.adapter is not None and not (Path(args.adapter) / "adapter_config.json").is_file():
        raise EvalError(f"--adapter {args.adapter!r}: no adapter_config.json in that directory (expected the "
                        f"'adapter' directory of a `python -m stp.train` run)")
    try:
        device = torch.device(args.device if args.device is not None else
                              ("cuda" if torch.cuda.is_available() else "cpu"))
    except (RuntimeError, ValueError) as e:
        raise EvalError(f"--device {args.device!r}: not a torch device ({e}); allowed e.g. cpu, cuda, cuda:1") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EvalError(f"--device {args.device!r}: CUDA is not available here; allowed: cpu")
    if args.output is None:
        args.output = str(default_output(task.name, args.gen_length, args.model, args.adapter))
    out = Path(args.output)
    if out.exists() and not out.is_file():
        raise EvalError(f"--output {args.output!r}: exists and is not a file")
    return task, device


def _dream_from_flags(args: argparse.Namespace) -> DreamDecoding | None:
    """--alg / --top-k / --top-p / --dream-eps -> DreamDecoding (None for --alg llada); EvalError naming the flag."""
    given = {flag: value for flag, value in (("--top-k", args.top_k), ("--top-p", args.top_p),
                                             ("--dream-eps", args.dream_eps)) if value is not None}
    if args.alg == "llada":
        if given:
            flag, value = next(iter(given.items()))
            raise EvalError(f"{flag} {value!r}: applies to Dream's decoding only; allowed with --alg llada: no "
                            f"{', '.join(given)} (or choose --alg {' / '.join(DREAM_ALGORITHMS)})")
        return None
    if args.top_k is not None and args.top_k < 1:
        raise EvalError(f"--top-k {args.top_k}: must be an integer >= 1 (omit it for all tokens)")
    if args.top_p is not None and not (math.isfinite(args.top_p) and 0 < args.top_p <= 1):
        raise EvalError(f"--top-p {args.top_p}: must be a number in (0, 1] (omit it for no nucleus filter)")
    if args.dream_eps is not None and not (math.isfinite(args.dream_eps) and 0 < args.dream_eps < 1):
        raise EvalError(f"--dream-eps {args.dream_eps}: must be a number in (0, 1) (Dream's default: 0.001)")
    eps = DreamDecoding.eps if args.dream_eps is None else args.dream_eps
    return DreamDecoding(alg=args.alg, top_k=args.top_k, top_p=args.top_p, eps=eps)


def _adapter_identity(adapter: str | None) -> str | None:
    """The adapter's part of the settings: its path and the SHA-256 of its weights (another adapter at the same path
    is then another setting, and a results file made with the old one is refused)."""
    if adapter is None:
        return None
    weights = Path(adapter) / "adapter_model.safetensors"
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()[:16] if weights.is_file() else "missing"
    return f"{adapter}@{digest}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        task, device = _validate_args(args)
        source = args.source or ("file" if args.data is not None else task.default_source)
        try:
            examples = task.load(args.split, args.data, source=source, n=args.limit, seed=args.data_seed)
        except (DataError, RuntimeError, ValueError, OSError) as e:
            raise EvalError(f"loading {task.name} split {args.split!r} (source {source!r}"
                            f"{f', --data {args.data}' if args.data else ''}): {e}") from e
        if not examples:
            raise EvalError(f"no examples in {task.name} split {args.split!r} (source {source!r})")
        identity = {"model": args.model, "dtype": args.dtype, "split": args.split, "source": source,
                    "data": args.data, "data_seed": args.data_seed if source == "generated" else None}
        if args.prompt_format == "compact":  # absent for chat: results files made before the flag keep their hash
            identity["prompt_format"] = "compact"
        if args.adapter is not None:  # absent otherwise: results files made without adapters keep their hash
            identity["adapter"] = _adapter_identity(args.adapter)
        settings = eval_settings(task, gen_length=args.gen_length, block_length=args.block_length, steps=args.steps,
                                 temperature=args.temperature, max_prompt_length=args.max_prompt_length,
                                 seed=args.seed, identity=identity, dream=args.dream)
        output = Path(args.output)
        if args.overwrite:
            for path in (output, summary_path(output)):
                if path.exists():
                    path.unlink()
        # Before loading the model: refuse a file made with other settings, and skip loading when all is done.
        done = read_results(output, settings, examples=examples)
        todo = sum(1 for i in range(len(examples)) if i not in done)
        model = None
        if todo:
            print(f"stp.eval: {task.name} {args.split}: {len(examples)} examples, {len(examples) - todo} already in "
                  f"{output}, {todo} to generate; loading {args.model!r}", file=sys.stderr)
            model = load_model(args.model, dtype=DTYPES[args.dtype], device=device)
            if args.adapter is not None:
                try:
                    models.merge_adapter(model, args.adapter)
                except ValueError as e:
                    raise EvalError(f"--adapter {args.adapter!r}: {e}") from e
        result = evaluate(model, task, examples, gen_length=args.gen_length, block_length=args.block_length,
                          steps=args.steps, batch_size=args.batch_size, output=output, temperature=args.temperature,
                          max_prompt_length=args.max_prompt_length, seed=args.seed, identity=identity,
                          progress=not args.no_progress, dream=args.dream)
    except EvalError as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    n, acc = result["n"], result["accuracy"]
    who = f"model {args.model}" + (f" + adapter {args.adapter}" if args.adapter is not None else ", no adapter")
    of_answered = result["accuracy_of_answered"]
    print(f"{task.name} ({args.split}, gen_length {args.gen_length}, {who}): accuracy {acc:.4f} "
          f"({acc * n:.2f} / {n}); answered {result['n_answered']} / {n} (answer rate {result['answer_rate']:.3f}; "
          f"accuracy of the answered {'-' if of_answered is None else f'{of_answered:.4f}'}); "
          f"{result['n_generated']} generated, {result['n_resumed']} resumed, "
          f"{result['n_prompt_truncated']} prompts truncated; mean reward {result['mean_reward']:.4f}, "
          f"mean nfe {result['mean_nfe']:.1f}; {result['seconds']:.1f} s")
    print(f"results: {result['output']}\nsummary: {result['summary']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
