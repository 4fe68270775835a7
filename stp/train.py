"""``python -m stp.train [--preset NAME] [--config FILE.yaml] [--section.field VALUE ...]``: GRPO with STP.

With no arguments it runs the embedded default, preset ``tiny``: the tiny masked diffusion model started from its
SFT checkpoint (``model.name_or_path`` ``pretrained:TASK``: ``stp.pretrain.ensure_pretrained`` builds it into the
cache on first use, once), trained with STP on the task's procedurally generated puzzles on the CPU, with held-out
reward before and after. ``--model.name_or_path tiny`` is the randomly initialised tiny model.

Every setting is validated before any model loads (``stp.config``). Exit status: 0 done; 2 bad configuration or data
(the message names the field or the file and line); 1 stopped after ``run.max_nan_steps`` non-finite losses in a
row, or after ``run.max_no_signal_steps`` steps without learning signal (all completions of every group rewarded
alike; a warning comes after 5); 130 interrupted by SIGINT after saving a checkpoint (continue with ``--run.resume``).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence

from stp.config import ConfigError, parse_args

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from stp.policy import quiet_known_warnings
    from stp.prior import PriorFileError
    from stp.tasks import DataError
    from stp.tasks.reward_funcs import RewardFuncError

    quiet_known_warnings()
    try:
        config = parse_args(argv)  # --help and a flag without its value exit here (status 0 and 2)
    except ConfigError as e:
        print(f"stp.train: error: {e}", file=sys.stderr)
        return 2
    from stp.trainer import TrainingDiverged, train

    resume = _resume_command(argv)
    try:
        summary = train(config, progress=True)
    except (ConfigError, DataError, PriorFileError, RewardFuncError) as e:
        _end_bars()
        print(f"stp.train: error: {e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:  # NoLearningSignal too
        _end_bars()
        print(f"stp.train: stopped: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        _end_bars()
        # Before the loop (model, priors, held-out evaluation) or a second Ctrl-C: nothing half-written is used later
        # (priors are appended per batch, checkpoints renamed into place when complete).
        from stp.checkpoint import last_checkpoint

        last = last_checkpoint(config.run.output_dir)
        where = (f"the last checkpoint is {last}; continue with: {resume}" if last is not None else
                 "no checkpoint was written yet; run the same command again to start over (priors built so far are "
                 "kept)")
        print(f"\nstp.train: interrupted; {where}", file=sys.stderr)
        return 130
    if summary:  # the main process
        print(json.dumps(summary, indent=2))
        if summary.get("reward_before") is not None and summary.get("reward_after") is not None:
            print(f"held-out reward ({summary['eval_examples']} prompts): {summary['reward_before']:.3f} -> "
                  f"{summary['reward_after']:.3f} in {summary['steps']} steps, {summary['wall_seconds']:.0f} s; "
                  f"outputs in {summary['output_dir']}", file=sys.stderr)
        if summary.get("answer_rate_before") is not None and summary.get("answer_rate_after") is not None:
            def of(x):
                return "-" if x is None else f"{x:.3f}"
            print(f"  answers readable by the task (e.g. inside <answer> tags): {summary['answer_rate_before']:.3f} "
                  f"-> {summary['answer_rate_after']:.3f}; reward of the readable ones: "
                  f"{of(summary['reward_of_answered_before'])} -> {of(summary['reward_of_answered_after'])}",
                  file=sys.stderr)
        if summary.get("interrupted"):
            print(f"stp.train: interrupted at step {summary['steps']} of {summary['max_steps']} (checkpoint saved); "
                  f"continue with: {resume}", file=sys.stderr)
    return 130 if summary.get("interrupted") else 0


def _end_bars() -> None:
    """Close the progress bars still open (an error raised mid-run leaves its bar's line unfinished), so the
    message that follows starts on a line of its own."""
    try:
        from tqdm import tqdm
    except ImportError:
        return
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def _resume_command(argv: Sequence[str]) -> str:
    """The command that continues this run: the same arguments plus --run.resume."""
    import shlex

    flags = [a for a in argv if a not in ("--run.resume", "--no-run.resume")]
    return "python -m stp.train " + " ".join(map(shlex.quote, [*flags, "--run.resume"]))


if __name__ == "__main__":
    sys.exit(main())
