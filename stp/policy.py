"""The trained policy: the model (``pretrained:TASK`` resolved here, above the model layer), an optional 4-bit base,
the LoRA adapter (the reference policy = the adapter disabled), and the loss as a module for DDP."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import torch
from torch import nn

from stp.seeds import derive_seed

if TYPE_CHECKING:
    from stp.config import TrainConfig
    from stp.loss import RolloutBatch

__all__ = ["resolve_model", "quantize_base_4bit", "add_lora", "setup_trainable", "PolicyLoss", "quiet_known_warnings"]


def resolve_model(cfg: TrainConfig, accelerator) -> str:
    """``pretrained:TASK`` (the tiny model after ``stp.pretrain``'s SFT): built into the cache by the main process
    first, so that concurrent processes never build it twice; returns the name ``stp.models.load`` takes."""
    name = cfg.model.name_or_path
    if name.startswith("pretrained:"):
        from stp.pretrain import resolve_model_name

        with accelerator.main_process_first():
            name = resolve_model_name(name, progress=accelerator.is_main_process)
    return name


def quantize_base_4bit(lm, compute_dtype: torch.dtype) -> None:
    """Replace the decoder's nn.Linear layers by bitsandbytes NF4 layers (CUDA only; the LM head stays dense for
    the fused log-prob op). check_environment() has already refused machines without CUDA or bitsandbytes."""
    import bitsandbytes as bnb

    decoder = lm.model.get_decoder()
    for module in list(decoder.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=compute_dtype, quant_type="nf4")
                q.weight = bnb.nn.Params4bit(child.weight.data.cpu(), requires_grad=False, quant_type="nf4")
                if child.bias is not None:
                    q.bias = nn.Parameter(child.bias.data.cpu(), requires_grad=False)
                setattr(module, child_name, q.cuda())


def add_lora(lm, cfg: TrainConfig) -> None:
    from peft import LoraConfig, get_peft_model

    m = cfg.model
    lora = LoraConfig(r=m.lora_r, lora_alpha=m.lora_alpha, lora_dropout=m.lora_dropout,
                      target_modules=list(m.lora_target_modules), bias="none")
    # LoRA A is initialised from torch's global RNG: seed it from the config, leave the caller's state untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(cfg.run.seed, "lora-init"))
        lm.model = get_peft_model(lm.model, lora)


class PolicyLoss(nn.Module):
    """The method's loss of one inner iteration as a module, so that ``accelerator.prepare`` can wrap it (DDP) and
    gradients are synchronised by the wrapper's own forward/backward hooks."""

    def __init__(self, lm, method):
        super().__init__()
        self.lm = lm
        self.method = method
        # The method's own trainable modules (none for GRPO): registered here so the wrapper syncs their gradients.
        self.method_modules = nn.ModuleDict(method.trainable_modules())

    def forward(self, batch: RolloutBatch, scores: Mapping[str, torch.Tensor], *, seed: int, iteration: int):
        return self.method.loss(self.lm, batch, scores, seed=seed, iteration=iteration)


def setup_trainable(lm, cfg: TrainConfig, dtype: torch.dtype | None, device) -> Callable | None:
    """Make ``lm`` trainable as configured (4-bit base, LoRA adapter or every weight, gradient checkpointing) on
    ``device``; returns the context that switches it to the reference policy (peft's ``disable_adapter``), or None
    when there is no reference (beta = 0, or full fine-tuning)."""
    m = cfg.model
    if m.load_in_4bit:
        quantize_base_4bit(lm, dtype or torch.bfloat16)
    if m.use_lora:
        add_lora(lm, cfg)
    else:
        lm.model.requires_grad_(True)
    if m.gradient_checkpointing:
        lm.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if m.use_lora:
            lm.model.enable_input_require_grads()
    lm.to(device)
    return lm.model.disable_adapter if (m.use_lora and cfg.grpo.beta > 0) else None


def quiet_known_warnings() -> None:
    """Silence the one warning every command printed that says nothing to the user: transformers' FutureWarning
    about ``is_gradient_checkpointing``, raised when peft wraps a model (peft reads the deprecated name). Only that
    message: every other warning still shows."""
    import warnings

    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
