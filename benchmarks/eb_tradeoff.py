"""Accuracy against NFE on the tiny Sudoku model: fixed-k decoding, the entropy-bounded (EB) sampler at fixed
thresholds, and DiFFPO's learned threshold (``sampler`` and ``joint`` training).

    python -m benchmarks.eb_tradeoff [--examples 128] [--train-steps 30] [--out benchmarks/eb_tradeoff]

The stored tiny checkpoint (``pretrained:sudoku``) writes most answers without the ``<answer>`` tags the reward
reads (greedy reward ~0), so the decoders are compared on a policy that answers: stage 0 trains the ``d1-tiny``
preset (seed 0) and merges its adapter into a model directory (``stp.export``), the base B of every row:

- (a) fixed-k: LLaDA's low-confidence schedule with k = 32 / steps tokens per step (steps 32, 16, 8, 4, 2);
- (b) EB at fixed gamma (``stp.sampler.generate(entropy_bound=gamma)``) over a grid;
- (c) ``stp.train --preset diffpo-tiny --diffpo.mode sampler`` on B: only the threshold controller trains; decoded
  with each prompt's median gamma (``stp.eval --controller``);
- (d) ``--diffpo.mode joint`` on B: model and controller; decoded with the adapter and the controller.

Every row: greedy decoding of the same held-out puzzles (the generated test split), mean reward and mean NFE
(``stp.evaluation.evaluate``). Then rollout wall time per sample (``generate`` alone, batch = all puzzles, rounds
timed, min / median / max) of the best fixed-k row against the EB row with the fewest NFE among those whose reward is
at least that row's reward minus ``--tolerance``. Writes ``<out>.md`` (the tables) and ``<out>.png`` (reward vs
NFE). The machine's load is printed with the tables: timings on a busy machine are not those of a quiet one.
"""

from __future__ import annotations

import argparse
import json
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
GEN = {"gen_length": 32, "block_length": 32}


def _run(cmd: list[str], env: dict[str, str]) -> float:
    start = time.time()
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stderr[-3000:]}")
    return time.time() - start


