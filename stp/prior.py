"""Static priors (spatial pruning, docs/method.md section 1): ``python -m stp.prior`` and the library behind it.

For each training prompt:

1. sample one completion ``s`` of ``gen_length`` tokens from the *base* model (paper setting: T = 0.9, block 32,
   256 steps, gen length 256, low-confidence remasking) with ``stp.sampler.generate``;
2. run ONE forward pass on ``[prompt ; [MASK] * len(s)]`` and score token i by ``log p(s_i | prompt, all masked)``
   (``stp_kernels.masked_logprob`` at the completion rows only; the [rows, vocab] logits are never materialised);
3. choose the anchors with ``stp.anchors.select_anchors`` (re-exported here): the ``answer_*`` strategies always
   free the answer's tokens (``free_rule``: ``inside``, the default and the STP authors' rule, or ``inclusive``);
   of the remaining eligible positions (no EOS / padding, [MASK] or other special token) ``int(n_rest * rho)`` are
   freed and the rest are the anchors, fixed at their absolute canvas positions. stp/anchors.py's docstring gives
   the rules and their reasons.

This module samples and scores (steps 1-2), writes and reads the JSONL file and is the command line; the selection
(step 3) is pure (no model, no file) and lives in ``stp.anchors``.

The JSONL file, one line per prompt (``PRIOR_FORMAT`` = 1)::

    {"format": 1, "prompt_id": "<16 hex: sha256 of the prompt text>", "index": <position in the split>,
     "prompt": "<prompt text>" | null, "prompt_length": <tokens>,
     "completion_ids": [gen_length ints], "anchor_mask": "0101...": gen_length chars, 1 = anchor,
     "kinds": gen_length chars: a anchor, f freed (low score / random), s answer or boxed span, e first EOS and after,
              m [MASK] token, x another special token,
     "valid_length": first EOS index + 1 (gen_length without EOS), "n_rest": int, "n_anchors": int,
     "scores": [gen_length floats, log p(s_i | prompt, all masked)] (absent with --no-scores),
     "settings": {"model", "task", "split", "source", "data", "rho", "strategy", "free_rule", "gen_length",
                  "block_length", "steps", "temperature", "remasking", "seed", "dtype"}}

Command line (every flag is checked before the model loads; an error names the flag, its value and what is allowed)::

    python -m stp.prior --model NAME_OR_PATH --task NAME [--split train] [--data PATH] [--source file|hub|generated]
        [--limit N] --out PATH.jsonl [--rho 0.95] [--strategy answer_low_confidence] [--free-rule inside|inclusive]
        [--gen-length 256]
        [--block-length 32] [--steps 256] [--temperature 0.9] [--seed 0] [--batch-size 8] [--device cpu|cuda[:i]]
        [--dtype auto|float32|bfloat16|float16] [--no-scores] [--backend NAME]

``--seed`` keys the sampling noise and the random strategies; procedurally generated data (``--source generated``)
always uses its generator's seed 0, so the prompt set does not change with ``--seed``. Remasking is fixed to the
paper's ``low_confidence``. Prompts are the task's chat-formatted prompts (``Task.format_prompt``); a trainer finds
the prior of a prompt by ``prompt_id(prompt_text)``.

Every line carries the settings; a rerun must use the same ones (a different one is refused, naming it; a file
written before ``free_rule`` existed counts as ``inclusive``, the only rule then), and skips
the prompts already in the file. Lines are written, flushed and fsync'ed once per batch, so a killed run loses at
most the batch in flight; the torn trailing line such a kill can leave is dropped with a warning (and cut off the
file before appending). A corrupt line anywhere else is an error naming the file and line number.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from stp.anchors import (
    FREE_RULES,
    STRATEGIES,
    Selection,
    check_rho_strategy,
    free_spans,
    select_anchors,
    special_token_ids,
)
from stp.files import read_keyed_jsonl
from stp_kernels import masked_logprob

__all__ = ["STRATEGIES", "FREE_RULES", "PRIOR_FORMAT", "Selection", "PriorFileError", "TornLineWarning",
           "prompt_id", "sample_id_of", "free_spans", "special_token_ids", "select_anchors", "score_completions",
           "build_priors", "build_progress", "load_priors", "read_prior_file", "recorded_setting",
           "to_sampler_prior", "main"]

PRIOR_FORMAT = 1
# Settings that identify a prior file (a rerun must match them all), with the CLI flag each comes from.
SETTING_FLAGS = {"model": "--model", "task": "--task", "split": "--split", "source": "--source", "data": "--data",
                 "rho": "--rho", "strategy": "--strategy", "free_rule": "--free-rule", "gen_length": "--gen-length",
                 "block_length": "--block-length", "steps": "--steps", "temperature": "--temperature",
                 "remasking": "remasking", "seed": "--seed", "dtype": "--dtype"}
# Settings added after files were first written, with the value every older file was built with.
_SETTING_WHEN_MISSING = {"free_rule": "inclusive"}
_DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class build_progress:  # noqa: N801 - used as a context manager, like contextlib's
    """While active, ``build_priors`` advances a progress bar of the prompts it builds, made at its first call (none
    when nothing is built): ``stp.trainer`` wraps a method's preparation in it, whose prior building can take
    minutes before step 1."""

    _active: build_progress | None = None

    def __init__(self, enabled: bool = True, desc: str = "static priors"):
        self.enabled, self.desc, self.bar = enabled, desc, None

    def __enter__(self) -> build_progress:
        if self.enabled:
            build_progress._active = self
        return self

    def __exit__(self, *exc) -> None:
        if build_progress._active is self:
            build_progress._active = None
        if self.bar is not None:
            self.bar.close()

    @classmethod
    def advance(cls, n: int) -> None:
        me = cls._active
        if me is None:
            return
        if me.bar is None:
            from tqdm.auto import tqdm

            me.bar = tqdm(desc=me.desc, unit="prompt", dynamic_ncols=True, file=sys.stderr)
        me.bar.update(n)


def recorded_setting(settings: Mapping[str, Any], key: str) -> Any:
    """The value of ``key`` in a record's ``settings``; for a setting added after files were first written
    (``free_rule``) a record without it gets the value every older file was built with; otherwise None."""
    return settings[key] if key in settings else _SETTING_WHEN_MISSING.get(key)


class PriorFileError(ValueError):
    """A prior file that cannot be used: a corrupt line (named by file and line number) or mismatched settings."""


class TornLineWarning(UserWarning):
    """The last line of a prior file is incomplete (a run was killed while writing it); it is dropped."""


# ---------------------------------------------------------------------------------------------------- identities


def prompt_id(prompt: str | Sequence[int]) -> str:
    """Stable id of a prompt: the first 16 hex digits of the SHA-256 of its text (token prompts: of their ids)."""
    if isinstance(prompt, str):
        data = prompt.encode("utf-8")
    else:
        data = ("ids:" + ",".join(str(int(t)) for t in prompt)).encode()
    return hashlib.sha256(data).hexdigest()[:16]


def sample_id_of(pid: str) -> int:
    """The 40-bit integer of a prompt id that keys its sampling noise and random selection (so a prompt samples
    the same completion in any batch, and ``sample_id * gen_length + position`` stays far inside int64)."""
    return int(pid[:10], 16)

# ------------------------------------------------------------------------------------------------------- building


def _encode(model, prompts, attention_mask=None) -> tuple[torch.Tensor, torch.Tensor, list]:
    """Prompts (texts, token-id lists, or a [B, P] tensor with optional padding mask) -> left-padded ids, mask and
    the per-prompt keys used for ids (text, or the unpadded id list)."""
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() != 2:
            raise ValueError(f"prompt tensor must be [B, P], got shape {tuple(prompts.shape)}")
        mask = torch.ones_like(prompts) if attention_mask is None else attention_mask
        prompts = [row[m.bool()].tolist() for row, m in zip(prompts.cpu(), mask.cpu())]
    prompts = list(prompts)
    if not prompts:
        raise ValueError("no prompts")
    if all(isinstance(p, str) for p in prompts):
        if model.tokenizer is None:
            raise ValueError("text prompts need a model with a tokenizer; pass token ids instead")
        seqs = [model.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        keys: list = prompts
    else:
        seqs = [[int(t) for t in p] for p in prompts]
        keys = seqs
    if any(len(s) == 0 for s in seqs):
        raise ValueError("empty prompt")
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), int(model.pad_token_id), dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, width - len(s):] = 1
    return ids, mask, keys


@torch.no_grad()
def score_completions(model, prompt_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                      completions: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """[B, L] float32 log p(s_i | prompt, all masked): one forward pass on [prompt ; [MASK] * L], log-probs at the
    completion rows only (``masked_logprob``)."""
    batch, plen = prompt_ids.shape
    length = completions.shape[1]
    device = model.device
    x = torch.full((batch, plen + length), int(model.mask_token_id), dtype=torch.long, device=device)
    x[:, :plen] = prompt_ids.to(device)
    attn = None
    if attention_mask is not None:
        attn = torch.ones(batch, plen + length, dtype=torch.long, device=device)
        attn[:, :plen] = attention_mask.to(device)
    hidden = model.backbone(x, attn)
    total = plen + length
    starts = torch.arange(batch, device=device)[:, None] * total + plen
    rows = (starts + torch.arange(length, device=device)).reshape(-1)
    logp = masked_logprob(hidden.reshape(batch * total, -1), model.lm_head_weight,
                          completions.to(device).reshape(-1), rows=rows, backend=backend)
    return logp.view(batch, length).float().cpu()


def build_priors(model, prompts, *, rho: float, strategy: str, free_rule: str = "inside", gen_length: int = 256,
                 block_length: int = 32,
                 steps: int = 256, temperature: float = 0.9, seed: int, remasking: str = "low_confidence",
                 attention_mask: torch.Tensor | None = None, indices: Sequence[int] | None = None,
                 settings: Mapping[str, Any] | None = None,
                 keep_scores: bool = True, keep_prompt: bool = True, backend: str | None = None) -> list[dict]:
    """Static priors for a batch of prompts: one JSON-ready record per prompt (schema in the module docstring).

    ``prompts``: texts (tokenised without special tokens: render the chat template first), token-id lists, or a
    [B, P] tensor (``attention_mask`` marks real tokens). ``indices``: each prompt's position in its dataset
    (default 0..B-1). ``settings``: extra identity fields recorded (the CLI adds model, task, split, data...).
    The completion of a prompt depends on (seed, prompt id) only, not on the batch it is in (noise is keyed by
    ``sample_id_of(prompt_id)``); ``backend`` is the ``stp_kernels`` backend of sampling and scoring.
    """
    from stp import sampler

    check_rho_strategy(rho, strategy, "stp.prior.build_priors", free_rule)
    ids, mask, keys = _encode(model, prompts, attention_mask)
    pids = [prompt_id(k) for k in keys]
    if indices is None:
        indices = list(range(len(pids)))
    if len(indices) != len(pids):
        raise ValueError(f"indices has {len(indices)} entries for {len(pids)} prompts")
    device = model.device
    sample_ids = torch.tensor([sample_id_of(p) for p in pids], dtype=torch.long, device=device)
    out = sampler.generate(model, ids.to(device), attention_mask=mask.to(device), gen_length=gen_length,
                           block_length=block_length, steps=steps, temperature=temperature, remasking=remasking,
                           seed=seed, sample_ids=sample_ids, backend=backend)
    completions = out.completions.cpu()
    scores = score_completions(model, ids, mask, completions, backend=backend)
    recorded = {"model": getattr(model, "name", None), "rho": rho, "strategy": strategy, "free_rule": free_rule,
                "gen_length": gen_length,
                "block_length": block_length, "steps": steps, "temperature": temperature,
                "remasking": remasking, "seed": seed, **(settings or {})}
    records = []
    specials = special_token_ids(model.tokenizer) if model.tokenizer is not None else set()
    specials |= {int(t) for t in (model.eos_token_id, model.mask_token_id, model.pad_token_id) if t is not None}
    for b, pid in enumerate(pids):
        sel = select_anchors(scores[b], completions[b], model.tokenizer, rho=rho, strategy=strategy, seed=seed,
                             sample_id=sample_id_of(pid), eos_token_id=model.eos_token_id,
                             mask_token_id=model.mask_token_id, free_rule=free_rule, special_ids=specials)
        rec = {"format": PRIOR_FORMAT, "prompt_id": pid, "index": int(indices[b]),
               "prompt": keys[b] if keep_prompt and isinstance(keys[b], str) else None,
               "prompt_length": int(mask[b].sum()), "completion_ids": completions[b].tolist(),
               "anchor_mask": "".join("1" if a else "0" for a in sel.anchors.tolist()), "kinds": sel.kinds(),
               "valid_length": sel.valid_length, "n_rest": sel.n_rest, "n_anchors": sel.n_anchors}
        if keep_scores:
            # Exact float32 values (not rounded): select_anchors on the stored scores reproduces the anchor mask.
            rec["scores"] = [v if math.isfinite(v) else -3.0e38 for v in scores[b].tolist()]
        rec["settings"] = dict(recorded)
        records.append(rec)
    build_progress.advance(len(records))
    return records


# ------------------------------------------------------------------------------------------------------ the file


def _check_record(rec, where: str) -> None:
    if not isinstance(rec, dict):
        raise PriorFileError(f"{where}: a line must be a JSON object, got {type(rec).__name__}")
    for field, kind in (("prompt_id", str), ("completion_ids", list), ("anchor_mask", str), ("settings", dict)):
        if not isinstance(rec.get(field), kind):
            raise PriorFileError(f"{where}: field {field!r} missing or not a {kind.__name__}")
    if rec.get("format") != PRIOR_FORMAT:
        raise PriorFileError(f"{where}: format {rec.get('format')!r}; this version reads format {PRIOR_FORMAT}")
    n = len(rec["completion_ids"])
    if len(rec["anchor_mask"]) != n or set(rec["anchor_mask"]) - {"0", "1"}:
        raise PriorFileError(f"{where}: anchor_mask must be {n} chars of 0/1 (one per completion token)")
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in rec["completion_ids"]):
        raise PriorFileError(f"{where}: completion_ids must be ints")
    if "scores" in rec and (not isinstance(rec["scores"], list) or len(rec["scores"]) != n):
        raise PriorFileError(f"{where}: scores must be a list of {n} numbers")


def read_prior_file(path: str | os.PathLike) -> tuple[list[dict], int, bool]:
    """(records in file order, byte length of the complete lines, whether a torn trailing line was dropped).

    A line that is not a valid record is an error naming file and line, except the last line when it has no
    newline and does not parse (a kill while writing it): that one is dropped with a ``TornLineWarning``."""
    records, good_end, torn = read_keyed_jsonl(path, _check_record, PriorFileError)
    if torn is not None:
        warnings.warn(f"{torn}; dropping it (a run was killed while writing it): its prompt will be redone",
                      TornLineWarning, stacklevel=2)
    return records, good_end, torn is not None


def load_priors(path: str | os.PathLike) -> dict[str, dict]:
    """The records of a prior file by prompt id (see ``prompt_id``); a torn last line is dropped with a warning."""
    records, _, _ = read_prior_file(path)
    return {rec["prompt_id"]: rec for rec in records}


def to_sampler_prior(records: Sequence[Mapping[str, Any]], gen_length: int,
                     device: torch.device | str | None = None):
    """``stp.sampler.Prior`` for a batch (one record per row, in order): tokens and anchor mask [B, gen_length].
    A record longer than the canvas is cut when its cut part has no anchor, otherwise refused."""
    from stp.sampler import Prior

    tokens = torch.zeros(len(records), gen_length, dtype=torch.long)
    mask = torch.zeros(len(records), gen_length, dtype=torch.bool)
    for b, rec in enumerate(records):
        ids, anchors = rec["completion_ids"], rec["anchor_mask"]
        if len(anchors) != len(ids):
            raise ValueError(f"record {rec.get('prompt_id')}: anchor_mask and completion_ids differ in length")
        if "1" in anchors[gen_length:]:
            raise ValueError(f"record {rec.get('prompt_id')}: anchors at position >= gen_length={gen_length} "
                             f"(the prior was built for a {len(ids)}-token canvas)")
        n = min(len(ids), gen_length)
        tokens[b, :n] = torch.tensor(ids[:n], dtype=torch.long)
        mask[b, :n] = torch.tensor([c == "1" for c in anchors[:n]], dtype=torch.bool)
    return Prior(tokens=tokens.to(device), mask=mask.to(device))


# -------------------------------------------------------------------------------------------------------- the CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m stp.prior", description="Build the static priors (anchors) of a "
                                "task's prompts with a base model (docs/method.md section 1).")
    p.add_argument("--model", required=True, help="'tiny', a local model directory, or a Hub id")
    p.add_argument("--task", required=True, help="gsm8k, math, countdown, sudoku")
    p.add_argument("--split", default="train", help="the split whose prompts get priors [train]")
    p.add_argument("--data", default=None, help="a local data file (default: the task's default source)")
    p.add_argument("--source", default=None, help="file, hub or generated (default: file with --data, else the "
                   "task's default)")
    p.add_argument("--limit", default=None, help="only the first N prompts")
    p.add_argument("--out", required=True, help="output .jsonl (appended to / resumed)")
    p.add_argument("--rho", default="0.95",
                   help="share of the eligible positions freed (decoded by rollouts) in [0, 1]; the other 1 - rho "
                        "become anchors, fixed at their positions [0.95: 5%% of the eligible tokens anchored]")
    p.add_argument("--strategy", default="answer_low_confidence",
                   help=f"which positions are freed, one of: {', '.join(STRATEGIES)}. low_confidence: the "
                        f"lowest-scoring ones (score: log p(token | prompt, all masked)); random: uniformly random "
                        f"ones; answer_*: the same, after always freeing the answer's text (--free-rule) "
                        f"[answer_low_confidence, the STP authors' rule]")
    p.add_argument("--free-rule", default="inside", help="what the answer_* strategies always free: inside (the "
                   "text strictly inside <answer>...</answer> and \\boxed{...}, the STP authors' rule) or inclusive "
                   "(the tags and delimiters too, and everything after an unclosed one)")
    p.add_argument("--gen-length", default="256", help="canvas length of the sampled completion [256]")
    p.add_argument("--block-length", default="32", help="block length of the sampling [32]")
    p.add_argument("--steps", default="256", help="denoising steps of the sampling [256]")
    p.add_argument("--temperature", default="0.9", help="sampling temperature [0.9]")
    p.add_argument("--seed", default="0", help="sampling and random-strategy seed [0]")
    p.add_argument("--batch-size", default="8", help="prompts per generate call [8]")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--dtype", default="auto", help=f"{', '.join(_DTYPES)} (auto: the checkpoint's)")
    p.add_argument("--no-scores", action="store_true", help="do not store the per-token scores")
    p.add_argument("--backend", default=None, help="stp_kernels backend (default: the fastest available)")
    return p


def _validate(args, parser) -> dict:
    """Every flag checked (no model, no data loaded yet); returns the parsed values."""
    from stp.tasks import TASKS

    def fail(flag, value, allowed):
        parser.error(f"{flag}={value!r} is not allowed; allowed: {allowed}")

    def as_int(flag, value, low=1):
        try:
            v = int(value)
        except (TypeError, ValueError):
            fail(flag, value, f"an integer >= {low}")
        if v < low:
            fail(flag, value, f"an integer >= {low}")
        return v

    model_dir = Path(args.model).expanduser()
    if (model_dir / "adapter_config.json").is_file() and not (model_dir / "config.json").is_file():
        parser.error(f"--model {args.model!r} is a LoRA adapter, not a model; give its base model (the run's "
                     f"model.name_or_path), or merge it first: python -m stp.export --adapter {args.model} --out DIR")

    def as_float(flag, value, low, high, what):
        try:
            v = float(value)
        except (TypeError, ValueError):
            fail(flag, value, what)
        if not (math.isfinite(v) and low <= v <= high):
            fail(flag, value, what)
        return v

    v: dict[str, Any] = {}
    looks_local = args.model.startswith(("/", "./", "../", "~")) or args.model.count("/") > 1
    if args.model != "tiny" and looks_local and not Path(args.model).expanduser().is_dir():
        fail("--model", args.model, "'tiny', an existing model directory, or a Hub id (org/name)")
    if args.task not in TASKS:
        fail("--task", args.task, ", ".join(TASKS))
    task_cls = TASKS[args.task]
    if args.split not in task_cls.splits:
        fail("--split", args.split, ", ".join(task_cls.splits))
    if args.source is not None and args.source not in ("file", "hub", "generated"):
        fail("--source", args.source, "file, hub, generated")
    source = args.source or ("file" if args.data is not None else task_cls.default_source)
    if source == "file" and args.data is None:
        fail("--source", source, "hub or generated without --data (source 'file' needs --data PATH)")
    data = None
    if args.data is not None:
        path = Path(args.data).expanduser()
        if not path.is_file():
            fail("--data", args.data, "an existing data file (.jsonl, .json, .csv, .parquet)")
        data = str(path.resolve())
    v["limit"] = None if args.limit is None else as_int("--limit", args.limit)
    v["rho"] = as_float("--rho", args.rho, 0.0, 1.0, "a number in [0, 1]")
    if args.strategy not in STRATEGIES:
        fail("--strategy", args.strategy, ", ".join(STRATEGIES))
    if args.free_rule not in FREE_RULES:
        fail("--free-rule", args.free_rule, ", ".join(FREE_RULES))
    gen = as_int("--gen-length", args.gen_length)
    block = as_int("--block-length", args.block_length)
    if gen % block:
        fail("--block-length", args.block_length, f"a divisor of --gen-length={gen}")
    steps = as_int("--steps", args.steps)
    if steps % (gen // block):
        fail("--steps", args.steps, f"a multiple of the number of blocks (--gen-length / --block-length = "
             f"{gen // block})")
    v["temperature"] = as_float("--temperature", args.temperature, 0.0, math.inf, "a finite number >= 0")
    v["seed"] = as_int("--seed", args.seed, low=0)
    v["batch_size"] = as_int("--batch-size", args.batch_size)
    if args.dtype not in _DTYPES:
        fail("--dtype", args.dtype, ", ".join(_DTYPES))
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        fail("--device", device, "a torch device such as cpu, cuda, cuda:0")
    if dev.type == "cuda" and not torch.cuda.is_available():
        fail("--device", device, "cpu (no CUDA device is available here)")
    if args.backend is not None:
        from stp_kernels import available_backends

        names = list(available_backends())
        if args.backend not in names:
            fail("--backend", args.backend, ", ".join(names))
    out = Path(args.out).expanduser()
    if out.is_dir():
        fail("--out", args.out, "a file path (this is a directory)")
    if not out.parent.exists():
        fail("--out", args.out, "a path in an existing directory")
    v.update(gen_length=gen, block_length=block, steps=steps, device=dev, out=out, source=source, data=data)
    v["settings"] = {"model": args.model, "task": args.task, "split": args.split, "source": source, "data": data,
                     "rho": v["rho"], "strategy": args.strategy, "free_rule": args.free_rule, "gen_length": gen,
                     "block_length": block,
                     "steps": steps, "temperature": v["temperature"], "remasking": "low_confidence",
                     "seed": v["seed"], "dtype": args.dtype}
    return v


def _check_settings(records: list[dict], settings: dict, path: Path) -> None:
    for lineno, rec in enumerate(records, start=1):
        theirs = rec["settings"]
        for key, ours in settings.items():
            value = theirs.get(key, _SETTING_WHEN_MISSING.get(key, "<missing>"))
            if value != ours:
                flag = SETTING_FLAGS.get(key, key)
                raise PriorFileError(f"{path}:{lineno} was written with {flag} {value!r}; "
                                     f"this run has {flag} {ours!r}. One file holds one setting: rerun with the "
                                     f"same {flag} or write to another --out")


def main(argv: Sequence[str] | None = None) -> int:
    from tqdm import tqdm

    from stp.pretrain import load_model
    from stp.tasks import get_task

    parser = _parser()
    args = parser.parse_args(argv)
    v = _validate(args, parser)
    out: Path = v["out"]
    settings = v["settings"]
    done: set[str] = set()
    try:
        if out.exists():
            records, good_end, torn = read_prior_file(out)
            _check_settings(records, settings, out)
            done = {r["prompt_id"] for r in records}
            if torn or good_end != out.stat().st_size:
                with open(out, "r+b") as f:  # cut the torn tail so that appended lines start on a fresh line
                    f.truncate(good_end)
                    f.flush()
                    os.fsync(f.fileno())
            if good_end and not out.read_bytes().endswith(b"\n"):
                with open(out, "ab") as f:
                    f.write(b"\n")
    except PriorFileError as e:
        raise SystemExit(f"stp.prior: error: {e}") from None

    task = get_task(args.task)
    examples = task.load(args.split, v["data"], source=v["source"], n=v["limit"])  # generators: their seed 0
    model = load_model(args.model, dtype=_DTYPES[args.dtype], device=v["device"])
    if model.tokenizer is None:
        raise SystemExit(f"stp.prior: error: model {args.model!r} has no tokenizer; prompts cannot be rendered")
    todo: list[tuple[int, str]] = []
    queued = set(done)
    for index, example in enumerate(examples):
        text = task.format_prompt(example, model.tokenizer)
        pid = prompt_id(text)
        if pid not in queued:  # finished earlier, or a duplicate prompt of this split
            queued.add(pid)
            todo.append((index, text))
    print(f"stp.prior: {len(examples)} prompts, {len(done)} already in {out}, {len(todo)} to build",
          file=sys.stderr)
    bs = v["batch_size"]
    with tqdm(total=len(todo), unit="prompt", desc="priors", file=sys.stderr) as bar, open(out, "a") as f:
        for start in range(0, len(todo), bs):
            chunk = todo[start:start + bs]
            recs = build_priors(model, [t for _, t in chunk], indices=[i for i, _ in chunk], rho=v["rho"],
                                strategy=args.strategy, free_rule=args.free_rule, gen_length=v["gen_length"],
                                block_length=v["block_length"],
                                steps=v["steps"], temperature=v["temperature"], seed=v["seed"],
                                settings=settings, keep_scores=not args.no_scores, backend=args.backend)
            f.write("".join(json.dumps(r, separators=(",", ":")) + "\n" for r in recs))
            f.flush()
            os.fsync(f.fileno())
            bar.update(len(chunk))
    return 0


if __name__ == "__main__":
    sys.exit(main())
