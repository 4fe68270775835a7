"""The presets, one recipe file each (``NAME.yaml`` in this folder), and their reader.

A recipe is a config file that ``python -m stp.train --config FILE.yaml`` reads as it is: ``{section: {field:
value}}``, optionally ``method``, plus its ``description`` (one line, shown in ``--help``) and ``notes`` (how it
deviates from the recipe it extends, and why). Its ``preset`` key names the recipe it extends: that recipe's values
(and method, unless it names its own) come first, then its own. ``index.txt`` gives the order in which the presets are
listed. ``stp.config`` checks each recipe's keys as it checks a ``--config`` file and turns them into ``PRESETS``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stp.settings import ConfigError, load_yaml

__all__ = ["FOLDER", "Preset", "read_recipes"]

FOLDER = Path(__file__).resolve().parent
_TOP = ("preset", "method", "description", "notes")  # the keys of a recipe that are not sections


@dataclass(frozen=True)
class Preset:
    """A named recipe: ``overrides`` = {section: {field: value}} on the dataclass defaults (its own values on those
    of the recipe it ``extends``); ``notes``: how it deviates from that recipe and why; ``own`` and ``lines``: its
    file's values and the line of each key."""

    name: str
    description: str
    overrides: Mapping[str, Mapping[str, Any]]
    notes: tuple[str, ...] = ()
    method: str = "stp"
    extends: str | None = None
    path: Path | None = None
    own: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)
    lines: Mapping[str, int] = field(default_factory=dict, repr=False, compare=False)


def _merge(base: Mapping[str, Mapping[str, Any]], extra: Mapping[str, Mapping[str, Any]]) -> dict[str, dict]:
    out = {k: dict(v) for k, v in base.items()}
    for k, v in extra.items():
        out.setdefault(k, {}).update(v)
    return out


def read_recipes(folder: str | Path = FOLDER, default_method: str = "stp") -> dict[str, Preset]:
    """Every ``NAME.yaml`` of ``folder`` as a Preset, in the order ``index.txt`` lists them (the others after them,
    alphabetically). Errors (a missing or circular ``preset``, a bad description) name the file and line."""
    folder = Path(folder)
    files = {p.stem: p for p in sorted(folder.glob("*.yaml"))}
    raw = {name: load_yaml(path) for name, path in files.items()}
    out: dict[str, Preset] = {}

    def build(name: str, chain: tuple[str, ...]) -> Preset:
        if name in out:
            return out[name]
        (data, lines), path = raw[name], files[name]
        where = (lambda key: f"{path}, line {lines[key]}" if key in lines else str(path))
        parent = data.get("preset")
        if parent is not None and (parent not in files or parent in chain):
            raise ConfigError.bad_value("preset", parent, f"another recipe of {folder} (not one that extends this)",
                                        origin=where("preset"))
        base = build(parent, (*chain, name)) if parent is not None else None
        description, notes = data.get("description"), data.get("notes", [])
        if not isinstance(description, str) or not description.strip():
            raise ConfigError.bad_value("description", description, "one line saying what the recipe is",
                                        origin=where("description"))
        if not isinstance(notes, list) or not all(isinstance(n, str) for n in notes):
            raise ConfigError.bad_value("notes", notes, "a list of strings", origin=where("notes"))
        own = {k: {f: tuple(x) if isinstance(x, list) else x for f, x in v.items()}  # YAML lists: the fields' tuples
               for k, v in data.items() if k not in _TOP and isinstance(v, Mapping)}
        out[name] = Preset(name, description.strip(), _merge(base.overrides if base else {}, own), tuple(notes),
                           data.get("method", base.method if base else default_method), parent, path, data, lines)
        return out[name]

    for name in files:
        build(name, ())
    index = folder / "index.txt"
    listed = [n for line in index.read_text(encoding="utf-8").splitlines() if (n := line.split("#")[0].strip())
              ] if index.exists() else []
    for name in listed:
        if name not in files:
            raise ConfigError.bad_value("preset", name, f"the name of a recipe file in {folder}", origin=str(index))
    return {n: out[n] for n in [*listed, *sorted(set(files) - set(listed))]}
