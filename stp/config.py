"""Training configuration: dataclasses with help text, named presets, YAML files, and the CLI generated from them.

Over 500 lines on purpose: the sections, their validation, the presets, the layering and the command line generated
from the sections change together (a new field is one line here and appears everywhere), and reading this module
must not import torch (so it imports no module that does; the methods' own settings come from ``stp.methods``,
which is torch-free at import).

Eight sections, one dataclass each (every field carries ``metadata={"help": ...}``), gathered in :class:`TrainConfig`::

    model      ModelConfig      which model, dtype, LoRA (all attention and MLP projections), 4-bit base
    rollout    RolloutConfig    the sampler (``stp.sampler.generate``): gen_length, block_length, steps, tau, ...
    prior      PriorConfig      static priors / anchors (``stp.prior``): rho, strategy, file, build settings
    estimator  EstimatorConfig  per-token log-probs (``stp.likelihood``): estimator, score, K, mask scheme
    grpo       GRPOConfig       objective and optimiser (``stp.loss``), TRL's names: beta, epsilon, num_generations...
    run        RunConfig        task, data, output, seed, resume, logging, evaluation, device, mixed precision
    diffpo     DiffpoConfig     the diffpo method's own settings (surrogate, importance weights, EB threshold)
    dtrpo      DTRPOConfig      dTRPO's trajectory ratios, DPO beta and offline pairs (``stp.trajectory_ratio``)

Values are resolved in layers, each overriding the one before::

    dataclass defaults (= the ``tiny`` preset)  <  --preset NAME  <  --config FILE.yaml  <  --section.field flags

Every value is checked in ``__post_init__`` (cross-section rules in ``TrainConfig.__post_init__``) before any model
loads. A bad value raises :class:`ConfigError`, which names the dotted field, the value and what is allowed, and
where the value came from (``cfg.yaml, line 7``, ``command line --grpo.epsilon``, ``preset 'llada-gsm8k'``)::

    >>> GRPOConfig(epsilon=-0.1)
    Traceback (most recent call last):
    ...
    stp.config.ConfigError: grpo.epsilon=-0.1 is not allowed; allowed: a number > 0
    >>> parse_args(["--preset", "llada-gsm8k", "--grpo.learning_rate", "1e-6"]).grpo.learning_rate
    1e-06

Command line: ``python -m stp.train [--preset NAME] [--config FILE.yaml] [--section.field VALUE ...]``; booleans
also as ``--run.resume`` / ``--no-run.resume``; optional values take ``none``; lists are comma-separated.
``python -m stp.config --preset llada-gsm8k --print`` prints the resolved configuration as YAML (the same form
``to_dict`` saves with a run, which ``--config`` reads back); ``--presets-table`` prints the README's table.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import sys
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

__all__ = ["ConfigError", "ModelConfig", "RolloutConfig", "PriorConfig", "EstimatorConfig", "GRPOConfig", "RunConfig",
           "DiffpoConfig", "DTRPOConfig", "TrainConfig", "Preset", "PRESETS", "DEFAULT_PRESET", "DEFAULT_METHOD",
           "SECTIONS", "visible_fields", "resolve", "load_yaml", "build_parser", "parse_args", "presets_table", "main"]

# The choices of the modules that consume these settings, repeated here so that reading a config never imports torch
# (tests/test_config.py checks they equal stp.likelihood / stp.prior / stp.models.base).
ESTIMATORS = ("stp", "elbo", "d1")
SCORE_MODES = ("all", "masked", "elbo")
MASK_SCHEMES = ("random_count", "block")
STRATEGIES = ("answer_low_confidence", "low_confidence", "random", "answer_random")
FREE_RULES = ("inside", "inclusive")
ATTN_IMPLEMENTATIONS = ("sdpa", "eager")
TRAJECTORY_MODES = ("exact", "packed")
REMASKING = ("low_confidence", "random")
CACHE_MODES = ("none", "prefix", "dual")
DTYPES = ("auto", "float32", "bfloat16", "float16")
MIXED_PRECISION = ("no", "bf16", "fp16")  # accelerate's names
LR_SCHEDULERS = ("constant_with_warmup", "constant", "linear", "cosine")  # transformers.get_scheduler names
DATA_SOURCES = ("file", "hub", "generated")
DIFFPO_MODES = ("model", "sampler", "joint")
DIFFPO_SAMPLERS = ("eb", "schedule")
DIFFPO_TAUS = ("uniform", "zero")
REPEATABLE = ("run.reward",)  # flags that may be given more than once
REPORT_TO = ("tensorboard", "wandb", "mlflow", "none")  # accelerate tracker names
LORA_TARGETS_ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LLADA = "GSAI-ML/LLaDA-8B-Instruct"
DEFAULT_PRESET = "tiny"
DEFAULT_METHOD = "stp"


class ConfigError(ValueError):
    """An invalid setting: names the dotted ``field``, the ``value``, what is ``allowed``, and the ``origin`` (file
    and line, command-line flag or preset) when known."""

    def __init__(self, message: str, *, field: str | None = None, value: Any = None, allowed: str | None = None,
                 origin: str | None = None):
        self.field, self.value, self.allowed, self.origin, self.bare = field, value, allowed, origin, message
        super().__init__(f"{origin}: {message}" if origin else message)

    @classmethod
    def bad_value(cls, field: str, value: Any, allowed: str, origin: str | None = None) -> ConfigError:
        return cls(f"{field}={value!r} is not allowed; allowed: {allowed}", field=field, value=value, allowed=allowed,
                   origin=origin)

    def located(self, origin: str | None) -> ConfigError:
        """The same error, said to come from ``origin`` (unchanged when it already has one or ``origin`` is None)."""
        if origin is None or self.origin is not None:
            return self
        return ConfigError(self.bare, field=self.field, value=self.value, allowed=self.allowed, origin=origin)


def _f(default: Any = dataclasses.MISSING, help: str = "", *, choices: Sequence[str] | None = None,
       factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field with its help text (and the allowed strings, when it is a choice)."""
    meta = {"help": help, "choices": tuple(choices) if choices else None}
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


# ------------------------------------------------------------------------------------------------- type coercion


def _split_type(tp: Any) -> tuple[Any, bool]:
    """(base type, optional?) of a field annotation: ``float | None`` -> (float, True)."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], len(args) < len(typing.get_args(tp))
    return tp, False


def _type_name(tp: Any) -> str:
    base, optional = _split_type(tp)
    if typing.get_origin(base) is tuple:
        name = "a list of strings (YAML list or comma-separated)"
    else:
        name = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string"}[base]
    return f"{name}, or none" if optional else name


_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")


def _coerce(name: str, value: Any, tp: Any) -> Any:
    """``value`` (from Python, YAML or a command-line string) as the field's type, or a ConfigError."""
    base, optional = _split_type(tp)
    if value is None or (optional and isinstance(value, str) and value.strip().lower() in ("none", "null", "~")):
        if optional:
            return None
        raise ConfigError.bad_value(name, value, _type_name(tp))
    try:
        if base is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
                return value.strip().lower() in _TRUE
        elif base is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            if isinstance(value, str):
                return int(value.strip())
        elif base is float:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                out = float(value)
            elif isinstance(value, str):
                out = float(value.strip())  # also YAML's "1e-6" (a string under YAML 1.1)
            else:
                out = None
            if out is not None and math.isfinite(out):
                return out
        elif base is str:
            if isinstance(value, str):
                return value
        elif typing.get_origin(base) is tuple:
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
                return tuple(value)
    except ValueError:
        pass
    raise ConfigError.bad_value(name, value, _type_name(tp))


class _Section:
    """Shared behaviour of the sections: type coercion, checks, (de)serialisation."""

    section: ClassVar[str]

    def _coerce_all(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            name = f"{self.section}.{f.name}"
            value = _coerce(name, getattr(self, f.name), hints[f.name])
            choices = f.metadata.get("choices")
            if choices and value is not None and value not in choices:
                raise ConfigError.bad_value(name, value, "one of " + ", ".join(map(repr, choices)))
            setattr(self, f.name, value)

    def _need(self, name: str, ok: bool, allowed: str) -> None:
        if not ok:
            raise ConfigError.bad_value(f"{self.section}.{name}", getattr(self, name), allowed)

    def _positive(self, *names: str) -> None:
        for n in names:
            self._need(n, getattr(self, n) >= 1, "an integer >= 1")

    def to_dict(self) -> dict[str, Any]:
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v
                for f in dataclasses.fields(self)}


# ------------------------------------------------------------------------------------------------------ sections


