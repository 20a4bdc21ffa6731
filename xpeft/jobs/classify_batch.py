"""`xpeft classify-batch` (= `ray_jobs/classify_batch.py`): a Parquet table of texts, each row with its profile, scored
on a Ray Data actor pool of serving engines. The Ray Data wiring lives here, not in `xpeft/ray/`: it runs the
serving engine, and `xpeft/ray/` sits above `xpeft/serve/`; what each actor computes is `xpeft/serve/batch.py`."""

from __future__ import annotations

import argparse
import time

from xpeft.flags import add_flags, from_flags

HELP = "score a Parquet table of texts, each with its profile_id, on a Ray Data actor pool"

# The engine settings a batch job uses; the others are the HTTP server's (replicas, request limits, batching waits).
BATCH_ENGINE = (
    "store", "backbone", "bank_path", "bank_fingerprint", "cpus_per_actor", "gpus_per_actor", "torch_threads",
    "max_batch_size", "cache_size", "record_cache_mb", "max_length",
)  # fmt: skip


def arguments(ap: argparse.ArgumentParser) -> None:
    from xpeft.serve.batch import BatchConfig
    from xpeft.serve.config import ServeConfig

    ap.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else embedded local)")
    add_flags(ap.add_argument_group("batch"), BatchConfig)
    add_flags(ap.add_argument_group("engine (as a server replica's)"), ServeConfig, only=BATCH_ENGINE)


def run_batch(cfg) -> dict:
    """Read `cfg.data` with Ray Data, score it on an actor pool of `BatchScorer`s, write it to `cfg.out`; returns
    rows scored, rows with an error and the commonest errors (read back from the output)."""
    import pyarrow.parquet as pq
    import ray
    from ray.data import ActorPoolStrategy, DataContext, SaveMode

    from xpeft.serve.batch import BatchScorer, check_columns, check_pool

    DataContext.get_current().enable_progress_bars = cfg.progress
    check_pool(cfg, ray.cluster_resources().get("CPU", 0.0))
    try:
        ds = ray.data.read_parquet(cfg.data)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"no table to score at {cfg.data}: give a Parquet file, a folder of them or a URI"
        ) from None
    check_columns(ds.schema().names)
    scored = ds.map_batches(
        BatchScorer,
        fn_constructor_kwargs={"cfg": cfg.serve},
        compute=ActorPoolStrategy(size=cfg.num_actors),
        batch_size=cfg.batch_size,
        batch_format="pyarrow",
        num_cpus=cfg.serve.cpus_per_actor,
        num_gpus=cfg.serve.gpus_per_actor,
    )
    scored.write_parquet(cfg.out, mode=SaveMode.OVERWRITE if cfg.overwrite else SaveMode.ERROR)
    errors = pq.read_table(cfg.out, columns=["error"]).column("error").to_pandas()  # a column: no Ray job needed
    failed = errors.dropna()
    return {"rows": len(errors), "scored": len(errors) - len(failed), "errors": failed.value_counts().head(5).to_dict()}


def run(args: argparse.Namespace) -> None:
    """Score a Parquet table of (text, profile_id) rows with every profile of a store, on a Ray Data actor pool."""
    from xpeft.ray.cluster import init_ray
    from xpeft.serve.batch import BatchConfig
    from xpeft.serve.config import ServeConfig

    cfg = from_flags(args, BatchConfig, serve=from_flags(args, ServeConfig))
    init_ray(args.address, log_to_driver=False)
    start = time.perf_counter()
    result = run_batch(cfg)
    wall = time.perf_counter() - start
    print(f"{result['rows']} rows in {wall:.1f} s, starting the actors included, written to {cfg.out}")
    print(f"  scored {result['scored']}, not scored {result['rows'] - result['scored']} (see the error column)")
    for error, count in result["errors"].items():
        print(f"  {count} x {error}")
