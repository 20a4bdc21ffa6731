"""Profile data sets: (text, label, profile_id) rows for the profile farm, stored as Parquet.

Two sources give the same schema, a pyarrow Table with columns
    text (string), label (int64: index into NEWS_CATEGORIES), profile_id (string), category (string)
and, after `holdout_split`, split ("train" / "test").

- `convert_lamp2`: LaMP-2 "Personalized News Categorization" files, modified as in the paper's
  Appendix D: only the author profiles are kept, as unique (news_text, news_category, author_id).
- `load_news_profiles`: the HuffPost News Category Dataset (which LaMP-2 was built from) with its
  `authors` field as the profile, for when the LaMP-2 files are not at hand (our case; see SOURCES.md).
"""

from __future__ import annotations

import json
import logging
import os
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from xpeft.data.labels import label_kind
from xpeft.data.tasks import SAMPLES_DIR, default_data_dir

log = logging.getLogger(__name__)

# LaMP-2's 15 news categories; a row's label is its index here.
NEWS_CATEGORIES: tuple[str, ...] = (
    "women",
    "religion",
    "politics",
    "style & beauty",
    "entertainment",
    "culture & arts",
    "sports",
    "science & technology",
    "travel",
    "business",
    "crime",
    "education",
    "healthy living",
    "parents",
    "food & drink",
)

# HuffPost category → LaMP-2 category. Categories absent here (WORLD NEWS, U.S. NEWS, COMEDY, MEDIA,
# BLACK VOICES, QUEER VOICES, WEIRD NEWS, IMPACT, ...) map to none of the 15 and are dropped.
HUFFPOST_TO_LAMP2: dict[str, str] = {
    **{c.upper(): c for c in NEWS_CATEGORIES},  # identity: POLITICS → politics, ..., FOOD & DRINK, PARENTS
    "STYLE": "style & beauty",
    "ARTS": "culture & arts",
    "ARTS & CULTURE": "culture & arts",
    "SCIENCE": "science & technology",
    "TECH": "science & technology",
    "COLLEGE": "education",
    "WELLNESS": "healthy living",
    "PARENTING": "parents",
    "TASTE": "food & drink",
}

NEWS_DIR = "news_category_huffpost"
SAMPLE_PARQUET = SAMPLES_DIR / "news_profiles_sample.parquet"
REQUIRED_COLUMNS = {"text": pa.string(), "label": pa.int64(), "profile_id": pa.string()}
SPLITS = ("train", "test")


def _table(rows: list[tuple[str, str, str]]) -> pa.Table:
    """(text, category, profile_id) rows → the profile schema."""
    return pa.table(
        {
            "text": pa.array([r[0] for r in rows], pa.string()),
            "label": pa.array([NEWS_CATEGORIES.index(r[1]) for r in rows], pa.int64()),
            "profile_id": pa.array([r[2] for r in rows], pa.string()),
            "category": pa.array([r[1] for r in rows], pa.string()),
        }
    )


def _lamp2_category(raw: str, where: str) -> str:
    category = str(raw).strip().lower()
    if category not in NEWS_CATEGORIES:
        raise ValueError(f"{where}: category {raw!r} is not one of LaMP-2's 15: {', '.join(NEWS_CATEGORIES)}")
    return category


def convert_lamp2(questions_json: str | os.PathLike, outputs_json: str | os.PathLike | None = None) -> pa.Table:
    """LaMP-2 questions (+ outputs) JSON → unique (text, category, author) rows, as in Appendix D.

    A questions file is a list of {id, input, profile: [{id, text, category(, title)}]}, each profile
    being the articles one author categorised. Only these profiles are used (not the questions), and
    the same author's profile appears under several questions, so authors are recovered as the groups
    of questions whose profiles share an article text, numbered "0", "1", ... in order of first
    appearance. Duplicate (text, category, author) rows are removed. `outputs_json`
    ({task, golds: [{id, output}]}) is only checked against the questions.
    """
    with open(questions_json, encoding="utf-8") as f:
        questions = json.load(f)
    if not isinstance(questions, list) or not all(isinstance(q, dict) and "profile" in q for q in questions):
        raise ValueError(f"{questions_json}: expected a LaMP-2 questions file, a list of {{id, input, profile}}")
    if outputs_json is not None:
        _check_lamp2_outputs(questions, outputs_json)

    parent = list(range(len(questions)))  # union-find over questions

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    owner: dict[str, int] = {}  # article text → first question whose profile holds it
    for q, question in enumerate(questions):
        for item in question["profile"]:
            first = owner.setdefault(item["text"], q)
            parent[root(q)] = root(first)

    author_of_root: dict[int, str] = {}
    rows, seen = [], set()
    for q, question in enumerate(questions):
        author = author_of_root.setdefault(root(q), str(len(author_of_root)))
        for item in question["profile"]:
            where = f"{questions_json} question {question.get('id', q)} profile item {item.get('id', '?')}"
            row = (item["text"], _lamp2_category(item["category"], where), author)
            if row not in seen:
                seen.add(row)
                rows.append(row)
    log.info("LaMP-2: %d questions → %d unique texts by %d authors", len(questions), len(rows), len(author_of_root))
    return _table(rows)


