"""Profile data sets: LaMP-2 conversion (Appendix D), HuffPost news profiles, holdout split, Parquet I/O."""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import shared_data_dir

from xpeft.data import (
    HUFFPOST_TO_LAMP2,
    NEWS_CATEGORIES,
    convert_lamp2,
    holdout_split,
    load_news_profiles,
    load_news_profiles_sample,
    profile_stats,
    read_profiles_parquet,
    write_profiles_parquet,
)
from xpeft.data import cli as data_cli

REPO = Path(__file__).resolve().parents[1]


def _item(i, text, category, title=None):
    item = {"text": text, "category": category, "id": str(i)}
    return {**item, "title": title} if title else item


# Hand-made LaMP-2 files: questions 1 and 3 come from the same author (their profiles share articles),
# question 2 from another; question 4's author repeats question 2's profile exactly.
LAMP2_QUESTIONS = [
    {
        "id": "1",
        "input": "Which category does this article relate to among the following categories? ... article: x",
        "profile": [
            _item(10, "Senate passes the bill", "politics"),
            _item(11, "New pasta recipes", "food & drink"),
        ],
    },
    {
        "id": "2",
        "input": "... article: y",
        "profile": [
            _item(20, "Playoff recap", "sports", title="Recap"),
            _item(21, "Oscars night", "entertainment"),
        ],
    },
    {
        "id": "3",
        "input": "... article: z",
        "profile": [
            _item(30, "Senate passes the bill", "politics"),
            _item(31, "New pasta recipes", "food & drink"),
            _item(32, "Museum reopens", "culture & arts"),
        ],
    },
    {
        "id": "4",
        "input": "... article: w",
        "profile": [_item(40, "Playoff recap", "sports"), _item(41, "Oscars night", "entertainment")],
    },
]
LAMP2_OUTPUTS = {"task": "LaMP_2", "golds": [{"id": q["id"], "output": "politics"} for q in LAMP2_QUESTIONS]}


@pytest.fixture
def lamp2_files(tmp_path):
    q, o = tmp_path / "dev_questions.json", tmp_path / "dev_outputs.json"
    q.write_text(json.dumps(LAMP2_QUESTIONS))
    o.write_text(json.dumps(LAMP2_OUTPUTS))
    return q, o


def test_lamp2_converter_extracts_author_profiles_and_deduplicates(lamp2_files):
    table = convert_lamp2(*lamp2_files)
    rows = list(
        zip(
            table["text"].to_pylist(),
            table["category"].to_pylist(),
            table["profile_id"].to_pylist(),
            strict=True,
        )
    )
    assert rows == [
        ("Senate passes the bill", "politics", "0"),
        ("New pasta recipes", "food & drink", "0"),
        ("Playoff recap", "sports", "1"),
        ("Oscars night", "entertainment", "1"),
        ("Museum reopens", "culture & arts", "0"),
    ]  # 10 profile items in, 5 unique (text, category, author) out, 2 authors
    assert table["label"].to_pylist() == [NEWS_CATEGORIES.index(c) for _, c, _ in rows]
    assert "input" not in table.column_names  # only the profiles are used, not the questions


def test_lamp2_converter_rejects_unknown_category_and_mismatched_outputs(lamp2_files, tmp_path):
    q, o = lamp2_files
    bad = [{"id": "9", "input": "", "profile": [_item(1, "t", "weather")]}]
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="category 'weather' is not one of LaMP-2's 15"):
        convert_lamp2(tmp_path / "bad.json")
    o.write_text(json.dumps({"task": "LaMP_2", "golds": [{"id": "1", "output": "politics"}]}))
    with pytest.raises(ValueError, match="no gold for 3 question"):
        convert_lamp2(q, o)


