"""Checkpoints: atomic files, the resumable state of a run, and stopping on SIGINT.

Checkpoints (``<output_dir>/checkpoints/step-NNNNNN``) are written into a temporary directory, every file fsync'ed,
then renamed: a directory with that name is complete. They hold the trainable weights (LoRA adapter or the full
model) as safetensors, the AdamW state as safetensors + JSON, the scheduler state and RNG states as JSON /
safetensors, a method's own trainable modules (``method_modules.safetensors``, e.g. DiFFPO's threshold
controller), the step, and -- when saved between the inner iterations of a rollout -- that rollout's tensors (the
batch and the method's scores), so a resumed run continues bit for bit. Nothing is unpickled on load.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from stp import fsdp
from stp.files import fsync_dir, json_bytes, load_tensors, save_tensors, write_atomic, write_file
from stp.loss import RolloutBatch
from stp.metrics import truncate_metrics

if TYPE_CHECKING:
    from stp.config import TrainConfig

__all__ = ["CHECKPOINT_FORMAT", "SavedRollout", "find_resume", "start_or_resume", "StopFlag", "last_checkpoint",
           "save_checkpoint", "load_checkpoint", "trainable", "warn_config_changes"]

CHECKPOINT_FORMAT = 1
_KEEP_CHECKPOINTS = 2


# ------------------------------------------------------------------------------------------------- checkpoints


def last_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint directory (``checkpoints/step-NNNNNN`` holding state.json), or None."""
    root = Path(output_dir) / "checkpoints"
    found = []
    for d in root.glob("step-*") if root.is_dir() else []:
        if d.is_dir() and (d / "state.json").is_file() and d.name[5:].isdigit():
            found.append((int(d.name[5:]), d))
    return max(found)[1] if found else None


def _optimizer_to_files(state: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer state_dict -> (tensors for safetensors, JSON-ready rest): no pickling."""
    tensors, meta = {}, {"state": {}, "param_groups": []}
    for idx, st in state["state"].items():
        entry = {}
        for name, value in st.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{idx}.{name}"] = value.reshape(-1) if value.dim() == 0 else value
                entry[name] = {"tensor": f"{idx}.{name}", "scalar": value.dim() == 0}
            else:
                entry[name] = {"value": value}
        meta["state"][str(idx)] = entry
    for group in state["param_groups"]:
        meta["param_groups"].append({k: list(v) if isinstance(v, tuple) else v for k, v in group.items()})
    return tensors, meta


def _optimizer_from_files(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> dict:
    state = {}
    for idx, entry in meta["state"].items():
        st = {}
        for name, spec in entry.items():
            if "tensor" in spec:
                t = tensors[spec["tensor"]]
                st[name] = t.reshape(()) if spec["scalar"] else t
            else:
                st[name] = spec["value"]
        state[int(idx)] = st
    groups = []
    for g in meta["param_groups"]:
        g = dict(g)
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    return {"state": state, "param_groups": groups}


def _rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    py = random.getstate()
    np_state = np.random.get_state()
    tensors = {"torch": torch.get_rng_state(), "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64))}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{i}"] = s
    meta = {"python": [py[0], list(py[1]), py[2]], "numpy": [np_state[0], int(np_state[2]), int(np_state[3]),
                                                            float(np_state[4])]}
    return tensors, meta


def _set_rng_state(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
    py = meta["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = meta["numpy"]
    np.random.set_state((n[0], tensors["numpy_keys"].numpy().astype(np.uint32), n[1], n[2], n[3]))
    torch.set_rng_state(tensors["torch"])
    if torch.cuda.is_available():
        cuda = [tensors[f"cuda{i}"] for i in range(torch.cuda.device_count()) if f"cuda{i}" in tensors]
        if cuda:
            torch.cuda.set_rng_state_all(cuda)


@dataclass
class SavedRollout:
    """One rollout's tensors on this process (the batch and the method's scores, ``{name: [mu, B, ...]}``) plus its
    gathered metrics; reused for mu inner iterations and saved in checkpoints written between them."""

    index: int
    batch: RolloutBatch
    scores: dict[str, torch.Tensor]
    mask_seed: int
    metrics: dict = field(default_factory=dict)

    def to_files(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors = {f.name: getattr(self.batch, f.name) for f in fields(RolloutBatch)
                   if getattr(self.batch, f.name) is not None}
        tensors.update(self.scores)
        return tensors, {"index": self.index, "mask_seed": self.mask_seed, "metrics": self.metrics,
                         "scores": sorted(self.scores)}

    @classmethod
    def from_files(cls, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any], device) -> SavedRollout:
        t = {k: v.to(device) for k, v in tensors.items()}
        batch = RolloutBatch(**{f.name: t.get(f.name) for f in fields(RolloutBatch)})
        names = meta.get("scores", [n for n in ("old", "ref") if n in t])
        return cls(index=meta["index"], batch=batch, scores={n: t[n] for n in names}, mask_seed=meta["mask_seed"],
                   metrics=dict(meta["metrics"]))


def trainable(lm) -> dict[str, nn.Parameter]:
    return {n: p for n, p in lm.model.named_parameters() if p.requires_grad}


def _module_state(modules: Mapping[str, nn.Module] | None) -> dict[str, torch.Tensor]:
    """The state of a method's own trainable modules (``Method.trainable_modules``) as ``{module.key: tensor}``."""
    return {f"{name}.{k}": v.detach().cpu().contiguous() for name, mod in (modules or {}).items()
            for k, v in mod.state_dict().items()}