@dataclass
class ModelConfig(_Section):
    """The policy model and its trainable part (LoRA through peft; the reference = the base, adapter disabled)."""

    section: ClassVar[str] = "model"

    name_or_path: str = _f("pretrained:sudoku", "'pretrained:TASK' (the embedded tiny model after `python -m "
                           "stp.pretrain --task TASK`, built and cached on first use; 'pretrained:sudoku_relabel': "
                           "a named variant, stp.pretrain.CHECKPOINTS), 'tiny' (the embedded tiny "
                           "model, random weights), a local model directory (LLaDA, Dream, or one saved by stp) or a "
                           "Hugging Face Hub id such as GSAI-ML/LLaDA-8B-Instruct")
    dtype: str = _f("auto", "dtype the base weights are loaded in (auto: the checkpoint's stored dtype)",
                    choices=DTYPES)
    attn_implementation: str = _f("sdpa", "attention kernel of the backbone", choices=ATTN_IMPLEMENTATIONS)
    use_lora: bool = _f(True, "train a LoRA adapter (peft) instead of all weights; the KL reference is then the base "
                        "model with the adapter disabled")
    lora_r: int = _f(16, "LoRA rank r")
    lora_alpha: int = _f(32, "LoRA alpha (the update is scaled by alpha / r)")
    lora_dropout: float = _f(0.0, "dropout on the LoRA input, in [0, 1); > 0 makes the ratio at inner iteration 0 "
                             "differ from 1 (as in TRL)")
    lora_target_modules: tuple[str, ...] = _f(help="module names that get adapters (default: every attention and MLP "
                                              "projection)", factory=lambda: LORA_TARGETS_ALL)
    load_in_4bit: bool = _f(False, "load the frozen base in 4-bit NF4 (bitsandbytes, CUDA only; needs use_lora)")
    gradient_checkpointing: bool = _f(False, "recompute activations in backward to save memory")

    def __post_init__(self):
        self._coerce_all()
        self._need("name_or_path", bool(self.name_or_path.strip()), "a non-empty name or path")
        if self.name_or_path.startswith("pretrained:"):
            self._need("name_or_path", self.name_or_path.split(":", 1)[1] in ("sudoku", "countdown", "countdown_small",
                                                                             "sudoku_relabel"),
                       "'pretrained:sudoku', 'pretrained:countdown', 'pretrained:countdown_small' (the tasks "
                       "stp.pretrain knows) or 'pretrained:sudoku_relabel' (stp.pretrain.CHECKPOINTS)")
        self._positive("lora_r", "lora_alpha")
        self._need("lora_dropout", 0.0 <= self.lora_dropout < 1.0, "a number in [0, 1)")
        self._need("lora_target_modules", len(self.lora_target_modules) > 0 and all(
            re.fullmatch(r"[A-Za-z0-9_.]+", m) for m in self.lora_target_modules),
            "a non-empty list of module names (letters, digits, '_', '.')")
        self._need("load_in_4bit", not self.load_in_4bit or self.use_lora,
                   "false when model.use_lora is false (a 4-bit base cannot be trained; train a LoRA adapter)")


@dataclass
class RolloutConfig(_Section):
    """Rollouts with the block sampler (``stp.sampler.generate``; LLaDA's meaning of the lengths), temporal pruning."""

    section: ClassVar[str] = "rollout"

    gen_length: int = _f(32, "completion canvas length L in tokens")
    block_length: int = _f(32, "semi-autoregressive block size; must divide gen_length")
    steps: int = _f(16, "total denoising steps over the canvas; a multiple of gen_length / block_length")
    temperature: float = _f(0.9, "Gumbel-max sampling temperature of training rollouts (0 = greedy)")
    remasking: str = _f("low_confidence", "which masked positions are committed each step", choices=REMASKING)
    early_stop: float | None = _f(0.95, "tau of temporal pruning: stop once floor(tau * gen_length) positions are "
                                  "decoded (anchors included) and fill the rest in one pass; none = off")
    confidence_threshold: float | None = _f(None, "beyond the paper: also commit every masked position of the block "
                                            "whose confidence exceeds it, in (0, 1]; none = off")
    cfg_scale: float = _f(0.0, "classifier-free guidance scale (0 = off)")
    cache: str = _f("none", "block KV cache of training rollouts (Fast-dLLM's approximation): none (every step runs "
                    "the whole sequence), prefix (the prompt's and finished blocks' keys/values computed at a block's "
                    "first step and reused for its other steps), dual (the masked suffix's too); the held-out "
                    "evaluation always decodes without (stp.eval --cache evaluates with one)", choices=CACHE_MODES)
    max_prompt_length: int | None = _f(None, "prompts longer than this many tokens are left-truncated (TRL's "
                                       "behaviour); none = no limit")
    eval_temperature: float = _f(0.0, "sampling temperature of the held-out evaluation (0 = greedy, d1's protocol)")

    def __post_init__(self):
        self._coerce_all()
        self._positive("gen_length", "block_length", "steps")
        self._need("block_length", self.gen_length % self.block_length == 0,
                   f"a divisor of rollout.gen_length={self.gen_length}")
        blocks = self.gen_length // self.block_length
        self._need("steps", self.steps % blocks == 0, f"a multiple of the number of blocks (rollout.gen_length / "
                   f"rollout.block_length = {blocks})")
        self._need("temperature", self.temperature >= 0, "a number >= 0")
        self._need("eval_temperature", self.eval_temperature >= 0, "a number >= 0")
        self._need("early_stop", self.early_stop is None or 0 < self.early_stop <= 1, "a number in (0, 1], or none")
        self._need("confidence_threshold", self.confidence_threshold is None or 0 < self.confidence_threshold <= 1,
                   "a number in (0, 1], or none")
        self._need("cfg_scale", self.cfg_scale >= 0, "a number >= 0")
        self._need("max_prompt_length", self.max_prompt_length is None or self.max_prompt_length >= 1,
                   "an integer >= 1, or none")


@dataclass
class PriorConfig(_Section):
    """Static priors (spatial pruning, ``stp.prior``): anchors fixed in rollouts and never masked when scoring."""

    section: ClassVar[str] = "prior"

    enabled: bool = _f(True, "use anchors (only the 'stp' estimator takes them)")
    path: str | None = _f(None, "JSONL written by `python -m stp.prior`; built there first (with the settings below) "
                          "when it does not exist; none = <run.output_dir>/priors.jsonl")
    rho: float = _f(0.95, "fraction of the eligible (non-answer) tokens freed; 1 - rho of them become anchors")
    strategy: str = _f("answer_low_confidence", "which tokens are freed (the paper's: answer_low_confidence)",
                       choices=STRATEGIES)
    free_rule: str = _f("inside", "what the answer_* strategies always free: inside (the text strictly inside "
                        "<answer>...</answer> and \\boxed{...}, the STP authors' rule) or inclusive (the tags and "
                        "delimiters too, and everything after an unclosed one); a reused prior file must match it",
                        choices=FREE_RULES)
    build_steps: int | None = _f(None, "sampler steps when building priors; none = rollout.gen_length (one token per "
                                 "step, the paper's 256 for L = 256)")
    build_block_length: int | None = _f(None, "block length when building priors; none = rollout.block_length")
    build_temperature: float = _f(0.9, "sampling temperature when building priors (the paper's 0.9)")
    build_batch_size: int = _f(8, "prompts per batch when building priors")

    def __post_init__(self):
        self._coerce_all()
        self._need("rho", 0.0 <= self.rho <= 1.0, "a number in [0, 1]")
        self._need("build_steps", self.build_steps is None or self.build_steps >= 1, "an integer >= 1, or none")
        self._need("build_block_length", self.build_block_length is None or self.build_block_length >= 1,
                   "an integer >= 1, or none")
        self._need("build_temperature", self.build_temperature >= 0, "a number >= 0")
        self._positive("build_batch_size")


@dataclass
class EstimatorConfig(_Section):
    """Per-token log-likelihood estimator of the GRPO methods (``stp.likelihood.per_token_logprobs``; the method
    names the estimator: stp = K random-count masks, anchors never masked; elbo = the same without anchors; d1 =
    completion fully masked, prompt masked with prompt_mask_prob)."""

    section: ClassVar[str] = "estimator"

    score: str = _f("all", "which (draw, position) log-probs enter: all (the authors' code), masked, elbo (LLaDA's "
                    "l/n weights)", choices=SCORE_MODES)
    num_draws: int = _f(2, "K Monte-Carlo masks per sample (paper: 3; d1: 1)")
    mask_scheme: str = _f("random_count", "mask scheme (block: SPG-style)", choices=MASK_SCHEMES)
    prompt_mask_prob: float = _f(0.15, "probability of masking each real prompt token")
    temperature: float = _f(1.0, "logits are divided by it when scoring")
    memory_budget: int | None = _f(None, "bytes one packed scoring forward may use (chunked above it); none = half "
                                   "the device memory less twice the weights")

    def __post_init__(self):
        self._coerce_all()
        self._positive("num_draws")
        self._need("prompt_mask_prob", 0.0 <= self.prompt_mask_prob <= 1.0, "a number in [0, 1]")
        self._need("temperature", self.temperature > 0, "a number > 0")
        self._need("memory_budget", self.memory_budget is None or self.memory_budget >= 1, "bytes >= 1, or none")

    def to_likelihood_config(self, estimator: str, backend: str | None = None):
        """The ``stp.loss.LikelihoodConfig`` of ``estimator`` (the method's) with these settings."""
        from stp.loss import LikelihoodConfig

        return LikelihoodConfig(estimator=estimator, num_draws=self.num_draws, score=self.score,
                                mask_scheme=self.mask_scheme, prompt_mask_prob=self.prompt_mask_prob,
                                temperature=self.temperature, memory_budget=self.memory_budget, backend=backend)


