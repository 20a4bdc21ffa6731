"""A profile fitted on demand (the server's `POST /v1/profiles/{id}/fit`), without Ray: the store's recipe, a
request's examples checked against it, and the farm's `ProfileFitter` that fits them.

The farm records its recipe in the store it fills (`state/recipe.json`: the backbone, the bank's fingerprint,
the shared head, the mask config with k made explicit, the fit, the label vocabulary). A profile fitted on demand
uses the same recipe, the same seeded 70/30 holdout (§3.1) and the same `ProfileFitter`, so the same rows give
the same profile through the batch job or the endpoint.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import pyarrow as pa

from xpeft.config import TrainConfig, XPeftConfig, default_k
from xpeft.data.dataset import ProfileData
from xpeft.fit.profile import BadProfileData, ProfileFitter

RECIPE = "recipe"  # the store's run state `state/recipe.json`
TEST_FRACTION, SPLIT_SEED = 0.3, 42  # profile_datas' holdout: the farm's
SHOWN = 5  # rows named in an error


@dataclass
class FitRecipe:
    """How a store's profiles are fitted: what the farm used, which an on-demand fit repeats."""

    backbone: str
    xpeft: XPeftConfig
    train: TrainConfig
    bank: str | None = None  # the fingerprint of the store's bank the masks select from (x_peft mode)
    head_id: str | None = None  # the shared head (the mtl setting)
    label_names: list[str] | None = None  # the data set's classes, in the order of the head's outputs
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "backbone": self.backbone,
            "xpeft": self.xpeft.to_dict(),
            "train": self.train.to_dict(),
            "bank": self.bank,
            "head_id": self.head_id,
            "label_names": self.label_names,
            **self.extra,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FitRecipe:
        known = ("backbone", "xpeft", "train", "bank", "head_id", "label_names")
        return cls(
            d["backbone"],
            XPeftConfig.from_dict(d["xpeft"]),
            TrainConfig.from_dict(d["train"]),
            d.get("bank"),
            d.get("head_id"),
            d.get("label_names"),
            {k: v for k, v in d.items() if k not in known},
        )

    @classmethod
    def of(cls, farm, xcfg: XPeftConfig, bank, head_id: str | None) -> FitRecipe:
        """What a farm run (its FarmConfig) fits with: what a fit on demand into its store repeats."""
        fingerprint = bank.fingerprint if bank is not None else None
        return cls(farm.backbone, xcfg, farm.train, fingerprint, head_id, farm.label_names)

    @property
    def regression(self) -> bool:
        return self.xpeft.problem_type == "regression"


def save_recipe(store, recipe: FitRecipe) -> None:
    store.write_state(RECIPE, recipe.to_dict())


def load_recipe(store) -> FitRecipe | None:
    """The store's recipe; None when no farm run recorded one (a store filled before recipes were recorded)."""
    state = store.read_state(RECIPE)
    return FitRecipe.from_dict(state) if state else None


def _named(rows: list[int], what: str) -> str:
    shown = ", ".join(f"{what}[{i}]" for i in rows[:SHOWN])
    return shown + (f" (and {len(rows) - SHOWN} more)" if len(rows) > SHOWN else "")


def encoded_labels(recipe: FitRecipe, labels: list) -> list:
    """Labels as the head's class ids (their names in the recipe's vocabulary) or float targets; BadProfileData
    naming the rows that are neither."""
    if recipe.regression:
        bad = [
            i
            for i, v in enumerate(labels)
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v)
        ]
        if bad:
            raise BadProfileData(f"{_named(bad, 'labels')}: the store's profiles predict a number; send finite numbers")
        return [float(v) for v in labels]
    names = recipe.label_names or [str(i) for i in range(recipe.xpeft.num_labels)]
    index = {n: i for i, n in enumerate(names)}
    bad = [i for i, v in enumerate(labels) if isinstance(v, bool) or str(v) not in index]
    if bad:
        shown = ", ".join(names[:20]) + (", …" if len(names) > 20 else "")
        raise BadProfileData(
            f"{_named(bad, 'labels')} ({', '.join(repr(labels[i]) for i in bad[:SHOWN])}): not a class of this "
            f"store's profiles; a label is one of the data set's {len(names)} class names: {shown}"
        )
    return [index[str(v)] for v in labels]


