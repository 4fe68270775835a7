"""Block key/value cache for masked-diffusion decoding, through transformers' cache API (``cache=`` of
``LlamaModel`` / ``Qwen2Model``), used by ``DiffusionLM.backbone`` when given ``kv_cache``.

A masked diffusion LM attends bidirectionally, so no position's keys and values are final while any token of the
sequence may still change; block decoding changes only the current block between two steps, and the keys/values of
everything else move little (Fast-dLLM, NVlabs). The cache exploits that:

- a *fill* pass (``window=None``) runs the whole sequence and keeps every layer's keys/values, [B, KVH, T, D];
- a *window* pass runs only the positions ``[start, stop)``: each layer writes their fresh keys/values into the kept
  buffer (in place) and attends over the whole buffer. Positions outside the window contribute the keys/values of
  the last fill; positions inside it are exact.

The two cache modes of the sampler are two windows: ``prefix`` runs the current block and everything after it
(only the prompt and the finished blocks come from the cache), ``dual`` runs the current block alone (the masked
suffix comes from the cache too). Writing in place (rather than concatenating a prefix with the window, as
transformers' ``DynamicCache`` does for autoregressive decoding) keeps one buffer per layer for both modes and
allocates nothing per step.

Exactness: a window pass equals the full forward at the window's positions whenever the positions outside it hold
the tokens they held at the fill (and the window itself is recomputed): then every cached key/value is what the full
forward would compute. For a one-layer model the cached keys/values depend only on each position's own token, so a
window pass is exact whenever the tokens outside the window are unchanged since the fill, whatever the window holds.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

__all__ = ["BlockKVCache"]


class _BlockLayer(CacheLayerMixin):
    """One decoder layer's kept keys/values; ``update`` fills them (no window) or overwrites the window in place."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, owner: BlockKVCache) -> None:
        super().__init__()
        self._owner = owner

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.keys, self.values = key_states, value_states
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args,
               **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        start = self._owner.start
        if start is None:  # fill: keep this pass's keys/values as they are
            self.lazy_initialization(key_states, value_states)
            return key_states, value_states
        stop = start + key_states.shape[-2]
        self.keys[:, :, start:stop] = key_states
        self.values[:, :, start:stop] = value_states
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        if self._owner.start is None or not self.is_initialized:
            return query_length, 0
        return self.keys.shape[-2], 0

    def get_seq_length(self) -> int:
        # 0 during a fill: the model derives the positions of a call without position_ids from the cached length,
        # and a refill (the next block's first step) must run at positions 0.., not after the kept sequence.
        return self.keys.shape[-2] if self.is_initialized and self._owner.start is not None else 0

    def get_max_length(self) -> int:
        return -1


class BlockKVCache(Cache):
    """Keys/values of every decoder layer from the last fill pass; ``start`` is the first position of the current
    window pass (None during a fill). Built by ``DiffusionLM.new_kv_cache``; one per sequence batch (classifier-free
    guidance's unconditional pass keeps its own)."""

    def __init__(self, num_layers: int) -> None:
        self.start: int | None = None
        self.filled = False
        super().__init__(layers=[_BlockLayer(self) for _ in range(num_layers)])

    def select_rows(self, index: torch.Tensor) -> None:
        """Keep only the batch rows ``index`` of every layer's keys/values (live-row compaction of the sampler)."""
        for layer in self.layers:
            if layer.is_initialized:
                layer.keys = layer.keys.index_select(0, index)
                layer.values = layer.values.index_select(0, index)

    def get_query_offset(self, layer_idx: int = 0) -> int:
        # Query positions are passed explicitly (position_ids); the mask is built against the whole buffer.
        return 0