@dataclass
class GRPOConfig(_Section):
    """Token-level GRPO (``stp.loss``) and its AdamW optimiser; TRL's names where TRL has the setting."""

    section: ClassVar[str] = "grpo"

    num_generations: int = _f(8, "G: completions per prompt (one advantage group)")
    prompts_per_step: int = _f(4, "prompts per optimizer step, over all processes and accumulation micro-batches "
                               "(samples per step = prompts_per_step * num_generations)")
    num_iterations: int = _f(2, "mu: optimizer steps per rollout batch (inner iterations, each with its own masks)")
    epsilon: float = _f(0.2, "clip range of the ratio: clip(r, 1 - epsilon, 1 + epsilon)")
    beta: float = _f(0.04, "weight of the k3 KL penalty to the reference (0 = no reference pass)")
    scale_rewards: bool = _f(True, "divide advantages by the group's std (+1e-4); false = d1's R - mean")
    learning_rate: float = _f(5e-4, "AdamW peak learning rate")
    lr_scheduler_type: str = _f("constant_with_warmup", "learning-rate schedule (transformers' names)",
                                choices=LR_SCHEDULERS)
    warmup_steps: int = _f(2, "linear warmup optimizer steps")
    weight_decay: float = _f(0.1, "AdamW weight decay")
    adam_beta1: float = _f(0.9, "AdamW beta1")
    adam_beta2: float = _f(0.99, "AdamW beta2")
    adam_epsilon: float = _f(1e-8, "AdamW epsilon")
    max_grad_norm: float = _f(0.2, "gradient clipping by global norm (0 = off)")
    max_steps: int = _f(60, "optimizer steps of the run (num_iterations of them per rollout)")
    gradient_accumulation_steps: int = _f(1, "micro-batches per optimizer step; must divide prompts_per_step * "
                                          "num_generations")

    def __post_init__(self):
        self._coerce_all()
        self._need("num_generations", self.num_generations >= 2, "an integer >= 2 (group advantages need 2 samples)")
        self._positive("prompts_per_step", "num_iterations", "max_steps", "gradient_accumulation_steps")
        self._need("epsilon", self.epsilon > 0, "a number > 0")
        self._need("beta", self.beta >= 0, "a number >= 0")
        self._need("learning_rate", 0 < self.learning_rate < 1, "a number in (0, 1)")
        self._need("warmup_steps", self.warmup_steps >= 0, "an integer >= 0")
        self._need("weight_decay", self.weight_decay >= 0, "a number >= 0")
        for name in ("adam_beta1", "adam_beta2"):
            self._need(name, 0 <= getattr(self, name) < 1, "a number in [0, 1)")
        self._need("adam_epsilon", self.adam_epsilon > 0, "a number > 0")
        self._need("max_grad_norm", self.max_grad_norm >= 0, "a number >= 0 (0 = no clipping)")
        samples = self.prompts_per_step * self.num_generations
        self._need("gradient_accumulation_steps", samples % self.gradient_accumulation_steps == 0,
                   f"a divisor of grpo.prompts_per_step * grpo.num_generations = {samples}")

    @property
    def samples_per_step(self) -> int:
        return self.prompts_per_step * self.num_generations


@dataclass
class RunConfig(_Section):
    """Task, data, outputs, reproducibility, logging, evaluation and devices of one run."""

    section: ClassVar[str] = "run"

    task: str = _f("sudoku", "task and reward functions (stp.tasks)", choices=("gsm8k", "math", "countdown",
                                                                                 "sudoku", "countdown_small"))
    prompt_format: str = _f("compact", "'chat': the task's chat prompt with d1's system prompt (the paper's); "
                            "'compact': one short user turn (stp.pretrain.compact_task), for the tiny model, whose "
                            "character tokenizer makes d1's prompt ~500 tokens", choices=("chat", "compact"))
    data_path: str | None = _f(None, "a local training data file (.jsonl, .json, .csv, .parquet); none = data_source")
    data_source: str | None = _f("generated", "where training and held-out data come from; none = 'file' with "
                                 "data_path, else the task's default (gsm8k, math, countdown: hub; sudoku: "
                                 "generated)", choices=DATA_SOURCES)
    train_examples: int | None = _f(None, "use only the first N training examples (generated tasks: how many to "
                                    "make); none = all / the generator's default")
    d1_compat: bool = _f(False, "use d1's published reward code, bugs included (to reproduce published numbers)")
    output_dir: str | None = _f(None, "run directory (metrics, checkpoints, summary); none = runs/<preset>")
    seed: int = _f(0, "seed of data order, rollout noise and masks (all derived from it explicitly)")
    resume: bool = _f(False, "continue from the last complete checkpoint in output_dir")
    save_every: int = _f(20, "checkpoint every N optimizer steps (0 = only at the end)")
    eval_every: int = _f(0, "held-out evaluation every N optimizer steps (0 = only before and after training)")
    eval_examples: int = _f(256, "held-out prompts per evaluation (0 = no evaluation)")
    log_every: int = _f(1, "write metrics every N optimizer steps")
    max_nan_steps: int = _f(3, "stop after this many consecutive non-finite losses (each skips its update)")
    device: str = _f("auto", "auto (accelerate's choice: CUDA when available), cpu, cuda or cuda:N")
    mixed_precision: str = _f("no", "autocast precision (accelerate's names)", choices=MIXED_PRECISION)
    backend: str | None = _f(None, "stp_kernels backend for every fused op; none = the fastest available")
    tensorboard: bool = _f(True, "with run.report_to tensorboard: write its events (false: metrics.jsonl only)")
    report_to: str = _f("tensorboard", "where metrics go besides metrics.jsonl, through accelerate's trackers "
                        "(wandb and mlflow need their package)", choices=REPORT_TO)
    reward: tuple[str, ...] = _f((), "your own reward functions, MODULE:FUNCTION (a module or a .py file; "
                                 "repeatable or comma-separated), TRL's form fn(completions, **columns) -> list; "
                                 "empty = the task's", factory=tuple)
    reward_weights: tuple[str, ...] = _f((), "one weight per run.reward function (comma-separated numbers); empty = "
                                         "all 1", factory=tuple)
    dataset: str | None = _f(None, "your own data with a 'prompt' column: a directory saved with save_to_disk, a "
                             ".json/.jsonl/.csv/.parquet file, a hub name, or reasoning_gym:NAME (its verifier is "
                             "the reward unless run.reward is given); none = the task's")
    dataset_split: str = _f("train", "the training split of run.dataset")
    eval_split: str | None = _f(None, "the held-out split of run.dataset; none = its training split's last "
                                "run.eval_examples rows (left out of training)")

    def __post_init__(self):
        self._coerce_all()
        self._need("seed", self.seed >= 0, "an integer >= 0")
        self._need("train_examples", self.train_examples is None or self.train_examples >= 1,
                   "an integer >= 1, or none")
        for name in ("save_every", "eval_every", "eval_examples"):
            self._need(name, getattr(self, name) >= 0, "an integer >= 0")
        self._positive("log_every", "max_nan_steps")
        self._need("device", re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps|xpu(:\d+)?", self.device) is not None,
                   "auto, cpu, cuda, cuda:N, mps, xpu or xpu:N")
        self.reward = tuple(x.strip() for v in self.reward for x in v.split(",") if x.strip())
        self.reward_weights = tuple(x.strip() for v in self.reward_weights for x in v.split(",") if x.strip())
        for spec in self.reward:
            module, sep, func = spec.rpartition(":")
            self._need("reward", bool(sep and module and func), "MODULE:FUNCTION entries (a module or a .py file, "
                       "then the function's name)")
        weights_ok = all(_is_number(w) for w in self.reward_weights)
        self._need("reward_weights", weights_ok and (not self.reward_weights or len(self.reward_weights) ==
                   max(1, len(self.reward))), f"{max(1, len(self.reward))} finite numbers, one per run.reward "
                   "function (or none)")
        self._need("dataset", self.dataset is None or self.data_path is None, "none while run.data_path is set "
                   "(one source of training data)")
        self._need("eval_split", self.eval_split is None or self.dataset is not None, "none without run.dataset")
        self._need("data_source", self.data_source != "file" or self.data_path is not None,
                   "'hub', 'generated' or none while run.data_path is none ('file' needs run.data_path)")
        self._need("prompt_format", self.prompt_format == "chat" or self.task in ("sudoku", "countdown",
                                                                                 "countdown_small"),
                   f"'chat' for task {self.task!r} (the compact prompt exists for sudoku, countdown and "
                   "countdown_small)")
        if self.data_source == "generated":
            from stp.tasks import TASKS
            from stp.tasks.base import Task

            have = [n for n, c in TASKS.items() if c.generate is not Task.generate]
            self._need("data_source", self.task in have, f"'file' or 'hub' for task {self.task!r} (only "
                       f"{', '.join(have)} have a generator)")


