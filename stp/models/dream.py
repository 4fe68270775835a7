"""Dream checkpoints (Dream-org/Dream-v0-Base-7B / -Instruct-7B) as a bidirectional transformers Qwen2.

Dream is Qwen2 weight for weight (same key names, q/k/v biases, untied head, embedding with ``padding_idx`` =
``pad_token_id`` so that row is never trained) run with full attention; its only twist is that logits are shifted
right by one (position i is predicted from the hidden state of i - 1, position 0 keeps its own,
`torch.cat([logits[:, :1], logits[:, :-1]], 1)`), inherited from its autoregressive initialisation. The shift is
applied in `DiffusionLM.backbone` (`shift_logits=True`). No `trust_remote_code`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .base import DiffusionLM, build_and_load, load_tokenizer, special_ids, stored_dtype, weight_files


def is_dream(config: dict) -> bool:
    archs = " ".join(str(a) for a in config.get("architectures") or []).lower()
    return str(config.get("model_type", "")).lower() == "dream" or "dream" in archs


def qwen2_config(config: dict, *, attn_implementation: str = "sdpa"):
    """Dream config.json (Qwen2 field names) -> transformers Qwen2Config."""
    from transformers import Qwen2Config

    where = "Dream config.json"
    for field in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        if field not in config:
            raise ValueError(f"{where}: missing required field {field!r}")
    if config.get("use_sliding_window"):
        raise NotImplementedError(f"{where}: use_sliding_window=True is not supported (Dream attends globally)")
    if config.get("rope_scaling"):
        raise NotImplementedError(f"{where}: rope_scaling={config['rope_scaling']!r} is not supported")
    if config.get("hidden_act", "silu") != "silu":
        raise NotImplementedError(f"{where}: hidden_act={config['hidden_act']!r}; only silu is supported")
    rope = config.get("rope_parameters") or {"rope_type": "default", "rope_theta": float(config.get("rope_theta",
                                                                                                    10000.0))}
    n_layers = int(config["num_hidden_layers"])
    # Dream builds its embedding with padding_idx = config.pad_token_id (its EOS/pad id): that row gets no gradient
    # (transformers' Qwen2 does the same with the same field), so full fine-tuning leaves it as loaded.
    pad = config.get("pad_token_id")
    if pad is not None and not (isinstance(pad, int) and 0 <= pad < int(config["vocab_size"])):
        raise ValueError(f"{where}: pad_token_id={pad!r}; allowed: None or an integer in [0, vocab_size="
                         f"{config['vocab_size']})")
    return Qwen2Config(
        vocab_size=int(config["vocab_size"]),
        hidden_size=int(config["hidden_size"]),
        intermediate_size=int(config["intermediate_size"]),
        num_hidden_layers=n_layers,
        num_attention_heads=int(config["num_attention_heads"]),
        num_key_value_heads=int(config.get("num_key_value_heads") or config["num_attention_heads"]),
        hidden_act="silu",
        max_position_embeddings=int(config.get("max_position_embeddings", 32768)),
        rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        rope_parameters=rope,
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        use_sliding_window=False,
        layer_types=["full_attention"] * n_layers,
        attention_dropout=float(config.get("attention_dropout", 0.0)),
        use_cache=False,
        pad_token_id=pad,
        attn_implementation=attn_implementation,
    )


def load_dream(directory: Path, config: dict, *, dtype: torch.dtype | None, device: torch.device,
               attn_implementation: str = "sdpa", name: str | None = None) -> DiffusionLM:
    from transformers import Qwen2ForCausalLM

    tokenizer = load_tokenizer(directory)
    mask, eos, pad = special_ids(directory, config, tokenizer)
    files = weight_files(directory)
    hf_config = qwen2_config(config, attn_implementation=attn_implementation)
    model = build_and_load(Qwen2ForCausalLM, hf_config, files, lambda k: k, dtype=dtype or stored_dtype(files),
                           device=device)
    return DiffusionLM(model, tokenizer, mask_token_id=mask, eos_token_id=eos, pad_token_id=pad, shift_logits=True,
                       name=name or directory.name, family="dream")
