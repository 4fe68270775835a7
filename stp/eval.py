"""d1 protocol evaluation from the command line: ``python -m stp.eval --model PATH --task NAME --gen-length 256``,
or of a training run: ``python -m stp.eval --run runs/tiny``.

The library (``evaluate``, ``eval_settings``, ``read_results``...) lives in ``stp.evaluation``, whose docstring
gives the protocol, the row format and the resume rules; its public names are re-exported here, so ``from stp.eval
import evaluate`` keeps working. This module adds what only the command line needs: loading the model ('tiny',
'pretrained:TASK' through ``stp.pretrain``, a directory or a Hub id), merging an ``--adapter``, the data flags and
the default output name.

An adapter written by ``python -m stp.train`` sits in its run directory beside the run's ``config.yaml``: with
``--adapter DIR`` (or ``--run RUN`` for ``RUN/adapter``) every flag of ``RUN_DEFAULTS`` that is not given takes the
run's setting (model, task, prompt format, gen length, block length, steps, held-out temperature, d1_compat) and the
run's data source, so the adapter is decoded as it was trained and evaluated; a given flag that differs from the
run's is used, with a warning.

Output: ``--output``, default ``eval_outputs/<task>_<gen_length>_<model>[+<adapter>].jsonl`` (``default_output``:
another model or adapter gets another file); a rerun with the same file resumes it, ``--overwrite`` starts it again.

At the end the accuracy (mean metric over the examples of this run, resumed rows included) is printed with the model,
the adapter and the answer rate (the fraction of completions whose answer the task could read at all: an accuracy of
0.0 with an answer rate of 0.0 means no answer was readable, not that every answer was wrong), and a summary JSON is
written next to the output as ``<stem>.summary.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from stp import models
from stp.decoding import DREAM_ALGORITHMS, DreamDecoding
from stp.evaluation import (
    D1_GEN_LENGTHS,
    DEFAULT_BLOCK_LENGTH,
    DEFAULT_MAX_PROMPT_LENGTH,
    EvalError,
    EvalWarning,
    ResumeError,
    add_threshold_settings,
    check_decoding,
    eval_settings,
    evaluate,
    read_results,
    settings_hash,
    summary_path,
)
from stp.pretrain import load_model
from stp.tasks import TASKS, DataError, Task

__all__ = ["EvalError", "EvalWarning", "ResumeError", "evaluate", "eval_settings", "settings_hash", "check_decoding",
           "read_results", "summary_path", "default_output", "main", "D1_GEN_LENGTHS", "DEFAULT_BLOCK_LENGTH",
           "DEFAULT_MAX_PROMPT_LENGTH", "RUN_DEFAULTS", "run_config"]

DTYPES = {"auto": None, "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


# -------------------------------------------------------------------------------------------------- output name



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


# ---------------------------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m stp.eval",
        description="Evaluate a masked diffusion LM on a task under the d1 protocol (greedy, block 32, "
                    "steps = gen_length / 2); writes per-example JSONL (resumable) and a summary JSON.")
    p.add_argument("--model", default=None, help="'tiny', 'pretrained:TASK', a local model directory, or a Hub id "
                                                 "[with --adapter / --run: the run's model.name_or_path]")
    p.add_argument("--adapter", default=None, metavar="DIR",
                   help="a LoRA adapter directory to merge into --model first (the 'adapter' directory of a "
                        "`python -m stp.train` run: the run's config.yaml beside it gives the defaults of --model, "
                        "--task, --prompt-format, --gen-length, --block-length, --steps, --temperature and the data "
                        "source, and an explicit flag that differs from the run is warned about)")
    p.add_argument("--run", default=None, metavar="DIR",
                   help="a `python -m stp.train` run directory: the same as --adapter DIR/adapter")
    p.add_argument("--task", default=None, help=f"one of: {', '.join(TASKS)} [with --adapter / --run: the run's]")
    p.add_argument("--prompt-format", default=None, choices=("chat", "compact"),
                   help="chat: the task's chat prompt (d1's); compact: stp.pretrain's one-line prompt (sudoku, "
                        "countdown), which the embedded tiny model reads [compact for the tiny model, else chat]")
    p.add_argument("--gen-length", type=int, default=None,
                   help="completion length; d1: 128, 256, 512 (any multiple of --block-length) [256; with "
                        "--adapter / --run: the run's rollout.gen_length]")
    p.add_argument("--block-length", type=int, default=None,
                   help="block length [32; with --adapter / --run: the run's]")
    p.add_argument("--steps", type=int, default=None,
                   help="denoising steps [gen_length / 2; with --adapter / --run: the run's rollout.steps]")
    p.add_argument("--temperature", type=float, default=None,
                   help="sampling temperature [0 = greedy; with --adapter / --run: the run's "
                        "rollout.eval_temperature]")
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
    p.add_argument("--sampler", default="schedule", choices=("schedule", "eb"),
                   help="schedule: the block schedule of --steps (LLaDA's low-confidence remasking, or --alg); eb: "
                        "the entropy-bounded sampler with threshold --gamma (--steps unused) [schedule]")
    p.add_argument("--gamma", type=float, default=None, metavar="G",
                   help="entropy bound of --sampler eb: commit the largest prefix of the block's masked positions "
                        "by entropy with sum H - max H <= G")
    p.add_argument("--controller", default=None, metavar="DIR",
                   help="--sampler eb with each prompt's gamma from a learned threshold controller (the "
                        "'controller' directory of a diffpo run; greedy: the median of its distribution)")
    p.add_argument("--controller-gamma", default="median", choices=("median", "sampled"),
                   help="--controller: decode each prompt with the median of its gamma distribution, or with a gamma "
                        "drawn from it (the policy the controller was trained as; keyed by --seed and the example "
                        "index, so a partly written results file is not resumed) [median]")
    p.add_argument("--cache", default="none", choices=("none", "prefix", "dual"),
                   help="block KV cache of the sampler (Fast-dLLM's approximation, faster; results differ from "
                        "none): prefix (prompt and finished blocks cached) or dual (the masked suffix too) [none]")
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
    p.add_argument("--d1-compat", action="store_true", default=None,
                   help="score with d1's published reward code, bugs included [with --adapter / --run: the run's]")
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


# Flags whose default, with --adapter / --run, is the training run's setting (config.yaml): (flag, attribute,
# section, field, default without a run).
RUN_DEFAULTS = (("--model", "model", "model", "name_or_path", None),
                ("--task", "task", "run", "task", None),
                ("--prompt-format", "prompt_format", "run", "prompt_format", None),
                ("--gen-length", "gen_length", "rollout", "gen_length", 256),
                ("--block-length", "block_length", "rollout", "block_length", DEFAULT_BLOCK_LENGTH),
                ("--steps", "steps", "rollout", "steps", None),
                ("--temperature", "temperature", "rollout", "eval_temperature", 0.0),
                ("--d1-compat", "d1_compat", "run", "d1_compat", False))


def run_config(adapter: str | Path) -> tuple[Path, dict] | None:
    """(path, contents) of the config.yaml of the `python -m stp.train` run whose 'adapter' directory this is (the
    file beside it), or None when there is none."""
    path = Path(adapter).expanduser().resolve().parent / "config.yaml"
    if not path.is_file():
        return None
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise EvalError(f"{path}: the run's config.yaml could not be read ({e})") from e
    if not isinstance(data, dict):
        raise EvalError(f"{path}: not a run configuration (expected sections model, run, rollout)")
    return path, data


def _run_defaults(args: argparse.Namespace) -> None:
    """--run DIR -> --adapter DIR/adapter; with an adapter of a `python -m stp.train` run, the flags not given take
    the run's settings (RUN_DEFAULTS), and a given one that differs is warned about (the adapter learned under the
    run's); every other unset flag takes its plain default."""
    if args.run is not None:
        if args.adapter is not None:
            raise EvalError(f"--run {args.run!r} with --adapter {args.adapter!r}: --run DIR means --adapter "
                            f"DIR/adapter; allowed: one of them")
        run_dir = Path(args.run).expanduser()
        if not (run_dir / "config.yaml").is_file():
            raise EvalError(f"--run {args.run!r}: no config.yaml in that directory (expected the output directory "
                            f"of a `python -m stp.train` run, e.g. runs/tiny)")
        if not (run_dir / "adapter").is_dir():
            raise EvalError(f"--run {args.run!r}: no 'adapter' directory in it (the run did not finish, or trained "
                            f"without LoRA: then evaluate its checkpoint as --model)")
        args.adapter = str(run_dir / "adapter")
    found = run_config(args.adapter) if args.adapter is not None else None
    if found is not None:
        path, config = found
        run = config.get("run") or {}
        own = bool(run.get("dataset") or run.get("reward"))
        taken = []
        for flag, attr, section, field, _ in RUN_DEFAULTS:
            value = (config.get(section) or {}).get(field)
            if value is None or (own and attr in ("task", "d1_compat")):
                continue  # a run on your own data / rewards: its task is not what it trained on
            if attr == "steps" and args.gen_length not in (None, (config.get("rollout") or {}).get("gen_length")):
                continue  # another --gen-length: steps follow it (gen_length / 2) unless --steps is given
            given = getattr(args, attr)
            if given is None:
                setattr(args, attr, value)
                if flag != "--d1-compat" or value:
                    taken.append(flag if isinstance(value, bool) else f"{flag} {value}")
            elif given != value and not (isinstance(given, float) and float(value) == given):
                print(f"stp.eval: warning: {flag} {given} differs from the run's {section}.{field} = {value} "
                      f"({path}); the adapter was trained with {value}: omit {flag} to use it", file=sys.stderr)
        source = run.get("data_source")
        if args.data is None and args.source is None and source in ("hub", "generated") and not own:
            args.source = source
            taken.append(f"--source {source}")
        if own:
            print(f"stp.eval: note: the run in {path.parent} trained on its own data or reward functions "
                  f"(run.dataset / run.reward); --task scores with the built-in task's rewards", file=sys.stderr)
        if taken:
            print(f"stp.eval: from {path}: {' '.join(taken)}", file=sys.stderr)
    for _, attr, _, _, default in RUN_DEFAULTS:
        if getattr(args, attr) is None:
            setattr(args, attr, default)
    if args.model is None:
        raise EvalError("--model is required (or --adapter / --run of a `python -m stp.train` run, whose "
                        "config.yaml names its model)")
    if args.task is None:
        raise EvalError(f"--task is required (with --adapter / --run: the run's config.yaml names none usable); "
                        f"allowed: {', '.join(TASKS)}")
    model_dir = Path(args.model).expanduser()
    if model_dir.is_dir() and not (model_dir / "config.json").is_file():
        if (model_dir / "adapter_config.json").is_file():
            raise EvalError(f"--model {args.model!r} is a LoRA adapter, not a model; pass it as --adapter "
                            f"{args.model} (its run's config.yaml names the base model)")
        if (model_dir / "config.yaml").is_file() and (model_dir / "adapter").is_dir():
            raise EvalError(f"--model {args.model!r} is a training run's directory; pass it as --run {args.model}")