@dataclass
class DiffpoConfig(_Section):
    """DiFFPO (``stp.methods.diffpo``, docs/method.md section 8): the 2-MF surrogate with truncated importance
    weights, the entropy-bounded sampler and its learned threshold controller."""

    section: ClassVar[str] = "diffpo"

    mode: str = _f("joint", "what is trained: model (the policy, fixed gamma), sampler (the threshold controller "
                   "only), joint (both)", choices=DIFFPO_MODES)
    sampler: str = _f("eb", "rollout sampler: eb (entropy-bounded, threshold gamma) or schedule (LLaDA's fixed "
                      "steps; mode model only)", choices=DIFFPO_SAMPLERS)
    gamma: float = _f(1.0, "entropy bound of the EB sampler in mode model, and the controller's initial median "
                      "gamma otherwise (> 0)")
    gamma_sigma: float = _f(0.5, "initial standard deviation of the controller's log gamma (> 0)")
    controller_width: int = _f(64, "hidden width of the controller head on the pooled prompt hidden state")
    controller_lr: float = _f(1e-2, "AdamW learning rate of the controller (its own parameter group, no weight "
                              "decay, the run's schedule)")
    nfe_penalty: float = _f(0.1, "lambda: the reward adds -lambda * NFE / NFE_max (NFE_max = rollout.gen_length "
                            "with eb, rollout.steps + 1 with schedule); 0 = off")
    tau_sampling: str = _f("uniform", "split time tau of the 2-MF surrogate: uniform in [0, T) per sample and inner "
                           "iteration, or zero (every token under the fully masked context: d1 without prompt "
                           "masking)", choices=DIFFPO_TAUS)
    importance_weights: bool = _f(True, "multiply each token's term by min(C, pi_old_surrogate / pi_behaviour) "
                                  "(detached); false = weights 1")
    importance_cap: float = _f(2.0, "C, the truncation of the importance weights (>= 1; the paper states none)")
    normalize: str = _f("sequence", "sequence: 1/|o| per completion, then the mean over completions (the paper's); "
                        "token: one mean over every token of the batch (GRPO's, d1's)", choices=("sequence", "token"))

    def __post_init__(self):
        self._coerce_all()
        self._need("gamma", math.isfinite(self.gamma) and self.gamma > 0, "a finite number > 0")
        self._need("gamma_sigma", math.isfinite(self.gamma_sigma) and self.gamma_sigma > 0, "a finite number > 0")
        self._positive("controller_width")
        self._need("controller_lr", 0 < self.controller_lr < 1, "a number in (0, 1)")
        self._need("nfe_penalty", math.isfinite(self.nfe_penalty) and self.nfe_penalty >= 0, "a number >= 0")
        self._need("importance_cap", math.isfinite(self.importance_cap) and self.importance_cap >= 1,
                   "a finite number >= 1")
        self._need("sampler", self.sampler == "eb" or self.mode == "model",
                   f"'eb' with diffpo.mode={self.mode!r} (the controller sets the EB sampler's threshold)")


def _is_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


@dataclass
class DTRPOConfig(_Section):
    """dTRPO (``stp.trajectory_ratio``, docs/method.md 7): trajectory log-ratios from one drawn step per block, in a
    DPO objective over offline pairs (method dtrpo) or inside the GRPO loss (method dtrpo-online)."""

    section: ClassVar[str] = "dtrpo"

    mode: str = _f("exact", "how the drawn states are evaluated: exact (one sequence per block state) or packed (one "
                   "[prompt ; noisy ; clean] sequence with a block-diffusion mask: only for a model declaring "
                   "block-causal attention; refused for LLaDA, Dream and the tiny model, where it is biased)",
                   choices=TRAJECTORY_MODES)
    block_mean: bool = _f(False, "weight each block's drawn step by 1 (the block mean) instead of T_B (the unbiased "
                          "trajectory sum): the trajectory log-ratio divided by T_B")
    temperature: float | None = _f(None, "temperature the log-probs are scored at; none = the sampling temperature "
                                   "(rollout.temperature, recorded in the pairs file), so the ratio is the sampling "
                                   "policy's")
    beta: float = _f(0.1, "DPO inverse temperature: loss = -log sigmoid(beta * (Delta_chosen - Delta_rejected))")
    length_normalize: bool = _f(False, "divide each trajectory log-ratio by its completion's real length (tokens "
                                "through the first EOS)")
    pairs_path: str | None = _f(None, "JSONL of `python -m stp.pairs`; built there first with the base model when "
                                "prompts are missing; none = <run.output_dir>/pairs.jsonl; 'cache' = a file named "
                                "by the pair settings in the stp cache ($STP_CACHE_DIR/pairs, like pretrained "
                                "checkpoints)")
    pair_prompts: int | None = _f(None, "build pairs for the first N distinct prompts of the run only (the pairs "
                                  "are then revisited in shuffled epochs); none = every prompt the run would see")
    build_batch_size: int = _f(4, "prompts per batch when building pairs (grpo.num_generations samples each)")

    def __post_init__(self):
        self._coerce_all()
        self._need("beta", self.beta > 0, "a number > 0")
        self._need("temperature", self.temperature is None or self.temperature > 0, "a number > 0, or none")
        self._need("pair_prompts", self.pair_prompts is None or self.pair_prompts >= 1, "an integer >= 1, or none")
        self._positive("build_batch_size")


SECTIONS: dict[str, type[_Section]] = {c.section: c for c in (ModelConfig, RolloutConfig, PriorConfig, EstimatorConfig,
                                                               GRPOConfig, RunConfig, DiffpoConfig,
                                                               DTRPOConfig)}


