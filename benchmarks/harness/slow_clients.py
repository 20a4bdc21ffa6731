"""The slow-clients scenario of the serving harness (benchmarks/serve_load.py --slow-clients N): a normal client's
requests/s and /healthz's latency without, then with, N connections that send their headers and 10 of their 100
body bytes and wait (each one reopened as soon as the proxy cuts it off with a 408). Goals (issue 23): the normal
client keeps >= 90 % of its requests/s, /healthz answers within 1 s.
"""

from __future__ import annotations

import selectors
import socket
import statistics
import threading
import time

HALF_BODY = b'{"profile_'  # 10 of the 100 bytes the headers promise


class HalfSentClients:
    """`n` connections, each holding half a body on `path`, kept at `n` from a thread until `stop()`."""

    def __init__(self, port: int, path: str, n: int):
        self.port, self.path, self.n = port, path, n
        self.cut_off = 0  # connections the server closed (a 408 from the proxy's body timeout), reopened
        self.statuses: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._hold, daemon=True)

    def _open(self, sel: selectors.BaseSelector) -> None:
        conn = socket.create_connection(("127.0.0.1", self.port), timeout=30)
        head = (
            f"POST {self.path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            "Content-Length: 100\r\n\r\n"
        )
        conn.sendall(head.encode() + HALF_BODY)
        conn.setblocking(False)
        sel.register(conn, selectors.EVENT_READ)

    def _hold(self) -> None:
        sel = selectors.DefaultSelector()
        for _ in range(self.n):
            self._open(sel)
        while not self._stop.is_set():
            for key, _ in sel.select(timeout=0.2):
                conn = key.fileobj
                try:
                    answer = conn.recv(4096)
                except OSError:
                    answer = b""
                status = answer.split(b" ", 2)[1].decode() if answer.startswith(b"HTTP/") else "closed"
                self.statuses[status] = self.statuses.get(status, 0) + 1
                sel.unregister(conn)
                conn.close()
                self.cut_off += 1
                if not self._stop.is_set():
                    self._open(sel)
        for key in list(sel.get_map().values()):
            key.fileobj.close()

    def start(self) -> HalfSentClients:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)


def normal_client(url: str, profile_id: str, text: str, seconds: float) -> dict:
    """One client sending classify requests one after another for `seconds`: requests/s and failures."""
    import requests

    session, done, failed = requests.Session(), 0, 0
    end = time.perf_counter() + seconds
    start = time.perf_counter()
    while time.perf_counter() < end:
        r = session.post(f"{url}/v1/classify", json={"profile_id": profile_id, "texts": [text]}, timeout=120)
        done += r.status_code == 200
        failed += r.status_code != 200
    return {"rps": done / (time.perf_counter() - start), "requests": done, "failed": failed}


def healthz_latencies(url: str, stop: threading.Event, every_s: float = 0.5) -> list[float]:
    """GET /healthz every `every_s` until `stop`: each answer's seconds (a failure counts as 60)."""
    import requests

    out = []
    while not stop.is_set():
        start = time.perf_counter()
        try:
            ok = requests.get(f"{url}/healthz", timeout=60).status_code == 200
        except requests.RequestException:
            ok = False
        out.append(time.perf_counter() - start if ok else 60.0)
        stop.wait(every_s)
    return out


def measure(url: str, profile_id: str, text: str, seconds: float) -> dict:
    stop = threading.Event()
    health: list[float] = []
    prober = threading.Thread(target=lambda: health.extend(healthz_latencies(url, stop)), daemon=True)
    prober.start()
    r = normal_client(url, profile_id, text, seconds)
    stop.set()
    prober.join(90)
    q = statistics.quantiles(health, n=100) if len(health) > 1 else [float("nan")] * 99
    return {**r, "healthz_p50_s": q[49], "healthz_max_s": max(health, default=float("nan")), "probes": len(health)}


def scenario(url: str, port: int, route_prefix: str, n: int, seconds: float, profile_id: str, text: str) -> dict:
    """The normal client and /healthz without, then with, `n` half-sent bodies on `route_prefix`/v1/classify."""
    measure(url, profile_id, text, min(3.0, seconds))  # warm: the profile combined and cached
    alone = measure(url, profile_id, text, seconds)
    holders = HalfSentClients(port, f"{route_prefix.rstrip('/')}/v1/classify", n).start()
    time.sleep(1.0)  # all of them waiting
    try:
        crowded = measure(url, profile_id, text, seconds)
    finally:
        holders.stop()
    return {"n": n, "seconds": seconds, "alone": alone, "crowded": crowded, "cut_off": holders.cut_off,
            "statuses": holders.statuses}  # fmt: skip


def report(r: dict) -> None:
    a, c = r["alone"], r["crowded"]
    print(f"\nslow clients: {r['n']} connections holding half-sent bodies (each reopened when cut off), one normal "
          f"client for {r['seconds']:.0f} s each way, /healthz every 0.5 s\n")  # fmt: skip
    print("| | normal client req/s | failed | /healthz p50 s | /healthz max s |")
    print("|---|---|---|---|---|")
    for name, x in (("alone", a), (f"beside {r['n']} slow clients", c)):
        print(f"| {name} | {x['rps']:.1f} | {x['failed']} | {x['healthz_p50_s']:.3f} | {x['healthz_max_s']:.3f} |")
    ratio = c["rps"] / a["rps"] if a["rps"] else float("nan")
    print(f"\nslow clients cut off by the proxy (and reopened): {r['cut_off']} ({r['statuses']})")
    print(f"slow clients: normal client kept {100 * ratio:.0f} % of its requests/s (goal >= 90 %), "
          f"/healthz max {c['healthz_max_s']:.2f} s (goal <= 1 s)")  # fmt: skip
