"""Reading task data: local JSONL / JSON / CSV / parquet files and the dataset hub, with row validation.

Every row goes through its task's ``parse_row(row, where)``, which checks the fields and types and returns the task's
normalised example dict. A bad row fails with a :class:`DataError` naming the file, the line (JSONL, CSV), item (JSON)
or row (parquet, hub) number, and the field, e.g. ``data.jsonl:3: field 'target': expected an integer, got 'abc'``.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "DataError",
    "Where",
    "read_file",
    "load_hub",
    "get_str",
    "get_int",
    "get_int_list",
]


class DataError(ValueError):
    """A malformed data row; the message names the file, the line and the field."""


@dataclass(frozen=True)
class Where:
    """Where a row came from, to name it in errors: ``source`` is a path or ``hub:NAME[split]``."""

    source: str
    line: int
    unit: str = "line"

    def error(self, field: str, message: str) -> DataError:
        return DataError(f"{self.source}:{self.line}: field {field!r}: {message} ({self.unit} {self.line})")


RowParser = Callable[[Mapping[str, Any], Where], dict]


def _pick(row: Mapping[str, Any], names: tuple[str, ...], where: Where) -> tuple[str, Any]:
    """The first present field among ``names`` (aliases); an error naming the first when none is."""
    for name in names:
        if name in row and row[name] is not None and row[name] != "":
            return name, row[name]
    aliases = f" (or {', '.join(repr(n) for n in names[1:])})" if len(names) > 1 else ""
    raise where.error(names[0], f"missing{aliases}")


def get_str(row: Mapping[str, Any], names: tuple[str, ...], where: Where, *, allow_int: bool = False) -> str:
    """A string field (ints too when ``allow_int``, converted with ``str``)."""
    name, value = _pick(row, names, where)
    if isinstance(value, str):
        return value
    if allow_int and isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    kinds = "a string or an integer" if allow_int else "a string"
    raise where.error(name, f"expected {kinds}, got {type(value).__name__} {value!r:.60}")


def _to_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)  # parquet/pandas may store integer columns as float
    if isinstance(value, str):
        text = value.strip()
        body = text[1:] if text[:1] in "+-" else text
        if body.isascii() and body.isdigit() and len(body) <= 18:
            return int(text)
    return None


def get_int(row: Mapping[str, Any], names: tuple[str, ...], where: Where) -> int:
    """An integer field; a string of an integer is accepted (CSV cells are strings)."""
    name, value = _pick(row, names, where)
    out = _to_int(value)
    if out is None:
        raise where.error(name, f"expected an integer, got {type(value).__name__} {value!r:.60}")
    return out


def get_int_list(row: Mapping[str, Any], names: tuple[str, ...], where: Where) -> list[int]:
    """A list of integers: a JSON list, or a string ``"[1, 2, 3]"`` / ``"1,2,3"`` / ``"1 2 3"`` (CSV)."""
    name, value = _pick(row, names, where)
    items: Any = value
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                items = json.loads(text)
            except json.JSONDecodeError as exc:
                raise where.error(name, f"not a JSON list of integers: {value!r:.60}") from exc
        else:
            items = [t for t in text.replace(",", " ").split() if t]
    elif hasattr(value, "tolist"):  # numpy arrays from parquet
        items = value.tolist()
    if not isinstance(items, (list, tuple)):
        raise where.error(name, f"expected a list of integers, got {type(value).__name__} {value!r:.60}")
    out = [_to_int(v) for v in items]
    if any(v is None for v in out):
        raise where.error(name, f"expected a list of integers, got {value!r:.60}")
    return out  # type: ignore[return-value]


def _iter_rows(path: Path) -> Iterator[tuple[Where, Any]]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                where = Where(str(path), number)
                try:
                    yield where, json.loads(line)
                except json.JSONDecodeError as exc:
                    raise where.error("<row>", f"invalid JSON: {exc.msg}") from exc
    elif suffix == ".json":
        with path.open(encoding="utf-8") as f:
            try:
                items = json.load(f)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{exc.lineno}: invalid JSON: {exc.msg}") from exc
        if not isinstance(items, list):
            raise DataError(f"{path}: expected a JSON list of objects, got {type(items).__name__}")
        for number, item in enumerate(items, start=1):
            yield Where(str(path), number, "item"), item
    elif suffix == ".csv":
        with path.open(encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            for row in reader:
                # line_num is the physical line where this row ended (header = line 1).
                where = Where(str(path), reader.line_num)
                if None in row:
                    raise where.error("<row>", f"more cells than the {len(reader.fieldnames or [])} header columns")
                yield where, row
    elif suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as exc:
            raise ImportError(
                f"reading {path} needs pyarrow, which is not installed: `pip install pyarrow`, "
                "or convert the file to JSONL or CSV"
            ) from exc
        for number, row in enumerate(pq.read_table(path).to_pylist(), start=1):
            yield Where(str(path), number, "row"), row
    else:
        raise DataError(f"{path}: unknown data file type {suffix!r}; use .jsonl, .json, .csv or .parquet")


def read_file(path: str | Path, parse_row: RowParser) -> list[dict]:
    """Every row of a local data file, validated and normalised by ``parse_row``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    out = []
    for where, row in _iter_rows(path):
        if not isinstance(row, Mapping):
            raise where.error("<row>", f"expected an object with named fields, got {type(row).__name__}")
        out.append(parse_row(row, where))
    if not out:
        raise DataError(f"{path}: no rows")
    return out


def load_hub(
    name: str, split: str, parse_row: RowParser, *, config: str | None = None, keep: Callable[[Mapping], bool] | None = None
) -> list[dict]:
    """Rows of a dataset-hub split through ``datasets`` (needs the package and a network); explicit errors otherwise."""
    try:
        import datasets
    except ImportError as exc:
        raise RuntimeError(
            f"loading {name!r} from the dataset hub needs the `datasets` package (`pip install datasets`) and a "
            "network; offline, pass data_path=PATH (a JSONL/CSV/parquet file, see docs/rewards.md) instead"
        ) from exc
    try:
        dataset = datasets.load_dataset(name, config, split=split)
    except Exception as exc:  # network, missing split, hub errors: say what to do instead
        raise RuntimeError(
            f"could not load {name!r} split {split!r} from the dataset hub ({type(exc).__name__}: {exc}); "
            "offline, pass data_path=PATH instead"
        ) from exc
    source = f"hub:{name}[{split}]"
    out = []
    for number, row in enumerate(dataset, start=1):
        if keep is not None and not keep(row):
            continue
        out.append(parse_row(row, Where(source, number, "row")))
    return out
