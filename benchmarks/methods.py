"""The RL methods compared on one task where RL improves answers: accuracy, reward curves, cost and estimator variance.

    python -m benchmarks.methods [--methods stp elbo d1] [--seeds 0 1 2] [--steps 120] [--budget SECONDS]
                                 [--eval-every 20] [--work runs/methods] [--out benchmarks/methods.md]

Which runs. Every method registered in ``stp.methods.METHODS`` (or ``--methods``), on the base preset
(``--base compare-tiny``: the tiny Sudoku model pretrained with relabelled answers, ``pretrained:sudoku_relabel``), with
this rule for its settings:

1. the preset ``<method>-<base>`` when it exists and names that method (a method's own published settings, e.g.
   ``d1-compare-tiny``: d1's epsilon, inner iterations and no early stop; ``elbo-compare-tiny``: no anchors, no early
   stop: the paper's baselines);
2. else the base preset itself when its method is that method (``compare-tiny`` is STP);
3. else the base preset with ``--method <method>`` (only the method differs: how a newly added method joins).

Each (method, seed) is ``python -m stp.train --preset P [--method M] --run.seed S --grpo.max_steps N
--run.eval_every E --run.output_dir WORK/<method>/seed<S>`` in its own process (``OMP_NUM_THREADS=1`` unless set).
A run whose ``summary.json`` exists is not run again (the comparison is resumable: rerun the same command after an
interruption; the run in progress then starts again from nothing, so that its times are one process's); a finished
run whose ``config.yaml`` differs from the settings wanted now is refused, naming the differing settings. Several
copies of the command with disjoint ``--methods`` / ``--seeds`` may share one ``--work`` directory; a last call with
all of them (or ``--report-only``) then tabulates everything.

What is compared, per method (mean over seeds; "+-" is one standard error, see below):

- accuracy before / after: greedy held-out accuracy (the task's metric on ``run.eval_examples`` test puzzles, the
  trainer's own evaluation) of the starting checkpoint and after N optimizer steps (equal steps);
- accuracy at the wall-clock budget B: the held-out evaluation (every E steps) last reached within B seconds of
  training time (the sum of the step times in metrics.jsonl: rollout, scoring and update, without the evaluations).
  B defaults to the smallest training time over all runs (so every method is evaluated at a time it reached; the
  fastest method at its end); the step each method reached is shown next to it;
- training reward (mean over the last 10 % of steps) and the curve of reward against training time (the PNG);
- NFE per sample (rollout forward passes, ``summary.json``), seconds per optimizer step (training time / steps);
- the variance of the sequence log-likelihood estimate at the starting checkpoint (``python -m stp.variance`` on the
  same completions for every method: the method's estimator, its K and, for anchored methods, its fixed fraction
  1 - rho of confidence anchors), for methods whose class names a ``stp.likelihood`` estimator; "-" for others.

Paired table. Every run records its held-out evaluations per example (``heldout.jsonl``: before training, every
``run.eval_every`` steps, after). Each method is compared with d1 (or the first method) on the same examples: the
per-example metric averaged over a method's seeds, the difference per example, its mean and the standard error over
the examples (z in brackets), after the N steps and at the budget; and each method's own gain (after - before),
paired the same way.

Standard errors. The same held-out puzzles are used by every seed, so seed-to-seed spread misses the sampling error of
the puzzles. The standard error of a mean accuracy p over s seeds and n puzzles is sqrt(p (1 - p) / n +
var_seeds / s), and of a gain after - before sqrt(p_a (1 - p_a) / n + p_b (1 - p_b) / n + var_seeds(gain) / s):
conservative (the gain's puzzles are paired). "z" is the gain over its standard error.

Output: a markdown table (stdout and ``--out``), the PNG (``--png``, default next to ``--out``), and
``WORK/comparison.json`` with every number. The table starts with the machine and its load (busy machines make the
times slower and noisier: ``benchmarks/_report.py``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks._report import load_average, machine_lines

__all__ = ["RunSpec", "preset_for", "plan", "eval_points", "accuracy_at_budget", "training_curve", "mean_se",
           "accuracy_se", "gain_se", "variance_for", "summarize", "format_table", "plot_curves", "main"]

DEFAULT_BASE = "compare-tiny"
SUMMARY = "summary.json"


# ------------------------------------------------------------------------------------------------------------ plan


@dataclass(frozen=True)
class RunSpec:
    """One training run of the comparison: ``preset`` (+ ``--method method_flag`` when not None), ``seed``."""

    method: str
    preset: str
    method_flag: str | None
    seed: int
    out_dir: Path

    def command(self, steps: int, eval_every: int, extra: Sequence[str] = ()) -> list[str]:
        cmd = [sys.executable, "-m", "stp.train", "--preset", self.preset]
        if self.method_flag is not None:
            cmd += ["--method", self.method_flag]
        return cmd + ["--run.seed", str(self.seed), "--grpo.max_steps", str(steps), "--run.eval_every",
                      str(eval_every), "--run.output_dir", str(self.out_dir), "--run.tensorboard", "false",
                      "--run.save_every", "0", *extra]


def preset_for(method: str, base: str) -> tuple[str, str | None]:
    """(preset, --method value or None) of ``method`` in the comparison on ``base`` (the rule in the module
    docstring: ``<method>-<base>`` if it exists for that method, else ``base`` if it is that method's, else ``base``
    with ``--method``).

    >>> preset_for("d1", "compare-tiny"), preset_for("stp", "compare-tiny")
    (('d1-compare-tiny', None), ('compare-tiny', None))
    """
    from stp.config import PRESETS
    from stp.methods import METHODS

    if method not in METHODS:
        raise ValueError(f"--methods: {method!r} is not a method; allowed: {', '.join(METHODS)}")
    if base not in PRESETS:
        raise ValueError(f"--base: {base!r} is not a preset; allowed: {', '.join(PRESETS)}")
    own = f"{method}-{base}"
    if own in PRESETS and PRESETS[own].method == method:
        return own, None
    if PRESETS[base].method == method:
        return base, None
    return base, method


def plan(methods: Sequence[str], seeds: Sequence[int], base: str, work: Path) -> list[RunSpec]:
    """The runs, method-major (all seeds of a method, then the next method)."""
    out = []
    for m in methods:
        preset, flag = preset_for(m, base)
        out += [RunSpec(m, preset, flag, s, work / m / f"seed{s}") for s in seeds]
    return out


def _config_of(spec: RunSpec, steps: int, eval_every: int, extra_overrides: Mapping[str, Any]):
    from stp.config import resolve

    return resolve(preset=spec.preset, method=spec.method_flag,
                   overrides={"grpo.max_steps": steps, "run.eval_every": eval_every, "run.seed": spec.seed,
                              "run.output_dir": str(spec.out_dir), "run.tensorboard": False, "run.save_every": 0,
                              **extra_overrides})


def _differences(saved: Mapping[str, Any], wanted: Mapping[str, Any]) -> list[str]:
    """The dotted settings where a run's saved config.yaml differs from the configuration wanted now."""
    out = []
    for key in sorted(set(saved) | set(wanted)):
        a, b = saved.get(key), wanted.get(key)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += [f"{key}.{d}" for d in _differences(a, b)]
        elif a != b:
            out.append(f"{key} ({a!r} there, {b!r} here)")
    return out


