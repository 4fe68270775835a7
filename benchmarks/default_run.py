"""The embedded default run, measured: wall time and held-out reward before / after, per seed and preset.

    python -m benchmarks.default_run [--seeds 0 1 2] [--presets tiny] [--fresh-cache] [--out table.md]

Each (preset, seed) runs exactly the user's command, `python -m stp.train --preset P --run.seed S`, in a fresh output
directory (plus `--run.tensorboard false`, which only skips event files), and reads its `summary.json`. The wall time
is the whole process (imports, model load, priors, held-out evaluation before and after, training). With
`--fresh-cache` the starting checkpoint cache is a new empty directory (`STP_CACHE_DIR`), so the first run also
builds the checkpoint with `stp.pretrain`, as on a fresh install; its row says so.

Columns: reward = mean held-out reward (greedy, the preset's `run.eval_examples` test puzzles); answered = fraction of
completions whose answer the task can read (Sudoku: an `<answer>...</answer>` block); reward | answered = mean
reward of those completions. The table starts with the machine, the 1-minute load average at the start and the end,
and a warning when the machine was busy (``benchmarks/_report.py``): wall times from a busy machine are not the
figures of a quiet one.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from benchmarks._report import load_average, machine_lines


def _run(preset: str, seed: int, workdir: str, env: dict[str, str]) -> tuple[dict, float]:
    out = os.path.join(workdir, f"{preset}-seed{seed}")
    cmd = [sys.executable, "-m", "stp.train", "--preset", preset, "--run.seed", str(seed), "--run.output_dir", out,
           "--run.tensorboard", "false"]
    start = time.time()
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.time() - start
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stderr[-3000:]}")
    with open(os.path.join(out, "summary.json")) as f:
        return json.load(f), wall


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.default_run", description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--presets", nargs="+", default=["tiny"])
    p.add_argument("--fresh-cache", action="store_true", help="build the starting checkpoint in an empty cache first")
    p.add_argument("--out", default=None, help="also write the markdown table here")
    args = p.parse_args(argv)

    env = dict(os.environ)
    load_start = load_average()
    rows = ["| preset | seed | reward before | reward after | answered before | answered after | reward \\| answered "
            "before | reward \\| answered after | steps | wall s |", "|" + "---|" * 10]
    with tempfile.TemporaryDirectory(prefix="stp-default-run-") as work:
        if args.fresh_cache:
            env["STP_CACHE_DIR"] = os.path.join(work, "cache")
        first = True
        for preset in args.presets:
            for seed in args.seeds:
                s, wall = _run(preset, seed, work, env)
                note = " (incl. building the checkpoint)" if args.fresh_cache and first else ""
                first = False
                rows.append(f"| `{preset}` | {seed} | {_fmt(s['reward_before'])} | {_fmt(s['reward_after'])} | "
                            f"{_fmt(s.get('answer_rate_before'))} | {_fmt(s.get('answer_rate_after'))} | "
                            f"{_fmt(s.get('reward_of_answered_before'))} | {_fmt(s.get('reward_of_answered_after'))} | "
                            f"{s['steps']} | {wall:.0f}{note} |")
                print(rows[-1], flush=True)
    table = "\n".join(machine_lines(load_start, load_average()) + [""] + rows)
    print(f"\n{table}")
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
