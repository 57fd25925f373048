"""Settings schemas: every setting declared once (name, type, default, unit, help, check), and from
that declaration the scene-file check, the command-line flags and the settings object.

Library code raises `SettingError` naming the setting (``batch``); the command line reports it under
its flag (``--batch``), a scene under its key (``reconstruct.batch``).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable

from engine.core.errors import InputError


class SettingError(InputError):
    """A bad value for one setting; ``setting`` is its name in the schema."""

    def __init__(self, setting: str, problem: str):
        super().__init__(f"setting '{setting}'", problem)
        self.setting = setting
        self.problem = problem


@dataclass(frozen=True)
class Setting:
    """One setting.

    kind    : int, float, str, bool, list (of str) or dict (str → float).
    default : its value when none is given; None means "not set" (the meaning is in ``help``).
    unit    : 'Å', 'degrees', … or '' for dimensionless.
    check   : optional (value) → problem string or None, run after the type check.
    choices : allowed values of a str setting.
    parse   : command line text → value, for lists and dicts (default: the kind itself).
    """

    name: str
    kind: type
    default: Any
    help: str
    unit: str = ""
    check: Callable[[Any], str | None] | None = None
    choices: tuple | None = None
    parse: Callable[[str], Any] | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def coerce(self, value):
        """``value`` converted to this setting's kind; raises SettingError."""
        if value is None:
            return None
        kind = self.kind
        ok = (isinstance(value, bool) if kind is bool
              else isinstance(value, int) and not isinstance(value, bool) if kind is int
              else isinstance(value, (int, float)) and not isinstance(value, bool) if kind is float
              else isinstance(value, kind))
        if not ok:
            raise SettingError(self.name, f"expected {kind.__name__}, got {value!r}")
        if kind is float:
            value = float(value)
            if not math.isfinite(value):
                raise SettingError(self.name, f"must be a finite number, got {value}")
        if kind is list:
            value = list(value)
            if not all(isinstance(v, str) for v in value):
                raise SettingError(self.name, f"expected a list of names, got {value!r}")
        if kind is dict:
            value = dict(value)
            if not all(isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool)
                       for k, v in value.items()):
                raise SettingError(self.name, f"expected names with numbers, got {value!r}")
            value = {k: float(v) for k, v in value.items()}
        if self.choices is not None and value not in self.choices:
            raise SettingError(self.name, f"must be one of {', '.join(map(str, self.choices))}, got {value!r}")
        problem = self.check(value) if self.check is not None else None
        if problem:
            raise SettingError(self.name, problem)
        return value


def positive(value) -> str | None:
    return None if value > 0 else f"must be positive, got {value}"


def non_negative(value) -> str | None:
    return None if value >= 0 else f"must be ≥ 0, got {value}"


def fraction(value) -> str | None:
    return None if 0 <= value <= 1 else f"must lie in [0, 1], got {value}"


def name_list(text: str) -> list:
    """'Pt,Ni' → ['Pt', 'Ni']."""
    return [item.strip() for item in text.split(",") if item.strip()]


def name_fractions(text: str) -> dict:
    """'Pt:0.6,Ni:0.4' → {'Pt': 0.6, 'Ni': 0.4}."""
    try:
        pairs = [item.split(":") for item in text.split(",") if item.strip()]
        return {symbol.strip(): float(value) for symbol, value in pairs}
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected e.g. Pt:0.6,Ni:0.4, got {text!r}") from None


def element_symbols(names, setting: str) -> list[str]:
    """Element symbols normalised ('pt' → 'Pt'); an unknown one is a SettingError of ``setting``."""
    from engine.core.elements import normalize_symbol

    try:
        return [normalize_symbol(x, setting) for x in names]
    except InputError as err:
        raise SettingError(setting, err.problem) from None


class Schema:
    """An ordered set of `Setting`s with a settings class generated from it."""

    def __init__(self, name: str, settings: list[Setting], finish: Callable | None = None):
        self.name = name
        self.settings = {s.name: s for s in settings}
        self.finish = finish  # (settings object) → None: checks across settings, normalisation
        self.cls = dataclasses.make_dataclass(
            name, [(s.name, Any, dataclasses.field(default_factory=lambda s=s: _copy(s.default)))
                   for s in settings])
        self.cls.__doc__ = f"{name}: see the schema's settings for units and meaning."

    def make(self, values: dict | None = None, **overrides):
        """A settings object from ``values`` and keyword overrides: unknown names, wrong types and
        bad values raise `SettingError`."""
        given = {**(values or {}), **overrides}
        unknown = sorted(set(given) - set(self.settings))
        if unknown:
            raise SettingError(unknown[0], f"unknown setting (known: {', '.join(self.settings)})")
        obj = self.cls(**{k: self.settings[k].coerce(v) if v is not None else None for k, v in given.items()})
        if self.finish is not None:
            self.finish(obj)
        return obj

    def as_dict(self, obj) -> dict:
        return dataclasses.asdict(obj)

    def add_arguments(self, parser: argparse.ArgumentParser, names=None) -> None:
        """Command-line flags for ``names`` (default: all); every flag defaults to None, so a value
        from a scene file is only replaced by a flag that is given."""
        for name in names or self.settings:
            s = self.settings[name]
            unit = f", {s.unit}" if s.unit else ""
            default = "not set" if s.default is None else s.default
            help_text = f"{s.help} (default {default}{unit})"
            if s.kind is bool:
                parser.add_argument(s.flag, dest=name, action=argparse.BooleanOptionalAction, default=None,
                                    help=help_text)
            else:
                parser.add_argument(s.flag, dest=name, default=None, metavar=name.upper(), help=help_text,
                                    type=s.parse or (float if s.kind is float else s.kind),
                                    choices=s.choices)

    def from_args(self, args: argparse.Namespace, base: dict | None = None) -> dict:
        """``base`` (e.g. a scene's table) with every flag that was given on top."""
        values = dict(base or {})
        for name in self.settings:
            if getattr(args, name, None) is not None:
                values[name] = getattr(args, name)
        return values


def _copy(value):
    return list(value) if isinstance(value, list) else dict(value) if isinstance(value, dict) else value
