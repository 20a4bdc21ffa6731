"""Command-line flags from config dataclasses: one helper for every script, so defaults and help cannot drift.

    add_flags(parser, TrainConfig, defaults=FARM_TRAIN)      # --lr, --mask-lr, ... with FARM_TRAIN's values
    train = from_flags(args, TrainConfig, base=FARM_TRAIN)
    cfg = from_strings(ServeConfig, {"store": "runs/x", "cpus_per_actor": "0.5"})   # `serve run` key=value, env vars

A field's flag is its name, `--<name>` with underscores as dashes (`--mask-lr`; the paper's symbols keep their
case: `--N`, `--k`, `--b`). Its help is the field's `help` metadata plus the default. Literal fields become
choices, booleans `--x / --no-x`, `X | None` fields take an X. A field's `renamed_from` metadata lists the names
it had (a field name, or `--flag` for a flag alone): a script that still uses one is refused with the new name,
as a flag and as a `from_strings` key.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, Literal, Union, get_args, get_origin


def flag_name(name: str) -> str:
    """The flag of a field (or of an old field name)."""
    return f"--{name.replace('_', '-')}"


def renamed_fields(cls: type) -> dict[str, str]:
    """{old name: field name} over the fields of `cls` that were renamed; old flags keep their dashes."""
    return {old: f.name for f in dataclasses.fields(cls) for old in f.metadata.get("renamed_from", ())}


class _Renamed(argparse.Action):
    """An old flag: refused, naming the new one (argparse's own error, exit code 2)."""

    def __init__(self, option_strings, dest, new: str, **kwargs):
        super().__init__(option_strings, dest=argparse.SUPPRESS, nargs="?", help=argparse.SUPPRESS)
        self.new = new

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"{option_string} was renamed {self.new} (a flag is its config field's name): use {self.new}")


def _add_renamed(parser, cls: type, added: set[str]) -> None:
    taken = set(getattr(parser, "_option_string_actions", {}))
    for old, new in renamed_fields(cls).items():
        flag = old if old.startswith("--") else flag_name(old)
        if new in added and flag not in taken:
            parser.add_argument(flag, action=_Renamed, new=flag_name(new))


def _resolve(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _base_type(hint: Any) -> tuple[Any, bool]:
    """(the type a flag parses, whether None is allowed) of a field's annotation."""
    if get_origin(hint) in (Union, types.UnionType):
        args = [a for a in get_args(hint) if a is not type(None)]
        return (args[0] if len(args) == 1 else str), True
    return hint, False


def _default(f: dataclasses.Field, defaults: Any) -> Any:
    if defaults is not None and hasattr(defaults, f.name):
        return getattr(defaults, f.name)
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def add_flags(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type,
    *,
    defaults: Any = None,
    skip: tuple[str, ...] = (),
    only: tuple[str, ...] | None = None,
    unset: bool = False,
) -> None:
    """Add a flag for each field of the dataclass `cls` (but `skip`, or only `only`); `defaults`, an instance,
    overrides the field defaults shown and used. A field without a default is a required flag. With `unset`,
    a flag not given leaves its field out of the parsed namespace, so `from_flags(base=...)` keeps the base's
    value (a recipe's, say) and only the flags given override it."""
    hints = _resolve(cls)
    added = set()
    for f in dataclasses.fields(cls):
        if f.name in skip or (only is not None and f.name not in only) or not f.init or f.metadata.get("no_flag"):
            continue
        added.add(f.name)
        kind, optional = _base_type(hints[f.name])
        default = _default(f, defaults)
        required = not unset and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING  # type: ignore[misc]
        text = f.metadata.get("help", "")
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS if unset else default}
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
            kwargs["help"] = f"{text} (default: {'on' if default else 'off'})"
        else:
            if get_origin(kind) is Literal:
                kwargs["choices"] = list(get_args(kind))
                kind = type(kwargs["choices"][0])
            elif get_origin(kind) in (tuple, list):
                kwargs["nargs"] = "+"
                kind = get_args(kind)[0]
            kwargs["type"] = kind if kind in (int, float, str) else str
            kwargs["required"] = required
            shown = "" if required else f" (default: {default})"
            if unset:
                shown = f" (default: {default}, or the recipe's)" if defaults is None else shown
            kwargs["help"] = f"{text}{shown}".replace("%", "%%")
            kwargs["metavar"] = f.name.upper() if "choices" not in kwargs else None
        parser.add_argument(flag_name(f.name), **kwargs)
    _add_renamed(parser, cls, added)


def from_flags(args: argparse.Namespace, cls: type, base: Any = None, **overrides: Any):
    """An instance of `cls` from the parsed flags its fields were added with (fields without a flag come
    from `base`, else their defaults), then `overrides`."""
    values = {} if base is None else {f.name: getattr(base, f.name) for f in dataclasses.fields(cls) if f.init}
    for f in dataclasses.fields(cls):
        if f.init and hasattr(args, f.name):
            value = getattr(args, f.name)
            values[f.name] = tuple(value) if isinstance(value, list) else value
    values.update(overrides)
    return cls(**values)


def from_strings(cls: type, values: dict[str, str]):
    """An instance of `cls` from string values (`serve run ... key=value` arguments, env vars), each converted by
    its field's type. An unknown key is refused naming the known ones, an old one naming its new name."""
    hints = _resolve(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init and not f.metadata.get("no_flag")}
    renamed = {old: new for old, new in renamed_fields(cls).items() if not old.startswith("--")}
    old = sorted(set(values) & set(renamed))
    if old:
        raise ValueError(f"setting {old[0]!r} was renamed {renamed[old[0]]!r}: use {renamed[old[0]]}=...")
    unknown = set(values) - set(fields)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} settings {sorted(unknown)}; known: {sorted(fields)}")
    return cls(**{name: _parse(name, raw, hints[name]) for name, raw in values.items()})


def _parse(name: str, raw: str, hint: Any) -> Any:
    kind, _ = _base_type(hint)
    if get_origin(kind) is Literal:
        if raw not in get_args(kind):
            raise ValueError(f"setting {name}={raw!r} is not one of {list(get_args(kind))}")
        return raw
    if kind is bool:  # bool("false") is True
        if raw.lower() not in ("1", "0", "true", "false", "yes", "no"):
            raise ValueError(f"setting {name}={raw!r} is not a valid bool (true or false)")
        return raw.lower() in ("1", "true", "yes")
    kind = kind if kind in (int, float, str) else str
    try:
        return kind(raw)
    except ValueError:
        raise ValueError(f"setting {name}={raw!r} is not a valid {kind.__name__}") from None
