"""`DiffusionLM`: a transformers causal-LM module run as a bidirectional masked diffusion LM (``loading.load``
builds one from a name or directory).

The trainer needs four things from a model: final hidden states (`backbone`), the LM-head weight, the mask token id
and whether logits are shifted (Dream). Everything else (sampler, likelihood estimator, fused log-prob kernels) is
written against this class.

Bidirectional attention in transformers 5.17, and why it is done this way:
- `LlamaModel.forward` / `Qwen2Model.forward` call `masking_utils.create_causal_mask`, whose
  `_preprocess_mask_arguments` returns a user-supplied 4-D mask as-is ("early exit"), so a 4-D mask we build is what
  reaches the attention function, never combined with a causal pattern.
- `integrations/sdpa_attention.py` sets `is_causal = q_len > 1 and attention_mask is None and module.is_causal`: sdpa
  only goes causal when no mask is passed AND the attention module says `is_causal=True` (its default). We set
  `is_causal = False` on every attention module and on the config (then `create_causal_mask` delegates to
  `create_bidirectional_mask`, which for no padding returns None under sdpa and an all-zero mask under eager).
- eager attention ADDS the mask to the scores, so a boolean mask would be wrong there; sdpa wants a boolean mask or
  one of the query's dtype (a float32 mask under bf16 autocast fails). So the padding mask is a boolean [B, 1, 1, L]
  key mask for sdpa and an additive (0 / finfo.min) [B, 1, 1, L] mask for eager; both broadcast over heads and
  queries (O(B*L) memory, not O(B*L^2)). Other attention backends (flash, flex) are refused: they ignore 4-D masks.
- With `attention_mask=None` we pass no mask at all (full attention; lets sdpa pick its flash kernel on GPU), which
  is bidirectional only because of the `is_causal = False` flags above; tests check it against a reference.
- Position ids are `cumsum(mask) - 1` clamped at 0, so a left-padded row sees the same RoPE angles as alone.
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

SUPPORTED_ATTN = ("sdpa", "eager")

_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def make_bidirectional(model: nn.Module) -> None:
    """Turn every causal flag off: the config's (mask creation) and each attention module's (sdpa `is_causal`)."""
    config = model.config
    config.is_causal = False
    config.use_cache = False
    for module in model.modules():
        if hasattr(module, "is_causal"):
            module.is_causal = False


class DiffusionLM(nn.Module):
    """A masked diffusion LM: bidirectional transformer + LM head, predicting the clean token at every position.

    Attributes: `model` (the transformers `LlamaForCausalLM` / `Qwen2ForCausalLM`, kept whole so peft can wrap its
    projections), `tokenizer` (or None), `mask_token_id`, `eos_token_id`, `pad_token_id`, `shift_logits` (Dream:
    position i is predicted from the hidden state of i - 1), `name`, `family` ("llada", "dream", "tiny", ...).
    """

    def __init__(self, model: nn.Module, tokenizer=None, *, mask_token_id: int, eos_token_id: int, pad_token_id: int,
                 shift_logits: bool, name: str, family: str = "custom") -> None:
        super().__init__()
        impl = getattr(model.config, "_attn_implementation", None)
        if impl not in SUPPORTED_ATTN:
            raise ValueError(f"attention implementation {impl!r} is not supported: it would ignore the 4-D padding "
                             f"mask; use one of {SUPPORTED_ATTN}")
        vocab = model.get_output_embeddings().weight.shape[0]
        for field, value in (("mask_token_id", mask_token_id), ("eos_token_id", eos_token_id),
                             ("pad_token_id", pad_token_id)):
            if not isinstance(value, int) or not 0 <= value < vocab:
                raise ValueError(f"{field}={value!r} is not a token id of this model (vocabulary size {vocab})")
        self.model = model
        self.tokenizer = tokenizer
        self.mask_token_id = int(mask_token_id)
        self.eos_token_id = int(eos_token_id)
        self.pad_token_id = int(pad_token_id)
        self.shift_logits = bool(shift_logits)
        self.name = name
        self.family = family
        make_bidirectional(model)
        # Recorded in the config so that `save` + `load` restores the same adapter without guessing.
        config = model.config
        config.mask_token_id = self.mask_token_id
        config.eos_token_id = self.eos_token_id
        config.pad_token_id = self.pad_token_id
        config.stp_shift_logits = self.shift_logits
        config.stp_name = self.name
        config.stp_family = self.family

    def _apply(self, fn, recurse: bool = True):
        # `.to(torch.bfloat16)` would also round the RoPE inverse frequencies (a float buffer) to bf16, shifting
        # angles by up to ~pos * 2^-9 rad; transformers computes them in float32, so rebuild them in float32.
        super()._apply(fn, recurse)
        for module in self.model.modules():
            inv = getattr(module, "inv_freq", None)
            if isinstance(inv, torch.Tensor) and inv.dtype != torch.float32 and hasattr(module, "config"):
                with torch.device(inv.device):
                    fresh = type(module)(config=module.config)
                module.inv_freq = fresh.inv_freq
                if hasattr(module, "original_inv_freq"):
                    module.original_inv_freq = fresh.original_inv_freq
        return self

    # ----------------------------------------------------------------------------------------------------------------
    @property
    def lm_head_weight(self) -> torch.Tensor:
        """The [V, H] LM-head weight: the live parameter (gradients and in-place updates reach the model)."""
        return self.model.get_output_embeddings().weight

    @property
    def device(self) -> torch.device:
        return self.lm_head_weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head_weight.dtype

    @property
    def vocab_size(self) -> int:
        return self.lm_head_weight.shape[0]

    def _decoder(self) -> nn.Module:
        return self.model.get_decoder()

    def _key_mask(self, attention_mask: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, L] padding mask -> (4-D [B, 1, 1, L] key mask for the attention backend, position ids [B, L])."""
        mask = attention_mask.to(torch.bool)
        position_ids = (mask.long().cumsum(-1) - 1).clamp_min(0)
        # A row of pure padding would have no key to attend to (NaN under sdpa); let it attend everywhere instead:
        # its outputs are padding outputs, which nobody reads.
        mask = mask | ~mask.any(-1, keepdim=True)
        mask = mask[:, None, None, :]
        if self.model.config._attn_implementation == "eager":
            additive = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
            return additive.masked_fill_(~mask, torch.finfo(dtype).min), position_ids
        return mask, position_ids

    def new_kv_cache(self):
        """An empty ``stp.models.kv_cache.BlockKVCache`` for ``backbone(..., kv_cache=)`` (one per batch)."""
        from .kv_cache import BlockKVCache

        return BlockKVCache(self._decoder().config.num_hidden_layers)

    def backbone(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *, kv_cache=None,
                 window: tuple[int, int] | None = None) -> torch.Tensor:
        """input_ids [B, L] (+ padding mask [B, L], 1 = real) -> final-normed hidden states [B, L, H], aligned so that
        `hidden[:, i] @ lm_head_weight.T` are the logits of position i (the Dream shift is applied here).

        With ``kv_cache`` (``new_kv_cache()``) and no ``window``: the same full forward, keeping every layer's
        keys/values in the cache (a fill). With ``window=(start, stop)``: only positions [start, stop) of
        ``input_ids`` (always the whole [B, L] sequence) run, attending to the cached keys/values of every other
        position; returns [B, stop - start, H] for those positions (``stp.models.kv_cache`` says when that is exact).
        A Dream window also runs position start - 1, whose state predicts position start."""
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, length], got shape {tuple(input_ids.shape)}")
        length = input_ids.shape[1]
        if window is not None:
            start, stop = window
            if kv_cache is None or not kv_cache.filled:
                raise ValueError("backbone(window=...) needs a kv_cache filled by a backbone(..., kv_cache=cache) "
                                 "call without a window first")
            if not (isinstance(start, int) and isinstance(stop, int) and 0 <= start < stop <= length):
                raise ValueError(f"window={window!r}; allowed: integers 0 <= start < stop <= {length} (the length)")
        mask4d = position_ids = real = None
        if attention_mask is not None:
            if attention_mask.shape != input_ids.shape:
                raise ValueError(f"attention_mask must be a [batch, length] padding mask like input_ids "
                                 f"{tuple(input_ids.shape)}, got {tuple(attention_mask.shape)}")
            dtype = self._decoder().get_input_embeddings().weight.dtype
            real = attention_mask.to(device=input_ids.device, dtype=torch.bool)
            mask4d, position_ids = self._key_mask(real, dtype)
        if window is not None:
            return self._window_hidden(input_ids, mask4d, position_ids, real, kv_cache, start, stop)
        if kv_cache is not None:
            kv_cache.start = None
        out = self._decoder()(input_ids=input_ids, attention_mask=mask4d, position_ids=position_ids, use_cache=False,
                              cache=kv_cache)
        if kv_cache is not None:
            kv_cache.filled = True
        hidden = out.last_hidden_state  # [B, L, H]
        if self.shift_logits:
            # Dream: logits = cat([logits[:, :1], logits[:, :-1]]); the head is linear, so shift the hidden states.
            shifted = torch.cat([hidden[:, :1], hidden[:, :-1]], dim=1)
            if real is not None:
                # "Position 0 keeps its own" applies to each row's first REAL token, so a left-padded row equals
                # the row alone (Dream's own code would feed it the last padding position's state instead; that
                # token is always a prompt token, whose prediction nobody reads).
                first = real & (position_ids == 0)
                shifted = torch.where(first[..., None], hidden, shifted)
            hidden = shifted
        return hidden

    def check_backbone_4d(self, mode: str = "packed") -> None:
        """Raise unless ``backbone_4d`` can serve this model (no shifted logits): callers check before any work."""
        if self.shift_logits:
            raise ValueError(f"mode {mode!r} needs a model whose logits are not shifted; model {self.name!r} "
                             f"(family {self.family!r}) predicts position i from position i - 1: use mode 'exact'")

    def backbone_4d(self, input_ids: torch.Tensor, allowed: torch.Tensor, position_ids: torch.Tensor, *,
                    mode: str = "packed") -> torch.Tensor:
        """Final-normed hidden states [B, S, H] under an arbitrary attention pattern: ``allowed`` [B, S, S] bool
        (query, key; True = may attend) and explicit ``position_ids`` [B, S] (RoPE angles; copies of a sequence may
        repeat them). Used by packed multi-state sequences (``stp.trajectory_ratio`` mode ``packed``). Every query
        row must allow at least one key. Models with shifted logits (Dream) are refused: the shift would mix
        positions of different copies. ``mode`` only names the caller's mode in that error."""
        self.check_backbone_4d(mode)
        batch, seq = input_ids.shape
        if allowed.shape != (batch, seq, seq) or allowed.dtype != torch.bool:
            raise ValueError(f"mode {mode!r}: allowed must be a bool [B, S, S] = [{batch}, {seq}, {seq}] mask, got "
                             f"{tuple(allowed.shape)} {allowed.dtype}")
        if position_ids.shape != (batch, seq):
            raise ValueError(f"mode {mode!r}: position_ids must be [B, S] = [{batch}, {seq}], got "
                             f"{tuple(position_ids.shape)}")
        mask = allowed[:, None]  # [B, 1, S, S]: broadcast over heads
        if self.model.config._attn_implementation == "eager":
            dtype = self._decoder().get_input_embeddings().weight.dtype
            mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask,
                                                                                          torch.finfo(dtype).min)
        out = self._decoder()(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, use_cache=False)
        return out.last_hidden_state
    def _window_hidden(self, input_ids, mask4d, position_ids, real, kv_cache, start: int, stop: int) -> torch.Tensor:
        """Hidden states [B, stop - start, H] of a window pass over the cache (see ``backbone``)."""
        q0 = start - 1 if self.shift_logits and start > 0 else start  # Dream: position start reads start - 1
        batch = input_ids.shape[0]
        if position_ids is None:
            pos = torch.arange(q0, stop, device=input_ids.device)[None, :].expand(batch, -1)
        else:
            pos = position_ids[:, q0:stop]
        kv_cache.start = q0
        try:
            out = self._decoder()(input_ids=input_ids[:, q0:stop], attention_mask=mask4d, position_ids=pos,
                                  use_cache=False, cache=kv_cache)
        finally:
            kv_cache.start = None
        raw = out.last_hidden_state  # [B, stop - q0, H]
        if not self.shift_logits:
            return raw
        own = raw[:, start - q0:]
        prev = raw[:, :stop - start] if q0 < start else torch.cat([raw[:, :1], raw[:, :-1]], dim=1)
        if real is not None:  # a row's first real token keeps its own state (as in the full forward)
            first = real[:, start:stop] & (position_ids[:, start:stop] == 0)
            prev = torch.where(first[..., None], own, prev)
        return prev

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """[B, L] -> [B, L, V] logits in the model dtype. Materialises the full vocabulary: prefer `backbone` plus a
        masked-row log-prob op in training."""
        return nn.functional.linear(self.backbone(input_ids, attention_mask), self.lm_head_weight)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.logits(input_ids, attention_mask)

    def save(self, path: str | os.PathLike) -> None:
        """Write a directory (model.safetensors + config.json recording the mask token + tokenizer) that `load`
        reads back identically."""
        from transformers import PreTrainedModel

        if not isinstance(self.model, PreTrainedModel):
            raise TypeError(f"save() needs a plain transformers model, got {type(self.model).__name__} "
                            f"(merge and unload a peft adapter first, or save the adapter with peft)")
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(path)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(path)


