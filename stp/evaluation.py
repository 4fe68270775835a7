"""The evaluation library: ``evaluate`` generates and scores a task's examples under the d1 protocol (docs/method.md
5), resumable through a JSONL results file. ``python -m stp.eval`` (stp/eval.py) is its command line; the trainer
(held-out reward) and ``stp.pretrain`` (its SFT checkpoint) call ``evaluate`` here. Kept apart from the command line
so that this library imports no command-line tool (the command line resolves 'pretrained:TASK' through stp.pretrain,
which evaluates with this module).

Protocol (defaults, as d1): greedy decoding (temperature 0), block length 32, steps = gen_length / 2; gen lengths
128 / 256 / 512 are the published ones (any positive multiple of the block length is accepted). Prompts are the
task's chat prompts (``Task.format_prompt`` with the model's tokenizer), tokenized without extra special tokens (the
chat template already has them), left-padded into batches with an attention mask.

Long prompts: the default is no limit (``max_prompt_length=0``), as d1's evaluation script does; the 200-token
limit (docs/method.md 4) is a rollout setting. With a limit, a longer prompt is TRUNCATED FROM THE LEFT, keeping
its last tokens (the question's end and the assistant turn opener), as the d1 / TRL trainers do; a warning gives the
count before generation starts and every row records ``prompt_truncated``. It is never skipped: skipping would change
the denominator of the accuracy.

Completions are decoded up to the first EOS (exclusive), skipping special tokens, and scored with the task's
``extract_answer``, ``metric`` and ``rewards``. Each sample's noise counter is keyed by its example index
(``sample_ids``), so results do not depend on the batch size or on which examples share a batch.

Output (``output``), one JSON object per line::

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
    metric            float? ``task.metric(completion, example)`` (accuracy; Sudoku: fraction of cells right);
                             null for a task that defines no accuracy (your own reward functions)
    rewards           dict   ``task.rewards(completion, example)``: each reward function by name (NaN: None)
    reward            float  their weighted sum (``total_reward``: the task's ``reward_weights``, a NaN counting
                             as 0), the same total the trainer's rollouts are scored with
    nfe               int    forward passes used for this sample

Resume: rows are keyed by (settings_hash, index). A rerun with the same output file reads it first, skips every
example already written and appends the rest (rows are flushed and fsynced after every batch, so a killed run loses
at most the batch in flight). A file written with different settings is refused, naming each differing setting (use
another ``--output`` or ``--overwrite``); so is a row whose example differs from the one now at that index. A corrupt
LAST line (a write cut short by a kill) is reported with its line number, dropped from the file and regenerated; a
corrupt line anywhere else is an error, never skipped silently.

A summary JSON (settings, accuracy, answer rate, counts, mean rewards, seconds) is written next to the output as
``<stem>.summary.json``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from stp import sampler
from stp.decoding import DreamDecoding
from stp.tasks import Task

__all__ = ["EvalError", "EvalWarning", "ResumeError", "evaluate", "eval_settings", "settings_hash", "check_decoding",
           "add_threshold_settings",
           "read_results", "summary_path", "D1_GEN_LENGTHS", "DEFAULT_BLOCK_LENGTH", "DEFAULT_MAX_PROMPT_LENGTH"]

FORMAT_VERSION = 1
D1_GEN_LENGTHS = (128, 256, 512)
DEFAULT_BLOCK_LENGTH = 32
DEFAULT_MAX_PROMPT_LENGTH = 0  # d1's evaluation does not truncate prompts
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
                  identity: Mapping[str, Any] | None = None, dream: DreamDecoding | None = None,
                  cache: str = "none") -> dict[str, Any]:
    """Everything that determines the results of a run (written into every row and hashed for resume).

    ``identity`` adds who/what is evaluated (model, dtype, split, data, source, data_seed...); the decoding fields
    always come from the arguments."""
    out: dict[str, Any] = dict(identity or {})
    out.update(format=FORMAT_VERSION, task=task.name, d1_compat=bool(task.d1_compat), gen_length=int(gen_length),
               block_length=int(block_length), steps=int(steps), temperature=float(temperature), remasking=remasking,
               max_prompt_length=int(max_prompt_length), seed=int(seed))
    if dream is not None:  # absent for LLaDA's decoding: results files made before the option keep their hash
        out["dream"] = dataclasses.asdict(dream)
    if cache != "none":  # absent without a KV cache: results files made before the option keep their hash
        out["cache"] = cache
    return out


def add_threshold_settings(settings: dict[str, Any], entropy_bound: float | None, controller=None) -> None:
    """Add the entropy-bounded sampler's threshold to ``settings`` (in place): ``entropy_bound`` (a fixed gamma) or
    ``controller`` (the hash of a ``stp.controller.ThresholdController``'s weights). Absent for the schedule, so
    results files made before the option keep their hash."""
    if entropy_bound is not None:
        settings["entropy_bound"] = float(entropy_bound)
    if controller is not None:
        settings["controller"] = _sha({k: v.flatten().tolist() for k, v in controller.state_dict().items()})


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


def _mean_metric(values: Sequence[float | None]) -> float | None:
    """The accuracy: the mean metric, None when the task defines none (a row's metric is None)."""
    return None if any(v is None for v in values) else _mean(values)


def total_reward(task: Task, rewards: Mapping[str, float]) -> float:
    """One completion's total reward: the weighted sum of its reward functions' values (``task.reward_weights``,
    in ``task.rewards``' order), a NaN ("not applicable") counting as 0: the total the trainer's rollouts get
    (``stp.metrics.total_reward``), so the held-out reward and the training reward are on one scale."""
    return sum(w * v for w, v in zip(task.reward_weights(), rewards.values(), strict=True) if not math.isnan(v))


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
    entropy_bound: float | None = None,
    controller=None,
    cache: str = "none",
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
        entropy_bound: decode with the entropy-bounded sampler at this gamma (``stp.sampler``; ``steps`` unused);
            part of the settings. controller: a ``stp.controller.ThresholdController``: the EB sampler with each
            prompt's greedy gamma (the median of its distribution); its weights' hash is part of the settings.
            Rows record the gamma they were decoded with.
        cache: the sampler's block KV cache ("none", "prefix", "dual": ``stp.sampler.generate``); part of the
            settings (an approximation: results differ from "none").

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
    if entropy_bound is not None and controller is not None:
        raise EvalError("entropy_bound and controller are exclusive: a fixed gamma, or the controller's per prompt")
    if entropy_bound is not None and not (isinstance(entropy_bound, (int, float)) and 0 <= entropy_bound < math.inf):
        raise EvalError(f"entropy_bound={entropy_bound!r}; allowed: a finite number >= 0 (the EB sampler's gamma)")
    if model is not None:
        ident = {"model": getattr(model, "name", type(model).__name__),
                 "dtype": str(model.dtype).removeprefix("torch.")}
    else:
        ident = {}
    ident.update(identity or {})
    if cache not in sampler.CACHE_MODES:
        raise EvalError(f"cache={cache!r}; allowed: {', '.join(map(repr, sampler.CACHE_MODES))}")
    settings = eval_settings(task, gen_length=gen_length, block_length=block_length, steps=steps,
                             temperature=temperature, max_prompt_length=max_prompt_length, seed=seed,
                             remasking=remasking, identity=ident, dream=dream, cache=cache)
    add_threshold_settings(settings, entropy_bound, controller)
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
                                        progress=progress, n_resumed=n_resumed, backend=backend, dream=dream,
                                        entropy_bound=entropy_bound, controller=controller, cache=cache)
    else:
        n_generated = 0

    rows = [records[i] for i in range(len(examples))]
    reward_names = list(rows[0]["rewards"]) if rows else []
    answered = [r for r in rows if r["answer"] is not None]
    result: dict[str, Any] = {
        "task": task.name,
        "accuracy": _mean_metric([r["metric"] for r in rows]),
        "n": len(rows),
        "n_generated": n_generated,
        "n_resumed": n_resumed,
        "n_prompt_truncated": sum(bool(r.get("prompt_truncated")) for r in rows),
        # What a low accuracy is made of: how often the task could read an answer at all, and how good those were.
        "n_answered": len(answered),
        "answer_rate": _mean([1.0 if r["answer"] is not None else 0.0 for r in rows]),
        "accuracy_of_answered": _mean_metric([r["metric"] for r in answered]) if answered else None,
        "mean_reward": _mean([r["reward"] for r in rows]),
        "mean_rewards": {k: _mean([r["rewards"][k] for r in rows]) for k in reward_names},
        "mean_nfe": _mean([r["nfe"] for r in rows]),
        "mean_gamma": _mean([r["gamma"] for r in rows]) if rows and "gamma" in rows[0] else None,
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
                      backend, dream=None, entropy_bound=None, controller=None, cache="none") -> int:
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
    metric_sum = sum(records[i]["metric"] or 0.0 for i in records if 0 <= i < len(examples))
    reward_sum = sum(records[i]["reward"] for i in records if 0 <= i < len(examples))
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
            gamma = entropy_bound
            if controller is not None:
                from stp.controller import pooled_prompt_features

                controller.to(device)
                gamma = controller.median(pooled_prompt_features(model, ids.to(device), mask.to(device)))
            out = sampler.generate(model, ids.to(device), attention_mask=mask.to(device), gen_length=gen_length,
                                   block_length=block_length, steps=steps, temperature=temperature,
                                   remasking=remasking, seed=seed, sample_ids=torch.tensor(batch, device=device),
                                   backend=backend, dream=dream, entropy_bound=gamma, cache=cache)
            completions = out.completions.tolist()
            nfe = out.nfe.tolist()
            gammas = (None if gamma is None else gamma.tolist() if isinstance(gamma, torch.Tensor)
                      else [float(gamma)] * len(batch))
            lines = []
            for r, i in enumerate(batch):
                toks = completions[r]
                hit_eos = eos in toks
                toks = toks[:toks.index(eos)] if hit_eos else toks
                text = tokenizer.decode(toks, skip_special_tokens=True)
                example = examples[i]
                prompt, prompt_tokens, _, truncated = encoded[i]
                rewards = task.rewards(text, example)
                metric = task.metric(text, example)
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
                    "metric": metric if metric is None else float(metric),
                    "rewards": rewards,
                    "reward": total_reward(task, rewards),
                    "nfe": int(nfe[r]),
                }
                if gammas is not None:
                    row["gamma"] = gammas[r]
                records[i] = row
                metric_sum += row["metric"] or 0.0
                reward_sum += row["reward"]
                lines.append(json.dumps(row, default=str, ensure_ascii=False) + "\n")
            if out_file is not None:
                out_file.write("".join(lines))
                out_file.flush()
                os.fsync(out_file.fileno())
            n_scored += len(batch)
            bar.update(len(batch))
            if row["metric"] is None:
                bar.set_postfix(reward=f"{reward_sum / n_scored:.3f}")
            else:
                bar.set_postfix(acc=f"{metric_sum / n_scored:.3f}")
    finally:
        bar.close()
        if out_file is not None:
            out_file.close()
        model.train(was_training)
    return len(pending)
