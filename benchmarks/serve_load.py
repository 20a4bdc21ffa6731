"""Load test of the profile server on 127.0.0.1, with its forward in ONNX Runtime ('ort') and in torch
('eager'), and of the peer a user would deploy instead (PEFT LoRA adapters behind `@serve.multiplexed`,
benchmarks/serve_peer.py), one after another on the same cores, client and payloads. Scenarios: (a) every
request to one profile, (b) every request to a different profile (xpeft: never requested before, among
10,000 stored ones; the peer: a cycle over its 1,000 adapters, more than its LRU holds). Bounded: a fixed
number of requests per scenario and a time limit; it stops by itself and shuts its Ray down.

    python benchmarks/serve_load.py --payload 1x20 1x100 4x20            # the recorded run (BENCHMARKS.md)
    python benchmarks/serve_load.py --forwards ort --no-peer --requests 300 --time-limit 30   # quicker
    python benchmarks/serve_load.py --store /tmp/xpeft-load              # keep (and reuse) the 10,000 profiles
    python benchmarks/serve_load.py --no-load --slow-clients 200         # the slow-clients scenario alone
    python benchmarks/serve_load.py --no-load --fits 20                  # the fits-on-demand scenario alone
    python benchmarks/serve_load.py --smoke                              # a tiny random backbone: every stage, small

For each server it prints the load table; then, per payload and scenario, the forward's ms a row inside the
replica next to the same engine's forward alone (in this process, after the server is gone) at the batch
sizes the replica formed (`replica/alone`), requests/s ort against eager, the CPU seconds the client, the
Serve proxy, the replica and the rest of Ray used (/proc), unloaded latency (sequential single-text
requests next to the one-row forward alone), and xpeft against the peer (requests/s, p50/p99, replica RSS).

With --slow-clients N (harness/slow_clients.py): a normal client's requests/s and /healthz's latency without, then
with, N connections holding half-sent bodies, behind xpeft.serve.proxy's middlewares as `xpeft serve` sets them
up (installed before Ray starts: with the load stage too, it then runs behind them).

With --fits N (harness/fit_on_demand.py): N profiles of --fit-examples texts fitted over HTTP one after another
(POST → first answer p50 / p99), and classify p50 / p99 without and with that stream of fits.

The profiles are random (k-hot masks, LN affine, a 'linear' head): serving cost does not depend on how well
a profile was fitted. They are written 8 a commit, as the farm flushes them (FarmConfig.flush_every).
In (b) the cache holds far fewer than the profiles, so every request reads its profile from the store (or
the record cache) and combines it with the bank: the cost that mixed-profile serving adds.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import random
import socket
import statistics
import tempfile
import threading
import time

import torch
from harness import fit_on_demand, slow_clients
from serve_procs import cpu_by_role, memory_mb, replica_pids
from serve_report import SCENARIOS, report

from xpeft.config import XPeftConfig
from xpeft.core.bank import random_bank_for
from xpeft.core.encoder import load_encoder
from xpeft.core.masks import khot, pack_bits
from xpeft.profiles.record import Profile
from xpeft.profiles.store import ProfileStore
from xpeft.serve.config import ServeConfig
from xpeft.serve.deployment import build_app
from xpeft.serve.engine import ProfileEngine

WORDS = (
    "the a new old big small good bad great awful movie film story news politics sports music art travel food "
    "health business school science tech style culture love fun game team vote election money market trip "
    "recipe city world people week year report study season police court family home life"
).split()
DEFAULTS = {f.name: f for f in dataclasses.fields(ServeConfig)}
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
        masks = [khot(torch.randn(L, N, generator=g), cfg.top_k) for _ in range(2)]
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


def run_load(
    url: str, profile_ids: list[str], texts: list[list[str]], concurrency: int, time_limit: float, header: str = ""
) -> dict:
    """Send request i (profile_ids[i], texts[i]) from `concurrency` threads until all are sent or time is up;
    with `header`, each request also names its profile in that header (the peer's multiplexed model id)."""
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
            body = {"profile_id": profile_ids[i], "texts": texts[i]}
            start = time.perf_counter()
            headers = {header: profile_ids[i]} if header else None
            r = session.post(f"{url}/v1/classify", json=body, headers=headers, timeout=60)
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


def healthz(url: str) -> dict:
    import requests

    return requests.get(f"{url}/healthz", timeout=10).json()


def stat_delta(before: dict, after: dict) -> dict:
    """What a run added to the server's counters, and to its histogram of forwards by rows."""
    out = {k: v - before[k] for k, v in after.items() if type(v) in (int, float) and k in before}
    old = before.get("forward_by_rows", {})
    hist = {}
    for size, (n, seconds) in after.get("forward_by_rows", {}).items():
        n0, s0 = old.get(size, (0, 0.0))
        if n > n0:
            hist[int(size)] = (n - n0, seconds - s0)
    out["forward_by_rows"] = hist
    return out


def measure(url: str, targets: list[str], texts: list[list[str]], args, header: str = "") -> dict:
    """One run, with the server's counters and every process's CPU seconds before and after."""
    before, cpu_before = healthz(url), cpu_by_role()
    r = run_load(url, targets, texts, args.concurrency, args.time_limit, header)
    after, cpu_after = healthz(url), cpu_by_role()
    r["server"] = stat_delta(before, after)
    r["cpu"] = {k: cpu_after[k] - cpu_before[k] for k in cpu_after}
    return r


def scenarios(url: str, args, payloads: dict, hot: str, cold: list[str], header: str = "") -> list[dict]:
    """Per payload: a warm-up, then (a) and (b) alternately, `args.rounds` times."""
    results = []
    cold_ids = iter(cold)
    for payload, (_, _, texts) in payloads.items():
        warm = run_load(url, [hot] * 32, texts[:32], args.concurrency, args.time_limit, header)
        if warm["failed"]:
            raise RuntimeError(f"the warm-up failed: {warm['first_failure']}")
        for round_ in range(args.rounds):
            for scenario in SCENARIOS:
                one = scenario.startswith("(a)")
                targets = [hot] * len(texts) if one else [next(cold_ids) for _ in texts]
                r = measure(url, targets, texts, args, header)
                r["payload"], r["scenario"], r["round"] = payload, scenario, round_
                results.append(r)
    return results


def unloaded(url: str, args, hot: str, text: str, header: str = "") -> dict:
    """Sequential single-text requests: nothing for a forward to batch with."""
    return run_load(url, [hot] * args.unloaded, [[text]] * args.unloaded, 1, args.time_limit, header)


def deploy(app, name: str, port: int) -> str:
    from ray import serve

    start = time.perf_counter()
    serve.run(app, name=name, route_prefix="/")
    print(f"[{name}] server up in {time.perf_counter() - start:.1f} s")
    return f"http://127.0.0.1:{port}"


def undeploy(name: str) -> dict:
    """Memory of the app's replica, then the app deleted and its replica gone (so what follows runs alone)."""
    from ray import serve

    (pid,) = replica_pids()
    memory = memory_mb(pid)
    serve.delete(name)
    deadline = time.perf_counter() + 60
    while replica_pids() and time.perf_counter() < deadline:
        time.sleep(0.5)
    return memory


def forward_seconds(engine: ProfileEngine, items: list, reps: int) -> float:
    engine.forward(items)  # the first forward of these profiles and this size
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        engine.forward(items)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def alone_timings(engine: ProfileEngine, args, runs: list[dict], payloads: dict, hot: str, cold: list[str]) -> dict:
    """The engine's forward alone (this process, the server gone) at each batch size the replica formed, per
    payload and scenario: in (a) rows of the one profile, in (b) each request's rows under its own profile."""
    (hot_c,) = engine.load_profiles([hot])
    distinct = engine.load_profiles(cold[: args.max_batch_size])
    out = {}
    for payload, (per_request, _, texts) in payloads.items():
        rows = engine.tokenize([t for ts in texts[: args.max_batch_size] for t in ts], None)
        for scenario in SCENARIOS:
            profiles = [hot_c] if scenario.startswith("(a)") else distinct
            sizes = sorted({s for r in runs if r["payload"] == payload and r["scenario"] == scenario
                            for s in r["server"]["forward_by_rows"]})  # fmt: skip
            out[(payload, scenario)] = {
                s: forward_seconds(
                    engine, [(profiles[(i // per_request) % len(profiles)], rows[i % len(rows)]) for i in range(s)],
                    args.alone_reps,
                )
                for s in sizes
            }  # fmt: skip
    return out


def xpeft_phase(args, root: str, port: int, forward: str, payloads: dict, hot: str, cold: list[str]) -> dict:
    cfg = ServeConfig(
        store=root,
        backbone=args.backbone,
        cpus_per_actor=args.cpus_per_actor,
        cache_size=args.cache_size,
        record_cache_mb=args.record_cache_mb,
        max_batch_size=args.max_batch_size,
        batch_wait_s=args.batch_wait_s,
        forward=forward,
        onnx_cache=args.onnx_cache,
        api_token=None,
    )
    start = time.perf_counter()
    # Built first, so the replica finds the encoder graph in the cache: it starts without exporting.
    local = ProfileEngine(dataclasses.replace(cfg, record_cache_mb=0))
    exported = getattr(local.forward_rows, "exported", [])
    print(f"[{forward}] engine in this process in {time.perf_counter() - start:.1f} s; graph exported now: {exported}")
    name = f"xpeft-{forward}"
    url = deploy(build_app(cfg), name, port)
    while healthz(url)["preloading"]:
        time.sleep(0.5)  # measure after the background preload, not beside it
    runs = scenarios(url, args, payloads, hot, cold)
    text = " ".join(random.Random(1).choices(WORDS, k=20))
    lone = unloaded(url, args, hot, text)
    memory = undeploy(name)
    alone = alone_timings(local, args, runs, payloads, hot, cold)
    (hot_c,) = local.load_profiles([hot])
    one_row = forward_seconds(local, [(hot_c, local.tokenize([text], None)[0])], 5 * args.alone_reps)
    return {"system": f"xpeft {forward}", "forward": forward, "runs": runs, "unloaded": lone,
            "one_row_s": one_row, "memory": memory, "alone": alone}  # fmt: skip


def peer_phase(args, store: ProfileStore, port: int, payloads: dict) -> dict:
    import ray.cloudpickle
    import serve_peer

    ray.cloudpickle.register_pickle_by_value(serve_peer)  # benchmarks/ is not importable in the workers
    tmp = tempfile.TemporaryDirectory(prefix="xpeft-peer-") if args.peer_adapters is None else None
    root = args.peer_adapters or tmp.name
    start = time.perf_counter()
    ids = serve_peer.write_adapters(store, root, args.peer_profiles, args.backbone)
    print(f"[peer] {len(ids)} PEFT adapters at {root} ({time.perf_counter() - start:.1f} s)")
    try:
        app = serve_peer.peer_app(root, args.backbone, args.peer_models, args.cpus_per_actor, args.max_batch_size)
        url = deploy(app, "peft-peer", port)
        hot, rest = ids[0], random.Random(0).sample(ids[1:], len(ids) - 1)
        cold = list(itertools.islice(itertools.cycle(rest), args.requests * len(payloads) * args.rounds))
        runs = scenarios(url, args, payloads, hot, cold, serve_peer.MODEL_ID_HEADER)
        text = " ".join(random.Random(1).choices(WORDS, k=20))
        lone = unloaded(url, args, hot, text, serve_peer.MODEL_ID_HEADER)
        memory = undeploy("peft-peer")
    finally:
        if tmp is not None:
            tmp.cleanup()
    return {"system": "PEFT + multiplexing", "forward": "eager", "runs": runs, "unloaded": lone, "memory": memory}


def slow_clients_phase(args, root: str, port: int, hot: str) -> dict:
    """The slow-clients scenario (harness/slow_clients.py) against the server with the first of --forwards."""
    cfg = ServeConfig(
        store=root, backbone=args.backbone, cpus_per_actor=args.cpus_per_actor, cache_size=args.cache_size,
        record_cache_mb=args.record_cache_mb, max_batch_size=args.max_batch_size,
        batch_wait_s=args.batch_wait_s, forward=args.forwards[0], onnx_cache=args.onnx_cache,
        api_token=None,
    )  # fmt: skip
    ProfileEngine(dataclasses.replace(cfg, record_cache_mb=0))  # the encoder graph into the cache first
    url = deploy(build_app(cfg), "xpeft-slow", port)
    text = " ".join(random.Random(2).choices(WORDS, k=20))
    try:
        return slow_clients.scenario(url, port, "/", args.slow_clients, args.slow_seconds, hot, text)
    finally:
        undeploy("xpeft-slow")


def fits_phase(args, root: str, port: int, hot: str) -> dict:
    """Fits on demand (harness/fit_on_demand.py) beside classify, with a recipe as the farm records it."""
    from ray import serve

    from xpeft.fit.on_demand import FitRecipe, save_recipe
    from xpeft.fit.recipes import FARM_TRAIN

    store, labels = ProfileStore(root), [f"class-{i}" for i in range(args.num_labels)]
    xcfg = XPeftConfig(N=args.N, k=args.k, b=args.b, head="linear", num_labels=args.num_labels)
    save_recipe(store, FitRecipe(args.backbone, xcfg, FARM_TRAIN, store.bank_fingerprints()[0], label_names=labels))
    cfg = ServeConfig(
        store=root, backbone=args.backbone, cpus_per_actor=args.cpus_per_actor, forward=args.forwards[0],
        onnx_cache=args.onnx_cache, fit_workers=1, fit_cpus_per_actor=1.0, api_token=None,
    )  # fmt: skip
    url = deploy(build_app(cfg), "xpeft-fits", port)
    try:
        return fit_on_demand.scenario(url, hot, labels, args.fits, args.fit_examples, args.fit_seconds, 4)
    finally:
        serve.delete("xpeft-fits")


def smoke_settings(args) -> None:
    """--smoke: a tiny random BERT (tests/tiny_backbone.py), a few profiles and requests, every stage."""
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
    from tiny_backbone import make_tiny_backbone

    args.smoke_dir = tempfile.TemporaryDirectory(prefix="xpeft-load-smoke-")
    args.backbone = make_tiny_backbone(os.path.join(args.smoke_dir.name, "tiny-bert"))
    args.profiles, args.requests, args.rounds, args.payload = 60, 8, 1, [(1, 20)]
    args.N, args.k, args.b, args.num_labels = 20, 5, 4, 4
    args.forwards, args.peer, args.unloaded, args.alone_reps, args.time_limit = ["eager"], False, 5, 1, 30
    args.slow_clients, args.slow_seconds = args.slow_clients or 20, 3.0
    args.fits, args.fit_examples, args.fit_seconds = args.fits or 3, 12, 2.0


def parse_payload(text: str) -> tuple[int, int]:
    """'4x20' → 4 texts of 20 words per request."""
    texts, _, words = text.partition("x")
    return int(texts), int(words)


def print_reports(args, phases: list[dict], slow: dict | None, fits: dict | None) -> None:
    if phases:
        report(args, phases)
    if slow is not None:
        slow_clients.report(slow)
    if fits is not None:
        fit_on_demand.report(fits)


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
    ap.add_argument(
        "--forwards",
        nargs="+",
        choices=["ort", "eager"],
        default=["ort", "eager"],
        help="the xpeft servers to run, one after another (ServeConfig.forward)",
    )
    ap.add_argument(
        "--peer",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="then the PEFT LoRA + @serve.multiplexed peer on the same payloads (benchmarks/serve_peer.py)",
    )
    ap.add_argument("--peer-profiles", type=int, default=1000, help="the store's first profiles, as PEFT adapters")
    ap.add_argument(
        "--peer-models",
        type=int,
        default=None,
        help="the peer's max_num_models_per_replica (default: --cache-size, the combined profiles xpeft keeps)",
    )
    ap.add_argument("--peer-adapters", default=None, help="the peer's adapter directory (kept and reused)")
    ap.add_argument("--unloaded", type=int, default=200, help="sequential single-text requests (unloaded latency)")
    ap.add_argument("--alone-reps", type=int, default=3, help="timed forwards alone per batch size")
    ap.add_argument(
        "--cpus-per-actor", type=float, default=1.0, help="CPUs reserved by the replica (its compute threads)"
    )
    ap.add_argument("--max-batch-size", type=int, default=32)
    ap.add_argument("--batch-wait-s", type=float, default=DEFAULTS["batch_wait_s"].default)
    ap.add_argument("--cache-size", type=int, default=256)
    ap.add_argument(
        "--record-cache-mb",
        type=float,
        default=DEFAULTS["record_cache_mb"].default,
        help="stored records kept in memory (0: every miss of the combined cache reads the store)",
    )
    ap.add_argument("--onnx-cache", default=None, help=DEFAULTS["onnx_cache"].metadata["help"])
    ap.add_argument(
        "--slow-clients",
        type=int,
        default=0,
        help="then a normal client beside this many connections holding half-sent bodies (0: skip; issue 23: 200)",
    )
    ap.add_argument("--slow-seconds", type=float, default=20.0, help="the normal client's seconds, each way")
    ap.add_argument("--fits", type=int, default=0, help="then this many profiles fitted over HTTP (0: skip; 20)")
    ap.add_argument("--fit-examples", type=int, default=40, help="labelled texts per profile fitted on demand")
    ap.add_argument("--fit-seconds", type=float, default=20.0, help="classify alone this long before the fits")
    ap.add_argument("--no-load", dest="load", action="store_false", help="skip the load stage (xpeft and the peer)")
    ap.add_argument("--smoke", action="store_true", help="a tiny random backbone, a few requests: seconds")
    args = ap.parse_args()
    if args.smoke:
        smoke_settings(args)
    args.peer_models = args.peer_models or args.cache_size
    n = args.requests
    if n * len(args.payload) * args.rounds > args.profiles - 1:
        ap.error("(b) never sends two requests to one profile: need requests × payloads × rounds < profiles")
    if args.peer and args.peer_profiles > args.profiles:
        ap.error("--peer-profiles must not exceed --profiles: the peer serves the store's first profiles")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.slow_clients:
        from xpeft.serve.proxy import install

        install()  # before ray.init: the proxy reads each body (within XPEFT_BODY_TIMEOUT_S) before a replica
    import ray
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
    hot, cold = ids[0], rng.sample(ids[1:], n * len(args.payload) * args.rounds)  # (b): never twice a server
    payloads = {
        f"{per_request} × {words} words": (
            per_request,
            words,
            [[" ".join(rng.choices(WORDS, k=words)) for _ in range(per_request)] for _ in range(n)],
        )
        for per_request, words in args.payload
    }
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    phases, slow, fits = [], None, None
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        for forward in args.forwards if args.load else []:
            phases.append(xpeft_phase(args, root, port, forward, payloads, hot, cold))
        if args.peer and args.load:
            phases.append(peer_phase(args, store, port, payloads))
        if args.slow_clients:
            slow = slow_clients_phase(args, root, port, hot)
        if args.fits:
            fits = fits_phase(args, root, port, hot)
    finally:
        serve.shutdown()
        ray.shutdown()
        if tmp is not None:
            tmp.cleanup()
    print_reports(args, phases, slow, fits)


if __name__ == "__main__":
    main()
