"""The client of the serving harness: threads that POST /v1/classify, each one request at a time (a closed loop),
and a load run over a list of requests."""

from __future__ import annotations

import statistics
import threading
import time


class Client:
    """Threads that POST /v1/classify, each one request at a time, taking (profile_id, texts) from a function
    until it returns None or `stop()`; `log` holds every answer as (sent, answered, status, headers, body),
    status None for a request that got no HTTP answer. With `header`, each request also names its profile
    there (the peer's multiplexed model id)."""

    def __init__(self, url: str, header: str = ""):
        self.url, self.header = url, header
        self.log: list[tuple] = []
        self.lock, self.stopped = threading.Lock(), threading.Event()
        self.threads: list[threading.Thread] = []
        self.errors: list[BaseException] = []  # a client thread's own failure, raised by stop()
        self.unanswered = 0  # requests still in flight when stop() stopped waiting

    def start(self, next_request, concurrency: int) -> Client:
        self.threads = [
            threading.Thread(target=self._run, args=(next_request,), daemon=True) for _ in range(concurrency)
        ]
        for t in self.threads:
            t.start()
        return self

    def _run(self, next_request) -> None:
        try:
            self._send(next_request)
        except BaseException as e:  # raised in the caller's thread by stop(): a dead client is not a slow server
            self.errors.append(e)

    def _send(self, next_request) -> None:
        import requests

        session = requests.Session()
        while not self.stopped.is_set():
            with self.lock:
                req = next_request()
            if req is None:
                return
            pid, texts = req
            headers = {self.header: pid} if self.header else None
            start = time.perf_counter()
            try:
                r = session.post(f"{self.url}/v1/classify", json={"profile_id": pid, "texts": texts},
                                 headers=headers, timeout=120)  # fmt: skip
                entry = (start, time.perf_counter(), r.status_code, dict(r.headers), r.text[:300])
            except requests.RequestException as e:
                entry = (start, time.perf_counter(), None, {}, f"{type(e).__name__}: {e}"[:300])
                session = requests.Session()
            with self.lock:
                self.log.append(entry)

    def stop(self, after_s: float = 0.0, drain_s: float = 130.0) -> list[tuple]:
        """Wait up to `after_s` for the requests to run out, then stop sending; the log once the requests in
        flight are answered, or `drain_s` has passed (those still unanswered then are left out)."""
        deadline = time.perf_counter() + after_s
        for t in self.threads:
            t.join(max(0.0, deadline - time.perf_counter()))
        self.stopped.set()
        deadline = time.perf_counter() + drain_s
        for t in self.threads:
            t.join(max(0.0, deadline - time.perf_counter()))
        if self.errors:
            raise RuntimeError("a client thread failed") from self.errors[0]
        with self.lock:
            self.unanswered = sum(t.is_alive() for t in self.threads)
            return list(self.log)


def run_load(url: str, profile_ids: list[str], texts: list[list[str]], concurrency: int, time_limit: float,
             header: str = "") -> dict:  # fmt: skip
    """Send request i (profile_ids[i], texts[i]) from `concurrency` threads until all are sent or time is up."""
    todo = iter(zip(profile_ids, texts, strict=True))
    start = time.perf_counter()
    log = Client(url, header).start(lambda: next(todo, None), concurrency).stop(after_s=time_limit)
    wall = time.perf_counter() - start
    latencies = [end - sent for sent, end, status, _, _ in log if status == 200]
    failures = [f"{status} {body[:200]}" for _, _, status, _, body in log if status != 200]
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
