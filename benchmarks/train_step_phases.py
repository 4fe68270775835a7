"""Seconds per optimizer step, by phase, of STP against d1 on one model: the whole RL step, not one kernel.

    python -m benchmarks.train_step_phases [--shape both] [--cycles 3] [--stp-cache dual] [--out table.md]

The model is a LLaDA-proportioned micro model (hidden 256, 4 layers, 4 heads, MLP 768, vocabulary 1024; random
weights: this measures time, not reward). Each variant runs ``python -m stp.train`` in a fresh output directory (no
held-out evaluation, no checkpoints) for ``cycles + 1`` rollouts of ``mu`` optimizer steps each; the first rollout
cycle is warm-up, each later one is one measurement. Per optimizer step: rollout and scoring time divided by mu (one
rollout serves mu steps) plus the step's update time; min / median / max over the measured cycles.

Variants, all with the same model, prompts (data order), G and prompts per step:
- ``stp``: the tiny STP preset (its estimator, anchors, temporal pruning tau 0.95) with ``rollout.cache`` =
  ``--stp-cache`` (the best rollout setting measured in benchmarks/RESULTS.md);
- ``d1``: the d1 baseline (``d1-tiny``: one-draw estimator, no anchors, no early stop, no cache, fixed-k decoding);
  both at the same mu (``--mu``, default the STP preset's): the method's effect, not d1's choice of mu;
- ``stp (own mu)`` / ``d1 (own mu)``: each preset with its own mu (tiny: 2, d1-tiny: 4).

Shapes: ``tiny`` is the tiny preset's rollout (gen 32 / block 32 / 16 steps, G 8 x 4 prompts); ``paper`` is the
paper's rollout shape (gen 256 / block 32 / 128 steps) with G and prompts per step cut (``--paper-g``,
``--paper-prompts``, default 4 x 1) so that it finishes in minutes on a shared 2-core CPU. Priors are built with
``prior.build_steps`` 8 in one block (the anchors' positions, not their quality, matter for time). The last line
reads ``rl step d1/stp = X.XXx``: the median seconds per optimizer step of d1 over STP's at the last shape run
(``paper`` unless ``--shape tiny``), same mu. Every table starts with the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

from benchmarks._report import load_average, machine_lines

SHAPES = {
    "tiny": {},
    "paper": {"rollout.gen_length": 256, "rollout.block_length": 32, "rollout.steps": 128},
}


def _micro_model(path: str) -> None:
    from stp.models.tiny import build_tiny

    build_tiny(seed=0, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
               intermediate_size=768, vocab_size=1024).save(path)


def _run(name: str, preset: str, model: str, overrides: dict, workdir: str) -> list[dict]:
    out = os.path.join(workdir, name.replace(" ", "_").replace("(", "").replace(")", ""))
    cmd = [sys.executable, "-m", "stp.train", "--preset", preset, "--model.name_or_path", model,
           "--run.eval_examples", "0", "--run.output_dir", out, "--run.tensorboard", "false",
           "--run.save_every", "0"]
    for key, value in overrides.items():
        cmd += [f"--{key}", str(value)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{res.stderr[-3000:]}")
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _per_step(rows: list[dict]) -> dict:
    """Seconds per optimizer step by phase, one value per measured rollout cycle (the first cycle is warm-up)."""
    cycles: dict[int, list[dict]] = {}
    for r in rows:
        cycles.setdefault(r["rollout"], []).append(r)
    measured = [c for i, c in sorted(cycles.items()) if i != min(cycles)]
    out = {"rollout": [], "scoring": [], "update": [], "total": [], "nfe": []}
    for steps in measured:
        mu = len(steps)
        first = min(steps, key=lambda r: r["iteration"])
        rollout, scoring = first["time_rollout"] / mu, first["time_scoring"] / mu
        update = sum(r["time_update"] for r in steps) / mu
        out["rollout"].append(rollout)
        out["scoring"].append(scoring)
        out["update"].append(update)
        out["total"].append(rollout + scoring + update)
        out["nfe"].append(first["nfe"])
    out["mu"] = len(measured[0])
    return out


def _shape_table(shape: str, model: str, workdir: str, args) -> tuple[list[str], float]:
    common = dict(SHAPES[shape])
    if shape == "paper":
        common.update({"grpo.num_generations": args.paper_g, "grpo.prompts_per_step": args.paper_prompts})
    priors = {"prior.build_steps": 8, "prior.build_block_length": common.get("rollout.gen_length", 32)}  # STP only
    from stp.config import resolve

    stp_mu, d1_mu = resolve(preset="tiny").grpo.num_iterations, resolve(preset="d1-tiny").grpo.num_iterations
    mu = args.mu or stp_mu
    variants = {
        "stp": ("tiny", {"rollout.cache": args.stp_cache, "grpo.num_iterations": mu, **priors}),
        "d1": ("d1-tiny", {"grpo.num_iterations": mu}),
        "stp (own mu)": ("tiny", {"rollout.cache": args.stp_cache, "grpo.num_iterations": stp_mu, **priors}),
        "d1 (own mu)": ("d1-tiny", {"grpo.num_iterations": d1_mu}),
    }
    results = {}
    for name, (preset, extra) in variants.items():
        over = {**common, **extra}
        over["grpo.max_steps"] = over["grpo.num_iterations"] * (args.cycles + 1)
        results[name] = _per_step(_run(f"{shape}-{name}", preset, model, over, workdir))
    g = common.get("grpo.num_generations", 8)
    p = common.get("grpo.prompts_per_step", 4)
    gl, bl, st = (common.get(k, d) for k, d in (("rollout.gen_length", 32), ("rollout.block_length", 32),
                                                 ("rollout.steps", 16)))
    med = {n: statistics.median(r["total"]) for n, r in results.items()}
    lines = [f"**shape {shape}: gen {gl} / block {bl} / {st} steps, G {g} x {p} prompts per step, STP cache "
             f"{args.stp_cache}, {args.cycles} measured rollout cycles per variant (min / median / max over them)**",
             "", "| variant | mu | NFE / sample | rollout s / step | scoring s / step | update s / step | "
             "s / step min | median | max | vs stp (median) |", "|" + "---|" * 10]
    for name, r in results.items():
        m = statistics.median
        lines.append(f"| {name} | {r['mu']} | {m(r['nfe']):.1f} | {m(r['rollout']):.3f} | {m(r['scoring']):.3f} | "
                     f"{m(r['update']):.3f} | {min(r['total']):.3f} | {med[name]:.3f} | {max(r['total']):.3f} | "
                     f"{med[name] / med['stp']:.2f}x |")
    return lines + [""], med["d1"] / med["stp"]


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="both", choices=("tiny", "paper", "both"), help="rollout shape(s) [both]")
    p.add_argument("--cycles", type=int, default=3, help="measured rollout cycles per variant, after one warm-up [3]")
    p.add_argument("--stp-cache", default="dual", choices=("none", "prefix", "dual"),
                   help="rollout.cache of the STP variants [dual]")
    p.add_argument("--mu", type=int, default=None, help="the shared mu of stp and d1 [the tiny preset's]")
    p.add_argument("--paper-g", type=int, default=4, help="G at the paper shape [4]")
    p.add_argument("--paper-prompts", type=int, default=1, help="prompts per step at the paper shape [1]")
    p.add_argument("--out", default=None, help="also write the markdown tables here")
    args = p.parse_args(argv)
    if args.cycles < 1:
        p.error(f"--cycles={args.cycles}: allowed: an integer >= 1")
    shapes = ["tiny", "paper"] if args.shape == "both" else [args.shape]
    load_start = load_average()
    body, ratio = [], None
    with tempfile.TemporaryDirectory() as workdir:
        model = os.path.join(workdir, "micro")
        _micro_model(model)
        for shape in shapes:
            lines, ratio = _shape_table(shape, model, workdir, args)
            body += lines
    text = "\n".join(machine_lines(load_start, load_average()) + [""] + body + [f"rl step d1/stp = {ratio:.2f}x"])
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return text


if __name__ == "__main__":
    main()
