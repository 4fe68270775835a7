"""Test helper: ``accelerate launch --config_file configs/accelerate/fsdp_cpu.yaml -m tests._fsdp_entry [flags]`` is
``python -m tests._trainer_entry`` (the trainer with the toy reward) run under FSDP2 on CPU processes.

accelerate 1.x does not apply FSDP on CPU: its state sets ``DistributedType.FSDP`` only inside the branch for
GPU-like distributed types (MULTI_GPU, MULTI_NPU, ...); a CPU run under an FSDP config becomes ``MULTI_CPU``, plain
DDP, with the FSDP settings ignored (``tests/test_fsdp.py`` checks this). torch itself shards on CPU (FSDP2 over
gloo). So this entry point, after accelerate has initialised a CPU process group, sets the shared state to FSDP with
the plugin accelerate builds from the same config on GPUs; from there on ``Accelerator.prepare``, ``backward``,
``no_sync`` and ``clip_grad_norm_`` take accelerate's own FSDP2 code paths, as on GPUs. Nothing else changes.
"""

from __future__ import annotations

import os
import sys


def fsdp_on_cpu_patch() -> None:
    import accelerate
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    original = accelerate.Accelerator.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        wants = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
        if wants and self.state.distributed_type == DistributedType.MULTI_CPU:
            # Both shared states: AcceleratorState re-reads PartialState's when prepare() builds it again.
            PartialState().distributed_type = DistributedType.FSDP
            self.state.distributed_type = DistributedType.FSDP
            self.state.fsdp_plugin = FullyShardedDataParallelPlugin()  # from the launch config's FSDP_* variables

    accelerate.Accelerator.__init__ = init
    prepare = accelerate.Accelerator.prepare

    def prepare_and_report(self, *args, **kwargs):
        result = prepare(self, *args, **kwargs)
        from torch.distributed.fsdp import FSDPModule

        model = next(r for r in result if hasattr(r, "modules"))
        units = sum(isinstance(m, FSDPModule) for m in model.modules())
        kinds = sorted({type(p).__name__ for p in model.parameters()})
        print(f"fsdp entry: rank {self.process_index}: {self.distributed_type.value}, is_fsdp2={self.is_fsdp2}, "
              f"{units} FSDP units, parameter types {kinds}", file=sys.stderr, flush=True)
        return result

    accelerate.Accelerator.prepare = prepare_and_report


def print_state() -> None:
    """What accelerate itself makes of the launch config (no patch): one line per process."""
    from accelerate import Accelerator

    acc = Accelerator(cpu=True)
    print(f"accelerate state: rank {acc.process_index}/{acc.num_processes}: {acc.distributed_type.value}, "
          f"backend {acc.state.backend}, fsdp plugin {getattr(acc.state, 'fsdp_plugin', None) is not None}, "
          f"ACCELERATE_USE_FSDP={os.environ.get('ACCELERATE_USE_FSDP')}", flush=True)


if __name__ == "__main__":
    if sys.argv[1:] == ["--state"]:
        print_state()
        sys.exit(0)
    import torch

    torch.set_num_threads(1)
    fsdp_on_cpu_patch()
    from tests._trainer_entry import toy_task_patch

    toy_task_patch()
    from stp.train import main

    sys.exit(main())
