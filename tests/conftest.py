"""Shared test setup: Triton's interpreter on machines without CUDA, fresh random seeds that are reported."""

import os
import secrets

# Must precede the first import of triton (anything may import it once torch is in).
if not os.environ.get("CUDA_VISIBLE_DEVICES") and "TRITON_INTERPRET" not in os.environ:
    try:
        import torch

        if not torch.cuda.is_available():
            os.environ["TRITON_INTERPRET"] = "1"
    except ImportError:
        pass

import pytest


@pytest.fixture
def seed(request):
    """A fresh seed per test (inputs are new every run); printed in the report when the test fails."""
    value = int(os.environ.get("STP_TEST_SEED", secrets.randbits(31)))
    request.node.user_properties.append(("seed", value))
    return value


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for key, value in item.user_properties:
            if key == "seed":
                report.sections.append(("seed", f"rerun with STP_TEST_SEED={value}"))


def _interpreted_triton_case(item) -> bool:
    """A parametrized case that runs a Triton kernel through the interpreter (one of its ids is ``triton``)."""
    callspec = getattr(item, "callspec", None)
    if callspec is None or os.environ.get("TRITON_INTERPRET") != "1":
        return False
    return "triton" in callspec.id.split("-")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """The quick run keeps one Triton-interpreter case per test function (the first collected) and marks the rest
    of that function's Triton cases ``slow``: the interpreter is ~1000x slower than the kernel, and the grid of
    dtypes, temperatures and shapes is the full run's (CI runs every case). On a GPU nothing is marked."""
    kept: set[tuple[str, str]] = set()
    for item in items:
        if not _interpreted_triton_case(item):
            continue
        key = (item.nodeid.split("::")[0], item.originalname)
        if key in kept:
            item.add_marker(pytest.mark.slow)
        else:
            kept.add(key)
