"""The dTRPO trajectory estimator (``stp.trajectory_ratio``, modes exact and packed) against the STP estimator (K = 3)
per sample: body-forward sequences and tokens, time of forward + backward (min / median / max), peak memory; plus
the gap between the packed and the exact mode on the same drawn steps.

    python -m benchmarks.bench_dtrpo [--repeats 5] [--out table.md]
    python -m benchmarks.bench_dtrpo --variant exact --model micro      # one peak-memory measurement (JSON)

Models: the LLaDA-proportioned micro model (hidden 256, 4 layers, 4 heads, MLP 768, vocabulary 1024, random
weights; benchmarks/train_step_phases.py's) and the embedded tiny model (random weights). Workload: 4 samples,
prompt 200 (micro) / 40 (tiny) tokens, completion 256 / 64 decoded by ``stp.sampler.generate`` with block 32 and
128 / 32 steps (8 / 2 blocks of T_B = 16), so the trajectory record is a real one. Every variant does forward +
backward of sum(logprobs * g) with a random g. The STP estimator runs without anchors (= the elbo estimator), score
"all", K = 3. Peak memory: a fresh process per variant (VmHWM - VmRSS around the second step, as
``benchmarks/_memory.py``). The gap: max and mean |packed - exact| of the scored tokens' log-probs, and of the
per-sample trajectory log-ratio Delta between the model and a copy with perturbed weights, over 4 drawn u; on the
micro and tiny models with random weights (whose predictions barely depend on context, so the gap is small) and on
the pretrained tiny model (Sudoku prompts, 4 blocks of 8), whose predictions do. ``--gap-only`` prints that table.
``packed`` is exact only for a model declaring block-causal attention and the trainer refuses it for these
(bidirectional) models; the cost and gap tables mark a copy of the model as declaring it, to measure what the packed
sequence would cost and how far off it would be.

    python -m benchmarks.bench_dtrpo --reference-only [--repeats 5] [--model micro|tiny]
    python -m benchmarks.bench_dtrpo --selection-only [--samples 32] [--theta-adapter RUN/adapter]

``--reference-only``: the reference terms of offline dTRPO with fresh steps every epoch, two ways, on ``--model``
(micro: 8 blocks of T_B 16, tiny: 2 blocks of T_B 16) with a LoRA adapter: recomputed per visit with the adapter
disabled (no grad, the N_B drawn states: what the trainer does) against caching every position's reference log-prob
once per pair (no grad, all N_B T_B states of the trajectory); the cache pays when a pair is visited more than
(cache time / recompute time) times.
``--selection-only``: the selection term of low-confidence remasking (``stp.trajectory_ratio.selection_logprob``) on
the pretrained tiny model (``pretrained:sudoku``) at dtrpo-tiny's pair settings (compact Sudoku prompts of the
generated test split, L 32 / block 32 / 16 steps, T 0.9): per sample, the selection log-probability under the
sampling model, and against a second policy (the pretrained model with a trained adapter merged,
``--theta-adapter``, e.g. the ``adapter`` of ``python -m stp.train --preset dtrpo-tiny``; without it, the model with
2 % weight noise) the selection log-ratio beside the newly-unmasked (factorised) log-ratio the estimator targets.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch

from benchmarks._memory import cpu_step_peak_mib, peak_in_subprocess

MODELS = {"micro": (4, 200, 256, 128), "tiny": (4, 40, 64, 32)}  # samples, prompt, completion, steps
# The gap also on the pretrained tiny model (pretrained:sudoku, built into the cache on first use), whose
# predictions depend on their context, with Sudoku prompts, completion 32 in 4 blocks of 8, 16 steps.
GAP_MODELS = (*MODELS, "pretrained")
VARIANTS = ("stp_k3", "exact", "packed")
BLOCK = 32


def _pretrained():
    from stp.pretrain import load_model
    from stp.sampler import generate
    from stp.tasks.prompts import task_with_prompt

    model = load_model("pretrained:sudoku")
    task = task_with_prompt("sudoku", "compact")
    texts = [task.format_prompt(ex, model.tokenizer) for ex in task.load("test", source="generated", n=4)]
    seqs = [model.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    width = max(len(x) for x in seqs)
    prompt = torch.tensor([[model.pad_token_id] * (width - len(x)) + x for x in seqs])
    pam = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in seqs])
    out = generate(model, prompt, attention_mask=pam, gen_length=32, block_length=8, steps=16, temperature=0.9,
                   seed=1)
    return model, prompt, pam, out.completions, out.commit_step, 16, None


def make(name: str, seed: int = 0):
    from stp.models.tiny import build_tiny
    from stp.sampler import generate

    if name == "pretrained":
        return _pretrained()
    b, p, c, steps = MODELS[name]
    if name == "micro":
        model = build_tiny(seed=seed, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=4, vocab_size=1024)
    else:
        model = build_tiny(seed=seed)
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(10, 100, (b, p), generator=gen)
    pam = torch.ones(b, p, dtype=torch.long)
    pam[0, : p // 4] = 0
    # Random weights would sometimes draw [MASK] itself, which the sampler leaves masked to compete again later
    # (outside its block's window, which mode packed refuses): sample from every other token.
    vocab = torch.tensor([t for t in range(model.vocab_size) if t != model.mask_token_id])
    out = generate(model, prompt, attention_mask=pam, gen_length=c, block_length=BLOCK, steps=steps,
                   temperature=1.0, seed=1, vocab=vocab)
    g = torch.randn(b, c, generator=gen)
    return model, prompt, pam, out.completions, out.commit_step, steps, g


def _declared_block_causal(model):
    """The model marked as block-causal, for measuring what ``packed`` would cost or how far off it would be on a
    bidirectional model (which the trainer refuses: the packed scores are biased there)."""
    model.block_causal = True
    return model


def step(variant: str, model, prompt, pam, comp, commit, steps, g):
    from stp.likelihood import per_token_logprobs
    from stp.trajectory_ratio import trajectory_logprobs

    def run():
        model.zero_grad(set_to_none=True)
        if variant == "stp_k3":
            out = per_token_logprobs(model, prompt, pam, comp, seed=1, iteration=0, num_draws=3, estimator="stp",
                                     score="all")
        else:
            out = trajectory_logprobs(_declared_block_causal(model) if variant == "packed" else model, prompt, pam,
                                      comp, commit, seed=1, iteration=0, block_length=BLOCK, steps=steps,
                                      mode=variant)
        (out.logprobs * g).sum().backward()

    return run


def sequences(variant: str, p: int, c: int) -> tuple[int, int]:
    """(body-forward sequences, tokens) per sample."""
    if variant == "stp_k3":
        return 3, 3 * (p + c)
    if variant == "exact":
        return c // BLOCK, (c // BLOCK) * (p + c)
    return 1, p + 2 * c


def measure(variant: str, name: str) -> float:
    run = step(variant, *make(name))
    run()
    return cpu_step_peak_mib(run)


def measure_in_subprocess(variant: str, name: str) -> float:
    return peak_in_subprocess("benchmarks.bench_dtrpo", ["--variant", variant, "--model", name], variant)


@torch.no_grad()
def gap(name: str) -> dict[str, float]:
    """|packed - exact| on the same drawn steps: per scored token, and per sample's Delta (model vs a perturbed
    copy), over 4 draws of u."""
    from stp.trajectory_ratio import trajectory_delta, trajectory_logprobs

    model, prompt, pam, comp, commit, steps, _ = make(name)
    model = _declared_block_causal(model)
    other = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(5)
    for p in other.parameters():
        p.add_(0.02 * torch.randn(p.shape, generator=gen) * p.abs().mean())
    tok, dlt, dmag = [], [], []
    for it in range(4):
        kw = dict(seed=3, iteration=it, block_length=8 if name == "pretrained" else BLOCK, steps=steps)
        res = {}
        for mode in ("exact", "packed"):
            a = trajectory_logprobs(model, prompt, pam, comp, commit, mode=mode, **kw)
            b = trajectory_logprobs(other, prompt, pam, comp, commit, mode=mode, **kw)
            res[mode] = (a, trajectory_delta(b.logprobs, a.logprobs, a.weights))
        (ea, ed), (pa, pd) = res["exact"], res["packed"]
        tok.append((ea.logprobs - pa.logprobs)[ea.scored].abs())
        dlt.append((ed - pd).abs())
        dmag.append(ed.abs())
    tok_t, dlt_t, dmag_t = torch.cat(tok), torch.cat(dlt), torch.cat(dmag)
    return {"token max": tok_t.max().item(), "token mean": tok_t.mean().item(), "Delta max": dlt_t.max().item(),
            "Delta mean": dlt_t.mean().item(), "|Delta| mean (exact)": dmag_t.mean().item()}


def main(argv: list[str] | None = None) -> str | None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", choices=VARIANTS, default=None, help="measure one variant's peak memory (JSON)")
    ap.add_argument("--model", choices=list(MODELS), default="micro")
    ap.add_argument("--repeats", type=int, default=5, help="timed repeats per variant after one warm-up [5]")
    ap.add_argument("--out", default=None, help="also write the markdown table here")
    ap.add_argument("--gap-only", action="store_true", help="only the packed-vs-exact table")
    ap.add_argument("--cost-only", action="store_true", help="only the cost table")
    ap.add_argument("--reference-only", action="store_true", help="only the reference-terms table (recompute vs "
                    "cache)")
    ap.add_argument("--selection-only", action="store_true", help="only the selection-term table (pretrained tiny)")
    ap.add_argument("--samples", type=int, default=32, help="samples of the selection-term table [32]")
    ap.add_argument("--theta-adapter", default=None, help="the second policy of the selection-term table: this "
                    "adapter merged into pretrained:sudoku [2 %% weight noise]")
    a = ap.parse_args(argv)
    if a.variant is not None:
        print(json.dumps({"peak_mib": measure(a.variant, a.model)}))
        return None
    from benchmarks._report import load_average, machine_lines

    torch.set_num_threads(1)
    load_start = load_average()

    def emit(lines: list[str]) -> str:
        """The table and the machine's load, printed and written to ``--out``."""
        text = "\n".join([*lines, "", *machine_lines(load_start, load_average())]) + "\n"
        print(text)
        if a.out:
            with open(a.out, "w") as f:
                f.write(text)
        return text

    if a.reference_only or a.selection_only:
        return emit(reference_table(a.repeats, a.model) if a.reference_only
                    else selection_table(a.samples, a.theta_adapter))
    lines = [] if a.gap_only else cost_table(a.repeats)
    if not a.cost_only:
        lines += ["packed vs exact on the same drawn steps (4 draws of u); Delta = trajectory log-ratio of the model "
                  "with 2 % weight noise against the model", "",
                  "| model | token max | token mean | Delta max | Delta mean | mean abs Delta (exact) |",
                  "|---|---|---|---|---|---|"]
    for name in () if a.cost_only else GAP_MODELS:
        r = gap(name)
        lines.append(f"| {name} | {r['token max']:.3g} | {r['token mean']:.3g} | {r['Delta max']:.3g} | "
                     f"{r['Delta mean']:.3g} | {r['|Delta| mean (exact)']:.3g} |")
    return emit(lines)