def save_checkpoint(out: Path, step: int, *, lm, optimizer, scheduler, state: Mapping[str, Any],
                    rollout: SavedRollout | None, accelerator,
                    modules: Mapping[str, nn.Module] | None = None) -> Path:
    """Write ``checkpoints/step-NNNNNN`` atomically: every process writes its own RNG (and rollout) files into the
    temporary directory, the main process the shared files and state.json last, then renames the directory.
    ``modules``: the method's own trainable modules, saved as ``method_modules.safetensors`` (only when given)."""
    root = out / "checkpoints"
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}"
    rank = accelerator.process_index
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    accelerator.wait_for_everyone()
    rng_tensors, rng_meta = _rng_state()
    save_tensors(tmp / f"rng-rank{rank}.safetensors", rng_tensors)
    write_file(tmp / f"rng-rank{rank}.json", json_bytes(rng_meta))
    if rollout is not None:
        r_tensors, r_meta = rollout.to_files()
        save_tensors(tmp / f"rollout-rank{rank}.safetensors", r_tensors)
        write_file(tmp / f"rollout-rank{rank}.json", json_bytes(r_meta))
    weights = fsdp.full_tensors(trainable(lm))  # whole tensors under FSDP (a collective); as they are otherwise
    o_state = fsdp.full_optimizer_state(optimizer.state_dict())
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_tensors(tmp / "trainable.safetensors", weights)
        if modules:
            save_tensors(tmp / "method_modules.safetensors", _module_state(modules))
        o_tensors, o_meta = _optimizer_to_files(o_state)
        save_tensors(tmp / "optimizer.safetensors", o_tensors)
        write_file(tmp / "optimizer.json", json_bytes(o_meta))
        write_file(tmp / "scheduler.json", json_bytes(scheduler.state_dict()))
        write_file(tmp / "state.json", json_bytes({**state, "format": CHECKPOINT_FORMAT, "step": step,
                                                     "num_processes": accelerator.num_processes,
                                                     "mid_rollout": rollout is not None}))
        fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        fsync_dir(root)
        old = sorted(d for d in root.glob("step-*") if d.is_dir() and d != final)
        for d in old[:max(0, len(old) - (_KEEP_CHECKPOINTS - 1))]:
            shutil.rmtree(d, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(path: Path, *, lm, optimizer, scheduler, accelerator,
                    modules: Mapping[str, nn.Module] | None = None) -> tuple[dict, SavedRollout | None]:
    state = json.loads((path / "state.json").read_text())
    if state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: checkpoint format {state.get('format')!r}; this version reads {CHECKPOINT_FORMAT}")
    if state["num_processes"] != accelerator.num_processes:
        raise ValueError(f"{path} was written by {state['num_processes']} processes; resume it with the same number "
                         f"(this run has {accelerator.num_processes})")
    weights = load_tensors(path / "trainable.safetensors")
    params = trainable(lm)
    if set(weights) != set(params):
        raise ValueError(f"{path}/trainable.safetensors holds other parameters than this model trains "
                         f"(e.g. {sorted(set(weights) ^ set(params))[:3]}): a different model or LoRA setting")
    with torch.no_grad():
        for name, p in params.items():
            fsdp.copy_into(p, weights[name])
    if modules:
        _load_module_state(path, modules)
    optimizer.load_state_dict(_optimizer_from_files(load_tensors(path / "optimizer.safetensors"),
                                                    json.loads((path / "optimizer.json").read_text())))
    fsdp.shard_optimizer_state(optimizer)
    scheduler.load_state_dict(json.loads((path / "scheduler.json").read_text()))
    rank = accelerator.process_index
    _set_rng_state(load_tensors(path / f"rng-rank{rank}.safetensors"),
                   json.loads((path / f"rng-rank{rank}.json").read_text()))
    rollout = None
    if state["mid_rollout"]:
        rollout = SavedRollout.from_files(load_tensors(path / f"rollout-rank{rank}.safetensors"),
                                      json.loads((path / f"rollout-rank{rank}.json").read_text()), lm.device)
    return state, rollout


def _load_module_state(path: Path, modules: Mapping[str, nn.Module]) -> None:
    file = path / "method_modules.safetensors"
    if not file.is_file():
        raise ValueError(f"{file}: missing; this run's method trains its own modules ({', '.join(modules)}), the "
                         f"checkpoint holds none (written by another method?)")
    saved = load_tensors(file)
    want = _module_state(modules)
    if set(saved) != set(want):
        raise ValueError(f"{file} holds other tensors than this run's method modules (e.g. "
                         f"{sorted(set(saved) ^ set(want))[:3]}): another method or setting")
    with torch.no_grad():
        for name, mod in modules.items():
            for k, v in mod.state_dict().items():
                v.copy_(saved[f"{name}.{k}"])


# ------------------------------------------------------------------------------------------------ stop, resume


class StopFlag:
    """SIGINT sets a flag the loop checks after each optimizer step (then: checkpoint, clean exit); a second SIGINT
    interrupts at once."""

    def __init__(self):
        self.set = False
        self._old = None

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.set:
            raise KeyboardInterrupt
        self.set = True
        print("\nstp.train: SIGINT: finishing this step, saving a checkpoint, then exiting (again to abort)",
              file=sys.stderr)

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


def warn_config_changes(path: Path, cfg: TrainConfig) -> None:
    """A resumed run reproduces the interrupted one only with the same settings: name every one that changed."""
    import yaml

    if not path.is_file():
        return
    before = yaml.safe_load(path.read_text())
    now = cfg.to_dict()
    changed = [f"{sec}.{k}: {v!r} -> {now[sec].get(k)!r}" for sec, fields in before.items() if isinstance(fields, dict)
               for k, v in fields.items() if (sec, k) != ("run", "resume") and now.get(sec, {}).get(k) != v]
    if changed:
        print("stp.train: warning: resuming with changed settings (metrics will differ from an uninterrupted run): "
              + "; ".join(changed), file=sys.stderr)


def find_resume(out: Path, resume: bool, main_process: bool) -> Path | None:
    """The checkpoint to resume from (``run.resume``), saying so when there is none; without ``run.resume`` a
    directory holding checkpoints is refused (a new run would mix its files with the old one's)."""
    last = last_checkpoint(out)
    if not resume and last is not None:
        from stp.config import ConfigError

        raise ConfigError.bad_value("run.output_dir", str(out), "a directory without checkpoints, or pass "
                                    f"--run.resume to continue the run there (last: {last.name})")
    if resume and last is None and main_process:
        print(f"stp.train: --run.resume: no complete checkpoint in {out}"
              f"{'' if out.is_dir() else ' (the directory does not exist)'}; training from scratch", file=sys.stderr)
    return last if resume else None


def start_or_resume(out: Path, cfg: TrainConfig, resume_from: Path | None, *, lm, optimizer, scheduler,
                    accelerator, modules: Mapping[str, nn.Module] | None = None,
                    ) -> tuple[int, SavedRollout | None, dict[str, Any]]:
    """(step, the rollout saved between its inner iterations or None, the run's counters) from ``resume_from`` or
    fresh; writes config.yaml, cuts metrics.jsonl back to the step and removes torn temporary checkpoints."""
    # wall_seconds: of the earlier processes of this run, up to their last checkpoint (the summary adds this one's).
    state: dict[str, Any] = {"nfe_sum": 0.0, "nfe_count": 0, "nan_streak": 0, "no_signal_streak": 0,
                             "train_seconds": 0.0,
                             "eval_before": None, "wall_seconds": 0.0}
    step, rollout = 0, None
    if resume_from is not None:
        saved, rollout = load_checkpoint(resume_from, lm=lm, optimizer=optimizer, scheduler=scheduler,
                                         accelerator=accelerator, modules=modules)
        step = saved["step"]
        state.update({k: saved.get(k, state[k]) for k in state})
        if accelerator.is_main_process:
            print(f"stp.train: resuming from {resume_from} (step {step})", file=sys.stderr)
            if step >= cfg.grpo.max_steps:
                print(f"stp.train: the run in {out} already finished (step {step} of {cfg.grpo.max_steps}): no "
                      "training; its held-out evaluation and summary are written again (raise grpo.max_steps to "
                      "train on)", file=sys.stderr)
            warn_config_changes(out / "config.yaml", cfg)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        write_atomic(out / "config.yaml", cfg.to_yaml().encode())
        truncate_metrics(out / "metrics.jsonl", step)
        truncate_metrics(out / "heldout.jsonl", step)
        for stale in (out / "checkpoints").glob(".tmp-*") if (out / "checkpoints").is_dir() else []:
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    return step, rollout, state
