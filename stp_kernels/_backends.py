"""The one dispatch point: which backends exist, which can run here, and which one an op uses.

Choice order for ``backend=None``: the ``STP_KERNEL_BACKEND`` environment variable if set, else the fastest
available for the tensors' device (CUDA: gemm, cuda, triton, torch_chunked; CPU: cpu, torch_chunked). Triton on a
machine without CUDA runs through Triton's interpreter (``TRITON_INTERPRET=1``, set here before triton is first
imported unless the user set it): correct but about a thousand times slower, so it is never a CPU default.

First-use self-check (``_selfcheck``): the first call of an op on a CUDA device runs every compiled backend once on
a small problem against float64, per dtype; one that fails is disabled for the process for that dtype (one warning
naming it, the dtype and the error; ``backend_status`` shows why) and dispatch moves to the next. A backend named by
``backend=`` or ``$STP_KERNEL_BACKEND`` is checked the same way before its first use. ``$STP_KERNEL_SELFCHECK=1``
also runs it on CPU.
"""

from __future__ import annotations

import importlib
import logging
import os
import warnings
from types import ModuleType

import torch

from . import _selfcheck
from . import _status
from ._status import _triton_env_ok, report_fallback  # noqa: F401  (re-exported)

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
# (op, backend, device type) -> {dtype name: the self-check's error}: a backend fails per dtype (a float32 failure
# leaves it in use for bfloat16).
_disabled: dict[tuple[str, str, str], dict[str, str]] = {}
_self_checked: dict[tuple[str, str], dict[str, str]] = {}  # (op, device type) -> verdict per checked backend


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


def _disabled_for(op: str, name: str, dev: str, dtype: torch.dtype | None) -> str | None:
    """The self-check's error that disables ``name`` for ``dtype`` (any dtype when None), else None."""
    failed = _disabled.get((op, name, dev))
    if not failed:
        return None
    if dtype is None:
        return "; ".join(f"{k}: {v}" for k, v in failed.items())
    return failed.get(str(dtype).removeprefix("torch."))


def backend_status(device: str | torch.device | None = None, op: str = "masked_logprob",
                   dtype: torch.dtype | None = None) -> dict[str, str]:
    """Each backend's status on ``device`` ("cpu" or "cuda") for ``dtype`` (None: any dtype): ``"available"``,
    ``"available (fallback: ...)"`` when it runs on a slower path than it was built for (reported once with a
    warning too, see ``report_fallback``), or the reason it cannot run."""
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
        elif (error := _disabled_for(op, name, dev, dtype)) is not None:
            status[name] = f"disabled: failed the first-use self-check ({error})"
        else:
            notes = [why for (n, d), why in _status._fallbacks.items() if n == name and d == dev]
            status[name] = "available" + (f" (fallback: {'; '.join(notes)})" if notes else "")
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
        errors = _selfcheck.run(op, module, dev)  # {dtype name: error or None}
        failed = {k: v for k, v in errors.items() if v is not None}
        verdicts[name] = "passed" if not failed else "; ".join(failed.values())
        known = _disabled.get((op, name, dev), {})
        if not failed:
            _disabled.pop((op, name, dev), None)
        elif failed.keys() != known.keys():
            _disabled[(op, name, dev)] = failed
            passed = [k for k, v in errors.items() if v is None]
            warnings.warn(f"stp_kernels: backend {name!r} failed its first-use self-check for {op} on {dev} and is "
                          f"disabled for {', '.join(failed)} in this process"
                          f"{' (passed: ' + ', '.join(passed) + ')' if passed else ''}: {verdicts[name]}",
                          RuntimeWarning, stacklevel=3)
    return verdicts


def _reset_self_check() -> None:
    """Forget verdicts (tests)."""
    _disabled.clear()
    _self_checked.clear()


def available_backends(device: str | torch.device | None = None, op: str = "masked_logprob",
                       dtype: torch.dtype | None = None) -> list[str]:
    """Backends that can run ``op`` here (for ``dtype``; None: every dtype). With no ``device``: the union over CPU
    and, if present, CUDA."""
    if device is None:
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
        names: list[str] = []
        for d in devices:
            names += [n for n in available_backends(d, op, dtype) if n not in names]
        return [n for n in BACKENDS if n in names]
    return [n for n, s in backend_status(device, op, dtype).items() if s.startswith("available")]


def _device_type(device) -> str:
    if device is None:
        return "cpu"
    dev = torch.device(device).type if not isinstance(device, torch.device) else device.type
    if dev not in ("cpu", "cuda"):
        raise ValueError(f"stp_kernels: device type {dev!r} is not supported (allowed: 'cpu', 'cuda')")
    return dev


def resolve(op: str, backend: str | None, device: torch.device,
            dtype: torch.dtype | None = None) -> tuple[str, ModuleType | None]:
    """Pick the backend for a call on ``dtype`` inputs; raise a clear error when a named one cannot run."""
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
        status = backend_status(dev, op, dtype)[requested]
        if not status.startswith("available"):
            raise RuntimeError(
                f"stp_kernels.{op}: {source}{requested!r} cannot run on {dev} tensors here: {status}. "
                f"Available: {', '.join(available_backends(dev, op, dtype))}"
            )
        _announce(op, requested, dev)
        return requested, _load(op, requested, dev)
    for name in _DEFAULT_ORDER[dev]:
        module = _load(op, name, dev)
        if module is not None and _disabled_for(op, name, dev, dtype) is None:
            _announce(op, name, dev)
            return name, module
    raise RuntimeError(f"stp_kernels.{op}: no backend can run on {dev}")  # unreachable: torch_chunked always loads


def _announce(op: str, name: str, dev: str) -> None:
    key = (op, name, dev)
    if key not in _announced:
        _announced.add(key)
        log.info("stp_kernels.%s uses the %r backend on %s tensors", op, name, dev)
