"""A user's own data: labels of any natural type become the data set's classes, named in every answer; bad
rows are refused before anything is fitted or stored."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from xpeft.config import TrainConfig, XPeftConfig
from xpeft.core.accounting import Dims, profile_bytes
from xpeft.core.bank import random_bank
from xpeft.data.dataset import profile_datas
from xpeft.data.labels import BadDataSet, check_profile_table
from xpeft.fit.profile import ProfileFitter

REPO = Path(__file__).resolve().parents[1]
WORDS = {"good": "great fun love happy", "bad": "awful boring hate sad", "meh": "old slow small"}


def table(labels: dict, per_profile: int = 8, profiles: int = 2, **columns) -> pa.Table:
    """`profiles` authors whose label (a value of `labels`) follows from their words."""
    rows = []
    for p in range(profiles):
        for i in range(per_profile):
            key = list(labels)[i % len(labels)]
            rows.append({"text": f"{WORDS[key]} {i}", "label": labels[key], "profile_id": f"user-{p}"})
    t = pa.Table.from_pylist(rows)
    for name, values in columns.items():
        t = t.append_column(name, pa.array(values))
    return t


CASES = [
    # name, labels per word, expected classes (sorted), problem type
    ("strings", {"good": "positive", "bad": "negative"}, ["negative", "positive"], "classification"),
    ("integers", {"good": 1, "bad": 0}, ["0", "1"], "classification"),
    ("sparse integers", {"good": 7, "bad": 3, "meh": 5}, ["3", "5", "7"], "classification"),
    ("booleans", {"good": True, "bad": False}, ["false", "true"], "classification"),
    ("floats", {"good": 0.9, "bad": 0.1, "meh": 0.5}, None, "regression"),
]


@pytest.mark.parametrize("name,labels,classes,problem", CASES, ids=[c[0] for c in CASES])
def test_the_labels_of_the_data_become_its_classes(name, labels, classes, problem):
    ds = profile_datas(table(labels))
    assert ds.labels.problem_type == problem and ds.labels.label_names == classes
    assert ds.labels.num_labels == (1 if classes is None else len(classes))
    rows = [r for d in ds.profiles for r in d.train + d.test]
    if classes is not None:  # every row's label is its class index in the sorted vocabulary
        by_text = {r["text"].split()[0]: r["label"] for r in rows}
        assert all(classes[by_text[WORDS[w].split()[0]]] in (str(v).lower(), str(v)) for w, v in labels.items())
    else:
        assert {r["label"] for r in rows} == set(labels.values())


def test_integer_ids_named_by_a_category_column_keep_those_names():
    t = table({"good": 4, "bad": 2}, category=["sports", "politics"] * 8)
    assert check_profile_table(t).labels.label_names == ["politics", "sports"]


def test_a_profile_that_sees_some_labels_keeps_the_whole_vocabulary():
    t = pa.concat_tables([table({"good": "pos", "bad": "neg"}), table({"good": "pos", "meh": "mid"}, profiles=1)])
    t = t.set_column(2, "profile_id", pa.array([*(["a"] * 16), *(["b"] * 8)]))
    assert profile_datas(t).labels.label_names == ["mid", "neg", "pos"]  # b never sees "neg", a never "mid"


BAD = [
    ("null label", {"label": [None, "pos"] * 8}, "null label: 8 row(s) (row 0, 2, 4, 6, 8, …)"),
    ("empty text", {"text": ["  ", "fine"] + ["ok"] * 14}, "empty text: 1 row(s) (row 0); drop rows without text"),
    ("bad split", {"split": ["train", "dev"] * 8}, "split not train/test: 8 row(s)"),
    ("invalid id", {"profile_id": ["../x"] + ["u"] * 15}, "invalid profile id: 1 row(s) (row 0); invalid profile id"),
    ("one label", {"label": ["pos"] * 16}, "a classifier needs at least 2 distinct labels"),
    ("list labels", {"label": [[1]] * 16}, "labels must be strings, integers or booleans"),
]


@pytest.mark.parametrize("name,columns,message", BAD, ids=[b[0] for b in BAD])
def test_bad_rows_are_refused_naming_the_rows_and_the_fix(name, columns, message):
    t = table({"good": "pos", "bad": "neg"})
    for col, values in columns.items():
        if col in t.column_names:
            t = t.set_column(t.column_names.index(col), col, pa.array(values))
        else:
            t = t.append_column(col, pa.array(values))
    with pytest.raises(BadDataSet) as e:
        check_profile_table(t)
    assert message in str(e.value)


def test_mixed_type_labels_are_refused():
    import pandas as pd

    df = pd.DataFrame({"text": ["a b", "c d"] * 4, "label": [1, "positive"] * 4, "profile_id": ["u"] * 8})
    with pytest.raises(BadDataSet, match="mixed types"):
        check_profile_table(df)


def test_drop_invalid_leaves_the_bad_rows_out_and_counts_them():
    t = table({"good": "pos", "bad": "neg"})
    t = t.set_column(0, "text", pa.array(["", *t["text"].to_pylist()[1:]]))
    checked = check_profile_table(t, drop_invalid=True)
    assert checked.dropped == {"empty text": 1} and len(checked.table) == len(t) - 1


def test_the_main_job_refuses_bad_data_before_anything_is_stored(tmp_path):
    data, store = tmp_path / "mine.parquet", tmp_path / "store"
    t = table({"good": "pos", "bad": "neg"})
    pq.write_table(t.set_column(1, "label", pa.array([None, *t["label"].to_pylist()[1:]], pa.string())), data)
    r = subprocess.run(
        [sys.executable, "ray_jobs/fit_profiles.py", "--data", str(data), "--store", str(store)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode != 0 and "null label: 1 row(s) (row 0)" in r.stderr and "Traceback" not in r.stderr
    assert not store.exists()


def fitted(labels: dict, tiny_backbone_dir: str, head: str = "linear", **columns):
    """Fit one profile of `labels` on the tiny backbone, as a farm actor does (no Ray)."""
    from xpeft.core.encoder import load_encoder, load_tokenizer

    ds = profile_datas(table(labels, per_profile=10, profiles=1, **columns))
    encoder = load_encoder(tiny_backbone_dir)
    bank = random_bank(2, 8, 4, 32, seed=0)
    xcfg = XPeftConfig(N=8, b=4, head=head, num_labels=ds.labels.num_labels, problem_type=ds.labels.problem_type)
    fitter = ProfileFitter(
        encoder, load_tokenizer(tiny_backbone_dir), bank, xcfg, TrainConfig(lr=1e-2, epochs=2, batch_size=4),
        label_names=ds.labels.label_names,
    )  # fmt: skip
    return ds, bank, fitter.fit(ds.profiles[0]).profile


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    from tiny_backbone import make_tiny_backbone

    return make_tiny_backbone(tmp_path_factory.mktemp("tiny-bert"))


@pytest.mark.parametrize("name,labels,classes,problem", CASES, ids=[c[0] for c in CASES])
def test_a_fitted_profile_serves_its_classes_by_name(name, labels, classes, problem, backbone, tmp_path):
    from xpeft.profiles.store import ProfileStore
    from xpeft.serve.config import ServeConfig
    from xpeft.serve.engine import ProfileEngine, predictions

    ds, bank, profile = fitted(labels, backbone)
    assert profile.label_names == classes and profile.config.num_labels == ds.labels.num_labels
    store = ProfileStore(tmp_path / "store")
    store.save_bank(bank)
    store.write([profile])
    engine = ProfileEngine(ServeConfig(store=store.uri, backbone=backbone, record_cache_mb=0))
    (combined,) = engine.load_profiles([profile.profile_id])
    texts = [WORDS[w] for w in labels]
    logits = engine.forward([(combined, row) for row in engine.tokenize(texts, None)])
    answer = predictions(combined, logits)
    if problem == "regression":
        assert all(set(a) == {"value"} for a in answer)
    else:
        assert all(a["label_name"] == classes[a["label"]] and len(a["probabilities"]) == len(classes) for a in answer)


def test_a_binary_profile_stores_the_bytes_the_accounting_says_for_two_classes(backbone):
    _, bank, profile = fitted({"good": "positive", "bad": "negative"}, backbone)
    want = profile_bytes("x_peft", "hard", 8, 4, Dims(d=32, L=2), c=2, head="linear")["total"]
    assert profile.config.num_labels == 2 and profile.record_bytes == want
    assert tuple(profile.tensors["head.classifier.weight"].shape) == (2, 32)  # two classes, not the news task's 15


@pytest.mark.parametrize("pairs", [True, False], ids=["a text_pair column", "single texts"])
def test_a_profile_records_whether_its_data_had_text_pairs_and_the_store_keeps_it(pairs, backbone, tmp_path):
    from xpeft.profiles.store import ProfileStore

    columns = {"text_pair": [f"second {i}" for i in range(10)]} if pairs else {}
    _, _, profile = fitted({"good": "positive", "bad": "negative"}, backbone, **columns)
    assert profile.config.text_pair is pairs
    store = ProfileStore(tmp_path / "store")
    store.write([profile])
    assert store.get(profile.profile_id).config.text_pair is pairs
