"""stp_kernels: fused ops for RL on masked diffusion language models.

``masked_logprob`` -- LM head + log-softmax + target gather at scored rows only, never materialising [R, V].
``sample_step`` -- LM head + Gumbel-max sample (in-kernel counter-based noise) + confidence, per denoising step.
Backends: ``torch`` (plain reference), ``torch_chunked``, ``cpu`` (C++/OpenMP), ``triton``, ``cuda``, ``gemm``
(library matmul per vocabulary chunk + fused epilogue; the CUDA default); ``available_backends()`` lists those that
can run here and ``backend_status()`` says why the others cannot, including a backend disabled by the first-use
self-check (``self_check``, run on CUDA devices). ``python -m stp_kernels.acceptance`` checks and times them on a GPU.
"""

from ._backends import available_backends, backend_status, self_check
from .masked_logprob import masked_logprob
from .noise_masks import noise_masks
from .reference import counter_gumbel, masked_logprob_reference, sample_step_reference
from .sample_step import sample_step

__all__ = ["available_backends", "backend_status", "counter_gumbel", "masked_logprob", "masked_logprob_reference",
           "noise_masks", "sample_step", "sample_step_reference", "self_check"]
__version__ = "0.1.0"
