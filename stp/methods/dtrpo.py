"""dTRPO offline: DPO on trajectory log-ratios reduced to one drawn step per block (docs/method.md 7).

Objective, per pair (chosen y_w, rejected y_l of one prompt, each with its trajectory record)::

    Delta(y) = sum_b w_b sum_{i: s(i) = f_b} [log mu_theta - log mu_ref](y_i | state before f_b)   (w_b = T_B)
    loss     = -log sigmoid(beta * (Delta(y_w) - Delta(y_l)))          averaged over the pairs of the step

(``dtrpo.length_normalize``: each Delta divided by its count of decoded tokens; ``dtrpo.block_mean``: w_b = 1).
The drawn steps f_b of a pair are fixed for the whole run: keyed by (derive_seed(run.seed, "dtrpo-u"), 0, sample
id, block) with sample ids 2p (chosen) and 2p + 1 (rejected) for pair p of the file. So the reference terms are
computed ONCE per pair, in ``prepare`` with the base model before the adapter exists (reference = base), and cached
in memory; ``score`` only looks them up.

Data: the pairs file (``stp.pairs``; ``dtrpo.pairs_path``), built in ``prepare`` with the base model for the run's
prompts when they are missing. Batch r holds ``grpo.prompts_per_step`` pairs: position q = r * pairs_per_step + j of
the pair sequence is pair ``perm_e[q % N]`` of epoch e = q // N, perm_e a permutation seeded by (run.seed,
"dtrpo-pairs", e); the batch interleaves chosen and rejected rows [w0, l0, w1, l1, ...] so micro-batches hold whole
pairs. Nothing reads a global RNG; a resumed run gets the same batches.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from stp.settings import ConfigError, Section
from stp.settings import setting as _f  # _f(default, help, choices=...): a field with its help text

from .base import Method

__all__ = ["DTRPO", "DTRPOConfig", "METHOD", "TRAJECTORY_SETTINGS", "trajectory_kwargs"]

TRAJECTORY_SETTINGS = ("mode", "block_mean")
TRAJECTORY_MODES = ("exact", "packed")


@dataclass
class DTRPOConfig(Section):
    """dTRPO (``stp.trajectory_ratio``, docs/method.md 7): trajectory log-ratios from one drawn step per block, in a
    DPO objective over offline pairs (method dtrpo) or inside the GRPO loss (method dtrpo-online)."""

    section: ClassVar[str] = "dtrpo"

    mode: str = _f("exact", "how the drawn states are evaluated: exact (one sequence per block state) or packed (one "
                   "[prompt ; noisy ; clean] sequence with a block-diffusion mask: exact for block-causal models, an "
                   "approximation for LLaDA)", choices=TRAJECTORY_MODES)
    block_mean: bool = _f(False, "weight each block's drawn step by 1 (the block mean) instead of T_B (the unbiased "
                          "trajectory sum)")
    beta: float = _f(0.1, "DPO inverse temperature: loss = -log sigmoid(beta * (Delta_chosen - Delta_rejected))")
    length_normalize: bool = _f(False, "divide each trajectory log-ratio by its number of decoded (non-anchor) "
                                "tokens")
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


def trajectory_kwargs(config) -> dict:
    """The ``stp.trajectory_ratio.trajectory_logprobs`` keywords of a configuration."""
    return {"block_length": config.rollout.block_length, "steps": config.rollout.steps, "mode": config.dtrpo.mode,
            "block_mean": config.dtrpo.block_mean, "temperature": config.estimator.temperature,
            "memory_budget": config.estimator.memory_budget, "backend": config.run.backend}


class DTRPO(Method):
    name = "dtrpo"
    description = "dTRPO offline: DPO on one-step-per-block trajectory log-ratios over best-vs-worst pairs"
    settings: ClassVar = {"dtrpo": None, "estimator": ("temperature", "memory_budget")}
    sections = (DTRPOConfig,)
    loss_metrics = ("accuracy", "margin", "delta_chosen", "delta_rejected")
    supplies_batches = True
    token_level_loss = False  # the DPO loss is a mean over pairs

    def __init__(self, config):
        super().__init__(config)
        self.pairs: list[dict] = []
        self.ref: dict | None = None  # cached reference terms, by pair index
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
        if config.dtrpo.mode == "packed" and config.rollout.early_stop is not None:
            raise ConfigError.bad_value("rollout.early_stop", config.rollout.early_stop, "none with dtrpo.mode "
                                        "'packed' (the one-shot fill commits positions outside their block's window)")

    def summary(self) -> dict:
        return {"estimator": f"trajectory-{self.config.dtrpo.mode}", "pairs": len(self.pairs)}

    # ------------------------------------------------------------------------------------------------- data, cache
    def prepare(self, model, prompts: Sequence[str], accelerator) -> None:
        from stp.pairs import ensure_pairs

        _, self.pairs = ensure_pairs(model, self.config, prompts, accelerator)
        self.ref = self._reference(model, accelerator.device)

    def _u_seed(self) -> int:
        from stp.seeds import derive_seed

        return derive_seed(self.config.run.seed, "dtrpo-u")

    def _batch(self, indices: Sequence[int], device):
        """RolloutBatch of the pairs ``indices``, rows [w0, l0, w1, l1, ...], sample ids 2p / 2p + 1."""
        import torch

        from stp.loss import RolloutBatch

        width = max(len(self.pairs[p]["prompt_ids"]) for p in indices)
        pad = 0
        rows, masks, comps, commits, adv, ids = [], [], [], [], [], []
        for p in indices:
            rec = self.pairs[p]
            pi = rec["prompt_ids"]
            for side, a, k in (("chosen", 1.0, 0), ("rejected", -1.0, 1)):
                rows.append([pad] * (width - len(pi)) + pi)
                masks.append([0] * (width - len(pi)) + [1] * len(pi))
                comps.append(rec[side]["completion_ids"])
                commits.append(rec[side]["commit_step"])
                adv.append(a)
                ids.append(2 * p + k)

        def t(x, dtype=torch.long):
            return torch.tensor(x, dtype=dtype, device=device)

        return RolloutBatch(prompt_ids=t(rows), prompt_attention_mask=t(masks), completion_ids=t(comps),
                            advantages=t(adv, torch.float32), sample_ids=t(ids), commit_step=t(commits))

    def _reference(self, model, device) -> dict:
        """Reference log-probs and weights of every pair on its fixed drawn steps, computed once (no grad), in
        fixed chunks of the file order: {"logprobs": [2N, C], "weights": [2N, C], "tokens": [2N]}."""
        import torch

        from stp.trajectory_ratio import trajectory_logprobs

        kw = trajectory_kwargs(self.config)
        chunk = max(1, self.config.grpo.prompts_per_step)
        lps, ws = [], []
        was_training = model.training
        model.eval()
        print(f"stp.train: dTRPO reference terms of {len(self.pairs)} pairs", file=sys.stderr)
        with torch.no_grad():
            for start in range(0, len(self.pairs), chunk):
                b = self._batch(range(start, min(len(self.pairs), start + chunk)), device)
                out = trajectory_logprobs(model, b.prompt_ids, b.prompt_attention_mask, b.completion_ids,
                                          b.commit_step, seed=self._u_seed(), iteration=0, sample_ids=b.sample_ids,
                                          **kw)
                lps.append(out.logprobs.float())
                ws.append(out.weights)
        model.train(was_training)
        return {"logprobs": torch.cat(lps), "weights": torch.cat(ws)}

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
            chosen.append(self._perms[epoch][q % n])
        local = per_step // world
        mine = chosen[rank * local:(rank + 1) * local]
        rw = [self.pairs[p]["chosen"]["reward"] for p in mine]
        rl = [self.pairs[p]["rejected"]["reward"] for p in mine]
        metrics = {"reward_mean": (sum(rw) + sum(rl)) / (2 * len(mine)), "reward_chosen": sum(rw) / len(mine),
                   "reward_rejected": sum(rl) / len(mine), "pair_epoch": (index * per_step) / n}
        return self._batch(mine, device), metrics

    # ------------------------------------------------------------------------------------------------ score, loss
    def score(self, model, batch, *, seed: int, num_iterations: int, ref_context):
        ids = batch.sample_ids.to(self.ref["logprobs"].device)
        return {"ref": self.ref["logprobs"][ids][None].to(batch.completion_ids.device),
                "weights": self.ref["weights"][ids][None].to(batch.completion_ids.device)}  # [1, B, C] each

    def loss(self, model, batch, scores: Mapping, *, seed: int, iteration: int):
        from stp.trajectory_ratio import dpo_loss, trajectory_logprobs

        d = self.config.dtrpo
        cur = trajectory_logprobs(model, batch.prompt_ids, batch.prompt_attention_mask, batch.completion_ids,
                                  batch.commit_step, seed=self._u_seed(), iteration=0, sample_ids=batch.sample_ids,
                                  **trajectory_kwargs(self.config))
        return dpo_loss(cur.logprobs, scores["ref"][0], scores["weights"][0], batch.commit_step, beta=d.beta,
                        length_normalize=d.length_normalize)


METHOD = DTRPO
