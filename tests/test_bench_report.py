"""The benchmark table's spread columns and its busy-machine warning (benchmarks/_report.py)."""

from __future__ import annotations

import pytest

from benchmarks._report import SPREAD_LIMIT, busy_warnings, format_table


def row(variant, lo, med, hi, **extra):
    return {"group": "g", "variant": variant, "base": "naive", "median ms": med, "peak MiB": 10.0, "min ms": lo,
            "max ms": hi, **extra}


@pytest.mark.parametrize("start, end, cores, busy", [
    (0.3, 1.9, 2, False),     # below the core count at both ends
    (2.0, 2.0, 2, False),     # equal is not above
    (2.5, 0.2, 2, True),      # busy at the start
    (0.2, 7.0, 2, True),      # busy at the end
    (7.0, 7.0, 16, False),    # the same load on 16 cores is quiet
    (None, None, 2, False),   # no load average on this OS: nothing to say
    (None, 3.0, 2, True),
])
def test_load_average_warning(start, end, cores, busy):
    lines = busy_warnings(start, end, cores, [row("naive", 10.0, 10.5, 11.0)])
    assert bool(lines) == busy, lines
    if busy:
        assert "busy" in lines[0] and f"above its {cores} cores" in lines[0]


def test_spread_warning_names_the_rows():
    quiet = row("naive", 10.0, 11.0, 10.0 * SPREAD_LIMIT)  # exactly at the limit: not above it
    wide = row("stp_cpu", 5.0, 6.0, 5.0 * SPREAD_LIMIT * 1.01)
    assert busy_warnings(0.1, 0.1, 2, [quiet]) == []
    (line,) = busy_warnings(0.1, 0.1, 2, [quiet, wide])
    assert "g: stp_cpu 1.52x" in line and "naive" not in line and "1 rows" in line
    assert len(busy_warnings(5.0, 0.1, 2, [quiet, wide])) == 2
    assert busy_warnings(0.1, 0.1, 2, [{"group": "g", "variant": "m", "peak MiB": 3.0}]) == []  # memory-only row


def test_table_shows_min_median_max_and_ratios():
    text = format_table([row("naive", 90.0, 100.0, 120.0), row("stp_cpu", 40.0, 50.0, 55.0, rounds=5)],
                        ["Device: test", "WARNING: the machine was busy"])
    lines = text.splitlines()
    assert lines[:2] == ["Device: test", "WARNING: the machine was busy"]
    head = next(ln for ln in lines if ln.startswith("| variant"))
    assert head == "| variant | min ms | median ms | vs naive | max ms | peak MiB | vs naive | rounds |"
    assert "| stp_cpu | 40.0 | 50.0 | 0.500x | 55.0 | 10.0 | 1.000x | 5 |" in lines
    assert "| naive | 90.0 | 100.0 | 1.000x | 120.0 | 10.0 | 1.000x | - |" in lines
