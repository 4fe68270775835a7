"""dTRPO offline: DPO on trajectory log-ratios reduced to one drawn step per block (docs/method.md 7).

Objective, per pair (chosen y_w, rejected y_l of one prompt, each with its trajectory record)::

    Delta(y) = sum_b w_b sum_{i: s(i) = f_b} [log mu_theta - log mu_ref](y_i | state before f_b)   (w_b = T_B)
    loss     = -log sigmoid(beta * (Delta(y_w) - Delta(y_l)))          averaged over the pairs of the step

(``dtrpo.length_normalize``: each Delta divided by its completion's real length, through the first EOS;
``dtrpo.block_mean``: every weight divided by T_B). Log-probs are at the pairs' sampling temperature (recorded in the
pairs file, checked against ``rollout.temperature``) unless ``dtrpo.temperature`` names another.

Fresh steps every epoch: the visit of pair p in epoch e draws f_b from the counter of (derive_seed(run.seed,
"dtrpo-u"), iteration e, sample id 2 * sample_id_of(prompt id) + k, block), k = 0 chosen, 1 rejected: a pure
function of the epoch and the prompt (not of the pair's place in the file), so a resumed run draws the same steps.
Over the epochs every pass of every trajectory is visited, and each visit is an unbiased estimate of the whole
trajectory's log-ratio. The reference terms of a visit's steps are computed in ``score`` under the same steps with
the LoRA adapter disabled (reference = base): one no-grad forward of N_B states per sample and visit
(benchmarks/RESULTS.md compares it with caching every pass of every pair, which costs T_B N_B states per sample once
and pays only beyond T_B epochs).

Data: the pairs file (``stp.pairs``; ``dtrpo.pairs_path``), built in ``prepare`` with the base model for the run's
prompts when they are missing, with the run's own rewards and examples (the trainer's task: a built-in task, or
``run.reward`` / ``run.dataset`` / ``stp.Trainer(reward_funcs=..., train_dataset=...)``). Batch r holds
``grpo.prompts_per_step`` pairs: position q = r * pairs_per_step + j of the pair sequence is pair ``perm_e[q % N]`` of
epoch e = q // N, perm_e a permutation seeded by (run.seed, "dtrpo-pairs", e); the batch interleaves chosen and
rejected rows [w0, l0, w1, l1, ...] so micro-batches hold whole pairs; a row's batch sample id 2 (e N + p) + k says
which visit it is. Nothing reads a global RNG; a resumed run gets the same batches and steps.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from stp.settings import ConfigError, Section
from stp.settings import setting as _f  # _f(default, help, choices=...): a field with its help text

from .base import Method

__all__ = ["DTRPO", "DTRPOConfig", "METHOD", "TRAJECTORY_SETTINGS", "trajectory_kwargs", "score_temperature"]

TRAJECTORY_SETTINGS = ("mode", "block_mean", "temperature")
TRAJECTORY_MODES = ("exact", "packed")


@dataclass
class DTRPOConfig(Section):
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

    def pairs_file(self, config) -> str:
        """The pairs file of run ``config``: ``pairs_path``; none = <run.output_dir>/pairs.jsonl; 'cache' = a file
        named by the pair settings under ``$STP_CACHE_DIR/pairs`` (else ``$XDG_CACHE_HOME/stp/pairs``, else
        ``~/.cache/stp/pairs``), shared by every run with those settings."""
        if self.pairs_path is None:
            return str(Path(config.run.output_dir or ".") / "pairs.jsonl")
        if self.pairs_path != "cache":
            return self.pairs_path
        import hashlib
        import json
        import os

        r = config.rollout
        key = json.dumps([config.model.name_or_path, config.run.task, config.run.prompt_format, config.run.data_source,
                          config.run.data_path, config.run.train_examples, r.gen_length, r.block_length, r.steps,
                          r.temperature, r.remasking, config.grpo.num_generations, config.run.seed])
        if os.environ.get("STP_CACHE_DIR"):
            root = Path(os.environ["STP_CACHE_DIR"]).expanduser()
        else:
            base = os.environ.get("XDG_CACHE_HOME")
            root = (Path(base).expanduser() if base else Path.home() / ".cache") / "stp"
        return str(root / "pairs" / f"{config.run.task}-{hashlib.sha256(key.encode()).hexdigest()[:12]}.jsonl")


def score_temperature(config) -> float:
    """The temperature log-probs are scored at: ``dtrpo.temperature``, else the sampling temperature
    (``rollout.temperature``: the policy's ratio is that of the distribution the trajectories were drawn from)."""
    t = config.dtrpo.temperature
    return float(config.rollout.temperature if t is None else t)


def trajectory_kwargs(config) -> dict:
    """The ``stp.trajectory_ratio.trajectory_logprobs`` keywords of a configuration."""
    return {"block_length": config.rollout.block_length, "steps": config.rollout.steps, "mode": config.dtrpo.mode,
            "block_mean": config.dtrpo.block_mean, "temperature": score_temperature(config),
            "memory_budget": config.estimator.memory_budget, "backend": config.run.backend}


def check_trajectory_settings(config, method: str) -> None:
    """Rules both dTRPO methods set (raise ``stp.config.ConfigError``)."""
    if config.dtrpo.temperature is None and config.rollout.temperature <= 0:
        raise ConfigError.bad_value("dtrpo.temperature", None, f"a number > 0 with method {method!r} when "
                                    f"rollout.temperature is {config.rollout.temperature} (greedy decoding has no "
                                    "sampling distribution to score at)")
    if config.dtrpo.mode == "packed" and config.rollout.early_stop is not None:
        raise ConfigError.bad_value("rollout.early_stop", config.rollout.early_stop, "none with dtrpo.mode "
                                    "'packed' (the one-shot fill commits positions outside their block's window)")


def check_model(config, model) -> None:
    """``packed`` needs a model declaring block-causal attention (``stp.trajectory_ratio``): checked before any work."""
    if config.dtrpo.mode == "packed" and not getattr(model, "block_causal", False):
        raise ConfigError.bad_value("dtrpo.mode", "packed", f"exact for model {config.model.name_or_path!r}: it "
                                    "attends bidirectionally (no block_causal = True attribute), and the packed "
                                    "sequence hides the later masked blocks from block b and the completion from the "
                                    "prompt, a bias more draws do not remove (docs/method.md 7)")


class DTRPO(Method):
    name = "dtrpo"
    description = "dTRPO offline: DPO on one-step-per-block trajectory log-ratios over best-vs-worst pairs"
    settings: ClassVar = {"dtrpo": None, "estimator": ("memory_budget",)}
    sections = (DTRPOConfig,)
    loss_metrics = ("accuracy", "margin", "delta_chosen", "delta_rejected")
    supplies_batches = True
    token_level_loss = False  # the DPO loss is a mean over pairs

    def __init__(self, config):
        super().__init__(config)
        self.pairs: list[dict] = []
        self.task = None  # the run's task (rewards) and the examples of its prompts: set by the trainer
        self.rows: list[dict] | None = None
        self._perms: dict[int, list[int]] = {}  # epoch -> pair permutation

    @classmethod
    def check(cls, config) -> None:
        g = config.grpo
        if g.num_iterations != 1:
            raise ConfigError.bad_value("grpo.num_iterations", g.num_iterations, "1 with method 'dtrpo' (each batch "
                                        "of pairs is one optimizer step; epochs revisit the pairs)")
        if g.prompts_per_step % g.gradient_accumulation_steps:
            raise ConfigError.bad_value("grpo.gradient_accumulation_steps", g.gradient_accumulation_steps,
                                        f"a divisor of grpo.prompts_per_step={g.prompts_per_step} (pairs per step: "
                                        "a micro-batch holds whole pairs)")
        if not config.model.use_lora:
            raise ConfigError.bad_value("model.use_lora", False, "true with method 'dtrpo' (the reference terms of "
                                        "each epoch's fresh steps are computed with the LoRA adapter disabled)")
        check_trajectory_settings(config, "dtrpo")

    def summary(self) -> dict:
        return {"estimator": f"trajectory-{self.config.dtrpo.mode}", "pairs": len(self.pairs)}

    # ------------------------------------------------------------------------------------------------- data, cache
    def prepare(self, model, prompts: Sequence[str], accelerator) -> None:
        from stp.pairs import ensure_pairs

        check_model(self.config, model)
        _, self.pairs = ensure_pairs(model, self.config, prompts, accelerator, task=self.task, rows=self.rows)

    def _u_seed(self) -> int:
        from stp.seeds import derive_seed

        return derive_seed(self.config.run.seed, "dtrpo-u")

    def visit_steps(self, sample_ids, num_blocks: int, steps_per_block: int):
        """[B, N_B] drawn passes of the visits ``sample_ids`` (2 (e N + p) + k: epoch e, pair p, side k): keyed by
        (epoch, prompt id, side, block), fresh every epoch."""
        import torch

        from stp.prior import sample_id_of
        from stp.trajectory_ratio import block_steps

        n = len(self.pairs)
        visit, side = sample_ids // 2, sample_ids % 2
        epoch, pair = (visit // n).tolist(), (visit % n).tolist()
        keys = torch.tensor([2 * sample_id_of(self.pairs[p]["prompt_id"]) for p in pair],
                            dtype=torch.long, device=sample_ids.device) + side
        out = torch.empty(len(pair), num_blocks, dtype=torch.long, device=sample_ids.device)
        for e in set(epoch):  # a batch spans at most two epochs
            rows = torch.tensor([i for i, x in enumerate(epoch) if x == e], device=sample_ids.device)
            out[rows] = block_steps(self._u_seed(), e, keys[rows], num_blocks, steps_per_block)
        return out

    def _logprobs(self, model, batch):
        from stp.trajectory_ratio import trajectory_logprobs

        kw = trajectory_kwargs(self.config)
        blocks = batch.completion_ids.shape[1] // kw["block_length"]
        steps = self.visit_steps(batch.sample_ids, blocks, kw["steps"] // blocks)
        return trajectory_logprobs(model, batch.prompt_ids, batch.prompt_attention_mask, batch.completion_ids,
                                   batch.commit_step, seed=self._u_seed(), iteration=0, sample_ids=batch.sample_ids,
                                   fixed_steps=steps, **kw)

    def _batch(self, visits: Sequence[tuple[int, int]], device):
        """RolloutBatch of the visits ``visits`` ((epoch, pair)), rows [w0, l0, w1, l1, ...], sample ids
        2 (e N + p) + k."""
        import torch

        from stp.loss import RolloutBatch

        n = len(self.pairs)
        pad = 0
        seqs = [self.pairs[p]["prompt_ids"] for _, p in visits]
        width = max(len(x) for x in seqs)
        rows, masks, comps, commits, adv, ids = [], [], [], [], [], []
        for (e, p), pi in zip(visits, seqs):
            rec = self.pairs[p]
            for side, a, k in (("chosen", 1.0, 0), ("rejected", -1.0, 1)):
                rows.append([pad] * (width - len(pi)) + pi)
                masks.append([0] * (width - len(pi)) + [1] * len(pi))
                comps.append(rec[side]["completion_ids"])
                commits.append(rec[side]["commit_step"])
                adv.append(a)
                ids.append(2 * (e * n + p) + k)

        def t(x, dtype=torch.long):
            return torch.tensor(x, dtype=dtype, device=device)

        return RolloutBatch(prompt_ids=t(rows), prompt_attention_mask=t(masks), completion_ids=t(comps),
                            advantages=t(adv, torch.float32), sample_ids=t(ids), commit_step=t(commits))

    def next_batch(self, index: int, *, rank: int, world: int, device):
        import torch

        from stp.seeds import derive_seed

        per_step = self.config.grpo.prompts_per_step
        if per_step % world:
            raise ValueError(f"grpo.prompts_per_step={per_step} pairs must split evenly over {world} processes")
        n = len(self.pairs)
        chosen = []
        for q in range(index * per_step, (index + 1) * per_step):
            epoch = q // n
            if epoch not in self._perms:
                g = torch.Generator().manual_seed(derive_seed(self.config.run.seed, "dtrpo-pairs", epoch))
                self._perms[epoch] = torch.randperm(n, generator=g).tolist()
            chosen.append((epoch, self._perms[epoch][q % n]))
        local = per_step // world
        mine = chosen[rank * local:(rank + 1) * local]
        rw = [self.pairs[p]["chosen"]["reward"] for _, p in mine]
        rl = [self.pairs[p]["rejected"]["reward"] for _, p in mine]
        metrics = {"reward_mean": (sum(rw) + sum(rl)) / (2 * len(mine)), "reward_chosen": sum(rw) / len(mine),
                   "reward_rejected": sum(rl) / len(mine), "pair_epoch": (index * per_step) / n}
        return self._batch(mine, device), metrics

    # ------------------------------------------------------------------------------------------------ score, loss
    def score(self, model, batch, *, seed: int, num_iterations: int, ref_context):
        """The reference terms of this batch's visits (their fresh steps), with the LoRA adapter disabled."""
        import torch

        with torch.no_grad(), model.model.disable_adapter():
            ref = self._logprobs(model, batch)
        return {"ref": ref.logprobs[None], "weights": ref.weights[None]}  # [1, B, C] each

    def loss(self, model, batch, scores: Mapping, *, seed: int, iteration: int):
        from stp.likelihood import valid_lengths
        from stp.trajectory_ratio import dpo_loss

        d = self.config.dtrpo
        cur = self._logprobs(model, batch)
        return dpo_loss(cur.logprobs, scores["ref"][0], scores["weights"][0],
                        valid_lengths(batch.completion_ids, int(model.eos_token_id)), beta=d.beta,
                        length_normalize=d.length_normalize)


METHOD = DTRPO
