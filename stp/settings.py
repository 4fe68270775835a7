"""What a configuration section is made of: the field helper, type coercion, the checks and :class:`ConfigError`.

A section is a dataclass of :class:`Section` whose fields each carry their help text (``setting(default, help,
choices=...)``); ``__post_init__`` coerces every value to its field's type (so YAML strings and command-line strings
are accepted), checks the choices and then the section's own rules, and a bad value raises :class:`ConfigError`
naming the dotted field, the value and what is allowed. The sections every method shares are in ``stp.sections``; a
method's own section sits in its module of ``stp.methods`` and is registered with it (``Method.sections``);
``stp.config`` assembles them, layers the values and generates the command line. A section, written for a method::

    from stp.settings import Section, setting

    @dataclass
    class ReinforceConfig(Section):
        '''REINFORCE's own settings (the first line of the docstring heads the section in --help).'''

        section: ClassVar[str] = "reinforce"

        baseline: str = setting("mean", "what is subtracted from the reward", choices=("mean", "none"))
        scale: float = setting(1.0, "factor on the loss (> 0)")

        def __post_init__(self):
            self._coerce_all()
            self._need("scale", self.scale > 0, "a number > 0")

Also here: :func:`load_yaml`, which reads a config file with the line of every key (for the errors). This module
imports nothing of ``stp`` (so the methods' modules can import it without importing the configuration).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Sequence
from dataclasses import field
from pathlib import Path
from typing import Any, ClassVar

__all__ = ["ConfigError", "Section", "setting", "is_number", "load_yaml"]


class ConfigError(ValueError):
    """An invalid setting: names the dotted ``field``, the ``value``, what is ``allowed``, and the ``origin`` (file
    and line, command-line flag or preset) when known."""

    def __init__(self, message: str, *, field: str | None = None, value: Any = None, allowed: str | None = None,
                 origin: str | None = None):
        self.field, self.value, self.allowed, self.origin, self.bare = field, value, allowed, origin, message
        super().__init__(f"{origin}: {message}" if origin else message)

    @classmethod
    def bad_value(cls, field: str, value: Any, allowed: str, origin: str | None = None) -> ConfigError:
        return cls(f"{field}={value!r} is not allowed; allowed: {allowed}", field=field, value=value, allowed=allowed,
                   origin=origin)

    def located(self, origin: str | None) -> ConfigError:
        """The same error, said to come from ``origin`` (unchanged when it already has one or ``origin`` is None)."""
        if origin is None or self.origin is not None:
            return self
        return ConfigError(self.bare, field=self.field, value=self.value, allowed=self.allowed, origin=origin)


def setting(default: Any = dataclasses.MISSING, help: str = "", *, choices: Sequence[str] | None = None,
            factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field with its help text (and the allowed strings, when it is a choice)."""
    meta = {"help": help, "choices": tuple(choices) if choices else None}
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


# ------------------------------------------------------------------------------------------------- type coercion


def _split_type(tp: Any) -> tuple[Any, bool]:
    """(base type, optional?) of a field annotation: ``float | None`` -> (float, True)."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], len(args) < len(typing.get_args(tp))
    return tp, False


def _type_name(tp: Any) -> str:
    base, optional = _split_type(tp)
    if typing.get_origin(base) is tuple:
        name = "a list of strings (YAML list or comma-separated)"
    else:
        name = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string"}[base]
    return f"{name}, or none" if optional else name


_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")


def _coerce(name: str, value: Any, tp: Any) -> Any:
    """``value`` (from Python, YAML or a command-line string) as the field's type, or a ConfigError."""
    base, optional = _split_type(tp)
    if value is None or (optional and isinstance(value, str) and value.strip().lower() in ("none", "null", "~")):
        if optional:
            return None
        raise ConfigError.bad_value(name, value, _type_name(tp))
    try:
        if base is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
                return value.strip().lower() in _TRUE
        elif base is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            if isinstance(value, str):
                return int(value.strip())
        elif base is float:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                out = float(value)
            elif isinstance(value, str):
                out = float(value.strip())  # also YAML's "1e-6" (a string under YAML 1.1)
            else:
                out = None
            if out is not None and math.isfinite(out):
                return out
        elif base is str:
            if isinstance(value, str):
                return value
        elif typing.get_origin(base) is tuple:
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
                return tuple(value)
    except ValueError:
        pass
    raise ConfigError.bad_value(name, value, _type_name(tp))


class Section:
    """Shared behaviour of the sections: type coercion, checks, (de)serialisation."""

    section: ClassVar[str]

    def __post_init__(self) -> None:
        """Every value as its field's type, within its choices. A section with rules of its own overrides this and
        calls ``self._coerce_all()`` first."""
        self._coerce_all()

    def _coerce_all(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            name = f"{self.section}.{f.name}"
            value = _coerce(name, getattr(self, f.name), hints[f.name])
            choices = f.metadata.get("choices")
            if choices and value is not None and value not in choices:
                raise ConfigError.bad_value(name, value, "one of " + ", ".join(map(repr, choices)))
            setattr(self, f.name, value)

    def _need(self, name: str, ok: bool, allowed: str) -> None:
        if not ok:
            raise ConfigError.bad_value(f"{self.section}.{name}", getattr(self, name), allowed)

    def _positive(self, *names: str) -> None:
        for n in names:
            self._need(n, getattr(self, n) >= 1, "an integer >= 1")

    def check_environment(self) -> None:
        """Checks of this section that depend on this machine (files exist, CUDA, packages); default: none."""

    def to_dict(self) -> dict[str, Any]:
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v
                for f in dataclasses.fields(self)}


def is_number(text: str) -> bool:
    """``text`` spells a finite number."""
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def load_yaml(path: str | Path) -> tuple[dict[str, Any], dict[str, int]]:
    """A YAML config file -> (nested dict, {"section.field" or "section": 1-based line}). Syntax errors and
    duplicate keys are ConfigErrors naming the file and line."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read config file {str(path)!r}: {e.strerror or e}", field="--config",
                          value=str(path), allowed="a readable YAML file") from None
    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
        if root is None:
            return {}, {}
        if not isinstance(root, yaml.MappingNode):
            raise ConfigError("the configuration must be a mapping of sections", field="--config", value=str(path),
                              origin=f"{path}, line {root.start_mark.line + 1}")
        lines: dict[str, int] = {}

        def mapping(node: yaml.MappingNode, prefix: str) -> dict[str, Any]:
            out: dict[str, Any] = {}
            for key_node, value_node in node.value:
                key = str(loader.construct_object(key_node, deep=True))
                dotted = prefix + key
                if key in out:
                    raise ConfigError(f"duplicate key {dotted} (first on line {lines[dotted]})", field=dotted,
                                      origin=f"{path}, line {key_node.start_mark.line + 1}")
                lines[dotted] = key_node.start_mark.line + 1
                if not prefix and isinstance(value_node, yaml.MappingNode):
                    out[key] = mapping(value_node, dotted + ".")
                else:
                    out[key] = loader.construct_object(value_node, deep=True)
            return out

        return mapping(root, ""), lines
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = f", line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"invalid YAML: {e.problem or e.context}", field="--config", value=str(path),
                          origin=f"{path}{line}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"invalid YAML: {e}", field="--config", value=str(path), origin=str(path)) from None
    finally:
        loader.dispose()
