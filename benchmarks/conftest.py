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


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def _table() -> str:
    """One markdown table per group. A row is ``record(group=, variant=, base=, **columns)``; numeric columns named
    "median ms" and "peak MiB" also get a ratio to the group's ``base`` variant."""
    lines = [f"Device: {_device_line()}", ""]
    groups: dict[str, list[dict]] = {}
    for row in ROWS:
        groups.setdefault(row["group"], []).append(row)
    for group, rows in groups.items():
        base_name = rows[0].get("base")
        base = next((r for r in rows if r["variant"] == base_name), None)
        columns = [c for c in rows[0] if c not in ("group", "variant", "base")]
        head = ["variant"]
        for c in columns:
            head.append(c)
            if c in ("median ms", "peak MiB") and base is not None:
                head.append(f"vs {base_name}")
        lines += [f"**{group}**", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in rows:
            cells = [r["variant"]]
            for c in columns:
                v = r.get(c)
                cells.append("-" if v is None else _fmt(v))
                if c in ("median ms", "peak MiB") and base is not None:
                    ok = v is not None and base.get(c)
                    cells.append(f"{v / base[c]:.3f}x" if ok else "-")
            lines.append("| " + " | ".join(cells) + " |")
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
