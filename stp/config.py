"""Training configuration: the sections assembled into :class:`TrainConfig`, the presets (recipe files), the layering
of values and the command line generated from the sections. Reading it does not import torch.

Where the settings live (every field with its help text; ``stp.settings`` says what a section is made of)::

    stp/sections.py          the sections every method shares: model, rollout, prior, estimator, grpo, run
    stp/methods/<name>.py    a method's own section, registered with it (``Method.sections``): diffpo, dtrpo
    stp/recipes/<name>.yaml  the presets: config files to copy; a variant names the recipe it extends (``preset``)

Values are resolved in layers, each overriding the one before::

    dataclass defaults (= the ``tiny`` preset)  <  --preset NAME  <  --config FILE.yaml  <  --section.field flags

Every value is checked before any model loads (each section's ``__post_init__``, then ``TrainConfig._check`` and
the method's ``check``); a bad one raises :class:`ConfigError` naming the dotted field, the value, what is allowed
and where it came from (``cfg.yaml, line 7``, ``command line --grpo.epsilon``, ``preset 'llada-gsm8k'``)::

    >>> parse_args(["--preset", "llada-gsm8k", "--grpo.learning_rate", "1e-6"]).grpo.learning_rate
    1e-06

Command line: ``python -m stp.train [--preset NAME] [--config FILE.yaml] [--section.field VALUE ...]``;
``python -m stp.config ... --print`` prints the resolved configuration as YAML (the form a run saves, which
``--config`` reads back), ``--presets-table`` the README's table of the presets.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from stp.recipes import FOLDER as RECIPES  # the presets' files
from stp.recipes import Preset, read_recipes
from stp.sections import (ATTN_IMPLEMENTATIONS, CACHE_MODES, DECODER_NAMES, ESTIMATORS, FREE_RULES,  # noqa: F401
                          MASK_SCHEMES, REPORT_TO, SCORE_MODES, SHARED, STRATEGIES, EstimatorConfig, GRPOConfig,
                          ModelConfig, PriorConfig, RolloutConfig, RunConfig, check_shared)
from stp.settings import ConfigError, Section, _split_type, load_yaml

__all__ = ["ConfigError", "ModelConfig", "RolloutConfig", "PriorConfig", "EstimatorConfig", "GRPOConfig", "RunConfig",
           "TrainConfig", "Preset", "PRESETS", "RECIPES", "DEFAULT_PRESET", "DEFAULT_METHOD", "SECTIONS",
           "visible_fields", "resolve", "load_yaml", "build_parser", "parse_args", "presets_table", "main"]

REPEATABLE = ("run.reward",)  # flags that may be given more than once
DEFAULT_PRESET = "tiny"
DEFAULT_METHOD = "stp"
DOC_KEYS = ("description", "notes")  # a recipe's documentation: read from recipes, ignored in --config files


def _methods() -> dict:
    """The registered methods (``stp.methods``; importing it does not import torch)."""
    from stp.methods import METHODS

    return METHODS


class _Sections(Mapping):
    """{name: section class}: the shared sections (``stp.sections``), then each registered method's own in the order
    of ``stp.methods.METHODS``; read afresh on every use, so a method registered later brings its sections."""

    def _now(self) -> dict[str, type[Section]]:
        out: dict[str, type[Section]] = {c.section: c for c in SHARED}
        for m in _methods().values():
            for c in m.sections:
                if out.setdefault(c.section, c) is not c or c.section in ("preset", "method", *DOC_KEYS):
                    raise TypeError(f"section name {c.section!r} of {c.__module__} is taken")
        return out

    def __getitem__(self, name: str) -> type[Section]:
        return self._now()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._now())

    def __len__(self) -> int:
        return len(self._now())


SECTIONS: Mapping[str, type[Section]] = _Sections()


class TrainConfig:
    """Everything one training run reads: one attribute per section (``SECTIONS``: ``model``, ``rollout``, ...,
    then the methods' own such as ``diffpo``), ``preset`` (the preset the values were layered on) and ``method``.
    Sections may be given as instances or mappings of their fields; missing ones take their defaults."""

    model: ModelConfig
    rollout: RolloutConfig
    prior: PriorConfig
    estimator: EstimatorConfig
    grpo: GRPOConfig
    run: RunConfig

    def __init__(self, *, preset: str = DEFAULT_PRESET, method: str = DEFAULT_METHOD, **sections: Any):
        self.preset, self.method = preset, method
        known = dict(SECTIONS)
        if unknown := [name for name in sections if name not in known]:
            raise TypeError(f"TrainConfig: unknown section {unknown[0]!r}; sections: {', '.join(known)}")
        for name, cls in known.items():
            value = sections[name] if name in sections else cls()
            value = _section_from_mapping(cls, value) if isinstance(value, Mapping) else value
            if not isinstance(value, cls):
                raise ConfigError.bad_value(name, value, f"a {cls.__name__} or a mapping of its fields")
            setattr(self, name, value)
        self._check()

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and vars(self) == vars(other)

    def __repr__(self) -> str:
        return f"TrainConfig({', '.join(f'{k}={v!r}' for k, v in vars(self).items())})"

    def validate(self) -> TrainConfig:
        """Check every section and rule again (after fields were changed in place); returns self."""
        for name in SECTIONS:
            getattr(self, name).__post_init__()
        self._check()
        return self

    def _check(self) -> None:
        """Rules across sections."""
        if self.preset not in PRESETS:
            raise ConfigError.bad_value("preset", self.preset, "one of " + ", ".join(PRESETS))
        if self.run.output_dir is None:
            self.run.output_dir = str(Path("runs") / self.preset)
        methods = _methods()
        if self.method not in methods:
            raise ConfigError.bad_value("method", self.method, "one of " + ", ".join(map(repr, methods)))
        method = methods[self.method]
        # Settings this method does not read take their defaults (so equal runs compare equal).
        visible, hidden = visible_fields(self.method), _hidden_defaults(self.method)
        for name, cls in SECTIONS.items():
            section = getattr(self, name)
            fresh = cls(**hidden.get(name, {}))
            for f in dataclasses.fields(cls):
                if f.name not in visible[name]:
                    setattr(section, f.name, getattr(fresh, f.name))
        check_shared(self, self.method, [n for n, m in methods.items() if m.rollout.anchors])
        method.check(self)

    @property
    def prior_path(self) -> str | None:
        """The prior file of this run (None when priors are off)."""
        if not self.prior.enabled:
            return None
        return self.prior.path or str(Path(self.run.output_dir or ".") / "priors.jsonl")

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (YAML/JSON-ready) of the settings this method reads; ``TrainConfig.from_dict(
        c.to_dict()) == c``."""
        visible = visible_fields(self.method)
        out: dict[str, Any] = {"preset": self.preset, "method": self.method}
        for name in SECTIONS:
            if visible[name]:
                out[name] = {k: v for k, v in getattr(self, name).to_dict().items() if k in visible[name]}
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, origin: str | None = None) -> TrainConfig:
        """From ``to_dict``'s form. Missing fields take the dataclass defaults (NOT the preset's: use ``resolve``
        for layering); unknown keys are errors naming the key and the allowed ones."""
        _check_keys(data, origin, method=DEFAULT_METHOD)
        method = data.get("method", DEFAULT_METHOD)
        try:
            sections = {name: _section_from_mapping(c, {**_hidden_defaults(method).get(name, {}),
                                                        **(data.get(name) or {})})
                        for name, c in SECTIONS.items()}
            return cls(preset=data.get("preset", DEFAULT_PRESET), method=method, **sections)
        except ConfigError as e:
            raise e.located(origin) from None

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False)

    def check_environment(self) -> None:
        """Checks that depend on this machine (files exist, CUDA, bitsandbytes); call before loading the model."""
        for name in SECTIONS:
            getattr(self, name).check_environment()