def _validate_args(args: argparse.Namespace) -> tuple[Task, torch.device]:
    """Every check that can run before loading data or the model; EvalError naming the flag, value and allowed."""
    _run_defaults(args)
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
    args.controller_module = _threshold_from_flags(args)
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


def _threshold_from_flags(args: argparse.Namespace):
    """--sampler / --gamma / --controller: checks, and the loaded controller (or None); EvalError naming the flag."""
    if args.sampler == "schedule":
        for flag, value in (("--gamma", args.gamma), ("--controller", args.controller)):
            if value is not None:
                raise EvalError(f"{flag} {value}: needs --sampler eb (the schedule sampler has no entropy bound)")
        return None
    if args.dream is not None:
        raise EvalError(f"--sampler eb with --alg {args.alg}: the entropy bound replaces Dream's schedule; "
                        f"allowed with --sampler eb: --alg llada")
    if (args.gamma is None) == (args.controller is None):
        raise EvalError("--sampler eb needs exactly one of --gamma G (a fixed threshold) and --controller DIR (a "
                        "learned one)")
    if args.gamma is not None:
        if not (math.isfinite(args.gamma) and args.gamma >= 0):
            raise EvalError(f"--gamma {args.gamma}: must be a finite number >= 0")
        return None
    from stp.controller import ThresholdController

    try:
        ctl = ThresholdController.load(args.controller)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise EvalError(f"--controller {args.controller!r}: {e}") from e
    if args.controller_gamma == "sampled":
        from stp.controller import SampledThreshold

        return SampledThreshold(ctl, args.seed)
    return ctl


