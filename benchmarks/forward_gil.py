"""Why a replica's forward runs slower than the same forward alone: the GIL.

The replica runs `ProfileEngine.forward` in a worker thread while Serve's event loops run Python in other
threads of the same process. Every torch op releases the GIL and must take it back afterwards; a thread busy
in Python holds it for up to `sys.getswitchinterval()` at a time, so an encoder forward of a few hundred ops
waits that long again and again. This measures one mixed-profile forward of 8 rows (MiniLM, 20-word texts,
8 profiles from a random store as in serve_load.py) alone and beside a Python thread that never sleeps (the
worst case of a busy event loop), at several switch intervals.

    python benchmarks/forward_gil.py
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import threading
import time

from serve_load import WORDS, make_store

from xpeft.serve.config import ServeConfig
from xpeft.serve.engine import ProfileEngine


def timed(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--intervals", type=float, nargs="+", default=[0.005, 0.001, 0.0002])
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="xpeft-gil-") as root:
        make_store(root, args.rows, "minilm", N=100, k=50, b=48, num_labels=15)
        engine = ProfileEngine(ServeConfig(store=root, torch_threads=1))
        combined = engine.load_profiles([f"p{i:05d}" for i in range(args.rows)])
        rng = random.Random(0)
        rows = engine.tokenize([" ".join(rng.choices(WORDS, k=20)) for _ in range(args.rows)], None)
        batch = list(zip(combined, rows, strict=True))
        engine.forward(batch)
        alone = timed(lambda: engine.forward(batch), args.reps)
        print(f"one forward of {args.rows} rows, 1 torch thread: alone {1000 * alone:.1f} ms")
        default_interval = sys.getswitchinterval()
        for interval in args.intervals:
            stop = threading.Event()

            def spin(stop: threading.Event = stop) -> None:
                while not stop.is_set():
                    sum(range(100))

            sys.setswitchinterval(interval)
            spinner = threading.Thread(target=spin)
            spinner.start()
            try:
                beside = timed(lambda: engine.forward(batch), max(3, args.reps // 3))
            finally:
                stop.set()
                spinner.join()
                sys.setswitchinterval(default_interval)
            print(
                f"  beside a busy Python thread, switch interval {1000 * interval:g} ms: {1000 * beside:.1f} ms "
                f"({beside / alone:.1f}x)"
            )


if __name__ == "__main__":
    main()