# ------------------------------------------------------------------------------------------- method-owned settings


def visible_fields(method: str) -> dict[str, tuple[str, ...]]:
    """{section: field names} the command line, YAML files and ``to_dict`` show for ``method``: every field of the
    shared sections, and of a method-owned section (one some method lists in its ``settings`` or registers in its
    ``sections``) only the fields this method lists (all of a section it registers and does not list)."""
    methods = _methods()
    owned = {sec for m in methods.values() for sec in [*m.settings, *(c.section for c in m.sections)]}
    m = methods.get(method)
    mine = {**{c.section: None for c in m.sections}, **m.settings} if m else {}
    out = {}
    for name, cls in SECTIONS.items():
        names = tuple(f.name for f in dataclasses.fields(cls))
        if name in owned:
            names = tuple(n for n in names if name in mine and (mine[name] is None or n in mine[name]))
        out[name] = names
    return out


def _hidden_defaults(method: str) -> dict[str, dict[str, Any]]:
    """Values a method without anchors fixes for the prior section it does not show."""
    methods = _methods()
    if method in methods and not methods[method].rollout.anchors:
        return {"prior": {"enabled": False}}
    return {}


def _check_owned(dotted: str, value: Any, method: str, origin: str | None) -> None:
    """A setting given for a method that does not read it is an error naming the methods that do."""
    section, _, key = dotted.partition(".")
    if section not in SECTIONS or method not in _methods() or key in visible_fields(method)[section]:
        return
    owners = [n for n in _methods() if key in visible_fields(n)[section]]
    raise ConfigError(f"{dotted} is a setting of method {' / '.join(map(repr, owners))} only; this run's method is "
                      f"{method!r}", field=dotted, value=value, allowed=f"--method {owners[0]}" if owners else "none",
                      origin=origin)


