"""The serving harness: the profile server on 127.0.0.1 under load, against the peer a user would deploy
instead, and a replica killed mid-stream. Every stage runs on one local Ray and stops by itself.

    python benchmarks/serve_load.py --payload 1x20 1x100 4x20            # the recorded run (BENCHMARKS.md)
    python benchmarks/serve_load.py --forwards ort --no-peer --requests 300 --time-limit 30   # quicker
    python benchmarks/serve_load.py --store /tmp/xpeft-load              # keep (and reuse) the 10,000 profiles
    python benchmarks/serve_load.py --stages kill --concurrency 8        # a replica killed (docs/serving.md)
    python benchmarks/serve_load.py --stages slow --slow-clients 200     # slow clients beside a normal one
    python benchmarks/serve_load.py --stages fits --fits 20              # profiles fitted over HTTP, beside classify
    python benchmarks/serve_load.py --stages load kill slow fits --smoke # every stage, tiny: the suite runs it

Stage `load`: the server with its forward in ONNX Runtime ('ort') and in torch ('eager'), then the peer (PEFT
LoRA adapters behind `@serve.multiplexed`, harness/peer.py), one after another on the same cores, client and
payloads. Scenarios: (a) every request to one profile, (b) every request to a different profile (xpeft: never
requested before, among the stored ones; the peer: a cycle over its adapters, more than its LRU holds), a
fixed number of requests each, within a time limit. For each server it prints the load table; then, per
payload and scenario, the forward's ms a row inside the replica next to the same engine's forward alone (in
this process, after the server is gone) at the batch sizes the replica formed (`replica/alone`), requests/s
ort against eager, the CPU seconds the client, the Serve proxy, the replica and the rest of Ray used (/proc),
unloaded latency (sequential single-text requests next to the one-row forward alone), and xpeft against the
peer (requests/s, p50/p99, replica RSS). In (b) the combined cache holds far fewer than the profiles, so every
request reads its profile from the store (or the record cache) and combines it with the bank: the cost that
mixed-profile serving adds.

Stage `kill`: a steady stream of classify requests from --concurrency threads; after --kill-at seconds the
replica process (one of --num-replicas) gets SIGKILL. It reports how many requests failed and how (status,
Content-Type, Retry-After, body), and how long until requests were served again. The proxy has
xpeft.serve.proxy's middleware (a JSON 503 with Retry-After for a request no replica answered), as `xpeft
serve` sets it up, unless --plain-proxy; it is installed when Ray starts, so with both stages the load stage
runs behind it too.

Stage `slow` (harness/slow_clients.py): a normal client's requests/s and /healthz's latency without, then with,
--slow-clients connections holding half-sent bodies, behind the same middleware (the proxy reads each body,
within XPEFT_BODY_TIMEOUT_S, before a replica is picked).

Stage `fits` (harness/fit_on_demand.py): --fits profiles of --fit-examples texts fitted over HTTP one after
another on a quiet server, then --fits more beside a classify stream of --fit-clients threads (POST → first answer
p50 / p99 of each), and classify p50 / p99 without and with the fits; the store gets a recipe as the farm records
it (FARM_TRAIN), the server its fit workers (--fit-workers, --fit-cpus-per-actor); --fit-epochs E [E ...] and
--fit-batch-size B [B ...] send each fit with the per-profile `epochs` / `batch_size` overrides (paired in order),
the whole scenario once per pair on the same server.

The server's settings are ServeConfig's flags (as `xpeft serve` takes them); N, k, b and the classes of the
random profiles XPeftConfig's.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import random
import signal
import statistics
import tempfile
import time

from harness import fit_on_demand, slow_clients
from harness.client import Client, run_load
from harness.common import SMOKE_HELP, WORDS, free_port, make_store, smoke_backbone
from harness.procs import cpu_by_role, memory_mb, replica_pids
from harness.report import SCENARIOS, kill_report, report

from xpeft.config import XPeftConfig
from xpeft.flags import add_flags, from_flags
from xpeft.serve.config import ServeConfig
from xpeft.serve.engine import ProfileEngine

STAGES = ("load", "kill", "slow", "fits")
NOT_FLAGS = ("store", "bank_path", "bank_fingerprint", "forward")  # the harness makes the store; --forwards


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
        warm = run_load(url, [hot] * len(texts[:32]), texts[:32], args.concurrency, args.time_limit, header)
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
    """Memory of the app's (first) replica, then the app removed (`remove`)."""
    memory = memory_mb(replica_pids()[0])
    remove(name)
    return memory


def remove(name: str) -> None:
    """The app deleted and its replicas gone, so the next stage (each deploys its own app at "/") runs alone."""
    from ray import serve

    serve.delete(name)
    deadline = time.perf_counter() + 60
    while replica_pids() and time.perf_counter() < deadline:
        time.sleep(0.5)


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