def cost_table(repeats: int) -> list[str]:
    b, p, c, steps = MODELS["micro"]
    lines = [f"dTRPO estimator vs STP (K = 3), micro model, {b} samples x (prompt {p} + completion {c}), block "
             f"{BLOCK}, {steps} steps; forward + backward; per sample", "",
             "| estimator | sequences / sample | tokens / sample | ms / sample min / median / max | peak MiB / "
             "sample |", "|---|---|---|---|---|"]
    data = make("micro")
    for variant in VARIANTS:
        run = step(variant, *data)
        run()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            run()
            times.append((time.perf_counter() - t0) * 1e3 / b)
        peak = measure_in_subprocess(variant, "micro") / b
        n_seq, n_tok = sequences(variant, p, c)
        lines.append(f"| {variant} | {n_seq} | {n_tok} | {min(times):.0f} / {statistics.median(times):.0f} / "
                     f"{max(times):.0f} | {peak:.0f} |")
    return lines + [""]


def _spread(xs) -> str:
    return f"{min(xs):.3g} / {statistics.median(xs):.3g} / {max(xs):.3g}"


def reference_table(repeats: int, name: str) -> list[str]:
    """Reference terms per visit (adapter disabled, N_B states) vs a per-pair cache of every pass (N_B T_B states)."""
    from stp.config import resolve
    from stp.policy import add_lora
    from stp.trajectory_ratio import trajectory_logprobs

    b, p, c, steps = MODELS[name]
    model, prompt, pam, comp, commit, steps, _ = make(name)
    add_lora(model, resolve("tiny"))
    n_blocks, t_b = c // BLOCK, steps // (c // BLOCK)
    kw = dict(block_length=BLOCK, steps=steps, mode="exact")

    @torch.no_grad()
    def recompute():  # what DTRPO.score does for one visit: the drawn states, adapter disabled
        with model.model.disable_adapter():
            trajectory_logprobs(model, prompt, pam, comp, commit, seed=1, iteration=0, **kw)

    @torch.no_grad()
    def cache_all():  # every position at its own state: the T_B choices of u cover every pass once
        with model.model.disable_adapter():
            for u in range(1, t_b + 1):
                fixed = (torch.arange(n_blocks) * t_b + u).expand(b, n_blocks)
                trajectory_logprobs(model, prompt, pam, comp, commit, seed=1, iteration=0, fixed_steps=fixed, **kw)

    rows = []
    for way, fn, states in (("recompute per visit (adapter disabled)", recompute, n_blocks),
                            ("cache every pass, once per pair", cache_all, n_blocks * t_b)):
        fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3 / b)
        rows.append((way, states, times))
    ratio = statistics.median(rows[1][2]) / statistics.median(rows[0][2])
    lines = [f"Reference terms of offline dTRPO with fresh steps every epoch: {name} model + LoRA (r 16), {b} "
             f"samples x (prompt {p} + completion {c}), {n_blocks} blocks of T_B = {t_b}; no grad; per sample", "",
             "| way | states / sample | ms / sample min / median / max |", "|---|---|---|"]
    lines += [f"| {way} | {states} | {_spread(times)} |" for way, states, times in rows]
    lines += ["", f"cache / recompute (medians): {ratio:.1f}: the cache is cheaper only for pairs visited more than "
              f"{ratio:.1f} times (T_B = {t_b} passes per block)"]
    return lines


