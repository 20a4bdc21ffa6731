"""A user's own profile data set: its labels become a vocabulary, and bad rows are refused before any fit.

A profile data set is a table with `text`, `label`, `profile_id` and optionally `split` (train / test) and
`text_pair`. Labels can be what a user naturally has:
- strings ("positive" / "negative"), integers or booleans: a classification task whose classes are the
  distinct values, sorted (so the vocabulary is stable whatever the row order); every profile is fitted with a
  head over all of them and stores their names, which the server and batch scoring answer with;
- integers with a `category` (or `label_name`) column naming each id one-to-one (the news data sets): the
  classes are the ids present, named by that column;
- floats: a regression target (num_labels = 1, MSE loss).

`check_profile_table` refuses, naming the rows and the fix, what cannot be fitted: missing columns, null or
mixed-type labels, empty texts, split values other than train/test, profile ids the store refuses. With
`drop_invalid=True` those rows are left out instead and counted.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal

import pyarrow as pa
import pyarrow.compute as pc

SPLITS = ("train", "test")
NAME_COLUMNS = ("label_name", "category")  # columns that may name integer label ids
SHOWN = 5  # rows quoted in an error message

LabelKind = Literal["string", "integer", "boolean", "float"]


@dataclass(frozen=True)
class LabelVocabulary:
    """The classes of a data set (sorted distinct label values) and their names; empty for regression."""

    kind: LabelKind
    values: tuple = ()
    names: tuple[str, ...] = ()

    @property
    def problem_type(self) -> str:
        return "regression" if self.kind == "float" else "classification"

    @property
    def num_labels(self) -> int:
        return 1 if self.kind == "float" else len(self.values)

    @property
    def label_names(self) -> list[str] | None:
        return None if self.kind == "float" else list(self.names)

    def encode(self, labels: list) -> list:
        """Label values → class ids (classification) or floats (regression)."""
        if self.kind == "float":
            return [float(v) for v in labels]
        index = {v: i for i, v in enumerate(self.values)}
        return [index[v] for v in labels]

    def describe(self) -> str:
        if self.kind == "float":
            return "float labels: a regression target (MSE loss, one output)"
        shown = ", ".join(self.names[:8]) + (", …" if len(self.names) > 8 else "")
        return f"{self.kind} labels: {self.num_labels} classes ({shown})"


@dataclass
class CheckedTable:
    """A profile data set that passed `check_profile_table`: labels encoded as class ids (or floats)."""

    table: pa.Table  # text, label (encoded), profile_id[, split][, text_pair]
    labels: LabelVocabulary
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> rows left out (drop_invalid=True)


class BadDataSet(ValueError):
    """The data set cannot be fitted as it is; the message names the rows and the fix."""


def _rows(mask: pa.ChunkedArray | pa.Array) -> list[int]:
    return pc.indices_nonzero(pc.fill_null(mask, True)).to_pylist()


def _quote(rows: list[int]) -> str:
    shown = ", ".join(map(str, rows[:SHOWN]))
    return f"{len(rows)} row(s) (row {shown}{', …' if len(rows) > SHOWN else ''})"


def label_kind(typ: pa.DataType) -> LabelKind:
    if pa.types.is_dictionary(typ):
        typ = typ.value_type
    if pa.types.is_string(typ) or pa.types.is_large_string(typ):
        return "string"
    if pa.types.is_boolean(typ):
        return "boolean"
    if pa.types.is_integer(typ):
        return "integer"
    if pa.types.is_floating(typ) or pa.types.is_decimal(typ):
        return "float"
    raise BadDataSet(
        f"the label column is {typ}: labels must be strings, integers or booleans (classes) or floats "
        "(a regression target), one type for the whole column"
    )


def _name(value: Any, kind: LabelKind) -> str:
    return ("true" if value else "false") if kind == "boolean" else str(value)


def label_vocabulary(table: pa.Table) -> LabelVocabulary:
    """The data set's classes: sorted distinct labels, named by themselves or by a `category` / `label_name`
    column (integer ids); a float label column is a regression target."""
    column = table["label"]
    kind = label_kind(column.type)
    if kind == "float":
        return LabelVocabulary("float")
    if pa.types.is_dictionary(column.type):
        column = column.cast(column.type.value_type)
    values = tuple(sorted(set(column.to_pylist())))
    if len(values) < 2:
        raise BadDataSet(
            f"every row has the label {values[0] if values else None!r}: a classifier needs at least 2 distinct "
            "labels (floats are fitted as a regression target)"
        )
    names = tuple(_name(v, kind) for v in values)
    name_col = next((c for c in NAME_COLUMNS if c in table.column_names), None)
    if kind == "integer" and name_col is not None:
        pairs = set(zip(table["label"].to_pylist(), table[name_col].to_pylist(), strict=True))
        by_id: dict[Any, set] = {}
        for v, n in pairs:
            by_id.setdefault(v, set()).add(n)
        if all(len(n) == 1 and None not in n for n in by_id.values()):
            names = tuple(str(next(iter(by_id[v]))) for v in values)
    return LabelVocabulary(kind, values, names)


def _as_table(data) -> pa.Table:
    if isinstance(data, pa.Table):
        return data
    try:
        return pa.Table.from_pandas(data, preserve_index=False)
    except (pa.ArrowTypeError, pa.ArrowInvalid) as e:
        raise BadDataSet(
            f"the data set has a column of mixed types ({e}); give every column one type, e.g. all labels "
            "strings or all integers"
        ) from None


def check_profile_table(data, drop_invalid: bool = False) -> CheckedTable:
    """Refuse (BadDataSet, naming rows and the fix) or, with `drop_invalid`, drop what cannot be fitted;
    return the table with its labels encoded and the vocabulary. Nothing is fitted or stored before this."""
    from xpeft.profiles.record import validate_profile_id

    table = _as_table(data)
    missing = [c for c in ("text", "label", "profile_id") if c not in table.column_names]
    if missing:
        raise BadDataSet(
            f"the profile data set lacks column(s) {missing}: it needs text, label, profile_id (optionally split, "
            f"text_pair); it has {table.column_names}"
        )
    for name in ("text", "profile_id"):
        typ = table.schema.field(name).type
        if not (pa.types.is_string(typ) or pa.types.is_large_string(typ)):
            raise BadDataSet(f"column {name!r} is {typ}; it must hold strings")
    kind = label_kind(table.schema.field("label").type)
    problems: list[tuple[str, list[int], str]] = []
    problems.append(("null label", _rows(pc.is_null(table["label"])), "give every row a label or drop it"))
    if kind == "float":
        problems.append(("non-finite label", _rows(pc.invert(pc.is_finite(table["label"]))), "drop NaN/inf targets"))
    blank = pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(table["text"])), 0)
    problems.append(("empty text", _rows(blank), "drop rows without text"))
    ids = table["profile_id"].to_pylist()
    bad_ids: dict[str, str] = {}
    for pid in set(ids):
        try:
            validate_profile_id(pid)
        except ValueError as e:
            bad_ids[pid] = str(e)
    problems.append(
        ("invalid profile id", [i for i, p in enumerate(ids) if p in bad_ids], next(iter(bad_ids.values()), ""))
    )
    if "split" in table.column_names:
        ok = pc.is_in(table["split"], value_set=pa.array(SPLITS))
        problems.append(("split not train/test", _rows(pc.invert(ok)), "use 'train' or 'test' (or drop the column)"))
    found = [(what, rows, fix) for what, rows, fix in problems if rows]
    dropped: dict[str, int] = {}
    if found and not drop_invalid:
        lines = "; ".join(f"{what}: {_quote(rows)}; {fix}" for what, rows, fix in found)
        raise BadDataSet(
            f"the profile data set cannot be fitted as it is: {lines}. Fix those rows, or pass --drop-invalid "
            "to leave them out (nothing was fitted or stored)"
        )
    if found:
        bad = sorted({i for _, rows, _ in found for i in rows})
        keep = pc.invert(pa.array([i in set(bad) for i in range(len(table))]))
        table = table.filter(keep)
        dropped = {what: len(rows) for what, rows, _ in found}
    if not len(table):
        raise BadDataSet("the profile data set has no rows left to fit")
    vocab = label_vocabulary(table)
    encoded = pa.array(vocab.encode(table["label"].to_pylist()), pa.float64() if kind == "float" else pa.int64())
    table = table.set_column(table.column_names.index("label"), "label", encoded)
    return CheckedTable(table, vocab, dropped)


def label_counts(labels: list, names: list[str] | None, regression: bool = False) -> dict[str, int]:
    """{label name (or class id): count} of a profile's rows, for the report; nothing for a regression target."""
    if regression:
        return {}
    return {(names[k] if names and k < len(names) else str(k)): n for k, n in sorted(Counter(labels).items())}
