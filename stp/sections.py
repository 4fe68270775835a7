"""The sections of the configuration that every method shares (one dataclass each; the methods' own sections sit in
their modules of ``stp.methods``; ``stp.config`` assembles them all)::

    model      ModelConfig      which model, dtype, LoRA (all attention and MLP projections), 4-bit base
    rollout    RolloutConfig    the sampler (``stp.sampler.generate``): gen_length, block_length, steps, tau, ...
    prior      PriorConfig      static priors / anchors (``stp.prior``): rho, strategy, file, build settings
    estimator  EstimatorConfig  per-token log-probs (``stp.likelihood``): estimator, score, K, mask scheme
    grpo       GRPOConfig       objective and optimiser (``stp.loss``), TRL's names: beta, epsilon, num_generations...
    run        RunConfig        task, data, output, seed, resume, logging, evaluation, device, mixed precision

Every field carries ``metadata={"help": ...}``; every value is checked in ``__post_init__`` (``stp.settings``) and
a bad one raises ``ConfigError`` naming the dotted field, the value and what is allowed::

    >>> GRPOConfig(epsilon=-0.1)
    Traceback (most recent call last):
    ...
    stp.settings.ConfigError: grpo.epsilon=-0.1 is not allowed; allowed: a number > 0

Reading this module does not import torch.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from stp.settings import ConfigError, Section
from stp.settings import is_number as _is_number
from stp.settings import setting as _f  # _f(default, help, choices=...): a field with its help text

__all__ = ["ModelConfig", "RolloutConfig", "PriorConfig", "EstimatorConfig", "GRPOConfig", "RunConfig", "SHARED",
           "check_shared"]

# The choices of the modules that consume these settings, repeated here so that reading a config never imports torch
# (tests/test_config.py checks they equal stp.likelihood / stp.prior / stp.models.base).
ESTIMATORS = ("stp", "elbo", "d1")
SCORE_MODES = ("all", "masked", "elbo")
MASK_SCHEMES = ("random_count", "block")
STRATEGIES = ("answer_low_confidence", "low_confidence", "random", "answer_random")
FREE_RULES = ("inside", "inclusive")
ATTN_IMPLEMENTATIONS = ("sdpa", "eager")
REMASKING = ("low_confidence", "random")
CACHE_MODES = ("none", "prefix", "dual")
# stp.decoders
DECODER_NAMES = ("low_confidence", "random", "confidence_threshold", "dream", "entropy_bound",
                 "entropy_bound_confidence", "fast_dllm")
DTYPES = ("auto", "float32", "bfloat16", "float16")
MIXED_PRECISION = ("no", "bf16", "fp16")  # accelerate's names
LR_SCHEDULERS = ("constant_with_warmup", "constant", "linear", "cosine")  # transformers.get_scheduler names
DATA_SOURCES = ("file", "hub", "generated")
REPORT_TO = ("tensorboard", "wandb", "mlflow", "none")  # accelerate tracker names
LORA_TARGETS_ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class ModelConfig(Section):
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
                                                                             "sudoku_relabel", "chain"),
                       "'pretrained:sudoku', 'pretrained:countdown', 'pretrained:countdown_small', 'pretrained:chain' "
                       "(the tasks stp.pretrain knows) or 'pretrained:sudoku_relabel' (stp.pretrain.CHECKPOINTS)")
        self._positive("lora_r", "lora_alpha")
        self._need("lora_dropout", 0.0 <= self.lora_dropout < 1.0, "a number in [0, 1)")
        self._need("lora_target_modules", len(self.lora_target_modules) > 0 and all(
            re.fullmatch(r"[A-Za-z0-9_.]+", m) for m in self.lora_target_modules),
            "a non-empty list of module names (letters, digits, '_', '.')")
        self._need("load_in_4bit", not self.load_in_4bit or self.use_lora,
                   "false when model.use_lora is false (a 4-bit base cannot be trained; train a LoRA adapter)")

    def check_environment(self) -> None:
        if self.load_in_4bit:
            import importlib.util

            import torch

            if not torch.cuda.is_available():
                raise ConfigError.bad_value("model.load_in_4bit", True, "false (no CUDA device here)")
            if importlib.util.find_spec("bitsandbytes") is None:
                raise ConfigError.bad_value("model.load_in_4bit", True, "false (bitsandbytes is not installed)")


@dataclass
class RolloutConfig(Section):
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
    decoder: str | None = _f(None, "decoding rule by name (stp.decoders): low_confidence, random, "
                             "confidence_threshold, entropy_bound (DiFFPO's EB sampler, positions in entropy order), "
                             "entropy_bound_confidence (the same bound, positions in confidence order), fast_dllm (Fast-dLLM's parallel decoding: top-1 "
                             "plus every position with confidence >= rollout.decoder_threshold, blocks end when "
                             "decoded); "
                             "none = the rule rollout.remasking / rollout.confidence_threshold select",
                             choices=tuple(n for n in DECODER_NAMES if n != "dream"))
    decoder_threshold: float = _f(0.9, "rollout.decoder fast_dllm / confidence_threshold: the confidence "
                                  "threshold, in (0, 1]")
    decoder_gamma: float = _f(0.1, "rollout.decoder entropy_bound / entropy_bound_confidence: the entropy bound "
                              "gamma, >= 0")
    max_prompt_length: int | None = _f(None, "prompts longer than this many tokens are left-truncated (TRL's "
                                       "behaviour); none = no limit")
    eval_temperature: float = _f(0.0, "sampling temperature of the held-out evaluation (0 = greedy, d1's protocol)")

    def decoder_rule(self):
        """The ``stp.decoders.Decoder`` that ``decoder`` names, with its settings (None when unset)."""
        if self.decoder is None:
            return None
        from stp import decoders
        settings = {"fast_dllm": {"threshold": self.decoder_threshold},
                    "confidence_threshold": {"threshold": self.decoder_threshold},
                    "entropy_bound": {"gamma": self.decoder_gamma},
                    "entropy_bound_confidence": {"gamma": self.decoder_gamma}}.get(self.decoder, {})
        return decoders.get(self.decoder, **settings)

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
        self._need("decoder_threshold", 0 < self.decoder_threshold <= 1, "a number in (0, 1]")
        self._need("decoder_gamma", math.isfinite(self.decoder_gamma) and self.decoder_gamma >= 0, "a number >= 0")
        if self.decoder is not None:
            self._need("decoder", self.remasking == "low_confidence" and self.confidence_threshold is None,
                       "none while rollout.remasking or rollout.confidence_threshold is set (they select a rule too)")
        self._need("max_prompt_length", self.max_prompt_length is None or self.max_prompt_length >= 1,
                   "an integer >= 1, or none")


@dataclass
class PriorConfig(Section):
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
class EstimatorConfig(Section):
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
class GRPOConfig(Section):
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
class RunConfig(Section):
    """Task, data, outputs, reproducibility, logging, evaluation and devices of one run."""

    section: ClassVar[str] = "run"

    task: str = _f("sudoku", "task and reward functions (stp.tasks)", choices=("gsm8k", "math", "countdown",
                                                                                 "sudoku", "countdown_small", "chain"))
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
    max_no_signal_steps: int = _f(30, "stop after this many optimizer steps in a row without learning signal (in "
                                  "every group all completions rewarded alike: every advantage 0); 0 = never")
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
        for name in ("save_every", "eval_every", "eval_examples", "max_no_signal_steps"):
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
                                                                                 "countdown_small", "chain"),
                   f"'chat' for task {self.task!r} (the compact prompt exists for sudoku, countdown, chain and "
                   "countdown_small)")
        if self.data_source == "generated":
            from stp.tasks import TASKS
            from stp.tasks.base import Task

            have = [n for n, c in TASKS.items() if c.generate is not Task.generate]
            self._need("data_source", self.task in have, f"'file' or 'hub' for task {self.task!r} (only "
                       f"{', '.join(have)} have a generator)")

    def check_environment(self) -> None:
        if self.data_path is not None and not Path(self.data_path).expanduser().is_file():
            raise ConfigError.bad_value("run.data_path", self.data_path, "an existing data file")
        if self.device.startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                raise ConfigError.bad_value("run.device", self.device, "auto or cpu (no CUDA device here)")
        if self.report_to in ("wandb", "mlflow", "tensorboard") and (self.tensorboard or
                                                                    self.report_to != "tensorboard"):
            import importlib.util

            if importlib.util.find_spec(self.report_to) is None:
                raise ConfigError.bad_value("run.report_to", self.report_to, f"a tracker whose package is "
                                            f"installed ({self.report_to} is not), or none")
        out = Path(self.output_dir or ".").expanduser()
        if out.exists() and not out.is_dir():
            raise ConfigError.bad_value("run.output_dir", self.output_dir, "a directory path (this is a file)")


def check_shared(cfg: Any, method: str, anchor_methods: Sequence[str]) -> None:
    """Rules across the shared sections of ``cfg`` (a ``stp.config.TrainConfig`` of method ``method``;
    ``anchor_methods``: the methods whose rollouts and estimator take anchors)."""
    est, prior, rollout = cfg.estimator, cfg.prior, cfg.rollout
    if prior.enabled and method not in anchor_methods:
        takers = ", ".join(map(repr, anchor_methods))
        raise ConfigError.bad_value("prior.enabled", True, f"false with method {method!r} (only the {takers} "
                                    "estimator takes anchors)")
    if est.score == "elbo" and (method == "d1" or est.mask_scheme != "random_count"):
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
    if cfg.grpo.beta > 0 and not cfg.model.use_lora:
        raise ConfigError.bad_value("grpo.beta", cfg.grpo.beta, "0 while model.use_lora is false (the KL "
                                    "reference is the base model with the LoRA adapter disabled)")


SHARED: tuple[type[Section], ...] = (ModelConfig, RolloutConfig, PriorConfig, EstimatorConfig, GRPOConfig, RunConfig)
