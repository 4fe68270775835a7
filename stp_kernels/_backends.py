"""The one dispatch point: which backends exist, which can run here, and which one an op uses.

Choice order for ``backend=None``: the ``STP_KERNEL_BACKEND`` environment variable if set, else the fastest
available for the tensors' device (CUDA: gemm, cuda, triton, torch_chunked; CPU: cpu, torch_chunked). Triton on a
machine without CUDA runs through Triton's interpreter (``TRITON_INTERPRET=1``, set here before triton is first
imported unless the user set it): correct but about a thousand times slower, so it is never a CPU default.

First-use self-check (``_selfcheck``): the first call of an op on a CUDA device runs every compiled backend once on a
small problem against float64; one that fails is disabled for the process (one warning naming it and the error;
``backend_status`` shows why) and dispatch moves to the next. ``$STP_KERNEL_SELFCHECK=1`` also runs it on CPU.
"""

from __future__ import annotations

import importlib
import logging
import os
import warnings
from types import ModuleType

import torch

from . import _selfcheck

log = logging.getLogger("stp_kernels")

BACKENDS = ("torch", "torch_chunked", "cpu", "triton", "cuda", "gemm")
# gemm leads on CUDA: cuBLAS tensor-core matmuls per vocabulary chunk (the hand-written kernels stay selectable).
# On CPU the C++ extension leads: gemm was not measurably faster on the shared 2-core development machine
# (benchmarks/bench_masked_logprob.py, N=2048 H=256 V=32768 float32).
_DEFAULT_ORDER = {"cuda": ("gemm", "cuda", "triton", "torch_chunked"), "cpu": ("cpu", "torch_chunked")}
_ENV = "STP_KERNEL_BACKEND"

_modules: dict[tuple[str, str], ModuleType | None] = {}
_errors: dict[tuple[str, str], str] = {}
_announced: set[tuple[str, str, str]] = set()
_disabled: dict[tuple[str, str, str], str] = {}  # (op, backend, device type) -> the self-check's error
_self_checked: dict[tuple[str, str], dict[str, str]] = {}  # (op, device type) -> verdict per checked backend


def _triton_env_ok(device: str) -> str | None:
    """Return None when triton kernels can run on ``device``, else the reason they cannot."""
    if device == "cuda":
        return None if torch.cuda.is_available() else "torch has no CUDA device"
    if os.environ.get("TRITON_INTERPRET") is None and not torch.cuda.is_available():
        # Must happen before triton is imported; triton reads it when kernels are decorated.
        os.environ["TRITON_INTERPRET"] = "1"
    if os.environ.get("TRITON_INTERPRET") != "1":
        return "triton on CPU needs TRITON_INTERPRET=1 set before triton is imported"
    return None


# (op, backend) -> module implementing ``reference.backend_contract`` for that op. Compiled and Triton modules
# expose ``check()``, which raises with the reason when they cannot run (extension not built, no CUDA...).
_REGISTRY: dict[str, dict[str, str]] = {
    "masked_logprob": {
        "torch_chunked": "stp_kernels.torch_chunked",
        "cpu": "stp_kernels._cpu",
        "triton": "stp_kernels.triton.masked_logprob",
        "cuda": "stp_kernels._cuda",
        "gemm": "stp_kernels.gemm",
    },
    "sample_step": {
        "torch_chunked": "stp_kernels.torch_chunked_sample_step",
        "triton": "stp_kernels.triton.sample_step",
        "cuda": "stp_kernels._cuda_sample_step",
        "gemm": "stp_kernels.gemm_sample_step",
    },
}


def _load(op: str, name: str, device: str) -> ModuleType | None:
    key = (op, name)
    if name != "triton" and key in _modules:
        return _modules[key]
    module: ModuleType | None = None
    try:
        path = _REGISTRY[op].get(name)
        if path is None:
            raise RuntimeError(f"{op} has no {name!r} implementation")
        if name == "triton":
            reason = _triton_env_ok(device)
            if reason:
                raise RuntimeError(reason)
        if name == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("torch has no CUDA device")
        module = importlib.import_module(path)
        if hasattr(module, "check"):
            module.check()
    except Exception as exc:  # missing extension, missing triton, no CUDA: recorded, reported on request
        _errors[key] = f"{type(exc).__name__}: {exc}"
        module = None
    # The triton verdict depends on the device, so it is not cached.
    if name != "triton":
        _modules[key] = module
    return module