@torch.no_grad()
def selection_table(samples: int, theta_adapter: str | None) -> list[str]:
    """The selection term of low-confidence remasking on the pretrained tiny model, at dtrpo-tiny's pair settings."""
    from stp.pretrain import load_model
    from stp.sampler import generate
    from stp.tasks.prompts import task_with_prompt
    from stp.trajectory_ratio import selection_logprob, trajectory_delta, trajectory_logprobs

    from stp.models.base import merge_adapter

    ref = load_model("pretrained:sudoku")
    theta = copy.deepcopy(ref)
    if theta_adapter is not None:
        merge_adapter(theta, theta_adapter)
        other = f"pretrained:sudoku + adapter {theta_adapter}"
    else:
        gen = torch.Generator().manual_seed(5)
        for p in theta.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=gen) * p.abs().mean())
        other = "pretrained:sudoku with 2 % weight noise"
    task = task_with_prompt("sudoku", "compact")
    texts = [task.format_prompt(ex, ref.tokenizer) for ex in task.load("test", source="generated", n=samples)]
    seqs = [ref.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    width = max(len(x) for x in seqs)
    prompt = torch.tensor([[ref.pad_token_id] * (width - len(x)) + x for x in seqs])
    pam = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in seqs])
    gen_length, block, steps, temp = 32, 32, 16, 0.9
    out = generate(ref, prompt, attention_mask=pam, gen_length=gen_length, block_length=block, steps=steps,
                   temperature=temp, seed=7, remasking="low_confidence")
    comp, commit = out.completions, out.commit_step
    kw = dict(block_length=block, steps=steps, temperature=temp)
    sel_ref = selection_logprob(ref, prompt, pam, comp, commit, **kw)
    sel_theta = selection_logprob(theta, prompt, pam, comp, commit, **kw)
    # The factorised log-ratio of the whole trajectory: the mean of the estimate over the T_B choices of u.
    fact = torch.zeros(len(seqs), dtype=torch.float64)
    for u in range(1, steps + 1):
        fixed = torch.full((len(seqs), 1), u)
        a = trajectory_logprobs(ref, prompt, pam, comp, commit, seed=0, iteration=0, mode="exact", fixed_steps=fixed,
                                **kw)
        b = trajectory_logprobs(theta, prompt, pam, comp, commit, seed=0, iteration=0, mode="exact",
                                fixed_steps=fixed, **kw)
        fact += trajectory_delta(b.logprobs.double(), a.logprobs.double(), a.weights.double()) / steps
    sel_ratio = sel_theta - sel_ref
    rows = [("selection log-prob under pretrained:sudoku (the sampler)", sel_ref.tolist()),
            ("|selection log-ratio| (theta vs sampler)", sel_ratio.abs().tolist()),
            ("|factorised log-ratio| (theta vs sampler)", fact.abs().tolist()),
            ("|selection| / |factorised|", (sel_ratio.abs() / fact.abs().clamp(min=1e-12)).tolist())]
    lines = [f"Selection term of low-confidence remasking, pretrained tiny model, {len(seqs)} samples (compact Sudoku "
             f"prompts, generated test split), L {gen_length} / block {block} / {steps} steps, T {temp}; nats per "
             f"sequence; theta = {other}", "", "| quantity | min / median / max |", "|---|---|"]
    lines += [f"| {name} | {_spread(v)} |" for name, v in rows]
    return lines


if __name__ == "__main__":
    main()