def _adapter_identity(adapter: str | None) -> str | None:
    """The adapter's part of the settings: its path and the SHA-256 of its weights (another adapter at the same path
    is then another setting, and a results file made with the old one is refused)."""
    if adapter is None:
        return None
    weights = Path(adapter) / "adapter_model.safetensors"
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()[:16] if weights.is_file() else "missing"
    return f"{adapter}@{digest}"


def main(argv: Sequence[str] | None = None) -> int:
    from stp.policy import quiet_known_warnings

    quiet_known_warnings()
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
                                 seed=args.seed, identity=identity, dream=args.dream, cache=args.cache)
        add_threshold_settings(settings, args.gamma, args.controller_module)
        output = Path(args.output)
        if args.overwrite:
            for path in (output, summary_path(output)):
                if path.exists():
                    path.unlink()
        # Before loading the model: refuse a file made with other settings, and skip loading when all is done.
        done = read_results(output, settings, examples=examples)
        todo = sum(1 for i in range(len(examples)) if i not in done)
        if done and todo and args.controller_gamma == "sampled" and args.controller_module is not None:
            raise EvalError(f"--controller-gamma sampled: {output} already holds {len(done)} of the rows; the draws "
                            f"are keyed by the row's place in one pass over the examples, so it is not resumed (use "
                            f"--overwrite or another --output)")
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
                          progress=not args.no_progress, dream=args.dream, entropy_bound=args.gamma,
                          controller=args.controller_module, cache=args.cache)
    except EvalError as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    n, acc = result["n"], result["accuracy"]
    who = f"model {args.model}" + (f" + adapter {args.adapter}" if args.adapter is not None else ", no adapter")
    of_answered = result["accuracy_of_answered"]
    gamma = "" if result["mean_gamma"] is None else f", mean gamma {result['mean_gamma']:.3f}"
    from stp.metrics import batch_passes  # passes a generate call of --batch-size rows ran: max NFE of its rows
    print(f"{task.name} ({args.split}, gen_length {args.gen_length}, {who}): accuracy {acc:.4f} "
          f"({acc * n:.2f} / {n}); answered {result['n_answered']} / {n} (answer rate {result['answer_rate']:.3f}; "
          f"accuracy of the answered {'-' if of_answered is None else f'{of_answered:.4f}'}); "
          f"{result['n_generated']} generated, {result['n_resumed']} resumed, "
          f"{result['n_prompt_truncated']} prompts truncated; mean reward {result['mean_reward']:.4f}, "
          f"mean nfe {result['mean_nfe']:.1f} per sample, "
          f"{batch_passes([r['nfe'] for r in result['records']], args.batch_size):.1f} passes per batch{gamma}; "
          f"{result['seconds']:.1f} s")
    print(f"results: {result['output']}\nsummary: {result['summary']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
