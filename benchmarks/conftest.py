"""Benchmark plumbing: every row also gets its peak memory, and the run ends with one side-by-side table.

The table (markdown) is printed at the end of `pytest benchmarks/ --benchmark-only` and, with
``STP_BENCH_MD=path``, written to that file with the device, versions and date.
"""

from __future__ import annotations

import datetime
import os
import platform

import pytest

ROWS: list[dict] = []


@pytest.fixture
def record():
    def add(**row):
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


def _table() -> str:
    lines = [f"Device: {_device_line()}", ""]
    groups: dict[str, list[dict]] = {}
    for row in ROWS:
        groups.setdefault(row["group"], []).append(row)
    for group, rows in groups.items():
        base = next((r for r in rows if r["variant"] == "naive_torch"), None)
        has_floor = any(r.get("floor_ms") for r in rows)
        lines += [f"**{group}**", ""]
        head = "| variant | median ms | vs naive | peak MiB | vs naive |" + (" floor fraction |" if has_floor else "")
        lines += [head, "|" + "---|" * (head.count("|") - 1)]
        for r in rows:
            t_ratio = f"{r['median_ms'] / base['median_ms']:.2f}x" if base else "-"
            m_ratio = f"{r['peak_mib'] / base['peak_mib']:.3f}x" if base and base["peak_mib"] > 0 else "-"
            line = f"| {r['variant']} | {r['median_ms']:.1f} | {t_ratio} | {r['peak_mib']:.1f} | {m_ratio} |"
            if has_floor:
                line += f" {r['floor_ms'] / r['median_ms']:.2f} |" if r.get("floor_ms") else " - |"
            lines.append(line)
        lines.append("")
    return "\n".join(lines)


def pytest_terminal_summary(terminalreporter):
    if not ROWS:
        return
    text = _table()
    terminalreporter.write_sep("=", "stp benchmark summary (side by side, one run)")
    terminalreporter.write_line(text)
    path = os.environ.get("STP_BENCH_MD")
    if path:
        with open(path, "w") as f:
            f.write(text + "\n")
        terminalreporter.write_line(f"written to {path}")
