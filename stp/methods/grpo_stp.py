"""GRPO with Spatio-Temporal Pruning: rollouts start from static-prior canvases (anchors, ``stp.prior``) and the
``stp`` estimator never masks the anchors (K random-count masks over the free positions).

The anchors of every prompt the run will see are built once, with the base model (before the adapter), into the
prior file (``python -m stp.prior``'s format; ``prior.path``, by default ``<run.output_dir>/priors.jsonl``), by the
main process; every rollout then places them on its canvases and the scoring passes them to the estimator.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from .base import RolloutSettings
from .grpo import COMMON_ESTIMATOR_FIELDS, GRPOMethod

__all__ = ["GRPOWithSTP", "METHOD"]


class GRPOWithSTP(GRPOMethod):
    name = "stp"
    description = "GRPO with STP: anchors from static priors in rollouts and scoring, K random-count masks"
    estimator = "stp"
    settings = {"estimator": (*COMMON_ESTIMATOR_FIELDS, "mask_scheme"), "prior": None}
    rollout = RolloutSettings(anchors=True)

    def __init__(self, config):
        super().__init__(config)
        self.records: dict[str, dict] | None = None

    def prepare(self, model, prompts: Sequence[str], accelerator) -> None:
        if self.config.prior.enabled:
            self.records = ensure_priors(model, self.config, prompts, accelerator)

    def prior(self, prompts: Sequence[str], gen_length: int, device):
        if self.records is None:
            return None
        from stp.prior import prompt_id, to_sampler_prior

        return to_sampler_prior([self.records[prompt_id(t)] for t in prompts], gen_length,
                                device=device)  # [B, L] each


def ensure_priors(lm, cfg, texts: Sequence[str], accelerator) -> dict[str, dict]:
    """The prior records of ``texts`` (by prompt id), building the missing ones with the base model into the prior
    file (``python -m stp.prior``'s format; lines appended and fsync'ed per batch) on the main process."""
    from stp.settings import ConfigError
    from stp.prior import build_priors, load_priors, prompt_id, recorded_setting

    path = Path(cfg.prior_path)
    p, r = cfg.prior, cfg.rollout
    wanted = list(dict.fromkeys(texts))
    if accelerator.is_main_process:
        have = load_priors(path) if path.exists() else {}
        missing = [t for t in wanted if prompt_id(t) not in have]
        if missing:
            path.parent.mkdir(parents=True, exist_ok=True)
            print(f"stp.train: building {len(missing)} static priors into {path}", file=sys.stderr)
            settings = {"model": cfg.model.name_or_path, "task": cfg.run.task}
            with open(path, "a", encoding="utf-8") as f:
                for b in range(0, len(missing), p.build_batch_size):
                    chunk = missing[b:b + p.build_batch_size]
                    recs = build_priors(lm, chunk, rho=p.rho, strategy=p.strategy, free_rule=p.free_rule,
                                        gen_length=r.gen_length,
                                        block_length=p.build_block_length or r.block_length,
                                        steps=p.build_steps or r.gen_length, temperature=p.build_temperature,
                                        seed=cfg.run.seed, settings=settings, backend=cfg.run.backend)
                    f.write("".join(json.dumps(x, separators=(",", ":")) + "\n" for x in recs))
                    f.flush()
                    os.fsync(f.fileno())
    accelerator.wait_for_everyone()
    have = load_priors(path)
    out = {}
    for t in wanted:
        rec = have[prompt_id(t)]
        s = rec["settings"]
        for key, ours in (("rho", p.rho), ("strategy", p.strategy), ("free_rule", p.free_rule)):
            theirs = recorded_setting(s, key)
            if theirs != ours:
                # A file from before free_rule existed records none: it was built with 'inclusive', the only rule then.
                note = f" (not recorded: a file from before prior.{key})" if key not in s and theirs is not None else ""
                raise ConfigError(f"{path}: the prior of prompt {prompt_id(t)} was built with {key}={theirs!r}{note}, "
                                  f"this run has prior.{key}={ours!r}; use another prior.path or the same setting",
                                  field=f"prior.{key}", value=ours, allowed=repr(theirs))
        out[prompt_id(t)] = rec
    return out


METHOD = GRPOWithSTP
