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