def run_one(spec: RunSpec, steps: int, eval_every: int, extra: Sequence[str], env: Mapping[str, str],
            log=print, config=None) -> dict[str, Any]:
    """The run's summary.json, training it first unless it exists. A finished run of other settings (its
    config.yaml against ``config``, the configuration this comparison wants) is an error naming them."""
    summary_file = spec.out_dir / SUMMARY
    if summary_file.exists():
        s = json.loads(summary_file.read_text())
        got = (s.get("max_steps"), s.get("steps"), s.get("method"), s.get("preset"))
        want = (steps, steps, spec.method, spec.preset)
        if got != want or s.get("interrupted") or s.get("diverged"):
            raise RuntimeError(f"{summary_file}: a finished run with (max_steps, steps, method, preset) = {got} "
                               f"(interrupted {s.get('interrupted')}, diverged {s.get('diverged')}); this comparison "
                               f"wants {want}: use another --work directory or remove {spec.out_dir}")
        cfg_file = spec.out_dir / "config.yaml"
        if config is not None and cfg_file.exists():
            import yaml

            saved, wanted = yaml.safe_load(cfg_file.read_text()), config.to_dict()
            for d in (saved, wanted):  # a finished run directory may have been moved
                d.get("run", {}).pop("output_dir", None)
            diff = _differences(saved, wanted)
            if diff:
                raise RuntimeError(f"{cfg_file}: the finished run differs from this comparison's settings in "
                                   f"{'; '.join(diff)}; use another --work directory, the same --set values, or "
                                   f"remove {spec.out_dir}")
        log(f"[methods] {spec.method} seed {spec.seed}: finished earlier ({summary_file}), not rerun")
        return s
    if spec.out_dir.exists():  # an interrupted run: start it again from nothing (the times must be one process's)
        import shutil

        shutil.rmtree(spec.out_dir)
    spec.out_dir.parent.mkdir(parents=True, exist_ok=True)
    cmd = spec.command(steps, eval_every, extra)
    log(f"[methods] {spec.method} seed {spec.seed}: {' '.join(cmd[1:])}")
    start = time.time()
    res = subprocess.run(cmd, capture_output=True, text=True, env=dict(env))
    wall = time.time() - start
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stderr[-3000:]}")
    s = json.loads(summary_file.read_text())
    log(f"[methods] {spec.method} seed {spec.seed}: accuracy {s['accuracy_before']:.3f} -> {s['accuracy_after']:.3f}"
        f", {s['train_seconds']:.0f} s in the training loop (evaluations included), {wall:.0f} s process")
    return s


