"""Scoring a table of texts, each row with its profile, through the serving engine: what every actor of the
batch-inference job (`xpeft classify-batch`, `ray_jobs/classify_batch.py`) runs on each Ray Data batch, with
torch and pyarrow only (no Ray here: the job in xpeft.jobs.classify_batch wires it into `map_batches`).

A batch's rows may name any profiles: each is read and combined once through the engine's caches
(`ProfileEngine.load_profiles`), and the rows run as mixed-profile forwards of up to `max_batch_size` rows,
sorted by length so little is padded. A row that cannot be scored (an unknown or unservable profile, an empty
text, a failed forward) gets its reason in `error`; it never fails the batch or the job.

Input columns: `text`, `profile_id`; optional `id`, `text_pair`; any others pass through. Output: the input
columns, then the OUTPUT columns below.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import pyarrow as pa

from xpeft.config import option
from xpeft.serve.config import ServeConfig
from xpeft.serve.engine import ProfileEngine, ServeError, predictions

log = logging.getLogger(__name__)

REQUIRED = ("text", "profile_id")
OPTIONAL = ("id", "text_pair")
OUTPUT = pa.schema(
    [
        ("label", pa.int64()),  # the class index (null for a regression profile or an error)
        ("label_name", pa.string()),  # its name, when the profile's data set named its classes
        ("probabilities", pa.list_(pa.float64())),  # the class distribution (null for regression)
        ("value", pa.float64()),  # the predicted value of a regression profile (null for a classifier)
        ("profile_created", pa.float64()),  # the stored version of the profile used (its created timestamp)
        ("error", pa.string()),  # why the row was not scored (null when it was)
    ]
)


@dataclass
class BatchConfig:
    """One batch-inference run: where the table is, where the scores go, and the actor pool."""

    data: str = option(
        help="the table to score: a Parquet file, a folder of them or a URI (s3://…), with columns text, "
        "profile_id and optionally id, text_pair"
    )
    out: str = option(help="the folder or URI the scored table is written to (Parquet files)")
    num_actors: int = option(1, "actors in the pool, each holding one engine (backbone, bank and caches)")
    batch_size: int = option(256, "rows per Ray Data batch handed to an actor (the forwards take max_batch_size each)")
    overwrite: bool = option(False, "replace what is at --out (otherwise an existing output is refused)")
    progress: bool = option(True, "Ray Data's progress bars")
    serve: ServeConfig | None = option(
        None, "the engine's settings, its cpus_per_actor and gpus_per_actor each actor's", no_flag=True
    )

    def __post_init__(self) -> None:
        if self.num_actors < 1 or self.batch_size < 1:
            raise ValueError(f"num_actors and batch_size must be >= 1, got {self.num_actors}, {self.batch_size}")
        if self.serve is None:
            raise ValueError("BatchConfig needs serve=ServeConfig(store=...): the engine each actor holds")


def check_pool(cfg: BatchConfig, cluster_cpus: float) -> None:
    """The actor pool leaves Ray Data a CPU for its read and write tasks: a pool that reserves every CPU of the
    cluster waits for them forever (seen: `--num-actors 2` on 2 cores never read a row)."""
    cpus = cfg.serve.cpus_per_actor
    need = cfg.num_actors * cpus
    if need > cluster_cpus - 1:
        fit = max(cluster_cpus - 1, 0) / cfg.num_actors
        raise ValueError(
            f"{cfg.num_actors} actors x {cpus:g} CPUs reserve {need:g} of the cluster's "
            f"{cluster_cpus:g} CPUs, leaving none of the one Ray Data's read and write tasks need, so the job would "
            f"wait forever: use fewer --num-actors, or --cpus-per-actor {fit:.2g} or less (the actors still use "
            "--torch-threads each)"
        )


def check_columns(names: list[str]) -> None:
    """The table has text and profile_id, and no column the output would overwrite; the error names the fix."""
    missing = [c for c in REQUIRED if c not in names]
    if missing:
        raise ValueError(
            f"the table to score needs columns {list(REQUIRED)} (optional {list(OPTIONAL)}); it lacks {missing} "
            f"and has {names}"
        )
    clash = [c for c in OUTPUT.names if c in names]
    if clash:
        raise ValueError(f"the table already has columns {clash}, which the scores are written to; rename them")


def score_table(engine: ProfileEngine, table: pa.Table) -> pa.Table:
    """`table` with the OUTPUT columns appended: each row scored by its profile, or its error."""
    n = table.num_rows
    texts = table.column("text").to_pylist()
    ids = [None if p is None else str(p) for p in table.column("profile_id").to_pylist()]
    pairs = table.column("text_pair").to_pylist() if "text_pair" in table.column_names else [None] * n
    out: dict[str, list] = {name: [None] * n for name in OUTPUT.names}
    errors = out["error"]
    for i in range(n):
        if ids[i] is None:
            errors[i] = "no profile_id"
        elif not isinstance(texts[i], str):
            errors[i] = "no text" if texts[i] is None else f"the text is a {type(texts[i]).__name__}, not a string"
        elif not texts[i].strip():
            errors[i] = "an empty text"
    todo = [i for i in range(n) if errors[i] is None]
    wanted = list(dict.fromkeys(ids[i] for i in todo))
    loaded = dict(zip(wanted, engine.load_profiles(wanted), strict=True))
    for i in todo:
        c = loaded[ids[i]]
        if isinstance(c, ServeError):
            errors[i] = f"profile {ids[i]!r} is not in the store {engine.cfg.store}" if c.status == 404 else c.detail
    ok = [i for i in todo if errors[i] is None]
    rows = engine.tokenize([texts[i] for i in ok], [pairs[i] for i in ok])
    order = sorted(range(len(ok)), key=lambda j: len(rows[j]["input_ids"]))  # alike lengths pad little
    step = engine.cfg.max_batch_size
    for start in range(0, len(order), step):
        chunk = [ok[j] for j in order[start : start + step]]
        _score_chunk(engine, chunk, [rows[j] for j in order[start : start + step]], loaded, ids, out)
    return pa.Table.from_arrays(
        [*table.columns, *(pa.array(out[f.name], f.type) for f in OUTPUT)],
        schema=pa.schema([*table.schema, *OUTPUT]),
    )


def _score_chunk(engine: ProfileEngine, chunk: list[int], rows: list[dict], loaded: dict, ids: list, out: dict) -> None:
    """One mixed-profile forward over rows `chunk` of the table; a failure is each row's error, not the job's."""
    combined = [loaded[ids[i]] for i in chunk]
    try:
        logits = engine.forward(list(zip(combined, rows, strict=True)))
    except Exception as e:  # noqa: BLE001 (one bad forward must not fail the other batches of the job)
        log.exception("a forward of %d rows failed", len(chunk))
        for i in chunk:
            out["error"][i] = f"the forward failed: {type(e).__name__}: {e}"
        return
    for i, c, z in zip(chunk, combined, logits, strict=True):
        (pred,) = predictions(c, [z])
        for name, v in pred.items():  # the API's prediction fields are the output's columns
            out[name][i] = v
        out["profile_created"][i] = c.created


class BatchScorer:
    """The class Ray Data's `map_batches` runs on its actor pool: one engine per actor (backbone, tokenizer,
    bank and caches loaded once), each call a pyarrow batch in and out."""

    def __init__(self, cfg: ServeConfig):
        self.engine = ProfileEngine(cfg)

    def __call__(self, batch: pa.Table) -> pa.Table:
        return score_table(self.engine, batch)