def _section_from_mapping(cls: type[Section], data: Mapping[str, Any]) -> Section:
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            raise ConfigError(f"unknown key {cls.section}.{key}; allowed keys in {cls.section}: "
                              f"{', '.join(sorted(names))}", field=f"{cls.section}.{key}", value=data[key],
                              allowed=", ".join(sorted(names)))
    return cls(**data)


def _check_keys(data: Any, origin: str | None, lines: Mapping[str, int] | None = None,
                path: str | None = None, method: str | None = None) -> None:
    """Unknown sections or fields are errors naming the key (with its line) and the allowed keys."""
    def where(key: str) -> str | None:
        if lines is not None and key in lines:
            return f"{path}, line {lines[key]}"
        return origin

    if not isinstance(data, Mapping):
        raise ConfigError(f"the configuration must be a mapping of sections, got {type(data).__name__}",
                          origin=origin)
    top = ["preset", *SECTIONS, "method"]
    method = data.get("method", method)
    for key, value in data.items():
        if key in DOC_KEYS:  # a recipe's description and notes, documentation only
            continue
        if key not in top:
            raise ConfigError(f"unknown key {key!r}; allowed top-level keys: {', '.join(top)}", field=str(key),
                              value=value, allowed=", ".join(top), origin=where(str(key)))
        if key in ("preset", "method"):
            continue
        if value is not None and not isinstance(value, Mapping):
            raise ConfigError.bad_value(key, value, f"a mapping of {key} fields", origin=where(key))
        names = [f.name for f in dataclasses.fields(SECTIONS[key])]
        for sub in value or {}:
            if sub not in names:
                raise ConfigError(f"unknown key {key}.{sub}; allowed keys in {key}: {', '.join(names)}",
                                  field=f"{key}.{sub}", value=value[sub], allowed=", ".join(names),
                                  origin=where(f"{key}.{sub}"))
            if method is not None:
                _check_owned(f"{key}.{sub}", value[sub], method, where(f"{key}.{sub}"))



# ------------------------------------------------------------------------------------------------------- presets


PRESETS: dict[str, Preset] = read_recipes(RECIPES, DEFAULT_METHOD)
for _recipe in PRESETS.values():  # a recipe's keys are checked as a --config file's are
    _check_keys(_recipe.own, str(_recipe.path), _recipe.lines, str(_recipe.path), method=_recipe.method)