# ------------------------------------------------------------------------------------------------------- analysis


def training_curve(rows: Sequence[Mapping[str, Any]]) -> tuple[list[float], list[float], list[int]]:
    """(cumulative training seconds after each step, training reward of that step's rollout, step) from
    metrics.jsonl rows (``step_seconds``: the step's share of its rollout and scoring plus its update)."""
    t, secs, rewards, steps = 0.0, [], [], []
    for r in sorted(rows, key=lambda r: r["step"]):
        t += r["step_seconds"]
        secs.append(t)
        rewards.append(r["reward_mean"])
        steps.append(r["step"])
    return secs, rewards, steps


def eval_points(rows: Sequence[Mapping[str, Any]], summary: Mapping[str, Any]) -> list[tuple[float, int, float]]:
    """(training seconds, step, held-out accuracy) of every held-out evaluation of a run: before training (0 s),
    every ``run.eval_every`` steps (metrics.jsonl's ``eval_accuracy``) and after the last step (summary.json)."""
    secs, _, steps = training_curve(rows)
    at = dict(zip(steps, secs))
    pts = [(0.0, 0, summary["accuracy_before"])]
    pts += [(at[r["step"]], r["step"], r["eval_accuracy"]) for r in rows if r.get("eval_accuracy") is not None]
    pts.append((secs[-1] if secs else 0.0, summary["steps"], summary["accuracy_after"]))
    return sorted(pts)


def accuracy_at_budget(points: Sequence[tuple[float, int, float]], budget: float) -> tuple[float, int, float]:
    """The last evaluation reached within ``budget`` training seconds: (seconds, step, accuracy).

    >>> accuracy_at_budget([(0.0, 0, 0.1), (10.0, 20, 0.2), (21.0, 40, 0.3)], 20.0)
    (10.0, 20, 0.2)
    """
    eps = 1e-9 * max(1.0, budget)
    return [p for p in points if p[0] <= budget + eps][-1]


