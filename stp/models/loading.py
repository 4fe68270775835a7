"""``load``: a model adapter from a name ("tiny"), a local directory (LLaDA, Dream, or saved by this project) or a
Hub id. Kept apart from ``base`` so that the adapters (llada, dream, tiny) import ``base`` and this module imports
them, without a cycle."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from . import dream, llada, tiny
from .base import (
    SUPPORTED_ATTN,
    DiffusionLM,
    build_and_load,
    load_tokenizer,
    read_config,
    special_ids,
    stored_dtype,
    weight_files,
)

__all__ = ["load", "resolve_directory"]


def resolve_directory(name_or_path: str) -> Path:
    """A local directory as is; otherwise a Hugging Face Hub id fetched (or found in the cache) by snapshot_download."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise NotADirectoryError(f"{path}: a model is a directory (config.json + safetensors), not a file")
    looks_local = name_or_path.startswith(("/", "./", "../", "~")) or name_or_path.count("/") > 1
    if looks_local:
        raise FileNotFoundError(f"{name_or_path}: no such directory")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name_or_path, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model",
                                                                    "*.jinja"]))
    except Exception as e:  # noqa: BLE001 - any hub failure becomes one clear message
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        raise OSError(f"{name_or_path!r} is not a local directory and could not be fetched from the Hugging Face Hub"
                      f"{' (HF_HUB_OFFLINE is set)' if offline else ''}: {type(e).__name__}: {e}. Download it "
                      f"where there is network access and pass the local directory instead.") from e


def load(name_or_path: str, *, dtype: torch.dtype | None = None, device: torch.device | str | None = None,
         attn_implementation: str = "sdpa") -> DiffusionLM:
    """Load a masked diffusion LM.

    `name_or_path`: "tiny" (the embedded tiny model, seed 0), a local directory (LLaDA, Dream, or a directory this
    project saved), or a Hub id. "pretrained:TASK" (the tiny model after `python -m stp.pretrain --task TASK`) is
    resolved above this layer: ``stp.pretrain.load_model`` (or ``resolve_model_name``) builds it on first use.
    `dtype`: None keeps the checkpoint's stored dtype (float32 for "tiny").
    `device`: None = CPU. `attn_implementation`: "sdpa" (default) or "eager".
    """
    if name_or_path.startswith("pretrained:"):
        raise ValueError(f"{name_or_path!r} names a checkpoint that stp.pretrain builds and caches: load it with "
                         f"stp.pretrain.load_model({name_or_path!r}) (or pass stp.pretrain.resolve_model_name's "
                         f"directory here); the command-line tools do this")

    if attn_implementation not in SUPPORTED_ATTN:
        raise ValueError(f"attn_implementation={attn_implementation!r}; allowed: {SUPPORTED_ATTN}")
    device = torch.device(device) if device is not None else torch.device("cpu")
    if name_or_path == "tiny":
        model = tiny.build_tiny(seed=0, attn_implementation=attn_implementation)
        return model.to(device=device, dtype=dtype) if dtype is not None else model.to(device=device)
    directory = resolve_directory(name_or_path)
    config = read_config(directory)
    model_type = str(config.get("model_type", ""))
    architectures = [str(a) for a in config.get("architectures") or []]
    if llada.is_llada(config):
        loader = llada.load_llada
    elif dream.is_dream(config):
        loader = dream.load_dream
    elif model_type in ("llama", "qwen2"):
        loader = _load_saved
    else:
        raise ValueError(f"{directory / 'config.json'}: unknown model layout (model_type={model_type!r}, "
                         f"architectures={architectures}); supported: LLaDA (model_type 'llada', d_model/n_layers), "
                         f"Dream (model_type 'Dream'), and transformers 'llama'/'qwen2' directories saved by stp")
    return loader(directory, config, dtype=dtype, device=device, attn_implementation=attn_implementation,
                  name=name_or_path if not Path(name_or_path).expanduser().is_dir() else directory.name)


def _load_saved(directory: Path, config: dict, *, dtype, device, attn_implementation: str, name: str) -> DiffusionLM:
    """A transformers Llama/Qwen2 `save_pretrained` directory with the mask token in its config (written by `save`)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    tokenizer = load_tokenizer(directory)
    mask, eos, pad = special_ids(directory, config, tokenizer)
    files = weight_files(directory)
    config_cls, model_cls = ((LlamaConfig, LlamaForCausalLM) if config["model_type"] == "llama"
                             else (Qwen2Config, Qwen2ForCausalLM))
    hf_config = config_cls.from_pretrained(str(directory), attn_implementation=attn_implementation)
    model = build_and_load(model_cls, hf_config, files, lambda k: k, dtype=dtype or stored_dtype(files),
                           device=device)
    return DiffusionLM(model, tokenizer, mask_token_id=mask, eos_token_id=eos, pad_token_id=pad,
                       shift_logits=bool(config.get("stp_shift_logits", False)),
                       name=str(config.get("stp_name", name)), family=str(config.get("stp_family", "custom")))
