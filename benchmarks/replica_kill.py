"""A replica killed mid-stream: what the client sees. A local Serve app with one replica gets a steady stream
of classify requests from a few threads; after a while the replica process is sent SIGKILL (`kill -9`). The
script reports how many requests failed and how (status, Content-Type, Retry-After, body), and how long
until requests were served again.

    python benchmarks/replica_kill.py                                  # MiniLM, 20 profiles, 4 client threads
    python benchmarks/replica_kill.py --backbone tiny --profiles 5     # quicker (a tiny random BERT)
    python benchmarks/replica_kill.py --plain-proxy                    # Serve's own proxy answer, for comparison
    python benchmarks/replica_kill.py --num-replicas 2                 # one of two killed

By default the proxy has xpeft.serve.proxy's middleware (a JSON 503 with Retry-After for a request no
replica answered); --plain-proxy leaves Serve's proxy as it is. Bounded: it stops `--after-kill` seconds
after the kill (or once `--served-after` requests were served again) and shuts its Ray down.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import signal
import socket
import sys
import tempfile
import threading
import time
from collections import Counter

from serve_load import WORDS, make_store

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from api_cases import replica_pids  # noqa: E402  (the tests find the replica's process the same way)

from xpeft.serve.config import ServeConfig


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stream(url: str, ids: list[str], stop: threading.Event, log: list, seed: int) -> None:
    """Send classify requests one after another until `stop`, appending (start, end, status, headers, body)."""
    import requests

    rng = random.Random(seed)
    session = requests.Session()
    while not stop.is_set():
        body = {"profile_id": rng.choice(ids), "texts": [" ".join(rng.choices(WORDS, k=12))]}
        start = time.monotonic()
        try:
            r = session.post(f"{url}/v1/classify", json=body, timeout=120)
            log.append((start, time.monotonic(), r.status_code, dict(r.headers), r.text[:300]))
        except requests.RequestException as e:
            log.append((start, time.monotonic(), None, {}, f"{type(e).__name__}: {e}"[:300]))
            session = requests.Session()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="minilm", help="'minilm' (bundled) or 'tiny' (a random 2-block BERT)")
    ap.add_argument("--profiles", type=int, default=20, help="stored profiles the requests pick from")
    ap.add_argument("--concurrency", type=int, default=4, help="client threads, each one request at a time")
    ap.add_argument("--kill-at", type=float, default=5.0, help="seconds of the stream before the kill")
    ap.add_argument("--after-kill", type=float, default=60.0, help="seconds of the stream after it, at most")
    ap.add_argument("--served-after", type=int, default=50, help="stop once this many were served after the kill")
    ap.add_argument("--num-replicas", type=int, default=1, help="replicas (one is killed), 1/replicas CPU each")
    ap.add_argument("--plain-proxy", action="store_true", help="without xpeft.serve.proxy's middleware")
    args = ap.parse_args()

    if not args.plain_proxy:
        from xpeft.serve.proxy import install

        install()  # before ray.init: the proxy process inherits the environment
    import ray
    import requests
    from ray import serve

    from xpeft.serve.deployment import build_app

    tmp = tempfile.TemporaryDirectory(prefix="xpeft-kill-")
    backbone = args.backbone
    if backbone == "tiny":
        from tiny_backbone import make_tiny_backbone

        backbone = make_tiny_backbone(os.path.join(tmp.name, "tiny-bert"))
    small = backbone != "minilm"
    store = make_store(
        os.path.join(tmp.name, "store"), args.profiles, backbone, N=20 if small else 100, k=5 if small else 50,
        b=4 if small else 48, num_labels=4,
    )  # fmt: skip
    ids = store.ids()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    app_name = "xpeft-kill"
    log: list = []
    stop = threading.Event()
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        cpus = 1 / args.num_replicas  # on 2 cores: one for the proxy and the client, one for the replicas
        cfg = ServeConfig(
            store=store.uri, backbone=backbone, num_replicas=args.num_replicas, cpus_per_actor=cpus, api_token=None
        )
        serve.run(build_app(cfg), name=app_name, route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        assert requests.post(f"{url}/v1/classify", json={"profile_id": ids[0], "texts": ["warm up"]}).ok
        pid = replica_pids(app_name)[0]
        threads = [
            threading.Thread(target=stream, args=(url, ids, stop, log, i), daemon=True) for i in range(args.concurrency)
        ]
        for t in threads:
            t.start()
        time.sleep(args.kill_at)
        killed_at = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        print(f"kill -9 {pid} (the replica) after {args.kill_at:.0f} s of requests", flush=True)
        while time.monotonic() - killed_at < args.after_kill:
            served = [e for e in log if e[2] == 200 and e[0] > killed_at]
            if len(served) >= args.served_after:
                break
            time.sleep(0.2)
        stop.set()
        for t in threads:
            t.join(timeout=130)
        new = replica_pids(app_name)
    finally:
        stop.set()
        serve.shutdown()
        ray.shutdown()
        tmp.cleanup()
    report(args, log, killed_at, pid, new)


def waits(entries: list) -> str:
    return f"{max(e[1] - e[0] for e in entries):.1f} s" if entries else "-"


def report(args, log: list, killed_at: float, pid: int, new: list[int]) -> None:
    before = [e for e in log if e[1] < killed_at]
    failed = [e for e in log if e[2] != 200]
    served_after = sorted(e[1] for e in log if e[2] == 200 and e[0] >= killed_at)
    kinds = Counter(
        (e[2], e[3].get("content-type") or e[3].get("Content-Type"), e[3].get("retry-after") or e[3].get("Retry-After"))
        for e in failed
    )
    print(f"\n`{' '.join([os.path.basename(sys.executable), *sys.argv])}`  ")
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs; proxy middleware: "
        f"{'off (Serve as it is)' if args.plain_proxy else 'xpeft.serve.proxy'}; {args.num_replicas} replica(s), "
        f"{args.concurrency} client threads"
    )
    print(f"- requests: {len(log)} ({len(before)} answered before the kill), failed: {len(failed)}")
    for (status, ctype, retry), n in kinds.most_common():
        example = next(e[4] for e in failed if (e[2], e[3].get("content-type")) == (status, ctype))
        print(f"  - {n} × status {status}, Content-Type {ctype}, Retry-After {retry}: {example!r}")
    in_flight = [e for e in log if e[0] < killed_at < e[1]]
    outcomes = Counter(e[2] for e in in_flight)
    print(f"- in flight at the kill: {len(in_flight)}, answered {dict(outcomes)} after {waits(in_flight)}")
    if served_after:
        print(f"- served again {served_after[0] - killed_at:.1f} s after the kill (the first 200 sent after it)")
        after = [e for e in log if e[0] >= killed_at and e[2] == 200]
        print(f"- requests sent after the kill: {len(after)} served, waiting at most {waits(after)}")
    else:
        print(f"- not served again within {args.after_kill:.0f} s of the kill")
    print(f"- replica process {pid} → {new or 'none'}")


if __name__ == "__main__":
    main()