@dataclass
class TrainConfig:
    """Everything one training run reads. ``preset`` records the preset the values were layered on."""

    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": ModelConfig.__doc__})
    rollout: RolloutConfig = field(default_factory=RolloutConfig, metadata={"help": RolloutConfig.__doc__})
    prior: PriorConfig = field(default_factory=PriorConfig, metadata={"help": PriorConfig.__doc__})
    estimator: EstimatorConfig = field(default_factory=EstimatorConfig, metadata={"help": EstimatorConfig.__doc__})
    grpo: GRPOConfig = field(default_factory=GRPOConfig, metadata={"help": GRPOConfig.__doc__})
    run: RunConfig = field(default_factory=RunConfig, metadata={"help": RunConfig.__doc__})
    diffpo: DiffpoConfig = field(default_factory=DiffpoConfig, metadata={"help": DiffpoConfig.__doc__})
    dtrpo: DTRPOConfig = field(default_factory=DTRPOConfig, metadata={"help": DTRPOConfig.__doc__})
    preset: str = field(default=DEFAULT_PRESET, metadata={"help": "the preset the values were layered on"})
    method: str = field(default=DEFAULT_METHOD, metadata={"help": "the RL method (stp.methods)"})

    def __post_init__(self):
        for name, cls in SECTIONS.items():
            value = getattr(self, name)
            if isinstance(value, Mapping):
                setattr(self, name, _section_from_mapping(cls, value))
            elif not isinstance(value, cls):
                raise ConfigError.bad_value(name, value, f"a {cls.__name__} or a mapping of its fields")
        self._check()

    def validate(self) -> TrainConfig:
        """Check every section and rule again (after fields were changed in place); returns self."""
        for name in SECTIONS:
            getattr(self, name).__post_init__()
        self._check()
        return self

    def _check(self) -> None:
        """Rules across sections."""
        if self.preset not in PRESETS:
            raise ConfigError.bad_value("preset", self.preset, "one of " + ", ".join(PRESETS))
        if self.run.output_dir is None:
            self.run.output_dir = str(Path("runs") / self.preset)
        methods = _methods()
        if self.method not in methods:
            raise ConfigError.bad_value("method", self.method, "one of " + ", ".join(map(repr, methods)))
        method = methods[self.method]
        # Settings this method does not read take their defaults (so equal runs compare equal).
        visible, hidden = visible_fields(self.method), _hidden_defaults(self.method)
        for name, cls in SECTIONS.items():
            section = getattr(self, name)
            fresh = cls(**hidden.get(name, {}))
            for f in dataclasses.fields(cls):
                if f.name not in visible[name]:
                    setattr(section, f.name, getattr(fresh, f.name))
        est, prior, rollout = self.estimator, self.prior, self.rollout
        if prior.enabled and not method.rollout.anchors:
            takers = ", ".join(repr(n) for n, m in methods.items() if m.rollout.anchors)
            raise ConfigError.bad_value("prior.enabled", True, f"false with method {self.method!r} (only the {takers} "
                                        "estimator takes anchors)")
        if est.score == "elbo" and (self.method == "d1" or est.mask_scheme != "random_count"):
            raise ConfigError.bad_value("estimator.score", "elbo", "'all' or 'masked' unless the method is 'stp' or "
                                        "'elbo' with estimator.mask_scheme 'random_count' (the l/n weights assume "
                                        "random-count masks)")
        if prior.enabled and est.score == "elbo":
            raise ConfigError.bad_value("estimator.score", "elbo", "'all' or 'masked' while prior.enabled is true "
                                        "(the anchor-aware 'elbo' weights explode at high anchor fractions: "
                                        "benchmarks/RESULTS.md)")
        block = prior.build_block_length or rollout.block_length
        if rollout.gen_length % block:
            raise ConfigError.bad_value("prior.build_block_length", prior.build_block_length,
                                        f"a divisor of rollout.gen_length={rollout.gen_length}, or none")
        blocks = rollout.gen_length // block
        if (prior.build_steps or rollout.gen_length) % blocks:
            raise ConfigError.bad_value("prior.build_steps", prior.build_steps, f"a multiple of the number of prior "
                                        f"blocks ({blocks} = rollout.gen_length / block length), or none")
        if self.grpo.beta > 0 and not self.model.use_lora:
            raise ConfigError.bad_value("grpo.beta", self.grpo.beta, "0 while model.use_lora is false (the KL "
                                        "reference is the base model with the LoRA adapter disabled)")
        method.check(self)

    @property
    def prior_path(self) -> str | None:
        """The prior file of this run (None when priors are off)."""
        if not self.prior.enabled:
            return None
        return self.prior.path or str(Path(self.run.output_dir or ".") / "priors.jsonl")

    @property
    def dtrpo_pairs_path(self) -> str:
        """The dTRPO pairs file of this run: ``dtrpo.pairs_path``; none = <run.output_dir>/pairs.jsonl; 'cache' = a
        file named by the pair settings under ``$STP_CACHE_DIR/pairs`` (else ``$XDG_CACHE_HOME/stp/pairs``, else
        ``~/.cache/stp/pairs``), shared by every run with those settings."""
        if self.dtrpo.pairs_path is None:
            return str(Path(self.run.output_dir or ".") / "pairs.jsonl")
        if self.dtrpo.pairs_path != "cache":
            return self.dtrpo.pairs_path
        import hashlib
        import json
        import os

        r = self.rollout
        key = json.dumps([self.model.name_or_path, self.run.task, self.run.prompt_format, self.run.data_source,
                          self.run.data_path, self.run.train_examples, r.gen_length, r.block_length, r.steps,
                          r.temperature, r.remasking, self.grpo.num_generations, self.run.seed])
        if os.environ.get("STP_CACHE_DIR"):
            root = Path(os.environ["STP_CACHE_DIR"]).expanduser()
        else:
            base = os.environ.get("XDG_CACHE_HOME")
            root = (Path(base).expanduser() if base else Path.home() / ".cache") / "stp"
        return str(root / "pairs" / f"{self.run.task}-{hashlib.sha256(key.encode()).hexdigest()[:12]}.jsonl")

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (YAML/JSON-ready) of the settings this method reads; ``TrainConfig.from_dict(
        c.to_dict()) == c``."""
        visible = visible_fields(self.method)
        out: dict[str, Any] = {"preset": self.preset, "method": self.method}
        for name in SECTIONS:
            if visible[name]:
                out[name] = {k: v for k, v in getattr(self, name).to_dict().items() if k in visible[name]}
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, origin: str | None = None) -> TrainConfig:
        """From ``to_dict``'s form. Missing fields take the dataclass defaults (NOT the preset's: use ``resolve``
        for layering); unknown keys are errors naming the key and the allowed ones."""
        _check_keys(data, origin, method=DEFAULT_METHOD)
        method = data.get("method", DEFAULT_METHOD)
        try:
            sections = {name: _section_from_mapping(c, {**_hidden_defaults(method).get(name, {}),
                                                        **(data.get(name) or {})})
                        for name, c in SECTIONS.items()}
            return cls(preset=data.get("preset", DEFAULT_PRESET), method=method, **sections)
        except ConfigError as e:
            raise e.located(origin) from None

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False)

    def check_environment(self) -> None:
        """Checks that depend on this machine (files exist, CUDA, bitsandbytes); call before loading the model."""
        if self.run.data_path is not None and not Path(self.run.data_path).expanduser().is_file():
            raise ConfigError.bad_value("run.data_path", self.run.data_path, "an existing data file")
        if self.model.load_in_4bit or self.run.device.startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                if self.model.load_in_4bit:
                    raise ConfigError.bad_value("model.load_in_4bit", True, "false (no CUDA device here)")
                raise ConfigError.bad_value("run.device", self.run.device, "auto or cpu (no CUDA device here)")
        if self.model.load_in_4bit:
            import importlib.util

            if importlib.util.find_spec("bitsandbytes") is None:
                raise ConfigError.bad_value("model.load_in_4bit", True, "false (bitsandbytes is not installed)")
        if self.run.report_to in ("wandb", "mlflow", "tensorboard") and (self.run.tensorboard or
                                                                        self.run.report_to != "tensorboard"):
            import importlib.util

            if importlib.util.find_spec(self.run.report_to) is None:
                raise ConfigError.bad_value("run.report_to", self.run.report_to, f"a tracker whose package is "
                                            f"installed ({self.run.report_to} is not), or none")
        out = Path(self.run.output_dir or ".").expanduser()
        if out.exists() and not out.is_dir():
            raise ConfigError.bad_value("run.output_dir", self.run.output_dir, "a directory path (this is a file)")


# ------------------------------------------------------------------------------------------- method-owned settings


def _methods() -> dict:
    """The registered methods (``stp.methods``; importing it does not import torch)."""
    from stp.methods import METHODS

    return METHODS


def visible_fields(method: str) -> dict[str, tuple[str, ...]]:
    """{section: field names} the command line, YAML files and ``to_dict`` show for ``method``: every field of the
    shared sections, and of a method-owned section (one some method lists in its ``settings``) only the fields this
    method lists."""
    methods = _methods()
    owned = {sec for m in methods.values() for sec in m.settings}
    mine = methods[method].settings if method in methods else {}
    out = {}
    for name, cls in SECTIONS.items():
        names = tuple(f.name for f in dataclasses.fields(cls))
        if name in owned:
            names = tuple(n for n in names if name in mine and (mine[name] is None or n in mine[name]))
        out[name] = names
    return out


def _hidden_defaults(method: str) -> dict[str, dict[str, Any]]:
    """Values a method without anchors fixes for the prior section it does not show."""
    methods = _methods()
    if method in methods and not methods[method].rollout.anchors:
        return {"prior": {"enabled": False}}
    return {}


def _check_owned(dotted: str, value: Any, method: str, origin: str | None) -> None:
    """A setting given for a method that does not read it is an error naming the methods that do."""
    section, _, key = dotted.partition(".")
    if section not in SECTIONS or method not in _methods() or key in visible_fields(method)[section]:
        return
    owners = [n for n in _methods() if key in visible_fields(n)[section]]
    raise ConfigError(f"{dotted} is a setting of method {' / '.join(map(repr, owners))} only; this run's method is "
                      f"{method!r}", field=dotted, value=value, allowed=f"--method {owners[0]}" if owners else "none",
                      origin=origin)


def _section_from_mapping(cls: type[_Section], data: Mapping[str, Any]) -> _Section:
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            raise ConfigError(f"unknown key {cls.section}.{key}; allowed keys in {cls.section}: "
                              f"{', '.join(sorted(names))}", field=f"{cls.section}.{key}", value=data[key],
                              allowed=", ".join(sorted(names)))
    return cls(**data)


def _check_keys(data: Any, origin: str | None, lines: Mapping[str, int] | None = None,
                path: str | None = None, method: str | None = None) -> None:
    """Unknown sections or fields are errors naming the key (with its line) and the allowed keys."""
    def where(key: str) -> str | None:
        if lines is not None and key in lines:
            return f"{path}, line {lines[key]}"
        return origin

    if not isinstance(data, Mapping):
        raise ConfigError(f"the configuration must be a mapping of sections, got {type(data).__name__}",
                          origin=origin)
    top = ["preset", *SECTIONS, "method"]
    method = data.get("method", method)
    for key, value in data.items():
        if key not in top:
            raise ConfigError(f"unknown key {key!r}; allowed top-level keys: {', '.join(top)}", field=str(key),
                              value=value, allowed=", ".join(top), origin=where(str(key)))
        if key in ("preset", "method"):
            continue
        if value is not None and not isinstance(value, Mapping):
            raise ConfigError.bad_value(key, value, f"a mapping of {key} fields", origin=where(key))
        names = [f.name for f in dataclasses.fields(SECTIONS[key])]
        for sub in value or {}:
            if sub not in names:
                raise ConfigError(f"unknown key {key}.{sub}; allowed keys in {key}: {', '.join(names)}",
                                  field=f"{key}.{sub}", value=value[sub], allowed=", ".join(names),
                                  origin=where(f"{key}.{sub}"))
            if method is not None:
                _check_owned(f"{key}.{sub}", value[sub], method, where(f"{key}.{sub}"))


# ------------------------------------------------------------------------------------------------------- presets


@dataclass(frozen=True)
class Preset:
    """A named set of overrides on the dataclass defaults: {section: {field: value}}. ``notes``: how it deviates
    from the preset it is derived from (baselines) and why."""

    name: str
    description: str
    overrides: Mapping[str, Mapping[str, Any]]
    notes: tuple[str, ...] = ()
    method: str = DEFAULT_METHOD


def _merge(base: Mapping[str, Mapping[str, Any]], extra: Mapping[str, Mapping[str, Any]]) -> dict[str, dict]:
    out = {k: dict(v) for k, v in base.items()}
    for k, v in extra.items():
        out.setdefault(k, {}).update(v)
    return out


# docs/method.md section 4 (and 1, 2, 3): the paper's STP settings for LLaDA-8B-Instruct.
_PAPER = {
    "model": {"name_or_path": LLADA, "dtype": "bfloat16", "use_lora": True, "lora_r": 128, "lora_alpha": 64,
              "lora_dropout": 0.05, "lora_target_modules": LORA_TARGETS_ALL},
    "rollout": {"gen_length": 256, "block_length": 32, "steps": 128, "temperature": 0.9, "early_stop": 0.95,
                "max_prompt_length": 200},
    "prior": {"enabled": True, "rho": 0.95, "strategy": "answer_low_confidence", "build_steps": 256,
              "build_temperature": 0.9},
    "estimator": {"score": "all", "num_draws": 3},
    "grpo": {"num_generations": 6, "prompts_per_step": 2, "num_iterations": 4, "epsilon": 0.2, "beta": 0.04,
             "scale_rewards": True, "learning_rate": 3e-6, "lr_scheduler_type": "constant_with_warmup",
             # The paper gives no warmup length: 10 steps chosen here.
             "warmup_steps": 10, "weight_decay": 0.1, "adam_beta1": 0.9, "adam_beta2": 0.99, "max_grad_norm": 0.2,
             "max_steps": 6000},
    "run": {"data_source": None, "mixed_precision": "bf16", "save_every": 100, "eval_every": 500,
            "eval_examples": 256, "prompt_format": "chat"},
}
# Per task: rho 0.95 (GSM8K, Countdown), 0.85 (MATH); 6000 steps (GSM8K, Countdown), 4000 (MATH). The paper states
# neither for Sudoku: GSM8K's values are used. d1's inner iterations: 12 (GSM8K, MATH), 8 (Countdown, Sudoku).
_TASKS = {"gsm8k": {"rho": 0.95, "max_steps": 6000, "d1_mu": 12},
          "math": {"rho": 0.85, "max_steps": 4000, "d1_mu": 12},
          "countdown": {"rho": 0.95, "max_steps": 6000, "d1_mu": 8},
          "sudoku": {"rho": 0.95, "max_steps": 6000, "d1_mu": 8}}

_TINY_DESCRIPTION = ("the default: the embedded tiny model (~0.9 M parameters, char-level), pretrained by "
                     "stp.pretrain, on procedurally generated 4x4 Sudoku, sized for a 2-core CPU")


# The methods' comparison (benchmarks/methods.py): a task on which RL improves answers within CPU minutes.
_COMPARE_DESCRIPTION = ("the methods' comparison: the tiny Sudoku model pretrained on a corpus whose answers are 60 % "
                        "a relabelled (wrong) grid (pretrained:sudoku_relabel), where RL raises greedy held-out "
                        "accuracy within CPU minutes")
_COMPARE_OVERRIDES = {
    "model": {"name_or_path": "pretrained:sudoku_relabel"},
    "grpo": {"max_steps": 30, "learning_rate": 2e-3},
    "run": {"task": "sudoku", "eval_examples": 256},
}
_COMPARE_NOTES = (
    "the starting checkpoint is stp.pretrain's sudoku_relabel one (format_noise 0, relabel_noise 0.6: 60 % of the "
    "SFT answers are the solution relabelled d -> d % 4 + 1, a valid but wrong grid): greedily it writes the wrong "
    "grid, at the rollout temperature the right one often (the best of 8 samples far above greedy accuracy: "
    "benchmarks/RESULTS.md), so RL has right answers to reinforce; accuracy is Sudoku's metric, the fraction of "
    "empty cells filled right",
    "lr 2e-3, 30 steps (at 60, greedy accuracy fell back from its step-30 level: benchmarks/RESULTS.md), 256 "
    "held-out puzzles; everything else (L 32 / block 32 / 16 steps, G 8 x 4 prompts, mu 2, "
    "K 2, the paper's algorithm knobs) as tiny. The earlier design (countdown_small, benchmarks/RESULTS.md) gave "
    "RL no gain",
)


def _d1_of(stp: Preset, name: str, mu: int) -> Preset:
    overrides = _merge(stp.overrides, {
        "estimator": {"num_draws": 1, "score": "all"},
        "rollout": {"early_stop": None, "cache": "none"},
        "grpo": {"epsilon": 0.5, "num_iterations": mu, "scale_rewards": False},
    })
    overrides["prior"] = {**overrides.get("prior", {}), "enabled": False}  # hidden: d1 shows no prior settings
    return Preset(name, f"d1 (diffu-GRPO) baseline of {stp.name}", overrides, method="d1", notes=(
        "method d1 with num_draws 1: d1's one-draw estimator (completion fully masked, prompt masked with p 0.15)",
        "prior disabled: d1 has no spatial pruning (and its estimator takes no anchors)",
        "rollout.early_stop none: d1 decodes every step (no temporal pruning)",
        "rollout.cache none: d1's rollouts run the whole sequence every step (no KV cache)",
        f"grpo.epsilon 0.5, grpo.num_iterations {mu}, grpo.scale_rewards false: d1's published settings",
        "everything else (model, LoRA, data, rewards, lr, beta, G, prompts per step, steps) as the STP preset, so "
        "only the method differs",
    ))


def _elbo_of(stp: Preset, name: str) -> Preset:
    overrides = _merge(stp.overrides, {"rollout": {"early_stop": None}, "prior": {"enabled": False}})
    return Preset(name, f"GRPO-with-ELBO baseline of {stp.name} (no anchors, no early stop)", overrides,
                  method="elbo", notes=(
        "method elbo, no prior: the same K-draw estimator without anchors (the paper's main baseline)",
        "rollout.early_stop none: no temporal pruning",
        "score stays 'all' and everything else as the STP preset, so the difference is exactly the two prunings",
    ))


def _diffpo_of(stp: Preset, name: str, diffpo: Mapping[str, Any], description: str) -> Preset:
    overrides = _merge(stp.overrides, {"rollout": {"early_stop": None}, "diffpo": dict(diffpo)})
    overrides["prior"] = {**overrides.get("prior", {}), "enabled": False}  # hidden: diffpo shows no prior settings
    overrides["estimator"] = {k: v for k, v in overrides.get("estimator", {}).items() if k == "memory_budget"}
    return Preset(name, description, overrides, method="diffpo", notes=(
        "method diffpo (docs/method.md section 8): the 2-MF surrogate with truncated importance weights (C 2), "
        "1/|o| per completion, rollouts with the entropy-bounded sampler (rollout.steps unused), its threshold "
        "learned per prompt jointly with the model",
        "prior disabled and rollout.early_stop none: DiFFPO has neither pruning (both remain options)",
        "diffpo.gamma is the controller's initial median threshold and diffpo.nfe_penalty the lambda of "
        "-lambda * NFE / NFE_max in the reward: our choices, the paper's are not known",
        f"everything else (model, LoRA, data, rewards, lr, beta, G, prompts per step, mu, steps) as {stp.name}",
    ))


def _build_presets() -> dict[str, Preset]:
    tiny = Preset("tiny", _TINY_DESCRIPTION, {}, notes=(
        "the dataclass defaults are exactly this preset",
        "the starting checkpoint is stp.pretrain's (4x4 Sudoku, compact prompt; its SFT corpus writes 60 % of the "
        "answers without the <answer> tags the reward reads, so its greedy held-out reward is 0.000; RL teaches "
        "the tagged format, after which the answers fill 0.53-0.56 of the empty cells right: README); "
        "sizes cut for 2 CPU cores (G 8, 4 prompts/step, mu 2, K 2, L 32 / block 32 / 16 steps as pretrained, "
        "60 steps, 256 held-out puzzles); "
        "algorithm knobs as the paper (eps 0.2, beta 0.04, T 0.9, tau 0.95, rho 0.95, AdamW (0.9, 0.99) wd 0.1, "
        "clip 0.2); lr 5e-4 and LoRA r 16 / alpha 32 / dropout 0 for a model 10^4 times smaller",
        "rollout.cache none: decoded with a block KV cache (prefix or dual), the trained checkpoint's greedy held-out "
        "reward falls by 0.028, 2.2 standard errors, at this shape (benchmarks/RESULTS.md), so the default keeps "
        "uncached rollouts",
    ))
    # d1 keeps its inner iterations at 2x the STP preset's for Countdown (8 vs 4): the same ratio on tiny (4 vs 2).
    presets = {"tiny": tiny, "d1-tiny": _d1_of(tiny, "d1-tiny", 2 * GRPOConfig.num_iterations),
               "elbo-tiny": _elbo_of(tiny, "elbo-tiny"),
               "diffpo-tiny": _diffpo_of(tiny, "diffpo-tiny", {"mode": "joint", "gamma": 0.5, "nfe_penalty": 0.2},
                                         "DiFFPO (joint: model and threshold) on the tiny Sudoku model, a few CPU "
                                         "minutes")}
    compare = Preset("compare-tiny", _COMPARE_DESCRIPTION, _COMPARE_OVERRIDES, notes=_COMPARE_NOTES)
    presets.update({"compare-tiny": compare, "d1-compare-tiny": _d1_of(compare, "d1-compare-tiny",
                                                                       2 * GRPOConfig.num_iterations),
                    "elbo-compare-tiny": _elbo_of(compare, "elbo-compare-tiny"),
                    "diffpo-compare-tiny": _diffpo_of(compare, "diffpo-compare-tiny",
                                                      {"mode": "joint", "gamma": 0.5, "nfe_penalty": 0.2},
                                                      "DiFFPO (joint) in the methods' comparison (as diffpo-tiny)")})
    for task, t in _TASKS.items():
        stp = Preset(f"llada-{task}", f"STP on LLaDA-8B-Instruct, {task} (the paper's settings)", _merge(_PAPER, {
            "prior": {"rho": t["rho"]},
            "grpo": {"max_steps": t["max_steps"]},
            "run": {"task": task},
        }))
        presets[stp.name] = stp
    for task, t in _TASKS.items():
        presets[f"d1-{task}"] = _d1_of(presets[f"llada-{task}"], f"d1-{task}", t["d1_mu"])
    for task in _TASKS:
        presets[f"elbo-{task}"] = _elbo_of(presets[f"llada-{task}"], f"elbo-{task}")
    for task in ("gsm8k", "countdown"):
        presets[f"diffpo-llada-{task}"] = _diffpo_of(presets[f"llada-{task}"], f"diffpo-llada-{task}",
                                                     {"mode": "joint", "gamma": 0.5, "nfe_penalty": 0.1},
                                                     f"DiFFPO (joint) on LLaDA-8B-Instruct, {task} (GPU)")
    presets.update(_dtrpo_presets())
    return presets


def _dtrpo_presets() -> dict[str, Preset]:
    """dTRPO offline (docs/method.md 7): the paper states no hyperparameters, so every value here is ours."""
    tiny = Preset("dtrpo-tiny", "dTRPO offline on the tiny Sudoku model: pairs of 64 prompts x G 8 built on first "
                  "use (cached), DPO beta 0.1, 60 steps of 4 pairs", {
                      "rollout": {"early_stop": None},
                      "grpo": {"num_iterations": 1, "prompts_per_step": 4, "num_generations": 8},
                      "dtrpo": {"pairs_path": "cache", "pair_prompts": 64, "beta": 0.1},
                  }, method="dtrpo", notes=(
        "model, decoding (L 32 / block 32 / 16 steps: one block of T_B = 16), lr, LoRA and held-out set as 'tiny'",
        "pairs: best vs worst of G = 8 samples (T 0.9) of the pretrained model for 64 training prompts, cached by "
        "settings under $STP_CACHE_DIR/pairs (like the pretrained checkpoint), revisited in shuffled epochs",
        "no early stop (the pairs are decoded without it); mu 1: one optimizer step per batch of pairs",
    ))
    compare = Preset("dtrpo-compare-tiny", "dTRPO offline in the methods' comparison: compare-tiny's checkpoint, "
                     "task, lr and steps with dtrpo-tiny's pairs and step", _merge(_COMPARE_OVERRIDES, tiny.overrides),
                     method="dtrpo", notes=(
        "as dtrpo-tiny (pairs of 64 prompts x G 8 of the starting checkpoint, built on first use and cached; DPO "
        "beta 0.1; 4 pairs per step, mu 1, no early stop) on compare-tiny's checkpoint and task, lr 2e-3, 30 steps",
    ))
    out = {tiny.name: tiny, compare.name: compare}
    for task in ("gsm8k", "math"):
        base = {k: v for k, v in _PAPER.items() if k not in ("prior", "estimator")}
        overrides = _merge(base, {
            "rollout": {"early_stop": None},
            "grpo": {"num_iterations": 1, "prompts_per_step": 8, "num_generations": 8, "learning_rate": 5e-7,
                     "max_steps": 2000, "beta": 0.0},
            "run": {"task": task, "eval_every": 250},
            "dtrpo": {"beta": 0.1, "mode": "exact"},
        })
        out[f"dtrpo-llada-{task}"] = Preset(
            f"dtrpo-llada-{task}", f"dTRPO offline on LLaDA-8B-Instruct, {task} (GPU recipe; values ours)", overrides,
            method="dtrpo", notes=(
                "decoding and LoRA as the STP paper's LLaDA setting (L 256 / block 32 / 128 steps: 8 blocks of "
                "T_B = 16, T 0.9), no early stop",
                "pairs: best vs worst of G = 8 samples for every training prompt (16000 pair visits cover the "
                "~7500 training prompts of GSM8K or MATH), 8 pairs per step, 2000 steps; DPO beta 0.1 and lr 5e-7 "
                "are common DPO values, not the paper's (it states none)",
            ))
    return out


PRESETS: dict[str, Preset] = _build_presets()


def presets_table() -> str:
    """Markdown table of the presets (for the README)."""
    cols = ["preset", "model", "task", "method", "anchors (rho)", "tau", "G x prompts", "mu", "eps", "beta",
            "std adv.", "K", "lr", "L / block / steps", "steps", "LoRA r / alpha"]
    rows = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for name in PRESETS:
        c = resolve(preset=name)
        m, r, g = c.model, c.rollout, c.grpo
        rows.append("| " + " | ".join([
            f"`{name}`", m.name_or_path, c.run.task, c.method,
            f"yes ({c.prior.rho:g})" if c.prior.enabled else "no",
            "off" if r.early_stop is None else f"{r.early_stop:g}", f"{g.num_generations} x {g.prompts_per_step}",
            str(g.num_iterations), f"{g.epsilon:g}", f"{g.beta:g}", "yes" if g.scale_rewards else "no",
            str(c.estimator.num_draws), f"{g.learning_rate:g}", f"{r.gen_length} / {r.block_length} / {r.steps}",
            str(g.max_steps), f"{m.lora_r} / {m.lora_alpha}" if m.use_lora else "full",
        ]) + " |")
    return "\n".join(rows) + "\n"


# ------------------------------------------------------------------------------------------------ layering, YAML


def load_yaml(path: str | Path) -> tuple[dict[str, Any], dict[str, int]]:
    """A YAML config file -> (nested dict, {"section.field" or "section": 1-based line}). Syntax errors and
    duplicate keys are ConfigErrors naming the file and line."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read config file {str(path)!r}: {e.strerror or e}", field="--config",
                          value=str(path), allowed="a readable YAML file") from None
    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
        if root is None:
            return {}, {}
        if not isinstance(root, yaml.MappingNode):
            raise ConfigError("the configuration must be a mapping of sections", field="--config", value=str(path),
                              origin=f"{path}, line {root.start_mark.line + 1}")
        lines: dict[str, int] = {}

        def mapping(node: yaml.MappingNode, prefix: str) -> dict[str, Any]:
            out: dict[str, Any] = {}
            for key_node, value_node in node.value:
                key = str(loader.construct_object(key_node, deep=True))
                dotted = prefix + key
                if key in out:
                    raise ConfigError(f"duplicate key {dotted} (first on line {lines[dotted]})", field=dotted,
                                      origin=f"{path}, line {key_node.start_mark.line + 1}")
                lines[dotted] = key_node.start_mark.line + 1
                if not prefix and isinstance(value_node, yaml.MappingNode):
                    out[key] = mapping(value_node, dotted + ".")
                else:
                    out[key] = loader.construct_object(value_node, deep=True)
            return out

        return mapping(root, ""), lines
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = f", line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"invalid YAML: {e.problem or e.context}", field="--config", value=str(path),
                          origin=f"{path}{line}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"invalid YAML: {e}", field="--config", value=str(path), origin=str(path)) from None
    finally:
        loader.dispose()