def server_config(args, root: str, **overrides) -> ServeConfig:
    return from_flags(args, ServeConfig, store=root, api_token=None, **overrides)


def xpeft_phase(args, root: str, port: int, forward: str, payloads: dict, hot: str, cold: list[str]) -> dict:
    from xpeft.serve.deployment import build_app

    cfg = server_config(args, root, forward=forward)
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


def peer_phase(args, store, port: int, payloads: dict) -> dict:
    import ray.cloudpickle
    from harness import peer

    ray.cloudpickle.register_pickle_by_value(peer)  # benchmarks/ is not importable in the workers
    tmp = tempfile.TemporaryDirectory(prefix="xpeft-peer-") if args.peer_adapters is None else None
    root = args.peer_adapters or tmp.name
    start = time.perf_counter()
    ids = peer.write_adapters(store, root, args.peer_profiles, args.backbone)
    print(f"[peer] {len(ids)} PEFT adapters at {root} ({time.perf_counter() - start:.1f} s)")
    try:
        app = peer.peer_app(root, args.backbone, args.peer_models, args.cpus_per_actor, args.max_batch_size)
        url = deploy(app, "peft-peer", port)
        hot, rest = ids[0], random.Random(0).sample(ids[1:], len(ids) - 1)
        cold = list(itertools.islice(itertools.cycle(rest), args.requests * len(payloads) * args.rounds))
        runs = scenarios(url, args, payloads, hot, cold, peer.MODEL_ID_HEADER)
        text = " ".join(random.Random(1).choices(WORDS, k=20))
        lone = unloaded(url, args, hot, text, peer.MODEL_ID_HEADER)
        memory = undeploy("peft-peer")
    finally:
        if tmp is not None:
            tmp.cleanup()
    return {"system": "PEFT + multiplexing", "forward": "eager", "runs": runs, "unloaded": lone, "memory": memory}


def load_stage(args, store, port: int) -> None:
    rng = random.Random(0)
    ids = store.ids()
    hot, cold = ids[0], rng.sample(ids[1:], args.requests * len(args.payload) * args.rounds)  # (b): never twice
    payloads = {
        f"{per_request} × {words} words": (
            per_request,
            words,
            [[" ".join(rng.choices(WORDS, k=words)) for _ in range(per_request)] for _ in range(args.requests)],
        )
        for per_request, words in args.payload
    }
    phases = [xpeft_phase(args, store.uri, port, forward, payloads, hot, cold) for forward in args.forwards]
    if args.peer:
        phases.append(peer_phase(args, store, port, payloads))
    report(args, phases)


def kill_stage(args, store, port: int) -> None:
    from xpeft.serve.deployment import build_app

    ids, rng = store.ids(), random.Random(0)
    url = deploy(build_app(server_config(args, store.uri, forward=args.forwards[0])), "xpeft-kill", port)
    try:
        warm = run_load(url, ids[:1], [["warm up"]], 1, args.time_limit)
        if warm["failed"]:
            raise RuntimeError(f"the warm-up failed: {warm['first_failure']}")
        pid = replica_pids()[0]
        texts = lambda: [" ".join(rng.choices(WORDS, k=12))]  # noqa: E731
        client = Client(url).start(lambda: (rng.choice(ids), texts()), args.kill_concurrency)
        time.sleep(args.kill_at)
        killed_at = time.perf_counter()
        os.kill(pid, signal.SIGKILL)
        print(f"kill -9 {pid} (the replica) after {args.kill_at:.0f} s of requests", flush=True)
        while time.perf_counter() - killed_at < args.after_kill:
            with client.lock:
                served = sum(1 for e in client.log if e[2] == 200 and e[0] > killed_at)
            if served >= args.served_after:
                break
            time.sleep(0.2)
        log = client.stop(drain_s=args.drain_s)
        kill_report(args, log, killed_at, pid, replica_pids(), client.unanswered)
    finally:
        remove("xpeft-kill")


def slow_stage(args, store, port: int) -> None:
    """The slow-clients scenario (harness/slow_clients.py) against the server with the first of --forwards."""
    from xpeft.serve.deployment import build_app

    cfg = server_config(args, store.uri, forward=args.forwards[0])
    ProfileEngine(dataclasses.replace(cfg, record_cache_mb=0))  # the encoder graph into the cache first
    url = deploy(build_app(cfg), "xpeft-slow", port)
    text = " ".join(random.Random(2).choices(WORDS, k=20))
    try:
        result = slow_clients.scenario(url, port, "/", args.slow_clients, args.slow_seconds, store.ids()[0], text)
    finally:
        undeploy("xpeft-slow")
    slow_clients.report(result)


