"""Test helpers for stp.models: random checkpoints in LLaDA's and Dream's on-disk layouts, and an independent float64
forward written straight from the architecture (not from transformers), reading the checkpoint's own key names."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

LLADA_CONFIG = dict(
    model_type="llada", architectures=["LLaDAModelLM"], block_type="llama", activation_type="silu",
    layer_norm_type="rms", alibi=False, rope=True, weight_tying=False, include_bias=False,
    d_model=48, n_layers=2, n_heads=6, n_kv_heads=2, mlp_hidden_size=80, mlp_ratio=4,
    vocab_size=90, embedding_size=96, rope_theta=500000.0, rms_norm_eps=1e-5, max_sequence_length=256,
    mask_token_id=95, eos_token_id=94, pad_token_id=94,
)

DREAM_CONFIG = dict(
    model_type="Dream", architectures=["DreamModel"], hidden_act="silu", hidden_size=48, intermediate_size=80,
    num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2, vocab_size=96, rope_theta=10000.0,
    rms_norm_eps=1e-6, max_position_embeddings=256, tie_word_embeddings=False, use_sliding_window=False,
    mask_token_id=95, eos_token_id=94, pad_token_id=93, bos_token_id=93,
)


def _randn(g: torch.Generator, *shape: int, std: float = 0.15) -> torch.Tensor:
    return torch.randn(*shape, generator=g) * std


def _norm(g: torch.Generator, n: int) -> torch.Tensor:
    return 1.0 + 0.1 * torch.randn(n, generator=g)


def llada_weights(cfg: dict, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    d, h, kv, f, v = cfg["d_model"], cfg["n_heads"], cfg["n_kv_heads"], cfg["mlp_hidden_size"], cfg["embedding_size"]
    hd = d // h
    w = {"model.transformer.wte.weight": _randn(g, v, d, std=1.0),
         "model.transformer.ln_f.weight": _norm(g, d),
         "model.transformer.ff_out.weight": _randn(g, v, d)}
    for i in range(cfg["n_layers"]):
        p = f"model.transformer.blocks.{i}."
        w |= {p + "q_proj.weight": _randn(g, h * hd, d), p + "k_proj.weight": _randn(g, kv * hd, d),
              p + "v_proj.weight": _randn(g, kv * hd, d), p + "attn_out.weight": _randn(g, d, h * hd),
              p + "ff_proj.weight": _randn(g, f, d), p + "up_proj.weight": _randn(g, f, d),
              p + "ff_out.weight": _randn(g, d, f), p + "attn_norm.weight": _norm(g, d),
              p + "ff_norm.weight": _norm(g, d)}
    return w


def dream_weights(cfg: dict, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    d, h, kv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    f, v = cfg["intermediate_size"], cfg["vocab_size"]
    hd = d // h
    w = {"model.embed_tokens.weight": _randn(g, v, d, std=1.0), "model.norm.weight": _norm(g, d),
         "lm_head.weight": _randn(g, v, d)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w |= {p + "self_attn.q_proj.weight": _randn(g, h * hd, d), p + "self_attn.q_proj.bias": _randn(g, h * hd),
              p + "self_attn.k_proj.weight": _randn(g, kv * hd, d), p + "self_attn.k_proj.bias": _randn(g, kv * hd),
              p + "self_attn.v_proj.weight": _randn(g, kv * hd, d), p + "self_attn.v_proj.bias": _randn(g, kv * hd),
              p + "self_attn.o_proj.weight": _randn(g, d, h * hd),
              p + "mlp.gate_proj.weight": _randn(g, f, d), p + "mlp.up_proj.weight": _randn(g, f, d),
              p + "mlp.down_proj.weight": _randn(g, d, f),
              p + "input_layernorm.weight": _norm(g, d), p + "post_attention_layernorm.weight": _norm(g, d)}
    return w


def write_checkpoint(directory: Path, config: dict, weights: dict[str, torch.Tensor], *, shards: int = 1) -> Path:
    """config.json + model.safetensors, or `shards` files named by model.safetensors.index.json."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    if shards == 1:
        save_file(weights, str(directory / "model.safetensors"))
        return directory
    keys = list(weights)
    weight_map = {}
    for s in range(shards):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: weights[k].contiguous() for k in keys[s::shards]}
        save_file(part, str(directory / name))
        weight_map |= dict.fromkeys(part, name)
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return directory


