"""The jobs, each one function over the library with flags generated from its configs (xpeft.flags):
`xpeft fit-profiles | fit-task | tune | serve | classify-batch` and `python ray_jobs/<job>.py` are the same code.

Without RAY_ADDRESS a job starts an embedded local Ray; under `ray job submit` it joins the cluster.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from collections.abc import Callable

from xpeft.config import TrainConfig, XPeftConfig
from xpeft.flags import add_flags, from_flags

log = logging.getLogger(__name__)

PROFILE_SOURCES = "'news-sample' (the bundled 36 authors), 'news' (HuffPost in --data-dir) or a Parquet path / URI"
DATA_FROM_DATA = ("num_labels", "problem_type")  # the data decides these


def _configure() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# --- fit-profiles: the profile farm -------------------------------------------------------------------------


def fit_profiles_arguments(ap: argparse.ArgumentParser) -> None:
    from xpeft.fit.recipes import FARM_TRAIN
    from xpeft.ray.farm import FarmConfig

    src = ap.add_mutually_exclusive_group()
    src.add_argument(
        "--demo",
        action="store_true",
        help="fit the bundled news sample (36 authors) with the mtl setting and hard masks (default: off; or --data)",
    )
    src.add_argument(
        "--data",
        help=f"the profile data set (text, label, profile_id[, split]): {PROFILE_SOURCES} (default: none; or --demo)",
    )
    ap.add_argument(
        "--data-dir", default=None, help="HuffPost for --data news (default: XPEFT_DATA_DIR, ../shared/data)"
    )
    ap.add_argument("--min-articles", type=int, default=10, help="--data news: authors with >= this many (default: 10)")
    ap.add_argument("--max-profiles", type=int, default=None, help="fit only the first n profiles by id (default: all)")
    ap.add_argument(
        "--drop-invalid",
        action="store_true",
        help="leave out rows with null labels, empty texts, invalid profile ids or unknown splits (default: refuse)",
    )
    ap.add_argument(
        "--store", default=None, help="the profile store: a directory or URI (default runs/<data>-<setting>)"
    )
    ap.add_argument("--report-dir", default=None, help="where the report and plots go (default <store>/reports/<time>)")
    ap.add_argument("--no-plots", action="store_true", help="skip the plots (Figures 3 and 6; default: drawn)")
    ap.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else embedded local)")
    add_flags(ap.add_argument_group("farm"), FarmConfig, skip=("store",))
    add_flags(
        ap.add_argument_group("profiles (X-PEFT)"),
        XPeftConfig,
        defaults=XPeftConfig(head="linear"),
        skip=DATA_FROM_DATA,
    )
    add_flags(ap.add_argument_group("fit (xpeft.fit.recipes.FARM_TRAIN)"), TrainConfig, defaults=FARM_TRAIN)


def fit_profiles(args: argparse.Namespace) -> None:
    """Fit one profile per profile_id of the data set into the store, write the report and plots."""
    from xpeft.data.dataset import SAMPLE_SOURCE, profile_datas, read_profile_source
    from xpeft.fit.recipes import FARM_TRAIN
    from xpeft.profiles.store import ProfileStore
    from xpeft.ray.cluster import init_ray
    from xpeft.ray.farm import FarmConfig, run_farm
    from xpeft.ray.report import finish_run

    if args.demo:
        args.data, args.setting, args.store = SAMPLE_SOURCE, "mtl", args.store or "runs/demo"
    if not args.data:
        raise ValueError("give the profiles: --demo or --data (news-sample, news or a Parquet path)")
    dataset = profile_datas(
        read_profile_source(args.data, args.data_dir, args.min_articles), drop_invalid=args.drop_invalid
    )
    datas = dataset.profiles[: args.max_profiles] if args.max_profiles else dataset.profiles
    labels = dataset.labels
    xcfg = from_flags(args, XPeftConfig, num_labels=labels.num_labels, problem_type=labels.problem_type)
    log.info("%d profiles; %s", len(datas), labels.describe())
    if dataset.dropped:
        log.warning("rows left out (--drop-invalid): %s", dataset.dropped)
    name = os.path.splitext(os.path.basename(args.data))[0]
    store_uri = args.store or f"runs/{name}-{args.setting}-{args.mode}"
    train = from_flags(args, TrainConfig, base=FARM_TRAIN)
    cfg = from_flags(args, FarmConfig, store=store_uri, xpeft=xcfg, train=train, label_names=labels.label_names)
    init_ray(args.address, log_to_driver=False)
    report = run_farm(cfg, datas)
    store = ProfileStore(store_uri)
    report_dir = args.report_dir or os.path.join(store_uri, "reports", time.strftime("%Y%m%d-%H%M%S"))
    paths, _, drawn = finish_run(report, cfg.to_dict(), store, datas, labels.label_names, report_dir, not args.no_plots)
    print(open(paths["md"]).read().split("## Per profile")[0])
    plots = [] if drawn.get("skipped") else list(drawn.values())
    print("report and plots:", ", ".join([*paths.values(), *plots]))
    print(f"profiles stored in {store_uri}: {len(store)}")


# --- fit-task: one fit with Ray Train ----------------------------------------------------------------------


def fit_task_arguments(ap: argparse.ArgumentParser, for_search: bool = False) -> None:
    from xpeft.fit.task import FitConfig

    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--task",
        help="GLUE/SuperGLUE task: cola sst2 mrpc qqp stsb mnli qnli rte wnli cb boolq axb axg "
        "(default: none; or --data)",
    )
    src.add_argument(
        "--data",
        help=f"a profile data set ({PROFILE_SOURCES}); with --profile-id, the profile to fit "
        "(default: none; or --task)",
    )
    ap.add_argument("--data-dir", default=None, help="GLUE/SuperGLUE files (default ../shared/data or XPEFT_DATA_DIR)")
    ap.add_argument("--train-subset", type=int, default=None, help="fit on n training rows, seeded (default: all)")
    ap.add_argument("--eval-subset", type=int, default=None, help="evaluate on n rows of the split (default: all)")
    ap.add_argument(
        "--recipe",
        choices=["paper", "task"],
        default="paper",
        help="paper: TrainConfig(), the paper's §3 settings; task: xpeft.fit.recipes.TASK_TRAIN (default: paper)",
    )
    ap.add_argument("--num-cpus", type=int, default=None, help="CPUs of the embedded local Ray (default: all)")
    skip = ("task", "storage_path", "name") if for_search else ("task",)
    add_flags(ap.add_argument_group("fit"), FitConfig, skip=skip)
    add_flags(ap.add_argument_group("model (X-PEFT)"), XPeftConfig, skip=DATA_FROM_DATA)
    group = ap.add_argument_group("training (each flag overrides the --recipe's value)")
    add_flags(group, TrainConfig, unset=True)


def fit_config(args: argparse.Namespace):
    """(FitConfig, TaskData) from the flags: the data is loaded and tokenized here, once, on the driver."""
    from xpeft.core.encoder import load_tokenizer
    from xpeft.fit.recipes import TASK_TRAIN
    from xpeft.fit.task import FitConfig, for_task, load_profile_data, load_task_data

    train = from_flags(args, TrainConfig, base=TASK_TRAIN if args.recipe == "task" else TrainConfig())
    xcfg = from_flags(args, XPeftConfig)
    tokenizer = load_tokenizer(args.backbone)
    if args.task:
        xcfg = for_task(xcfg, args.task)
        data = load_task_data(
            args.task, tokenizer, train.max_length, args.data_dir, args.train_subset, args.eval_subset, train.seed
        )
    else:
        if not args.profile_id:
            raise ValueError("--data needs --profile-id: the profile to fit")
        data, xcfg, _ = load_profile_data(args.data, args.profile_id, tokenizer, xcfg, train.max_length)
    return from_flags(args, FitConfig, xpeft=xcfg, train=train, task=args.task), data


def fit_task(args: argparse.Namespace) -> None:
    """Fit x_peft (soft/hard), single_adapter or head_only with Ray Train DDP workers."""
    from xpeft.ray.cluster import init_ray
    from xpeft.ray.train import fit_distributed

    cfg, data = fit_config(args)
    init_ray(num_cpus=args.num_cpus)
    start = time.perf_counter()
    report = fit_distributed(cfg, data)
    wall = time.perf_counter() - start
    resumed = f", resumed at epoch {report.resumed_from_epoch}" if report.resumed_from_epoch is not None else ""
    what = cfg.xpeft.mode + (f"/{cfg.xpeft.mask_type}" if cfg.xpeft.mode == "x_peft" else "")
    print(
        f"fitted {cfg.task or args.profile_id} with {what}: {len(data.train)} train rows, {report.world_size} "
        f"worker(s) x batch {report.per_worker_batch} x {report.torch_threads} threads, {report.epochs} epochs, "
        f"{report.steps} steps{resumed}"
    )
    shown = json.dumps({k: round(v, 4) for k, v in report.metrics.items()})
    loss = f"loss {report.losses[0]:.4f} -> {report.losses[-1]:.4f}"
    print(f"{loss}; eval on {len(data.eval)} rows: {shown}; score {report.score}")
    print(f"wall time {wall:.1f} s (training loop {report.seconds:.1f} s); checkpoint {report.checkpoint_path}")
    if report.profile is not None:
        print(f"profile {report.profile.profile_id} ({report.profile.record_bytes} bytes) stored in {cfg.store}")
    if args.json:
        body = {k: v for k, v in dataclasses.asdict(report).items() if k not in ("profile", "replica_states")}
        with open(args.json, "w") as f:
            json.dump({**body, "wall_seconds": wall, "train_rows": len(data.train)}, f, indent=1)


def fit_task_job_arguments(ap: argparse.ArgumentParser) -> None:
    fit_task_arguments(ap)
    ap.add_argument("--json", default=None, help="also write the report (loss curve, history) here (default: none)")


# --- tune: Appendix C's search ------------------------------------------------------------------------------


def tune_arguments(ap: argparse.ArgumentParser) -> None:
    from xpeft.ray.tune import SEARCH_SPACE, SearchConfig

    fit_task_arguments(ap, for_search=True)
    ap.add_argument(
        "--search",
        nargs="+",
        choices=list(SEARCH_SPACE),
        default=list(SEARCH_SPACE),
        help=f"the dimensions searched (Appendix C; default: {' '.join(SEARCH_SPACE)})",
    )
    for dim, values in SEARCH_SPACE.items():
        ap.add_argument(
            f"--space-{dim.replace('_', '-')}", dest=f"space_{dim}", type=int, nargs="+", default=list(values),
            help=f"values of {dim} (default {list(values)}, Appendix C)",
        )  # fmt: skip
    add_flags(ap.add_argument_group("search"), SearchConfig, defaults=SearchConfig(storage_path="runs/tune"))
    ap.add_argument("--restore", action="store_true", help="continue the search --name (default: a new search)")


def tune(args: argparse.Namespace) -> None:
    """The paper's hyper-parameter search (Appendix C) with Ray Tune and ASHA on the task's official score."""
    from xpeft.ray.cluster import init_ray
    from xpeft.ray.tune import SearchConfig, restore_search, search

    if args.restore and args.name == "search":
        log.info("--restore without --name continues the search named 'search'")
    fit, data = fit_config(args)
    space = {dim: tuple(getattr(args, f"space_{dim}")) for dim in args.search}
    scfg = from_flags(args, SearchConfig, fit=dataclasses.replace(fit, name=None, store=None), space=space)
    init_ray(num_cpus=args.num_cpus, dashboard=args.distributed)  # Ray Train's cleanup of stopped trials needs it
    result = (restore_search if args.restore else search)(scfg, data, store=args.store)
    print(f"{len(result.trials)} trials in {result.experiment_path}")
    for t in sorted(result.trials, key=lambda t: -(t["score"] if t["score"] is not None else -1e9)):
        error = f", error {t['error']}" if t["error"] else ""
        print(f"  {json.dumps(t['config'])}: score {t['score']}, {t['epochs']} epochs{error}")
    stored = f"; profile {result.profile_id} stored in {args.store}" if result.profile_id else ""
    print(f"best {json.dumps(result.best_config)} score {result.best_score:.4f}{stored}")


# --- serve: the profile server ------------------------------------------------------------------------------


def serve_arguments(ap: argparse.ArgumentParser) -> None:
    from xpeft.serve.config import ServeConfig

    ap.add_argument("--host", default="127.0.0.1", help="0.0.0.0 listens on every interface (default: 127.0.0.1)")
    ap.add_argument("--port", type=int, default=8000, help="the HTTP port (default: 8000)")
    add_flags(ap.add_argument_group("server"), ServeConfig)


def serve(args: argparse.Namespace) -> None:
    """Serve every profile of a store over HTTP (the Ray Serve app of xpeft.serve) until Ctrl-C or SIGTERM."""
    import signal

    import ray
    from ray import serve as ray_serve

    from xpeft.profiles.store import ProfileStore
    from xpeft.ray.cluster import init_ray
    from xpeft.serve.config import ServeConfig
    from xpeft.serve.deployment import build_app
    from xpeft.serve.engine import serving_bank
    from xpeft.serve.proxy import install

    cfg = from_flags(args, ServeConfig)
    # Refuse an old-layout store or a damaged bank here, in one line, rather than in every replica's traceback.
    serving_bank(cfg, ProfileStore(cfg.store))
    install(cfg)  # an embedded Ray's proxy reads bodies within cfg's limits and answers for a replica that died
    init_ray()
    # Before Serve starts (a client may see /healthz answer before serve.run returns): `kill` then shuts
    # Serve down cleanly instead of meeting Ray's fatal-signal handler, which init_ray installed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        ray_serve.start(http_options={"host": args.host, "port": args.port})
        ray_serve.run(build_app(cfg), name="xpeft", route_prefix="/")
        host = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
        url = f"http://{host}:{args.port}"
        print(f"serving the profiles of {cfg.store} at {url} (auth {'on' if cfg.api_token else 'off'})")
        print(f"  curl {url}/healthz")
        body = """-d '{"profile_id": "...", "texts": ["..."]}'"""
        print(f"  curl -X POST {url}/v1/classify -H 'Content-Type: application/json' {body}")
        print(f"  API docs: {url}/docs   (Ctrl-C stops)", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        ray_serve.shutdown()
        ray.shutdown()


# --- classify-batch: score a table of texts with Ray Data ----------------------------------------------------

# The engine settings a batch job uses; the others are the HTTP server's (replicas, request limits, batching waits).
BATCH_ENGINE = (
    "store", "backbone", "bank_path", "bank_fingerprint", "torch_threads", "max_batch_size", "cache_size",
    "record_cache_mb", "max_length",
)  # fmt: skip


def classify_batch_arguments(ap: argparse.ArgumentParser) -> None:
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
        num_cpus=cfg.cpus_per_actor,
        num_gpus=cfg.gpus_per_actor,
    )
    scored.write_parquet(cfg.out, mode=SaveMode.OVERWRITE if cfg.overwrite else SaveMode.ERROR)
    errors = pq.read_table(cfg.out, columns=["error"]).column("error").to_pandas()  # a column: no Ray job needed
    failed = errors.dropna()
    return {"rows": len(errors), "scored": len(errors) - len(failed), "errors": failed.value_counts().head(5).to_dict()}


def classify_batch(args: argparse.Namespace) -> None:
    """Score a Parquet table of (text, profile_id) rows with every profile of a store, on a Ray Data actor pool."""
    from xpeft.ray.cluster import init_ray
    from xpeft.serve.batch import BatchConfig
    from xpeft.serve.config import ServeConfig

    base = {"num_cpus": args.cpus_per_actor, "num_gpus": args.gpus_per_actor}
    cfg = from_flags(args, BatchConfig, serve=from_flags(args, ServeConfig, **base))
    init_ray(args.address, log_to_driver=False)
    start = time.perf_counter()
    result = run_batch(cfg)
    wall = time.perf_counter() - start
    print(f"{result['rows']} rows in {wall:.1f} s, starting the actors included, written to {cfg.out}")
    print(f"  scored {result['scored']}, not scored {result['rows'] - result['scored']} (see the error column)")
    for error, count in result["errors"].items():
        print(f"  {count} x {error}")


# --- the table of jobs ----------------------------------------------------------------------------------------

Job = tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], None], str]
JOBS: dict[str, Job] = {
    "fit-profiles": (
        fit_profiles_arguments,
        fit_profiles,
        "fit one X-PEFT profile per profile_id into a store (the farm)",
    ),
    "fit-task": (fit_task_job_arguments, fit_task, "fit a GLUE/SuperGLUE task or one profile with Ray Train DDP"),
    "tune": (tune_arguments, tune, "search N / k / b / batch size (Appendix C) with Ray Tune and ASHA"),
    "serve": (serve_arguments, serve, "serve every profile of a store over HTTP with Ray Serve"),
    "classify-batch": (
        classify_batch_arguments,
        classify_batch,
        "score a Parquet table of texts, each with its profile_id, on a Ray Data actor pool",
    ),
}


def run(job: str, args: argparse.Namespace) -> None:
    """Run a parsed job; a refusal (bad input, a missing file) is one line on stderr and exit code 2."""
    _configure()
    try:
        JOBS[job][1](args)
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"{job}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def main(job: str, argv: list[str] | None = None, doc: str | None = None) -> None:
    """`python ray_jobs/<job>.py ...`: the job's flags and run, as `xpeft <job> ...`."""
    add, _, help_text = JOBS[job]
    ap = argparse.ArgumentParser(description=doc or help_text, formatter_class=argparse.RawDescriptionHelpFormatter)
    add(ap)
    run(job, ap.parse_args(argv))