def fits_stage(args, store, port: int) -> None:
    """Fits on demand (harness/fit_on_demand.py) beside classify, with a recipe as the farm records it."""
    from xpeft.fit.on_demand import FitRecipe, save_recipe
    from xpeft.fit.recipes import FARM_TRAIN
    from xpeft.serve.deployment import build_app

    labels, xcfg = [f"class-{i}" for i in range(args.num_labels)], from_flags(args, XPeftConfig, head="linear")
    save_recipe(store, FitRecipe(args.backbone, xcfg, FARM_TRAIN, store.bank_fingerprints()[0], label_names=labels))
    url = deploy(build_app(server_config(args, store.uri, forward=args.forwards[0])), "xpeft-fits", port)
    try:
        sizes = (args.fits, args.fit_examples, args.fit_seconds, args.fit_clients)
        results = [
            fit_on_demand.scenario(url, store.ids()[0], labels, *sizes, overrides=overrides)
            for overrides in fit_overrides(args)
        ]
    finally:
        remove("xpeft-fits")
    for result in results:
        fit_on_demand.report(result)


def fit_overrides(args) -> list[dict]:
    """Each fits scenario's per-profile overrides: --fit-epochs and --fit-batch-size paired in order (a single
    value goes with every value of the other); [{}] when neither is given (the store's recipe)."""
    epochs, batch = args.fit_epochs or [None], args.fit_batch_size or [None]
    n = max(len(epochs), len(batch))
    if {len(epochs), len(batch)} - {1, n}:
        raise SystemExit(f"--fit-epochs has {len(epochs)} values, --fit-batch-size {len(batch)}: give as many, or one")
    epochs, batch = (epochs * n if len(epochs) == 1 else epochs), (batch * n if len(batch) == 1 else batch)
    pairs = zip(epochs, batch, strict=True)
    return [{k: v for k, v in (("epochs", e), ("batch_size", b)) if v is not None} for e, b in pairs]


def parse_payload(text: str) -> tuple[int, int]:
    """'4x20' → 4 texts of 20 words per request."""
    texts, _, words = text.partition("x")
    return int(texts), int(words)


def arguments() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stages", nargs="+", choices=STAGES, default=["load"], help="default: load")
    ap.add_argument("--smoke", action="store_true", help=SMOKE_HELP)
    ap.add_argument("--profiles", type=int, default=10_000, help="random profiles in the store (default: 10000)")
    ap.add_argument("--store", default=None, help="the store, kept and reused (default: a temporary directory)")
    ap.add_argument("--concurrency", type=int, default=None, help="client threads (default: 16; stage kill: 4)")
    ap.add_argument("--time-limit", type=float, default=60.0, help="seconds per scenario and payload (default: 60)")
    group = ap.add_argument_group("the profiles (XPeftConfig)")
    add_flags(group, XPeftConfig, only=("N", "k", "b", "num_labels"), defaults=XPeftConfig(num_labels=15))
    add_flags(ap.add_argument_group("the server (ServeConfig, as `xpeft serve` takes it)"), ServeConfig, skip=NOT_FLAGS)
    load = ap.add_argument_group("stage load")
    load.add_argument("--requests", type=int, default=600, help="requests a scenario, payload and round (default: 600)")
    load.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="(a) then (b), this many times per payload: alternating spreads a machine's drift over both (default: 3)",
    )
    load.add_argument(
        "--payload",
        nargs="+",
        default=[(1, 20)],
        type=parse_payload,
        help="TEXTSxWORDS per request, one or more (e.g. 1x20 1x100 4x20; default: 1x20)",
    )
    load.add_argument(
        "--forwards",
        nargs="+",
        choices=["ort", "eager"],
        default=["ort", "eager"],
        help="the xpeft servers, one after another (ServeConfig.forward; stage kill runs the first)",
    )
    load.add_argument(
        "--peer",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="then the PEFT LoRA + @serve.multiplexed peer on the same payloads (harness/peer.py)",
    )
    load.add_argument("--peer-profiles", type=int, default=1000, help="the store's first profiles, as PEFT adapters")
    load.add_argument(
        "--peer-models",
        type=int,
        default=None,
        help="the peer's max_num_models_per_replica (default: --cache-size, the combined profiles xpeft keeps)",
    )
    load.add_argument("--peer-adapters", default=None, help="the peer's adapter directory (kept and reused)")
    load.add_argument("--unloaded", type=int, default=200, help="sequential single-text requests (unloaded latency)")
    load.add_argument("--alone-reps", type=int, default=3, help="timed forwards alone per batch size")
    kill = ap.add_argument_group("stage kill")
    kill.add_argument("--kill-at", type=float, default=5.0, help="seconds of the stream before the kill")
    kill.add_argument("--after-kill", type=float, default=60.0, help="seconds of the stream after it, at most")
    kill.add_argument("--served-after", type=int, default=50, help="stop once this many were served after the kill")
    kill.add_argument("--plain-proxy", action="store_true", help="without xpeft.serve.proxy's middleware")
    kill.add_argument(
        "--drain-s", type=float, default=130.0, help="then seconds to wait for the requests still in flight"
    )
    slow = ap.add_argument_group("stage slow")
    slow.add_argument(
        "--slow-clients", type=int, default=200, help="connections holding half-sent bodies (issue 23: 200)"
    )
    slow.add_argument("--slow-seconds", type=float, default=20.0, help="the normal client's seconds, each way")
    fits = ap.add_argument_group("stage fits")
    fits.add_argument("--fits", type=int, default=20, help="profiles fitted over HTTP, one after another")
    fits.add_argument("--fit-examples", type=int, default=40, help="labelled texts a profile (default: 40)")
    fits.add_argument("--fit-seconds", type=float, default=20.0, help="classify alone this long before the fits")
    fits.add_argument("--fit-clients", type=int, default=4, help="classify threads beside the second fits (0: none)")
    fits.add_argument(
        "--fit-epochs",
        type=int,
        nargs="+",
        default=None,
        help="each POST's `epochs`, the scenario once per value on one server (default: none sent: the recipe's)",
    )
    fits.add_argument(
        "--fit-batch-size",
        type=int,
        nargs="+",
        default=None,
        help="each POST's `batch_size`, paired with --fit-epochs in order (default: none sent: the recipe's)",
    )
    return ap


