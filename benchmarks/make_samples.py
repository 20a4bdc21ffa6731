"""Regenerate xpeft/data/samples/ from ../shared/data, deterministically.

    python benchmarks/make_samples.py [--data-dir ../shared/data] [--seed 0]

- sst2_train_sample.tsv / sst2_dev_sample.tsv: 400 / 200 rows of GLUE SST-2 train / dev, copied
  byte for byte in file order (GLUE layout, header `sentence\\tlabel`).
- news_profiles_sample.parquet: 36 authors drawn from the news profiles with >= 10 articles, at most
  40 articles each, from xpeft.data.profiles.load_news_profiles.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np

from xpeft.data.profiles import SAMPLE_PARQUET, load_news_profiles, write_profiles_parquet
from xpeft.data.tasks import SAMPLE_FILES, SAMPLES_DIR, default_data_dir

SST2_ROWS = {"train": 400, "validation": 200}
SST2_SOURCE = {"train": "train.tsv", "validation": "dev.tsv"}
NEWS_AUTHORS, NEWS_MAX_PER_AUTHOR, NEWS_MIN_ARTICLES = 36, 40, 10


def sample_sst2(data_dir: Path, seed: int, out_dir: Path = SAMPLES_DIR) -> None:
    for split, n in SST2_ROWS.items():
        source = data_dir / "glue" / "SST-2" / SST2_SOURCE[split]
        header, *rows = source.read_bytes().splitlines(keepends=True)
        keep = np.sort(np.random.default_rng(seed).choice(len(rows), size=n, replace=False))
        out = out_dir / SAMPLE_FILES[("sst2", split)]
        out.write_bytes(header + b"".join(rows[i] for i in keep))
        print(f"{out}: {n} rows of {source}")


def sample_news(data_dir: Path, seed: int, out_dir: Path = SAMPLES_DIR) -> None:
    table = load_news_profiles(data_dir, min_articles=NEWS_MIN_ARTICLES)
    rng = np.random.default_rng(seed)
    profile_ids = np.asarray(table["profile_id"].to_pylist(), dtype=object)
    authors = rng.choice(sorted(set(profile_ids.tolist())), size=NEWS_AUTHORS, replace=False)
    keep = []
    for author in sorted(authors.tolist()):
        rows = np.flatnonzero(profile_ids == author)
        keep.extend(np.sort(rng.permutation(rows)[:NEWS_MAX_PER_AUTHOR]).tolist())
    sample = table.take(sorted(keep))
    out = write_profiles_parquet(sample, out_dir / SAMPLE_PARQUET.name)
    print(f"{out}: {len(sample)} rows, {NEWS_AUTHORS} authors")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=default_data_dir())
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", type=Path, default=SAMPLES_DIR)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    sample_sst2(args.data_dir, args.seed, args.out_dir)
    sample_news(args.data_dir, args.seed, args.out_dir)


if __name__ == "__main__":
    main()
