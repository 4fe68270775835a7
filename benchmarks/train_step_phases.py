"""Seconds per optimizer step, by phase, of every RL method with and without the rollouts' KV cache: the engine's
gain apart from each method's cost.

    python -m benchmarks.train_step_phases [--shape paper] [--cycles 3] [--methods ...] [--caches none dual]

Each variant runs ``python -m stp.train`` in a fresh output directory (no held-out evaluation, no checkpoints) for
``cycles + 1`` rollouts of ``mu`` optimizer steps each; the first rollout cycle is warm-up, each later one is one
measurement. Per optimizer step: rollout and scoring time divided by mu (one rollout serves mu steps) plus the step's
update time; min / median / max over the measured cycles.

Variants: every method (``stp``, ``elbo``, ``d1``, ``diffpo``, ``dtrpo-online``) x ``rollout.cache`` (``none``,
``dual``), each method with its preset's settings (``stp``: the STP preset, anchors and temporal pruning tau 0.95;
``elbo``: ``elbo-*``; ``d1``: ``d1-*``, fixed-k decoding, no early stop; ``diffpo``: ``diffpo-*``, the
entropy-bounded sampler; ``dtrpo-online``: the STP preset with ``--method dtrpo-online``), all at the same mu
(``--mu``, default the STP preset's) and the same model, prompts (data order), G and prompts per step. Only the
cache differs between a method's two rows.

Shapes:
- ``paper``: the paper's rollout shape (gen 256 / block 32 / 128 steps) on a LLaDA-proportioned micro model (hidden
  256, 4 layers, 4 heads, MLP 768, vocabulary 1024; random weights: time, not reward), the tiny presets (Sudoku
  prompts), G and prompts per step cut (``--paper-g``, ``--paper-prompts``, default 4 x 1) so that it finishes on a
  shared 2-core CPU. Priors are built with ``prior.build_steps`` 8 in one block (the anchors' positions, not their
  quality, matter for time).
- ``chain``: the long-answer task's own shape and model (the ``*chain-tiny`` presets: ``pretrained:chain``, gen 128
  / block 32 / 64 steps, G 6 x 2), priors built as at the paper shape.
- ``tiny``: the tiny preset's one-block rollout (gen 32 / block 32 / 16 steps, G 8 x 4) on the micro model.

Two kinds of summary lines per shape, which say different things:
- ``<method>: cache dual/none = X.XXx``: the median seconds per optimizer step with ``rollout.cache dual`` over
  those without, for one method: the engine's effect (below 1: the cache saves time), which serves every method;
- ``step d1/<method> (cache C) = X.XXx``: d1's median seconds per step over the method's at the same cache: the
  method's own cost or saving against d1 at equal engine (above 1: the method's step is cheaper than d1's).
Every table starts with the machine and its load.
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
    "chain": {},
}
METHODS = ("stp", "elbo", "d1", "diffpo", "dtrpo-online")
CACHES = ("none", "dual")


def _micro_model(path: str) -> None:
    from stp.models.tiny import build_tiny

    build_tiny(seed=0, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
               intermediate_size=768, vocab_size=1024).save(path)


def _run(name: str, preset: str, model: str | None, overrides: dict, workdir: str, method: str | None = None
         ) -> list[dict]:
    out = os.path.join(workdir, name.replace(" ", "_").replace("(", "").replace(")", ""))
    cmd = [sys.executable, "-m", "stp.train", "--preset", preset,
           "--run.eval_examples", "0", "--run.output_dir", out, "--run.tensorboard", "false",
           "--run.save_every", "0"]
    if model is not None:
        cmd += ["--model.name_or_path", model]
    if method is not None:
        cmd += ["--method", method]
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


def _presets(shape: str) -> dict[str, tuple[str, str | None]]:
    """method -> (preset, --method) at ``shape``."""
    base = "chain-tiny" if shape == "chain" else "tiny"
    pre = {"stp": base, "elbo": f"elbo-{base}", "d1": f"d1-{base}", "diffpo": f"diffpo-{base}"}
    out = {m: (p, None) for m, p in pre.items()}
    out["dtrpo-online"] = (base, "dtrpo-online")
    return out


def ratio_lines(results: dict[tuple[str, str], dict], methods, caches) -> list[str]:
    """The two kinds of summary lines (module docstring) from {(method, cache): _per_step(...)}.

    >>> r = {(m, c): {"total": [t]} for (m, c), t in {("stp", "none"): 8.0, ("stp", "dual"): 2.0,
    ...      ("d1", "none"): 10.0, ("d1", "dual"): 3.0}.items()}
    >>> ratio_lines(r, ["stp", "d1"], ["none", "dual"])  # doctest: +NORMALIZE_WHITESPACE
    ['stp: cache dual/none = 0.25x', 'd1: cache dual/none = 0.30x', 'step d1/stp (cache none) = 1.25x',
     'step d1/stp (cache dual) = 1.50x']
    """
    med = {k: statistics.median(v["total"]) for k, v in results.items()}
    lines = []
    if "none" in caches and "dual" in caches:
        lines += [f"{m}: cache dual/none = {med[(m, 'dual')] / med[(m, 'none')]:.2f}x" for m in methods]
    if "d1" in methods:
        lines += [f"step d1/{m} (cache {c}) = {med[('d1', c)] / med[(m, c)]:.2f}x"
                  for c in caches for m in methods if m != "d1"]
    return lines


def _shape_table(shape: str, model: str, workdir: str, args) -> list[str]:
    common = dict(SHAPES[shape])
    if shape == "paper":
        common.update({"grpo.num_generations": args.paper_g, "grpo.prompts_per_step": args.paper_prompts})
    # Priors of 8 steps in one block: built before training (outside the step times), so only the start-up is
    # shorter; the anchors' positions, not their quality, matter for time.
    gen_length = common.get("rollout.gen_length", 128 if shape == "chain" else 32)
    priors = {"prior.build_steps": 8, "prior.build_block_length": gen_length}
    from stp.config import resolve

    presets = _presets(shape)
    mu = args.mu or resolve(preset=presets["stp"][0]).grpo.num_iterations
    cfg = resolve(preset=presets["stp"][0], overrides={k: v for k, v in common.items()})
    results: dict[tuple[str, str], dict] = {}
    for method in args.methods:
        preset, flag = presets[method]
        for cache in args.caches:
            over = {**common, "rollout.cache": cache, "grpo.num_iterations": mu}
            if method == "stp":
                over.update(priors)
            over["grpo.max_steps"] = mu * (args.cycles + 1)
            results[(method, cache)] = _per_step(_run(f"{shape}-{method}-{cache}", preset,
                                                      None if shape == "chain" else model, over, workdir, flag))
            print(f"  {shape} {method} cache {cache}: median {statistics.median(results[(method, cache)]['total']):.3f}"
                  " s / step", file=sys.stderr, flush=True)
    r = cfg.rollout
    g, p = cfg.grpo.num_generations, cfg.grpo.prompts_per_step
    lines = [f"**shape {shape}: gen {r.gen_length} / block {r.block_length} / {r.steps} steps, G {g} x {p} prompts "
             f"per step, mu {mu} for every method, {args.cycles} measured rollout cycles per variant (min / median / "
             "max over them)**",
             "", "| method | cache | NFE / sample | rollout s / step | scoring s / step | update s / step | "
             "s / step min | median | max | vs d1 at this cache (median) |", "|" + "---|" * 10]
    m = statistics.median
    for (method, cache), res in results.items():
        base = results.get(("d1", cache))
        vs = f"{m(res['total']) / m(base['total']):.2f}x" if base else "-"
        lines.append(f"| {method} | {cache} | {m(res['nfe']):.1f} | {m(res['rollout']):.3f} | "
                     f"{m(res['scoring']):.3f} | {m(res['update']):.3f} | {min(res['total']):.3f} | "
                     f"{m(res['total']):.3f} | {max(res['total']):.3f} | {vs} |")
    return lines + [""] + ratio_lines(results, args.methods, args.caches) + [""]


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="paper", choices=(*SHAPES, "both", "all"),
                   help="rollout shape(s): tiny, paper, chain; both = tiny and paper; all = the three [paper]")
    p.add_argument("--cycles", type=int, default=3, help="measured rollout cycles per variant, after one warm-up [3]")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS, help="methods [all]")
    p.add_argument("--caches", nargs="+", default=list(CACHES), choices=("none", "prefix", "dual"),
                   help="rollout.cache values [none dual]")
    p.add_argument("--mu", type=int, default=None, help="the shared mu of every method [the STP preset's]")
    p.add_argument("--paper-g", type=int, default=4, help="G at the paper shape [4]")
    p.add_argument("--paper-prompts", type=int, default=1, help="prompts per step at the paper shape [1]")
    p.add_argument("--out", default=None, help="also write the markdown tables here")
    args = p.parse_args(argv)
    if args.cycles < 1:
        p.error(f"--cycles={args.cycles}: allowed: an integer >= 1")
    shapes = {"both": ["tiny", "paper"], "all": ["tiny", "paper", "chain"]}.get(args.shape, [args.shape])
    load_start = load_average()
    body: list[str] = []
    with tempfile.TemporaryDirectory() as workdir:
        model = os.path.join(workdir, "micro")
        _micro_model(model)
        for shape in shapes:
            body += _shape_table(shape, model, workdir, args)
    text = "\n".join(machine_lines(load_start, load_average()) + [""] + body)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return text


if __name__ == "__main__":
    main()