# --------------------------------------------------------------------------------------------------------------------
# Checkpoint reading shared by the adapters


def read_config(directory: Path) -> dict:
    path = directory / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing config.json; cannot tell which model this directory holds")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e


def weight_files(directory: Path) -> list[Path]:
    """The safetensors files of a checkpoint: model.safetensors, or the shards named by model.safetensors.index.json."""
    index = directory / "model.safetensors.index.json"
    single = directory / "model.safetensors"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index}: no 'weight_map' with entries")
        files = [directory / name for name in dict.fromkeys(weight_map.values())]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{index} names shard files that do not exist: {missing}")
        return files
    if single.is_file():
        return [single]
    others = sorted(p.name for p in directory.glob("*.safetensors"))
    if others:
        return [directory / name for name in others]
    bins = sorted(p.name for p in directory.glob("*.bin"))
    hint = f" (found {bins}: only safetensors checkpoints are read)" if bins else ""
    raise FileNotFoundError(f"{directory}: no model.safetensors or model.safetensors.index.json{hint}")


def stored_dtype(files: list[Path]) -> torch.dtype:
    """The dtype of the first floating tensor in the checkpoint, read from the safetensors header only."""
    for file in files:
        with open(file, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        for key, info in header.items():
            if key != "__metadata__" and info.get("dtype") in _ST_DTYPES:
                return _ST_DTYPES[info["dtype"]]
    return torch.float32


def _iter_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for key in f.keys():
                yield key, f.get_tensor(key)


def build_and_load(model_cls, config, files: list[Path], rename: Callable[[str], str | None], *,
                   dtype: torch.dtype, device: torch.device, zero_fill: tuple[str, ...] = ()) -> nn.Module:
    """Build `model_cls(config)` without initialising it (meta device), then stream the checkpoint tensors into it
    one at a time (peak memory ~ one model, not two). `rename` maps a checkpoint key to a parameter name (None:
    skip the key). Every parameter must be loaded, except names matching a `zero_fill` regex (set to 0)."""
    with torch.device("meta"):
        model = model_cls(config)
    model = model.to(dtype=dtype)
    model.to_empty(device=device)
    # Non-persistent buffers (the RoPE inverse frequencies) are not in the checkpoint: rebuild that module for real.
    decoder = model.get_decoder()
    if hasattr(decoder, "rotary_emb"):
        with torch.device(device):
            decoder.rotary_emb = type(decoder.rotary_emb)(config=config)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    params = dict(model.named_parameters(remove_duplicate=False))
    if tied:
        params.pop("lm_head.weight", None)
    loaded: set[str] = set()
    with torch.no_grad():
        for key, tensor in _iter_tensors(files):
            if key.endswith("rotary_emb.inv_freq"):  # some exports store the RoPE buffer; it is rebuilt above
                continue
            name = rename(key)
            if name is None:
                continue
            if name not in params:
                raise ValueError(f"checkpoint tensor {key!r} (as {name!r}) has no place in {model_cls.__name__} "
                                 f"built from this config; files: {[f.name for f in files]}")
            target = params[name]
            if tuple(tensor.shape) != tuple(target.shape):
                raise ValueError(f"checkpoint tensor {key!r} has shape {tuple(tensor.shape)}, the config implies "
                                 f"{tuple(target.shape)} for {name!r}")
            target.copy_(tensor)
            loaded.add(name)
        missing = [n for n in params if n not in loaded]
        for name in list(missing):
            if any(re.fullmatch(p, name) for p in zero_fill):
                params[name].zero_()
                missing.remove(name)
    if missing:
        raise ValueError(f"checkpoint {[f.name for f in files]} lacks {len(missing)} tensors the model needs, "
                         f"e.g. {missing[:5]}")
    if tied:
        model.get_output_embeddings().weight = model.get_input_embeddings().weight
    for name, buf in model.named_buffers():
        if buf.is_meta:
            raise RuntimeError(f"buffer {name!r} was left uninitialised")
    model.eval()
    return model


def load_tokenizer(directory: Path):
    """The checkpoint's tokenizer, or None when it has no tokenizer files. Custom tokenizer classes (Dream's
    `DreamTokenizer` lives in remote code) fall back to the plain fast tokenizer over the same files."""
    names = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
    if not any((directory / n).is_file() for n in names):
        return None
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    errors = []
    try:
        return AutoTokenizer.from_pretrained(str(directory), trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - we try the next loader and report all failures together
        errors.append(f"AutoTokenizer: {type(e).__name__}: {e}")
    if (directory / "tokenizer.json").is_file():
        try:
            return PreTrainedTokenizerFast.from_pretrained(str(directory))
        except Exception as e:  # noqa: BLE001
            errors.append(f"PreTrainedTokenizerFast: {type(e).__name__}: {e}")
    if (directory / "vocab.json").is_file() and (directory / "merges.txt").is_file():
        try:
            from transformers import Qwen2Tokenizer

            return Qwen2Tokenizer.from_pretrained(str(directory))
        except Exception as e:  # noqa: BLE001
            errors.append(f"Qwen2Tokenizer: {type(e).__name__}: {e}")
    raise ValueError(f"{directory}: has tokenizer files but no loader could read them: " + " | ".join(errors))


def _first_id(value) -> int | None:
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    return int(value) if value is not None else None


def special_ids(directory: Path, config: dict, tokenizer) -> tuple[int, int, int]:
    """(mask, eos, pad) token ids: config.json first, then the tokenizer. A missing mask or eos id is an error; pad
    falls back to eos (LLaDA and Dream pad with their EOS)."""
    def pick(field: str, tok_attr: str) -> int | None:
        value = _first_id(config.get(field))
        if value is None and tokenizer is not None:
            value = getattr(tokenizer, tok_attr, None)
        return value

    mask = pick("mask_token_id", "mask_token_id")
    if mask is None:
        where = "the tokenizer defines no mask_token" if tokenizer is not None else "there are no tokenizer files"
        raise ValueError(f"{directory / 'config.json'}: no mask token: config.json has no 'mask_token_id' and "
                         f"{where}; add 'mask_token_id' to config.json")
    eos = pick("eos_token_id", "eos_token_id")
    if eos is None:
        raise ValueError(f"{directory / 'config.json'}: no EOS token: config.json has no 'eos_token_id' and the "
                         f"tokenizer defines no eos_token")
    pad = pick("pad_token_id", "pad_token_id")
    return mask, eos, eos if pad is None else pad


def merge_adapter(model: DiffusionLM, adapter_dir: str | os.PathLike) -> DiffusionLM:
    """Fold a peft LoRA adapter (the ``adapter/`` directory ``stp.train`` writes: ``adapter_config.json`` +
    ``adapter_model.safetensors``) into ``model``'s weights, in place; returns ``model``.

    The adapter must have been trained on this base (same module names and shapes): peft's loader raises on missing
    or mis-shaped tensors, and this function names the directory in the error. Weights load from safetensors only.
    """
    directory = Path(adapter_dir).expanduser()
    config_file = directory / "adapter_config.json"
    if not config_file.is_file():
        raise ValueError(f"adapter {str(directory)!r}: no adapter_config.json there (expected the 'adapter' directory "
                         f"that `python -m stp.train` writes at the end of a LoRA run)")
    if not (directory / "adapter_model.safetensors").is_file():
        raise ValueError(f"adapter {str(directory)!r}: no adapter_model.safetensors (only safetensors adapters are "
                         f"read; a .bin adapter would need unpickling)")
    from peft import PeftModel

    try:
        peft_model = PeftModel.from_pretrained(model.model, str(directory), is_trainable=False)
    except (ValueError, RuntimeError, KeyError) as e:
        raise ValueError(f"adapter {str(directory)!r} does not fit the model {model.name!r}: {e}") from e
    model.model = peft_model.merge_and_unload()
    return model
