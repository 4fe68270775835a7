"""csrc/ on its own: the CMake build with its C++ test, and every CUDA source compiled by nvcc for sm_90a.

Nothing CUDA runs on a machine without a GPU; compiling every .cu here keeps the CUDA kernels building. Set
STP_REQUIRE_NVCC=1 (CI does) to make a missing nvcc a failure instead of a skip.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_SOURCES = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))


def _nvcc() -> str:
    path = shutil.which("nvcc") or next(
        (p for p in ("/usr/local/cuda/bin/nvcc", "/usr/local/bin/nvcc") if os.path.exists(p)), None)
    if path is None:
        if os.environ.get("STP_REQUIRE_NVCC") == "1":
            pytest.fail("STP_REQUIRE_NVCC=1 but nvcc is not on PATH")
        pytest.skip("nvcc not found: CUDA sources not compiled on this machine")
    return path


def _run(cmd: list[str], cwd: str, timeout: int = 600) -> str:
    res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    tail = f"{res.stdout[-4000:]}\n{res.stderr[-4000:]}"
    assert res.returncode == 0, f"{' '.join(cmd)} failed ({res.returncode}):\n{tail}"
    return res.stdout + res.stderr


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake not installed")
def test_cmake_build_and_cpp_tests(tmp_path):
    build = str(tmp_path / "build")
    _run(["cmake", "-S", ROOT, "-B", build, "-DSTP_BUILD_CUDA=OFF"], ROOT)
    _run(["cmake", "--build", build, "-j", "2"], ROOT)
    out = _run(["ctest", "--test-dir", build, "--output-on-failure"], ROOT)
    assert "100% tests passed" in out, out


# The quick run compiles the first source; the full run (CI) every one (3-5 s of nvcc each).
@pytest.mark.parametrize("source", [pytest.param(os.path.relpath(p, ROOT), marks=[pytest.mark.slow] if i else [])
                                    for i, p in enumerate(CUDA_SOURCES)])
def test_cuda_source_compiles_for_sm90a(source, tmp_path):
    nvcc = _nvcc()
    out = _run([nvcc, "-std=c++17", "-O3", "-gencode=arch=compute_90a,code=sm_90a", "-Icsrc/cuda", "-c", source,
                "-o", str(tmp_path / "out.o")], ROOT)
    assert "warning" not in out.lower(), f"nvcc warnings for {source}:\n{out}"


def test_cuda_sources_exist():
    assert any(os.path.basename(p) == "masked_logprob.cu" for p in CUDA_SOURCES), CUDA_SOURCES
