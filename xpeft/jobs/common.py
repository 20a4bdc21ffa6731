"""What more than one job's flags say."""

PROFILE_SOURCES = "'news-sample' (the bundled 36 authors), 'news' (HuffPost in --data-dir) or a Parquet path / URI"
DATA_FROM_DATA = ("num_labels", "problem_type")  # the data decides these, not a flag