def mean_se(values: Sequence[float]) -> tuple[float, float]:
    """(mean, standard error of the mean over the values; 0 for one value)."""
    m = statistics.fmean(values)
    return m, (statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0)


def accuracy_se(values: Sequence[float], n: int) -> tuple[float, float]:
    """(mean accuracy over seeds, sqrt(p (1 - p) / n + var_seeds / seeds)): puzzles and seeds both sampled."""
    m, se_seeds = mean_se(values)
    return m, math.sqrt(max(m * (1 - m), 0.0) / n + se_seeds ** 2)


def gain_se(after: Sequence[float], before: Sequence[float], n: int) -> tuple[float, float]:
    """(mean gain after - before, its standard error, conservative: the puzzles counted as unpaired)."""
    gains = [a - b for a, b in zip(after, before)]
    g, se_seeds = mean_se(gains)
    pa, pb = statistics.fmean(after), statistics.fmean(before)
    return g, math.sqrt(max(pa * (1 - pa), 0.0) / n + max(pb * (1 - pb), 0.0) / n + se_seeds ** 2)


def variance_for(cfg, estimator: str | None) -> tuple[str, float, int, str] | None:
    """(estimator as the probe names it, anchor fraction, K, score) that a method's run uses; None when its class
    names no ``stp.likelihood`` estimator. elbo is the probe's stp at anchor fraction 0."""
    from stp.config import ESTIMATORS

    if estimator not in ESTIMATORS:
        return None
    frac = round(1.0 - cfg.prior.rho, 6) if (estimator == "stp" and cfg.prior.enabled) else 0.0
    return ("d1" if estimator == "d1" else "stp"), frac, cfg.estimator.num_draws, cfg.estimator.score


def measure_variances(cfgs: Mapping[str, Any], work: Path, env: Mapping[str, str], *, prompts: int, repeats: int,
                      log=print) -> dict[str, dict | None]:
    """One ``python -m stp.variance`` run covering every method's (estimator, fraction, K, score); its rows are
    kept in ``work/variance.jsonl`` and reused when complete. Returns {method: row or None}."""
    from stp.methods import METHODS

    wanted = {m: variance_for(c, getattr(METHODS[m], "estimator", None)) for m, c in cfgs.items()}
    keys = [k for k in wanted.values() if k is not None]
    out_file = work / "variance.jsonl"
    if keys:
        rows = _read_variance(out_file)
        if not all(_find_row(rows, k) for k in keys):
            cfg = next(iter(cfgs.values()))
            r = cfg.rollout
            ests = sorted({k[0] for k in keys})
            fracs = sorted({k[1] for k in keys} | {0.0})
            draws = sorted({k[2] for k in keys})
            scores = sorted({k[3] for k in keys})
            if out_file.exists():
                out_file.unlink()
            cmd = [sys.executable, "-m", "stp.variance", "--model", cfg.model.name_or_path, "--task", cfg.run.task,
                   "--gen-length", str(r.gen_length), "--block-length", str(r.block_length), "--steps",
                   str(r.steps), "--temperature", str(r.temperature), "--estimators", ",".join(ests), "--scores",
                   ",".join(scores), "--draws", ",".join(map(str, draws)), "--anchor-fractions",
                   ",".join(f"{f:g}" for f in fracs), "--num-prompts", str(prompts), "--repeats", str(repeats),
                   "--out", str(out_file), "--no-progress"]
            log(f"[methods] variance probe: {' '.join(cmd[1:])}")
            res = subprocess.run(cmd, capture_output=True, text=True, env=dict(env))
            if res.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stderr[-3000:]}")
            rows = _read_variance(out_file)
        return {m: (None if k is None else _find_row(rows, k)) for m, k in wanted.items()}
    return dict.fromkeys(cfgs)