# --------------------------------------------------------------------------------------------------------------------
# Reference forward (float64): RMSNorm, rotate-half RoPE, grouped-query full (bidirectional) softmax attention, SwiGLU


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """x [B, heads, L, hd] at positions 0..L-1; pairs (j, j + hd/2) rotate by angle pos * theta^(-2j/hd)."""
    hd, length = x.shape[-1], x.shape[-2]
    inv = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    ang = torch.arange(length, dtype=torch.float64)[:, None] * inv[None]  # [L, hd/2]
    cos, sin = torch.cat([ang.cos(), ang.cos()], -1), torch.cat([ang.sin(), ang.sin()], -1)
    x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def reference_logits(w: dict[str, torch.Tensor], *, layout: str, cfg: dict, ids: torch.Tensor) -> torch.Tensor:
    """ids [B, L] -> logits [B, L, V] in float64, reading `w` under the checkpoint's own key names."""
    w = {k: t.double() for k, t in w.items()}
    if layout == "llada":
        d, h, kv, n = cfg["d_model"], cfg["n_heads"], cfg["n_kv_heads"], cfg["n_layers"]
        eps, theta = cfg["rms_norm_eps"], cfg["rope_theta"]
        emb, final_norm, head = "model.transformer.wte.weight", "model.transformer.ln_f.weight", \
            "model.transformer.ff_out.weight"
        names = dict(q="q_proj", k="k_proj", v="v_proj", o="attn_out", gate="ff_proj", up="up_proj", down="ff_out",
                     n1="attn_norm", n2="ff_norm")
        prefix = "model.transformer.blocks.{}."
    else:
        d, h, kv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
        n, eps, theta = cfg["num_hidden_layers"], cfg["rms_norm_eps"], cfg["rope_theta"]
        emb, final_norm, head = "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"
        names = dict(q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj", o="self_attn.o_proj",
                     gate="mlp.gate_proj", up="mlp.up_proj", down="mlp.down_proj", n1="input_layernorm",
                     n2="post_attention_layernorm")
        prefix = "model.layers.{}."
    hd = d // h
    bsz, length = ids.shape

    def lin(x, name):
        y = x @ w[name + ".weight"].T
        return y + w[name + ".bias"] if name + ".bias" in w else y

    x = w[emb][ids]
    for i in range(n):
        p = prefix.format(i)
        a = _rms(x, w[p + names["n1"] + ".weight"], eps)
        q = lin(a, p + names["q"]).view(bsz, length, h, hd).transpose(1, 2)
        k = lin(a, p + names["k"]).view(bsz, length, kv, hd).transpose(1, 2)
        v = lin(a, p + names["v"]).view(bsz, length, kv, hd).transpose(1, 2)
        q, k = _rope(q, theta), _rope(k, theta)
        k, v = k.repeat_interleave(h // kv, dim=1), v.repeat_interleave(h // kv, dim=1)  # head j uses kv j // (h/kv)
        att = torch.softmax(q @ k.transpose(-1, -2) / hd**0.5, dim=-1)  # no causal mask
        o = (att @ v).transpose(1, 2).reshape(bsz, length, h * hd)
        x = x + lin(o, p + names["o"])
        m = _rms(x, w[p + names["n2"] + ".weight"], eps)
        x = x + lin(torch.nn.functional.silu(lin(m, p + names["gate"])) * lin(m, p + names["up"]), p + names["down"])
    logits = _rms(x, w[final_norm], eps) @ w[head].T
    if layout == "dream":
        logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
    return logits
