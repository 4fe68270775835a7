"""Every preset resolves to the values recorded in ``tests/data/presets_resolved.json``, field by field.

The snapshot holds, per preset (in the order ``stp.config.PRESETS`` lists them): its method, description and notes,
every field of every section as ``resolve(preset=NAME)`` gives it (the settings the method does not read included,
at the values they take), and ``to_dict()`` (what a run saves as ``config.yaml``). A change to a preset, a default or
the layering shows up here as the exact preset, section and field that moved.

After an intended change (a new field, a preset value changed on purpose), regenerate it with one command and review
the diff::

    python -m tests.test_presets_resolved --write
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest

from stp import config as C

SNAPSHOT = Path(__file__).resolve().parent / "data" / "presets_resolved.json"


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


def resolved(name: str) -> dict:
    """Preset ``name`` as the snapshot records it (JSON-ready)."""
    cfg = C.resolve(preset=name)
    preset = C.PRESETS[name]
    out = {"method": cfg.method, "preset": cfg.preset, "description": preset.description,
           "notes": list(preset.notes), "sections": {}}
    for section in C.SECTIONS:
        values = getattr(cfg, section)
        out["sections"][section] = {f.name: _plain(getattr(values, f.name)) for f in dataclasses.fields(values)}
    out["to_dict"] = json.loads(json.dumps(cfg.to_dict()))
    return out


def snapshot() -> dict:
    return {"presets": list(C.PRESETS), "resolved": {name: resolved(name) for name in C.PRESETS}}


def _recorded() -> dict:
    return json.loads(SNAPSHOT.read_text(encoding="utf-8"))


def test_the_presets_and_their_order_are_the_recorded_ones():
    from stp.recipes import read_recipes

    recorded = _recorded()["presets"]
    assert sorted(C.PRESETS) == sorted(recorded)
    assert list(read_recipes()) == recorded  # the order of --help, the error messages and the presets table


@pytest.mark.parametrize("name", list(C.PRESETS))
def test_preset_resolves_to_the_recorded_values(name):
    recorded = _recorded()["resolved"]
    assert name in recorded, f"{name} is not in {SNAPSHOT.name}: a new preset? regenerate it (module docstring)"
    want, got = recorded[name], resolved(name)
    for key in ("method", "preset", "description", "notes"):
        assert got[key] == want[key], f"{name}: {key}"
    assert list(got["sections"]) == list(want["sections"]), f"{name}: the sections or their order"
    for section, fields in want["sections"].items():
        assert list(got["sections"][section]) == list(fields), f"{name}: the fields of {section} or their order"
        for field, value in fields.items():
            have = got["sections"][section][field]
            assert have == value and type(have) is type(value), f"{name}: {section}.{field} = {have!r}, was {value!r}"
    # config.yaml of a run: the same keys in the same order, the same values.
    assert json.dumps(got["to_dict"]) == json.dumps(want["to_dict"]), f"{name}: to_dict()"


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit("usage: python -m tests.test_presets_resolved --write   (rewrites " + str(SNAPSHOT) + ")")
    SNAPSHOT.write_text(json.dumps(snapshot(), indent=1) + "\n", encoding="utf-8")
    print(f"wrote {SNAPSHOT} ({len(C.PRESETS)} presets)")