def _check_lamp2_outputs(questions: list[dict], outputs_json: str | os.PathLike) -> None:
    with open(outputs_json, encoding="utf-8") as f:
        outputs = json.load(f)
    if not isinstance(outputs, dict) or "golds" not in outputs:
        raise ValueError(f"{outputs_json}: expected a LaMP-2 outputs file, {{task, golds: [{{id, output}}]}}")
    gold_ids = {str(g["id"]) for g in outputs["golds"]}
    missing = [str(q["id"]) for q in questions if str(q.get("id")) not in gold_ids]
    if missing:
        raise ValueError(
            f"{outputs_json} has no gold for {len(missing)} question(s), e.g. id {missing[0]}; "
            "pass the outputs file of the same LaMP-2 split"
        )


def _news_files(data_dir: str | os.PathLike | None) -> list[Path]:
    base = Path(data_dir) if data_dir is not None else default_data_dir()
    folder = base / NEWS_DIR if (base / NEWS_DIR).is_dir() else base
    files = sorted(folder.glob("*.json"))
    if not files:
        raise FileNotFoundError(
            f"no HuffPost News Category *.json files in {folder}. Put "
            f"News_Category_Dataset_v*.json (JSON lines) in <data-dir>/{NEWS_DIR}/ "
            "or pass --data-dir / XPEFT_DATA_DIR"
        )
    return files


def load_news_profiles(data_dir: str | os.PathLike | None = None, min_articles: int = 10) -> pa.Table:
    """HuffPost News Category records → the profile schema, one profile per `authors` string.

    The files in <data_dir>/news_category_huffpost/*.json (JSON lines) are read in name order and
    deduplicated by `link` (the first record wins). text = headline + " " + short_description;
    categories map to LaMP-2's 15 through HUFFPOST_TO_LAMP2 (others dropped); rows with an empty
    `authors` are dropped; authors with fewer than `min_articles` remaining articles are dropped.
    """
    if min_articles < 1:
        raise ValueError(f"min_articles must be at least 1, got {min_articles}")
    by_link: dict[str, tuple[str, str, str]] = {}
    for path in _news_files(data_dir):
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                    link, category, author = rec["link"], rec["category"], rec["authors"].strip()
                except (json.JSONDecodeError, KeyError, AttributeError) as e:
                    raise ValueError(f"{path} line {n}: not a News Category record ({e})") from e
                if link in by_link:
                    continue
                text = f"{rec.get('headline', '').strip()} {rec.get('short_description', '').strip()}".strip()
                by_link[link] = (text, HUFFPOST_TO_LAMP2.get(category.strip().upper(), ""), author)
    kept = [r for r in by_link.values() if r[1] and r[2] and r[0]]
    counts: dict[str, int] = {}
    for r in kept:
        counts[r[2]] = counts.get(r[2], 0) + 1
    rows = [r for r in kept if counts[r[2]] >= min_articles]
    log.info(
        "news: %d articles, %d in LaMP-2 categories with an author, %d by authors with >= %d",
        len(by_link),
        len(kept),
        len(rows),
        min_articles,
    )
    return _table(rows)


def load_news_profiles_sample() -> pa.Table:
    """The small news-profile sample shipped in xpeft/data/samples/ (see its README.md)."""
    return read_profiles_parquet(SAMPLE_PARQUET)


def _test_count(n: int, test_fraction: float) -> int:
    if n < 2:
        return 0  # a single text goes to train
    return min(n - 1, max(1, round(n * test_fraction)))


