"""Helpers shared by the decoding tests (sampler, KV cache, trajectory record, dTRPO)."""

from __future__ import annotations

import torch


def random_prompts(model, lengths, seed=0):
    """Left-padded random prompts of the given lengths (token ids that are not special) and their padding mask."""
    gen = torch.Generator().manual_seed(seed)
    special = {model.mask_token_id, model.eos_token_id, model.pad_token_id}
    allowed = torch.tensor([t for t in range(model.vocab_size) if t not in special])
    width = max(lengths)
    ids = torch.full((len(lengths), width), model.pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for b, n in enumerate(lengths):
        ids[b, width - n:] = allowed[torch.randint(0, allowed.numel(), (n,), generator=gen)]
        mask[b, width - n:] = 1
    return ids, mask


def vocab_without_mask(model):
    """A vocabulary prior without [MASK]: an untrained model may sample [MASK] itself, which (as in LLaDA's
    algorithm) leaves the position masked and re-decoded later; tests of counts, caches and block windows exclude it."""
    ids = torch.arange(model.vocab_size)
    return ids[ids != model.mask_token_id]


class Recording:
    """The model with the canvas of every backbone call recorded (the states the decoder saw)."""

    def __init__(self, model):
        self._model = model
        self.calls: list[torch.Tensor] = []

    def __getattr__(self, name):
        return getattr(self._model, name)

    def backbone(self, x, attn=None):
        self.calls.append(x.clone())
        return self._model.backbone(x, attn)
