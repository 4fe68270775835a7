"""FSDP2 support for the trainer: whole weights where the loop reads the model outside the prepared module.

``accelerate launch --config_file configs/accelerate/fsdp.yaml`` prepares the policy module with FSDP2
(``torch.distributed.fsdp.fully_shard``): every parameter becomes a DTensor holding 1/N of it, gathered by hooks
around each wrapped module's forward. The training forward goes through the prepared module and needs nothing more.
Three other places read the model directly, and each would break under sharding:

- rollouts and their old/reference log-probs call ``lm.backbone`` and the LM-head weight directly (not through the
  root module's forward), and the number of forward passes differs between processes (early stop, one-shot fills):
  per-forward all-gathers would pair mismatched collectives and hang. So the loop gathers every wrapped module once
  (``unshard_all``), runs them with resharding after forward switched off (no collective inside), and frees the
  gathered copies after (``reshard_all``): one all-gather per rollout, and the whole model in memory meanwhile;
- evaluation runs on the main process only: the same gather on every process, then the main process evaluates;
- checkpoints and the adapter need whole tensors: ``full_tensors`` gathers DTensors (every process calls it, in the
  same order), and resuming scatters them back (``copy_into``, ``shard_optimizer_state``), each process keeping its
  own chunk of the same full tensor (no communication).

FSDP1 (``fsdp_version: 1``) is refused: its flat parameters cannot be read this way. Without FSDP every function here
is a no-op, so the DDP and single-process paths are unchanged.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["check", "is_sharded", "unshard_all", "reshard_all", "full_parameters", "full_tensors",
           "full_optimizer_state", "full_lora_state", "copy_into", "shard_optimizer_state"]


def is_sharded(model: nn.Module) -> bool:
    """Whether `model` (the prepared module) was wrapped by FSDP2's fully_shard."""
    return bool(_units(model))


def check(accelerator) -> None:
    """Refuse FSDP1; say so when an FSDP launch config was ignored (accelerate applies FSDP to GPU-like devices only:
    on CPU its state picks MULTI_CPU and the run is plain DDP)."""
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    if kind == DistributedType.FSDP and not getattr(accelerator, "is_fsdp2", False):
        raise ValueError("FSDP version 1 is not supported by stp.train (its flattened parameters cannot be gathered "
                         "for rollouts); set fsdp_version: 2 in the accelerate config "
                         "(configs/accelerate/fsdp.yaml)")
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and kind != DistributedType.FSDP \
            and accelerator.is_main_process:
        print(f"stp.train: warning: the accelerate config asks for FSDP but accelerate chose {kind.value} "
              f"(accelerate enables FSDP on GPU-like devices only; on CPU it runs DDP): weights are replicated, "
              f"not sharded", file=sys.stderr)


def _units(model: nn.Module) -> list[nn.Module]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def unshard_all(accelerator, model: nn.Module) -> None:
    """Gather every FSDP unit of `model` (collective: every process calls it) and keep it gathered through forwards
    until `reshard_all`."""
    units = _units(model)
    if not units:
        return
    # The root's lazy initialisation must run before any inner unit is called on its own (else that unit would
    # initialise itself as a root); the root forward normally does it.
    units[0]._get_fsdp_state()._lazy_init()
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()


def reshard_all(accelerator, model: nn.Module) -> None:
    """Free the gathered copies (local) and restore the configured resharding after forward."""
    units = _units(model)
    if not units:
        return
    after = getattr(getattr(accelerator.state, "fsdp_plugin", None), "reshard_after_forward", True)
    after = True if after is None else bool(after)
    for unit in units:
        unit.reshard()
        unit.set_reshard_after_forward(after, recurse=False)


@contextlib.contextmanager
def full_parameters(accelerator, model: nn.Module) -> Iterator[None]:
    """`unshard_all` ... `reshard_all` as a context (every process must enter it)."""
    unshard_all(accelerator, model)
    try:
        yield
    finally:
        reshard_all(accelerator, model)


def _full(value: Any) -> Any:
    from torch.distributed.tensor import DTensor

    return value.full_tensor() if isinstance(value, DTensor) else value


def full_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Whole tensors for saving (DTensors gathered: collective, every process in the same order)."""
    return {k: _full(v.detach()) for k, v in tensors.items()}


def full_optimizer_state(state: Mapping[str, Any]) -> dict[str, Any]:
    """An optimizer state_dict with its DTensor states gathered (collective)."""
    return {"state": {idx: {k: _full(v) for k, v in st.items()} for idx, st in state["state"].items()},
            "param_groups": state["param_groups"]}


def full_lora_state(peft_model: nn.Module, prepared: nn.Module) -> dict[str, torch.Tensor] | None:
    """The LoRA tensors of `peft_model` gathered whole, for ``save_pretrained(state_dict=...)`` (collective); None
    when `prepared` is not sharded (peft then reads its own weights)."""
    if not is_sharded(prepared):
        return None
    return full_tensors({k: v for k, v in peft_model.state_dict().items() if "lora_" in k})


def _like(param: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(param, DTensor):
        return full
    # Every process holds the same full tensor: each keeps its own chunk (src_data_rank=None: no communication).
    return distribute_tensor(full.to(device=param.device), param.device_mesh, param.placements, src_data_rank=None)


def copy_into(param: torch.Tensor, full: torch.Tensor) -> None:
    """param.copy_(full) for a plain or a sharded (DTensor) parameter."""
    with torch.no_grad():
        param.copy_(_like(param, full.to(param.dtype)))


def shard_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """After ``load_state_dict`` of whole tensors: shard each per-parameter state like its parameter."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            st = optimizer.state.get(p, {})
            for k, v in list(st.items()):
                if isinstance(v, torch.Tensor) and v.dim() > 0 and tuple(v.shape) == tuple(p.shape):
                    st[k] = _like(p, v)