def _train(preset: str, out: Path, env: dict[str, str], *flags: str) -> float:
    return _run([sys.executable, "-m", "stp.train", "--preset", preset, "--run.output_dir", str(out),
                 "--run.tensorboard", "false", "--run.eval_examples", "0", *flags], env)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.eb_tradeoff", description=__doc__.split("\n\n")[0])
    p.add_argument("--examples", type=int, default=128, help="held-out puzzles [128]")
    p.add_argument("--train-steps", type=int, default=30, help="optimizer steps of the (c) and (d) runs [30]")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds of the wall-time comparison [3]")
    p.add_argument("--tolerance", type=float, default=0.01, help="'equal reward' tolerance [0.01]")
    p.add_argument("--skip", nargs="*", default=[], choices=("c", "d"), help="leave out the training rows")
    p.add_argument("--workdir", default=None, help="keep the runs here (default: a temporary directory)")
    p.add_argument("--rows-from", default=None, metavar="JSON",
                   help="reuse the decoding rows of an earlier run (its <out>.json); only the timing runs again")
    p.add_argument("--out", default="benchmarks/eb_tradeoff", help="write <out>.md and <out>.png")
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    from stp import models
    from stp.controller import ThresholdController
    from stp.evaluation import evaluate
    from stp.sampler import generate
    from stp.tasks.prompts import task_with_prompt

    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    load_start = load_average()
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

    def score(model, **kw) -> dict:
        r = evaluate(model, task, examples, batch_size=len(examples), temperature=0.0, seed=0, progress=False,
                     max_prompt_length=0, **GEN, **kw)
        return {"reward": r["mean_reward"], "nfe": r["mean_nfe"], "gamma": r["mean_gamma"]}

    model = models.load(str(base))
    rows = []
    if args.rows_from:  # the decoding rows of an earlier run: only the wall-time comparison is measured again
        rows = json.loads(Path(args.rows_from).read_text())
        notes.append(f"rows (a)-(d) read from {args.rows_from} (an earlier run of this command)")
    for steps in () if rows else STEPS:
        rows.append({"kind": "a", "label": f"fixed-k, k = {32 // steps} (steps {steps})", "steps": steps,
                     **score(model, steps=steps)})
        print(rows[-1], flush=True)
    for gamma in () if args.rows_from else GAMMAS:
        rows.append({"kind": "b", "label": f"EB, gamma = {gamma:g}", "entropy_bound": gamma,
                     **score(model, steps=16, entropy_bound=gamma)})
        print(rows[-1], flush=True)

    flags = ["--model.name_or_path", str(base), "--grpo.max_steps", str(args.train_steps)]
    for kind, mode in (("c", "sampler"), ("d", "joint")):
        if kind in args.skip or args.rows_from:
            continue
        out = work / f"diffpo-{mode}"
        t = _train("diffpo-tiny", out, env, *flags, "--diffpo.mode", mode)
        notes.append(f"({kind}) diffpo-tiny --diffpo.mode {mode}, {args.train_steps} steps: {t:.0f} s")
        ctl = ThresholdController.load(out / "controller")
        m = models.load(str(base))
        if mode == "joint":
            models.merge_adapter(m, str(out / "adapter"))
        rows.append({"kind": kind, "label": f"DiFFPO {mode} (learned gamma)", "controller": str(out),
                     **score(m, steps=16, controller=ctl)})
        print(rows[-1], flush=True)

    # ---- equal reward: each fixed-k row against the cheapest EB row whose reward is within the tolerance of it or
    # above; wall time per sample for the best-rewarded fixed-k row that has such a match
    pairs = []
    for k_row in sorted((r for r in rows if r["kind"] == "a"), key=lambda r: -r["reward"]):
        match = [r for r in rows if r["kind"] == "b" and r["reward"] >= k_row["reward"] - args.tolerance]
        if match:
            pairs.append((k_row, min(match, key=lambda r: r["nfe"])))
    timing = []
    if pairs:
        best_k, eb = pairs[0]
        ids, mask = _prompts(model, task, examples)

        def timed(**kw) -> list[float]:
            out = []
            for _ in range(args.rounds):
                t0 = time.perf_counter()
                generate(model, ids, attention_mask=mask, temperature=0.0, seed=0, **GEN, **kw)
                out.append((time.perf_counter() - t0) / len(examples) * 1e3)
            return out

        t_k = timed(steps=best_k["steps"])
        t_eb = timed(steps=16, entropy_bound=eb["entropy_bound"])
        timing = [(best_k, t_k), (eb, t_eb)]
    load_end = load_average()

    lines = machine_lines(load_start, load_end)
    lines += ["", f"{len(examples)} held-out 4x4 puzzles (generated test split, seed 0), greedy, L = 32, one block; "
              "base B = d1-tiny (seed 0) merged.", ""]
    lines += ["| row | decoding | mean reward | mean NFE | mean gamma |", "|---|---|---|---|---|"]
    for r in rows:
        g = "-" if r.get("gamma") is None else f"{r['gamma']:.3f}"
        lines.append(f"| ({r['kind']}) | {r['label']} | {r['reward']:.3f} | {r['nfe']:.2f} | {g} |")
    if pairs:
        lines += ["", f"Equal reward (EB reward >= fixed-k reward - {args.tolerance}): each fixed-k row and the EB row "
                  "with the fewest NFE that matches it.", "",
                  "| fixed-k | reward | NFE | cheapest matching EB | reward | NFE | NFE ratio |",
                  "|---|---|---|---|---|---|---|"]
        for k_row, e_row in pairs:
            lines.append(f"| {k_row['label']} | {k_row['reward']:.3f} | {k_row['nfe']:.2f} | {e_row['label']} | "
                         f"{e_row['reward']:.3f} | {e_row['nfe']:.2f} | {k_row['nfe'] / e_row['nfe']:.2f}x |")
    if timing:
        (k_row, t_k), (eb_row, t_eb) = timing
        lines += ["", f"Rollout wall time per sample (generate alone, batch {len(examples)}, {args.rounds} rounds, ms: "
                  "min / median / max) of the first pair above:", "",
                  "| decoding | reward | NFE | ms / sample |", "|---|---|---|---|"]
        for row, t in timing:
            lines.append(f"| {row['label']} | {row['reward']:.3f} | {row['nfe']:.2f} | "
                         f"{min(t):.2f} / {statistics.median(t):.2f} / {max(t):.2f} |")
        lines.append(f"\nNFE ratio fixed-k / EB: {k_row['nfe'] / eb_row['nfe']:.2f}x; median wall-time ratio: "
                     f"{statistics.median(t_k) / statistics.median(t_eb):.2f}x")
    else:
        lines += ["", "No EB row reached any fixed-k row's reward within the tolerance: no wall-time comparison."]
    lines += ["", *notes]
    table = "\n".join(lines)
    print("\n" + table)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.md").write_text(table + "\n")
    Path(f"{args.out}.json").write_text(json.dumps(rows, indent=1) + "\n")
    _plot(rows, Path(f"{args.out}.png"))
    if work_ctx is not None:
        work_ctx.cleanup()
    return 0


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


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    style = {"a": ("o-", "fixed-k (LLaDA schedule)"), "b": ("s-", "EB, fixed gamma"),
             "c": ("*", "DiFFPO sampler (learned gamma)"), "d": ("P", "DiFFPO joint (learned gamma)")}
    for kind, (marker, label) in style.items():
        pts = sorted((r["nfe"], r["reward"]) for r in rows if r["kind"] == kind)
        if pts:
            ax.plot([x for x, _ in pts], [y for _, y in pts], marker, label=label, markersize=10 if kind in "cd" else 6)
    ax.set_xlabel("mean NFE per completion")
    ax.set_ylabel("mean held-out reward (4x4 Sudoku)")
    ax.set_xscale("log", base=2)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
