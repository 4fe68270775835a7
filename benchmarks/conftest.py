"""Benchmark plumbing: every row also gets its peak memory and its min / median / max over the timed rounds, and the
run ends with one side-by-side table.

The table (markdown, ``benchmarks/_report.py``) is printed at the end of `pytest benchmarks/ --benchmark-only` and,
with ``STP_BENCH_MD=path``, written to that file with the device, versions, date, the 1-minute load average at the
start and end of the run, and a warning when the machine was busy (load above the core count, or a row whose rounds
spread more than ``SPREAD_LIMIT``).
"""

from __future__ import annotations

import os

import pytest

from benchmarks._report import busy_warnings, device_line, format_table, load_average, load_line

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


def pytest_terminal_summary(terminalreporter):
    if not ROWS:
        return
    end = load_average()
    warnings = busy_warnings(LOAD.get("start"), end, os.cpu_count() or 1, ROWS)
    text = format_table(ROWS, [f"Device: {device_line()}", load_line(LOAD.get("start"), end), *warnings])
    terminalreporter.write_sep("=", "stp benchmark summary (side by side, one run)")
    terminalreporter.write_line(text)
    path = os.environ.get("STP_BENCH_MD")
    if path:
        with open(path, "w") as f:
            f.write(text + "\n")
        terminalreporter.write_line(f"written to {path}")