def _profile_test_rows(labels: np.ndarray, test_fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Positions (into `labels`) to hold out: per-label quotas by largest remainder, then random picks."""
    classes, sizes = np.unique(labels, return_counts=True)
    want = sizes * test_fraction
    quota = np.floor(want).astype(int)
    extra = _test_count(len(labels), test_fraction) - quota.sum()
    order = np.lexsort((rng.random(len(classes)), -(want - quota)))  # largest remainder, random ties
    quota[order[:extra]] += 1
    picks = [rng.permutation(np.flatnonzero(labels == c))[:q] for c, q in zip(classes, quota, strict=True)]
    return np.concatenate(picks) if picks else np.zeros(0, dtype=int)


def holdout_split(data, test_fraction: float = 0.3, seed: int = 42):
    """Add a `split` column: per profile, `test_fraction` of its texts (rounded, at least one when it has
    two or more) go to "test", stratified by label where the counts allow, the rest to "train".

    Deterministic for a seed and independent of row order and of the other profiles (each profile's
    generator is seeded by (seed, crc32(profile_id)), and its rows are sorted by text first). Accepts a
    pyarrow Table or a pandas DataFrame and returns the same type.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be between 0 and 1, got {test_fraction}")
    table = data if isinstance(data, pa.Table) else pa.Table.from_pandas(data, preserve_index=False)
    _validate(table, "holdout_split input")
    profile_ids = np.asarray(table["profile_id"].to_pylist(), dtype=object)
    labels = np.asarray(table["label"].to_pylist(), dtype=object)
    texts = np.asarray(table["text"].to_pylist(), dtype=object)
    split = np.full(len(table), "train", dtype=object)
    for pid in sorted(set(profile_ids.tolist())):
        rows = np.flatnonzero(profile_ids == pid)
        rows = np.array(sorted(rows.tolist(), key=lambda i: (texts[i], labels[i])), dtype=int)
        rng = np.random.default_rng([seed, zlib.crc32(pid.encode("utf-8"))])
        split[rows[_profile_test_rows(labels[rows], test_fraction, rng)]] = "test"
    if "split" in table.column_names:
        table = table.drop_columns(["split"])
    table = table.append_column("split", pa.array(split.tolist(), pa.string()))
    return table if isinstance(data, pa.Table) else table.to_pandas()


def _validate(table: pa.Table, where: str) -> None:
    doubled = sorted({c for c in table.column_names if table.column_names.count(c) > 1})
    if doubled:
        raise ValueError(f"{where}: column(s) {doubled} appear more than once; keep one of each")
    for name, typ in REQUIRED_COLUMNS.items():
        if name not in table.column_names:
            raise ValueError(
                f"{where}: missing column {name!r}; a profile data set needs text, label, profile_id "
                f"(it has {', '.join(table.column_names)})"
            )
        got = table.schema.field(name).type
        if name == "label":
            try:
                label_kind(got)
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from None
        elif not (got == typ or (typ == pa.string() and pa.types.is_large_string(got))):
            raise ValueError(f"{where}: column {name!r} is {got}, expected {typ}")
        if table[name].null_count:
            raise ValueError(f"{where}: column {name!r} has {table[name].null_count} null value(s); drop those rows")
    empty = [i for i, t in enumerate(table["text"].to_pylist()) if not t.strip()]
    if empty:
        raise ValueError(f"{where}: {len(empty)} row(s) have empty text (first: row {empty[0]}); drop them")
    if any(not p.strip() for p in table["profile_id"].to_pylist()):
        raise ValueError(f"{where}: some rows have an empty profile_id; give every row its author/profile")
    if "split" in table.column_names:
        bad = set(table["split"].to_pylist()) - set(SPLITS)
        if bad:
            raise ValueError(f"{where}: split values must be train/test, found {sorted(map(str, bad))}")


def write_profiles_parquet(table: pa.Table, path: str | os.PathLike) -> Path:
    """Validate and write `table` atomically (temporary file in the same folder, then os.replace)."""
    path = Path(path)
    _validate(table, str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    # Same folder (os.replace must not cross file systems); a unique name so concurrent writers don't collide.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_profiles_parquet(path: str | os.PathLike) -> pa.Table:
    """Read a profile data set written by `write_profiles_parquet`, checking its schema."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"no profile data set at {path}; make one with `xpeft data make-profiles "
            f"--out {path}` or `xpeft data convert-lamp2`"
        )
    try:
        table = pq.read_table(path)
    except pa.ArrowInvalid as e:
        raise ValueError(f"{path} is not a readable Parquet file ({e})") from e
    _validate(table, str(path))
    return table


@dataclass(frozen=True)
class ProfileStats:
    """What §3.1 reports: texts, profiles, categories, texts per profile (mean, std, min, max)."""

    texts: int
    profiles: int
    categories: int
    mean: float
    std: float  # sample standard deviation (ddof=1, as pandas' describe)
    min: int
    max: int
    split_texts: dict[str, int] | None = None

    def format(self) -> str:
        lines = [
            f"texts: {self.texts:,}",
            f"profiles: {self.profiles:,}",
            f"categories: {self.categories}",
            f"texts per profile: mean {self.mean:.2f}, std {self.std:.2f}, min {self.min}, max {self.max}",
        ]
        if self.split_texts:
            lines.append("split: " + ", ".join(f"{k} {v:,}" for k, v in self.split_texts.items()))
        return "\n".join(lines)


def profile_stats(table: pa.Table) -> ProfileStats:
    _validate(table, "profile_stats input")
    _, per_profile = np.unique(np.asarray(table["profile_id"].to_pylist(), dtype=object), return_counts=True)
    if not len(per_profile):
        raise ValueError("profile_stats: the table has no rows")
    split = None
    if "split" in table.column_names:
        values = table["split"].to_pylist()
        split = {s: values.count(s) for s in SPLITS}
    return ProfileStats(
        texts=len(table),
        profiles=len(per_profile),
        categories=len(set(table["label"].to_pylist())),
        mean=float(per_profile.mean()),
        std=float(per_profile.std(ddof=1)) if len(per_profile) > 1 else 0.0,
        min=int(per_profile.min()),
        max=int(per_profile.max()),
        split_texts=split,
    )
