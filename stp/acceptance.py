"""The whole stack on one GPU in one command: one RL step of every online method on a random-weight model with
LLaDA-8B's shapes, and the same forward at Dream-7B's shapes, as a markdown table with spreads and the device name.

    python -m stp.acceptance --out stack.md          # one H100/H200, no network: kernel tables, then the stack
    python -m stp.acceptance --smoke                 # the same code on CPU at tiny shapes (CI)

Time on one H100, estimated (nothing here has run on a GPU yet): the kernel tables ~2-3 min (their own budget of
~6 s of repeats per timed variant), the stack <= ~7 min from flops without KV caches (``estimate_gpu_seconds``; the
prefix / dual rows are cheaper), so ~6-8 min in all; ``--no-kernels`` or ``--methods`` / ``--caches`` cut it.

What runs (``python -m stp_kernels.acceptance`` is the kernel-level table; this one is the trainer's):
1. For each method (stp, d1, elbo, diffpo, dtrpo-online) and each ``rollout.cache`` (none, prefix, dual): the
   method's own LLaDA preset (``llada-gsm8k``, ``d1-gsm8k``, ``elbo-gsm8k``, ``diffpo-llada-gsm8k``; dtrpo-online on
   ``llada-gsm8k``'s settings) with the paper's rollout shape (gen 256 / block 32 / 128 steps), G 6, one prompt per
   step, mu 1, bf16 weights, LoRA r 128, through ``stp.trainer.train`` itself (data order, sampler, method scores,
   loss, optimizer step). The model is built in place of loading a checkpoint: LLaDA-8B's architecture (hidden
   4096, 32 layers, 32 heads, MLP 12288, vocabulary 126464) with random weights, directly on the device; prompts
   are a fixed set of arithmetic questions (the tiny model's character tokenizer, chat-rendered) and the reward is
   a made-up function of the completion, so the numbers measure time and memory, never quality. A fresh model per
   variant (LoRA adapters are injected in place). Each variant runs ``repeats`` measured steps (min / median /
   max); the process's first variant runs one warm-up step before them (CUDA context, cuBLAS and Triton compiles,
   the caching allocator), which later variants no longer need. Per step: rollout, scoring and update seconds, generated
   tokens per second of the whole step, and the peak GPU memory of the variant (``torch.cuda.max_memory_allocated``).
   A combination the configuration refuses (e.g. the entropy-bounded sampler with a KV cache) is listed as refused,
   with the reason.
2. One forward of the rollout batch (G x (prompt + 256) tokens) at Dream-7B's shapes (hidden 3584, 28 layers, 28
   heads of which 4 key/value heads, MLP 18944, vocabulary 152064; a Llama-style stand-in for Qwen2's blocks:
   no attention biases), bf16, random weights: seconds per forward, tokens per second, peak memory.
Every table row carries the device name; timings are CUDA-synchronised on GPU.

``--smoke``: CPU, a model of the same family with tiny dimensions, gen 16 / block 8 / 4 steps, G 2, LoRA r 4, one
repeat; the same presets, trainer, sampler, caches and methods. Its numbers mean nothing; it checks the code path.
Exit status 1 when a variant fails (its error is in the table), 2 without a GPU (unless --smoke).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field

import torch

METHODS = {  # method -> (its LLaDA preset, method override)
    "stp": ("llada-gsm8k", None),
    "d1": ("d1-gsm8k", None),
    "elbo": ("elbo-gsm8k", None),
    "diffpo": ("diffpo-llada-gsm8k", None),
    "dtrpo-online": ("llada-gsm8k", "dtrpo-online"),
}
CACHES = ("none", "prefix", "dual")


@dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    mlp: int
    vocab: int

    def params(self) -> int:
        head_dim = self.hidden // self.heads
        attn = self.hidden * head_dim * (2 * self.heads + 2 * self.kv_heads)
        return self.layers * (attn + 3 * self.hidden * self.mlp) + 2 * self.vocab * self.hidden


LLADA_8B = Shape(4096, 32, 32, 32, 12288, 126464)
DREAM_7B = Shape(3584, 28, 28, 4, 18944, 152064)


@dataclass(frozen=True)
class Plan:
    device: str
    llada: Shape
    dream: Shape
    gen: int
    block: int
    steps: int
    group: int
    lora_r: int
    repeats: int
    prior_steps: int
    methods: tuple[str, ...] = tuple(METHODS)
    caches: tuple[str, ...] = CACHES
    overrides: dict = field(default_factory=dict)


GPU_PLAN = Plan("cuda", LLADA_8B, DREAM_7B, gen=256, block=32, steps=128, group=6, lora_r=128, repeats=2,
                prior_steps=8)  # estimate_gpu_seconds: ~7 min on one H100 without caches (an upper bound)
_SMOKE_SHAPE = Shape(64, 2, 4, 4, 128, 512)
SMOKE_PLAN = Plan("cpu", _SMOKE_SHAPE, Shape(64, 2, 4, 2, 160, 600), gen=16, block=8, steps=4, group=2, lora_r=4,
                  repeats=2, prior_steps=2)

PROMPTS = [f"What is {a} + {b}?" for a, b in ((12, 7), (3, 45), (28, 14), (9, 9), (31, 6), (17, 22), (5, 40), (8, 13))]


def _reward(completions, **kwargs):
    """A made-up reward that differs between completions (so advantages are not all zero)."""
    return [float(sum(map(ord, str(c))) % 7) / 6.0 for c in completions]


def _log(msg: str) -> None:
    print(f"[stp.acceptance {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def build_model(shape: Shape, device: str, dtype: torch.dtype, seed: int = 0):
    """A DiffusionLM with ``shape``'s architecture and random weights, built directly on ``device`` in ``dtype``
    (an 8B model is never materialised on the CPU), with the tiny model's tokenizer (its ids are a subset)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from stp.models.base import DiffusionLM
    from stp.models.tiny import build_tokenizer

    tok = build_tokenizer()
    config = LlamaConfig(vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.mlp,
                         num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                         num_key_value_heads=shape.kv_heads, max_position_embeddings=4096, rms_norm_eps=1e-5,
                         rope_parameters={"rope_type": "default", "rope_theta": 500000.0}, tie_word_embeddings=False,
                         use_cache=False, bos_token_id=None, attn_implementation="sdpa")
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device), torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(before)
    model.eval()
    return DiffusionLM(model, tok, mask_token_id=tok.mask_token_id, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id, shift_logits=False, name="random-llada", family="tiny")


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _peak_reset(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_gib(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None


def _config(plan: Plan, method: str, cache: str, out: str, warmup: int):
    from stp.config import resolve

    preset, method_override = METHODS[method]
    over = {
        "rollout.gen_length": plan.gen, "rollout.block_length": plan.block, "rollout.steps": plan.steps,
        "rollout.cache": cache, "grpo.num_generations": plan.group, "grpo.prompts_per_step": 1,
        "grpo.num_iterations": 1, "grpo.gradient_accumulation_steps": 1, "grpo.max_steps": warmup + plan.repeats,
        "model.lora_r": plan.lora_r, "model.dtype": "bfloat16", "run.device": plan.device,
        "run.mixed_precision": "bf16" if plan.device == "cuda" else "no", "run.eval_examples": 0,
        "run.save_every": 0, "run.tensorboard": False, "run.output_dir": out,
        **plan.overrides,
    }
    if method == "stp":
        over.update({"prior.build_steps": plan.prior_steps, "prior.build_block_length": plan.gen})
    return resolve(preset=preset, overrides=over, method=method_override)


def run_method(plan: Plan, method: str, cache: str, warmup: int = 0) -> dict:
    """One variant through stp.trainer.train: {phase: [seconds per measured step]} + tokens/s, peak memory; or
    {"error": ...} / {"refused": ...}. The first ``warmup`` steps are run and left out."""
    from stp import models
    from stp.config import ConfigError
    from stp.trainer import train

    with tempfile.TemporaryDirectory() as out:
        try:
            cfg = _config(plan, method, cache, out, warmup)
        except ConfigError as exc:
            return {"refused": str(exc).splitlines()[0][:160]}
        _peak_reset(plan.device)
        lm = build_model(plan.llada, plan.device, torch.bfloat16)
        real_load = models.load
        models.load = lambda *args, **kwargs: lm  # the trainer's checkpoint load, replaced by the built model
        try:
            with warnings_quiet():
                train(cfg, reward_funcs=[_reward], train_dataset=[{"prompt": p} for p in PROMPTS])
        except Exception as exc:  # reported in the table
            return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"}
        finally:
            models.load = real_load
            del lm
        peak = _peak_gib(plan.device)
        with open(os.path.join(out, "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f if line.strip()]
    rows = [r for r in rows if "time_update" in r][warmup:]
    tokens = plan.group * plan.gen
    res = {k: [r[f"time_{k}"] for r in rows] for k in ("rollout", "scoring", "update")}
    res["total"] = [a + b + c for a, b, c in zip(res["rollout"], res["scoring"], res["update"])]
    res["tokens_per_s"] = [tokens / t for t in res["total"]]
    res["nfe"] = [r.get("nfe", float("nan")) for r in rows]
    res["peak_gib"] = peak
    return res


@contextlib.contextmanager
def warnings_quiet():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def dream_forward(plan: Plan) -> dict:
    """Seconds per forward of the rollout batch at Dream-7B's shapes (the first call is warm-up)."""
    _peak_reset(plan.device)
    lm = build_model(plan.dream, plan.device, torch.bfloat16, seed=1)
    length = 64 + plan.gen
    ids = torch.randint(0, plan.dream.vocab, (plan.group, length), device=plan.device)
    times = []
    with torch.no_grad():
        for _ in range(1 + max(plan.repeats, 2)):
            _sync(plan.device)
            t0 = time.perf_counter()
            lm.model(input_ids=ids)
            _sync(plan.device)
            times.append(time.perf_counter() - t0)
    peak = _peak_gib(plan.device)
    del lm
    times = times[1:]
    return {"forward": times, "tokens_per_s": [plan.group * length / t for t in times], "peak_gib": peak}


def _spread(values: list[float], fmt: str = "{:.3f}") -> str:
    if not values:
        return "-"
    return " / ".join(fmt.format(v) for v in (min(values), statistics.median(values), max(values)))


def estimate_gpu_seconds(plan: Plan = GPU_PLAN, tflops: float = 400.0) -> dict:
    """A flops estimate of the GPU run (not a measurement): 2 P flops per token of a forward, 6 P of forward +
    backward; each rollout step a forward of G x (64 + gen) tokens (no cache: the whole canvas); scoring and the
    update about three forwards and one backward of the batch; ``tflops`` an effective bf16 rate (about half of an
    H100's dense peak, for 1-2k-token batches). Per variant ``repeats`` steps and building the model (~5 s), one
    warm-up step in all. An upper bound for the cached variants, whose rollout steps skip most of the canvas."""
    params = plan.llada.params()
    tokens = plan.group * (64 + plan.gen)
    rollout = plan.steps * 2 * params * tokens / (tflops * 1e12)
    scoring_update = (3 * 2 + 6) * params * tokens / (tflops * 1e12)
    per_variant = plan.repeats * (rollout + scoring_update) + 5.0  # + building the model on the device
    variants = len(plan.methods) * len(plan.caches)
    per_variant += (rollout + scoring_update) / variants  # the one warm-up step, spread over the variants
    dream = 4 * 2 * plan.dream.params() * tokens / (tflops * 1e12) + 5.0
    return {"params": params, "rollout_s": rollout, "scoring_update_s": scoring_update,
            "per_variant_s": per_variant, "total_s": variants * per_variant + dream, "variants": variants}


def run(plan: Plan, smoke: bool) -> tuple[str, bool]:
    device_name = torch.cuda.get_device_name() if plan.device == "cuda" else f"CPU ({platform.processor() or 'cpu'})"
    est = estimate_gpu_seconds()
    lines = [f"## stp whole-stack acceptance ({'smoke, CPU' if smoke else 'GPU'})", "",
             f"{datetime.date.today().isoformat()}, {device_name}, torch {torch.__version__}; model "
             f"{'LLaDA-8B' if not smoke else 'tiny LLaDA-like'} shapes ({plan.llada.params() / 1e6:.1f} M parameters, "
             f"random weights, bf16, LoRA r {plan.lora_r}); rollout gen {plan.gen} / block {plan.block} / {plan.steps} "
             f"steps, G {plan.group} x 1 prompt, mu 1; {plan.repeats} measured steps per variant (min / median / "
             "max; one warm-up step before the first variant). Quality is not measured (random weights).", "",
             f"Estimate of the GPU run from flops (not measured): {est['variants']} variants x "
             f"{est['per_variant_s']:.0f} s + the Dream forward = {est['total_s'] / 60:.1f} min at an effective "
             "400 TFLOP/s (no KV cache; prefix/dual caches make rollouts cheaper).", "",
             "| method | rollout.cache | device | rollout s | scoring s | update s | step s | tokens/s (step) | "
             "NFE | peak GiB |", "|" + "---|" * 10]
    ok, warmup = True, 1
    for method in plan.methods:
        for cache in plan.caches:
            _log(f"{method}, cache {cache}")
            t0 = time.perf_counter()
            res = run_method(plan, method, cache, warmup)
            warmup = 0 if "total" in res else warmup
            _log(f"  {time.perf_counter() - t0:.1f} s")
            if "refused" in res or "error" in res:
                # a refusal is expected only for a cache the method's sampler cannot use
                ok = ok and "refused" in res and cache != "none" and "cache" in res["refused"]
                what = f"refused: {res['refused']}" if "refused" in res else f"FAILED: {res['error']}"
                lines.append(f"| {method} | {cache} | {device_name} | {what} |" + " |" * 6)
                continue
            peak = "-" if res["peak_gib"] is None else f"{res['peak_gib']:.1f}"
            lines.append(f"| {method} | {cache} | {device_name} | {_spread(res['rollout'])} | "
                         f"{_spread(res['scoring'])} | {_spread(res['update'])} | {_spread(res['total'])} | "
                         f"{_spread(res['tokens_per_s'], '{:.0f}')} | {_spread(res['nfe'], '{:.0f}')} | {peak} |")
    _log("Dream-7B forward")
    d = dream_forward(plan)
    peak = "-" if d["peak_gib"] is None else f"{d['peak_gib']:.1f}"
    lines += ["", "| forward | device | seconds | tokens/s | peak GiB |", "|---|---|---|---|---|",
              f"| {'Dream-7B' if not smoke else 'tiny Dream-like'} shapes ({plan.dream.params() / 1e6:.1f} M), "
              f"G {plan.group} x {64 + plan.gen} tokens, bf16 | "
              f"{device_name} | {_spread(d['forward'])} | {_spread(d['tokens_per_s'], '{:.0f}')} | {peak} |", ""]
    lines.append(f"Result: {'PASS' if ok else 'FAIL'}")
    return "\n".join(lines), ok


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny shapes: checks the code path")
    ap.add_argument("--out", help="also write the markdown table to this file")
    ap.add_argument("--kernels", action=argparse.BooleanOptionalAction, default=None,
                    help="also run python -m stp_kernels.acceptance first and put its tables first (default: on GPU "
                         "yes, with --smoke no: tests/test_acceptance.py runs the kernels' smoke)")
    ap.add_argument("--methods", default=None, help="comma-separated subset of " + ", ".join(METHODS))
    ap.add_argument("--caches", default=None, help="comma-separated subset of " + ", ".join(CACHES))
    args = ap.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        print("stp.acceptance: no CUDA device here; run it on a GPU, or --smoke for the CPU code path",
              file=sys.stderr)
        return 2
    plan = SMOKE_PLAN if args.smoke else GPU_PLAN
    from dataclasses import replace

    if args.methods:
        bad = [m for m in args.methods.split(",") if m not in METHODS]
        if bad:
            ap.error(f"--methods: {bad} not in {list(METHODS)}")
        plan = replace(plan, methods=tuple(args.methods.split(",")))
    if args.caches:
        bad = [c for c in args.caches.split(",") if c not in CACHES]
        if bad:
            ap.error(f"--caches: {bad} not in {list(CACHES)}")
        plan = replace(plan, caches=tuple(args.caches.split(",")))
    t0 = time.perf_counter()
    kernels_text, kernels_ok = "", True
    if args.kernels if args.kernels is not None else not args.smoke:
        from stp_kernels import acceptance as kernels

        _log("kernel acceptance (python -m stp_kernels.acceptance)")
        kernels_text, kernels_ok = kernels.run(kernels.SMOKE_PLAN if args.smoke else kernels.GPU_PLAN, args.smoke)
        kernels_text += "\n"
    text, ok = run(plan, args.smoke)
    text, ok = kernels_text + text, ok and kernels_ok
    text += f" ({time.perf_counter() - t0:.0f} s)"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
