"""``noise_masks``: the Monte-Carlo masks of the likelihood estimator, a pure function of integers.

A torch-only op (no compiled kernels: it is O(B * K * C) integer hashing plus one sort per row, negligible next to
the forward pass it feeds), on the device of its inputs. It touches no global RNG: every random number is the
counter hash of ``reference.py`` (the one ``sample_step`` uses), so the masks of a sample are identical on any device,
in any process, in any batch position and under any split of the batch (gradient accumulation).

Counter layout (all uint32 arithmetic of ``reference.mix32``)::

    key[b, j] = row_keys(seed ^ MASK_SALT, iteration, sample_ids[b] * 4096 + j)        j = draw index < 4096
    u[b, j, c] = counter_uniform(key[b, j], c)                  c in [0, C): completion position c
    u_count    = counter_uniform(key[b, j], 0x7FFFFFFF)         the draw's count n_j
    u_block    = counter_uniform(key[b, j], 0x7FFFFFFE)         the draw's block (scheme "block")
    u_prompt   = counter_uniform(key[b, j], 2**30 + (P - 1 - p)) prompt position p (d1), counted from the prompt's
                                                                 END, so left padding does not move the counter

``MASK_SALT`` keeps this stream apart from the sampler's noise when a run uses one seed for both. Counters depend on
positions inside the valid length only, so padding a batch to a longer ``completion_length`` does not change the
masks of a sample's valid positions.

Schemes (``l`` = valid length = first EOS index + 1; positions ``c >= l`` are padding):

- ``random_count`` (docs/method.md 3): ``n_j = 1 + floor(u_count * l)`` ~ UniformInt{1..l}; the n_j valid positions with
  the smallest ``u`` (ties to the lower position) are masked, every padding position is masked, anchors are then
  unmasked: ``M_j = (chosen_j U padding) minus anchors``.
- ``d1`` (diffu-GRPO): the whole completion is masked (minus anchors, if given), and each real prompt token
  (``prompt_mask``) is masked when ``u_prompt < prompt_mask_prob``. Returns ``(masks, prompt_masks)``.
- ``block`` (SPG-style block-wise): with blocks of ``block_length`` over the valid span, a block b ~ UniformInt over
  the ``ceil(l / block_length)`` blocks; blocks before b are clean, blocks after b and padding fully masked, and
  n ~ UniformInt{1..|b|} random positions of block b masked (smallest ``u``); anchors then unmasked.
"""

from __future__ import annotations

import torch

from .reference import counter_uniform, row_keys

__all__ = ["noise_masks", "MASK_SALT", "SCHEMES"]

SCHEMES = ("random_count", "d1", "block")
MASK_SALT = 0x6D61736B5F726E67  # "mask_rng" in ASCII
_MAX_DRAWS = 1 << 12
_MAX_SAMPLE_ID = (1 << 63) // _MAX_DRAWS - 1
_COUNT_CTR = 0x7FFFFFFF
_BLOCK_CTR = 0x7FFFFFFE
_PROMPT_BASE = 1 << 30


def _rank(score: torch.Tensor) -> torch.Tensor:
    """Rank of each entry of every row of ``score`` in ascending order, ties to the lower index (stable sort)."""
    order = score.argsort(dim=-1, stable=True)
    ar = torch.arange(score.shape[-1], device=score.device).expand_as(order)
    return torch.empty_like(order).scatter_(-1, order, ar)


