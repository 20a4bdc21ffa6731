"""The serving cold path alone: what `ProfileEngine.load_profiles` costs a profile that misses the combined
cache, in one process and one thread (no Serve, no HTTP), with the record cache preloaded and without it.

    python benchmarks/cold_path.py                       # a temporary store of 2,000 random profiles
    python benchmarks/cold_path.py --store /tmp/xpeft-load --profiles 10000   # serve_load.py's store

Per call size P (profiles combined together, as the replica's combine queue gathers them): min and median
over `--calls` calls of fresh profiles, per profile; then a cProfile of 30 calls of 6, by time per piece.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import random
import statistics
import tempfile
import time

from serve_load import make_store

from xpeft.serve.config import ServeConfig
from xpeft.serve.engine import ProfileEngine


def per_profile_ms(engine: ProfileEngine, ids: list[str], P: int, calls: int) -> tuple[float, float]:
    times = []
    for c in range(calls):
        batch = ids[c * P : (c + 1) * P]
        start = time.perf_counter()
        engine.load_profiles(batch)
        times.append(1000 * (time.perf_counter() - start) / P)
    return min(times), statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", default=None, help="default: a temporary directory")
    ap.add_argument("--profiles", type=int, default=2000)
    ap.add_argument("--calls", type=int, default=10)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1, 6, 16])
    args = ap.parse_args()
    tmp = tempfile.TemporaryDirectory(prefix="xpeft-cold-") if args.store is None else None
    root = args.store or tmp.name
    make_store(root, args.profiles, "minilm", N=100, k=50, b=48, num_labels=15)
    ids = [f"p{i:05d}" for i in range(args.profiles)]
    random.Random(0).shuffle(ids)
    need = args.calls * sum(args.sizes) + 30 * 6
    if need > len(ids):
        ap.error(f"needs {need} profiles never combined before; pass --profiles {need} or more")
    for record_cache_mb in (512.0, 0.0):
        engine = ProfileEngine(ServeConfig(store=root, torch_threads=1, cache_size=1, record_cache_mb=record_cache_mb))
        if record_cache_mb:
            start = time.perf_counter()
            n = engine.preload_records()
            print(f"record cache {record_cache_mb:g} MiB: {n} records preloaded in {time.perf_counter() - start:.1f} s")
        else:
            print("record cache off: every profile is read from the store")
        fresh = iter(ids)
        engine.load_profiles([next(fresh)])  # first-call costs out of the way
        for P in args.sizes:
            lo, med = per_profile_ms(engine, [next(fresh) for _ in range(args.calls * P)], P, args.calls)
            print(
                f"  P={P:2d}: {lo:.2f} ms a profile (min), {med:.2f} (median), store reads so far "
                f"{engine.view.store_reads}"
            )
        profiler = cProfile.Profile()
        batches = [[next(fresh) for _ in range(6)] for _ in range(30)]
        profiler.enable()
        for batch in batches:
            engine.load_profiles(batch)
        profiler.disable()
        stats = pstats.Stats(profiler).stats  # (file, line, function) -> (calls, ncalls, own s, cum s, callers)
        total = pstats.Stats(profiler).total_tt
        print(f"  cProfile, 30 calls of 6: {1000 * total / 180:.2f} ms a profile; most own time:")
        for (file, _, name), (_, ncalls, own, _, _) in sorted(stats.items(), key=lambda kv: -kv[1][2])[:6]:
            print(f"    {1000 * own / 180:.3f} ms a profile  {name} ({file.rsplit('/', 1)[-1]}, {ncalls} calls)")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
