"""The rollout engine side by side: d1's engine (no cache, LLaDA's fixed-k schedule, no early stop) against each KV
cache, each decoder, temporal pruning and live-row compaction on/off, in one run on one model.

    python -m benchmarks.rollout_engine --model micro                      # the random tiny architecture
    python -m benchmarks.rollout_engine --model pretrained:sudoku --task sudoku --gen-length 32 --block-length 8 \\
        --steps 16

Rows (``rows``): ``d1`` (cache none, low_confidence, every step, every row: no compaction, no shared first pass),
``prefix`` / ``dual`` (the KV caches), ``es`` (temporal pruning at tau, compaction on and off), the decoders
``confidence_threshold``, ``fast_dllm`` and ``entropy_bound`` (compaction on and off, with and without the dual
cache) and ``entropy_bound_confidence`` (dual cache, compaction). Columns: wall seconds per rollout batch (min /
median / max over ``--repeats``), tokens/s (batch x
gen_length / median seconds), batch passes (forward passes of the batch), NFE per sample (mean), model rows (rows
sent through the model, summed over passes: what compaction saves) and, with ``--task``, the mean reward of the
completions and its paired standard error against ``d1`` (per-prompt mean reward differences over the same prompts;
greedy at ``--temperature 0``). The last line: the fastest row whose reward is within one paired SE of d1's (with
``--task``), else the fastest row.

``--model micro`` is the embedded tiny model's architecture randomly initialised (its speed is the engine's alone:
an untrained model's confidences are flat, so threshold rules decode about one token per step). One torch thread;
set OMP_NUM_THREADS=1 too. The machine's load is printed with the table.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

import torch

from stp import decoders
from stp.sampler import generate


def rows(tau: float, threshold: float, gamma: float) -> list[tuple[str, dict]]:
    fd = lambda: decoders.get("fast_dllm", threshold=threshold)  # noqa: E731
    return [
        ("d1", dict(compact=False, share_first=False)),  # d1's engine: every row in every pass
        ("prefix", dict(cache="prefix")),
        ("dual", dict(cache="dual")),
        ("es", dict(early_stop=tau, compact=False)),
        ("es+compact", dict(early_stop=tau)),
        ("es+dual+compact", dict(early_stop=tau, cache="dual")),
        ("confidence_threshold", dict(decoder=decoders.get("confidence_threshold", threshold=threshold))),
        ("fast_dllm", dict(decoder=fd(), compact=False)),
        ("fast_dllm+compact", dict(decoder=fd())),
        ("fast_dllm+dual+compact", dict(decoder=fd(), cache="dual")),
        ("entropy_bound", dict(decoder=decoders.get("entropy_bound", gamma=gamma), compact=False)),
        ("entropy_bound+compact", dict(decoder=decoders.get("entropy_bound", gamma=gamma))),
        ("entropy_bound+dual+compact", dict(decoder=decoders.get("entropy_bound", gamma=gamma), cache="dual")),
        ("entropy_bound_confidence+dual+compact", dict(decoder=decoders.get("entropy_bound_confidence", gamma=gamma),
                                                       cache="dual")),
    ]


class _CountRows:
    """The model with the rows of its forward passes counted."""

    def __init__(self, model):
        self._model, self.rows = model, 0

    def __getattr__(self, name):
        return getattr(self._model, name)

    def backbone(self, x, attn=None, **kw):
        self.rows += x.shape[0]
        return self._model.backbone(x, attn, **kw)


def _model(name: str):
    if name == "micro":
        from stp.models import build_tiny
        return build_tiny(seed=0)
    from stp.pretrain import load_model
    return load_model(name)


def _prompts(model, args, task):
    """[P * G, width] left-padded prompt ids, mask, the examples (or None) and the prompt index of each row."""
    if task is None:
        gen = torch.Generator().manual_seed(args.seed)
        ids = torch.randint(10, min(model.vocab_size, 60), (args.prompts, args.prompt_length), generator=gen)
        mask, examples = None, None
    else:
        from stp.data_order import encode_prompts

        examples = task.generate("test", n=args.prompts, seed=args.seed)
        ids, mask = encode_prompts(model.tokenizer, [task.format_prompt(e, model.tokenizer) for e in examples],
                                   model.tokenizer.pad_token_id, None)
    rep = lambda t: None if t is None else t.repeat_interleave(args.group, 0)  # noqa: E731
    return rep(ids), rep(mask), examples, torch.arange(args.prompts).repeat_interleave(args.group)


def _task(args):
    """The task with the prompt format the model reads (``prompt_format``)."""
    from stp.tasks.prompts import task_with_prompt

    return task_with_prompt(args.task, prompt_format(args))


def prompt_format(args) -> str:
    """``--prompt-format``, else compact for the embedded models (``tiny``, ``micro``, ``pretrained:TASK``: their
    SFT used it) and chat for any other model.

    >>> prompt_format(argparse.Namespace(prompt_format=None, model="pretrained:chain"))
    'compact'
    >>> prompt_format(argparse.Namespace(prompt_format=None, model="GSAI-ML/LLaDA-8B-Instruct"))
    'chat'
    """
    if args.prompt_format:
        return args.prompt_format
    return "compact" if args.model in ("tiny", "micro") or args.model.startswith("pretrained:") else "chat"


def _rewards(model, task, completions, examples, prompt_of) -> torch.Tensor:
    eos = int(model.eos_token_id)
    out = []
    for r, toks in enumerate(completions.tolist()):
        toks = toks[:toks.index(eos)] if eos in toks else toks
        text = model.tokenizer.decode(toks, skip_special_tokens=True)
        out.append(task.reward(text, examples[int(prompt_of[r])]))
    return torch.tensor(out, dtype=torch.float64)


def _profile(model, ids, base, kw, args) -> int:
    from torch.profiler import ProfilerActivity, profile, record_function

    inner = model._model.backbone
    spent = {"backbone": 0.0}

    def timed(x, attn=None, **k):
        t0 = time.perf_counter()
        with record_function("backbone"):
            out = inner(x, attn, **k)
        spent["backbone"] += time.perf_counter() - t0
        return out

    model._model.backbone = timed
    generate(model, ids, **base, **kw)  # warm-up
    spent["backbone"] = 0.0
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out = generate(model, ids, **base, **kw)
    wall = time.perf_counter() - t0
    print(f"# profile of row {args.profile!r}: {out.forward_passes} passes, wall {wall:.3f} s (under the profiler), "
          f"model forward {spent['backbone']:.3f} s ({100 * spent['backbone'] / wall:.1f}%), the rest (sampling, "
          f"commit, Python) {wall - spent['backbone']:.3f} s")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18))
    return 0


def _split(model, ids, base, kw, args) -> int:
    """Where one row's rollout time goes, without the profiler's overhead: wall, the model's forward, sample_step
    and the rest (the loop's own work), min/median/max over ``--repeats``, and the loop's aten ops per pass (outside
    the forward and sample_step: a count, free of the machine's noise). With ``--against FILE`` (another version of
    stp/sampler.py, e.g. ``git show REV:stp/sampler.py > FILE``) both run alternately in this process, outputs
    checked equal."""
    import importlib.util

    from torch.utils._python_dispatch import TorchDispatchMode

    import stp.decoders.base as dbase
    versions = [("this", generate)]
    if args.against:
        spec = importlib.util.spec_from_file_location("stp._sampler_against", args.against)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod
        spec.loader.exec_module(mod)
        versions.insert(0, (args.against, mod.generate))
    acc = {"model": 0.0, "sample_step": 0.0, "count": True, "ops": 0}
    inner, inner_sample = model._model.backbone, dbase.sample_step

    def timed(key, f):
        def g(*a, **k):
            t0, acc["count"] = time.perf_counter(), False
            try:
                return f(*a, **k)
            finally:
                acc[key] += time.perf_counter() - t0
                acc["count"] = True
        return g

    class _Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, a=(), k=None):
            acc["ops"] += acc["count"]
            return func(*a, **(k or {}))

    model._model.backbone, dbase.sample_step = timed("model", inner), timed("sample_step", inner_sample)
    outs, ops = [], []
    for _, gen in versions:  # warm-up, the outputs compared, the ops counted
        acc["ops"] = 0
        with _Ops():
            out = gen(model, ids, **base, **kw)
        outs.append(out)
        ops.append(acc["ops"] / out.forward_passes)
    same = all(torch.equal(outs[0].sequences, o.sequences) and torch.equal(outs[0].trace, o.trace)
               and torch.equal(outs[0].nfe, o.nfe) for o in outs)
    res = {name: [] for name, _ in versions}
    for _ in range(args.repeats):
        for name, gen in versions:
            acc["model"] = acc["sample_step"] = 0.0
            t0 = time.perf_counter()
            gen(model, ids, **base, **kw)
            wall = time.perf_counter() - t0
            res[name].append((wall, acc["model"], acc["sample_step"], wall - acc["model"] - acc["sample_step"]))
    load = open("/proc/loadavg").read().split()[:3] if os.path.exists("/proc/loadavg") else ["?"] * 3
    print(f"# split of row {args.profile!r}: {outs[-1].forward_passes} passes, {args.repeats} repeats, ms "
          f"min/med/max, load average {' '.join(load)}; outputs equal: {same}")
    for (name, _), per_pass in zip(versions, ops):
        cols = "  ".join(f"{lab} {min(r[i] for r in res[name]) * 1e3:.1f}/"
                         f"{statistics.median(r[i] for r in res[name]) * 1e3:.1f}/"
                         f"{max(r[i] for r in res[name]) * 1e3:.1f}"
                         for lab, i in (("wall", 0), ("model", 1), ("sample_step", 2), ("rest", 3)))
        print(f"{name}: {cols}  loop ops/pass {per_pass:.1f}")
    return 0 if same else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="micro", help="micro (random tiny architecture), tiny, pretrained:TASK or a path")
    p.add_argument("--task", default=None, help="score completions with this task's reward (stp.tasks)")
    p.add_argument("--prompt-format", default=None, choices=("chat", "compact"),
                   help="the task's prompt format [compact for tiny, micro and pretrained:TASK; chat otherwise]")
    p.add_argument("--prompts", type=int, default=1)
    p.add_argument("--group", type=int, default=8, help="G: samples per prompt")
    p.add_argument("--prompt-length", type=int, default=64, help="random prompts' length (without --task)")
    p.add_argument("--gen-length", type=int, default=256)
    p.add_argument("--block-length", type=int, default=32)
    p.add_argument("--steps", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--tau", type=float, default=0.95, help="early stop of the es rows")
    p.add_argument("--threshold", type=float, default=0.9, help="confidence threshold of the threshold decoders")
    p.add_argument("--gamma", type=float, default=0.1, help="entropy bound of the entropy_bound rows")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--only", default=None, help="comma-separated row names to run (d1 always runs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", default=None, metavar="ROW",
                   help="instead of the table: one rollout of this row under torch.profiler, the top ops by self CPU "
                        "time and the share of the model's forward (backbone) in the wall time")
    p.add_argument("--split", action="store_true",
                   help="with --profile ROW: time the row's wall / model forward / sample_step / rest without the "
                        "profiler and count the loop's ops per pass (see --against)")
    p.add_argument("--against", default=None, metavar="FILE",
                   help="with --split: another version of stp/sampler.py to run alternately, outputs checked equal")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    model = _CountRows(_model(args.model).eval())
    task = _task(args) if args.task is not None else None
    ids, mask, examples, prompt_of = _prompts(model, args, task)
    table = rows(args.tau, args.threshold, args.gamma)
    if args.only:
        keep = set(args.only.split(",")) | {"d1"}
        table = [r for r in table if r[0] in keep]
    base = dict(attention_mask=mask, gen_length=args.gen_length, block_length=args.block_length, steps=args.steps,
                temperature=args.temperature, seed=args.seed)
    batch = ids.shape[0]
    if args.profile and args.split:
        return _split(model, ids, base, dict(table)[args.profile], args)
    if args.profile:
        return _profile(model, ids, base, dict(table)[args.profile], args)
    results = []
    for name, kw in table:
        times = []
        for _ in range(args.repeats):
            model.rows = 0
            t0 = time.perf_counter()
            out = generate(model, ids, **base, **kw)
            times.append(time.perf_counter() - t0)
        reward = None
        if args.task is not None:
            reward = _rewards(model, task, out.completions, examples, prompt_of)
        results.append(dict(name=name, times=times, passes=out.forward_passes, nfe=float(out.nfe.float().mean()),
                            rows=model.rows, reward=reward))
    load = open("/proc/loadavg").read().split()[:3] if os.path.exists("/proc/loadavg") else ["?"] * 3
    print(f"# model {args.model}, batch {args.prompts} prompt(s) x G {args.group}, gen {args.gen_length} / block "
          f"{args.block_length} / {args.steps} steps, T {args.temperature}, {args.repeats} repeats, 1 thread, "
          f"load average {' '.join(load)}")
    head = f"{'row':38s} {'s min/med/max':>22s} {'tok/s':>9s} {'speedup':>8s} {'passes':>7s} {'NFE':>7s} {'rows':>7s}"
    if args.task:
        head += f" {'reward':>8s} {'vs d1 (SE)':>16s}"
    print(head)
    d1 = results[0]
    d1_med = statistics.median(d1["times"])
    per_prompt = lambda r: r.view(args.prompts, args.group).mean(1)  # noqa: E731
    best = None
    for r in results:
        med = statistics.median(r["times"])
        line = (f"{r['name']:38s} {min(r['times']):6.3f}/{med:6.3f}/{max(r['times']):6.3f} "
                f"{batch * args.gen_length / med:9.1f} {d1_med / med:7.2f}x {r['passes']:7d} {r['nfe']:7.1f} "
                f"{r['rows']:7d}")
        ok = True
        if r["reward"] is not None:
            diff = per_prompt(r["reward"]) - per_prompt(d1["reward"])
            se = float(diff.std(unbiased=True) / math.sqrt(args.prompts)) if args.prompts > 1 else float("nan")
            line += f" {float(r['reward'].mean()):8.3f} {float(diff.mean()):+8.3f} ({se:.3f})"
            ok = not (float(diff.mean()) < -se) if se == se else float(diff.mean()) >= 0
            r["diff"], r["se"] = float(diff.mean()), se
        print(line)
        if ok and (best is None or med < statistics.median(best["times"])):
            best = r
    if args.task and float(d1["reward"].abs().sum()) == 0.0:
        print(f"warning: every reward is 0 with d1's engine: check that the prompts are in the format the model was "
              f"trained on (--prompt-format; this run: {prompt_format(args)})")
    speed = d1_med / statistics.median(best["times"])
    if args.task:
        print(f"rollout best/d1-engine = {speed:.2f}x at reward {best['diff']:+.2f} (paired SE {best['se']:.2f}) "
              f"[{best['name']}]")
    else:
        print(f"rollout best/d1-engine = {speed:.2f}x [{best['name']}] (no task: no reward)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
