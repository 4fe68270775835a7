"""What the ``gemm`` backends of ``masked_logprob`` and ``sample_step`` share: settings, the chunk matmul with a
float32 output, the choice of epilogue (Triton or torch), the torch epilogues, and the two-stream chunk pipeline.

Structure (both ops): the vocabulary is split in chunks of ``settings.chunk`` slots. Per chunk one library matmul
(torch.mm: cuBLAS on CUDA, BLAS on CPU) writes z = h @ W[chunk].T as float32 [R, chunk] into a reused buffer, then
an epilogue reads the chunk once and folds it into per-row state. Extra memory is O(R * chunk), independent of V.

On CUDA the epilogue of chunk c runs on a second stream while the matmul of chunk c + 1 runs on the caller's
stream; two buffers alternate and events order every hand-over (``Pipeline``). The per-row state is touched only
by the epilogue stream, one chunk after the other, so the result does not depend on timing.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType

import torch

from .reference import counter_uniform


def _env_int(name: str, default: int | None) -> int | None:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        parsed = int(value)
    except ValueError:
        raise ValueError(f"stp_kernels: ${name}={value!r} is not an integer (vocabulary slots per chunk)") from None
    if parsed < 1:
        raise ValueError(f"stp_kernels: ${name}={value!r} must be >= 1 (vocabulary slots per chunk)")
    return parsed


@dataclass
class GemmSettings:
    """Settings of the ``gemm`` backends (module-level ``settings``; also read from the environment at import)."""

    chunk: int | None = field(default_factory=lambda: _env_int("STP_GEMM_CHUNK", None), metadata={
        "help": "vocabulary slots per matmul ($STP_GEMM_CHUNK); None (default) scales with the rows R: "
                "chunk_elements / R slots, at least 4096, rounded up to a multiple of 256 (see chunk_size)."})
    chunk_elements: int = field(default_factory=lambda: _env_int("STP_GEMM_CHUNK_ELEMENTS", 1 << 24), metadata={
        "help": "float32 logits per chunk buffer when the chunk scales with R ($STP_GEMM_CHUNK_ELEMENTS; 2**24 = "
                "64 MiB): 8192 slots at R = 2048, 32768 at R = 512; R > 4096 rows get 4096 slots."})
    epilogue: str = field(default_factory=lambda: os.environ.get("STP_GEMM_EPILOGUE", "auto"), metadata={
        "help": "'auto' (Triton on CUDA, torch on CPU: Triton's CPU interpreter is for tests), 'triton' or "
                "'torch' ($STP_GEMM_EPILOGUE)."})
    overlap: bool = field(default=True, metadata={
        "help": "CUDA: run the epilogue of chunk c on a second stream, overlapping the matmul of chunk c + 1."})


settings = GemmSettings()
EPILOGUES = ("auto", "triton", "torch")


MIN_CHUNK = 4096


def chunk_size(rows: int) -> int:
    """Vocabulary slots per chunk for R = ``rows``: ``settings.chunk`` when set, else chunk_elements / R (at least
    4096, a multiple of 256). Fewer, wider chunks at small R: fewer matmul and epilogue launches and host steps.

    Memory bound (extra, beyond the outputs): forward 2 float32 [R, chunk] buffers (one on a single stream) =
    8 * max(chunk_elements, 4096 R) bytes: 128 MiB for R <= 4096 at the default; backward adds 2 dz buffers in the
    input dtype and the float32 [R, H] dh: at most 8 * max(...) + 2 * itemsize * max(...) + 4 R H bytes
    (R = 2048, H = 4096, bf16: 128 + 64 + 32 = 224 MiB)."""
    if settings.chunk is not None:
        if not isinstance(settings.chunk, int) or settings.chunk < 1:
            raise ValueError(f"stp_kernels gemm: settings.chunk = {settings.chunk!r}; it must be None or an int >= 1")
        return settings.chunk
    budget = settings.chunk_elements
    if not isinstance(budget, int) or budget < 1:
        raise ValueError(f"stp_kernels gemm: settings.chunk_elements = {budget!r}; it must be an int >= 1")
    return max(MIN_CHUNK, -(-(budget // max(rows, 1)) // 256) * 256)


def epilogue_module(device: torch.device) -> ModuleType | None:
    """The Triton epilogue module when it is chosen and can run on ``device``, else None (torch epilogue)."""
    choice = settings.epilogue
    if choice not in EPILOGUES:
        raise ValueError(f"stp_kernels gemm: settings.epilogue = {choice!r}; allowed: {', '.join(EPILOGUES)}")
    if choice == "torch" or (choice == "auto" and device.type != "cuda"):
        return None
    from . import _status

    reason = _status._triton_env_ok(device.type)
    try:
        if reason:
            raise RuntimeError(reason)
        from .triton import epilogue
        epilogue.check()
    except Exception as exc:
        if choice == "triton":
            raise RuntimeError(f"stp_kernels gemm: settings.epilogue = 'triton' but Triton cannot run on "
                               f"{device.type}: {type(exc).__name__}: {exc}") from exc
        _status.report_fallback("gemm", device.type, f"torch epilogues instead of the fused Triton ones (several "
                                  f"passes over each chunk) because Triton cannot run: {type(exc).__name__}: {exc}")
        return None  # auto: torch epilogue
    return epilogue


# ------------------------------------------------------------------------------------------------ matmuls

_fp32_out: dict[tuple[str, torch.dtype], bool] = {}
# Device types whose library is expected to multiply 16-bit operands into a float32 output (torch >= 2.8 on CUDA:
# the ``out_dtype`` overloads of mm / addmm). Elsewhere (CPU) 16-bit operands are multiplied in float32 by design.
_LIBRARY_DEVICES = ("cuda",)


def _library_fp32_out(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether torch.mm(..., out_dtype=float32) works for 16-bit operands on this device (CUDA builds of torch >=
    2.8: cuBLAS accumulates in float32 and writes float32). Probed once on tiny operands, checked for value; when it
    fails the slower path (operands upcast to float32) is reported once (``_status.report_fallback``)."""
    key = (str(device), dtype)
    if key not in _fp32_out:
        ok, why = False, None
        if device.type in _LIBRARY_DEVICES:
            try:
                a = torch.randn(8, 16, device=device).to(dtype)
                b = torch.randn(16, 8, device=device).to(dtype)
                out = torch.empty(8, 8, device=device)
                torch.mm(a, b, out_dtype=torch.float32, out=out)
                ok = bool(torch.allclose(out, a.float() @ b.float(), rtol=1e-3, atol=1e-3))
                why = None if ok else "its result differs from the float32 product (16-bit accumulation?)"
            except (RuntimeError, TypeError, NotImplementedError) as exc:
                why = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        _fp32_out[key] = ok
        if why is not None:
            from . import _status

            _status.report_fallback(
                "gemm", device.type, f"{dtype} operands are upcast to float32 for every chunk matmul (no tensor-core "
                f"16-bit product; ~15x slower on an H100) because torch.mm(out_dtype=float32) failed: {why}. "
                f"Needs torch >= 2.8 (this is {torch.__version__})")
    return _fp32_out[key]


