"""Block KV caching of rollouts (``generate(cache=...)``): seconds and NFE per sample for none / prefix / dual, and
how many tokens each mode decodes as the uncached greedy decode does.

    python -m benchmarks.kv_cache [--batch 4] [--repeats 3] [--out table.md]
    python -m benchmarks.kv_cache --model pretrained:sudoku --adapter RUN/adapter --gen-length 32 --block-length 8 \\
        --steps 16 --prompts 256

Default: the LLaDA-proportioned micro model of ``benchmarks.train_step_phases`` (hidden 256, 4 layers, 4 heads, MLP
768, vocabulary 1024, random weights: it measures time; its agreement says how far a random model's decode moves) at
the paper's rollout shape (gen 256, block 32, 128 steps), on 4x4 Sudoku prompts in the tiny model's compact format,
T 0.9 for the timing (as training rollouts) and T 0 for the agreement. With ``--model``: any model ``stp.pretrain``
loads (the tiny checkpoint), optionally with a trained LoRA ``--adapter`` merged; then the agreement is over
``--prompts`` held-out prompts, and ``--heldout N`` adds the greedy held-out reward per mode. Times are wall-clock
seconds per ``generate`` call (min / median / max over ``--repeats`` after one warm-up call); the table starts with
the machine and its load (``benchmarks/_report.py``).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks._report import load_average, machine_lines
from stp.sampler import CACHE_MODES, generate


def _micro_model():
    from stp.models.tiny import build_tiny

    return build_tiny(seed=0, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                      intermediate_size=768, vocab_size=1024)


def _prompts(tokenizer, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` held-out Sudoku prompts (compact format), left-padded ids [n, P] and mask."""
    from stp.data_order import encode_prompts
    from stp.tasks.prompts import task_with_prompt

    task = task_with_prompt("sudoku", "compact")
    examples = task.load("test", None, source="generated", n=n, seed=seed)
    texts = [task.format_prompt(e, tokenizer) for e in examples]
    return encode_prompts(tokenizer, texts, tokenizer.pad_token_id, None)


def _heldout(model, n: int, shape: dict) -> list[str]:
    """Greedy held-out reward per cache mode (``stp.evaluation.evaluate``, the trainer's held-out set), its standard
    error over the puzzles, and the paired difference to ``none`` (same puzzles) with its standard error."""
    from stp.evaluation import evaluate
    from stp.tasks.prompts import task_with_prompt

    task = task_with_prompt("sudoku", "compact")
    examples = task.load("test", None, source="generated", n=n)
    rewards = {}
    for cache in CACHE_MODES:
        res = evaluate(model, task, examples, batch_size=32, temperature=0.0, max_prompt_length=0, progress=False,
                       cache=cache, **shape)
        rewards[cache] = torch.tensor([r["reward"] for r in res["records"]], dtype=torch.float64)
    se = lambda v: (v.std() / len(v) ** 0.5).item()  # noqa: E731
    lines = [f"Held-out reward, greedy, {n} puzzles (mean +- standard error over puzzles; difference to none paired "
             f"on the same puzzles)", "", "| cache | reward | SE | minus none | SE of the difference | "
             "|difference| / SE(none) |", "|---|---|---|---|---|---|"]
    base = rewards["none"]
    for cache, v in rewards.items():
        d = v - base
        lines.append(f"| {cache} | {v.mean().item():.4f} | {se(v):.4f} | {d.mean().item():+.4f} | {se(d):.4f} | "
                     f"{abs(d.mean().item()) / se(base):.2f} |")
    return lines


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="a model name stp.pretrain loads [the random micro model]")
    p.add_argument("--adapter", default=None, help="LoRA adapter directory merged into --model first")
    p.add_argument("--gen-length", type=int, default=256)
    p.add_argument("--block-length", type=int, default=32)
    p.add_argument("--steps", type=int, default=128)
    p.add_argument("--batch", type=int, default=4, help="samples per timed generate call [4]")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per mode after one warm-up [3]")
    p.add_argument("--prompts", type=int, default=16, help="prompts of the greedy agreement check [16]")
    p.add_argument("--temperature", type=float, default=0.9, help="temperature of the timed rollouts [0.9]")
    p.add_argument("--heldout", type=int, default=0, metavar="N",
                   help="also the greedy held-out reward per mode over the trainer's first N held-out Sudoku puzzles "
                        "(compact prompts), with its standard error and the paired difference to none [0 = off]")
    p.add_argument("--out", default=None, help="also write the markdown table here")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    if args.model is None:
        model, name = _micro_model(), "micro (hidden 256, 4 layers, vocab 1024, random)"
    else:
        from stp.models import merge_adapter
        from stp.pretrain import load_model

        model = load_model(args.model)
        if args.adapter:
            merge_adapter(model, args.adapter)
        name = args.model + (f" + {args.adapter}" if args.adapter else "")
    model.eval()
    shape = dict(gen_length=args.gen_length, block_length=args.block_length, steps=args.steps)
    load_start = load_average()
    ids, mask = _prompts(model.tokenizer, max(args.batch, args.prompts))

    rows = []
    for cache in CACHE_MODES:
        b_ids, b_mask = ids[:args.batch], mask[:args.batch]
        times, out = [], None
        for r in range(args.repeats + 1):
            t0 = time.perf_counter()
            out = generate(model, b_ids, attention_mask=b_mask, temperature=args.temperature, seed=r, cache=cache,
                           **shape)
            if r:
                times.append(time.perf_counter() - t0)
        rows.append({"cache": cache, "min s": min(times), "median s": statistics.median(times), "max s": max(times),
                     "NFE / sample": out.nfe.float().mean().item()})
    greedy = {}
    for cache in CACHE_MODES:
        outs = [generate(model, ids[i:i + 32], attention_mask=mask[i:i + 32], temperature=0.0, seed=0, cache=cache,
                         **shape).completions for i in range(0, args.prompts, 32)]
        greedy[cache] = torch.cat(outs)
    base = rows[0]["median s"]
    lines = [f"Model: {name}; rollout gen {args.gen_length} / block {args.block_length} / {args.steps} steps; "
             f"timing: batch {args.batch}, T {args.temperature:g}, {args.repeats} repeats after a warm-up; "
             f"agreement: greedy (T 0) over {args.prompts} prompts", "",
             "| cache | min s | median s | max s | speed-up (median) | NFE / sample | token agreement with none "
             "(greedy) | sequences identical |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        same = greedy[r["cache"]] == greedy["none"]
        lines.append(f"| {r['cache']} | {r['min s']:.2f} | {r['median s']:.2f} | {r['max s']:.2f} | "
                     f"{base / r['median s']:.2f}x | {r['NFE / sample']:.1f} | {same.float().mean().item():.4f} | "
                     f"{same.all(1).float().mean().item():.3f} |")
    if args.heldout:
        lines += [""] + _heldout(model, args.heldout, shape)
    table = "\n".join(machine_lines(load_start, load_average()) + [""] + lines)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")
    return table


if __name__ == "__main__":
    main()