def _uniform_int(u: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """UniformInt{0..n-1} from u in (0, 1): floor(u * n), clamped against float rounding up to n (n >= 1)."""
    return torch.minimum((u * n.float()).floor().long(), n - 1)


def noise_masks(
    seed: int,
    iteration: int,
    sample_ids: torch.Tensor,
    lengths: torch.Tensor,
    *,
    num_draws: int,
    scheme: str = "random_count",
    anchors: torch.Tensor | None = None,
    prompt_mask: torch.Tensor | None = None,
    prompt_mask_prob: float = 0.15,
    completion_length: int | None = None,
    block_length: int = 32,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The K noise masks of each sample: True = position replaced by [MASK].

    Args:
        seed: non-negative int < 2**64 (derive one per rollout, e.g. from the run seed and the global step).
        iteration: GRPO inner iteration (0 <= it < 2**32): old, reference and current policy of one iteration share it.
        sample_ids: [B] int64 stable sample identities (0 <= id < 2**51), NOT batch positions.
        lengths: [B] int64 valid completion lengths l in [1, C] (first EOS index + 1).
        num_draws: K (1 <= K <= 4096).
        scheme: "random_count" (default, docs/method.md 3), "d1" or "block".
        anchors: [B, C] bool, True = anchor (never masked), or None.
        prompt_mask: [B, P] bool, True = real prompt token (maskable); "d1" only, and required there.
        prompt_mask_prob: probability a real prompt token is masked ("d1").
        completion_length: C; needed when ``anchors`` is None, else must equal ``anchors.shape[1]``.
        block_length: block size of the "block" scheme.

    Returns:
        bool [B, K, C] masks; for "d1" the tuple (masks [B, K, C], prompt masks [B, K, P]).
    """
    fn = "stp_kernels.noise_masks"
    if scheme not in SCHEMES:
        raise ValueError(f"{fn}: scheme={scheme!r}; allowed: {', '.join(SCHEMES)}")
    for name, value, hi in (("seed", seed, 1 << 64), ("iteration", iteration, 1 << 32)):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < hi:
            raise ValueError(f"{fn}: {name}={value!r} must be an int in [0, {hi})")
    if isinstance(num_draws, bool) or not isinstance(num_draws, int) or not 1 <= num_draws <= _MAX_DRAWS:
        raise ValueError(f"{fn}: num_draws={num_draws!r} must be an int in [1, {_MAX_DRAWS}]")
    for name, t in (("sample_ids", sample_ids), ("lengths", lengths)):
        if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.dtype.is_floating_point or t.dtype == torch.bool:
            raise ValueError(f"{fn}: {name} must be a 1-D integer tensor, got "
                             f"{getattr(t, 'shape', type(t).__name__)} {getattr(t, 'dtype', '')}")
    batch = sample_ids.shape[0]
    device = sample_ids.device
    if lengths.shape[0] != batch or lengths.device != device:
        raise ValueError(f"{fn}: lengths has shape {tuple(lengths.shape)} on {lengths.device}; need [{batch}] on "
                         f"{device} like sample_ids")
    if anchors is not None:
        if anchors.dim() != 2 or anchors.shape[0] != batch or anchors.device != device:
            raise ValueError(f"{fn}: anchors must be [B={batch}, C] on {device}, got {tuple(anchors.shape)} on "
                             f"{anchors.device}")
        if completion_length is not None and completion_length != anchors.shape[1]:
            raise ValueError(f"{fn}: completion_length={completion_length} but anchors has {anchors.shape[1]} "
                             "columns")
        completion_length = anchors.shape[1]
        anchors = anchors.to(torch.bool)
    if not isinstance(completion_length, int) or completion_length < 1:
        raise ValueError(f"{fn}: completion_length={completion_length!r}: pass a positive int (or anchors)")
    if scheme == "d1":
        if prompt_mask is None or prompt_mask.dim() != 2 or prompt_mask.shape[0] != batch:
            raise ValueError(f"{fn}: scheme 'd1' needs prompt_mask [B={batch}, P] (True = real prompt token), got "
                             f"{None if prompt_mask is None else tuple(prompt_mask.shape)}")
        if not 0.0 <= prompt_mask_prob <= 1.0:
            raise ValueError(f"{fn}: prompt_mask_prob={prompt_mask_prob} must lie in [0, 1]")
    if scheme == "block" and (not isinstance(block_length, int) or block_length < 1):
        raise ValueError(f"{fn}: block_length={block_length!r} must be a positive int")
    c_len, k = completion_length, num_draws
    sample_ids, lengths = sample_ids.long(), lengths.long()
    if batch:
        bad = torch.stack([((sample_ids < 0) | (sample_ids > _MAX_SAMPLE_ID)).any(),
                           ((lengths < 1) | (lengths > c_len)).any()]).tolist()  # one host sync
        if bad[0]:
            raise ValueError(f"{fn}: sample_ids must lie in [0, {_MAX_SAMPLE_ID}]")
        if bad[1]:
            raise ValueError(f"{fn}: lengths must lie in [1, completion_length={c_len}], got {lengths.tolist()}")

    draw = torch.arange(k, device=device)
    keys = row_keys(seed ^ MASK_SALT, iteration, (sample_ids[:, None] * _MAX_DRAWS + draw[None, :]).reshape(-1))
    pos = torch.arange(c_len, device=device)
    length = lengths.repeat_interleave(k)  # [B*K]
    valid = pos[None, :] < length[:, None]  # [B*K, C]

    if scheme == "random_count":
        n = 1 + _uniform_int(counter_uniform(keys, pos.new_tensor([_COUNT_CTR]))[:, 0], length)
        u = counter_uniform(keys, pos)
        chosen = _rank(torch.where(valid, u, torch.full_like(u, 2.0))) < n[:, None]  # valid entries rank first
        masks = chosen | ~valid
    elif scheme == "block":
        num_blocks = (length + block_length - 1) // block_length
        block = _uniform_int(counter_uniform(keys, pos.new_tensor([_BLOCK_CTR]))[:, 0], num_blocks)
        start = block * block_length
        size = torch.minimum(length - start, torch.full_like(start, block_length))
        n = 1 + _uniform_int(counter_uniform(keys, pos.new_tensor([_COUNT_CTR]))[:, 0], size)
        in_block = valid & (pos[None, :] >= start[:, None]) & (pos[None, :] < (start + block_length)[:, None])
        u = counter_uniform(keys, pos)
        chosen = in_block & (_rank(torch.where(in_block, u, torch.full_like(u, 2.0))) < n[:, None])
        masks = chosen | (pos[None, :] >= (start + block_length)[:, None]) | ~valid
    else:  # d1
        masks = torch.ones(batch * k, c_len, dtype=torch.bool, device=device)
    masks = masks.view(batch, k, c_len)
    if anchors is not None:
        masks = masks & ~anchors[:, None, :]
    if scheme != "d1":
        return masks
    p_len = prompt_mask.shape[1]
    from_end = _PROMPT_BASE + (p_len - 1 - torch.arange(p_len, device=device))
    u_prompt = counter_uniform(keys, from_end).view(batch, k, p_len)
    prompt_masks = (u_prompt < prompt_mask_prob) & prompt_mask.to(device=device, dtype=torch.bool)[:, None, :]
    return masks, prompt_masks
