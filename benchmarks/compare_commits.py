"""Bit-identity of training between two trees: a fixed-seed tiny run per GRPO estimator, compared exactly.

``python benchmarks/compare_commits.py --against COMMIT`` checks out COMMIT into a temporary git worktree (the
compiled CPU extension is copied there), runs the same three short trainings in both trees and prints, per
estimator, whether metrics.jsonl (timing keys dropped: they measure the machine) and every tensor of the final
LoRA adapter and of the last checkpoint's trainable weights are bit for bit equal. ``--tree DIR`` (default: this
repository) runs only one tree and prints its fingerprint as JSON.

Each run: the randomly initialised tiny model, the toy reward of ``tests/_trainer_entry.py`` (so that advantages
are non-zero), gen 16 / block 16 / 8 steps, 2 prompts x G 2, mu 2, 4 optimizer steps, one torch thread, no held-out
evaluation. About 10-30 s per run on a 2-core machine. Exit status 0 when every fingerprint matches, 1 otherwise.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRESETS = ("tiny", "elbo-tiny", "d1-tiny")
FLAGS = ["--model.name_or_path", "tiny", "--rollout.gen_length", "16", "--rollout.block_length", "16",
         "--rollout.steps", "8", "--grpo.prompts_per_step", "2", "--grpo.num_generations", "2",
         "--grpo.num_iterations", "2", "--run.train_examples", "32", "--run.eval_examples", "0",
         "--run.tensorboard", "false", "--grpo.warmup_steps", "0", "--grpo.learning_rate", "0.01",
         "--grpo.max_steps", "4", "--run.save_every", "3"]
# Fields of metrics.jsonl that measure time (stp.trainer.TIMING_KEYS at the time of writing; repeated here so that
# the script reads no code of the trees it compares).
TIMING_KEYS = ("time_rollout", "time_scoring", "time_update", "step_seconds", "tokens_per_s", "rollout_tokens_per_s",
               "eval_seconds")


def _tensor_hashes(path: Path) -> dict[str, str]:
    import torch
    from safetensors.torch import load_file

    return {k: hashlib.sha256(v.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()[:16]
            + f" {v.dtype} {tuple(v.shape)}" for k, v in sorted(load_file(str(path)).items())}


def fingerprint(tree: Path, work: Path) -> dict[str, dict]:
    """Run the three trainings in ``tree``; {preset: {metrics, adapter, trainable}}."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(tree),
               PYTHONHASHSEED="0")
    out: dict[str, dict] = {}
    for preset in PRESETS:
        run_dir = work / preset
        cmd = [sys.executable, "-m", "tests._trainer_entry", "--preset", preset, *FLAGS,
               "--run.output_dir", str(run_dir)]
        proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{tree}: {' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
        rows = [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]
        ckpts = sorted((run_dir / "checkpoints").glob("step-*"))
        out[preset] = {
            "metrics_sha256": hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest(),
            "metrics": rows,
            "adapter": _tensor_hashes(run_dir / "adapter" / "adapter_model.safetensors"),
            "trainable": _tensor_hashes(ckpts[-1] / "trainable.safetensors"),
            "checkpoint": ckpts[-1].name,
        }
    return out


def _worktree(commit: str, where: Path) -> Path:
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(where), commit], check=True,
                   capture_output=True)
    for so in (ROOT / "stp_kernels").glob("_C*.so"):
        shutil.copy2(so, where / "stp_kernels" / so.name)
    return where


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/compare_commits.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--against", metavar="COMMIT", help="compare this tree with COMMIT (a temporary worktree)")
    p.add_argument("--tree", default=str(ROOT), help="the tree to run (default: this repository)")
    args = p.parse_args(argv)
    tree = Path(args.tree).resolve()
    with tempfile.TemporaryDirectory(prefix="stp-compare-") as tmp:
        tmp = Path(tmp)
        here = fingerprint(tree, tmp / "here")
        if args.against is None:
            print(json.dumps(here, indent=1, sort_keys=True))
            return 0
        base_tree = _worktree(args.against, tmp / "base-tree")
        try:
            there = fingerprint(base_tree, tmp / "there")
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base_tree)],
                           capture_output=True)
    ok = True
    for preset in PRESETS:
        a, b = here[preset], there[preset]
        same = {k: a[k] == b[k] for k in ("metrics", "adapter", "trainable")}
        ok &= all(same.values())
        print(f"{preset:<10} metrics.jsonl ({len(a['metrics'])} rows, sha256 {a['metrics_sha256'][:16]}): "
              f"{'identical' if same['metrics'] else 'DIFFERENT'}; adapter ({len(a['adapter'])} tensors): "
              f"{'identical' if same['adapter'] else 'DIFFERENT'}; {a['checkpoint']}/trainable.safetensors: "
              f"{'identical' if same['trainable'] else 'DIFFERENT'}")
        for i, (ra, rb) in enumerate(zip(a["metrics"], b["metrics"])):
            diff = sorted(k for k in set(ra) | set(rb) if ra.get(k) != rb.get(k))
            if diff:
                print(f"  row {i + 1}: differs in {diff[:8]}")
    print("bit-identical" if ok else "NOT bit-identical")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
