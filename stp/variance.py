"""Variance of the sequence log-likelihood estimate over repeated mask draws (docs/method.md section 6, "stability").

For each completion, each estimator / score mode, each K and each anchor fraction (1 - rho), the sequence estimate
S = sum over valid positions of the per-token log-probs (``score=elbo``: the ELBO estimate) is computed with
``--repeats`` different mask seeds; the table reports the variance of S over seeds, averaged over completions. Anchors
are the (1 - rho) most confident valid tokens of a one-step fully masked forward (score log p(y_i | prompt, all
masked)), as the static prior chooses them. Only ``stp`` takes anchors; ``elbo`` and ``d1`` run at fraction 0.

    python -m stp.variance --model tiny --task countdown --num-prompts 4 --json variance.json
    python -m stp.variance --model tiny --completions rollouts.jsonl  # {"prompt_ids"|"prompt", "completion_ids"}

Completions come from ``stp.sampler.generate`` on the task's prompts, or from a JSONL file. Every flag is validated
before the model loads.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

from .likelihood import ESTIMATORS, SCORE_MODES, per_token_logprobs, valid_lengths

__all__ = ["confidence_anchors", "measure_variance", "main"]

DEFAULT_DRAWS = (1, 2, 4, 8)
DEFAULT_FRACTIONS = (0.0, 0.05, 0.15, 0.3)


@torch.no_grad()
def confidence_anchors(model, prompt_ids: torch.Tensor, prompt_attention_mask: torch.Tensor | None,
                       completion_ids: torch.Tensor, fraction: float) -> torch.Tensor | None:
    """[B, C] bool: the ``int(l * fraction)`` valid positions with the highest log p(y_i | prompt, completion all
    masked) (ties to the lower position); None when ``fraction`` is 0."""
    if fraction <= 0:
        return None
    out = per_token_logprobs(model, prompt_ids, prompt_attention_mask, completion_ids, seed=0, iteration=0,
                             num_draws=1, estimator="d1", score="all", prompt_mask_prob=0.0)
    valid = out.valid
    score = torch.where(valid, out.logprobs, torch.full_like(out.logprobs, -math.inf))
    order = score.argsort(dim=1, descending=True, stable=True)
    ar = torch.arange(score.shape[1], device=score.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(1, order, ar)
    keep = (out.lengths.float() * fraction).floor().long()
    return (rank < keep[:, None]) & valid


def _configs(estimators, scores, draws, fractions):
    for est in estimators:
        for sc in scores:
            if est == "d1" and sc != "all":  # d1 masks every valid position: "masked" equals "all"; no elbo weights
                continue
            for frac in (fractions if est == "stp" else (0.0,)):
                for k in draws:
                    yield est, sc, frac, k


@torch.no_grad()
def measure_variance(model, prompt_ids: torch.Tensor, prompt_attention_mask: torch.Tensor | None,
                     completion_ids: torch.Tensor, *, estimators=ESTIMATORS, scores=SCORE_MODES,
                     draws=DEFAULT_DRAWS, fractions=DEFAULT_FRACTIONS, repeats: int = 8, seed: int = 0,
                     memory_budget: int | None = None, progress: bool = False) -> list[dict]:
    """One row per (estimator, score, anchor fraction, K): variance over ``repeats`` seeds of each completion's
    sequence estimate, averaged over completions (``variance``), its spread over completions (``variance_sem``),
    the mean estimate (``mean``) and each completion's variance (``per_completion``, for paired comparisons)."""
    from tqdm.auto import tqdm

    anchors = {f: confidence_anchors(model, prompt_ids, prompt_attention_mask, completion_ids, f) for f in fractions}
    configs = list(_configs(estimators, scores, draws, fractions))
    rows = []
    bar = tqdm(total=len(configs) * repeats, desc="variance", disable=not progress, file=sys.stderr)
    for est, sc, frac, k in configs:
        estimates = []
        for r in range(repeats):
            out = per_token_logprobs(model, prompt_ids, prompt_attention_mask, completion_ids,
                                     anchors=anchors[frac] if est == "stp" else None, seed=seed + r, iteration=0,
                                     num_draws=k, estimator=est, score=sc, memory_budget=memory_budget)
            estimates.append(out.logprobs.sum(1))
            bar.update(1)
        est_rb = torch.stack(estimates)  # [R, B]
        var_b = est_rb.var(0)  # [B], unbiased over seeds
        rows.append({"estimator": est, "score": sc, "anchor_fraction": frac, "num_draws": k,
                     "variance": var_b.mean().item(),
                     "variance_sem": (var_b.std() / math.sqrt(var_b.numel())).item() if var_b.numel() > 1 else 0.0,
                     "mean": est_rb.mean().item(), "completions": int(var_b.numel()), "repeats": repeats,
                     "per_completion": var_b.tolist()})
    bar.close()
    return rows


