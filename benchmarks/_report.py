"""The benchmark summary table: min / median / max over the timed rounds, ratios to a base variant, and a warning
when the machine was busy (timings taken on a loaded machine are not comparable with a quiet run).

Busy means: the 1-minute load average was above the number of cores at the start or at the end of the run
(other processes competed for the cores), or some row's max / min over its rounds exceeds ``SPREAD_LIMIT``
(rounds of one variant disagreeing that much means something else ran in between).
"""

from __future__ import annotations

import datetime
import os
import platform

__all__ = ["SPREAD_LIMIT", "device_line", "load_average", "load_line", "busy_warnings", "machine_lines",
           "format_table"]

SPREAD_LIMIT = 1.5  # max / min over a row's rounds; quiet 2-core runs of the CPU benchmarks stay well below it


def device_line() -> str:
    """The machine a number was measured on: device (CPU model, cores, torch threads), versions, date."""
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


def load_average() -> float | None:
    """The 1-minute load average, or None where the OS does not report one."""
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return None


def load_line(start: float | None, end: float | None) -> str:
    """'1-minute load average: S at the start, E at the end (N cores)'."""
    def show(v):
        return "n/a" if v is None else f"{v:.2f}"

    return f"1-minute load average: {show(start)} at the start, {show(end)} at the end ({os.cpu_count()} cores)"


def busy_warnings(load_start: float | None, load_end: float | None, cores: int, rows: list[dict],
                  spread_limit: float = SPREAD_LIMIT) -> list[str]:
    """Warning lines (empty when the run looks quiet). ``rows`` may carry "min ms" and "max ms".

    >>> busy_warnings(0.5, 0.9, 2, [{"group": "g", "variant": "a", "min ms": 10.0, "max ms": 11.0}])
    []
    >>> busy_warnings(3.1, 0.4, 2, [])[0][:60]
    'WARNING: the machine was busy: 1-minute load average 3.10 at'
    """
    out = []
    loads = {"start": load_start, "end": load_end}
    high = {when: v for when, v in loads.items() if v is not None and v > cores}
    if high:
        seen = ", ".join(f"{v:.2f} at the {when}" for when, v in loads.items() if v is not None)
        out.append(f"WARNING: the machine was busy: 1-minute load average {seen} of the run, above its {cores} "
                   f"cores; other processes shared the cores, so these timings are not comparable with a quiet run")
    wide = [r for r in rows if r.get("min ms") and r.get("max ms") is not None and r["max ms"] / r["min ms"] >
            spread_limit]
    if wide:
        names = "; ".join(f"{r['group']}: {r['variant']} {r['max ms'] / r['min ms']:.2f}x" for r in wide)
        out.append(f"WARNING: rounds disagree (max / min above {spread_limit:g}) in {len(wide)} rows ({names}): "
                   f"something else ran during the measurement; rerun on a quiet machine")
    return out


def machine_lines(load_start: float | None, load_end: float | None, rows: list[dict] | None = None) -> list[str]:
    """The lines every measured table starts with: the machine, the load average at start and end, and the busy
    warnings (``busy_warnings``)."""
    return [f"Machine: {device_line()}", load_line(load_start, load_end),
            *busy_warnings(load_start, load_end, os.cpu_count() or 1, rows or [])]


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


_TIME_COLUMNS = ("min ms", "median ms", "max ms")
_RATIO_COLUMNS = ("median ms", "peak MiB")


def format_table(rows: list[dict], header_lines: list[str]) -> str:
    """One markdown table per group. A row is ``dict(group=, variant=, base=, **columns)``; "min ms", "median ms"
    and "max ms" are shown together in that order, and "median ms" and "peak MiB" also get a ratio to the group's
    ``base`` variant (ratios of medians)."""
    lines = [*header_lines, ""]
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(row["group"], []).append(row)
    for group, members in groups.items():
        base_name = members[0].get("base")
        base = next((r for r in members if r["variant"] == base_name), None)
        columns = [c for c in dict.fromkeys(k for r in members for k in r)
                   if c not in ("group", "variant", "base", "min ms", "max ms")]
        if "median ms" in columns and any("min ms" in r for r in members):
            i = columns.index("median ms")
            columns[i:i + 1] = list(_TIME_COLUMNS)
        head = ["variant"]
        for c in columns:
            head.append(c)
            if c in _RATIO_COLUMNS and base is not None:
                head.append(f"vs {base_name}")
        lines += [f"**{group}**", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in members:
            cells = [r["variant"]]
            for c in columns:
                v = r.get(c)
                cells.append("-" if v is None else _fmt(v))
                if c in _RATIO_COLUMNS and base is not None:
                    ok = v is not None and base.get(c)
                    cells.append(f"{v / base[c]:.3f}x" if ok else "-")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def full() -> bool:
    """Whether the full sweep was asked for (`pytest benchmarks/ --benchmark-only --full`, or STP_BENCH_FULL=1)."""
    import os

    return os.environ.get("STP_BENCH_FULL", "") not in ("", "0")
