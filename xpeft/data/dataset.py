"""A profile data set, checked and split: one `ProfileData` per profile (its training rows and its holdout),
and the label vocabulary every profile's head covers.

    dataset = profile_datas(read_profile_source("runs/mine.parquet"))
    dataset.profiles[0].train, dataset.labels.label_names
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pyarrow as pa

from xpeft.data.labels import LabelVocabulary, check_profile_table


@dataclass
class ProfileData:
    """One profile's examples: rows of {"text", "label"[, "text_pair"]}; `test` is its 30% holdout (§3.1)."""

    profile_id: str
    train: list[dict]
    test: list[dict]

    @property
    def size(self) -> int:
        return len(self.train) + len(self.test)

    @property
    def text_pair(self) -> bool:
        """Whether it is a pair task: some training row has a second segment (a data set's `text_pair`)."""
        return any(r.get("text_pair") for r in self.train)


@dataclass
class ProfileDataset:
    """A checked profile data set, one ProfileData per profile, and the classes every profile's head covers."""

    profiles: list[ProfileData]
    labels: LabelVocabulary
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> rows left out (drop_invalid=True)


def profile_datas(table, test_fraction: float = 0.3, seed: int = 42, drop_invalid: bool = False) -> ProfileDataset:
    """Check a profile table (text, label, profile_id[, split][, text_pair]) and split it into one ProfileData
    per profile, labels encoded by the data set's vocabulary (`xpeft.data.labels`).

    Bad rows (null labels, empty texts, invalid ids, unknown splits) are refused before anything is fitted,
    or left out with `drop_invalid`. Without a `split` column each profile gets the seeded, stratified 70/30
    holdout of §3.1."""
    from xpeft.data.profiles import holdout_split

    checked = check_profile_table(table, drop_invalid=drop_invalid)
    t = checked.table
    if "split" not in t.column_names:
        t = holdout_split(t, test_fraction, seed)
    columns = [c for c in ("text", "text_pair", "label", "profile_id", "split") if c in t.column_names]
    keep = [c for c in ("text", "text_pair", "label") if c in columns]
    by_profile: dict[str, list[dict]] = {}
    for r in t.select(columns).to_pylist():
        by_profile.setdefault(r["profile_id"], []).append(r)
    datas = []
    for pid, rs in sorted(by_profile.items()):
        train = [{c: r[c] for c in keep} for r in rs if r["split"] != "test"]
        test = [{c: r[c] for c in keep} for r in rs if r["split"] == "test"]
        datas.append(ProfileData(pid, train, test))
    return ProfileDataset(datas, checked.labels, checked.dropped)


SAMPLE_SOURCE = "news-sample"  # the bundled 36-author news sample
NEWS_SOURCE = "news"  # the HuffPost news profiles built from ../shared/data


def read_profile_source(source: str, data_dir: str | None = None, min_articles: int = 10) -> pa.Table:
    """A profile table from 'news-sample' (bundled), 'news' (HuffPost in `data_dir`) or a Parquet path or
    URI (s3://…, any pyarrow file system)."""
    from xpeft.data.profiles import load_news_profiles, load_news_profiles_sample

    if source == SAMPLE_SOURCE:
        return load_news_profiles_sample()
    if source == NEWS_SOURCE:
        return load_news_profiles(data_dir, min_articles)
    import pyarrow.parquet as pq

    try:
        return pq.read_table(source)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"no profile data set at {source}: give a Parquet file with text, label, profile_id "
            "(make one with `xpeft data make-profiles`)"
        ) from None
    except pa.ArrowInvalid as e:
        raise ValueError(f"{source} is not a readable Parquet file ({e})") from None
