"""Measurements on the long-answer task (``stp.tasks.chain``, ``pretrained:chain``), with paired standard errors.

    python -m benchmarks.chain_measures variance [--prompts 32] [--draws 3] [--repeats 8] [--out table.md]
    python -m benchmarks.chain_measures cache [--examples 128] [--adapter RUN/adapter] [--out table.md]
    python -m benchmarks.chain_measures decoders [--examples 128] [--adapter RUN/adapter] [--out table.md]

``variance``: the variance over mask seeds of the sequence log-likelihood estimate S (sum over valid positions of the
per-token log-probs, the training default ``score=all``) of completions the checkpoint samples for training prompts
(T 0.9, the ``chain-tiny`` rollout shape), for ``stp`` with 1 - rho = 0.05 and 0.15 of the valid tokens anchored (rho
0.95, the paper's GSM8K / Countdown setting, and 0.85, its MATH one), ``elbo`` (``stp`` without anchors) and ``d1``,
all at the same K (``stp.variance.measure_variance``; anchors: the most confident valid tokens of a fully masked
forward, as the static prior ranks them). Per completion the variance is taken over ``--repeats`` seeds; the table
gives its mean over completions with the standard error over completions, the share of valid tokens anchored, and
each estimator's paired difference to ``elbo`` (per-completion variance of ``elbo`` minus the estimator's, mean +-
standard error over completions, z = mean / SE).

``cache``: greedy held-out reward and accuracy of the checkpoint (``--adapter``: a trained LoRA merged in) decoded
with ``rollout.cache`` none / prefix / dual (Fast-dLLM's block KV cache, an approximation for bidirectional
models), on the same held-out chains: mean +- standard error over chains, and the paired difference to ``none``
(per-chain difference, mean +- standard error, z), with seconds and NFE per mode. Four blocks of text: with
``dual`` the masked suffix's keys and values are stale within a block, which one block of text does not show.

``decoders``: greedy held-out accuracy and reward, NFE per sample, batch passes per call and seconds of each
decoding rule of ``decoder_rows`` (fixed-k at 64 / 32 / 16 steps, Fast-dLLM's threshold decoding, the entropy bound
in entropy and in confidence order), no KV cache, each paired on the same chains against fixed-k at 64 steps.

Every table starts with the machine and its load (``benchmarks/_report.py``).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Sequence

import torch

from benchmarks._report import load_average, machine_lines

__all__ = ["paired", "variance_table", "main"]


def paired(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """Mean of a - b over paired items and its standard error (sample standard deviation / sqrt(n)).

    >>> paired([1.0, 2.0, 3.0], [0.0, 2.0, 1.0])
    (1.0, 0.5773502691896257)
    """
    if len(a) != len(b) or len(a) < 2:
        raise ValueError(f"paired: need two equally long lists of >= 2 items, got {len(a)} and {len(b)}")
    d = [x - y for x, y in zip(a, b)]
    m = sum(d) / len(d)
    var = sum((x - m) ** 2 for x in d) / (len(d) - 1)
    return m, math.sqrt(var / len(d))


def _z(mean: float, se: float) -> str:
    return "inf" if se == 0 and mean != 0 else ("0.0" if se == 0 else f"{mean / se:.1f}")


def _shape(preset: str):
    from stp.config import resolve

    r = resolve(preset=preset).rollout
    return dict(gen_length=r.gen_length, block_length=r.block_length, steps=r.steps), r.temperature


def _load(name: str, adapter: str | None):
    from stp.pretrain import load_model

    model = load_model(name)
    if adapter:
        from stp.models import merge_adapter

        merge_adapter(model, adapter)
    model.eval()
    return model


def variance_table(rows: list[dict], valid_mean: float) -> list[str]:
    """The variance table (module docstring) from ``measure_variance`` rows of one K."""
    base = next(r for r in rows if r["estimator"] == "stp" and r["anchor_fraction"] == 0.0)
    lines = ["| estimator | 1 - rho | anchored share of valid tokens | var(S) mean +- SE | / elbo | elbo minus it "
             "(paired) +- SE | z |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        name = "elbo" if r is base else ("d1" if r["estimator"] == "d1" else f"stp (rho {1 - r['anchor_fraction']:g})")
        share = r["anchors_mean"] / valid_mean if valid_mean else 0.0
        if r is base:
            diff = "-"
            z = "-"
        else:
            m, se = paired(base["per_completion"], r["per_completion"])
            diff, z = f"{m:+.4g} +- {se:.3g}", _z(m, se)
        lines.append(f"| {name} | {r['anchor_fraction']:g} | {share:.3f} | {r['variance']:.4g} +- "
                     f"{r['variance_sem']:.3g} | {r['variance'] / base['variance']:.3f} | {diff} | {z} |")
    return lines


def _variance(args) -> list[str]:
    from stp.data_order import encode_prompts
    from stp.likelihood import valid_lengths
    from stp.sampler import generate
    from stp.tasks.prompts import task_with_prompt
    from stp.variance import measure_variance

    model = _load(args.model, args.adapter)
    shape, temperature = _shape(args.preset)
    task = task_with_prompt("chain", "compact")
    examples = task.load("train", source="generated", n=args.prompts, seed=args.seed)
    texts = [task.format_prompt(e, model.tokenizer) for e in examples]
    ids, mask = encode_prompts(model.tokenizer, texts, model.tokenizer.pad_token_id, None)
    t0 = time.time()
    comps = generate(model, ids, attention_mask=mask, temperature=temperature, seed=args.seed, **shape).completions
    valid = valid_lengths(comps, int(model.eos_token_id)).float()
    out = [f"Model {args.model}{' + ' + args.adapter if args.adapter else ''}; {args.prompts} training prompts, one "
           f"completion each (T {temperature:g}, gen {shape['gen_length']} / block {shape['block_length']} / "
           f"{shape['steps']} steps; valid length mean {valid.mean().item():.1f}, min {valid.min().item():.0f}); "
           f"score=all; {args.repeats} mask seeds per completion", ""]
    for k in args.draws:
        rows = measure_variance(model, ids, mask, comps, estimators=("stp", "d1"), scores=("all",), draws=(k,),
                                fractions=(0.0, 0.05, 0.15), repeats=args.repeats, seed=args.seed)
        out += [f"**K = {k}**", ""] + variance_table(rows, valid.mean().item()) + [""]
    out.append(f"({time.time() - t0:.0f} s)")
    return out


def _heldout(args):
    """The model (adapter merged), the preset's rollout shape, the task with its compact prompt and the held-out
    chains of ``cache`` and ``decoders``."""
    from stp.tasks.prompts import task_with_prompt

    model = _load(args.model, args.adapter)
    shape, _ = _shape(args.preset)
    task = task_with_prompt("chain", "compact")
    return model, shape, task, task.load("test", source="generated", n=args.examples)


def paired_rows(per: dict, ref: str, extra: dict) -> list[str]:
    """Table rows, one per key of ``per`` ({row: {"metric": [...], "reward": [...]}}, per example): accuracy and
    reward (mean +- SE), their differences to row ``ref`` paired per example (+- SE, z), then ``extra[row]``."""
    out = []
    for name, vals in per.items():
        cells = [name]
        for key in ("metric", "reward"):
            v = vals[key]
            n = len(v)
            m = sum(v) / n
            cells.append(f"{m:.4f} +- {math.sqrt(sum((x - m) ** 2 for x in v) / (n - 1) / n):.4f}")
        for key in ("metric", "reward"):
            if name == ref:
                cells += ["-", "-"]
            else:
                m, se = paired(vals[key], per[ref][key])
                cells += [f"{m:+.4f} +- {se:.4f}", _z(m, se)]
        out.append("| " + " | ".join(cells + extra[name]) + " |")
    return out


def _cache(args) -> list[str]:
    from stp.evaluation import evaluate
    from stp.sampler import CACHE_MODES

    model, shape, task, examples = _heldout(args)
    per, info = {}, {}
    for cache in CACHE_MODES:
        t0 = time.time()
        res = evaluate(model, task, examples, batch_size=32, temperature=0.0, max_prompt_length=0, progress=False,
                       cache=cache, **shape)
        per[cache] = {"reward": [r["reward"] for r in res["records"]], "metric": [r["metric"] for r in res["records"]]}
        info[cache] = {"seconds": time.time() - t0, "nfe": res["mean_nfe"]}
        print(f"  cache {cache}: accuracy {res['accuracy']:.3f} in {info[cache]['seconds']:.0f} s", file=sys.stderr,
              flush=True)
    n = len(examples)
    out = [f"Model {args.model}{' + ' + args.adapter if args.adapter else ''}; greedy, {n} held-out chains, gen "
           f"{shape['gen_length']} / block {shape['block_length']} / {shape['steps']} steps; mean +- standard error "
           "over chains; differences to none paired on the same chains", "",
           "| cache | accuracy | reward | accuracy minus none +- SE | z | reward minus none +- SE | z | NFE / sample | "
           "seconds |", "|---|---|---|---|---|---|---|---|---|"]
    return out + paired_rows(per, "none", {c: [f"{info[c]['nfe']:.1f}", f"{info[c]['seconds']:.0f}"] for c in per})


def decoder_rows() -> list[tuple[str, dict]]:
    """The decoders compared (name, ``generate`` settings): LLaDA's fixed-k schedule at the task's 64 steps (the
    reference, k = 2) and at 32 / 16 steps, Fast-dLLM's threshold decoding, and the entropy bound in entropy and in
    confidence order."""
    from stp import decoders

    rows = [("fixed-k 2 (64 steps)", dict(steps=64)), ("fixed-k 4 (32 steps)", dict(steps=32)),
            ("fixed-k 8 (16 steps)", dict(steps=16))]
    rows += [(f"fast_dllm {c:g}", dict(decoder=decoders.get("fast_dllm", threshold=c))) for c in (0.9, 0.7)]
    for name in ("entropy_bound", "entropy_bound_confidence"):
        rows += [(f"{name} {g:g}", dict(decoder=decoders.get(name, gamma=g))) for g in (0.1, 1.0)]
    return rows


def _decoders(args) -> list[str]:
    from stp.data_order import encode_prompts
    from stp.sampler import generate

    model, shape, task, examples = _heldout(args)
    eos = int(model.eos_token_id)
    per, info = {}, {}
    for name, kw in decoder_rows():
        t0, rewards, metrics, nfe, passes = time.time(), [], [], [], []
        for lo in range(0, len(examples), 32):
            batch = examples[lo:lo + 32]
            ids, mask = encode_prompts(model.tokenizer, [task.format_prompt(e, model.tokenizer) for e in batch],
                                       model.tokenizer.pad_token_id, None)
            out = generate(model, ids, attention_mask=mask, temperature=0.0, seed=args.seed,
                           **{**shape, **kw})
            for row, ex in zip(out.completions.tolist(), batch):
                text = model.tokenizer.decode(row[:row.index(eos)] if eos in row else row, skip_special_tokens=True)
                rewards.append(task.reward(text, ex))
                metrics.append(task.metric(text, ex) or 0.0)
            nfe += out.nfe.tolist()
            passes.append(out.forward_passes)
        per[name] = {"reward": rewards, "metric": metrics}
        info[name] = {"seconds": time.time() - t0, "nfe": sum(nfe) / len(nfe), "passes": sum(passes) / len(passes)}
        print(f"  {name}: accuracy {sum(metrics) / len(metrics):.3f}, NFE {info[name]['nfe']:.1f}, "
              f"{info[name]['seconds']:.0f} s", file=sys.stderr, flush=True)
    n, ref = len(examples), decoder_rows()[0][0]
    out = [f"Model {args.model}{' + ' + args.adapter if args.adapter else ''}; greedy, {n} held-out chains in calls "
           f"of 32, gen {shape['gen_length']} / block {shape['block_length']}, no KV cache; differences to "
           f"{ref!r} paired on the same chains; seconds: one run of each row, one thread", "",
           "| decoder | accuracy | reward | accuracy minus ref +- SE | z | reward minus ref +- SE | z | NFE / sample | "
           "batch passes / call | seconds |", "|---|---|---|---|---|---|---|---|---|---|"]
    return out + paired_rows(per, ref, {k: [f"{v['nfe']:.1f}", f"{v['passes']:.1f}", f"{v['seconds']:.0f}"]
                                         for k, v in info.items()})


def main(argv: Sequence[str] | None = None) -> str:
    p = argparse.ArgumentParser(prog="python -m benchmarks.chain_measures", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=("variance", "cache", "decoders"))
    p.add_argument("--model", default="pretrained:chain", help="checkpoint [pretrained:chain]")
    p.add_argument("--adapter", default=None, help="a trained LoRA adapter merged into --model")
    p.add_argument("--preset", default="chain-tiny", help="the preset whose rollout shape is used [chain-tiny]")
    p.add_argument("--prompts", type=int, default=32, help="variance: training prompts, one completion each [32]")
    p.add_argument("--draws", type=int, nargs="+", default=[3], help="variance: K, the draws per estimate [3]")
    p.add_argument("--repeats", type=int, default=8, help="variance: mask seeds per completion [8]")
    p.add_argument("--examples", type=int, default=128, help="cache, decoders: held-out chains [128]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="also write the table here")
    args = p.parse_args(argv)
    for name in ("prompts", "repeats", "examples"):
        if getattr(args, name) < 2:
            p.error(f"--{name} {getattr(args, name)}: allowed: an integer >= 2")
    if any(k < 1 for k in args.draws):
        p.error(f"--draws {args.draws}: allowed: integers >= 1")
    load_start = load_average()
    body = {"variance": _variance, "cache": _cache, "decoders": _decoders}[args.what](args)
    text = "\n".join(machine_lines(load_start, load_average()) + [""] + body)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return text


if __name__ == "__main__":
    main()
