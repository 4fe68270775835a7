"""stp_kernels: fused ops for RL on masked diffusion language models.

``masked_logprob`` -- LM head + log-softmax + target gather at scored rows only, never materialising [R, V].
Backends: ``torch`` (plain reference), ``torch_chunked``, ``cpu`` (C++/OpenMP), ``triton``, ``cuda``;
``available_backends()`` lists those that can run here and ``backend_status()`` says why the others cannot.
"""

from ._backends import available_backends, backend_status
from .masked_logprob import masked_logprob
from .reference import masked_logprob_reference

__all__ = ["available_backends", "backend_status", "masked_logprob", "masked_logprob_reference"]
__version__ = "0.1.0"
