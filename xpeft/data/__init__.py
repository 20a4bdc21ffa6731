"""Task loaders (GLUE, SuperGLUE) and profile data sets (LaMP-2, HuffPost news) for xpeft."""

from xpeft.data.profiles import (
    HUFFPOST_TO_LAMP2,
    NEWS_CATEGORIES,
    ProfileStats,
    convert_lamp2,
    holdout_split,
    load_news_profiles,
    load_news_profiles_sample,
    profile_stats,
    read_profiles_parquet,
    write_profiles_parquet,
)
from xpeft.data.tasks import (
    HUB,
    SAMPLE,
    TASKS,
    TaskSpec,
    default_data_dir,
    get_task,
    load_task,
    tokenize_dataset,
)

__all__ = [
    "HUB",
    "HUFFPOST_TO_LAMP2",
    "NEWS_CATEGORIES",
    "SAMPLE",
    "TASKS",
    "ProfileStats",
    "TaskSpec",
    "convert_lamp2",
    "default_data_dir",
    "get_task",
    "holdout_split",
    "load_news_profiles",
    "load_news_profiles_sample",
    "load_task",
    "profile_stats",
    "read_profiles_parquet",
    "tokenize_dataset",
    "write_profiles_parquet",
]
