"""How much a starting checkpoint can gain from RL: greedy accuracy (pass@1) against pass@k at the rollout temperature.

    python -m benchmarks.pass_at_k [--preset compare-tiny] [--examples 256] [--k 8] [--out probe.json]

RL with a binary reward sharpens what the policy already samples: a prompt none of whose k samples is right gives
its group no signal, and greedy accuracy can rise at most towards pass@k. This measures both on the preset's
checkpoint (``model.name_or_path``, built and cached on first use), held-out prompts (the test split, the first
``--examples`` of them, as the trainer's evaluation) and decoding (``rollout.gen_length``, ``block_length``,
``steps``):

- greedy: temperature 0 (the evaluation protocol), one completion per prompt: accuracy = pass@1 (greedy);
- sampled: ``--k`` completions per prompt at ``rollout.temperature`` (the rollouts' temperature), each with its own
  noise: pass@1 (sampled) = mean accuracy, pass@k = fraction of prompts with at least one right completion (metric
  1); best-of-k = the mean over prompts of the best of the k metrics: for a graded metric (Sudoku's fraction of empty
  cells filled right) what a prompt's best sample reaches, where pass@k (a whole grid right) says little.

Standard errors are over prompts (binomial, sqrt(p (1 - p) / n)). Accuracy is the task's ``metric``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["pass_at_k", "main"]


def _se(p: float, n: int) -> float:
    return math.sqrt(max(p * (1.0 - p), 0.0) / n) if n else float("nan")


def pass_at_k(model, task, examples: Sequence[Mapping[str, Any]], *, k: int, gen_length: int, block_length: int,
              steps: int, temperature: float, seed: int = 0, batch_size: int = 32) -> dict[str, Any]:
    """Greedy accuracy and, at ``temperature``, mean accuracy and pass@k of ``k`` samples per example.

    The sampled completions come from one ``stp.evaluation.evaluate`` call over each example repeated ``k`` times:
    every row has its own index, hence its own noise counter."""
    from stp.evaluation import evaluate

    if k < 1:
        raise ValueError(f"k={k}: allowed: an integer >= 1")
    if temperature <= 0:
        raise ValueError(f"temperature={temperature}: allowed: a number > 0 (pass@k of greedy decoding is pass@1)")
    n = len(examples)
    t0 = time.time()
    greedy = evaluate(model, task, examples, gen_length=gen_length, block_length=block_length, steps=steps,
                      batch_size=min(batch_size, n), temperature=0.0, seed=seed, progress=False)
    t_greedy = time.time() - t0
    repeated = [ex for ex in examples for _ in range(k)]
    t0 = time.time()
    sampled = evaluate(model, task, repeated, gen_length=gen_length, block_length=block_length, steps=steps,
                       batch_size=min(batch_size, len(repeated)), temperature=temperature, seed=seed, progress=False)
    t_sampled = time.time() - t0
    metric = [r["metric"] for r in sampled["records"]]
    per_example = [metric[i * k:(i + 1) * k] for i in range(n)]
    solved = [1.0 if max(m) >= 1.0 else 0.0 for m in per_example]
    p1 = greedy["accuracy"]
    ps = sampled["accuracy"]
    pk = sum(solved) / n
    best = [max(m) for m in per_example]
    best_mean = sum(best) / n
    best_se = math.sqrt(sum((b - best_mean) ** 2 for b in best) / (n - 1) / n) if n > 1 else float("nan")
    return {"examples": n, "k": k, "temperature": temperature,
            "greedy_accuracy": p1, "greedy_accuracy_se": _se(p1, n),
            "greedy_answer_rate": greedy["answer_rate"],
            "sampled_accuracy": ps, "sampled_accuracy_se": _se(ps, n * k),
            "pass_at_k": pk, "pass_at_k_se": _se(pk, n), "best_of_k": best_mean, "best_of_k_se": best_se,
            "prompts_with_mixed_groups": sum(1 for m in per_example if 0 < sum(m) < k) / n,
            "seconds_greedy": t_greedy, "seconds_sampled": t_sampled,
            "example_greedy": greedy["records"][0]["completion"],
            "example_sampled": sampled["records"][0]["completion"]}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.pass_at_k", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="compare-tiny", help="the preset whose checkpoint, task and decoding are "
                   "measured [compare-tiny]")
    p.add_argument("--model", default=None, help="another checkpoint (a directory or pretrained:TASK) [the preset's]")
    p.add_argument("--examples", type=int, default=256, help="held-out prompts [256]")
    p.add_argument("--k", type=int, default=8, help="samples per prompt [8]")
    p.add_argument("--temperature", type=float, default=None, help="sampling temperature [rollout.temperature]")
    p.add_argument("--seed", type=int, default=0, help="noise seed of the samples [0]")
    p.add_argument("--out", default=None, help="also write the result as JSON here")
    args = p.parse_args(argv)
    if args.examples < 1:
        p.error(f"--examples {args.examples}: allowed: an integer >= 1")
    if args.k < 1:
        p.error(f"--k {args.k}: allowed: an integer >= 1")

    from stp.config import ConfigError, resolve
    from stp.data_order import load_data, task_for

    try:
        cfg = resolve(preset=args.preset, overrides={"run.eval_examples": args.examples})
    except ConfigError as e:
        p.error(str(e))
    from stp.pretrain import load_model

    name = args.model or cfg.model.name_or_path
    model = load_model(name)
    task = task_for(cfg)
    _, heldout = load_data(cfg, task)
    r = cfg.rollout
    res = pass_at_k(model, task, heldout, k=args.k, gen_length=r.gen_length, block_length=r.block_length,
                    steps=r.steps, temperature=args.temperature if args.temperature is not None else r.temperature,
                    seed=args.seed)
    res = {"preset": args.preset, "model": name, "task": cfg.run.task, "gen_length": r.gen_length,
           "block_length": r.block_length, "steps": r.steps, **res}
    print(f"{name} on {cfg.run.task} ({res['examples']} held-out prompts, L {r.gen_length} / block "
          f"{r.block_length} / {r.steps} steps): greedy accuracy {res['greedy_accuracy']:.3f} +- "
          f"{res['greedy_accuracy_se']:.3f}; at T={res['temperature']:g}: accuracy {res['sampled_accuracy']:.3f}, "
          f"pass@{args.k} {res['pass_at_k']:.3f} +- {res['pass_at_k_se']:.3f}, best-of-{args.k} "
          f"{res['best_of_k']:.3f} +- {res['best_of_k_se']:.3f}; prompts with mixed groups "
          f"{res['prompts_with_mixed_groups']:.3f}; {res['seconds_greedy']:.0f} s + {res['seconds_sampled']:.0f} s")
    print(f"  e.g. greedy {res['example_greedy']!r}, sampled {res['example_sampled']!r}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    return res


if __name__ == "__main__":
    main()
    sys.exit(0)
