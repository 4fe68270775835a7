"""LLaDA checkpoints (GSAI-ML/LLaDA-8B-Base / -Instruct and same-layout models) as a bidirectional transformers Llama.

LLaDA's modeling code is OLMo-derived remote code that does not load on transformers 5. Its "llama" block is, weight
for weight, a Llama decoder layer (docs/method.md section 0), so the checkpoint is renamed one to one into
`LlamaForCausalLM` and run with bidirectional attention (see `base.py`). No `trust_remote_code`.

Options of LLaDA's config that Llama cannot express (ALiBi, q/k layer norms, logit scaling, ...) are refused by name
rather than silently ignored.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from .base import DiffusionLM, build_and_load, load_tokenizer, special_ids, stored_dtype, weight_files

# LLaDA block sub-module -> Llama decoder-layer sub-module.
_BLOCK_MAP = {
    "q_proj": "self_attn.q_proj",
    "k_proj": "self_attn.k_proj",
    "v_proj": "self_attn.v_proj",
    "attn_out": "self_attn.o_proj",
    "ff_proj": "mlp.gate_proj",
    "up_proj": "mlp.up_proj",
    "ff_out": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ff_norm": "post_attention_layernorm",
}
_TOP_MAP = {
    "transformer.wte.weight": "model.embed_tokens.weight",
    "transformer.ln_f.weight": "model.norm.weight",
    "transformer.ff_out.weight": "lm_head.weight",
}
_BLOCK_RE = re.compile(r"transformer\.blocks\.(\d+)\.(\w+)\.(weight|bias)")

# Config fields that must hold these values (when present) for the Llama mapping to be exact.
_REQUIRED = {
    "alibi": False,
    "rope": True,
    "attention_layer_norm": False,
    "scale_logits": False,
    "input_emb_norm": False,
    "clip_qkv": None,
}


def is_llada(config: dict) -> bool:
    archs = " ".join(str(a) for a in config.get("architectures") or []).lower()
    return str(config.get("model_type", "")).lower() == "llada" or "llada" in archs or (
        "d_model" in config and "n_layers" in config)


def llada_key(key: str) -> str:
    """LLaDA checkpoint key -> LlamaForCausalLM parameter name."""
    k = key.removeprefix("model.")
    if k in _TOP_MAP:
        return _TOP_MAP[k]
    m = _BLOCK_RE.fullmatch(k)
    if m is None or m.group(2) not in _BLOCK_MAP:
        raise ValueError(f"unexpected tensor {key!r} in a LLaDA checkpoint (known: wte, ln_f, ff_out and blocks.N."
                         f"{{{','.join(_BLOCK_MAP)}}})")
    return f"model.layers.{m.group(1)}.{_BLOCK_MAP[m.group(2)]}.{m.group(3)}"


_TOP_INVERSE = {v: k for k, v in _TOP_MAP.items()}
_BLOCK_INVERSE = {v: k for k, v in _BLOCK_MAP.items()}
_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(\w+(?:\.\w+)?)\.(weight|bias)")


def llada_name(name: str, *, prefix: str = "model.") -> str:
    """LlamaForCausalLM parameter name -> LLaDA checkpoint key (the inverse of `llada_key`; `prefix` is what the
    checkpoint puts before ``transformer.``: ``model.`` in GSAI-ML's releases)."""
    if name in _TOP_INVERSE:
        return prefix + _TOP_INVERSE[name]
    m = _LAYER_RE.fullmatch(name)
    if m is None or m.group(2) not in _BLOCK_INVERSE:
        raise ValueError(f"parameter {name!r} has no place in a LLaDA checkpoint (known: embed_tokens, norm, lm_head "
                         f"and layers.N.{{{','.join(_BLOCK_INVERSE)}}})")
    return f"{prefix}transformer.blocks.{m.group(1)}.{_BLOCK_INVERSE[m.group(2)]}.{m.group(3)}"


def llama_config(config: dict, *, attn_implementation: str = "sdpa"):
    """LLaDA config.json (its own field names) -> transformers LlamaConfig."""
    from transformers import LlamaConfig

    where = "LLaDA config.json"
    for field, value in _REQUIRED.items():
        if field in config and config[field] != value:
            raise NotImplementedError(f"{where}: {field}={config[field]!r} is not supported (need {value!r})")
    if config.get("block_type", "llama") != "llama":
        raise NotImplementedError(f"{where}: block_type={config['block_type']!r}; only 'llama' blocks are supported")
    if config.get("layer_norm_type", "rms") != "rms":
        raise NotImplementedError(f"{where}: layer_norm_type={config['layer_norm_type']!r}; only 'rms' is supported")
    if config.get("activation_type", "silu") not in ("silu", "swiglu"):
        raise NotImplementedError(f"{where}: activation_type={config['activation_type']!r}; only silu is supported")
    if config.get("bias_for_layer_norm"):
        raise NotImplementedError(f"{where}: bias_for_layer_norm=True is not supported (Llama RMSNorm has no bias)")
    for field in ("d_model", "n_layers", "n_heads"):
        if field not in config:
            raise ValueError(f"{where}: missing required field {field!r}")
    d_model, n_heads = int(config["d_model"]), int(config["n_heads"])
    if config.get("multi_query_attention"):
        n_kv = 1
    else:
        n_kv = int(config.get("n_kv_heads") or n_heads)
    mlp = config.get("mlp_hidden_size") or int(config.get("mlp_ratio", 4)) * d_model
    vocab = config.get("embedding_size") or config.get("vocab_size")
    if vocab is None:
        raise ValueError(f"{where}: missing 'embedding_size' and 'vocab_size'")
    include_bias = bool(config.get("include_bias", False))
    qkv_bias = include_bias or bool(config.get("include_qkv_bias", False))
    return LlamaConfig(
        vocab_size=int(vocab),  # embedding_size rows (>= vocab_size: LLaDA pads the table)
        hidden_size=d_model,
        intermediate_size=int(mlp),
        num_hidden_layers=int(config["n_layers"]),
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv,
        hidden_act="silu",
        max_position_embeddings=int(config.get("max_sequence_length", 4096)),
        rms_norm_eps=float(config.get("rms_norm_eps", 1e-5)),
        rope_parameters={"rope_type": "default", "rope_theta": float(config.get("rope_theta", 10000.0))},
        attention_bias=qkv_bias,
        mlp_bias=include_bias,
        tie_word_embeddings=bool(config.get("weight_tying", False)),
        use_cache=False,
        bos_token_id=None,
        attn_implementation=attn_implementation,
    )


def load_llada(directory: Path, config: dict, *, dtype: torch.dtype | None, device: torch.device,
               attn_implementation: str = "sdpa", name: str | None = None) -> DiffusionLM:
    from transformers import LlamaForCausalLM

    tokenizer = load_tokenizer(directory)
    mask, eos, pad = special_ids(directory, config, tokenizer)
    files = weight_files(directory)
    hf_config = llama_config(config, attn_implementation=attn_implementation)
    # include_qkv_bias without include_bias: LLaDA has no output-projection bias, Llama's attention_bias adds one.
    zero_fill = (r"model\.layers\.\d+\.self_attn\.o_proj\.bias",) if hf_config.attention_bias else ()
    model = build_and_load(LlamaForCausalLM, hf_config, files, llada_key, dtype=dtype or stored_dtype(files),
                           device=device, zero_fill=zero_fill)
    return DiffusionLM(model, tokenizer, mask_token_id=mask, eos_token_id=eos, pad_token_id=pad, shift_logits=False,
                       name=name or directory.name, family="llada")
