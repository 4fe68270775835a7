"""Stability probe: variance of the sequence log-likelihood estimate over mask draws, with and without anchors.

The question (docs/method.md 6): is the estimate's variance lower with anchors than without, and does it fall as the
fixed fraction 1 - rho grows? ``python -m stp.variance`` with no arguments answers it for the default checkpoint
(``pretrained:sudoku``, the tiny model the default run starts from) in its own prompt format (the compact prompt of
``stp.pretrain``) in about a minute on 2 CPU cores once the checkpoint is cached (measured: 71 s on a 2-core machine
shared with other jobs, load average 8, 36 s of CPU time; the checkpoint's first use builds it, about a minute more
on 2 free cores). The expected time is printed after the first forwards. Rows are appended to ``--out`` as they are
measured (flushed); the table, a verdict and a note on the d1 row are printed at the end. Measured there: without
anchors the variance of S is about 2100 (K=1) and 780 (K=3); anchoring 1 - rho = 0.05 / 0.15 / 0.3 of the tokens
brings it to about 0.93 / 0.64 / 0.46 of that, falling with every larger fraction (9 standard errors at 0.3).

For each completion, each estimator / score mode, each K and each anchor fraction (1 - rho), the sequence estimate
S = sum over valid positions of the per-token log-probs (``score=elbo``: the ELBO estimate) is computed with
``--repeats`` different mask seeds; the table reports the variance of S over seeds, averaged over completions. Anchors
are the (1 - rho) most confident valid tokens of a one-step fully masked forward (score log p(y_i | prompt, all
masked)), as the static prior ranks them (the probe anchors answer tokens too: it measures the estimator, not the
prior's answer rule). Only ``stp`` takes anchors; ``stp`` at fraction 0 is ``elbo``; ``d1`` runs at fraction 0.

The d1 row: d1 masks the whole completion (only the prompt mask is random), i.e. it scores the fully masked state.
That is not the likelihood of the completion (biased: see its different mean S), and its variance comes from the
prompt mask alone: far lower than stp's where the masked prompt tokens matter little (an untrained model, a long chat
prompt: orders of magnitude lower on the random ``tiny`` model), but not on the default checkpoint, whose compact
prompt is the puzzle itself (the probe prints the ratio). Either way it measures something else: the stability
question is answered by the stp rows.

    python -m stp.variance                                             # the probe (sudoku, compact prompt)
    python -m stp.variance --model tiny --task countdown --num-prompts 4 --out variance.jsonl
    python -m stp.variance --model tiny --completions rollouts.jsonl  # {"prompt_ids"|"prompt", "completion_ids"}

Completions come from ``stp.sampler.generate`` on the task's training prompts, or from a JSONL file. Every flag is
validated before the model loads. Degenerate inputs are refused or flagged: completions whose valid length is 1
(EOS first: a model that does not read this prompt format) are dropped with a warning, and refused when none is
left; an anchor fraction that fixes no token of most completions and a row whose variance is 0 are warned about.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from .likelihood import ESTIMATORS, SCORE_MODES, per_token_logprobs, valid_lengths

__all__ = ["VarianceWarning", "confidence_anchors", "measure_variance", "format_table", "verdict", "main"]

DEFAULT_MODEL = "pretrained:sudoku"
DEFAULT_ESTIMATORS = ("stp", "d1")  # elbo = stp at anchor fraction 0: measured there already
DEFAULT_SCORES = ("all",)  # the training default (the authors' code)
DEFAULT_DRAWS = (1, 3)  # 3: the paper's K
DEFAULT_FRACTIONS = (0.0, 0.05, 0.15, 0.3)
ZERO_VARIANCE = 1e-12


class VarianceWarning(UserWarning):
    """A degenerate input or result the reader of the table must know about."""


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


def _draws_per_sample(est: str, score: str, k: int) -> int:
    """Packed sequences per sample of one ``per_token_logprobs`` call (``masked`` adds its fallback draw)."""
    return k + 1 if score == "masked" and est != "d1" else k


@torch.no_grad()
def measure_variance(model, prompt_ids: torch.Tensor, prompt_attention_mask: torch.Tensor | None,
                     completion_ids: torch.Tensor, *, estimators=ESTIMATORS, scores=SCORE_MODES,
                     draws=DEFAULT_DRAWS, fractions=DEFAULT_FRACTIONS, repeats: int = 8, seed: int = 0,
                     memory_budget: int | None = None, progress: bool = False,
                     on_row: Callable[[dict], None] | None = None,
                     on_estimate: Callable[[float], None] | None = None) -> list[dict]:
    """One row per (estimator, score, anchor fraction, K): variance over ``repeats`` seeds of each completion's
    sequence estimate, averaged over completions (``variance``), its spread over completions (``variance_sem``),
    the mean estimate (``mean``) and each completion's variance (``per_completion``, for paired comparisons).

    ``on_row(row)`` is called as each row is finished (the CLI appends it to its output file); ``on_estimate(s)``
    once, after the second forward, with the expected seconds for the rest (from that forward's time per packed
    sequence; the first pays one-time costs and would overstate it several times over)."""
    from tqdm.auto import tqdm

    anchors = {f: confidence_anchors(model, prompt_ids, prompt_attention_mask, completion_ids, f) for f in fractions}
    configs = list(_configs(estimators, scores, draws, fractions))
    batch = completion_ids.shape[0]
    total_seqs = sum(repeats * batch * _draws_per_sample(e, sc, k) for e, sc, _, k in configs)
    rows = []
    done_seqs, calls = 0, 0
    bar = tqdm(total=len(configs) * repeats, desc="variance", disable=not progress, file=sys.stderr)
    for est, sc, frac, k in configs:
        estimates = []
        for r in range(repeats):
            start = time.perf_counter()
            out = per_token_logprobs(model, prompt_ids, prompt_attention_mask, completion_ids,
                                     anchors=anchors[frac] if est == "stp" else None, seed=seed + r, iteration=0,
                                     num_draws=k, estimator=est, score=sc, memory_budget=memory_budget)
            estimates.append(out.logprobs.sum(1))
            seqs = batch * _draws_per_sample(est, sc, k)
            done_seqs, calls = done_seqs + seqs, calls + 1
            if on_estimate is not None and calls == 2:
                on_estimate((time.perf_counter() - start) / seqs * (total_seqs - done_seqs))
            bar.update(1)
        est_rb = torch.stack(estimates)  # [R, B]
        var_b = est_rb.var(0)  # [B], unbiased over seeds
        row = {"estimator": est, "score": sc, "anchor_fraction": frac, "num_draws": k,
               "variance": var_b.mean().item(),
               "variance_sem": (var_b.std() / math.sqrt(var_b.numel())).item() if var_b.numel() > 1 else 0.0,
               "mean": est_rb.mean().item(), "completions": int(var_b.numel()), "repeats": repeats,
               "anchors_mean": 0.0 if anchors[frac] is None or est != "stp" else anchors[frac].sum(1).float().mean()
               .item(), "per_completion": var_b.tolist()}
        rows.append(row)
        if on_row is not None:
            on_row(row)
    bar.close()
    return rows


def format_table(rows: list[dict]) -> str:
    draws = sorted({r["num_draws"] for r in rows})
    head = ["estimator", "score", "1-rho", "anchors"] + [f"var K={k}" for k in draws] + ["mean S"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    groups: dict[tuple, dict[int, dict]] = {}
    for r in rows:
        groups.setdefault((r["estimator"], r["score"], r["anchor_fraction"]), {})[r["num_draws"]] = r
    for (est, sc, frac), by_k in groups.items():
        first = next(iter(by_k.values()))
        cells = [est, sc, f"{frac:g}", f"{first.get('anchors_mean', 0.0):.1f}"]
        cells += [f"{by_k[k]['variance']:.4g}" if k in by_k else "-" for k in draws]
        cells.append(f"{first['mean']:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdict(rows: list[dict]) -> list[str]:
    """The answer to the stability question, one line per (score, K) of the stp rows: the variance at each anchor
    fraction relative to none, whether it falls with every larger fraction, and the paired per-completion reduction
    at the largest fraction in standard errors (> 2: not noise)."""
    lines = []
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["estimator"] == "stp":
            groups.setdefault((r["score"], r["num_draws"]), []).append(r)
    for (sc, k), group in groups.items():
        group.sort(key=lambda r: r["anchor_fraction"])
        base = group[0]
        if len(group) < 2 or base["anchor_fraction"] != 0.0:
            continue
        if base["variance"] <= ZERO_VARIANCE:
            lines.append(f"stp score={sc} K={k}: no variance without anchors; nothing to compare")
            continue
        ratios = ", ".join(f"{r['anchor_fraction']:g}: {r['variance'] / base['variance']:.2f}" for r in group)
        falls = all(b["variance"] < a["variance"] for a, b in zip(group, group[1:]))
        diff = torch.tensor(base["per_completion"]) - torch.tensor(group[-1]["per_completion"])
        z = (diff.mean() / (diff.std() / diff.numel() ** 0.5)).item() if diff.numel() > 1 and diff.std() > 0 else 0.0
        lines.append(f"stp score={sc} K={k}: variance / variance without anchors, by 1-rho: {ratios}; "
                     f"{'falls' if falls else 'does NOT fall'} with every larger fraction; reduction at "
                     f"{group[-1]['anchor_fraction']:g}: {z:.1f} standard errors (paired over completions)")
    return lines


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
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="'pretrained:TASK', 'tiny' (random weights), a local model directory or a Hub id "
                        f"[{DEFAULT_MODEL}]")
    p.add_argument("--task", default=None, help="task whose training prompts are used [TASK of pretrained:TASK, "
                   "else sudoku]; ignored with --completions")
    p.add_argument("--prompt-format", default=None, choices=("chat", "compact"),
                   help="chat: the task's chat prompt (d1's); compact: stp.pretrain's one-line prompt, the one the "
                        "tiny model was trained on [compact for the tiny model on sudoku/countdown, else chat]")
    p.add_argument("--data", default=None, help="local data file of the task (else the task's default source)")
    p.add_argument("--completions", default=None, help="JSONL of {'prompt_ids' or 'prompt', 'completion_ids'}")
    p.add_argument("--num-prompts", type=int, default=8, help="prompts taken from the task [8]")
    p.add_argument("--num-generations", type=int, default=2, help="completions sampled per prompt [2]")
    p.add_argument("--gen-length", type=int, default=None,
                   help="completion length [the pretrained length for sudoku/countdown (32/64), else 64]")
    p.add_argument("--block-length", type=int, default=None, help="[min(32, gen length)]")
    p.add_argument("--steps", type=int, default=None, help="denoising steps [gen length / 2]")
    p.add_argument("--temperature", type=float, default=0.9, help="sampling temperature of the completions [0.9]")
    p.add_argument("--estimators", type=_str_list, default=list(DEFAULT_ESTIMATORS),
                   help=f"comma list of {','.join(ESTIMATORS)} [{','.join(DEFAULT_ESTIMATORS)}: elbo is stp at "
                        "fraction 0]")
    p.add_argument("--scores", type=_str_list, default=list(DEFAULT_SCORES),
                   help=f"comma list of {','.join(SCORE_MODES)} [{','.join(DEFAULT_SCORES)}, the training default]")
    p.add_argument("--draws", type=_int_list, default=list(DEFAULT_DRAWS),
                   help=f"comma list of K [{','.join(map(str, DEFAULT_DRAWS))}]")
    p.add_argument("--anchor-fractions", type=_float_list, default=list(DEFAULT_FRACTIONS),
                   help=f"comma list of 1 - rho in [0, 1) [{','.join(f'{f:g}' for f in DEFAULT_FRACTIONS)}]")
    p.add_argument("--repeats", type=int, default=8, help="mask seeds per configuration (>= 2) [8]")
    p.add_argument("--seed", type=int, default=0, help="sampling seed; mask seeds are seed, seed + 1, ...")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--memory-budget", type=int, default=None, help="bytes for the packed forward")
    p.add_argument("--out", default="variance.jsonl",
                   help="JSONL the results are APPENDED to as they are measured: one 'settings' line per run, then "
                        "one line per row [variance.jsonl]")
    p.add_argument("--no-progress", action="store_true")
    return p


def _is_tiny(model: str) -> bool:
    from .eval import _is_tiny as is_tiny

    return is_tiny(model)


def _resolve_defaults(args: argparse.Namespace) -> None:
    """Fill the defaults that depend on other flags (task, prompt format, decoding lengths)."""
    from .pretrain import DEFAULTS, PRETRAIN_TASKS

    if args.task is None:
        if args.model.startswith("pretrained:"):
            from .pretrain import checkpoint_settings

            args.task = checkpoint_settings(args.model)[0]
        else:
            args.task = "sudoku"
    if args.prompt_format is None:
        args.prompt_format = "compact" if _is_tiny(args.model) and args.task in PRETRAIN_TASKS else "chat"
    if args.gen_length is None:
        args.gen_length = DEFAULTS[args.task]["gen_length"] if args.task in DEFAULTS else 64
    if args.block_length is None:
        args.block_length = min(32, args.gen_length) if args.gen_length > 0 else 32
    if args.steps is None:
        args.steps = max(1, args.gen_length // 2)


def validate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Every check that needs no model; errors name the flag, the value and what is allowed."""
    from .pretrain import PRETRAIN_TASKS
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
    _resolve_defaults(args)
    if args.completions is None and args.task not in TASKS:
        bad(f"--task {args.task!r}: allowed: {', '.join(TASKS)}")
    for flag in ("num_prompts", "num_generations", "gen_length", "block_length", "steps"):
        if getattr(args, flag) < 1:
            bad(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be >= 1")
    if args.completions is not None:
        if not Path(args.completions).is_file():
            bad(f"--completions {args.completions}: no such file")
    else:
        if args.prompt_format == "compact" and args.task not in PRETRAIN_TASKS:
            bad(f"--prompt-format compact with --task {args.task!r}: the compact prompt exists for "
                f"{', '.join(PRETRAIN_TASKS)}; allowed for {args.task}: chat")
        if args.data is not None and not Path(args.data).is_file():
            bad(f"--data {args.data}: no such file")
        if args.gen_length % args.block_length:
            bad(f"--gen-length {args.gen_length} must be a multiple of --block-length {args.block_length}")
        if args.steps % (args.gen_length // args.block_length):
            bad(f"--steps {args.steps} must be a multiple of the number of blocks "
                f"{args.gen_length // args.block_length}")
    if not Path(args.out).resolve().parent.is_dir():
        bad(f"--out {args.out}: its directory does not exist")
    if Path(args.out).is_dir():
        bad(f"--out {args.out}: is a directory; allowed: a file path")
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
    from .pretrain import task_with_prompt
    from .sampler import generate

    task = task_with_prompt(args.task, args.prompt_format)
    source = "file" if args.data else ("generated" if args.task in ("countdown", "sudoku", "countdown_small") else None)
    examples = task.load("train", args.data, source=source, n=args.num_prompts, seed=args.seed)
    texts = [task.format_prompt(ex, model.tokenizer) for ex in examples]
    seqs = [model.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    seqs = [s for s in seqs for _ in range(args.num_generations)]
    prompt_ids, mask = _left_pad(seqs, model.pad_token_id, device)
    out = generate(model, prompt_ids, attention_mask=mask, gen_length=args.gen_length,
                   block_length=args.block_length, steps=args.steps, temperature=args.temperature, seed=args.seed)
    return prompt_ids, mask, out.completions


def _drop_degenerate(prompt_ids, mask, completions, eos_id: int, args, parser):
    """Drop completions of valid length 1 (EOS first: S is one token, identical under every mask draw) with a
    warning; refuse when none is left. Warn when an anchor fraction fixes no token of most completions."""
    lengths = valid_lengths(completions, eos_id)
    keep = lengths > 1
    hint = ("the model ends at once: it probably does not read this prompt format" if args.completions is None
            else "EOS as the first completion token")
    if not keep.any():
        source = args.completions or f"--model {args.model} on --task {args.task} --prompt-format {args.prompt_format}"
        parser.exit(2, f"{parser.prog}: error: every completion from {source} has valid length 1 ({hint}); the "
                       f"variance of a 1-token estimate is 0 under every estimator, so there is nothing to measure"
                       + ("; try --prompt-format compact for the tiny model" if args.prompt_format == "chat" else "")
                       + "\n")
    if not keep.all():
        warnings.warn(f"{int((~keep).sum())} of {keep.numel()} completions have valid length 1 ({hint}) and are "
                      f"left out", VarianceWarning, stacklevel=2)
        prompt_ids, completions = prompt_ids[keep], completions[keep]
        mask = None if mask is None else mask[keep]
        lengths = lengths[keep]
    for frac in args.anchor_fractions:
        none = int(((lengths.float() * frac).floor() == 0).sum()) if frac > 0 else 0
        if none * 2 > lengths.numel():
            warnings.warn(f"--anchor-fractions {frac:g} fixes no token in {none} of {lengths.numel()} completions "
                          f"(valid lengths {lengths.min().item()}..{lengths.max().item()}): its row measures little "
                          f"more than fraction 0", VarianceWarning, stacklevel=2)
    return prompt_ids, mask, completions, lengths


def d1_note(rows: list[dict]) -> str | None:
    """What the d1 row shows, against stp without anchors at the same K (None without a d1 row)."""
    d1 = {r["num_draws"]: r for r in rows if r["estimator"] == "d1"}
    base = {r["num_draws"]: r for r in rows if r["estimator"] == "stp" and r["anchor_fraction"] == 0.0
            and r["score"] == "all"}
    common = sorted(set(d1) & set(base))
    if not d1:
        return None
    note = ("d1 row: d1 masks the whole completion, i.e. it scores the fully masked state: a biased estimate of "
            "log p(y) (compare its mean S), whose only randomness is the prompt mask (each prompt token masked with "
            "probability 0.15). Its variance says how much the predictions depend on the masked prompt tokens, not "
            "how stable a likelihood estimate is: far lower where the prompt matters little (an untrained model, a "
            "long chat prompt), not where the prompt is the puzzle itself (the compact prompt).")
    if common and base[common[0]]["variance"] > ZERO_VARIANCE:
        k = common[0]
        note += (f" Here, K={k}: {d1[k]['variance'] / base[k]['variance']:.2f}x the variance of stp without anchors, "
                 f"mean S {d1[k]['mean']:.2f} against {base[k]['mean']:.2f}.")
    return note + " The stability question is answered by the stp rows (fraction 0 = elbo)."



def main(argv: list[str] | None = None) -> list[dict]:
    parser = build_parser()
    args = parser.parse_args(argv)
    validate(args, parser)
    from .pretrain import load_model as load

    started = time.time()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = load(args.model, dtype=getattr(torch, args.dtype) if args.dtype else None, device=device)
    model.eval()
    if args.completions:
        prompt_ids, mask, completions = _read_completions(args.completions, model, device)
    else:
        if model.tokenizer is None:
            parser.error(f"--model {args.model}: has no tokenizer to format the task's prompts; use --completions")
        print(f"stp.variance: sampling {args.num_prompts} x {args.num_generations} completions of {args.gen_length} "
              f"tokens ({args.task}, {args.prompt_format} prompt)", file=sys.stderr)
        prompt_ids, mask, completions = _generate_completions(args, model, device)
    prompt_ids, mask, completions, lengths = _drop_degenerate(prompt_ids, mask, completions,
                                                              int(model.eos_token_id), args, parser)
    header = (f"model {args.model}: {completions.shape[0]} completions, prompt width {prompt_ids.shape[1]}, valid "
              f"lengths {lengths.min().item()}..{lengths.max().item()} (mean {lengths.float().mean().item():.1f}); "
              f"variance over {args.repeats} mask seeds of the sequence estimate S, mean over completions")
    print(header, file=sys.stderr)

    out = open(args.out, "a", encoding="utf-8")

    def append(record: dict) -> None:
        out.write(json.dumps(record) + "\n")
        out.flush()
        os.fsync(out.fileno())

    def on_row(row: dict) -> None:
        append({"row": row})
        print(f"  {row['estimator']} score={row['score']} 1-rho={row['anchor_fraction']:g} K={row['num_draws']}: "
              f"variance {row['variance']:.4g} (+- {row['variance_sem']:.2g}), mean S {row['mean']:.2f}",
              file=sys.stderr, flush=True)

    def on_estimate(seconds: float) -> None:
        print(f"stp.variance: expected time for the rest about {seconds:.0f} s (from one forward's time; a busy "
              f"machine takes longer); rows are appended to {args.out} as they finish", file=sys.stderr, flush=True)

    try:
        append({"settings": dict(vars(args)), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "completions": int(completions.shape[0]), "valid_lengths": lengths.tolist()})
        rows = measure_variance(model, prompt_ids, mask, completions, estimators=args.estimators, scores=args.scores,
                                draws=args.draws, fractions=args.anchor_fractions, repeats=args.repeats,
                                seed=args.seed, memory_budget=args.memory_budget, progress=not args.no_progress,
                                on_row=on_row, on_estimate=on_estimate)
        zero = [r for r in rows if r["variance"] <= ZERO_VARIANCE]
        if len(zero) == len(rows):
            warnings.warn("every variance is 0: the estimates do not depend on the mask seed (completions too short, "
                          "or a model whose predictions ignore the masks?); the table answers nothing",
                          VarianceWarning, stacklevel=2)
        elif zero:
            names = "; ".join(f"{r['estimator']} score={r['score']} 1-rho={r['anchor_fraction']:g} K={r['num_draws']}"
                              for r in zero)
            warnings.warn(f"variance 0 in {len(zero)} rows ({names})", VarianceWarning, stacklevel=2)
        lines = verdict(rows)
        append({"verdict": lines, "seconds": time.time() - started})
    finally:
        out.close()
    print(header)
    print(format_table(rows))
    for line in lines:
        print(line)
    note = d1_note(rows)
    if note:
        print(note)
    print(f"{time.time() - started:.0f} s; rows appended to {args.out}")
    return rows


if __name__ == "__main__":
    main()