def presets_table() -> str:
    """Markdown table of the presets (for the README)."""
    cols = ["preset", "model", "task", "method", "anchors (rho)", "tau", "G x prompts", "mu", "eps", "beta",
            "std adv.", "K", "lr", "L / block / steps", "steps", "LoRA r / alpha"]
    rows = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for name in PRESETS:
        c = resolve(preset=name)
        m, r, g = c.model, c.rollout, c.grpo
        rows.append("| " + " | ".join([
            f"`{name}`", m.name_or_path, c.run.task, c.method,
            f"yes ({c.prior.rho:g})" if c.prior.enabled else "no",
            "off" if r.early_stop is None else f"{r.early_stop:g}", f"{g.num_generations} x {g.prompts_per_step}",
            str(g.num_iterations), f"{g.epsilon:g}", f"{g.beta:g}", "yes" if g.scale_rewards else "no",
            str(c.estimator.num_draws), f"{g.learning_rate:g}", f"{r.gen_length} / {r.block_length} / {r.steps}",
            str(g.max_steps), f"{m.lora_r} / {m.lora_alpha}" if m.use_lora else "full",
        ]) + " |")
    return "\n".join(rows) + "\n"


# ------------------------------------------------------------------------------------------------------- layering


def _layers(preset: str | None, config_file: str | Path | None, overrides: Mapping[str, Any] | None = None,
            override_origin: str = "command line --{}", method: str | None = None,
            ) -> tuple[str, dict[str, dict], dict[str, str]]:
    """Preset < YAML < overrides, unvalidated: (preset name, {section: {field: raw value}}, {dotted: origin}); the
    method (``method`` < YAML's ``method`` key < the preset's) is in ``values["method"]``."""
    values: dict[str, Any] = {name: {} for name in SECTIONS}
    origins: dict[str, str] = {}
    data, lines = ({}, {}) if config_file is None else load_yaml(config_file)
    if config_file is not None:
        _check_keys(data, str(config_file), lines, str(config_file))
    name = preset
    name_origin = "command line --preset"
    if name is None and "preset" in data:
        name, name_origin = data["preset"], f"{config_file}, line {lines['preset']}"
    name = DEFAULT_PRESET if name is None else name
    if not isinstance(name, str) or name not in PRESETS:
        import difflib

        close = "".join(f"; did you mean {c}?" for c in difflib.get_close_matches(str(name), PRESETS, n=1))
        raise ConfigError.bad_value("preset", name, "one of " + ", ".join(PRESETS) + close, origin=name_origin)
    method_origin = "command line --method"
    if method is None and "method" in data:
        method, method_origin = data["method"], f"{config_file}, line {lines['method']}"
    if method is None:
        method, method_origin = PRESETS[name].method, f"preset {name!r}"
    if not isinstance(method, str) or method not in _methods():
        raise ConfigError.bad_value("method", method, "one of " + ", ".join(map(repr, _methods())),
                                    origin=method_origin)
    values["method"] = method
    for section, fields_ in _hidden_defaults(method).items():
        values[section].update(fields_)
    for section, fields_ in PRESETS[name].overrides.items():
        for key, value in fields_.items():
            values[section][key] = value
            origins[f"{section}.{key}"] = f"preset {name!r}"
    for section, fields_ in data.items():
        if section in ("preset", "method", *DOC_KEYS):
            continue
        for key, value in (fields_ or {}).items():
            _check_owned(f"{section}.{key}", value, method, f"{config_file}, line {lines[f'{section}.{key}']}")
            values[section][key] = value
            origins[f"{section}.{key}"] = f"{config_file}, line {lines[f'{section}.{key}']}"
    for dotted, value in (overrides or {}).items():
        section, _, key = dotted.partition(".")
        if section not in SECTIONS or key not in {f.name for f in dataclasses.fields(SECTIONS[section])}:
            raise ConfigError(f"unknown setting {dotted}", field=dotted, value=value, allowed="section.field names "
                              "of " + ", ".join(SECTIONS), origin=override_origin.format(dotted))
        _check_owned(dotted, value, method, override_origin.format(dotted))
        values[section][key] = value
        origins[dotted] = override_origin.format(dotted)
    return name, values, origins