def examples_data(
    recipe: FitRecipe,
    profile_id: str,
    texts: list[str],
    labels: list,
    text_pairs: list[str] | None = None,
    split: list[str] | None = None,
) -> ProfileData:
    """A request's examples as the farm's ProfileData: labels encoded by the recipe's vocabulary, the holdout the
    given `split` or the farm's seeded 70/30 one. BadProfileData naming the rows and the fix."""
    from xpeft.data.profiles import holdout_split

    n = len(texts)
    for name, values in (("labels", labels), ("text_pairs", text_pairs), ("split", split)):
        if values is not None and len(values) != n:
            raise BadProfileData(f"{name} has {len(values)} entries for {n} texts; give one per text")
    columns: dict[str, pa.Array] = {
        "text": pa.array(texts, pa.string()),
        "label": pa.array(encoded_labels(recipe, labels), pa.float64() if recipe.regression else pa.int64()),
        "profile_id": pa.array([profile_id] * n, pa.string()),
    }
    if text_pairs is not None:
        columns["text_pair"] = pa.array(text_pairs, pa.string())
    if split is not None:
        columns["split"] = pa.array(split, pa.string())
    table = pa.table(columns)
    if split is None:
        table = holdout_split(table, TEST_FRACTION, SPLIT_SEED)
    keep = [c for c in ("text", "text_pair", "label") if c in table.column_names]
    rows = table.to_pylist()
    train = [{c: r[c] for c in keep} for r in rows if r["split"] != "test"]
    test = [{c: r[c] for c in keep} for r in rows if r["split"] == "test"]
    if len(train) < 2 or not test:
        raise BadProfileData(
            f"{n} examples give {len(train)} training and {len(test)} holdout rows; a fit needs at least 2 "
            "training rows and 1 holdout row: send at least 3 examples (or a split with both)"
        )
    return ProfileData(profile_id, train, test)


def with_overrides(
    recipe: FitRecipe, epochs: int | None = None, mask_type: str | None = None, batch_size: int | None = None
) -> tuple[XPeftConfig, TrainConfig]:
    """The recipe's mask config and fit with what a user may set per profile: the epochs and batch size, and the
    mask type where the store's profiles have masks (a hard mask gets the recipe's k, else half the bank)."""
    xcfg, tcfg = recipe.xpeft, recipe.train
    if epochs is not None:
        tcfg = replace(tcfg, epochs=epochs)
    if batch_size is not None:
        tcfg = replace(tcfg, batch_size=batch_size)
    if mask_type is not None and mask_type != xcfg.mask_type:
        if xcfg.mode != "x_peft":
            raise BadProfileData(
                f"mask_type: this store's profiles are {xcfg.mode}, which has no masks; leave mask_type out"
            )
        xcfg = replace(xcfg, mask_type=mask_type, k=xcfg.k if xcfg.k is not None else default_k(xcfg.N))
    return xcfg, tcfg


def recipe_fitter(recipe: FitRecipe, store) -> ProfileFitter:
    """The farm's ProfileFitter for the recipe: its backbone, the store's bank and shared head (each verified
    against its fingerprint when loaded)."""
    from xpeft.core.encoder import load_encoder, load_tokenizer

    bank = store.load_bank(recipe.bank) if recipe.bank else None
    head = store.load_head(recipe.head_id) if recipe.head_id else None
    encoder, tokenizer = load_encoder(recipe.backbone), load_tokenizer(recipe.backbone)
    return ProfileFitter(encoder, tokenizer, bank, recipe.xpeft, recipe.train, head, recipe.head_id, recipe.label_names)