def _layers(preset: str | None, config_file: str | Path | None, overrides: Mapping[str, Any] | None = None,
            override_origin: str = "command line --{}", method: str | None = None,
            ) -> tuple[str, dict[str, dict], dict[str, str]]:
    """Preset < YAML < overrides, unvalidated: (preset name, {section: {field: raw value}}, {dotted: origin}); the
    method (``method`` < YAML's ``method`` key < the preset's) is in ``values["method"]``."""
    values: dict[str, Any] = {name: {} for name in SECTIONS}
    origins: dict[str, str] = {}
    data, lines = ({}, {}) if config_file is None else load_yaml(config_file)
    if config_file is not None:
        _check_keys(data, str(config_file), lines, str(config_file))
    name = preset
    name_origin = "command line --preset"
    if name is None and "preset" in data:
        name, name_origin = data["preset"], f"{config_file}, line {lines['preset']}"
    name = DEFAULT_PRESET if name is None else name
    if not isinstance(name, str) or name not in PRESETS:
        raise ConfigError.bad_value("preset", name, "one of " + ", ".join(PRESETS), origin=name_origin)
    method_origin = "command line --method"
    if method is None and "method" in data:
        method, method_origin = data["method"], f"{config_file}, line {lines['method']}"
    if method is None:
        method, method_origin = PRESETS[name].method, f"preset {name!r}"
    if not isinstance(method, str) or method not in _methods():
        raise ConfigError.bad_value("method", method, "one of " + ", ".join(map(repr, _methods())),
                                    origin=method_origin)
    values["method"] = method
    for section, fields_ in _hidden_defaults(method).items():
        values[section].update(fields_)
    for section, fields_ in PRESETS[name].overrides.items():
        for key, value in fields_.items():
            values[section][key] = value
            origins[f"{section}.{key}"] = f"preset {name!r}"
    for section, fields_ in data.items():
        if section in ("preset", "method"):
            continue
        for key, value in (fields_ or {}).items():
            _check_owned(f"{section}.{key}", value, method, f"{config_file}, line {lines[f'{section}.{key}']}")
            values[section][key] = value
            origins[f"{section}.{key}"] = f"{config_file}, line {lines[f'{section}.{key}']}"
    for dotted, value in (overrides or {}).items():
        section, _, key = dotted.partition(".")
        if section not in SECTIONS or key not in {f.name for f in dataclasses.fields(SECTIONS[section])}:
            raise ConfigError(f"unknown setting {dotted}", field=dotted, value=value, allowed="section.field names "
                              "of " + ", ".join(SECTIONS), origin=override_origin.format(dotted))
        _check_owned(dotted, value, method, override_origin.format(dotted))
        values[section][key] = value
        origins[dotted] = override_origin.format(dotted)
    return name, values, origins


