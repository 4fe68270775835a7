"""The RL loop: token-level GRPO with Spatio-Temporal Pruning on a masked diffusion LM (METHOD.md 4, DESIGN.md).

Objective (``stp.loss``), for each rollout of ``prompts_per_step`` prompts x ``num_generations`` (G) completions::

    A_g   = (R_g - mean_group(R)) / (std_group(R) + 1e-4)        (grpo.scale_rewards=false: R - mean, as d1)
    r     = exp(logp_theta - logp_old)                           per token, same Monte-Carlo masks
    KL    = exp(logp_ref - logp_theta) - (logp_ref - logp_theta) - 1      (ref = base = LoRA adapter disabled)
    loss  = sum_tokens m * (-min(r A, clip(r, 1 - eps, 1 + eps) A) + beta KL) / sum_tokens m

with per-token log-probs from the configured estimator (``stp``: K random-count masks, anchors never masked;
``elbo``: the same without anchors; ``d1``: one fully masked draw with prompt masking). Rollouts start from the
static-prior canvas (spatial pruning, ``prior.enabled``) and stop early at floor(tau * L) decoded tokens (temporal
pruning, ``rollout.early_stop``). Each rollout is reused for mu = ``grpo.num_iterations`` optimizer steps; the old and
reference log-probs of all mu inner iterations are computed once, right after the rollout, without grad.

One optimizer step ("step" everywhere: metrics, checkpoints, ``grpo.max_steps``) is one inner iteration; rollout
``r = step // mu`` serves steps ``r * mu .. r * mu + mu - 1``.

Randomness. Nothing reads a global RNG in the loop: the data order of epoch e is a permutation from
``derive_seed(run.seed, "data", e)``, rollout r samples with noise seed ``derive_seed(run.seed, "rollout", r)`` and
scores with mask seed ``derive_seed(run.seed, "masks", r)`` (inner iteration ``it`` is the mask counter's iteration),
and every sample is keyed by its index in the step (``sample_ids``), so the completions of a sample do not depend on
how prompts are split across processes. The global RNG states (python, numpy, torch: LoRA dropout uses torch's) are
saved in every checkpoint anyway and restored on resume.

Checkpoints (``<output_dir>/checkpoints/step-NNNNNN``) are written into a temporary directory, every file fsync'ed,
then renamed: a directory with that name is complete. They hold the trainable weights (LoRA adapter or the full
model) as safetensors, the AdamW state as safetensors + JSON, the scheduler state and RNG states as JSON /
safetensors, the step, and -- when saved between the inner iterations of a rollout -- that rollout's tensors (prompts,
completions, advantages, old/ref log-probs), so a resumed run continues bit for bit. Nothing is unpickled on load.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import shutil
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from stp import fsdp
from stp.config import ConfigError, TrainConfig
from stp.loss import RolloutBatch, group_advantages, policy_loss, rollout_logprobs

__all__ = ["train", "derive_seed", "TrainingDiverged", "TIMING_KEYS", "last_checkpoint", "read_metrics"]

# Metrics that measure time: they differ between runs; every other field of metrics.jsonl is reproducible.
TIMING_KEYS = ("time_rollout", "time_scoring", "time_update", "step_seconds", "tokens_per_s", "rollout_tokens_per_s",
               "eval_seconds")
CHECKPOINT_FORMAT = 1
_KEEP_CHECKPOINTS = 2


class TrainingDiverged(RuntimeError):
    """``run.max_nan_steps`` consecutive non-finite losses: the run stopped (metrics and a checkpoint are written)."""


def derive_seed(seed: int, *parts: Any) -> int:
    """A 31-bit seed from ``seed`` and a tuple of labels/counters (SHA-256: independent streams per purpose)."""
    blob = json.dumps([int(seed), *parts], separators=(",", ":")).encode()
    return int.from_bytes(hashlib.sha256(blob).digest()[:8], "big") & 0x7FFFFFFF


# ------------------------------------------------------------------------------------------------------------ data


class DataOrder:
    """The prompt sequence: epoch e visits the N training examples in ``randperm(N)`` seeded by (seed, "data", e).
    Position q (prompts consumed so far) maps to example ``perm(q // N)[q % N]``; nothing else is stored."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed
        self._perms: dict[int, list[int]] = {}

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(derive_seed(self.seed, "data", epoch))
            self._perms[epoch] = torch.randperm(self.n, generator=g).tolist()
        return self._perms[epoch]

    def take(self, position: int, count: int) -> list[int]:
        return [self._perm(q // self.n)[q % self.n] for q in range(position, position + count)]


def _load_data(cfg: TrainConfig, task) -> tuple[list[dict], list[dict]]:
    """(training examples, held-out examples). With ``run.data_path`` the training rows come from that file; the
    held-out rows from ``run.data_source`` when it is 'hub' or 'generated', else the file's last ``eval_examples``
    rows (then left out of training)."""
    run = cfg.run
    n_eval = run.eval_examples
    if run.data_path is not None:
        rows = task.load("train", run.data_path, source="file")
        if run.data_source in ("hub", "generated"):
            held = task.load("test", source=run.data_source, n=n_eval) if n_eval else []
        else:
            k = min(n_eval, len(rows) // 2)
            held, rows = (rows[len(rows) - k:], rows[:len(rows) - k]) if k else ([], rows)
        if run.train_examples is not None:
            rows = rows[:run.train_examples]
        return rows, held
    source = run.data_source
    train_rows = task.load("train", source=source, n=run.train_examples)
    held = task.load("test", source=source, n=n_eval) if n_eval else []
    return train_rows, held


def _encode_prompts(tokenizer, texts: Sequence[str], pad_id: int, max_len: int | None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Texts -> left-padded ids [N, P] and mask [N, P]; longer prompts keep their LAST max_len tokens (TRL)."""
    seqs = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    if max_len is not None:
        seqs = [s[-max_len:] for s in seqs]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, width - len(s):] = 1
    return ids, mask


def _decode(tokenizer, completions: torch.Tensor, eos: int) -> list[str]:
    """[B, L] -> texts up to the first EOS (exclusive), special tokens skipped (as stp.eval)."""
    out = []
    for toks in completions.tolist():
        toks = toks[:toks.index(eos)] if eos in toks else toks
        out.append(tokenizer.decode(toks, skip_special_tokens=True))
    return out


# ----------------------------------------------------------------------------------------------------------- model


def _resolve_model(cfg: TrainConfig, accelerator) -> str:
    """``pretrained:TASK`` (the tiny model after ``stp.pretrain``'s SFT): built into the cache by the main process
    first, so that concurrent processes never build it twice; ``stp.models.load`` then finds it cached."""
    name = cfg.model.name_or_path
    if name.startswith("pretrained:"):
        from stp.pretrain import ensure_pretrained

        with accelerator.main_process_first():
            ensure_pretrained(task=name.split(":", 1)[1], progress=accelerator.is_main_process)
    return name


def _task_for(cfg: TrainConfig):
    """The task with the prompts of ``run.prompt_format`` (the tiny model reads the compact prompt of
    ``stp.pretrain``: d1's ~500-character system prompt is ~500 tokens for its character-level tokenizer)."""
    from stp.pretrain import task_with_prompt

    return task_with_prompt(cfg.run.task, cfg.run.prompt_format, d1_compat=cfg.run.d1_compat)


def _quantize_base_4bit(lm, compute_dtype: torch.dtype) -> None:
    """Replace the decoder's nn.Linear layers by bitsandbytes NF4 layers (CUDA only; the LM head stays dense for
    the fused log-prob op). check_environment() has already refused machines without CUDA or bitsandbytes."""
    import bitsandbytes as bnb

    decoder = lm.model.get_decoder()
    for module in list(decoder.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=compute_dtype, quant_type="nf4")
                q.weight = bnb.nn.Params4bit(child.weight.data.cpu(), requires_grad=False, quant_type="nf4")
                if child.bias is not None:
                    q.bias = nn.Parameter(child.bias.data.cpu(), requires_grad=False)
                setattr(module, child_name, q.cuda())


def _add_lora(lm, cfg: TrainConfig) -> None:
    from peft import LoraConfig, get_peft_model

    m = cfg.model
    lora = LoraConfig(r=m.lora_r, lora_alpha=m.lora_alpha, lora_dropout=m.lora_dropout,
                      target_modules=list(m.lora_target_modules), bias="none")
    # LoRA A is initialised from torch's global RNG: seed it from the config, leave the caller's state untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(cfg.run.seed, "lora-init"))
        lm.model = get_peft_model(lm.model, lora)


class _PolicyLoss(nn.Module):
    """The loss of one inner iteration as a module, so that ``accelerator.prepare`` can wrap it (DDP) and gradients
    are synchronised by the wrapper's own forward/backward hooks."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, batch: RolloutBatch, *, seed: int, iteration: int, old_logprobs: torch.Tensor,
                ref_logprobs: torch.Tensor | None, likelihood, epsilon: float, beta: float):
        return policy_loss(self.lm, batch, seed=seed, iteration=iteration, old_logprobs=old_logprobs,
                           ref_logprobs=ref_logprobs, likelihood=likelihood, epsilon=epsilon, beta=beta)


# ------------------------------------------------------------------------------------------------------ priors


def _ensure_priors(lm, cfg: TrainConfig, texts: Sequence[str], accelerator) -> dict[str, dict]:
    """The prior records of ``texts`` (by prompt id), building the missing ones with the base model into the prior
    file (``python -m stp.prior``'s format; lines appended and fsync'ed per batch) on the main process."""
    from stp.prior import build_priors, load_priors, prompt_id

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
                    recs = build_priors(lm, chunk, rho=p.rho, strategy=p.strategy, gen_length=r.gen_length,
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
        for key, ours in (("rho", p.rho), ("strategy", p.strategy)):
            if s.get(key) != ours:
                raise ConfigError(f"{path}: the prior of prompt {prompt_id(t)} was built with {key}={s.get(key)!r}, "
                                  f"this run has prior.{key}={ours!r}; use another prior.path or the same setting",
                                  field=f"prior.{key}", value=ours, allowed=repr(s.get(key)))
        out[prompt_id(t)] = rec
    return out


# ------------------------------------------------------------------------------------------------ atomic files


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _write_atomic(path: Path, data: bytes) -> None:
    """Temporary file in the same directory, fsync, rename, fsync the directory."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    _write_file(tmp, data)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode()


def _save_tensors(path: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    from safetensors.torch import save

    _write_file(path, save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}))


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


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
class _Rollout:
    """One rollout's tensors on this process plus its gathered metrics; reused for mu inner iterations."""

    index: int
    batch: RolloutBatch
    old: torch.Tensor  # [mu, B, C]
    ref: torch.Tensor | None  # [mu, B, C] or None (beta = 0)
    mask_seed: int
    metrics: dict = field(default_factory=dict)

    _FIELDS = ("prompt_ids", "prompt_attention_mask", "completion_ids", "advantages", "sample_ids", "anchors")

    def to_files(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors = {f: getattr(self.batch, f) for f in self._FIELDS if getattr(self.batch, f) is not None}
        tensors["old"] = self.old
        if self.ref is not None:
            tensors["ref"] = self.ref
        return tensors, {"index": self.index, "mask_seed": self.mask_seed, "metrics": self.metrics}

    @classmethod
    def from_files(cls, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any], device) -> _Rollout:
        t = {k: v.to(device) for k, v in tensors.items()}
        batch = RolloutBatch(**{f: t.get(f) for f in cls._FIELDS})
        return cls(index=meta["index"], batch=batch, old=t["old"], ref=t.get("ref"), mask_seed=meta["mask_seed"],
                   metrics=dict(meta["metrics"]))


def _trainable(lm) -> dict[str, nn.Parameter]:
    return {n: p for n, p in lm.model.named_parameters() if p.requires_grad}


def _save_checkpoint(out: Path, step: int, *, lm, optimizer, scheduler, state: Mapping[str, Any],
                     rollout: _Rollout | None, accelerator) -> Path:
    """Write ``checkpoints/step-NNNNNN`` atomically: every process writes its own RNG (and rollout) files into the
    temporary directory, the main process the shared files and state.json last, then renames the directory."""
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
    _save_tensors(tmp / f"rng-rank{rank}.safetensors", rng_tensors)
    _write_file(tmp / f"rng-rank{rank}.json", _json_bytes(rng_meta))
    if rollout is not None:
        r_tensors, r_meta = rollout.to_files()
        _save_tensors(tmp / f"rollout-rank{rank}.safetensors", r_tensors)
        _write_file(tmp / f"rollout-rank{rank}.json", _json_bytes(r_meta))
    trainable = fsdp.full_tensors(_trainable(lm))  # whole tensors under FSDP (collective); as they are otherwise
    o_state = fsdp.full_optimizer_state(optimizer.state_dict())
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _save_tensors(tmp / "trainable.safetensors", trainable)
        o_tensors, o_meta = _optimizer_to_files(o_state)
        _save_tensors(tmp / "optimizer.safetensors", o_tensors)
        _write_file(tmp / "optimizer.json", _json_bytes(o_meta))
        _write_file(tmp / "scheduler.json", _json_bytes(scheduler.state_dict()))
        _write_file(tmp / "state.json", _json_bytes({**state, "format": CHECKPOINT_FORMAT, "step": step,
                                                     "num_processes": accelerator.num_processes,
                                                     "mid_rollout": rollout is not None}))
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(root)
        old = sorted(d for d in root.glob("step-*") if d.is_dir() and d != final)
        for d in old[:max(0, len(old) - (_KEEP_CHECKPOINTS - 1))]:
            shutil.rmtree(d, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _load_checkpoint(path: Path, *, lm, optimizer, scheduler, accelerator) -> tuple[dict, _Rollout | None]:
    state = json.loads((path / "state.json").read_text())
    if state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: checkpoint format {state.get('format')!r}; this version reads {CHECKPOINT_FORMAT}")
    if state["num_processes"] != accelerator.num_processes:
        raise ValueError(f"{path} was written by {state['num_processes']} processes; resume it with the same number "
                         f"(this run has {accelerator.num_processes})")
    weights = _load_tensors(path / "trainable.safetensors")
    params = _trainable(lm)
    if set(weights) != set(params):
        raise ValueError(f"{path}/trainable.safetensors holds other parameters than this model trains "
                         f"(e.g. {sorted(set(weights) ^ set(params))[:3]}): a different model or LoRA setting")
    with torch.no_grad():
        for name, p in params.items():
            fsdp.copy_into(p, weights[name])
    optimizer.load_state_dict(_optimizer_from_files(_load_tensors(path / "optimizer.safetensors"),
                                                    json.loads((path / "optimizer.json").read_text())))
    fsdp.shard_optimizer_state(optimizer)
    scheduler.load_state_dict(json.loads((path / "scheduler.json").read_text()))
    rank = accelerator.process_index
    _set_rng_state(_load_tensors(path / f"rng-rank{rank}.safetensors"),
                   json.loads((path / f"rng-rank{rank}.json").read_text()))
    rollout = None
    if state["mid_rollout"]:
        rollout = _Rollout.from_files(_load_tensors(path / f"rollout-rank{rank}.safetensors"),
                                      json.loads((path / f"rollout-rank{rank}.json").read_text()), lm.device)
    return state, rollout


# ----------------------------------------------------------------------------------------------------- metrics


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The rows of a metrics.jsonl (a torn last line from a kill is ignored)."""
    rows = []
    lines = Path(path).read_text(encoding="utf-8").split("\n") if Path(path).exists() else []
    for i, line in enumerate(lines):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                if i < len(lines) - 1:
                    raise
    return rows


def _truncate_metrics(path: Path, step: int) -> None:
    """Keep only the rows of steps <= ``step`` (rows written after the checkpoint a resumed run starts from)."""
    if path.exists():
        keep = [r for r in read_metrics(path) if r["step"] <= step]
        _write_atomic(path, "".join(json.dumps(r) + "\n" for r in keep).encode())


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _plot(metrics_path: Path, png: Path) -> None:
    rows = read_metrics(metrics_path)
    if not rows:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, (a, b) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    a.plot(steps, [r["reward_mean"] for r in rows], label="rollout reward (mean)")
    ev = [(r["step"], r["eval_reward"]) for r in rows if r.get("eval_reward") is not None]
    if ev:
        a.plot(*zip(*ev), "o-", label="held-out reward")
    a.set_ylabel("reward")
    a.legend()
    mu = max(1, max(r["iteration"] for r in rows) + 1)
    b.stackplot(steps, [r["time_rollout"] / mu for r in rows], [r["time_scoring"] / mu for r in rows],
                [r["time_update"] for r in rows], labels=["rollout / mu", "scoring / mu", "update"])
    b.set_ylabel("seconds per step")
    b.set_xlabel("optimizer step")
    b.legend(loc="upper right")
    fig.tight_layout()
    tmp = png.with_name(f".{png.stem}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, png)


# -------------------------------------------------------------------------------------------------------- SIGINT


class _StopFlag:
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


# --------------------------------------------------------------------------------------------------------- train


def _warn_config_changes(path: Path, cfg: TrainConfig) -> None:
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


def _evaluate(lm, task, examples, cfg: TrainConfig) -> dict[str, float] | None:
    if not examples:
        return None
    from stp.eval import evaluate

    r = cfg.rollout
    res = evaluate(lm, task, examples, gen_length=r.gen_length, block_length=r.block_length, steps=r.steps,
                   batch_size=min(32, len(examples)), temperature=r.eval_temperature,
                   max_prompt_length=r.max_prompt_length or 0, seed=derive_seed(cfg.run.seed, "eval"),
                   progress=False, backend=cfg.run.backend)
    # What the reward is made of: how often the answer could be read at all, and the reward of the readable ones.
    readable = [r["reward"] for r in res["records"] if r["answer"] is not None]
    return {"reward": res["mean_reward"], "accuracy": res["accuracy"], "nfe": res["mean_nfe"],
            "seconds": res["seconds"], "answer_rate": len(readable) / len(res["records"]),
            "reward_of_answered": sum(readable) / len(readable) if readable else None}


def train(config: TrainConfig, *, progress: bool = False) -> dict[str, Any]:
    """Run GRPO with the configured estimator and prunings; returns the summary (also written to summary.json).

    Raises ConfigError / DataError before any model loads for bad settings or data, and TrainingDiverged after
    ``run.max_nan_steps`` non-finite losses in a row. On SIGINT it saves a checkpoint and returns the summary with
    ``interrupted: True``."""
    from accelerate import Accelerator
    from transformers import get_scheduler

    from stp import models
    from stp.sampler import generate

    cfg = config
    t_start = time.time()
    cfg.check_environment()
    m, ro, est, g, run = cfg.model, cfg.rollout, cfg.estimator, cfg.grpo, cfg.run
    accelerator = Accelerator(cpu=run.device == "cpu", mixed_precision=run.mixed_precision)
    fsdp.check(accelerator)
    world, rank = accelerator.num_processes, accelerator.process_index
    # The only global-RNG consumer in the loop is dropout (LoRA dropout); seed it per process from the config.
    global_seed = derive_seed(run.seed, "global-rng", rank)
    random.seed(global_seed)
    np.random.seed(global_seed)
    torch.manual_seed(global_seed)
    if g.prompts_per_step % world:
        raise ConfigError.bad_value("grpo.prompts_per_step", g.prompts_per_step,
                                    f"a multiple of the number of processes ({world}): prompts are split by rank")
    local_prompts = g.prompts_per_step // world
    local_samples = local_prompts * g.num_generations
    if local_samples % g.gradient_accumulation_steps:
        raise ConfigError.bad_value("grpo.gradient_accumulation_steps", g.gradient_accumulation_steps,
                                    f"a divisor of the samples per process ({local_samples})")
    mu = g.num_iterations
    out = Path(run.output_dir)
    metrics_path = out / "metrics.jsonl"
    resume_from = last_checkpoint(out) if run.resume else None
    if not run.resume and last_checkpoint(out) is not None:
        raise ConfigError.bad_value("run.output_dir", run.output_dir, "a directory without checkpoints, or pass "
                                    f"--run.resume to continue the run there (last: {last_checkpoint(out).name})")

    # ---- data (before the model: bad data fails fast)
    from stp.tasks import get_task

    train_rows, heldout = _load_data(cfg, get_task(run.task, d1_compat=run.d1_compat))
    order = DataOrder(len(train_rows), run.seed)
    num_rollouts = -(-g.max_steps // mu)

    # ---- model: base (priors are built with it), then LoRA; reference = the adapter disabled
    dtype = None if m.dtype == "auto" else getattr(torch, m.dtype)
    lm = models.load(_resolve_model(cfg, accelerator), dtype=dtype, device=accelerator.device,
                     attn_implementation=m.attn_implementation)
    if lm.tokenizer is None:
        raise ValueError(f"model {m.name_or_path!r} has no tokenizer: prompts cannot be rendered")
    task = _task_for(cfg)
    tok, eos, pad = lm.tokenizer, lm.eos_token_id, lm.pad_token_id
    prompt_text = {}

    def text_of(i: int) -> str:
        if i not in prompt_text:
            prompt_text[i] = task.format_prompt(train_rows[i], tok)
        return prompt_text[i]

    priors = None
    if cfg.prior.enabled:
        used = order.take(0, num_rollouts * g.prompts_per_step)
        priors = _ensure_priors(lm, cfg, [text_of(i) for i in used], accelerator)
    if m.load_in_4bit:
        _quantize_base_4bit(lm, dtype or torch.bfloat16)
    if m.use_lora:
        _add_lora(lm, cfg)
    else:
        lm.model.requires_grad_(True)
    if m.gradient_checkpointing:
        lm.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if m.use_lora:
            lm.model.enable_input_require_grads()
    lm.to(accelerator.device)
    ref_context = lm.model.disable_adapter if (m.use_lora and g.beta > 0) else None
    likelihood = est.to_likelihood_config(run.backend)

    params = list(_trainable(lm).values())
    optimizer = torch.optim.AdamW(params, lr=g.learning_rate, betas=(g.adam_beta1, g.adam_beta2),
                                  eps=g.adam_epsilon, weight_decay=g.weight_decay)
    scheduler = get_scheduler(g.lr_scheduler_type, optimizer, num_warmup_steps=g.warmup_steps,
                              num_training_steps=g.max_steps)
    # The scheduler stays unprepared: accelerate's wrapper would step it once per process per optimizer step.
    policy, optimizer = accelerator.prepare(_PolicyLoss(lm), optimizer)
    if fsdp.is_sharded(policy):  # fully_shard replaced the parameters by sharded ones
        params = list(_trainable(lm).values())

    # ---- start or resume
    state: dict[str, Any] = {"nfe_sum": 0.0, "nfe_count": 0, "nan_streak": 0, "train_seconds": 0.0,
                             "eval_before": None}
    step, rollout = 0, None
    if resume_from is not None:
        saved, rollout = _load_checkpoint(resume_from, lm=lm, optimizer=optimizer, scheduler=scheduler,
                                          accelerator=accelerator)
        step = saved["step"]
        state.update({k: saved[k] for k in state})
        if accelerator.is_main_process:
            print(f"stp.train: resuming from {resume_from} (step {step})", file=sys.stderr)
            _warn_config_changes(out / "config.yaml", cfg)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        _write_atomic(out / "config.yaml", cfg.to_yaml().encode())
        _truncate_metrics(metrics_path, step)
        for stale in (out / "checkpoints").glob(".tmp-*") if (out / "checkpoints").is_dir() else []:
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    if resume_from is None and run.eval_examples:
        with fsdp.full_parameters(accelerator, policy):
            if accelerator.is_main_process:
                state["eval_before"] = _evaluate(lm, task, heldout, cfg)
    writer = None
    if run.tensorboard and accelerator.is_main_process:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            print("stp.train: warning: run.tensorboard is on but the tensorboard package is not installed "
                  "(`pip install tensorboard`); writing metrics.jsonl only", file=sys.stderr)
        else:
            writer = SummaryWriter(str(out / "tensorboard"), purge_step=step + 1 if step else None)

    bar = None
    if progress and accelerator.is_main_process:
        from tqdm.auto import tqdm

        bar = tqdm(total=g.max_steps, initial=step, desc=f"RL {cfg.preset} ({est.estimator})", unit="step",
                   dynamic_ncols=True)
    t_segment = time.time()
    interrupted, diverged = False, False
    with _StopFlag() as stop, open(metrics_path, "a", encoding="utf-8") if accelerator.is_main_process \
            else contextlib.nullcontext() as mfile:
        while step < g.max_steps:
            r, it = divmod(step, mu)

            if rollout is None or rollout.index != r:
                # ================= rollout r: P prompts x G completions, split across processes by rank
                t0 = time.time()
                idx = order.take(r * g.prompts_per_step, g.prompts_per_step)  # global example indices [P]
                texts = [text_of(i) for i in idx]
                ids_all, attn_all = _encode_prompts(tok, texts, pad, ro.max_prompt_length)  # [P, Lp] (global pad)
                lo, hi = rank * local_prompts, (rank + 1) * local_prompts
                rep = g.num_generations
                prompt_ids = ids_all[lo:hi].repeat_interleave(rep, 0).to(accelerator.device)  # [B, Lp], B = p*G
                prompt_mask = attn_all[lo:hi].repeat_interleave(rep, 0).to(accelerator.device)  # [B, Lp]
                sample_ids = torch.arange(lo * rep, hi * rep, device=accelerator.device)  # [B] index in the step
                fsdp.unshard_all(accelerator, policy)  # whole weights for rollout and scoring (see stp.fsdp)
                prior = None
                if priors is not None:
                    from stp.prior import prompt_id, to_sampler_prior

                    recs = [priors[prompt_id(texts[j])] for j in range(lo, hi) for _ in range(rep)]
                    prior = to_sampler_prior(recs, ro.gen_length, device=accelerator.device)  # [B, L] each
                lm.eval()
                with accelerator.autocast():
                    gen = generate(lm, prompt_ids, attention_mask=prompt_mask, gen_length=ro.gen_length,
                                   block_length=ro.block_length, steps=ro.steps, temperature=ro.temperature,
                                   remasking=ro.remasking, prior=prior, early_stop=ro.early_stop,
                                   seed=derive_seed(run.seed, "rollout", r), sample_ids=sample_ids,
                                   cfg_scale=ro.cfg_scale, confidence_threshold=ro.confidence_threshold,
                                   backend=run.backend)
                completions = gen.completions  # [B, L]
                t_rollout = time.time() - t0

                # ================= scoring: rewards -> advantages -> old/ref log-probs for all mu iterations
                t0 = time.time()
                texts_out = _decode(tok, completions.cpu(), eos)
                examples = [train_rows[idx[j]] for j in range(lo, hi) for _ in range(rep)]
                per_fn = [task.rewards(c, ex) for c, ex in zip(texts_out, examples)]
                fn_names = list(per_fn[0])
                fn_rewards = torch.tensor([[d[n] for n in fn_names] for d in per_fn], dtype=torch.float32,
                                          device=accelerator.device)  # [B, F]
                rewards = fn_rewards.sum(1)  # [B]
                advantages = group_advantages(rewards, rep, scale_rewards=g.scale_rewards)  # [B] (groups are local)
                batch = RolloutBatch(prompt_ids=prompt_ids, prompt_attention_mask=prompt_mask,
                                     completion_ids=completions, advantages=advantages, sample_ids=sample_ids,
                                     anchors=None if prior is None else prior.mask)
                mask_seed = derive_seed(run.seed, "masks", r)
                lm.train()
                with accelerator.autocast():
                    old, ref = rollout_logprobs(lm, batch, seed=mask_seed, num_iterations=mu, likelihood=likelihood,
                                                beta=g.beta, ref_context=ref_context)  # [mu, B, C] each
                fsdp.reshard_all(accelerator, policy)
                t_scoring = time.time() - t0

                # gathered over processes (rank-major = the global sample order)
                all_fn = accelerator.gather(fn_rewards)  # [P*G, F]
                all_r = all_fn.sum(1)
                nfe = accelerator.gather(gen.nfe.float())  # [P*G]
                lengths = accelerator.gather(((completions == eos).cumsum(1) == 0).sum(1).float())
                one_shot = accelerator.gather(gen.num_one_shot.float())
                anchors = accelerator.gather(gen.anchors_kept.float())
                rm = {"reward_mean": all_r.mean().item(), "reward_std": all_r.std().item() if all_r.numel() > 1
                      else 0.0, "nfe": nfe.mean().item(), "completion_tokens": lengths.mean().item(),
                      "one_shot_fraction": one_shot.mean().item() / ro.gen_length,
                      "anchor_fraction": anchors.mean().item() / ro.gen_length,
                      "time_rollout": t_rollout, "time_scoring": t_scoring,
                      "rollout_tokens_per_s": all_r.numel() * ro.gen_length / max(t_rollout, 1e-9)}
                for j, name in enumerate(fn_names):
                    rm[f"reward/{name}_mean"] = all_fn[:, j].mean().item()
                    rm[f"reward/{name}_std"] = all_fn[:, j].std().item() if all_fn.shape[0] > 1 else 0.0
                state["nfe_sum"] += nfe.sum().item()
                state["nfe_count"] += nfe.numel()
                rollout = _Rollout(index=r, batch=batch, old=old, ref=ref, mask_seed=mask_seed, metrics=rm)

            # ================= inner iteration it: current log-probs with grad on the masks of (mask_seed, it)
            t0 = time.time()
            lm.train()
            b = rollout.batch
            n_micro = g.gradient_accumulation_steps
            size = b.completion_ids.shape[0] // n_micro
            optimizer.zero_grad(set_to_none=True)
            losses, kls, clips, ratios = [], [], [], []
            for k in range(n_micro):
                sl = slice(k * size, (k + 1) * size)
                micro = RolloutBatch(**{f: None if getattr(b, f) is None else getattr(b, f)[sl]
                                        for f in _Rollout._FIELDS})  # [B/n_micro, ...]
                sync = contextlib.nullcontext() if k == n_micro - 1 else accelerator.no_sync(policy)
                with sync:
                    loss, lm_metrics = policy(micro, seed=rollout.mask_seed, iteration=it,
                                              old_logprobs=rollout.old[:, sl],
                                              ref_logprobs=None if rollout.ref is None else rollout.ref[:, sl],
                                              likelihood=likelihood, epsilon=g.epsilon, beta=g.beta)
                    accelerator.backward(loss / n_micro)
                losses.append(loss.detach())
                kls.append(lm_metrics["kl"])
                clips.append(lm_metrics["clip_fraction"])
                ratios.append(lm_metrics["ratio"])
            stats = torch.stack([torch.stack(losses).mean(), torch.stack(kls).mean(), torch.stack(clips).mean(),
                                 torch.stack(ratios).mean()]).float()
            stats = accelerator.reduce(stats, reduction="mean")  # NaN anywhere -> NaN everywhere: all ranks agree
            loss_v, kl_v, clip_v, ratio_v = stats.tolist()
            grad_norm = None
            skipped = not math.isfinite(loss_v)
            if not skipped:
                if g.max_grad_norm > 0:
                    grad_norm = float(accelerator.clip_grad_norm_(params, g.max_grad_norm))
                    skipped = not math.isfinite(grad_norm)
            if skipped:
                optimizer.zero_grad(set_to_none=True)
                state["nan_streak"] += 1
            else:
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                state["nan_streak"] = 0
            t_update = time.time() - t0
            step += 1

            # ================= metrics
            rm = rollout.metrics
            step_seconds = (rm["time_rollout"] + rm["time_scoring"]) / mu + t_update
            row = {"step": step, "rollout": r, "iteration": it, "epoch": (r * g.prompts_per_step) // order.n,
                   **{k: v for k, v in rm.items() if k not in TIMING_KEYS},
                   "loss": _finite(loss_v), "kl": _finite(kl_v), "clip_fraction": _finite(clip_v),
                   "ratio": _finite(ratio_v), "grad_norm": grad_norm, "lr": scheduler.get_last_lr()[0],
                   "skipped": skipped, "time_rollout": rm["time_rollout"], "time_scoring": rm["time_scoring"],
                   "time_update": t_update, "step_seconds": step_seconds,
                   "tokens_per_s": g.samples_per_step * ro.gen_length / mu / step_seconds,
                   "rollout_tokens_per_s": rm["rollout_tokens_per_s"]}
            ev = None
            if run.eval_every and step % run.eval_every == 0 and step < g.max_steps:
                with fsdp.full_parameters(accelerator, policy):
                    if accelerator.is_main_process:
                        ev = _evaluate(lm, task, heldout, cfg)
                if ev is not None:
                    row.update(eval_reward=ev["reward"], eval_accuracy=ev["accuracy"],
                               eval_answer_rate=ev["answer_rate"], eval_seconds=ev["seconds"])
            if accelerator.is_main_process:
                if skipped:
                    print(f"stp.train: step {step}: non-finite loss or gradient ({loss_v}, grad norm {grad_norm}); "
                          f"update skipped ({state['nan_streak']} in a row, limit {run.max_nan_steps})",
                          file=sys.stderr)
                if step % run.log_every == 0 or step == g.max_steps or skipped:
                    mfile.write(json.dumps(row) + "\n")
                    mfile.flush()
                    os.fsync(mfile.fileno())
                if writer is not None:
                    for key, value in row.items():
                        if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
                            writer.add_scalar(key if "/" in key else f"train/{key}", value, step)
                if bar is not None:
                    bar.set_postfix(reward=f"{rm['reward_mean']:.3f}", loss=f"{loss_v:.4f}", nfe=f"{rm['nfe']:.1f}")
                    bar.update(1)

            # ================= checkpoint / stop
            flag = torch.tensor([1.0 if stop.set else 0.0], device=accelerator.device)
            interrupted = bool(accelerator.reduce(flag, reduction="sum").item() > 0)
            diverged = state["nan_streak"] >= run.max_nan_steps
            done = step == g.max_steps
            if (run.save_every and step % run.save_every == 0) or done or interrupted or diverged:
                state["train_seconds"] += time.time() - t_segment
                t_segment = time.time()
                mid = rollout if (step % mu and not done) else None
                _save_checkpoint(out, step, lm=lm, optimizer=optimizer, scheduler=scheduler, state=state,
                                 rollout=mid, accelerator=accelerator)
            if interrupted or diverged:
                break
    if bar is not None:
        bar.close()
    state["train_seconds"] += time.time() - t_segment

    # ---- the end: held-out evaluation, plot, summary
    summary: dict[str, Any] = {}
    lora_state = fsdp.full_lora_state(lm.model, policy) if m.use_lora else None  # whole under FSDP, else None
    fsdp.unshard_all(accelerator, policy)  # the final evaluation reads whole weights
    if accelerator.is_main_process:
        after = _evaluate(lm, task, heldout, cfg) if not (interrupted or diverged) else None
        before = state["eval_before"]
        summary = {
            "preset": cfg.preset, "estimator": est.estimator, "task": run.task, "model": m.name_or_path,
            "steps": step, "max_steps": g.max_steps, "rollouts": -(-step // mu),
            "reward_before": None if before is None else before["reward"],
            "reward_after": None if after is None else after["reward"],
            "accuracy_before": None if before is None else before["accuracy"],
            "accuracy_after": None if after is None else after["accuracy"],
            "answer_rate_before": None if before is None else before.get("answer_rate"),
            "answer_rate_after": None if after is None else after["answer_rate"],
            "reward_of_answered_before": None if before is None else before.get("reward_of_answered"),
            "reward_of_answered_after": None if after is None else after["reward_of_answered"],
            "eval_examples": len(heldout),
            "nfe_per_sample": state["nfe_sum"] / max(1, state["nfe_count"]),
            "wall_seconds": time.time() - t_start, "train_seconds": state["train_seconds"],
            "interrupted": interrupted, "diverged": diverged, "num_processes": world,
            "output_dir": str(out),
        }
        _write_atomic(out / "summary.json", _json_bytes(summary))
        _plot(metrics_path, out / "progress.png")
        if m.use_lora and not (interrupted or diverged):
            # adapter_model.safetensors + adapter_config.json
            lm.model.save_pretrained(str(out / "adapter"), state_dict=lora_state)
        if writer is not None:
            writer.close()
    fsdp.reshard_all(accelerator, policy)
    accelerator.wait_for_everyone()
    if diverged:
        raise TrainingDiverged(f"{run.max_nan_steps} consecutive non-finite losses (run.max_nan_steps); stopped at "
                               f"step {step}, checkpoint and metrics in {out}")
    return summary
