"""Benchmark plumbing: every row also gets its peak memory and its min / median / max over the timed rounds, each
group's side-by-side table is printed as soon as the group finishes, and the run ends with all of them.

`pytest benchmarks/ --benchmark-only` runs the quick default (the shapes the README's tables quote, the rest at
their smaller sizes); ``--full`` (or ``STP_BENCH_FULL=1``) adds the sweep: torch.compile, the LLaDA-proportioned
likelihood shape. Tests are reordered so that the variants of one group run one after the other.

The table (markdown, ``benchmarks/_report.py``) is printed at the end and, with ``STP_BENCH_MD=path``, written to
that file with the device, versions, date, the 1-minute load average at the start and end of the run, and a warning
when the machine was busy (load above the core count, or a row whose rounds spread more than ``SPREAD_LIMIT``).
"""

from __future__ import annotations

import os
import time

import pytest

from benchmarks._report import busy_warnings, device_line, format_table, load_average, load_line

ROWS: list[dict] = []
LOAD: dict[str, float | None] = {"start": load_average()}  # at import; the session start refines it
GROUPS: dict[str, float] = {"start": 0}  # ROWS index where the running group's rows begin, its CPU / wall start


def pytest_addoption(parser):
    parser.addoption("--full", action="store_true", default=False,
                     help="stp benchmarks: the full sweep (torch.compile, every shape) instead of the quick default")


def pytest_configure(config):
    if config.getoption("--full", default=False):
        os.environ["STP_BENCH_FULL"] = "1"  # read by the benchmark modules at import (benchmarks._report.full)


def pytest_sessionstart(session):
    LOAD["start"] = load_average()


def _group_key(item) -> tuple:
    """The tests of one table: the same function with the same parameters but its "variant" (a function without
    one: all its parameters are variants)."""
    callspec = getattr(item, "callspec", None)
    params = callspec.params if callspec is not None and "variant" in callspec.params else {}
    return (item.nodeid.split("::")[0], getattr(item, "originalname", item.name),
            tuple(sorted((k, repr(v)) for k, v in params.items() if k != "variant")))


def pytest_collection_modifyitems(session, config, items):
    """Each group's variants one after the other (stable otherwise), so that its table can print when it ends."""
    first: dict[tuple, int] = {}
    for i, item in enumerate(items):
        first.setdefault(_group_key(item), i)
    items.sort(key=lambda item: first[_group_key(item)])


def pytest_runtest_logfinish(nodeid, location):
    session = _SESSION.get("session")
    if session is None:
        return
    items = session.items
    index = next((i for i, it in enumerate(items) if it.nodeid == nodeid), None)
    if index is None or (index + 1 < len(items) and _group_key(items[index + 1]) == _group_key(items[index])):
        return
    rows, GROUPS["start"] = ROWS[GROUPS["start"]:], len(ROWS)
    cpu, wall = _cpu_seconds(), time.time()
    spent = f"{wall - GROUPS['wall']:.0f} s, {cpu - GROUPS['cpu']:.0f} CPU s (memory measurements included)"
    GROUPS["cpu"], GROUPS["wall"] = cpu, wall
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if rows and reporter is not None:
        reporter.write_line("")
        now = load_average()
        reporter.write_line(format_table(rows, [f"(group done in {spent}; 1-minute load average now "
                                                f"{'-' if now is None else f'{now:.2f}'})"]))


def _cpu_seconds() -> float:
    """CPU seconds of this process and its finished children (the memory-measuring subprocesses)."""
    import resource

    me, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime


_SESSION: dict = {}


@pytest.hookimpl(tryfirst=True)
def pytest_collection_finish(session):
    _SESSION["session"] = session
    GROUPS["cpu"], GROUPS["wall"] = _cpu_seconds(), time.time()


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
