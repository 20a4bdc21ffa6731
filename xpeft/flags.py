"""Command-line flags from config dataclasses: one helper for every script, so defaults and help cannot drift.

    add_flags(parser, TrainConfig, defaults=FARM_TRAIN)      # --lr, --mask-lr, ... with FARM_TRAIN's values
    train = from_flags(args, TrainConfig, base=FARM_TRAIN)

A field's flag is `--<name>` with underscores as dashes (`--mask-lr`; the paper's symbols keep their case:
`--N`, `--k`, `--b`), or its metadata's `flag`. Its help is the field's `help` metadata plus the default.
Literal fields become choices, booleans `--x / --no-x`, `X | None` fields take an X.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, Literal, Union, get_args, get_origin


def flag_name(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or f"--{f.name.replace('_', '-')}"


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
    for f in dataclasses.fields(cls):
        if f.name in skip or (only is not None and f.name not in only) or not f.init or f.metadata.get("no_flag"):
            continue
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
        parser.add_argument(flag_name(f), **kwargs)


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
