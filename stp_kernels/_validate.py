"""Input checks shared by the ops: every failure names the op, the argument, the value and what is allowed."""

from __future__ import annotations

import math

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class Checks:
    """Collects range checks as device booleans and evaluates them with a single host sync."""

    def __init__(self, fn: str):
        self.fn = fn
        self._pending: list[tuple[str, torch.Tensor]] = []

    def add(self, message: str, bad: torch.Tensor) -> None:
        self._pending.append((message, bad))

    def run(self) -> None:
        if not self._pending:
            return
        flags = torch.stack([bad for _, bad in self._pending]).tolist()
        for (message, _), bad in zip(self._pending, flags):
            if bad:
                raise ValueError(f"{self.fn}: {message}")


def int_vector(fn: str, arg: str, value: torch.Tensor, device: torch.device) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{fn}: {arg} must be a torch.Tensor, got {type(value).__name__}")
    if value.dim() != 1:
        raise ValueError(f"{fn}: {arg} must be 1-D, got shape {tuple(value.shape)}")
    if value.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise TypeError(f"{fn}: {arg} must hold integers (int64), got dtype {value.dtype}")
    if value.device != device:
        raise ValueError(f"{fn}: {arg} is on {value.device} but hidden is on {device}")
    # Contiguous: kernels index integer arguments as flat arrays (a strided view read as contiguous picks the
    # wrong elements). A copy only for views; int64 contiguous input passes through untouched.
    return value.long().contiguous()


def head_inputs(fn: str, hidden, weight) -> tuple[torch.Tensor, int]:
    """Check hidden [N, H] | [B, L, H] and weight [V, H]; return hidden as [N, H] and N."""
    for arg, value in (("hidden", hidden), ("weight", weight)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{fn}: {arg} must be a torch.Tensor, got {type(value).__name__}")
    if hidden.dim() not in (2, 3):
        raise ValueError(f"{fn}: hidden must be [N, H] or [B, L, H], got shape {tuple(hidden.shape)}")
    if hidden.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{fn}: hidden has dtype {hidden.dtype}; allowed: float32, bfloat16, float16")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"{fn}: weight must be [V, H] with H = hidden.shape[-1] = {hidden.shape[-1]}, "
                         f"got shape {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"{fn}: weight has dtype {weight.dtype} but hidden has {hidden.dtype}; they must match")
    if weight.device != hidden.device:
        raise ValueError(f"{fn}: weight is on {weight.device} but hidden is on {hidden.device}")
    if weight.shape[0] == 0 or hidden.shape[-1] == 0:
        raise ValueError(f"{fn}: weight has an empty dimension: shape {tuple(weight.shape)}")
    num_rows = hidden.numel() // hidden.shape[-1]
    return hidden.reshape(num_rows, hidden.shape[-1]), num_rows


def rows_arg(fn: str, rows, num_hidden_rows: int, device, checks: Checks) -> torch.Tensor | None:
    if rows is None:
        return None
    rows = int_vector(fn, "rows", rows, device)
    if rows.numel():
        checks.add(f"rows must lie in [0, {num_hidden_rows}) (the flat rows of hidden)",
                   (rows < 0).any() | (rows >= num_hidden_rows).any())
    return rows


def vocab_arg(fn: str, vocab, vocab_size: int, device, checks: Checks) -> torch.Tensor | None:
    if vocab is None:
        return None
    vocab = int_vector(fn, "vocab", vocab, device)
    if vocab.numel() == 0:
        raise ValueError(f"{fn}: vocab is empty; it must list at least one token id")
    checks.add(f"vocab ids must lie in [0, {vocab_size})", (vocab[0] < 0) | (vocab[-1] >= vocab_size))
    if vocab.numel() > 1:
        checks.add("vocab must be sorted strictly increasing (unique ids)", (vocab[1:] <= vocab[:-1]).any())
    return vocab


def check_mode(fn: str, check_inputs, device: torch.device) -> bool:
    """Whether a call runs its raising range checks (one host sync): ``check_inputs`` True / False, or None =
    automatic: on CPU tensors (where there is no device to wait for) yes, on CUDA no (``poison_mask`` instead)."""
    if check_inputs is None:
        return device.type != "cuda"
    if not isinstance(check_inputs, bool):
        raise TypeError(f"{fn}: check_inputs must be True, False or None (automatic), got {check_inputs!r}")
    return check_inputs


def poison_mask(num_hidden_rows: int, vocab_size: int, tgt: torch.Tensor | None, rows: torch.Tensor | None,
                vocab: torch.Tensor | None, num_out: int):
    """The range checks without a host sync: every index is clamped into range (no kernel can read outside its
    tensor) and a bool [num_out] mask marks the rows whose result is meaningless (target outside [0, V) or not in the
    prior, row outside hidden; every row when the prior is unsorted, repeated or outside [0, V)); callers write NaN
    there. Returns (tgt, rows, vocab, mask), all on the device; mask is None when there is nothing to check."""
    if tgt is None and rows is None and vocab is None:
        return tgt, rows, vocab, None
    device = (tgt if tgt is not None else rows if rows is not None else vocab).device
    bad = torch.zeros(num_out, dtype=torch.bool, device=device)
    if tgt is not None:
        bad |= (tgt < 0) | (tgt >= vocab_size)
        tgt = tgt.clamp(0, vocab_size - 1)
    if rows is not None:
        bad |= (rows < 0) | (rows >= num_hidden_rows)
        rows = rows.clamp(0, num_hidden_rows - 1)
    if vocab is not None:
        wrong = (vocab[0] < 0) | (vocab[-1] >= vocab_size)
        if vocab.numel() > 1:
            wrong = wrong | (vocab[1:] <= vocab[:-1]).any()
        # A wrong prior is replaced by a sorted in-range one (every row is NaN anyway): no kernel or search misreads.
        vocab = torch.where(wrong, torch.arange(vocab.numel(), device=device).clamp_(max=vocab_size - 1),
                            vocab.clamp(0, vocab_size - 1))
        bad |= wrong
        if tgt is not None:
            slot = torch.searchsorted(vocab, tgt).clamp_(max=vocab.numel() - 1)
            bad |= vocab[slot] != tgt
    return tgt, rows, vocab, bad


def temperature_arg(fn: str, temperature, *, allow_zero: bool) -> float:
    ok = isinstance(temperature, (int, float)) and math.isfinite(temperature) and (
        temperature >= 0 if allow_zero else temperature > 0)
    if not ok:
        bound = ">= 0 (0 = greedy)" if allow_zero else "> 0"
        raise ValueError(f"{fn}: temperature must be a finite number {bound}, got {temperature!r}")
    return float(temperature)
