"""Batch inference with Ray Data (`run_batch`, ray_jobs/classify_batch.py) against the same engine's bare forward:
rows/s of the whole job (read Parquet, score on the actor pool, write Parquet; starting the actors included)
over rows/s of `ProfileEngine.forward` alone on the same rows, in the same chunks, with the same threads, the
profiles already combined and the texts already tokenized. Target: job >= 0.8 x bare.

    python benchmarks/batch_inference.py                          # MiniLM, 200 profiles, 20,000 news texts
    python benchmarks/batch_inference.py --smoke                  # a tiny random backbone, a few rows: seconds

In between it prints `score_table` in this process (tokenize + combine + forward, no Ray), so the gap splits
into what scoring a table adds and what Ray Data adds. Each row names a random one of the profiles (random
k-hot masks, LN, a linear head: serving cost does not depend on how well a profile was fitted). The job's and
the engine's settings are BatchConfig's and ServeConfig's flags, as `xpeft classify-batch` takes them.
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time
import types

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from harness.common import SMOKE_HELP, machine, make_store, smoke_backbone

from xpeft.config import XPeftConfig
from xpeft.data.dataset import SAMPLE_SOURCE, read_profile_source
from xpeft.flags import add_flags, from_flags
from xpeft.jobs.classify_batch import run_batch
from xpeft.ray.cluster import init_ray
from xpeft.serve.batch import BatchConfig, score_table
from xpeft.serve.config import ServeConfig
from xpeft.serve.engine import ProfileEngine

SMOKE = {"rows": 48, "profiles": 4, "batch_size": 16, "max_batch_size": 8, "N": 8, "k": None, "b": 4, "store": None}
SMOKE_ALSO = ("backbone",)
ONE_THREAD = types.SimpleNamespace(torch_threads=1)


def texts_table(rows: int, profiles: int, seed: int = 0) -> pa.Table:
    texts = read_profile_source(SAMPLE_SOURCE).column("text").to_pylist()
    rng = random.Random(seed)
    return pa.table(
        {
            "id": list(range(rows)),
            "text": [rng.choice(texts) for _ in range(rows)],
            "profile_id": [f"p{rng.randrange(profiles):05d}" for _ in range(rows)],
        }
    )


def bare_forward_rows_per_s(engine: ProfileEngine, table: pa.Table, batch_size: int) -> float:
    """engine.forward alone over the rows as score_table chunks them (per Ray batch: sorted by length, then
    max_batch_size rows a forward), profiles combined and texts tokenized beforehand (not timed)."""
    ids = sorted(set(table.column("profile_id").to_pylist()))
    combined = dict(zip(ids, engine.load_profiles(ids), strict=True))
    seconds, step = 0.0, engine.cfg.max_batch_size
    for start in range(0, table.num_rows, batch_size):
        part = table.slice(start, batch_size)
        rows = engine.tokenize(part.column("text").to_pylist(), None)
        items = sorted(
            zip(part.column("profile_id").to_pylist(), rows, strict=True), key=lambda x: len(x[1]["input_ids"])
        )
        for s in range(0, len(items), step):
            chunk = [(combined[pid], row) for pid, row in items[s : s + step]]
            t = time.perf_counter()
            engine.forward(chunk)
            seconds += time.perf_counter() - t
    return table.num_rows / seconds


def arguments() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help=SMOKE_HELP)
    ap.add_argument("--store", default=None, help="the profile store, made if empty (default: a temporary one)")
    ap.add_argument("--profiles", type=int, default=200, help="stored profiles the rows name (default: 200)")
    ap.add_argument("--rows", type=int, default=20_000, help="rows of the table scored (default: 20000)")
    add_flags(ap.add_argument_group("the profiles (XPeftConfig)"), XPeftConfig, only=("N", "k", "b", "num_labels"),
              defaults=XPeftConfig(num_labels=15))  # fmt: skip
    add_flags(ap.add_argument_group("the job (BatchConfig)"), BatchConfig, only=("num_actors", "batch_size"))
    engine = ap.add_argument_group("the engine (ServeConfig; one torch thread by default, as the bare forward's)")
    add_flags(engine, ServeConfig, only=("backbone", "cpus_per_actor", "torch_threads", "max_batch_size"),
              defaults=ONE_THREAD)  # fmt: skip
    return ap


def main() -> None:
    args = arguments().parse_args()
    tmp = tempfile.TemporaryDirectory(prefix="xpeft-batch-")
    if args.smoke:
        vars(args).update(SMOKE, backbone=smoke_backbone(tmp.name))
    threads = args.torch_threads
    root = args.store or os.path.join(tmp.name, "store")
    make_store(root, args.profiles, args.backbone, from_flags(args, XPeftConfig))
    table = texts_table(args.rows, args.profiles)
    data = os.path.join(tmp.name, "texts.parquet")
    pq.write_table(table, data)
    serve = from_flags(args, ServeConfig, store=root, cache_size=max(256, args.profiles))
    torch.set_num_threads(threads)
    engine = ProfileEngine(serve)
    bare = bare_forward_rows_per_s(engine, table, args.batch_size)
    start = time.perf_counter()
    for s in range(0, table.num_rows, args.batch_size):
        score_table(engine, table.slice(s, args.batch_size))
    in_process = table.num_rows / (time.perf_counter() - start)
    del engine
    init_ray(num_cpus=os.cpu_count(), log_to_driver=False)
    cfg = from_flags(args, BatchConfig, data=data, out=os.path.join(tmp.name, "scored"), progress=False, serve=serve)
    start = time.perf_counter()
    result = run_batch(cfg)
    wall = time.perf_counter() - start
    job = result["rows"] / wall
    print(f"machine: {machine()}; backbone {args.backbone}")
    print(
        f"{args.rows} rows over {args.profiles} profiles, batch {args.batch_size}, {args.max_batch_size} rows a forward"
    )
    print(f"bare forward ({threads} thread(s)):        {bare:8.1f} rows/s")
    print(f"score_table in process (no Ray): {in_process:8.1f} rows/s")
    print(
        f"Ray Data job, {args.num_actors} actor(s), {wall:.1f} s: {job:8.1f} rows/s = {job / bare:.2f} x bare forward"
    )
    print(f"  scored {result['scored']}, errors {result['rows'] - result['scored']}")
    if result["scored"] < result["rows"]:
        raise SystemExit(f"{result['rows'] - result['scored']} rows failed: {result.get('errors')}")


if __name__ == "__main__":
    main()
