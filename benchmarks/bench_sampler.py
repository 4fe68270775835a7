"""Rollout sampler: tokens/s and forward passes (NFE) per sample for plain decoding, spatial pruning (anchors),
temporal pruning (early stop + one-shot fill) and both; and ``sample_step`` against LLaDA's naive float64 path.

    pytest benchmarks/bench_sampler.py --benchmark-only

CPU: the embedded tiny model (random weights), 6 prompts of 32 tokens, the paper's rollout settings (gen length 256,
block 32, 128 steps, T 0.9, tau 0.95), anchors at 5% of the canvas (1 - rho with rho = 0.95) taken from a sample the
model generated. GPU: the same at LLaDA-8B's shape with random bf16 weights. Timings synchronise the device.
"""

from __future__ import annotations

import pytest
import torch

from stp.sampler import Prior, generate
from stp_kernels import available_backends, sample_step

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ROLLOUT = dict(gen_length=256, block_length=32, steps=128, temperature=0.9)
MODES = {
    "plain": dict(),
    "spatial": dict(spatial=True),
    "temporal": dict(early_stop=0.95),
    "spatial+temporal": dict(spatial=True, early_stop=0.95),
}
_cache: dict = {}


def _model():
    if "model" not in _cache:
        if DEVICE == "cuda":
            from transformers import LlamaConfig, LlamaForCausalLM

            from stp.models.base import DiffusionLM, make_bidirectional

            config = LlamaConfig(hidden_size=4096, intermediate_size=12288, num_hidden_layers=32,
                                 num_attention_heads=32, num_key_value_heads=32, vocab_size=126464,
                                 rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False)
            with torch.device("cuda"):
                inner = LlamaForCausalLM(config).to(torch.bfloat16)
            make_bidirectional(inner)
            model = DiffusionLM(inner, None, mask_token_id=126336, eos_token_id=126081, pad_token_id=126081,
                                shift_logits=False, name="llada-8b-shape-random")
        else:
            from stp.models import load

            model = load("tiny")
        model.eval()
        gen = torch.Generator().manual_seed(0)
        prompts = torch.randint(10, model.vocab_size - 10, (6, 32), generator=gen).to(DEVICE)
        first = generate(model, prompts, seed=1, **ROLLOUT)
        anchor = torch.rand(6, ROLLOUT["gen_length"], generator=gen).to(DEVICE) < 0.05
        _cache["model"] = (model, prompts, Prior(tokens=first.completions, mask=anchor))
    return _cache["model"]


@pytest.mark.parametrize("mode", list(MODES))
def test_rollout(benchmark, record, mode):
    model, prompts, prior = _model()
    opts = dict(MODES[mode])
    kw = dict(ROLLOUT, early_stop=opts.get("early_stop"), prior=prior if opts.get("spatial") else None)
    sync = torch.cuda.synchronize if DEVICE == "cuda" else (lambda: None)
    outs = []

    def run():
        outs.append(generate(model, prompts, seed=7, **kw))
        sync()

    benchmark.group = f"rollout {ROLLOUT} batch 6 ({DEVICE}, {model.name})"
    benchmark.pedantic(run, rounds=3 if DEVICE == "cpu" else 5, warmup_rounds=1)
    out = outs[-1]
    median = benchmark.stats.stats.median
    tokens = prompts.shape[0] * ROLLOUT["gen_length"]
    row = {"median ms": median * 1e3, "tokens/s": tokens / median, "NFE/sample": out.nfe.float().mean().item(),
           "one-shot tokens/sample": out.num_one_shot.float().mean().item(),
           "anchors/sample": out.anchors_kept.float().mean().item()}
    benchmark.extra_info.update(row)
    record(group=benchmark.group, variant=mode, base="plain", **row)


def _naive_step(h, w, temperature, gen):
    """LLaDA's per-step path: full float64 logits, float64 Gumbel noise, float64 softmax, gather."""
    logits = (h @ w.T).double()
    noise = torch.rand(logits.shape, dtype=torch.float64, device=h.device, generator=gen)
    x0 = (logits.exp() / (-torch.log(noise)) ** temperature).argmax(-1)
    return x0, torch.softmax(logits, -1).gather(1, x0[:, None])[:, 0]


STEP_SHAPE = (1536, 4096, 126464, torch.bfloat16) if DEVICE == "cuda" else (192, 256, 32768, torch.float32)
STEP_VARIANTS = ["naive_float64"] + [f"stp_{b}" for b in available_backends(DEVICE, op="sample_step")
                                     if b != "torch" and not (b == "triton" and DEVICE == "cpu")]


@pytest.mark.parametrize("variant", STEP_VARIANTS)
def test_sample_step(benchmark, record, variant):
    rows, hidden, vocab, dtype = STEP_SHAPE
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    h = torch.randn(rows, hidden, device=DEVICE, generator=gen).to(dtype)
    w = (torch.randn(vocab, hidden, device=DEVICE, generator=gen) * (4.0 / hidden**0.5)).to(dtype)
    sync = torch.cuda.synchronize if DEVICE == "cuda" else (lambda: None)
    if variant == "naive_float64":
        fn = lambda: _naive_step(h, w, 0.9, gen)  # noqa: E731
    else:
        fn = lambda: sample_step(h, w, seed=1, step=0, temperature=0.9, backend=variant[4:])  # noqa: E731

    def run():
        fn()
        sync()

    benchmark.group = f"sample_step R={rows} H={hidden} V={vocab} {str(dtype)[6:]} ({DEVICE})"
    benchmark.pedantic(run, rounds=5 if DEVICE == "cpu" else 20, warmup_rounds=2)
    record(group=benchmark.group, variant=variant, base="naive_float64",
           **{"median ms": benchmark.stats.stats.median * 1e3})