SMOKE = {  # sizes only (two payloads: the tables' loops over them): what runs (stages, forwards, peer, proxy) is kept
    **{"requests": 4, "rounds": 1, "time_limit": 60.0, "unloaded": 3, "alone_reps": 1, "peer_profiles": 4},
    **{"payload": [(1, 8), (2, 8)]},
    **{"N": 8, "k": None, "b": 4, "num_labels": 3, "store": None, "peer_adapters": None},
    **{"num_replicas": 1, "cpus_per_actor": 1.0},  # one replica is killed either way
    **{"kill_at": 1.0, "after_kill": 2.0, "served_after": 2, "drain_s": 1.0},
    **{"slow_clients": 20, "slow_seconds": 1.5},
    **{"fits": 2, "fit_examples": 12, "fit_seconds": 2.0, "fit_epochs": [2], "fit_batch_size": [4]},
}
SMOKE_ALSO = ("backbone", "profiles", "concurrency")  # also set by the smoke setting (settle)


def settle(ap: argparse.ArgumentParser, args, tmp: str) -> None:
    """Defaults that depend on other flags, the smoke setting's sizes, and the refusals."""
    if args.smoke:
        vars(args).update(SMOKE, backbone=smoke_backbone(tmp), concurrency=min(args.concurrency or 2, 2))
        args.profiles = args.requests * len(args.payload) * args.rounds + args.peer_profiles
        if not (args.onnx_cache or os.environ.get("XPEFT_ONNX_CACHE")):  # never ~/.cache for a smoke run
            args.onnx_cache = os.path.join(tmp, "onnx")
    args.kill_concurrency = args.concurrency or 4
    args.concurrency = args.concurrency or 16
    args.peer_models = args.peer_models or args.cache_size
    if "load" in args.stages and args.requests * len(args.payload) * args.rounds > args.profiles - 1:
        ap.error("(b) never sends two requests to one profile: need requests × payloads × rounds < profiles")
    if "load" in args.stages and args.peer and args.peer_profiles > args.profiles:
        ap.error("--peer-profiles must not exceed --profiles: the peer serves the store's first profiles")


def main() -> None:
    ap = arguments()
    args = ap.parse_args()
    tmp = tempfile.TemporaryDirectory(prefix="xpeft-load-")
    settle(ap, args, tmp.name)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if {"kill", "slow"} & set(args.stages) and not args.plain_proxy:
        from xpeft.serve.proxy import install

        install()  # before ray.init: the proxy process inherits the environment
    import ray
    from ray import serve

    root = args.store or os.path.join(tmp.name, "store")
    start = time.perf_counter()
    cfg = from_flags(args, XPeftConfig)
    store = make_store(root, args.profiles, args.backbone, cfg)
    print(f"store: {len(store)} profiles in {store.stats()['parts']} parts at {root} "
          f"({time.perf_counter() - start:.1f} s)")  # fmt: skip
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        stage_fns = {"load": load_stage, "kill": kill_stage, "slow": slow_stage, "fits": fits_stage}
        for stage in (name for name in STAGES if name in args.stages):  # in STAGES' order, one server each
            print(f"\n# stage {stage}", flush=True)
            stage_fns[stage](args, store, port)
    finally:
        serve.shutdown()
        ray.shutdown()
        tmp.cleanup()


if __name__ == "__main__":
    main()