def _build(name: str, values: Mapping[str, Any], origins: Mapping[str, str]) -> TrainConfig:
    sections = {}
    try:
        for section, cls in SECTIONS.items():
            sections[section] = cls(**values[section])
        return TrainConfig(preset=name, method=values["method"], **sections)
    except ConfigError as e:
        raise e.located(origins.get(e.field or "")) from None


def resolve(preset: str | None = None, config_file: str | Path | None = None,
            overrides: Mapping[str, Any] | None = None, method: str | None = None) -> TrainConfig:
    """The validated config: dataclass defaults < ``preset`` (default: the YAML's ``preset`` key, else "tiny") <
    ``config_file`` < ``overrides`` ({"grpo.beta": 0.0, ...}; strings are parsed as on the command line). The
    method: ``method``, else the YAML's ``method`` key, else the preset's."""
    name, values, origins = _layers(preset, config_file, overrides, override_origin="override {}", method=method)
    return _build(name, values, origins)


# ----------------------------------------------------------------------------------------------------------- CLI


def _dest(section: str, name: str) -> str:
    return f"{section}.{name}"


def _show(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(value)
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def build_parser(defaults: Mapping[str, Any] | None = None, origins: Mapping[str, str] | None = None,
                 prog: str = "python -m stp.train") -> argparse.ArgumentParser:
    """The command line, one flag per field the method reads (``--section.field``); help from the fields' metadata,
    with the default each would take (``defaults``: the layered values of the chosen preset and YAML file, with
    the method under "method"; else the dataclass's)."""
    defaults, origins = defaults or {}, origins or {}
    method = defaults.get("method", DEFAULT_METHOD)
    visible = visible_fields(method)
    methods = "\n".join(f"  {n:<17} {m.description}" for n, m in _methods().items())
    rows = "\n".join(f"  {n:<17} {p.description}" for n, p in PRESETS.items())
    p = argparse.ArgumentParser(
        prog=prog, allow_abbrev=False,
        usage=f"{prog} [-h] [--preset NAME] [--config FILE.yaml] [--section.field VALUE ...]",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train a masked diffusion LM with GRPO and Spatio-Temporal Pruning: docs/method.md\n\nPrecedence: "
                    "dataclass defaults < --preset < --config FILE.yaml < --section.field flags.",
        epilog=f"presets:\n{rows}\n\nmethods (--method; each shows its own settings):\n{methods}\n\n"
               "booleans: --run.resume, --run.resume false, --no-run.resume; optional values "
               "take 'none'; lists are comma-separated.")
    p.add_argument("--preset", metavar="NAME", default=None, help=f"named preset (default: {DEFAULT_PRESET}); one of "
                   f"{', '.join(PRESETS)}")
    p.add_argument("--config", metavar="FILE.yaml", default=None, help="YAML file of {section: {field: value}} "
                   "(optional top-level 'preset' and 'method' keys are used when the flags are not given)")
    p.add_argument("--method", metavar="NAME", default=None, help=f"the RL method (default: the preset's; now "
                   f"{method}); one of {', '.join(_methods())}")
    hints_of = {name: typing.get_type_hints(cls) for name, cls in SECTIONS.items()}
    for section, cls in SECTIONS.items():
        group = p.add_argument_group(f"{section}", (cls.__doc__ or "").strip().splitlines()[0])
        if not visible[section]:
            continue
        for f in dataclasses.fields(cls):
            if f.name not in visible[section]:
                continue
            dotted = _dest(section, f.name)
            tp = hints_of[section][f.name]
            base, _ = _split_type(tp)
            current = defaults.get(section, {}).get(f.name, f.default if f.default is not dataclasses.MISSING
                                                    else f.default_factory())
            where = f", from {origins[dotted]}" if dotted in origins else ""
            choices = f.metadata.get("choices")
            text = f.metadata["help"] + (f"; one of {', '.join(choices)}" if choices else "")
            text = f"{text} (default: {_show(current)}{where})".replace("%", "%%")
            if base is bool:
                group.add_argument(f"--{dotted}", dest=dotted, nargs="?", const="true", default=argparse.SUPPRESS,
                                   metavar="BOOL", help=text + f"; --no-{dotted} sets false")
                group.add_argument(f"--no-{dotted}", dest=dotted, action="store_const", const="false",
                                   default=argparse.SUPPRESS, help=argparse.SUPPRESS)
            else:
                metavar = {int: "INT", float: "FLOAT", str: "STR"}.get(base, "A,B,...")
                if choices:
                    metavar = "{" + ",".join(choices) + "}"
                if dotted in REPEATABLE:  # given several times: the values add up (a list; commas split too)
                    group.add_argument(f"--{dotted}", dest=dotted, default=argparse.SUPPRESS, metavar=metavar,
                                       action="append", help=text + "; repeatable")
                    continue
                group.add_argument(f"--{dotted}", dest=dotted, default=argparse.SUPPRESS, metavar=metavar, help=text)
    return p


def parse_args(argv: Sequence[str] | None = None, prog: str = "python -m stp.train") -> TrainConfig:
    """Command line -> validated TrainConfig. ``--help`` shows the defaults of the chosen preset and file. Invalid
    values and unknown flags raise ConfigError (field, value, allowed, origin); a flag without its value exits
    through argparse (status 2)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False, prog=prog)
    pre.add_argument("--preset", default=None)
    pre.add_argument("--config", default=None)
    pre.add_argument("--method", default=None)
    known, _ = pre.parse_known_args(argv)
    name, values, origins = _layers(known.preset, known.config, method=known.method)
    parsed, unknown = build_parser(values, origins, prog=prog).parse_known_args(argv)
    if unknown:
        import difflib

        flags = ["--preset", "--config", "--method"] + [f"--{s}.{f.name}" for s, c in SECTIONS.items()
                                                        for f in dataclasses.fields(c)]
        bad = next((u for u in unknown if u.startswith("-")), unknown[0])
        dotted = bad.split("=")[0].removeprefix("--no-").removeprefix("--")
        section, _, key = dotted.partition(".")
        if section in SECTIONS and key in {f.name for f in dataclasses.fields(SECTIONS[section])}:
            _check_owned(dotted, bad, values["method"], f"command line --{dotted}")
        close = difflib.get_close_matches(bad.split("=")[0], flags, n=3)
        raise ConfigError(f"unknown argument {bad!r}" + (f"; did you mean {', '.join(close)}?" if close else
                          "; see --help for the flags"), field=bad, value=bad, allowed=", ".join(close) or "--help")
    args = vars(parsed)
    overrides = {k: v for k, v in args.items() if "." in k}
    name, values, origins = _layers(known.preset, known.config, overrides, method=known.method)
    return _build(name, values, origins)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m stp.config [--preset NAME] [--config FILE] [flags] --print | --presets-table``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--presets-table" in argv:
        sys.stdout.write(presets_table())
        return 0
    do_print = "--print" in argv
    argv = [a for a in argv if a != "--print"]
    try:
        config = parse_args(argv, prog="python -m stp.config")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if do_print:
        sys.stdout.write(config.to_yaml())
    else:
        print(f"configuration is valid (preset {config.preset}); add --print to see it", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