def format_table(rows: list[dict]) -> str:
    draws = sorted({r["num_draws"] for r in rows})
    head = ["estimator", "score", "1-rho"] + [f"var K={k}" for k in draws] + ["mean S"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    groups: dict[tuple, dict[int, dict]] = {}
    for r in rows:
        groups.setdefault((r["estimator"], r["score"], r["anchor_fraction"]), {})[r["num_draws"]] = r
    for (est, sc, frac), by_k in groups.items():
        cells = [est, sc, f"{frac:g}"] + [f"{by_k[k]['variance']:.4g}" if k in by_k else "-" for k in draws]
        cells.append(f"{next(iter(by_k.values()))['mean']:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------------- CLI


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _float_list(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _str_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m stp.variance", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help="'tiny', a local model directory or a Hub id")
    p.add_argument("--task", default="countdown", help="task whose training prompts are used (with --data or its "
                   "generator/hub source); ignored with --completions")
    p.add_argument("--data", default=None, help="local data file of the task (else the task's default source)")
    p.add_argument("--completions", default=None, help="JSONL of {'prompt_ids' or 'prompt', 'completion_ids'}")
    p.add_argument("--num-prompts", type=int, default=4, help="prompts taken from the task")
    p.add_argument("--num-generations", type=int, default=2, help="completions sampled per prompt")
    p.add_argument("--gen-length", type=int, default=64)
    p.add_argument("--block-length", type=int, default=32)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.9, help="sampling temperature of the completions")
    p.add_argument("--estimators", type=_str_list, default=list(ESTIMATORS), help="comma list of stp,elbo,d1")
    p.add_argument("--scores", type=_str_list, default=list(SCORE_MODES), help="comma list of all,masked,elbo")
    p.add_argument("--draws", type=_int_list, default=list(DEFAULT_DRAWS), help="comma list of K")
    p.add_argument("--anchor-fractions", type=_float_list, default=list(DEFAULT_FRACTIONS),
                   help="comma list of 1 - rho in [0, 1)")
    p.add_argument("--repeats", type=int, default=16, help="mask seeds per configuration (>= 2)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed; mask seeds are seed, seed + 1, ...")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--memory-budget", type=int, default=None, help="bytes for the packed forward")
    p.add_argument("--json", default=None, help="write the rows (and settings) as JSON here")
    p.add_argument("--no-progress", action="store_true")
    return p


def validate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Every check that needs no model; errors name the flag, the value and what is allowed."""
    from .tasks import TASKS

    def bad(msg: str):
        parser.error(msg)

    for name in args.estimators:
        if name not in ESTIMATORS:
            bad(f"--estimators: {name!r} is not an estimator; allowed: {', '.join(ESTIMATORS)}")
    for name in args.scores:
        if name not in SCORE_MODES:
            bad(f"--scores: {name!r} is not a score mode; allowed: {', '.join(SCORE_MODES)}")
    if not args.estimators or not args.scores or not args.draws or not args.anchor_fractions:
        bad("--estimators, --scores, --draws and --anchor-fractions need at least one value each")
    if any(k < 1 for k in args.draws):
        bad(f"--draws {args.draws}: every K must be >= 1")
    if any(not 0.0 <= f < 1.0 for f in args.anchor_fractions):
        bad(f"--anchor-fractions {args.anchor_fractions}: each must lie in [0, 1)")
    if args.repeats < 2:
        bad(f"--repeats {args.repeats}: a variance needs at least 2")
    for flag in ("num_prompts", "num_generations", "gen_length", "block_length", "steps"):
        if getattr(args, flag) < 1:
            bad(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be >= 1")
    if args.completions is not None:
        if not Path(args.completions).is_file():
            bad(f"--completions {args.completions}: no such file")
    else:
        if args.task not in TASKS:
            bad(f"--task {args.task!r}: allowed: {', '.join(TASKS)}")
        if args.data is not None and not Path(args.data).is_file():
            bad(f"--data {args.data}: no such file")
        if args.gen_length % args.block_length:
            bad(f"--gen-length {args.gen_length} must be a multiple of --block-length {args.block_length}")
        if args.steps % (args.gen_length // args.block_length):
            bad(f"--steps {args.steps} must be a multiple of the number of blocks "
                f"{args.gen_length // args.block_length}")
    if args.json is not None and not Path(args.json).resolve().parent.is_dir():
        bad(f"--json {args.json}: its directory does not exist")
    if args.device is not None and args.device.startswith("cuda") and not torch.cuda.is_available():
        bad(f"--device {args.device}: torch sees no CUDA device")


def _left_pad(seqs: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):  # host-side batch assembly, once
        ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, width - len(s):] = 1
    return ids.to(device), mask.to(device)


def _read_completions(path: str, model, device):
    prompts, comps = [], []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                if "prompt_ids" in rec:
                    prompt = [int(t) for t in rec["prompt_ids"]]
                else:
                    if model.tokenizer is None:
                        raise ValueError("'prompt' text needs a model with a tokenizer; give 'prompt_ids'")
                    prompt = model.tokenizer(rec["prompt"], add_special_tokens=False)["input_ids"]
                comp = [int(t) for t in rec["completion_ids"]]
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{lineno}: {type(e).__name__}: {e}") from e
            prompts.append(prompt)
            comps.append(comp)
    if not prompts:
        raise ValueError(f"{path}: no records")
    width = max(len(c) for c in comps)
    comps = [c + [model.eos_token_id] * (width - len(c)) for c in comps]  # EOS padding, as the sampler leaves it
    prompt_ids, mask = _left_pad(prompts, model.pad_token_id, device)
    return prompt_ids, mask, torch.tensor(comps, dtype=torch.long, device=device)


def _generate_completions(args, model, device):
    from .sampler import generate
    from .tasks import get_task

    task = get_task(args.task)
    source = "file" if args.data else ("generated" if args.task in ("countdown", "sudoku") else None)
    examples = task.load("train", args.data, source=source, n=args.num_prompts, seed=args.seed)
    texts = [task.format_prompt(ex, model.tokenizer) for ex in examples]
    seqs = [model.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    seqs = [s for s in seqs for _ in range(args.num_generations)]
    prompt_ids, mask = _left_pad(seqs, model.pad_token_id, device)
    out = generate(model, prompt_ids, attention_mask=mask, gen_length=args.gen_length,
                   block_length=args.block_length, steps=args.steps, temperature=args.temperature, seed=args.seed)
    return prompt_ids, mask, out.completions


def main(argv: list[str] | None = None) -> list[dict]:
    parser = build_parser()
    args = parser.parse_args(argv)
    validate(args, parser)
    from .models import load

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = load(args.model, dtype=getattr(torch, args.dtype) if args.dtype else None, device=device)
    model.eval()
    if args.completions:
        prompt_ids, mask, completions = _read_completions(args.completions, model, device)
    else:
        if model.tokenizer is None:
            parser.error(f"--model {args.model}: has no tokenizer to format the task's prompts; use --completions")
        prompt_ids, mask, completions = _generate_completions(args, model, device)
    rows = measure_variance(model, prompt_ids, mask, completions, estimators=args.estimators, scores=args.scores,
                            draws=args.draws, fractions=args.anchor_fractions, repeats=args.repeats, seed=args.seed,
                            memory_budget=args.memory_budget, progress=not args.no_progress)
    lengths = valid_lengths(completions, model.eos_token_id)
    print(f"model {args.model}: {completions.shape[0]} completions, prompt width {prompt_ids.shape[1]}, valid "
          f"lengths {lengths.min().item()}..{lengths.max().item()} (mean {lengths.float().mean().item():.1f}); "
          f"variance over {args.repeats} mask seeds of the sequence estimate, mean over completions")
    print(format_table(rows))
    if args.json:
        settings = {k: v for k, v in vars(args).items()}
        with open(args.json, "w") as f:
            json.dump({"settings": settings, "rows": rows}, f, indent=1)
        print(f"written to {args.json}")
    return rows


if __name__ == "__main__":
    main()
