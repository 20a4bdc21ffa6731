"""Load test of the profile server on 127.0.0.1: (a) every request to one profile, (b) every request to a
different profile, among 10,000 stored ones. Bounded: a fixed number of requests per scenario and a time
limit; it stops by itself and shuts its Ray down.

    python benchmarks/serve_load.py                                   # MiniLM, N=100, b=48, hard, C=16
    python benchmarks/serve_load.py --payload 1x20 1x100 4x20         # several request sizes, one server
    python benchmarks/serve_load.py --requests 300 --time-limit 30    # quicker
    python benchmarks/serve_load.py --store /tmp/xpeft-load           # keep (and reuse) the 10,000 profiles

The profiles are random (k-hot masks, LN affine, a 'linear' head): serving cost does not depend on how well
a profile was fitted. They are written 8 a commit, as the farm flushes them (FarmConfig.flush_every).
In (b) no profile is requested twice and the cache holds far fewer than the profiles, so every request reads
its profile from the store and combines it with the bank: the cost that mixed-profile serving adds.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import socket
import statistics
import sys
import tempfile
import threading
import time

import torch

from xpeft.config import XPeftConfig
from xpeft.core.bank import random_bank_for
from xpeft.core.encoder import load_encoder
from xpeft.core.masks import khot, pack_bits
from xpeft.profiles.record import Profile
from xpeft.profiles.store import ProfileStore
from xpeft.serve.config import ServeConfig
from xpeft.serve.deployment import build_app

WORDS = (
    "the a new old big small good bad great awful movie film story news politics sports music art travel food "
    "health business school science tech style culture love fun game team vote election money market trip "
    "recipe city world people week year report study season police court family home life"
).split()
SERVER_STATS = ("batches", "rows", "forward_seconds", "profiles_loaded", "load_seconds", "store_reads")
SCENARIOS = ("(a) one profile", "(b) a new profile each")
FLUSH_EVERY = 8  # FarmConfig.flush_every: profiles per store write (one commit) as the farm writes them


def make_store(root: str, n: int, backbone: str, N: int, k: int, b: int, num_labels: int) -> ProfileStore:
    """A store with `n` random hard-mask profiles on one random bank (reused when it already has them)."""
    store = ProfileStore(root)
    if len(store) >= n and store.bank_fingerprints():
        return store
    cfg = XPeftConfig(N=N, k=k, b=b, head="linear", num_labels=num_labels)
    bank = random_bank_for(load_encoder(backbone), cfg, seed=0)
    L, d = bank.L, bank.d_in
    store.save_bank(bank)
    g = torch.Generator().manual_seed(0)
    batch = []
    for i in range(n):
        masks = [khot(torch.randn(L, N, generator=g), k) for _ in range(2)]
        tensors = {
            "ln_weight": 1 + 0.1 * torch.randn(L, b, generator=g),
            "ln_bias": 0.1 * torch.randn(L, b, generator=g),
            "head.classifier.weight": torch.randn(num_labels, d, generator=g) / d**0.5,
            "head.classifier.bias": torch.zeros(num_labels),
        }
        batch.append(
            Profile(
                f"p{i:05d}",
                cfg,
                tensors,
                mask_bits=pack_bits(masks[0]) + pack_bits(masks[1]),
                bank_fingerprint=bank.fingerprint,
                metrics={"accuracy": 0.5},
            )
        )
        if len(batch) == FLUSH_EVERY:
            store.write(batch)
            batch = []
    store.write(batch)
    return store


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_load(url: str, profile_ids: list[str], texts: list[list[str]], concurrency: int, time_limit: float) -> dict:
    """Send request i (profile_ids[i], texts[i]) from `concurrency` threads until all are sent or time is up."""
    import requests

    latencies: list[float] = []
    failures: list[str] = []
    next_i = iter(range(len(profile_ids)))
    lock = threading.Lock()
    deadline = time.perf_counter() + time_limit

    def worker() -> None:
        session = requests.Session()
        while time.perf_counter() < deadline:
            with lock:
                i = next(next_i, None)
            if i is None:
                return
            start = time.perf_counter()
            r = session.post(f"{url}/v1/classify", json={"profile_id": profile_ids[i], "texts": texts[i]}, timeout=60)
            elapsed = time.perf_counter() - start
            with lock:
                if r.status_code == 200:
                    latencies.append(elapsed)
                else:
                    failures.append(f"{r.status_code} {r.text[:200]}")

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    q = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [float("nan")] * 99
    return {
        "requests": len(latencies),
        "failed": len(failures),
        "seconds": wall,
        "rps": len(latencies) / wall,
        "p50_ms": 1000 * q[49],
        "p99_ms": 1000 * q[98],
        "latencies": latencies,
        "first_failure": failures[0] if failures else None,
    }


def parse_payload(text: str) -> tuple[int, int]:
    """'4x20' → 4 texts of 20 words per request."""
    texts, _, words = text.partition("x")
    return int(texts), int(words)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profiles", type=int, default=10_000)
    ap.add_argument("--backbone", default="minilm")
    ap.add_argument("--N", type=int, default=100)
    ap.add_argument("--k", type=int, default=None, help="default: half the bank (N/2)")
    ap.add_argument("--b", type=int, default=48)
    ap.add_argument("--num-labels", type=int, default=15)
    ap.add_argument("--store", default=None, help="default: a temporary directory, removed afterwards")
    ap.add_argument("--requests", type=int, default=600, help="requests per scenario, payload and round")
    ap.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="(a) then (b), this many times per payload: alternating spreads a shared machine's drift over both",
    )
    ap.add_argument("--time-limit", type=float, default=60.0, help="seconds per scenario and payload")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument(
        "--payload",
        nargs="+",
        default=["1x20"],
        type=parse_payload,
        help="TEXTSxWORDS per request, one or more (e.g. 1x20 1x100 4x20)",
    )
    ap.add_argument("--num-cpus", type=float, default=1.0, help="CPUs reserved by the replica (its torch threads)")
    ap.add_argument("--max-batch-size", type=int, default=32)
    ap.add_argument("--batch-wait-timeout-s", type=float, default=0.01)
    ap.add_argument("--cache-size", type=int, default=256)
    ap.add_argument(
        "--record-cache-mb",
        type=float,
        default=ServeConfig.__dataclass_fields__["record_cache_mb"].default,
        help="stored records kept in memory (0: every miss of the combined cache reads the store)",
    )
    args = ap.parse_args()
    n = args.requests
    if n * len(args.payload) * args.rounds > args.profiles - 1:
        ap.error("(b) never sends two requests to one profile: need requests × payloads × rounds < profiles")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import ray
    import requests
    from ray import serve

    tmp = tempfile.TemporaryDirectory(prefix="xpeft-load-") if args.store is None else None
    root = args.store or tmp.name
    t0 = time.perf_counter()
    store = make_store(root, args.profiles, args.backbone, args.N, args.k, args.b, args.num_labels)
    print(
        f"store: {len(store)} profiles in {store.stats()['parts']} parts at {root} ({time.perf_counter() - t0:.1f} s)"
    )
    rng = random.Random(0)
    ids = store.ids()
    hot, cold = ids[0], iter(rng.sample(ids[1:], n * len(args.payload) * args.rounds))  # (b): never twice

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    results = []
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        cfg = ServeConfig(
            store=root,
            backbone=args.backbone,
            num_cpus=args.num_cpus,
            cache_size=args.cache_size,
            record_cache_mb=args.record_cache_mb,
            max_batch_size=args.max_batch_size,
            batch_wait_timeout_s=args.batch_wait_timeout_s,
            api_token=None,
        )
        t0 = time.perf_counter()
        serve.run(build_app(cfg), name="xpeft-load", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        print(f"server up in {time.perf_counter() - t0:.1f} s: {cfg}")
        while (health := requests.get(f"{url}/healthz", timeout=10).json())["preloading"]:
            time.sleep(0.5)  # measure after the background preload, not beside it
        print(f"records in memory: {health['records_in_memory']} ({time.perf_counter() - t0:.1f} s after start)")
        for per_request, words in args.payload:
            texts = [[" ".join(rng.choices(WORDS, k=words)) for _ in range(per_request)] for _ in range(n)]
            warm = run_load(url, [hot] * 32, texts[:32], args.concurrency, args.time_limit)
            assert warm["failed"] == 0, warm["first_failure"]
            for round_ in range(args.rounds):
                for scenario in SCENARIOS:
                    targets = [hot] * n if scenario.startswith("(a)") else [next(cold) for _ in range(n)]
                    before = requests.get(f"{url}/healthz", timeout=10).json()
                    r = run_load(url, targets, texts, args.concurrency, args.time_limit)
                    after = requests.get(f"{url}/healthz", timeout=10).json()
                    r["server"] = {k: after[k] - before[k] for k in SERVER_STATS}
                    r["payload"], r["scenario"], r["round"] = f"{per_request} × {words} words", scenario, round_
                    results.append(r)
    finally:
        serve.shutdown()
        ray.shutdown()
        if tmp is not None:
            tmp.cleanup()
    report(args, results)


def pooled(runs: list[dict]) -> dict:
    """One scenario over all its rounds: throughput = requests / seconds summed, latency quantiles of all."""
    latencies = [x for r in runs for x in r["latencies"]]
    q = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [float("nan")] * 99
    server = {k: sum(r["server"][k] for r in runs) for k in SERVER_STATS}
    return {
        "requests": len(latencies),
        "failed": sum(r["failed"] for r in runs),
        "rps": len(latencies) / sum(r["seconds"] for r in runs),
        "p50_ms": 1000 * q[49],
        "p99_ms": 1000 * q[98],
        "server": server,
    }


def report(args: argparse.Namespace, results: list[dict]) -> None:
    print(f"\n`{' '.join([os.path.basename(sys.executable), *sys.argv])}`  ")
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, Python "
        f"{platform.python_version()}; replica ({args.num_cpus} CPU), Serve proxy and client share these CPUs; "
        f"C={args.concurrency}, max_batch_size={args.max_batch_size}, cache_size={args.cache_size}, "
        f"record_cache_mb={args.record_cache_mb:g}, "
        f"{args.rounds} rounds of (a) then (b) per payload\n"
    )
    print(
        "| texts a request | scenario | requests | failed | requests/s | p50 ms | p99 ms | rows a forward "
        "| forward ms a row | load ms a profile | store reads | (b)/(a) | (b)/(a) each round |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for payload in dict.fromkeys(r["payload"] for r in results):
        runs = {sc: [r for r in results if r["payload"] == payload and r["scenario"] == sc] for sc in SCENARIOS}
        a, b = (pooled(runs[sc]) for sc in SCENARIOS)
        rounds = ", ".join(f"{rb['rps'] / ra['rps']:.2f}" for ra, rb in zip(*runs.values(), strict=True))
        for sc, r in zip(SCENARIOS, (a, b), strict=True):
            s = r["server"]
            load = f"{1000 * s['load_seconds'] / s['profiles_loaded']:.1f}" if s["profiles_loaded"] else "-"
            last = (f"**{b['rps'] / a['rps']:.2f}**", rounds) if r is b else ("", "")
            print(
                f"| {payload} | {sc} | {r['requests']} | {r['failed']} | {r['rps']:.1f} | "
                f"{r['p50_ms']:.0f} | {r['p99_ms']:.0f} | {s['rows'] / max(1, s['batches']):.1f} | "
                f"{1000 * s['forward_seconds'] / max(1, s['rows']):.1f} | {load} | {s['store_reads']} | "
                f"{last[0]} | {last[1]} |"
            )
    for r in results:
        if r["failed"]:
            print(f"first failure ({r['payload']}, {r['scenario']}, round {r['round']}): {r['first_failure']}")


if __name__ == "__main__":
    main()
