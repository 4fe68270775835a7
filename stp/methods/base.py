"""The interface every RL method implements; the trainer's loop (``stp.trainer``) calls only this.

One RL step of the shared loop, and what the method decides in it::

    prompts --(method.prior: anchors, if it asks for them)--> sampler (method.rollout: extra sampler settings)
            --> completions + trajectory record --(task rewards)--> group advantages
            --(method.score: once per rollout, no grad)--> scores {name: [mu, B, ...]} (old, reference, ...)
            --(method.loss: per inner iteration, with grad)--> loss + metrics --> optimizer step

A method is a class with these class attributes and methods (see ``stp.methods.grpo`` for the GRPO family and
docs/architecture.md for the smallest complete example):

- ``name``: the value of ``--method`` (and of a preset's ``method``).
- ``settings``: the configuration fields only this method reads, ``{section: (field, ...) or None (all)}``; the
  command line, YAML files and ``config.yaml`` show them only when this method is chosen.
- ``sections``: the configuration sections this method defines (dataclasses of ``stp.settings.Section``, in its own
  module, e.g. ``DiffpoConfig`` in ``stp.methods.diffpo``); ``stp.config`` adds them after the shared ones
  (``stp.sections``), so ``--help``, YAML files and ``config.yaml`` know them with no other file touched.
- ``rollout``: a :class:`RolloutSettings` (anchors from static priors? behaviour log-probs in the record?).
- ``loss_metrics``: the names of the 0-d metric tensors ``loss`` returns, logged per step in this order.
- ``prepare`` (once, with the base model, before any adapter), ``prior`` and ``sampler_kwargs`` (per rollout),
  ``extra_rewards`` (per rollout, added to the task's reward functions), ``score``, ``loss``.
- Method-owned trainable parameters (e.g. DiFFPO's threshold controller): ``trainable_modules`` names the modules
  (the trainer registers them beside the model, so data-parallel wrappers synchronise their gradients, and
  ``stp.checkpoint`` saves and restores their state in every checkpoint), ``optimizer_groups`` gives their AdamW
  parameter groups (own learning rate; the model's group comes first, so a method without any optimizes exactly as
  before), and ``save_artifacts`` writes them beside the adapter at the end of the run. All default to none.
- ``supplies_batches`` / ``next_batch``: an offline method (e.g. ``dtrpo`` on preference pairs) supplies batch r
  itself; the trainer then skips sampling and rewards for it and goes on with ``score`` and ``loss`` as usual.

Importing a method module must not import torch (the configuration reads ``settings`` and ``sections`` without it):
heavy imports go inside the methods. Nor may it import ``stp.config`` (which imports the methods): sections are built
from ``stp.settings``, and the configuration a method receives is typed :data:`Config`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    import torch

    from stp.loss import RolloutBatch
    from stp.sampler import Prior
    from stp.settings import Section

__all__ = ["Config", "Method", "RolloutSettings"]

#: The run's configuration, an ``stp.config.TrainConfig`` (not imported: stp.config imports this package).
Config = Any


@dataclass(frozen=True)
class RolloutSettings:
    """What a method needs from the sampler beyond the shared ``rollout`` section.

    ``anchors``: rollouts start from static-prior canvases (``prior`` returns them). ``behaviour_logprobs``: the
    trajectory record carries the log-prob of each committed token under the distribution it was drawn from
    (one more LM-head pass per step; off unless a method scores trajectories)."""

    anchors: bool = False
    behaviour_logprobs: bool = False


class Method:
    """Base class of the RL methods. Subclasses set the class attributes and implement ``score`` and ``loss``."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    settings: ClassVar[Mapping[str, tuple[str, ...] | None]] = {}
    sections: ClassVar[tuple[type[Section], ...]] = ()
    rollout: ClassVar[RolloutSettings] = RolloutSettings()
    loss_metrics: ClassVar[tuple[str, ...]] = ()
    #: ``loss`` is a mean over the micro-batch's loss tokens (``stp.likelihood.valid_lengths``): the trainer weights
    #: each micro-batch by its share of the step's tokens on all processes. False: a plain mean of micro-batch losses
    #: (a loss that is a mean over samples or pairs).
    token_level_loss: bool = True
    supplies_batches: ClassVar[bool] = False

    def __init__(self, config: Config):
        self.config = config

    @classmethod
    def check(cls, config: Config) -> None:
        """Rules this method sets on the configuration (raise ``stp.settings.ConfigError``); default: none."""

    def prepare(self, model, prompts: Sequence[str], accelerator) -> None:
        """Called once with the base model (before LoRA), the prompt texts of the whole run, on every process."""

    def prior(self, prompts: Sequence[str], gen_length: int, device) -> Prior | None:
        """Anchors for one rollout's samples (``prompts``: one text per sample), or None."""
        return None

    def sampler_kwargs(self, prompt_ids: torch.Tensor, sample_ids: torch.Tensor, *,
                       attention_mask: torch.Tensor | None = None, seed: int = 0) -> dict[str, Any]:
        """Extra keyword arguments of ``stp.sampler.generate`` for one rollout (e.g. a per-sample decoding
        threshold drawn by a learned controller; ``seed`` is the rollout's noise seed, to key such draws);
        default: none."""
        return {}

    def eval_kwargs(self) -> dict[str, Any]:
        """Extra keyword arguments of ``stp.evaluation.evaluate`` for the run's held-out evaluations (e.g. the
        entropy bound or the threshold controller the method decodes with); default: none."""
        return {}

    def extra_rewards(self, gen) -> dict[str, torch.Tensor]:
        """Reward terms {name: [B] float} added to the task's reward functions for one rollout, from its
        ``stp.sampler.GenerationOutput`` (e.g. an NFE penalty); logged like them. Default: none."""
        return {}

    def trainable_modules(self) -> dict[str, torch.nn.Module]:
        """Modules whose parameters this method trains beside the model (see the module docstring)."""
        return {}

    def optimizer_groups(self) -> list[dict[str, Any]]:
        """AdamW parameter groups of ``trainable_modules``' parameters (``{"params": [...], "lr": ...}``)."""
        return []

    def save_artifacts(self, directory: Path) -> None:
        """Write the method's trained modules into ``directory`` (the run directory, beside ``adapter/``) at the
        end of a finished run, on the main process."""
    def next_batch(self, index: int, *, rank: int, world: int, device) -> tuple[RolloutBatch, dict[str, float]]:
        """Methods with ``supplies_batches = True``: this process's share of batch ``index`` (what rollout ``index``
        would be: reused for ``grpo.num_iterations`` steps, saved in mid-rollout checkpoints) and its metrics
        (floats, logged with every step of the batch). Must be a pure function of ``index`` and the configuration,
        so that a resumed run gets the same batches."""
        raise NotImplementedError(f"method {self.name!r} sets supplies_batches but defines no next_batch")

    def summary(self) -> dict[str, Any]:
        """Extra fields for summary.json (e.g. the estimator)."""
        return {}

    def score(self, model, batch: RolloutBatch, *, seed: int, num_iterations: int,
              ref_context) -> dict[str, torch.Tensor]:
        """What the loss compares against, computed once per rollout without grad: ``{name: [mu, B, ...]}``
        (samples on dim 1, so that micro-batches slice them). ``ref_context()`` switches the model to the
        reference policy (None when there is no reference: beta = 0 or full fine-tuning). Saved in mid-rollout
        checkpoints, so resumed runs continue bit for bit."""
        raise NotImplementedError

    def loss(self, model, batch: RolloutBatch, scores: Mapping[str, torch.Tensor], *, seed: int,
             iteration: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The scalar loss of inner iteration ``iteration`` on ``batch`` (a micro-batch; ``scores`` sliced alike),
        and the metrics named in ``loss_metrics`` as detached 0-d tensors (no host sync)."""
        raise NotImplementedError