def backend_status(device: str | torch.device | None = None, op: str = "masked_logprob") -> dict[str, str]:
    """Each backend's status on ``device`` ("cpu" or "cuda"): ``"available"`` or the reason it is not."""
    dev = _device_type(device)
    status = {}
    for name in BACKENDS:
        if name == "torch":
            status[name] = "available"
            continue
        if name == "cpu" and dev != "cpu" or name == "cuda" and dev != "cuda":
            status[name] = f"runs on {name} tensors only"
            continue
        module = _load(op, name, dev)
        if module is None:
            status[name] = _errors.get((op, name), "unavailable")
        elif (op, name, dev) in _disabled:
            status[name] = f"disabled: failed the first-use self-check ({_disabled[(op, name, dev)]})"
        else:
            status[name] = "available"
    return status


def self_check(op: str, device: str | torch.device, *, force: bool = False) -> dict[str, str]:
    """Run the first-use self-check of ``op`` on ``device`` now (once per process unless ``force``) and return each
    checked backend's verdict: "passed" or the error. Failing backends are disabled, each with one warning."""
    dev = _device_type(device)
    key = (op, dev)
    if key in _self_checked and not force:
        return dict(_self_checked[key])
    verdicts: dict[str, str] = {}
    _self_checked[key] = verdicts
    for name in _selfcheck.CHECKED:
        if name == "cpu" and dev != "cpu" or name == "cuda" and dev != "cuda":
            continue
        module = _load(op, name, dev)
        if module is None:
            continue
        error = _selfcheck.run(op, module, dev)
        verdicts[name] = "passed" if error is None else error
        if error is None:
            _disabled.pop((op, name, dev), None)
        elif (op, name, dev) not in _disabled:
            _disabled[(op, name, dev)] = error
            warnings.warn(f"stp_kernels: backend {name!r} failed its first-use self-check for {op} on {dev} and is "
                          f"disabled for this process: {error}", RuntimeWarning, stacklevel=3)
    return verdicts


def _reset_self_check() -> None:
    """Forget verdicts (tests)."""
    _disabled.clear()
    _self_checked.clear()


def available_backends(device: str | torch.device | None = None, op: str = "masked_logprob") -> list[str]:
    """Backends that can run ``op`` here. With no ``device``: the union over CPU and, if present, CUDA."""
    if device is None:
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
        names: list[str] = []
        for d in devices:
            names += [n for n in available_backends(d, op) if n not in names]
        return [n for n in BACKENDS if n in names]
    return [n for n, s in backend_status(device, op).items() if s == "available"]


def _device_type(device) -> str:
    if device is None:
        return "cpu"
    dev = torch.device(device).type if not isinstance(device, torch.device) else device.type
    if dev not in ("cpu", "cuda"):
        raise ValueError(f"stp_kernels: device type {dev!r} is not supported (allowed: 'cpu', 'cuda')")
    return dev


def resolve(op: str, backend: str | None, device: torch.device) -> tuple[str, ModuleType | None]:
    """Pick the backend for a call; raise a clear error when a named one cannot run."""
    dev = _device_type(device)
    if (op, dev) not in _self_checked and _selfcheck.enabled(dev):
        self_check(op, dev)
    requested = backend if backend is not None else os.environ.get(_ENV) or None
    source = "backend=" if backend is not None else f"${_ENV}="
    if requested is not None:
        if requested not in BACKENDS:
            raise ValueError(
                f"stp_kernels.{op}: {source}{requested!r} is not a backend (allowed: {', '.join(BACKENDS)})")
        if requested == "torch":
            _announce(op, requested, dev)
            return requested, None
        status = backend_status(dev, op)[requested]
        if status != "available":
            raise RuntimeError(
                f"stp_kernels.{op}: {source}{requested!r} cannot run on {dev} tensors here: {status}. "
                f"Available: {', '.join(available_backends(dev, op))}"
            )
        _announce(op, requested, dev)
        return requested, _load(op, requested, dev)
    for name in _DEFAULT_ORDER[dev]:
        module = _load(op, name, dev)
        if module is not None and (op, name, dev) not in _disabled:
            _announce(op, name, dev)
            return name, module
    raise RuntimeError(f"stp_kernels.{op}: no backend can run on {dev}")  # unreachable: torch_chunked always loads


def _announce(op: str, name: str, dev: str) -> None:
    key = (op, name, dev)
    if key not in _announced:
        _announced.add(key)
        log.info("stp_kernels.%s uses the %r backend on %s tensors", op, name, dev)
