"""What a run reports: metrics.jsonl and one of accelerate's trackers (TensorBoard, wandb, MLflow), the held-out
evaluation, progress.png and summary.json."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stp.files import write_atomic
from stp.seeds import derive_seed

if TYPE_CHECKING:
    from stp.config import TrainConfig

__all__ = ["TIMING_KEYS", "MetricsLog", "flat_config", "total_reward", "read_metrics", "truncate_metrics", "finite",
           "plot", "progress_figure", "evaluate_heldout", "batch_passes"]

# Metrics that measure time: they differ between runs; every other field of metrics.jsonl is reproducible.
TIMING_KEYS = ("time_rollout", "time_scoring", "time_update", "step_seconds", "tokens_per_s", "rollout_tokens_per_s",
               "eval_seconds")


class MetricsLog:
    """metrics.jsonl (one row per logged step, fsync'ed) and one of accelerate's experiment trackers
    (``run.report_to``): TensorBoard events under ``OUT/tensorboard`` (purged past ``step`` on resume), a wandb
    run or an MLflow run (``OUT/mlruns`` unless ``MLFLOW_TRACKING_URI`` says otherwise), with the flattened config.
    Built on the main process only; the trackers are started and finished here, not through
    ``Accelerator.init_trackers``, so the Accelerator needs no tracker settings and ``end_training`` (which also
    tears down the process group) is not needed."""

    def __init__(self, out: Path, step: int, report_to: str = "tensorboard", config: Mapping[str, Any] | None = None):
        self.file = open(out / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115 - closed by close()
        self.tracker = _tracker(report_to, out, step)
        if self.tracker is not None:
            self.tracker.start()
            if config is not None and report_to != "tensorboard":  # TensorBoard's hparams add a directory per run
                self.tracker.store_init_configuration(dict(config))

    def _log(self, values: Mapping[str, Any], step: int) -> None:
        scalars = {_tensorboard_tag(k): v for k, v in values.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step" and math.isfinite(v)}
        if self.tracker is not None and scalars:
            self.tracker.log(scalars, step=step)

    def write(self, row: Mapping[str, Any], *, jsonl: bool) -> None:
        if jsonl:
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()
            os.fsync(self.file.fileno())
        self._log(row, row["step"])

    def heldout(self, ev: Mapping[str, Any] | None, step: int) -> None:
        """A held-out evaluation outside the step rows (before training: step 0; after it: the last step)."""
        self._log(eval_columns(ev), step)

    def close(self) -> None:
        self.file.close()
        if self.tracker is not None:
            self.tracker.finish()


def _tracker(report_to: str, out: Path, step: int):
    """accelerate's tracker for ``report_to`` (None for "none"); a missing package is a ConfigError naming it."""
    if report_to == "none":
        return None
    from accelerate import tracking

    needs = {"tensorboard": ("tensorboard", tracking.is_tensorboard_available), "wandb": ("wandb",
             tracking.is_wandb_available), "mlflow": ("mlflow", tracking.is_mlflow_available)}
    if report_to not in needs:
        from stp.config import REPORT_TO, ConfigError

        raise ConfigError.bad_value("run.report_to", report_to, "one of " + ", ".join(REPORT_TO))
    package, available = needs[report_to]
    if not available():
        from stp.config import ConfigError

        raise ConfigError.bad_value("run.report_to", report_to, f"a tracker whose package is installed ({package} "
                                    f"is not: pip install {package}), or none")
    if report_to == "tensorboard":
        return tracking.TensorBoardTracker("tensorboard", str(out), purge_step=step + 1 if step else None)
    if report_to == "wandb":
        return tracking.WandBTracker("stp", dir=str(out))
    return tracking.MLflowTracker("stp", logging_dir=str(out / "mlruns"), run_name=out.name)


def flat_config(cfg: TrainConfig) -> dict[str, Any]:
    """The config as ``{"section.field": value}`` with lists joined by commas (trackers take flat scalars)."""
    out: dict[str, Any] = {}
    for key, value in cfg.to_dict().items():
        if isinstance(value, Mapping):
            for name, v in value.items():
                out[f"{key}.{name}"] = ",".join(map(str, v)) if isinstance(v, (list, tuple)) else v
        else:
            out[key] = value
    return out


def _tensorboard_tag(key: str) -> str:
    """metrics.jsonl key -> TensorBoard tag: eval_x -> eval/x (held-out), reward/x as is, the rest train/x."""
    if key.startswith("eval_"):
        return "eval/" + key.removeprefix("eval_")
    return key if "/" in key else f"train/{key}"


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


def truncate_metrics(path: Path, step: int) -> None:
    """Keep only the rows of steps <= ``step`` (rows written after the checkpoint a resumed run starts from)."""
    if path.exists():
        keep = [r for r in read_metrics(path) if r["step"] <= step]
        write_atomic(path, "".join(json.dumps(r) + "\n" for r in keep).encode())


def finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def plot(metrics_path: Path, png: Path, *, title: str = "", before: float | None = None,
         after: float | None = None, last_step: int | None = None) -> None:
    """progress.png (``progress_figure`` of metrics.jsonl's rows), written atomically."""
    rows = read_metrics(metrics_path)
    if not rows:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = progress_figure(rows, title=title, before=before, after=after, last_step=last_step)
    tmp = png.with_name(f".{png.stem}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=100, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, png)


def progress_figure(rows: list[dict], *, title: str = "", before: float | None = None, after: float | None = None,
                    last_step: int | None = None):
    """Rewards per step with the held-out reward before training (step 0), at each ``run.eval_every`` and after it
    (the last step) as separate points (the evaluations are measurements, not a trend between them; the numbers are
    in the panel's title, off the curves), and the seconds each optimizer step cost, split into its share of the
    rollout, of the scoring and its own update. The legends sit above their panels, off the curves' ends; the step
    axis has integer ticks. The time axis stops at 3x the median step so that one slow step (a held-out evaluation,
    a busy machine) does not flatten the rest; steps above it are named in the panel."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    steps = [r["step"] for r in rows]
    fig, (a, b) = plt.subplots(2, 1, figsize=(7.5, 7.0), sharex=True)
    if title:
        fig.suptitle(title)
    a.plot(steps, [r["reward_mean"] for r in rows], label="reward of the training rollouts (mean)")
    ev = [(r["step"], r["eval_reward"]) for r in rows if r.get("eval_reward") is not None]
    end = last_step if last_step is not None else steps[-1]
    if before is not None:
        ev = [(0, before), *ev]
    if after is not None:
        ev = [*ev, (end, after)]
    if ev:
        a.plot(*zip(*ev), "o", linestyle="none", color="C3", label="held-out reward")
    if before is not None and after is not None:
        a.set_title(f"held-out reward: {before:.3f} before, {after:.3f} after step {end}", fontsize=10, color="C3")
    a.set_ylabel("reward")
    a.legend(loc="lower left", bbox_to_anchor=(0.0, 1.08 if before is not None and after is not None else 1.0),
             ncol=2, fontsize=8, frameon=False)
    mu = max(1, max(r["iteration"] for r in rows) + 1)
    parts = [[r["time_rollout"] / mu for r in rows], [r["time_scoring"] / mu for r in rows],
             [r["time_update"] for r in rows]]
    b.stackplot(steps, *parts, labels=[f"rollout (shared by the {mu} steps of a rollout)",
                                       f"scoring (shared by the {mu} steps)", "update"])
    totals = sorted(sum(p[i] for p in parts) for i in range(len(rows)))
    cap = 3 * totals[len(totals) // 2]
    slow = [r["step"] for r, t in zip(rows, (sum(p[i] for p in parts) for i in range(len(rows)))) if t > cap]
    if cap > 0 and slow:
        b.set_ylim(0, cap)
        b.text(0.01, 0.95, f"cut at 3x the median; slower: step {', '.join(map(str, slow[:6]))}"
               f"{' ...' if len(slow) > 6 else ''}", transform=b.transAxes, va="top", fontsize=8)
    b.set_ylabel("seconds per optimizer step")
    b.set_xlabel("optimizer step")
    b.legend(loc="lower left", bbox_to_anchor=(0.0, 1.0), ncol=2, fontsize=8, frameon=False)
    b.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    return fig


def batch_passes(nfe, batch_size: int) -> float:
    """Mean forward passes per ``generate`` call when the per-sample NFE ``nfe`` (in call order) was decoded in
    consecutive calls of ``batch_size`` samples: a call runs until its slowest row is done, max(NFE) passes over
    the whole batch (finished rows stay in it), so this is the mean over calls of the max NFE of the call's rows.
    ``nfe`` per sample (its mean) counts only the passes a row used; the two agree when every row needs the same
    number."""
    values = [float(v) for v in (nfe.tolist() if hasattr(nfe, "tolist") else nfe)]
    if not values:
        raise ValueError("batch_passes: no NFE values")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_passes: batch_size={batch_size!r}; allowed: an integer >= 1")
    calls = [max(values[i:i + batch_size]) for i in range(0, len(values), batch_size)]
    return sum(calls) / len(calls)


def evaluate_heldout(lm, task, examples, cfg: TrainConfig, *, progress: bool = False,
                     **decoding: Any) -> dict[str, float] | None:
    """Greedy held-out evaluation with the run's decoding settings; ``decoding``: the method's extra ones
    (``Method.eval_kwargs``, e.g. the entropy bound or threshold controller); ``progress``: a bar."""
    if not examples:
        return None
    from stp.evaluation import evaluate

    r = cfg.rollout
    res = evaluate(lm, task, examples, gen_length=r.gen_length, block_length=r.block_length, steps=r.steps,
                   batch_size=min(32, len(examples)), temperature=r.eval_temperature,
                   max_prompt_length=r.max_prompt_length or 0, seed=derive_seed(cfg.run.seed, "eval"),
                   progress=progress, backend=cfg.run.backend, **decoding)
    # What the reward is made of: how often the answer could be read at all, and the reward of the readable ones.
    readable = [r["reward"] for r in res["records"] if r["answer"] is not None]
    return {"reward": res["mean_reward"], "accuracy": res["accuracy"], "nfe": res["mean_nfe"],
            "batch_passes": batch_passes([r["nfe"] for r in res["records"]], min(32, len(examples))),
            "seconds": res["seconds"], "answer_rate": len(readable) / len(res["records"]),
            "reward_of_answered": sum(readable) / len(readable) if readable else None,
            # per held-out example, in the held-out set's order: what paired comparisons between runs read
            "rewards": [r["reward"] for r in res["records"]], "metrics": [r["metric"] for r in res["records"]]}


def record_heldout(out: Path, step: int, ev: Mapping[str, Any] | None) -> None:
    """Append one held-out evaluation's per-example rewards and metrics to ``out/heldout.jsonl`` (step 0 = before
    training): the paired comparisons between runs read it (``benchmarks/methods.py``)."""
    if ev is None or "rewards" not in ev:
        return
    line = json.dumps({"step": step, "rewards": ev["rewards"], "metrics": ev["metrics"]}, separators=(",", ":"))
    with open(out / "heldout.jsonl", "a") as f:
        f.write(line + "\n")


def eval_columns(ev: Mapping[str, Any] | None) -> dict[str, Any]:
    """The metrics.jsonl columns of a held-out evaluation (none when there was none)."""
    if ev is None:
        return {}
    return {"eval_reward": ev["reward"], "eval_accuracy": ev["accuracy"], "eval_answer_rate": ev["answer_rate"],
            "eval_nfe": ev["nfe"], "eval_batch_passes": ev["batch_passes"], "eval_seconds": ev["seconds"]}


def total_reward(fn_rewards, weights=None):
    """[B, F] reward-function values (NaN = not applicable) -> [B] weighted totals, a NaN counting as 0 (TRL's
    nansum). Plain ``sum(1)`` when the weights are all 1 and nothing is NaN (the built-in tasks: bit for bit)."""
    import torch

    if weights is not None and any(w != 1.0 for w in weights):
        fn_rewards = fn_rewards * torch.tensor(weights, dtype=fn_rewards.dtype, device=fn_rewards.device)
    if torch.isnan(fn_rewards).any():
        fn_rewards = torch.nan_to_num(fn_rewards, nan=0.0)
    return fn_rewards.sum(1)


def _mean_std(x) -> tuple[float | None, float | None]:
    """Mean and std of the values that are not NaN (None from a reward function); None when there are none."""
    import torch

    x = x[~torch.isnan(x)]
    if x.numel() == 0:
        return None, None
    return x.mean().item(), x.std().item() if x.numel() > 1 else 0.0


def rollout_metrics(accelerator, fn_names: list[str], fn_rewards, gen, completions, eos: int, gen_length: int,
                    t_rollout: float, t_scoring: float, state: dict[str, Any], weights=None) -> dict[str, Any]:
    """The rollout's metrics, gathered over processes (rank-major = the global sample order); adds the NFE to the
    run's totals in ``state``. A reward function's mean and std leave out its None (NaN) values. ``nfe``: the mean
    forward passes a sample used; ``batch_passes``: the passes its ``generate`` call ran, max(NFE) over the call's
    rows (finished rows stay in the batch), averaged over the processes' calls."""
    all_fn = accelerator.gather(fn_rewards)  # [P*G, F]
    all_r = total_reward(all_fn, weights)
    nfe = accelerator.gather(gen.nfe.float())  # [P*G]
    passes = accelerator.gather(gen.nfe.float().max().reshape(1))  # [P]: one generate call per process
    lengths = accelerator.gather(((completions == eos).cumsum(1) == 0).sum(1).float())
    one_shot = accelerator.gather(gen.num_one_shot.float())
    anchors = accelerator.gather(gen.anchors_kept.float())
    rm = {"reward_mean": all_r.mean().item(), "reward_std": all_r.std().item() if all_r.numel() > 1 else 0.0,
          "nfe": nfe.mean().item(), "batch_passes": passes.mean().item(), "completion_tokens": lengths.mean().item(),
          "one_shot_fraction": one_shot.mean().item() / gen_length,
          "anchor_fraction": anchors.mean().item() / gen_length,
          "time_rollout": t_rollout, "time_scoring": t_scoring,
          "rollout_tokens_per_s": all_r.numel() * gen_length / max(t_rollout, 1e-9)}
    for j, name in enumerate(fn_names):
        if all_fn[:, j].isnan().any():
            rm[f"reward/{name}_mean"], rm[f"reward/{name}_std"] = _mean_std(all_fn[:, j])
        else:
            rm[f"reward/{name}_mean"] = all_fn[:, j].mean().item()
            rm[f"reward/{name}_std"] = all_fn[:, j].std().item() if all_fn.shape[0] > 1 else 0.0
    state["nfe_sum"] += nfe.sum().item()
    state["nfe_count"] += nfe.numel()
    return rm


def step_row(step: int, rollout: int, iteration: int, epoch: int, rm: Mapping[str, Any], loss: float,
             parts: Mapping[str, float], grad_norm: float | None, lr: float, skipped: bool, t_update: float,
             mu: int, tokens_per_step: int) -> dict[str, Any]:
    """One metrics.jsonl row: the rollout's metrics, the loss and the method's loss metrics (None where not
    finite), optimizer state and timings (``TIMING_KEYS``)."""
    step_seconds = (rm["time_rollout"] + rm["time_scoring"]) / mu + t_update
    return {"step": step, "rollout": rollout, "iteration": iteration, "epoch": epoch,
            **{k: v for k, v in rm.items() if k not in TIMING_KEYS},
            "loss": finite(loss), **{k: finite(v) for k, v in parts.items()}, "grad_norm": grad_norm, "lr": lr,
            "skipped": skipped, "time_rollout": rm["time_rollout"], "time_scoring": rm["time_scoring"],
            "time_update": t_update, "step_seconds": step_seconds,
            "tokens_per_s": tokens_per_step / mu / step_seconds, "rollout_tokens_per_s": rm["rollout_tokens_per_s"]}


def _rollout_mean(path: Path, key: str) -> float | None:
    """Mean of ``key`` over the distinct rollouts logged in metrics.jsonl (each rollout's first logged row; the rows
    of a resumed run's earlier process included); None when no row has it."""
    seen: dict[int, float] = {}
    for r in read_metrics(path):
        if r.get(key) is not None:
            seen.setdefault(r["rollout"], float(r[key]))
    return sum(seen.values()) / len(seen) if seen else None


def write_summary(out: Path, cfg: TrainConfig, method, state: Mapping[str, Any], after: Mapping[str, Any] | None, *,
                  step: int, heldout: int, wall_seconds: float, interrupted: bool, diverged: bool,
                  world: int, task: str | None = None) -> dict[str, Any]:
    """summary.json (held-out reward before/after, NFE, times) and progress.png; returns the summary."""
    before = state["eval_before"]
    mu = cfg.grpo.num_iterations

    def of(ev, key):
        return None if ev is None else ev.get(key)

    summary = {
        "preset": cfg.preset, "method": cfg.method, **method.summary(), "task": task or cfg.run.task,
        "model": cfg.model.name_or_path, "steps": step, "max_steps": cfg.grpo.max_steps, "rollouts": -(-step // mu),
        "reward_before": of(before, "reward"), "reward_after": of(after, "reward"),
        "accuracy_before": of(before, "accuracy"), "accuracy_after": of(after, "accuracy"),
        "answer_rate_before": of(before, "answer_rate"), "answer_rate_after": of(after, "answer_rate"),
        "reward_of_answered_before": of(before, "reward_of_answered"),
        "reward_of_answered_after": of(after, "reward_of_answered"),
        "eval_examples": heldout,
        # per held-out example (the held-out set's order, the same for every run of a task and seed-independent
        # split): the paired differences between runs and methods are taken from these
        "rewards_before": of(before, "rewards"), "rewards_after": of(after, "rewards"),
        "metrics_before": of(before, "metrics"), "metrics_after": of(after, "metrics"),
        "nfe_per_sample": state["nfe_sum"] / max(1, state["nfe_count"]),
        "batch_passes_per_rollout": _rollout_mean(out / "metrics.jsonl", "batch_passes"),
        "nfe_after": of(after, "nfe"), "batch_passes_after": of(after, "batch_passes"),
        "wall_seconds": wall_seconds, "train_seconds": state["train_seconds"],
        "interrupted": interrupted, "diverged": diverged, "num_processes": world,
        "output_dir": str(out),
    }
    write_atomic(out / "summary.json", (json.dumps(summary, indent=1, sort_keys=True) + "\n").encode())
    plot(out / "metrics.jsonl", out / "progress.png", title=f"{cfg.preset}: {cfg.method} on {summary['task']} "
         f"({cfg.model.name_or_path})", before=of(before, "reward"), after=of(after, "reward"), last_step=step)
    return summary
