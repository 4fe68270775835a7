"""Benchmark plumbing: every row also gets its peak memory and its min / median / max over the timed rounds, and the
run ends with one side-by-side table.

The table (markdown, ``benchmarks/_report.py``) is printed at the end of `pytest benchmarks/ --benchmark-only` and,
with ``STP_BENCH_MD=path``, written to that file with the device, versions, date, the 1-minute load average at the
start and end of the run, and a warning when the machine was busy (load above the core count, or a row whose rounds
spread more than ``SPREAD_LIMIT``).
"""

from __future__ import annotations

import datetime
import os
import platform

import pytest

from benchmarks._report import busy_warnings, format_table, load_average

ROWS: list[dict] = []
LOAD: dict[str, float | None] = {"start": load_average()}  # at import; the session start refines it


def pytest_sessionstart(session):
    LOAD["start"] = load_average()


@pytest.fixture
def record(request):
    """``record(group=, variant=, base=, **columns)``; a test that also uses ``benchmark`` gets "min ms" and
    "max ms" (over its timed rounds) next to its "median ms"."""
    def add(**row):
        bench = request.node.funcargs.get("benchmark")
        stats = getattr(getattr(bench, "stats", None), "stats", None)
        if stats is not None and "median ms" in row:
            row["min ms"], row["max ms"] = stats.min * 1e3, stats.max * 1e3
            row.setdefault("rounds", stats.rounds)
        ROWS.append(row)

    return add


def _device_line() -> str:
    import torch

    if torch.cuda.is_available():
        dev = torch.cuda.get_device_name()
    else:
        cpu = platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
        except OSError:
            pass
        dev = f"CPU ({cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    try:
        import triton

        tri = triton.__version__
    except ImportError:
        tri = "absent"
    return (f"{dev}; torch {torch.__version__}, triton {tri}, python {platform.python_version()}; "
            f"{datetime.date.today().isoformat()}")


def _load_line(start: float | None, end: float | None) -> str:
    def show(v):
        return "n/a" if v is None else f"{v:.2f}"

    return f"1-minute load average: {show(start)} at the start, {show(end)} at the end ({os.cpu_count()} cores)"


def pytest_terminal_summary(terminalreporter):
    if not ROWS:
        return
    end = load_average()
    warnings = busy_warnings(LOAD.get("start"), end, os.cpu_count() or 1, ROWS)
    text = format_table(ROWS, [f"Device: {_device_line()}", _load_line(LOAD.get("start"), end), *warnings])
    terminalreporter.write_sep("=", "stp benchmark summary (side by side, one run)")
    terminalreporter.write_line(text)
    path = os.environ.get("STP_BENCH_MD")
    if path:
        with open(path, "w") as f:
            f.write(text + "\n")
        terminalreporter.write_line(f"written to {path}")
