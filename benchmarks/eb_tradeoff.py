"""Reward against cost on the tiny Sudoku model: fixed-k decoding, the confidence-threshold decoder, the
entropy-bounded (EB) sampler at fixed thresholds, and DiFFPO's learned threshold (``sampler`` and ``joint``
training, several seeds), each with paired standard errors against one reference decoder.

    python -m benchmarks.eb_tradeoff [--examples 128] [--train-steps 30] [--seeds 0 1 2] [--batch-size 8]
                                     [--rounds 2] [--workdir DIR] [--out benchmarks/eb_tradeoff]

The stored tiny checkpoint (``pretrained:sudoku``) writes most answers without the ``<answer>`` tags the reward
reads (greedy reward ~0), so the decoders are compared on a policy that answers: stage 0 trains the ``d1-tiny``
preset (seed 0) and merges its adapter into a model directory (``stp.export``), the base B of every row:

- (a) fixed-k: LLaDA's low-confidence schedule with k = 32 / steps tokens per step (steps 32, 16, 8, 4, 2);
- (t) confidence threshold: ``generate(confidence_threshold=c, steps=32)``: every masked position whose greedy
  probability exceeds c, at least one per step (the schedule's k = 1);
- (b) EB at fixed gamma (``stp.sampler.generate(entropy_bound=gamma)``) over a grid;
- (c) ``stp.train --preset diffpo-tiny --diffpo.mode sampler --run.seed s`` on B: only the threshold controller
  trains; decoded with each prompt's median gamma, and (c~) with a gamma drawn from the controller's distribution;
- (d) / (d~) the same with ``--diffpo.mode joint`` (model and controller; decoded with the adapter merged);
- (l) with ``--lambdas``: (c) at other ``diffpo.nfe_penalty`` values (seed 0), median gamma.

EB orders a block's positions by entropy; the sampler has no EB variant that orders them by confidence, so there
is no such row.

Every row decodes the same held-out puzzles greedily, in consecutive ``generate`` calls of ``--batch-size``
puzzles (8 = one GRPO group of the tiny presets), and records per puzzle the reward and the NFE (forward passes the
puzzle used). Columns: mean reward; its paired difference to the reference row (fixed k = 2, steps 16) with the
standard error of the per-puzzle differences (d +- se; an interval d +- 2 se that holds 0 says the two decoders are
not told apart on these puzzles); mean NFE per puzzle; batch passes (the passes each call ran: max NFE over its
rows, since a finished row stays in the batch; mean over calls, ``stp.metrics.batch_passes``); wall time per puzzle
(all calls, min / median / max over ``--rounds``; the machine's load is printed with the tables). For the trained
rows the seeds are also pooled (per-puzzle mean over seeds, paired against the reference; the seeds' spread is
given beside it). Writes ``<out>.md``, ``<out>.json`` (rows with per-puzzle values) and ``<out>.png``. With
``--workdir`` the training runs and decoded rows are kept there, and a rerun reuses them (rows are decoded again
only for timing if ``--rounds`` asks for more).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks._report import load_average, machine_lines

GAMMAS = (0.0, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
STEPS = (32, 16, 8, 4, 2)
THRESHOLDS = (0.5, 0.7, 0.9, 0.95, 0.99)
GEN = {"gen_length": 32, "block_length": 32}
REFERENCE = "a:16"  # fixed k = 2 (steps 16): the paired differences are taken against this row


def _run(cmd: list[str], env: dict[str, str]) -> float:
    start = time.time()
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stderr[-3000:]}")
    return time.time() - start


def _train(preset: str, out: Path, env: dict[str, str], *flags: str) -> float:
    return _run([sys.executable, "-m", "stp.train", "--preset", preset, "--run.output_dir", str(out),
                 "--run.tensorboard", "false", "--run.eval_examples", "0", *flags], env)


def paired(values: list[float], reference: list[float]) -> tuple[float, float]:
    """(mean difference, standard error of the per-puzzle differences) of two rows over the same puzzles."""
    if len(values) != len(reference) or len(values) < 2:
        raise ValueError(f"paired: {len(values)} and {len(reference)} values; need the same puzzles, at least 2")
    d = [a - b for a, b in zip(values, reference)]
    return statistics.fmean(d), statistics.stdev(d) / math.sqrt(len(d))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.eb_tradeoff", description=__doc__.split("\n\n")[0])
    p.add_argument("--examples", type=int, default=128, help="held-out puzzles [128]")
    p.add_argument("--train-steps", type=int, default=30, help="optimizer steps of the (c) and (d) runs [30]")
    p.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2], help="run.seed of the (c), (d) runs [0 1 2]")
    p.add_argument("--batch-size", type=int, default=8, help="puzzles per generate call [8]")
    p.add_argument("--rounds", type=int, default=2, help="timed decodings of each row [2]")
    p.add_argument("--lambdas", type=float, nargs="*", default=[],
                   help="also train (c) at these diffpo.nfe_penalty values (seed 0; rows (l)) [none]")
    p.add_argument("--skip", nargs="*", default=[], choices=("c", "d"), help="leave out the training rows")
    p.add_argument("--workdir", default=None, help="keep the runs and rows here (default: a temporary directory)")
    p.add_argument("--out", default="benchmarks/eb_tradeoff", help="write <out>.md, <out>.json and <out>.png")
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    from stp import models
    from stp.controller import ThresholdController, pooled_prompt_features
    from stp.metrics import batch_passes
    from stp.sampler import generate
    from stp.tasks.prompts import task_with_prompt

    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    load_start = load_average()
    t_start = time.time()
    work_ctx = tempfile.TemporaryDirectory(prefix="stp-eb-") if args.workdir is None else None
    work = Path(args.workdir or work_ctx.name)
    work.mkdir(parents=True, exist_ok=True)
    notes = []

    # ---- stage 0: a policy that answers (d1-tiny, seed 0), merged into a model directory B
    base = work / "base"
    if not (base / "config.json").is_file():
        from stp.pretrain import resolve_model_name

        if not (work / "d1" / "adapter").is_dir():
            t = _train("d1-tiny", work / "d1", env)
            notes.append(f"stage 0 (d1-tiny, 60 steps): {t:.0f} s")
        _run([sys.executable, "-m", "stp.export", "--model", resolve_model_name("pretrained:sudoku", progress=False),
              "--adapter", str(work / "d1" / "adapter"), "--out", str(base), "--overwrite", "--quiet"], env)
    task = task_with_prompt("sudoku", "compact")
    examples = task.load("test", None, source="generated", n=args.examples, seed=0)
    model = models.load(str(base))
    ids, mask = _prompts(model, task, examples)
    eos = int(model.eos_token_id)

    def decode(m, *, controller=None, sampled=False, **kw) -> dict:
        """Per-puzzle reward, NFE and gamma of greedy decoding in calls of --batch-size; wall time per round."""
        rewards, nfe, gammas, seconds = [], [], [], []
        for rnd in range(args.rounds):
            t0 = time.perf_counter()
            outs = []
            for lo in range(0, len(examples), args.batch_size):
                sl = slice(lo, lo + args.batch_size)
                sample_ids = torch.arange(lo, min(lo + args.batch_size, len(examples)))
                extra = {}
                if controller is not None:
                    f = pooled_prompt_features(m, ids[sl], mask[sl])
                    extra["entropy_bound"] = (controller.sample(f, seed=0, sample_ids=sample_ids) if sampled
                                              else controller.median(f))
                out = generate(m, ids[sl], attention_mask=mask[sl], temperature=0.0, seed=0, sample_ids=sample_ids,
                               **GEN, **kw, **extra)
                outs.append((out, extra.get("entropy_bound")))
            seconds.append((time.perf_counter() - t0) / len(examples) * 1e3)
            if rnd == 0:
                for out, g in outs:
                    nfe += out.nfe.tolist()
                    if g is not None:
                        gammas += g.tolist()
                    for toks in out.completions.tolist():
                        toks = toks[:toks.index(eos)] if eos in toks else toks
                        text = model.tokenizer.decode(toks, skip_special_tokens=True)
                        rewards.append(text)
        rewards = [sum(task.rewards(t, e).values()) for t, e in zip(rewards, examples)]
        return {"rewards": rewards, "nfes": nfe, "gammas": gammas or None, "ms_per_puzzle": seconds,
                "reward": statistics.fmean(rewards), "nfe": statistics.fmean(nfe),
                "batch_passes": batch_passes(nfe, args.batch_size),
                "gamma": statistics.fmean(gammas) if gammas else kw.get("entropy_bound")}

    cache_file = work / f"rows-n{args.examples}-b{args.batch_size}.json"
    cached = {r["key"]: r for r in json.loads(cache_file.read_text())} if cache_file.is_file() else {}
    rows, reused = [], []

    def row(key: str, kind: str, label: str, m, **kw) -> None:
        r = cached.get(key)
        if r is not None and len(r["ms_per_puzzle"]) >= args.rounds:
            reused.append(key)
        else:
            r = {"key": key, "kind": kind, "label": label, **decode(m, **kw)}
            cached[key] = r
            cache_file.write_text(json.dumps(list(cached.values())) + "\n")
        rows.append(r)
        print(f"{label}: reward {r['reward']:.3f}, NFE {r['nfe']:.2f}, passes {r['batch_passes']:.2f}", flush=True)

    for steps in STEPS:
        row(f"a:{steps}", "a", f"fixed-k, k = {32 // steps} (steps {steps})", model, steps=steps)
    for c in THRESHOLDS:
        row(f"t:{c}", "t", f"confidence > {c:g} (steps 32)", model, steps=32, confidence_threshold=c)
    for gamma in GAMMAS:
        row(f"b:{gamma}", "b", f"EB, gamma = {gamma:g}", model, steps=16, entropy_bound=gamma)

    flags = ["--model.name_or_path", str(base), "--grpo.max_steps", str(args.train_steps)]
    for kind, mode in (("c", "sampler"), ("d", "joint")):
        if kind in args.skip:
            continue
        for seed in args.seeds:
            out = work / f"diffpo-{mode}-s{seed}-{args.train_steps}"
            if not (out / "controller" / "controller.json").is_file():
                t = _train("diffpo-tiny", out, env, *flags, "--diffpo.mode", mode, "--run.seed", str(seed))
                notes.append(f"({kind}) diffpo-tiny --diffpo.mode {mode} --run.seed {seed}, {args.train_steps} "
                             f"steps: {t:.0f} s")
            ctl = ThresholdController.load(out / "controller")
            m = models.load(str(base))
            if mode == "joint":
                models.merge_adapter(m, str(out / "adapter"))
            row(f"{kind}:{seed}:median", kind, f"DiFFPO {mode}, seed {seed}, median gamma", m, steps=16,
                controller=ctl)
            row(f"{kind}:{seed}:sampled", kind + "~", f"DiFFPO {mode}, seed {seed}, sampled gamma", m, steps=16,
                controller=ctl, sampled=True)
    from stp.config import PRESETS

    preset_lambda = PRESETS["diffpo-tiny"].overrides["diffpo"]["nfe_penalty"]
    for lam in args.lambdas:
        out = work / f"diffpo-sampler-s0-{args.train_steps}-lambda{lam:g}"
        if not (out / "controller" / "controller.json").is_file():
            t = _train("diffpo-tiny", out, env, *flags, "--diffpo.mode", "sampler", "--run.seed", "0",
                       "--diffpo.nfe_penalty", str(lam))
            notes.append(f"(l) diffpo-tiny --diffpo.mode sampler --run.seed 0 --diffpo.nfe_penalty {lam:g}, "
                         f"{args.train_steps} steps: {t:.0f} s")
        ctl = ThresholdController.load(out / "controller")
        row(f"l:{lam:g}:median", "l", f"DiFFPO sampler, seed 0, lambda {lam:g} (preset {preset_lambda:g}), "
            "median gamma", model, steps=16, controller=ctl)
    load_end = load_average()

    ref = next(r for r in rows if r["key"] == REFERENCE)
    for r in rows:
        r["diff"], r["se"] = paired(r["rewards"], ref["rewards"])
    pooled = []
    for kind in ("c", "c~", "d", "d~"):
        group = [r for r in rows if r["kind"] == kind]
        if len(group) < 2:
            continue
        per_puzzle = [statistics.fmean(v) for v in zip(*(r["rewards"] for r in group))]
        d, se = paired(per_puzzle, ref["rewards"])
        mode = "sampler" if kind[0] == "c" else "joint"
        how = "sampled" if kind.endswith("~") else "median"
        pooled.append({"kind": kind, "label": f"DiFFPO {mode}, {how} gamma, {len(group)} seeds pooled",
                       "reward": statistics.fmean(per_puzzle), "diff": d, "se": se,
                       "seed_rewards": [r["reward"] for r in group],
                       "nfe": statistics.fmean(r["nfe"] for r in group),
                       "batch_passes": statistics.fmean(r["batch_passes"] for r in group),
                       "gamma": statistics.median(g for r in group for g in r["gammas"])})

    lines = machine_lines(load_start, load_end)
    lines += [f"Wall time of the whole command: {time.time() - t_start:.0f} s.", "",
              f"{len(examples)} held-out 4x4 puzzles (generated test split, seed 0), greedy, L = 32, one block, "
              f"{args.batch_size} puzzles per generate call; base B = d1-tiny (seed 0) merged. "
              f"Reference of the paired differences: {ref['label']}.", "",
              "| row | decoding | mean reward | reward - reference (+- paired se) | mean NFE | batch passes | "
              f"ms / puzzle (min / median / max of {args.rounds}) | median gamma |",
              "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        g = "-" if r.get("gamma") is None else f"{r['gamma']:.3f}"
        if r.get("gammas"):  # a sampled gamma is log-normal, heavy-tailed: its median says more than its mean
            g = f"{statistics.median(r['gammas']):.3f}"
        t = r["ms_per_puzzle"]
        diff = "(reference)" if r is ref else f"{r['diff']:+.3f} +- {r['se']:.3f}"
        lines.append(f"| ({r['kind']}) | {r['label']} | {r['reward']:.3f} | {diff} | {r['nfe']:.2f} | "
                     f"{r['batch_passes']:.2f} | {min(t):.1f} / {statistics.median(t):.1f} / {max(t):.1f} | {g} |")
    if pooled:
        lines += ["", "Trained controllers, seeds pooled (per-puzzle mean reward over the seeds, paired against the "
                  "reference; the se covers the puzzles, the seeds' own spread is the last column):", "",
                  "| row | decoding | mean reward | reward - reference (+- paired se) | mean NFE | batch passes | "
                  "median gamma | reward per seed |", "|---|---|---|---|---|---|---|---|"]
        for r in pooled:
            lines.append(f"| ({r['kind']}) | {r['label']} | {r['reward']:.3f} | {r['diff']:+.3f} +- {r['se']:.3f} | "
                         f"{r['nfe']:.2f} | {r['batch_passes']:.2f} | {r['gamma']:.3f} | "
                         f"{', '.join(f'{v:.3f}' for v in r['seed_rewards'])} |")
    told = [r for r in rows + pooled if r is not ref and abs(r["diff"]) > 2 * r["se"]]
    lines += ["", "Rows whose reward differs from the reference by more than 2 paired standard errors: "
              + (", ".join(f"{r['label']} ({r['diff']:+.3f} +- {r['se']:.3f})" for r in told) or "none") + "."]
    if reused:
        notes.append(f"{len(reused)} of {len(rows)} rows (their rewards, NFE and timings) reused from {cache_file}, "
                     f"decoded by an earlier run of this command with the same settings: {', '.join(reused)}")
    lines += ["", *notes]
    table = "\n".join(lines)
    print("\n" + table)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.md").write_text(table + "\n")
    Path(f"{args.out}.json").write_text(_json_lines({"reference": REFERENCE, "rows": rows, "pooled": pooled}))
    _plot(rows, ref, Path(f"{args.out}.png"))
    if work_ctx is not None:
        work_ctx.cleanup()
    return 0


def _json_lines(doc: dict) -> str:
    """JSON with one line per row (the per-puzzle lists stay on their row's line)."""
    parts = []
    for key, value in doc.items():
        if isinstance(value, list):
            inner = ",\n  ".join(json.dumps(v) for v in value)
            parts.append(f"{json.dumps(key)}: [\n  {inner}\n ]" if value else f"{json.dumps(key)}: []")
        else:
            parts.append(f"{json.dumps(key)}: {json.dumps(value)}")
    return "{\n " + ",\n ".join(parts) + "\n}\n"


def _prompts(model, task, examples):
    """Left-padded prompt ids and mask of ``examples``, encoded as ``stp.evaluation`` encodes them."""
    import torch

    from stp.evaluation import _encode

    enc = [_encode(model.tokenizer, task, e, 0)[2] for e in examples]
    width = max(len(e) for e in enc)
    ids = torch.full((len(enc), width), int(model.pad_token_id), dtype=torch.long)
    mask = torch.zeros(len(enc), width, dtype=torch.long)
    for i, e in enumerate(enc):
        ids[i, width - len(e):] = torch.tensor(e)
        mask[i, width - len(e):] = 1
    return ids, mask


def _plot(rows: list[dict], ref: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    style = {"a": ("o-", "fixed-k (LLaDA schedule)"), "t": ("v-", "confidence threshold"),
             "b": ("s-", "EB, fixed gamma"), "c": ("*", "DiFFPO sampler, median gamma (per seed)"),
             "c~": ("x", "DiFFPO sampler, sampled gamma"), "d": ("P", "DiFFPO joint, median gamma (per seed)"),
             "d~": ("+", "DiFFPO joint, sampled gamma"), "l": ("D", "DiFFPO sampler, other lambda")}
    for ax, cost, name in ((axes[0], "nfe", "mean NFE per puzzle"), (axes[1], "batch_passes",
                                                                      "batch passes per generate call")):
        for kind, (marker, label) in style.items():
            pts = sorted((r[cost], r["reward"], 2 * r["se"]) for r in rows if r["kind"] == kind)
            if pts:
                ax.errorbar([x for x, _, _ in pts], [y for _, y, _ in pts], yerr=[e for _, _, e in pts], fmt=marker,
                            label=label, markersize=9 if kind[0] in "cdl" else 5, capsize=2)
        ax.axhline(ref["reward"], color="grey", lw=0.8, ls=":")
        ax.set_xlabel(name)
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("mean held-out reward (4x4 Sudoku)")
    axes[1].legend(fontsize=7)
    fig.suptitle(f"bars: +- 2 paired se of the difference to {ref['label']} (dotted)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
