"""`xpeft data ...` subcommands: stats, convert-lamp2, make-profiles, make-samples.

    xpeft data stats --data news [--data-dir DIR] [--min-articles 10] [--seed 42]
    xpeft data stats --data news-sample | PATH.parquet
    xpeft data make-profiles --out news.parquet [--data-dir DIR] [--min-articles 10]
    xpeft data convert-lamp2 --questions dev_questions.json [--outputs dev_outputs.json] --out lamp2.parquet
    xpeft data make-samples [--data-dir DIR] [--seed 0] [--out-dir xpeft/data/samples]

`register(subparsers)` adds them to the `xpeft` command; `python -m xpeft.data.cli` runs them alone.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np

from xpeft.data.profiles import (
    SAMPLE_PARQUET,
    convert_lamp2,
    holdout_split,
    load_news_profiles,
    profile_stats,
    write_profiles_parquet,
)
from xpeft.data.tasks import SAMPLE_FILES, SAMPLES_DIR, default_data_dir

# The bundled samples (xpeft/data/samples/README.md): rows of SST-2 copied in file order, news authors drawn.
SST2_ROWS = {"train": 400, "validation": 200}
SST2_SOURCE = {"train": "train.tsv", "validation": "dev.tsv"}
NEWS_AUTHORS, NEWS_MAX_PER_AUTHOR, NEWS_MIN_ARTICLES = 36, 40, 10


def _add_split_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--test-fraction", type=float, default=0.3, help="held-out share per profile (default: 0.3, the paper's)"
    )
    p.add_argument("--seed", type=int, default=42, help="seed of the per-profile holdout split (default: 42)")


def _add_news_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data-dir",
        default=None,
        help="folder holding news_category_huffpost/ (default: XPEFT_DATA_DIR or ../shared/data)",
    )
    p.add_argument("--min-articles", type=int, default=10, help="drop authors with fewer articles (default 10)")


def register(subparsers) -> None:
    """Add `data` and its subcommands to an argparse subparsers object; each sets `func`."""
    data = subparsers.add_parser("data", help="data sets: profile statistics, LaMP-2 conversion, news profiles")
    sub = data.add_subparsers(
        dest="data_command", required=True, metavar="{stats,make-profiles,convert-lamp2,make-samples}"
    )

    stats = sub.add_parser("stats", help="texts, profiles, categories and texts per profile (paper §3.1)")
    stats.add_argument(
        "--data",
        required=True,
        help="'news' (HuffPost from --data-dir), 'news-sample' (bundled) or a profile .parquet file",
    )
    _add_news_options(stats)
    _add_split_options(stats)
    stats.set_defaults(func=cmd_stats)

    make = sub.add_parser("make-profiles", help="HuffPost news → profile Parquet with a train/test split column")
    make.add_argument("--out", required=True, type=Path, help="the .parquet file to write")
    _add_news_options(make)
    _add_split_options(make)
    make.set_defaults(func=cmd_make_profiles)

    lamp = sub.add_parser("convert-lamp2", help="LaMP-2 questions/outputs JSON → profile Parquet (Appendix D)")
    lamp.add_argument("--questions", required=True, type=Path, help="LaMP-2 *_questions.json")
    lamp.add_argument(
        "--outputs",
        type=Path,
        default=None,
        help="LaMP-2 *_outputs.json, checked against the questions (default: none, no labels)",
    )
    lamp.add_argument("--out", required=True, type=Path, help="the .parquet file to write")
    _add_split_options(lamp)
    lamp.set_defaults(func=cmd_convert_lamp2)

    samples = sub.add_parser(
        "make-samples", help="regenerate the bundled samples (xpeft/data/samples/) from the full data, byte for byte"
    )
    samples.add_argument(
        "--data-dir", type=Path, default=None, help="GLUE and HuffPost files (default: XPEFT_DATA_DIR, ../shared/data)"
    )
    samples.add_argument("--seed", type=int, default=0, help="the samples' seed (default: 0, the bundled ones')")
    samples.add_argument("--out-dir", type=Path, default=SAMPLES_DIR, help=f"where they go (default: {SAMPLES_DIR})")
    samples.set_defaults(func=cmd_make_samples)


def _describe_news(args) -> str:
    folder = Path(args.data_dir) if args.data_dir else default_data_dir()
    return f"news (HuffPost News Category in {folder}, authors with >= {args.min_articles} articles)"


def cmd_stats(args) -> int:
    from xpeft.data.dataset import NEWS_SOURCE, SAMPLE_SOURCE, read_profile_source

    table = read_profile_source(args.data, args.data_dir, args.min_articles)
    source = {NEWS_SOURCE: _describe_news(args), SAMPLE_SOURCE: "news-sample (xpeft/data/samples/)"}.get(
        args.data, args.data
    )
    if "split" not in table.column_names:
        table = holdout_split(table, args.test_fraction, args.seed)
        source += f"; holdout split test_fraction={args.test_fraction} seed={args.seed}"
    print(f"profiles: {source}")
    print(profile_stats(table).format())
    return 0


def _write(table, out: Path) -> int:
    write_profiles_parquet(table, out)
    print(f"wrote {out}")
    print(profile_stats(table).format())
    return 0


def cmd_make_profiles(args) -> int:
    table = load_news_profiles(args.data_dir, args.min_articles)
    return _write(holdout_split(table, args.test_fraction, args.seed), args.out)


def cmd_convert_lamp2(args) -> int:
    table = convert_lamp2(args.questions, args.outputs)
    return _write(holdout_split(table, args.test_fraction, args.seed), args.out)


def sample_sst2(data_dir: Path, seed: int, out_dir: Path = SAMPLES_DIR) -> None:
    """SST-2's bundled train / dev samples: rows of GLUE's files drawn with `seed`, copied byte for byte in file
    order under the GLUE header."""
    for split, n in SST2_ROWS.items():
        source = data_dir / "glue" / "SST-2" / SST2_SOURCE[split]
        header, *rows = source.read_bytes().splitlines(keepends=True)
        keep = np.sort(np.random.default_rng(seed).choice(len(rows), size=n, replace=False))
        out = out_dir / SAMPLE_FILES[("sst2", split)]
        out.write_bytes(header + b"".join(rows[i] for i in keep))
        print(f"{out}: {n} rows of {source}")


def sample_news(data_dir: Path, seed: int, out_dir: Path = SAMPLES_DIR) -> None:
    """The bundled news profiles: 36 authors drawn from those with >= 10 articles, at most 40 articles each."""
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


def cmd_make_samples(args) -> int:
    data_dir = args.data_dir or default_data_dir()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    sample_sst2(data_dir, args.seed, args.out_dir)
    sample_news(data_dir, args.seed, args.out_dir)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="xpeft")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError) as e:
        print(f"xpeft: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
