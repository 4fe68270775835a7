"""The gain of each finished comparison run measured per puzzle: paired standard errors for ``benchmarks.methods``.

    python -m benchmarks.paired_gain --work runs/methods [--methods stp elbo d1] [--seeds 0 1 2] [--out paired.md]

``benchmarks.methods`` gives each gain a conservative standard error: binomial over the puzzles (sqrt(p (1 - p) / n),
an upper bound for a graded metric such as Sudoku's fraction of cells) with before and after treated as independent.
Both are scored on the same held-out puzzles, and one puzzle's score moves little, so the error of the per-puzzle
differences is much smaller. This re-evaluates, with ``python -m stp.eval`` (greedy, the run's decoding, the first
``run.eval_examples`` test puzzles: the trainer's held-out set), the starting checkpoint once and each run's final
``adapter``, and reports per run the mean difference and its standard error (sd of the differences / sqrt(n)), and per
method the mean over seeds with sqrt(mean of the runs' squared errors / s + var_seeds / s).

Each re-evaluation is checked against the run's ``summary.json`` (``accuracy_before`` / ``accuracy_after``, to 1e-6):
a method whose evaluation decodes otherwise (DiFFPO's entropy-bounded sampler) is left out with a note rather than
reported on other numbers. Results files go to ``WORK/paired/`` and are reused (``stp.eval`` resumes them).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["paired_gain", "combine_seeds", "main"]

TOLERANCE = 1e-6


def paired_gain(after: Sequence[float], before: Sequence[float]) -> tuple[float, float]:
    """(mean of after - before, its standard error sd / sqrt(n)) over the same puzzles, in the same order.

    >>> paired_gain([1.0, 0.5, 0.5], [0.5, 0.5, 0.0])
    (0.3333333333333333, 0.16666666666666666)
    """
    if len(after) != len(before) or len(after) < 2:
        raise ValueError(f"paired_gain: {len(after)} and {len(before)} scores; allowed: two equal lengths >= 2")
    d = [a - b for a, b in zip(after, before)]
    return sum(d) / len(d), statistics.stdev(d) / math.sqrt(len(d))


def _z(gain: float, se: float) -> str:
    return f"{gain / se:.1f}" if se > 0 else "-"


def combine_seeds(gains: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """(mean gain, standard error) over seeds from per-seed (gain, se): sqrt(mean(se^2) / s + var_seeds / s)."""
    s = len(gains)
    if s == 0:
        raise ValueError("combine_seeds: no seeds")
    mean = sum(g for g, _ in gains) / s
    spread = statistics.variance([g for g, _ in gains]) if s > 1 else 0.0
    return mean, math.sqrt(sum(e * e for _, e in gains) / s / s + spread / s)


def _config(run: Path) -> dict[str, Any]:
    import yaml

    return yaml.safe_load((run / "config.yaml").read_text())


def _evaluate(cfg: dict[str, Any], adapter: Path | None, out: Path, env: dict[str, str]) -> list[float]:
    r = cfg["rollout"]
    cmd = [sys.executable, "-m", "stp.eval", "--model", cfg["model"]["name_or_path"], "--task", cfg["run"]["task"],
           "--prompt-format", cfg["run"]["prompt_format"], "--gen-length", str(r["gen_length"]), "--block-length",
           str(r["block_length"]), "--steps", str(r["steps"]), "--source", "generated", "--limit",
           str(cfg["run"]["eval_examples"]), "--batch-size", "32", "--no-progress", "--output", str(out)]
    if adapter is not None:
        cmd += ["--adapter", str(adapter)]
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    return [json.loads(line)["metric"] for line in out.read_text().splitlines() if line.strip()]


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.paired_gain", description=__doc__.split("\n\n")[0])
    p.add_argument("--work", required=True, help="the --work directory of a finished benchmarks.methods comparison")
    p.add_argument("--methods", nargs="+", default=None, help="methods [every directory of WORK with runs]")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="run seeds [0 1 2]")
    p.add_argument("--out", default=None, help="also write the markdown table here")
    args = p.parse_args(argv)
    work = Path(args.work)
    methods = args.methods or sorted(d.name for d in work.iterdir() if (d / f"seed{args.seeds[0]}").is_dir())
    env = {**os.environ}
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("MKL_NUM_THREADS", "1")
    (work / "paired").mkdir(parents=True, exist_ok=True)
    bases: dict[str, list[float]] = {}
    rows, notes, record = [], [], {}
    for m in methods:
        per_seed: list[tuple[float, float]] = []
        cells = []
        for s in args.seeds:
            run = work / m / f"seed{s}"
            if not (run / "summary.json").is_file() or not (run / "adapter" / "adapter_config.json").is_file():
                notes.append(f"{m} seed {s}: no finished run with an adapter in {run}")
                continue
            cfg, summary = _config(run), json.loads((run / "summary.json").read_text())
            r = cfg["rollout"]
            key = f"{cfg['model']['name_or_path']}|{cfg['run']['task']}|{r['gen_length']}|{r['block_length']}|" \
                  f"{r['steps']}|{cfg['run']['eval_examples']}"
            if key not in bases:
                bases[key] = _evaluate(cfg, None, work / "paired" / f"base-{len(bases)}.jsonl", env)
            before = bases[key]
            if abs(sum(before) / len(before) - summary["accuracy_before"]) > TOLERANCE:
                notes.append(f"{m} seed {s}: left out: its own evaluation gave {summary['accuracy_before']:.4f} "
                             f"before, stp.eval {sum(before) / len(before):.4f} (another decoding)")
                continue
            after = _evaluate(cfg, run / "adapter", work / "paired" / f"{m}-{s}.jsonl", env)
            if abs(sum(after) / len(after) - summary["accuracy_after"]) > TOLERANCE:
                notes.append(f"{m} seed {s}: left out: summary.json {summary['accuracy_after']:.4f} after, stp.eval "
                             f"{sum(after) / len(after):.4f}")
                continue
            g, se = paired_gain(after, before)
            per_seed.append((g, se))
            cells.append(f"{g:+.3f} +- {se:.3f} ({_z(g, se)})")
        if per_seed:
            mean, se = combine_seeds(per_seed)
            rows.append(f"| `{m}` | {len(per_seed)} | {' / '.join(cells)} | {mean:+.3f} +- {se:.3f} "
                        f"({_z(mean, se)}) |")
            record[m] = {"per_seed": per_seed, "mean": mean, "se": se}
    text = "\n".join(["| method | seeds | paired gain per seed (z) | mean paired gain (z) |", "|---|---|---|---|",
                      *rows, *([""] + notes if notes else [])]) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return {"results": record, "notes": notes}


if __name__ == "__main__":
    main()