def _news(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def _rec(n, category, author, link=None):
    return {
        "category": category,
        "headline": f"Headline {n}",
        "authors": author,
        "link": link or f"https://example.org/{n}",
        "short_description": f"desc {n}.",
        "date": "2018-05-01",
    }


def test_news_loader_maps_categories_dedupes_links_and_filters_authors(tmp_path):
    folder = tmp_path / "news_category_huffpost"
    _news(
        folder / "a_v2.json",
        [_rec(i, "POLITICS", "Ann") for i in range(3)]
        + [
            _rec(3, "STYLE", "Ann"),
            _rec(4, "WORLD NEWS", "Ann"),
            _rec(5, "TASTE", ""),
            _rec(6, "TECH", "Bo"),
        ],
    )
    _news(
        folder / "b_v3.json",
        [_rec(0, "POLITICS", "Ann"), _rec(7, "ARTS & CULTURE", "Ann "), _rec(8, "WELLNESS", "Bo")],
    )
    table = load_news_profiles(tmp_path, min_articles=2)
    assert table.column_names == ["text", "label", "profile_id", "category"]
    got = Counter(zip(table["profile_id"].to_pylist(), table["category"].to_pylist(), strict=True))
    # link 0 appears in both files once; WORLD NEWS maps to none; the author-less TASTE row is dropped
    assert got == Counter(
        {
            ("Ann", "politics"): 3,
            ("Ann", "style & beauty"): 1,
            ("Ann", "culture & arts"): 1,
            ("Bo", "science & technology"): 1,
            ("Bo", "healthy living"): 1,
        }
    )
    assert table["text"].to_pylist()[0] == "Headline 0 desc 0."
    assert set(load_news_profiles(folder, min_articles=3)["profile_id"].to_pylist()) == {"Ann"}
    with pytest.raises(FileNotFoundError, match="news_category_huffpost"):
        load_news_profiles(tmp_path / "nowhere")


def test_category_mapping_covers_the_15_lamp2_categories():
    assert len(NEWS_CATEGORIES) == 15 and set(HUFFPOST_TO_LAMP2.values()) == set(NEWS_CATEGORIES)
    assert HUFFPOST_TO_LAMP2["COLLEGE"] == "education" and HUFFPOST_TO_LAMP2["PARENTING"] == "parents"
    assert "WORLD NEWS" not in HUFFPOST_TO_LAMP2


def _profiles_table(sizes: dict[str, int], classes: int = 2, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    ids = [p for p, n in sizes.items() for _ in range(n)]
    labels = rng.integers(0, classes, len(ids))
    return pa.table(
        {
            "text": [f"text {i}" for i in range(len(ids))],
            "label": pa.array(labels, pa.int64()),
            "profile_id": ids,
        }
    )


def test_holdout_is_70_30_per_profile_stratified_and_deterministic():
    table = pa.table(
        {
            "text": [f"t{i}" for i in range(20)],
            "label": pa.array([0] * 10 + [1] * 10, pa.int64()),
            "profile_id": ["p"] * 20,
        }
    )
    split = holdout_split(table)
    test_labels = Counter(
        lab for lab, s in zip(split["label"].to_pylist(), split["split"].to_pylist(), strict=True) if s == "test"
    )
    assert test_labels == {0: 3, 1: 3}  # 30% of each label
    big = _profiles_table({"a": 10, "b": 33, "c": 2, "d": 1, "e": 100})
    once, twice = holdout_split(big, seed=7), holdout_split(big, seed=7)
    assert once["split"].to_pylist() == twice["split"].to_pylist()
    assert holdout_split(big, seed=8)["split"].to_pylist() != once["split"].to_pylist()
    per = Counter(zip(once["profile_id"].to_pylist(), once["split"].to_pylist(), strict=True))
    assert [per[(p, "test")] for p in "abcde"] == [3, 10, 1, 0, 30]
    shuffled = big.take(np.random.default_rng(1).permutation(len(big)))  # row order does not matter
    key = lambda t: sorted(zip(t["text"].to_pylist(), t["split"].to_pylist(), strict=True))  # noqa: E731
    assert key(holdout_split(shuffled, seed=7)) == key(once)
    df = holdout_split(big.to_pandas(), seed=7)
    assert list(df["split"]) == once["split"].to_pylist()


def test_parquet_roundtrip_is_atomic_and_validated(tmp_path):
    table = holdout_split(_profiles_table({"a": 5, "b": 7}))
    path = write_profiles_parquet(table, tmp_path / "sub" / "p.parquet")
    assert read_profiles_parquet(path).equals(table)
    assert [p.name for p in path.parent.iterdir()] == ["p.parquet"]  # no temp file left behind
    with pytest.raises(ValueError, match="missing column 'profile_id'"):
        write_profiles_parquet(table.drop_columns(["profile_id"]), tmp_path / "x.parquet")
    assert not (tmp_path / "x.parquet").exists()
    empty = table.set_column(0, "text", pa.array(["ok"] * (len(table) - 1) + ["  "]))
    pq.write_table(empty, tmp_path / "empty.parquet")
    with pytest.raises(ValueError, match="1 row\\(s\\) have empty text"):
        read_profiles_parquet(tmp_path / "empty.parquet")
    bad_split = table.set_column(table.column_names.index("split"), "split", pa.array(["dev"] * len(table)))
    with pytest.raises(ValueError, match="split values must be train/test"):
        write_profiles_parquet(bad_split, tmp_path / "y.parquet")
    with pytest.raises(FileNotFoundError, match="xpeft data make-profiles"):
        read_profiles_parquet(tmp_path / "missing.parquet")
    (tmp_path / "junk.parquet").write_text("not parquet")
    with pytest.raises(ValueError, match="not a readable Parquet file"):
        read_profiles_parquet(tmp_path / "junk.parquet")


def test_profile_stats_match_numpy():
    sizes = {"a": 6, "b": 640, "c": 20}
    stats = profile_stats(_profiles_table(sizes, classes=3))
    counts = np.array(list(sizes.values()))
    assert (stats.texts, stats.profiles, stats.categories, stats.min, stats.max) == (666, 3, 3, 6, 640)
    assert stats.mean == pytest.approx(counts.mean()) and stats.std == pytest.approx(counts.std(ddof=1))
    assert "texts per profile: mean 222.00" in stats.format()


def test_bundled_news_sample_is_valid():
    table = load_news_profiles_sample()
    per = Counter(table["profile_id"].to_pylist())
    assert 30 <= len(per) <= 40 and min(per.values()) >= 10 and 300 <= len(table) <= 1500
    assert set(table["category"].to_pylist()) <= set(NEWS_CATEGORIES)


@pytest.mark.shared_data
def test_news_profiles_from_shared_data_have_stable_stats_and_split():
    data = shared_data_dir()
    table = load_news_profiles(data)  # min_articles=10
    stats = profile_stats(table)
    # SOURCES.md: 8,415 usable articles; authors with >= 10 articles: 101 (7,018 articles)
    assert (stats.texts, stats.profiles, stats.categories, stats.min) == (7018, 101, 15, 10)
    assert (
        profile_stats(load_news_profiles(data, min_articles=5)).profiles,
        profile_stats(load_news_profiles(data, min_articles=1)).texts,
    ) == (145, 8415)
    first, second = holdout_split(table, seed=42), holdout_split(load_news_profiles(data), seed=42)
    assert first.equals(second)
    assert profile_stats(first).split_texts == {"train": 4915, "test": 2103}


@pytest.mark.shared_data
def test_committed_samples_regenerate_byte_for_byte(tmp_path):
    assert _run_cli("data", "make-samples", "--data-dir", str(shared_data_dir()), "--out-dir", str(tmp_path)) == 0
    samples = REPO / "xpeft" / "data" / "samples"
    for name in ("sst2_train_sample.tsv", "sst2_dev_sample.tsv"):
        assert (tmp_path / name).read_bytes() == (samples / name).read_bytes()
    assert read_profiles_parquet(tmp_path / "news_profiles_sample.parquet").equals(load_news_profiles_sample())


def _run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="xpeft")
    data_cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(list(argv))
    return args.func(args)


def test_cli_stats_make_profiles_and_convert_lamp2(tmp_path, lamp2_files, capsys):
    assert _run_cli("data", "stats", "--data", "news-sample") == 0
    out = capsys.readouterr().out
    assert "texts: 1,112" in out and "profiles: 36" in out and "split: train" in out
    _news(tmp_path / "news_category_huffpost" / "v.json", [_rec(i, "CRIME", f"A{i % 2}") for i in range(8)])
    out_path = tmp_path / "news.parquet"
    assert (
        _run_cli(
            "data",
            "make-profiles",
            "--data-dir",
            str(tmp_path),
            "--min-articles",
            "4",
            "--out",
            str(out_path),
        )
        == 0
    )
    made = read_profiles_parquet(out_path)
    assert len(made) == 8 and Counter(made["split"].to_pylist()) == {"train": 6, "test": 2}
    questions, outputs = lamp2_files
    assert (
        _run_cli(
            "data",
            "convert-lamp2",
            "--questions",
            str(questions),
            "--outputs",
            str(outputs),
            "--out",
            str(tmp_path / "lamp2.parquet"),
        )
        == 0
    )
    assert "profiles: 2" in capsys.readouterr().out
    assert data_cli.main(["data", "stats", "--data", str(tmp_path / "none.parquet")]) == 2
    assert "no profile data set at" in capsys.readouterr().err
