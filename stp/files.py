"""Files written so that a crash never leaves a torn one: fsync'ed, and renamed into place where it matters."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = ["fsync_dir", "write_file", "write_atomic", "json_bytes", "save_tensors", "load_tensors", "read_keyed_jsonl"]


def fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_atomic(path: Path, data: bytes) -> None:
    """Temporary file in the same directory, fsync, rename, fsync the directory."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    write_file(tmp, data)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode()


def save_tensors(path: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    from safetensors.torch import save

    write_file(path, save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}))


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def read_keyed_jsonl(path: str | os.PathLike, check: Callable[[dict, str], None], error: type[Exception], *,
                     key: str = "prompt_id") -> tuple[list[dict], int, str | None]:
    """An append-only JSONL file of one record per line (the prior and pairs files): (records in file order, byte
    length of the complete lines, a description of the dropped torn last line or None).

    A line that is not JSON raises ``error`` naming file and line ("corrupt line"), except the last line when no
    newline follows it (a run killed while writing it): that one is left out of both, so appending after the
    complete lines redoes its prompt. ``check(record, "file:line")`` validates each record (raising ``error``); a
    repeated ``key`` is an error naming both lines."""
    path = Path(path)
    data = path.read_bytes()
    records: list[dict] = []
    seen: dict[Any, int] = {}
    good_end = offset = 0
    torn = None
    lines = data.split(b"\n")  # the last element is what follows the last newline (b"" for a whole file)
    for lineno, raw in enumerate(lines, start=1):
        last = lineno == len(lines)
        offset += len(raw) + (0 if last else 1)
        if not raw.strip():  # blank lines carry nothing
            if not last:
                good_end = offset
            continue
        where = f"{path}:{lineno}"
        try:
            rec = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            if last:
                torn = f"{where}: incomplete last line ({len(raw)} bytes, {e})"
                break
            raise error(f"{where}: corrupt line: not valid JSON ({e})") from None
        check(rec, where)
        if rec[key] in seen:
            raise error(f"{where}: field {key!r} {rec[key]} already at line {seen[rec[key]]}")
        seen[rec[key]] = lineno
        records.append(rec)
        good_end = offset
    return records, good_end, torn