def operand(h: torch.Tensor) -> torch.Tensor:
    """The matmul operand for ``h``: itself when the library multiplies its dtype into float32, else float32."""
    if h.dtype == torch.float32 or _library_fp32_out(h.device, h.dtype):
        return h
    return h.float()


def mm_f32(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out (float32) = a @ b with float32 accumulation; a and b share a dtype (see ``operand``)."""
    if a.dtype == torch.float32 and b.dtype != torch.float32:
        b = b.float()
    if a.dtype == torch.float32:
        return torch.mm(a, b, out=out)
    return torch.mm(a, b, out_dtype=torch.float32, out=out)


def weight_chunk(w: torch.Tensor, vocab_ids: torch.Tensor | None, start: int, stop: int) -> torch.Tensor:
    """W[sel(v)] for slots start..stop-1: a view without a prior, a gathered copy [stop - start, H] with one."""
    return w[start:stop] if vocab_ids is None else w.index_select(0, vocab_ids[start:stop])


# ------------------------------------------------------------------------------------------------ pipeline


_side_streams: dict[int, torch.cuda.Stream] = {}


class Pipeline:
    """Matmuls on the caller's stream, epilogues on a side stream (CUDA with ``settings.overlap``), else inline.

    Buffers allocated here are allocated on the caller's stream and used by both; ``join`` makes the caller's stream
    wait for all epilogue work, so by the time any buffer is freed (after ``join``) the caching allocator cannot
    hand its memory to new work that could race with an epilogue still running.
    """

    def __init__(self, device: torch.device):
        self.on = device.type == "cuda" and settings.overlap
        if self.on:
            self.main = torch.cuda.current_stream(device)
            index = device.index if device.index is not None else torch.cuda.current_device()
            if index not in _side_streams:
                _side_streams[index] = torch.cuda.Stream(device=device)
            self.side_stream = _side_streams[index]

    def mark(self, on_side: bool = False):
        """An event recorded now on the main (or side) stream; None when not overlapping."""
        if not self.on:
            return None
        event = torch.cuda.Event()
        event.record(self.side_stream if on_side else self.main)
        return event

    def wait(self, event, on_side: bool = False) -> None:
        if event is not None:
            (self.side_stream if on_side else self.main).wait_event(event)

    def side(self):
        return torch.cuda.stream(self.side_stream) if self.on else contextlib.nullcontext()

    def join(self) -> None:
        if self.on:
            self.main.wait_stream(self.side_stream)


def chunks(vocab_size: int, rows: int) -> list[tuple[int, int]]:
    step = chunk_size(rows)
    return [(start, min(start + step, vocab_size)) for start in range(0, vocab_size, step)]


class Buffers:
    """Two float32 [R, chunk] buffers used alternately; a chunk narrower than ``chunk`` gets a contiguous view."""

    def __init__(self, rows: int, width: int, device: torch.device, dtype: torch.dtype, count: int):
        self.flat = [torch.empty(rows * width, dtype=dtype, device=device) for _ in range(count)]
        self.rows = rows

    def get(self, index: int, width: int) -> torch.Tensor:
        return self.flat[index % len(self.flat)][: self.rows * width].view(self.rows, width)


# ------------------------------------------------------------------------------------------------ torch epilogues
# The same arithmetic as the Triton kernels in triton/epilogue.py, in torch ops (CPU default, and where Triton is
# absent). Each epilogue walks the chunk in slabs of rows of about 2**20 elements, so its temporaries stay at a few
# MiB (and in cache) whatever the chunk; the chunk ``z`` is scratch and may be overwritten.

_SLAB_ELEMS = 1 << 20


def fold_chunks(h: torch.Tensor, w: torch.Tensor, vocab_ids: torch.Tensor | None, vocab_size: int,
                fold: Callable[[torch.Tensor, int], None]) -> None:
    """The forward's chunk loop, shared by masked_logprob and sample_step: per vocabulary chunk one library matmul
    into a float32 [R, chunk] buffer, then ``fold(z, start)`` (the epilogue). On CUDA the epilogue of chunk c runs on
    the side stream while chunk c+1 multiplies into the other buffer; a buffer is reused only after the epilogue
    that last read it has finished."""
    pipe = Pipeline(h.device)
    parts = chunks(vocab_size, h.shape[0])
    lhs = operand(h)
    bufs = Buffers(h.shape[0], parts[0][1], h.device, torch.float32, 2 if pipe.on else 1)
    free = [None, None]  # per buffer: the epilogue that last read it has finished
    try:
        for c, (start, stop) in enumerate(parts):
            z = bufs.get(c, stop - start)
            pipe.wait(free[c % 2])
            mm_f32(lhs, weight_chunk(w, vocab_ids, start, stop).T, z)
            ready = pipe.mark()
            with pipe.side():
                pipe.wait(ready, on_side=True)
                fold(z, start)
                free[c % 2] = pipe.mark(on_side=True)
    finally:  # also when a chunk raises: the buffers are freed only after the side stream's work on them
        pipe.join()


def _slabs(rows: int, width: int):
    step = max(1, _SLAB_ELEMS // max(width, 1))
    for r0 in range(0, rows, step):
        yield slice(r0, min(r0 + step, rows))


def _online_lse(z: torch.Tensor, r: slice, m: torch.Tensor, s: torch.Tensor, sz: torch.Tensor | None) -> None:
    """Fold logits z [rows of r, chunk] into the running max m, sum exp s and (when given) sum exp * z of rows r."""
    m_new = torch.maximum(m[r], z.amax(1))
    alpha = torch.exp(m[r] - m_new)
    e = torch.sub(z, m_new[:, None]).exp_()
    s[r] = s[r] * alpha + e.sum(1)
    if sz is not None:
        sz[r] = sz[r] * alpha + e.mul_(z).sum(1)
    m[r] = m_new


def torch_fold_lse(z, start, inv_temp, tgt, m, s, sz, tgt_logit) -> None:
    width = z.shape[1]
    for r in _slabs(z.shape[0], width):
        zt = z[r] if inv_temp == 1.0 else z[r].mul_(inv_temp)
        _online_lse(zt, r, m, s, sz)
        local = tgt[r] - start
        hit = (local >= 0) & (local < width)
        picked = zt.gather(1, local.clamp(0, width - 1)[:, None])[:, 0]
        tgt_logit[r] = torch.where(hit, picked, tgt_logit[r])


def torch_logit_grad(z, start, inv_temp, tgt, lse, g_tgt, a, b, dz) -> None:
    """dz may be ``z`` itself (same float32 buffer): each slab is read into a temporary before it is written."""
    width = z.shape[1]
    for r in _slabs(z.shape[0], width):
        zt = z[r] if inv_temp == 1.0 else z[r].mul_(inv_temp)
        grad = torch.sub(zt, lse[r, None]).exp_()  # p
        if b is None:
            grad.mul_(a[r, None])
        else:
            grad.mul_(zt.mul_(-b[r, None]).add_(a[r, None]))  # p (a - b z); this slab of z is spent
        local = tgt[r] - start
        hit = (local >= 0) & (local < width)
        bump = torch.where(hit, g_tgt[r], torch.zeros_like(g_tgt[r]))
        grad.scatter_add_(1, local.clamp(0, width - 1)[:, None], bump[:, None])
        dz[r] = grad.mul_(inv_temp)


def torch_fold_sample(z, start, inv_temp, greedy, keys, vocab_ids, best, slot, z_sel, m, s, sz, st=None) -> None:
    width = z.shape[1]
    tokens = None
    if not greedy:
        tokens = (torch.arange(start, start + width, device=z.device) if vocab_ids is None
                  else vocab_ids[start:start + width])
    for r in _slabs(z.shape[0], width):
        zr = z[r]
        if greedy:
            score = zr
        else:
            score = zr * inv_temp - torch.log(-torch.log(counter_uniform(keys[r], tokens)))
        carg = score.argmax(dim=1)  # argmax documents the first maximal index
        cmax = score.gather(1, carg[:, None])[:, 0]
        better = cmax > best[r]  # strict: an earlier chunk keeps ties
        best[r] = torch.where(better, cmax, best[r])
        slot[r] = torch.where(better, carg + start, slot[r])
        z_sel[r] = torch.where(better, zr.gather(1, carg[:, None])[:, 0], z_sel[r])
        if st is not None:  # tempered sum exp((z - m) * inv_temp), on the running max of z before this chunk
            m_new = torch.maximum(m[r], zr.amax(1))
            st[r] = st[r] * torch.exp((m[r] - m_new) * inv_temp) + torch.sub(zr, m_new[:, None]).mul_(
                inv_temp).exp_().sum(1)
        _online_lse(zr, r, m, s, sz)
