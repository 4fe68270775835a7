"""The packed K-draw estimator (one body forward, masked_logprob at scored rows) against the naive full-logits path.

    pytest benchmarks/bench_likelihood.py --benchmark-only
    python -m benchmarks.bench_likelihood --variant packed --shape llada_proportioned   # one peak-memory measurement

Both paths: estimator "stp", K = 3, score "all", forward + backward of sum(logprobs * g) with a random g, on the
same masks (``stp_kernels.noise_masks``). "naive": the B*K sequences in one batch, ``model.logits`` (full
[B*K, L, V] logits), float32 log_softmax over the vocabulary, gather, the same weights. Shapes: the embedded tiny
model (6 sequences, prompt 40 + completion 64) and a LLaDA-proportioned model (hidden 256, 4 layers, vocab 1024,
6 sequences of 200 + 256 = 456 tokens). Peak memory: fresh process, as in ``benchmarks/_memory.py``.
"""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from benchmarks._memory import cpu_step_peak_mib, peak_in_subprocess
from benchmarks._report import full

SHAPES = {"tiny": (6, 40, 64), "llada_proportioned": (6, 200, 256)}
# The quick default (`pytest benchmarks/ --benchmark-only`) times the tiny shape; --full adds the larger one.
BENCH_SHAPES = list(SHAPES) if full() else ["tiny"]
VARIANTS = ("naive", "packed")
K = 3


def make(shape: str):
    from stp.models import build_tiny

    b, p, c = SHAPES[shape]
    if shape == "tiny":
        model = build_tiny(seed=0)
    else:
        model = build_tiny(seed=0, hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                           num_key_value_heads=4, vocab_size=1024)
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(10, 100, (b, p), generator=gen)
    pam = torch.ones(b, p, dtype=torch.long)
    pam[0, : p // 4] = 0
    comp = torch.randint(10, 100, (b, c), generator=gen)
    comp[1, c // 2:] = model.eos_token_id
    g = torch.randn(b, c, generator=gen)
    return model, prompt, pam, comp, g


def step(variant: str, model, prompt, pam, comp, g):
    from stp.likelihood import per_token_logprobs, valid_lengths
    from stp_kernels import noise_masks

    def packed():
        out = per_token_logprobs(model, prompt, pam, comp, seed=1, iteration=0, num_draws=K, estimator="stp",
                                 score="all")
        (out.logprobs * g).sum().backward()

    def naive():
        b, p = prompt.shape
        c = comp.shape[1]
        lengths = valid_lengths(comp, model.eos_token_id)
        masks = noise_masks(1, 0, torch.arange(b), lengths, num_draws=K, completion_length=c)
        ids = torch.cat([prompt[:, None].expand(b, K, p), torch.where(masks, model.mask_token_id, comp[:, None])], 2)
        attn = torch.cat([pam[:, None].expand(b, K, p), torch.ones(b, K, c, dtype=torch.long)], 2)
        logits = model.logits(ids.reshape(b * K, -1), attn.reshape(b * K, -1))[:, p:]  # [B*K, C, V]
        logp = logits.float().log_softmax(-1).gather(2, comp.repeat_interleave(K, 0)[..., None])[..., 0]
        valid = torch.arange(c)[None] < lengths[:, None]
        ((logp.view(b, K, c).mean(1) * valid) * g).sum().backward()

    run = packed if variant == "packed" else naive

    def go():
        model.zero_grad(set_to_none=True)
        run()

    return go


def measure(variant: str, shape: str) -> float:
    run = step(variant, *make(shape))
    run()
    return cpu_step_peak_mib(run)


def measure_in_subprocess(variant: str, shape: str) -> float:
    return peak_in_subprocess("benchmarks.bench_likelihood", ["--variant", variant, "--shape", shape], variant)


@pytest.mark.parametrize("shape", BENCH_SHAPES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_likelihood(benchmark, record, variant, shape):
    b, p, c = SHAPES[shape]
    group = f"likelihood stp K={K} fwd+bwd {shape}: {b} seqs x ({p}+{c}) tokens (cpu)"
    benchmark.group = group
    benchmark.pedantic(step(variant, *make(shape)), rounds=5, warmup_rounds=1)
    peak = measure_in_subprocess(variant, shape)
    benchmark.extra_info.update(peak_mib=peak)
    record(group=group, variant=variant, base="naive", **{"median ms": benchmark.stats.stats.median * 1e3,
                                                          "peak MiB": peak})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", choices=VARIANTS, required=True)
    ap.add_argument("--shape", choices=list(SHAPES), required=True)
    a = ap.parse_args()
    print(json.dumps({"peak_mib": measure(a.variant, a.shape)}))


if __name__ == "__main__":
    main()
