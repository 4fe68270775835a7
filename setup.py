"""Build of stp's compiled kernels.

- ``stp_kernels._C_cpu``: C++ with OpenMP (csrc/cpu), always built.
- ``stp_kernels._C_cuda``: CUDA for sm_90a (csrc/cuda), built when ``STP_CUDA`` allows it:
  ``STP_CUDA=auto`` (default) builds it when torch has CUDA and nvcc is found, ``1`` requires it, ``0`` skips it.
  Torch with CUDA is the GPU machine's own install, so build there with ``pip install --no-build-isolation -e .``.
- ``STP_NO_EXT=1`` builds no extension at all (the package then runs on its pure-torch and Triton backends).
"""

import glob
import os
import shutil

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
CXX_FLAGS = ["-O3", "-std=c++17", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-Wall", "-Wextra",
             "-Wno-unused-parameter"]


def _cuda_wanted(torch_mod) -> bool:
    mode = os.environ.get("STP_CUDA", "auto").strip().lower()
    if mode not in ("0", "1", "auto"):
        raise SystemExit(f"setup.py: STP_CUDA={mode!r} is not allowed; use 0, 1 or auto")
    from torch.utils.cpp_extension import CUDA_HOME

    has_nvcc = CUDA_HOME is not None and shutil.which(os.path.join(CUDA_HOME, "bin", "nvcc")) is not None
    has_torch_cuda = torch_mod.version.cuda is not None
    if mode == "1" and not (has_nvcc and has_torch_cuda):
        raise SystemExit(
            "setup.py: STP_CUDA=1 but the CUDA extension cannot be built: "
            f"torch {torch_mod.__version__} has CUDA: {has_torch_cuda}; "
            f"nvcc found: {has_nvcc} (CUDA_HOME={CUDA_HOME}). "
            "Install a CUDA build of torch and build with `pip install --no-build-isolation -e .`."
        )
    return mode != "0" and has_nvcc and has_torch_cuda


def extensions():
    if os.environ.get("STP_NO_EXT") == "1":
        return [], {}
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    rel = lambda pattern: sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))  # noqa: E731
    exts = [
        CppExtension(
            "stp_kernels._C_cpu",
            rel("csrc/cpu/*.cpp"),
            include_dirs=[os.path.join(ROOT, "csrc", "cpu")],
            extra_compile_args={"cxx": CXX_FLAGS},
            extra_link_args=["-fopenmp"],
        )
    ]
    if _cuda_wanted(torch):
        exts.append(
            CUDAExtension(
                "stp_kernels._C_cuda",
                [p for p in rel("csrc/cuda/*.cu") if not os.path.basename(p).startswith("test_")]
                + rel("csrc/cuda/bindings.cpp"),
                include_dirs=[os.path.join(ROOT, "csrc", "cuda")],
                extra_compile_args={
                    "cxx": ["-O3", "-std=c++17"],
                    "nvcc": ["-O3", "-std=c++17", "-gencode=arch=compute_90a,code=sm_90a", "-lineinfo"],
                },
            )
        )
    return exts, {"build_ext": BuildExtension}


ext_modules, cmdclass = extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
