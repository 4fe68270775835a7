"""Bit-identity of ``stp.sampler.generate`` across a change: a grid of decoding options run with fixed seeds.

``python -m benchmarks.compare_decoding --save FILE`` runs the grid and saves every output tensor (completions,
commit steps, NFE, one-shot fills, forward passes, behaviour log-probs) to FILE; ``--check FILE`` runs it again and
reports, per case, whether every tensor is bit for bit equal to the saved one (exit status 1 otherwise).

The grid: the randomly initialised tiny model (2 layers) and micro LLaDA- and Dream-layout checkpoints (2 layers),
each with LLaDA's fixed-k low-confidence and random remasking, the confidence threshold, the entropy bound (a float
and a per-sample tensor), Dream's four algorithms (with top_k / top_p), anchors of a prior, temporal pruning,
classifier-free guidance, left padding, a vocabulary prior, greedy and sampled draws, each KV-cache mode. The models
are untrained, so without a vocabulary prior they sometimes draw [MASK] itself (``--no-mask-vocab`` restricts every
case to a vocabulary without it, where the committed-[MASK] rule plays no part). A few seconds per model on one core.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
from pathlib import Path

import torch

from stp.decoding import DreamDecoding
from stp.models import build_tiny, load
from stp.sampler import Prior, generate

_FIELDS = ("completions", "commit_step", "nfe", "one_shot", "behaviour_logprobs")


def models(tmp: Path) -> dict:
    from tests._models_reference import DREAM_CONFIG, LLADA_CONFIG, dream_weights, llada_weights, write_checkpoint
    out = {"tiny": build_tiny(seed=3, num_hidden_layers=2)}
    out["llada"] = load(str(write_checkpoint(tmp / "llada", dict(LLADA_CONFIG), llada_weights(dict(LLADA_CONFIG), 5))))
    out["dream"] = load(str(write_checkpoint(tmp / "dream", dict(DREAM_CONFIG), dream_weights(dict(DREAM_CONFIG), 7))))
    for m in out.values():
        m.eval()
    return out


def _prompts(model, batch: int, seed: int, padded: bool):
    gen = torch.Generator().manual_seed(seed)
    special = {model.mask_token_id, model.eos_token_id, model.pad_token_id}
    allowed = torch.tensor([t for t in range(min(model.vocab_size, 90)) if t not in special])
    lengths = [5, 3, 5, 2][:batch] if padded else [5] * batch
    ids = torch.full((batch, 5), model.pad_token_id, dtype=torch.long)
    mask = torch.zeros(batch, 5, dtype=torch.long)
    for b, n in enumerate(lengths):
        ids[b, 5 - n:] = allowed[torch.randint(0, allowed.numel(), (n,), generator=gen)]
        mask[b, 5 - n:] = 1
    return ids, (mask if padded else None)


def _prior(model, batch: int, gen_length: int, seed: int) -> Prior:
    gen = torch.Generator().manual_seed(seed + 1)
    tokens = torch.randint(10, 80, (batch, gen_length), generator=gen)
    tokens[tokens == model.mask_token_id] = 10
    return Prior(tokens=tokens, mask=torch.rand(batch, gen_length, generator=gen) < 0.25)


def decoders() -> list[tuple[str, dict]]:
    return [
        ("fixed_k", {}),
        ("random", {"remasking": "random"}),
        ("threshold", {"confidence_threshold": 0.05}),
        ("eb", {"entropy_bound": 1.5}),
        ("eb_tensor", {"entropy_bound": torch.tensor([0.0, 0.5, 3.0, 40.0])}),
        ("dream_entropy", {"dream": DreamDecoding(alg="entropy")}),
        ("dream_origin", {"dream": DreamDecoding(alg="origin")}),
        ("dream_maskgit", {"dream": DreamDecoding(alg="maskgit_plus", top_k=20)}),
        ("dream_margin", {"dream": DreamDecoding(alg="topk_margin", top_p=0.9)}),
    ]


def grid(no_mask_vocab: bool = False):
    """(name, model key, kwargs) of every case."""
    for mkey, (dname, dkw), cache, (tname, temp) in itertools.product(
            ("tiny", "llada", "dream"), decoders(), ("none", "prefix", "dual"), (("t0", 0.0), ("t09", 0.9))):
        extras = [("plain", {}), ("prior_es", {"prior": True, "early_stop": 0.7}),
                  ("pad_cfg_vocab", {"padded": True, "cfg_scale": 1.5, "vocab": True})]
        if mkey != "tiny":  # the micro checkpoints: fewer combinations
            extras = extras[1:2] if cache != "none" or temp else extras[:2]
        for ename, ekw in extras:
            yield f"{mkey}/{dname}/{cache}/{tname}/{ename}", mkey, dict(dkw, cache=cache, temperature=temp, **ekw,
                                                                      no_mask_vocab=no_mask_vocab)


def run_case(model, kw: dict) -> dict:
    kw = dict(kw)
    batch, gen_length = 4, 16
    ids, mask = _prompts(model, batch, 0, kw.pop("padded", False))
    if kw.pop("prior", False):
        kw["prior"] = _prior(model, batch, gen_length, 0)
    vocab = None
    if kw.pop("vocab", False):
        vocab = torch.arange(0, 60)
        vocab = vocab[vocab != model.mask_token_id]
    if kw.pop("no_mask_vocab", False) and vocab is None:
        vocab = torch.arange(model.vocab_size)
        vocab = vocab[vocab != model.mask_token_id]
    out = generate(model, ids, attention_mask=mask, gen_length=gen_length, block_length=8, steps=8, seed=11,
                   record_logprobs=True, vocab=vocab, **kw)
    res = {f: getattr(out, f).clone() for f in _FIELDS}
    res["forward_passes"] = torch.tensor(out.forward_passes)
    return res


def run_grid(no_mask_vocab: bool = False) -> dict:
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        ms = models(Path(tmp))
        return {name: run_case(ms[mkey], kw) for name, mkey, kw in grid(no_mask_vocab)}


def compare(got: dict, ref: dict) -> list[str]:
    bad = []
    for name in ref:
        if name not in got:
            bad.append(f"{name}: missing")
            continue
        diff = [k for k in ref[name] if not torch.equal(got[name][k], ref[name][k])]
        if diff:
            bad.append(f"{name}: {', '.join(diff)} differ")
    return bad


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--save", help="run the grid and save its outputs here")
    g.add_argument("--check", help="run the grid and compare with the outputs saved here")
    p.add_argument("--no-mask-vocab", action="store_true", help="decode every case without [MASK] in the vocabulary")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    got = run_grid(args.no_mask_vocab)
    if args.save:
        torch.save(got, args.save)
        print(f"saved {len(got)} cases to {args.save}")
        return 0
    bad = compare(got, torch.load(args.check))
    print(f"{len(got) - len(bad)} of {len(got)} cases bit-identical")
    for line in bad:
        print("  " + line)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