def _read_variance(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            if "row" in rec:
                rows.append(rec["row"])
    return rows


def _find_row(rows: Sequence[Mapping[str, Any]], key: tuple[str, float, int, str]) -> dict | None:
    est, frac, k, score = key
    for r in rows:
        if (r["estimator"] == est and abs(r["anchor_fraction"] - frac) < 1e-6 and r["num_draws"] == k
                and r["score"] == score):
            return dict(r)
    return None


def _train_time(rows: Sequence[Mapping[str, Any]]) -> float:
    """Training seconds of a run: the sum of its step times (evaluations and checkpoints left out)."""
    return sum(r["step_seconds"] for r in rows)


def summarize(method: str, spec: RunSpec, runs: Sequence[tuple[Mapping[str, Any], list[dict]]], budget: float,
              variance: Mapping[str, Any] | None) -> dict[str, Any]:
    """The comparison's numbers of one method from its runs' (summary.json, metrics.jsonl rows)."""
    n = runs[0][0]["eval_examples"]
    before = [s["accuracy_before"] for s, _ in runs]
    after = [s["accuracy_after"] for s, _ in runs]
    at_budget = [accuracy_at_budget(eval_points(rows, s), budget) for s, rows in runs]
    tail = []
    for _, rows in runs:
        _, rew, _ = training_curve(rows)
        k = max(1, len(rew) // 10)
        tail.append(statistics.fmean(rew[-k:]))
    out = {
        "method": method, "preset": spec.preset, "method_flag": spec.method_flag, "seeds": len(runs),
        "eval_examples": n, "steps": runs[0][0]["steps"],
        "accuracy_before": accuracy_se(before, n), "accuracy_after": accuracy_se(after, n),
        "gain": gain_se(after, before, n),
        "budget_seconds": budget, "accuracy_at_budget": accuracy_se([a for _, _, a in at_budget], n),
        "steps_at_budget": [st for _, st, _ in at_budget],
        "gain_at_budget": gain_se([a for _, _, a in at_budget], before, n),
        "train_reward_end": mean_se(tail),
        "nfe_per_sample": mean_se([s["nfe_per_sample"] for s, _ in runs]),
        "seconds_per_step": mean_se([_train_time(rows) / max(1, s["steps"]) for s, rows in runs]),
        "train_seconds": mean_se([_train_time(rows) for _, rows in runs]),
        # per-example held-out metrics per seed (heldout.jsonl), for the paired table
        "per_example_before": [heldout_at(s["output_dir"], 0) for s, _ in runs],
        "per_example_after": [heldout_at(s["output_dir"], s["steps"]) for s, _ in runs],
        "per_example_at_budget": [heldout_at(s["output_dir"], st) for (s, _), (_, st, _) in zip(runs, at_budget)],
        "per_seed": [{"accuracy_before": s["accuracy_before"], "accuracy_after": s["accuracy_after"],
                      "accuracy_at_budget": a, "step_at_budget": st, "train_seconds": _train_time(rows),
                      "loop_seconds": s["train_seconds"],
                      "wall_seconds": s["wall_seconds"], "nfe_per_sample": s["nfe_per_sample"],
                      "output_dir": s["output_dir"]} for (s, rows), (_, st, a) in zip(runs, at_budget)],
        "variance": None if variance is None else {k: variance[k] for k in ("estimator", "anchor_fraction",
                                                                              "num_draws", "score", "variance",
                                                                              "variance_sem", "completions",
                                                                              "repeats")},
    }
    return out


def heldout_at(run_dir: Path, step: int) -> list[float] | None:
    """The per-example held-out metrics of a run's evaluation at ``step`` (``heldout.jsonl``, the last line for that
    step), None when the run did not record them."""
    path = Path(run_dir) / "heldout.jsonl"
    if not path.exists():
        return None
    found = None
    for line in path.read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            if rec["step"] == step:
                found = [0.0 if m is None else float(m) for m in rec["metrics"]]
    return found


def paired_difference(a: Sequence[Sequence[float]], b: Sequence[Sequence[float]]) -> tuple[float, float] | None:
    """Mean and standard error of a per-example difference: each side's per-example values averaged over its runs
    (seeds), then the difference per example; the SE is over examples (the same held-out set on both sides).

    >>> paired_difference([[1, 0, 1, 1]], [[0, 0, 1, 0]])
    (0.5, 0.28867513459481287)
    """
    if not a or not b or any(x is None for x in (*a, *b)) or len({len(x) for x in (*a, *b)}) != 1:
        return None
    n = len(a[0])
    diff = [statistics.fmean(r[i] for r in a) - statistics.fmean(r[i] for r in b) for i in range(n)]
    return statistics.fmean(diff), (statistics.stdev(diff) / math.sqrt(n) if n > 1 else float("nan"))


def paired_table(results: Sequence[Mapping[str, Any]], reference: str) -> str:
    """Each method against ``reference`` on the same held-out examples: the difference in accuracy after the
    steps, at the budget, and each method's own gain (after - before), with paired standard errors and z."""
    def cell(pair):
        if pair is None:
            return "-"
        m, se = pair
        return f"{m:+.3f} +- {se:.3f} ({m / se if se else float('nan'):+.1f})"

    head = [f"method", f"after - {reference} after", f"at budget - {reference} at budget", "own gain (after - before)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    ref = next(r for r in results if r["method"] == reference)
    for r in results:
        lines.append("| " + " | ".join([
            f"`{r['method']}`", "-" if r is ref else cell(paired_difference(r["per_example_after"],
                                                                              ref["per_example_after"])),
            "-" if r is ref else cell(paired_difference(r["per_example_at_budget"], ref["per_example_at_budget"])),
            cell(paired_difference(r["per_example_after"], r["per_example_before"])),
        ]) + " |")
    return "\n".join(lines)


def _pm(pair: Sequence[float], digits: int = 3) -> str:
    m, se = pair
    return f"{m:.{digits}f} +- {se:.{digits}f}"


def format_table(results: Sequence[Mapping[str, Any]]) -> str:
    """The markdown table: one row per method."""
    head = ["method", "run as", "seeds", "accuracy before", f"accuracy after {results[0]['steps']} steps",
            "gain (z)", f"accuracy at {results[0]['budget_seconds']:.0f} s (steps)", "gain at budget (z)",
            "train reward (last 10 %)", "NFE / sample", "s / step", "log-lik. variance (K, 1 - rho)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        run_as = f"`{r['preset']}`" + (f" `--method {r['method_flag']}`" if r["method_flag"] else "")
        g, g_se = r["gain"]
        gb, gb_se = r["gain_at_budget"]
        v = r["variance"]
        var = "-" if v is None else (f"{v['variance']:.4g} +- {v['variance_sem']:.2g} ({v['num_draws']}, "
                                     f"{v['anchor_fraction']:g})")
        steps_b = "/".join(str(s) for s in r["steps_at_budget"])
        lines.append("| " + " | ".join([
            f"`{r['method']}`", run_as, str(r["seeds"]), _pm(r["accuracy_before"]), _pm(r["accuracy_after"]),
            f"{g:+.3f} +- {g_se:.3f} ({g / g_se if g_se else float('nan'):.1f})",
            f"{_pm(r['accuracy_at_budget'])} ({steps_b})",
            f"{gb:+.3f} +- {gb_se:.3f} ({gb / gb_se if gb_se else float('nan'):.1f})",
            _pm(r["train_reward_end"]), f"{r['nfe_per_sample'][0]:.1f}", _pm(r["seconds_per_step"], 2), var,
        ]) + " |")
    return "\n".join(lines)


def plot_curves(curves: Mapping[str, Sequence[tuple[list[float], list[float]]]], png: Path, *, title: str,
                window: int = 5) -> None:
    """Training reward against training seconds, one line per method: the mean over seeds (each seed's curve
    smoothed over ``window`` steps and interpolated onto a common time grid) with a band of one standard error."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for method, seeds in curves.items():
        ends = [c[0][-1] for c in seeds if c[0]]
        if not ends:
            continue
        grid = np.linspace(0.0, min(ends), 200)
        ys = []
        for secs, rew in seeds:
            r = np.asarray(rew, dtype=float)
            k = min(window, len(r))
            smooth = np.convolve(r, np.ones(k) / k, mode="valid")
            ys.append(np.interp(grid, np.asarray(secs[k - 1:], dtype=float), smooth))
        ys = np.asarray(ys)
        mean = ys.mean(0)
        se = ys.std(0, ddof=1) / math.sqrt(len(ys)) if len(ys) > 1 else np.zeros_like(mean)
        (line,) = ax.plot(grid, mean, label=f"{method} ({len(ys)} seeds)")
        ax.fill_between(grid, mean - se, mean + se, color=line.get_color(), alpha=0.2)
    ax.set_xlabel("training seconds (rollout + scoring + update; evaluations excluded)")
    ax.set_ylabel(f"training reward (mean of {window} steps)")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=100)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.methods", description=__doc__.split("\n\n")[0],
                                epilog="The module docstring (python -c 'import benchmarks.methods as m; "
                                       "print(m.__doc__)') explains the rule, the columns and the errors.")
    p.add_argument("--methods", nargs="+", default=None, help="methods to compare [every registered method]")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="run seeds [0 1 2]")
    p.add_argument("--base", default=DEFAULT_BASE, help=f"base preset [{DEFAULT_BASE}]")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps of every run [the base preset's]")
    p.add_argument("--eval-every", type=int, default=None, help="held-out evaluation every N steps, for the "
                   "accuracy at the wall-clock budget [steps / 4]")
    p.add_argument("--budget", type=float, default=None, help="wall-clock budget in training seconds [the "
                   "smallest training time of all runs]")
    p.add_argument("--eval-examples", type=int, default=None, help="held-out prompts [the preset's run.eval_examples]")
    p.add_argument("--set", nargs="*", default=[], metavar="SECTION.FIELD=VALUE", help="more settings for every "
                   "run (e.g. grpo.prompts_per_step=2 for a short test)")
    p.add_argument("--variance-prompts", type=int, default=8, help="prompts of the variance probe (2 completions "
                   "each) [8]; 0 = no probe")
    p.add_argument("--variance-repeats", type=int, default=8, help="mask seeds of the variance probe [8]")
    p.add_argument("--report-only", action="store_true", help="train nothing: report the finished runs of WORK "
                   "(a method then counts the seeds it has; one without any is left out, with a note)")
    p.add_argument("--work", default="runs/methods", help="run directories (reused: resumable) [runs/methods]")
    p.add_argument("--out", default=None, help="write the markdown here too")
    p.add_argument("--png", default=None, help="the reward-vs-time PNG [next to --out, else WORK/methods.png]")
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = build_parser()
    args = parser.parse_args(argv)
    from stp.config import PRESETS, ConfigError, resolve
    from stp.methods import METHODS

    methods = list(args.methods or METHODS)
    if args.base not in PRESETS:
        parser.error(f"--base {args.base!r}: allowed: {', '.join(PRESETS)}")
    for m in methods:
        if m not in METHODS:
            parser.error(f"--methods: {m!r} is not a method; allowed: {', '.join(METHODS)}")
    if len(set(args.seeds)) != len(args.seeds) or any(s < 0 for s in args.seeds):
        parser.error(f"--seeds {args.seeds}: allowed: distinct integers >= 0")
    overrides: dict[str, str] = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or "." not in key:
            parser.error(f"--set {item!r}: allowed: SECTION.FIELD=VALUE")
        overrides[key] = value
    base_cfg = resolve(preset=args.base)
    steps = args.steps if args.steps is not None else base_cfg.grpo.max_steps
    eval_every = args.eval_every if args.eval_every is not None else max(1, steps // 4)
    if steps < 1:
        parser.error(f"--steps {steps}: allowed: an integer >= 1")
    if eval_every < 1:
        parser.error(f"--eval-every {eval_every}: allowed: an integer >= 1")
    if args.eval_examples is not None:
        if args.eval_examples < 1:
            parser.error(f"--eval-examples {args.eval_examples}: allowed: an integer >= 1")
        overrides["run.eval_examples"] = str(args.eval_examples)
    if args.budget is not None and args.budget <= 0:
        parser.error(f"--budget {args.budget}: allowed: a number of seconds > 0")
    work = Path(args.work)
    specs = plan(methods, args.seeds, args.base, work)
    cfgs = {}
    try:
        for spec in specs:
            cfgs.setdefault(spec.method, _config_of(spec, steps, eval_every, overrides))
    except ConfigError as e:
        parser.error(f"--set / --steps: {e}")
    extra = [a for k, v in overrides.items() for a in (f"--{k}", v)]
    env = {**os.environ}
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("MKL_NUM_THREADS", "1")
    work.mkdir(parents=True, exist_ok=True)

    load_start = load_average()
    started = time.time()
    runs: dict[str, list[tuple[dict, list[dict]]]] = {}
    notes: list[str] = []
    seeds_of: dict[str, list[str]] = {}
    from stp.metrics import read_metrics

    for spec in specs:
        if args.report_only and not (spec.out_dir / SUMMARY).exists():
            notes.append(f"{spec.method} seed {spec.seed}: not run ({spec.out_dir} has no {SUMMARY})")
            continue
        s = run_one(spec, steps, eval_every, extra, env, config=_config_of(spec, steps, eval_every, overrides))
        runs.setdefault(spec.method, []).append((s, read_metrics(spec.out_dir / "metrics.jsonl")))
        seeds_of.setdefault(spec.method, []).append(str(spec.seed))
    if not runs:
        parser.error(f"--report-only: no finished run in {work}")
    methods = [m for m in methods if m in runs]
    cfgs = {m: c for m, c in cfgs.items() if m in runs}
    variances = (measure_variances(cfgs, work, env, prompts=args.variance_prompts, repeats=args.variance_repeats)
                 if args.variance_prompts > 0 else dict.fromkeys(cfgs))
    budget = args.budget if args.budget is not None else min(_train_time(rows) for rs in runs.values()
                                                              for _, rows in rs)
    spec_of = {s.method: s for s in specs}
    results = [summarize(m, spec_of[m], runs[m], budget, variances[m]) for m in methods]
    load_end = load_average()

    table = format_table(results)
    png = Path(args.png) if args.png else (Path(args.out).with_suffix(".png") if args.out else work / "methods.png")
    curves = {m: [training_curve(rows)[:2] for _, rows in runs[m]] for m in methods}
    plot_curves(curves, png, title=f"training reward on {base_cfg.run.task} ({args.base}): mean over seeds "
                                   "+- 1 s.e.")
    header = machine_lines(load_start, load_end) + [
        f"Command: python -m benchmarks.methods {' '.join(argv if argv is not None else sys.argv[1:])}".rstrip(),
        f"{sum(len(r) for r in runs.values())} runs, {steps} optimizer steps each, held-out evaluation every "
        f"{eval_every} steps on "
        f"{results[0]['eval_examples']} test puzzles; wall-clock budget {budget:.0f} training seconds; "
        f"{time.time() - started:.0f} s for this command (runs finished earlier are reused, not rerun)",
        "Seeds: " + "; ".join(f"{m} {', '.join(seeds_of[m])}" for m in methods),
        *notes,
    ]
    reference = "d1" if "d1" in methods else methods[0]
    paired = paired_table(results, reference)
    text = ("\n".join(header) + "\n\n" + table + "\n\nPaired on the same held-out examples (per-example metric "
            f"averaged over seeds, difference per example, SE over the {results[0]['eval_examples']} examples; z in "
            "brackets):\n\n" + paired + "\n")
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    record = {"header": header, "results": results, "png": str(png), "steps": steps, "eval_every": eval_every,
              "budget_seconds": budget, "overrides": overrides, "seeds": list(args.seeds)}
    (work / "comparison.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


if __name__ == "__main__":
    main()
