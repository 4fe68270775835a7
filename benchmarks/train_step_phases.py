"""Seconds per RL step and per phase for the tiny STP preset and its d1 / elbo baselines, on a LLaDA-proportioned
micro model (hidden 256, 4 layers, 4 heads, MLP 768, vocabulary 1024; random weights: this measures time, not reward).

    python -m benchmarks.train_step_phases [--steps 8] [--out table.md]

Each preset runs `python -m stp.train --preset NAME` for --steps optimizer steps in a fresh output directory (no
held-out evaluation); the table averages metrics.jsonl over every optimizer step after the first rollout (warm-up):
rollout and scoring times are per rollout, update time per optimizer step, and "s / rollout cycle" is the time of
one rollout with its mu inner iterations. The table starts with the machine and its load (``benchmarks/_report.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

from benchmarks._report import load_average, machine_lines

PRESETS = ("tiny", "d1-tiny", "elbo-tiny")


def _micro_model(path: str) -> None:
    from stp.models.tiny import build_tiny

    build_tiny(seed=0, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
               intermediate_size=768, vocab_size=1024).save(path)


def _run(preset: str, model: str, steps: int, workdir: str) -> list[dict]:
    out = os.path.join(workdir, preset)
    cmd = [sys.executable, "-m", "stp.train", "--preset", preset, "--model.name_or_path", model,
           "--grpo.max_steps", str(steps), "--run.eval_examples", "0", "--run.output_dir", out,
           "--run.tensorboard", "false", "--run.save_every", "0"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{res.stderr[-3000:]}")
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _summarise(rows: list[dict]) -> dict:
    first = rows[0]["rollout"]
    rows = [r for r in rows if r["rollout"] != first] or rows  # drop the warm-up rollout
    rollouts = {r["rollout"]: r for r in rows if r["iteration"] == 0}
    mean = lambda xs: sum(xs) / max(len(xs), 1)  # noqa: E731
    mu = max(r["iteration"] for r in rows) + 1
    rollout_s = mean([r["time_rollout"] for r in rollouts.values()])
    scoring_s = mean([r["time_scoring"] for r in rollouts.values()])
    update_s = mean([r["time_update"] for r in rows])
    return {"s / rollout cycle": rollout_s + scoring_s + mu * update_s, "rollout s": rollout_s,
            "scoring s": scoring_s, "update s (per step)": update_s, "mu": mu,
            "NFE / sample": mean([r["nfe"] for r in rollouts.values()])}


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=8, help="optimizer steps per preset [8]")
    p.add_argument("--out", default=None, help="also write the markdown table here")
    args = p.parse_args(argv)
    if args.steps < 2:
        p.error(f"--steps={args.steps}: allowed: an integer >= 2 (the first rollout is warm-up)")
    load_start = load_average()
    with tempfile.TemporaryDirectory() as workdir:
        model = os.path.join(workdir, "micro")
        _micro_model(model)
        results = {preset: _summarise(_run(preset, model, args.steps, workdir)) for preset in PRESETS}
    cols = list(next(iter(results.values())))
    base = results["tiny"]["s / rollout cycle"]
    lines = ["| preset | " + " | ".join(cols) + " | cycle vs tiny |", "|" + "---|" * (len(cols) + 2)]
    for preset, r in results.items():
        cells = [f"{r[c]:.3f}" if isinstance(r[c], float) else str(r[c]) for c in cols]
        lines.append(f"| {preset} | " + " | ".join(cells) + f" | {r['s / rollout cycle'] / base:.2f}x |")
    table = "\n".join(machine_lines(load_start, load_average()) + [""] + lines)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")
    return table


if __name__ == "__main__":
    main()