def _build(name: str, values: Mapping[str, Any], origins: Mapping[str, str]) -> TrainConfig:
    sections = {}
    try:
        for section, cls in SECTIONS.items():
            sections[section] = cls(**values[section])
        return TrainConfig(preset=name, method=values["method"], **sections)
    except ConfigError as e:
        raise e.located(origins.get(e.field or "")) from None


def resolve(preset: str | None = None, config_file: str | Path | None = None,
            overrides: Mapping[str, Any] | None = None, method: str | None = None) -> TrainConfig:
    """The validated config: dataclass defaults < ``preset`` (default: the YAML's ``preset`` key, else "tiny") <
    ``config_file`` < ``overrides`` ({"grpo.beta": 0.0, ...}; strings are parsed as on the command line). The
    method: ``method``, else the YAML's ``method`` key, else the preset's."""
    name, values, origins = _layers(preset, config_file, overrides, override_origin="override {}", method=method)
    return _build(name, values, origins)


# ----------------------------------------------------------------------------------------------------------- CLI


def _show(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(value)
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def build_parser(defaults: Mapping[str, Any] | None = None, origins: Mapping[str, str] | None = None,
                 prog: str = "python -m stp.train", *, tool: bool = False) -> argparse.ArgumentParser:
    """The command line, one flag per field the method reads (``--section.field``); help from the fields' metadata,
    with the default each would take (``defaults``: the layered values of the chosen preset and YAML file, with
    the method under "method"; else the dataclass's). ``tool``: ``python -m stp.config``'s (``--print``,
    ``--presets-table``)."""
    defaults, origins = defaults or {}, origins or {}
    method = defaults.get("method", DEFAULT_METHOD)
    visible = visible_fields(method)
    methods = "\n".join(f"  {n:<17} {m.description}" for n, m in _methods().items())
    rows = "\n".join(f"  {n:<17} {p.description}" for n, p in PRESETS.items())
    p = argparse.ArgumentParser(
        prog=prog, allow_abbrev=False,
        usage=f"{prog} [-h] [--preset NAME] [--config FILE.yaml] [--section.field VALUE ...]" +
              (" [--print | --presets-table]" if tool else ""),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=("Check a training configuration (python -m stp.train's flags) and print it resolved, or print the "
                     "presets table." if tool else "Train a masked diffusion LM with GRPO and Spatio-Temporal Pruning: "
                     "docs/method.md") + "\n\nPrecedence: dataclass defaults < --preset < --config FILE.yaml < "
                    "--section.field flags.",
        epilog=f"presets:\n{rows}\n\nmethods (--method; each shows its own settings):\n{methods}\n\n"
               "booleans: --run.resume, --run.resume false, --no-run.resume; optional values "
               "take 'none'; lists are comma-separated.")
    p.add_argument("--preset", metavar="NAME", default=None, help=f"named preset (default: {DEFAULT_PRESET}); one of "
                   f"{', '.join(PRESETS)}")
    p.add_argument("--config", metavar="FILE.yaml", default=None, help="YAML file of {section: {field: value}} "
                   "(optional top-level 'preset' and 'method' keys are used when the flags are not given)")
    p.add_argument("--method", metavar="NAME", default=None, help=f"the RL method (default: the preset's; now "
                   f"{method}); one of {', '.join(_methods())}")
    if tool:
        p.add_argument("--print", action="store_true", help="print the resolved configuration as YAML (what a run "
                       "saves as config.yaml; --config reads it back); without it, only check it")
        p.add_argument("--presets-table", action="store_true", help="print the presets as a Markdown table (the "
                       "README's) and exit")
    hints_of = {name: typing.get_type_hints(cls) for name, cls in SECTIONS.items()}
    for section, cls in SECTIONS.items():
        group = p.add_argument_group(f"{section}", (cls.__doc__ or "").strip().splitlines()[0])
        if not visible[section]:
            continue
        for f in dataclasses.fields(cls):
            if f.name not in visible[section]:
                continue
            dotted = f"{section}.{f.name}"
            tp = hints_of[section][f.name]
            base, _ = _split_type(tp)
            current = defaults.get(section, {}).get(f.name, f.default if f.default is not dataclasses.MISSING
                                                    else f.default_factory())
            where = f", from {origins[dotted]}" if dotted in origins else ""
            choices = f.metadata.get("choices")
            text = f.metadata["help"] + (f"; one of {', '.join(choices)}" if choices else "")
            text = f"{text} (default: {_show(current)}{where})".replace("%", "%%")
            if base is bool:
                group.add_argument(f"--{dotted}", dest=dotted, nargs="?", const="true", default=argparse.SUPPRESS,
                                   metavar="BOOL", help=text + f"; --no-{dotted} sets false")
                group.add_argument(f"--no-{dotted}", dest=dotted, action="store_const", const="false",
                                   default=argparse.SUPPRESS, help=argparse.SUPPRESS)
            else:
                metavar = {int: "INT", float: "FLOAT", str: "STR"}.get(base, "A,B,...")
                if choices:
                    metavar = "{" + ",".join(choices) + "}"
                if dotted in REPEATABLE:  # given several times: the values add up (a list; commas split too)
                    group.add_argument(f"--{dotted}", dest=dotted, default=argparse.SUPPRESS, metavar=metavar,
                                       action="append", help=text + "; repeatable")
                    continue
                group.add_argument(f"--{dotted}", dest=dotted, default=argparse.SUPPRESS, metavar=metavar, help=text)
    return p


def parse_args(argv: Sequence[str] | None = None, prog: str = "python -m stp.train", *,
               tool: bool = False) -> TrainConfig:
    """Command line -> validated TrainConfig. ``--help`` shows the defaults of the chosen preset and file. Invalid
    values and unknown flags raise ConfigError (field, value, allowed, origin); a flag without its value exits
    through argparse (status 2). ``tool``: as ``build_parser``'s."""
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False, prog=prog)
    for flag in ("--preset", "--config", "--method"):
        pre.add_argument(flag, default=None)
    known, _ = pre.parse_known_args(argv)
    name, values, origins = _layers(known.preset, known.config, method=known.method)
    parsed, unknown = build_parser(values, origins, prog=prog, tool=tool).parse_known_args(argv)
    if unknown:
        import difflib

        flags = ["--preset", "--config", "--method"] + [f"--{s}.{f.name}" for s, c in SECTIONS.items()
                                                        for f in dataclasses.fields(c)]
        bad = next((u for u in unknown if u.startswith("-")), unknown[0])
        dotted = bad.split("=")[0].removeprefix("--no-").removeprefix("--")
        section, _, key = dotted.partition(".")
        if section in SECTIONS and key in {f.name for f in dataclasses.fields(SECTIONS[section])}:
            _check_owned(dotted, bad, values["method"], f"command line --{dotted}")
        close = difflib.get_close_matches(bad.split("=")[0], flags, n=3)
        raise ConfigError(f"unknown argument {bad!r}" + (f"; did you mean {', '.join(close)}?" if close else
                          "; see --help for the flags"), field=bad, value=bad, allowed=", ".join(close) or "--help")
    overrides = {k: v for k, v in vars(parsed).items() if "." in k}  # --section.field flags given
    name, values, origins = _layers(known.preset, known.config, overrides, method=known.method)
    return _build(name, values, origins)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m stp.config [--preset NAME] [--config FILE] [flags] --print | --presets-table``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--presets-table" in argv:
        sys.stdout.write(presets_table())
        return 0
    try:
        config = parse_args(argv, prog="python -m stp.config", tool=True)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if "--print" in argv:
        sys.stdout.write(config.to_yaml())
    else:
        print(f"configuration is valid (preset {config.preset}); add --print to see it", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

