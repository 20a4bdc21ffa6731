"""The fits-on-demand scenario of the serving harness (benchmarks/serve_load.py --stages fits): profiles fitted over
HTTP (POST /v1/profiles/{id}/fit) while a client classifies (issue 28).

1. N new profiles of `examples` labelled texts each fitted one after another on a quiet server, each POSTed once
   the previous one is answered: per profile, the time from the POST to the first classify answer with it (the
   fit, its store write and the replica's refresh within staleness_s), and the fit's own seconds (the first fit
   also loads the fit worker's backbone and bank);
2. classify alone: `concurrency` threads send single-text requests to one stored profile for `seconds`;
3. N more profiles fitted as in 1 while that client classifies.

Printed: POST → answer p50 / p99 (goal p50 <= 5 s on 2 cores) and fit seconds p50 on the quiet and the busy
server, classify p50 / p99 and requests/s without and with the stream of fits (the fit workers reserve their
own CPUs: fits must not starve classify).
"""

from __future__ import annotations

import random
import statistics
import time

from harness.client import Client

WORDS = "good great fun bad awful boring news vote market game team food trip music art film story".split()


def quantiles(values: list[float]) -> tuple[float, float]:
    """(p50, p99) of `values`, NaN when there are fewer than two."""
    if len(values) < 2:
        return float("nan"), float("nan")
    q = statistics.quantiles(values, n=100)
    return q[49], q[98]


def classify_stats(log: list[tuple], wall: float) -> dict:
    """requests/s, p50 / p99 and failures of a Client's log (sent, answered, status, headers, body)."""
    latencies = [answered - sent for sent, answered, status, *_ in log if status == 200]
    p50, p99 = quantiles(latencies)
    n = len(latencies)
    return {"requests": n, "failed": len(log) - n, "rps": n / wall, "p50_ms": 1000 * p50, "p99_ms": 1000 * p99}


def classifying(url: str, hot: str, concurrency: int) -> tuple[Client, float]:
    """The harness's client, classifying one text with `hot` from `concurrency` threads until stopped."""
    return Client(url).start(lambda: (hot, ["good fun news about the vote"]), concurrency), time.perf_counter()


def examples(n: int, label_names: list[str], seed: int, overrides: dict | None = None) -> dict:
    """A fit request's body: `n` labelled texts, and the per-profile overrides given (`epochs`, `batch_size`)."""
    rng = random.Random(seed)
    labels = [rng.choice(label_names) for _ in range(n)]
    texts = [f"{label} {' '.join(rng.choices(WORDS, k=12))}" for label in labels]
    return {"texts": texts, "labels": labels, **(overrides or {})}


def fit_and_answer(url: str, profile_id: str, body: dict, timeout: float = 300.0) -> dict:
    """POST the fit (again after Retry-After on a 429), then classify with the profile until it answers:
    the seconds from the accepted POST to that answer, and the job's own fit seconds."""
    import requests

    while (r := requests.post(f"{url}/v1/profiles/{profile_id}/fit", json=body, timeout=60)).status_code == 429:
        time.sleep(float(r.headers.get("Retry-After", 1)))
    if r.status_code != 202:
        raise RuntimeError(f"POST fit of {profile_id}: {r.status_code} {r.text[:300]}")
    posted, job_id = time.perf_counter(), r.json()["job_id"]
    ask = {"profile_id": profile_id, "texts": ["good fun"]}
    while (a := requests.post(f"{url}/v1/classify", json=ask, timeout=60)).status_code != 200:
        if a.status_code != 404 or time.perf_counter() - posted > timeout:
            job = requests.get(f"{url}/v1/jobs/{job_id}", timeout=60).json()
            raise RuntimeError(f"{profile_id} never answered: {a.status_code} {a.text[:200]}; its job: {job}")
        time.sleep(0.02)
    answered = time.perf_counter() - posted
    job = requests.get(f"{url}/v1/jobs/{job_id}", timeout=60).json()
    return {"profile_id": profile_id, "answer_s": answered, "fit_s": job.get("seconds", float("nan"))}


def scenario(
    url: str,
    hot: str,
    label_names: list[str],
    fits: int,
    n_examples: int,
    seconds: float,
    concurrency: int,
    overrides: dict | None = None,
) -> dict:
    """`fits` new profiles fitted one after another on a quiet server; then classify alone for `seconds`; then
    `fits` more beside that classify stream (`concurrency` threads; 0: the quiet fits alone); `overrides` are
    sent with each fit (`epochs`, `batch_size`; none: the store's recipe)."""

    def stream(tag: str) -> list[dict]:
        ids = [f"on-demand-{tag}-{i:03d}-{time.time_ns()}" for i in range(fits)]
        return [fit_and_answer(url, pid, examples(n_examples, label_names, i, overrides)) for i, pid in enumerate(ids)]

    quiet, alone, beside, busy = stream("quiet"), None, None, []
    if concurrency:
        client, started = classifying(url, hot, concurrency)
        time.sleep(seconds)
        alone = classify_stats(client.stop(), time.perf_counter() - started)
        client, started = classifying(url, hot, concurrency)
        busy = stream("busy")
        beside = classify_stats(client.stop(), time.perf_counter() - started)
    return {
        "alone": alone, "with_fits": beside, "quiet_fits": quiet, "fits": busy, "examples": n_examples,
        "concurrency": concurrency, "overrides": overrides or {},
    }  # fmt: skip


def report(result: dict) -> None:
    sent = ", ".join(f"{k} {v}" for k, v in result["overrides"].items())
    recipe = f"the recipe with the request's {sent}" if sent else "the store's recipe"
    print(f"\n## fits on demand: profiles of {result['examples']} examples, {recipe}, one after another\n")
    print("| server | profiles | POST → first answer p50 (s) | p99 (s) | fit alone p50 (s) |")
    print("|---|---:|---:|---:|---:|")
    for name, runs in (
        ("quiet", result["quiet_fits"]),
        (f"classifying ({result['concurrency']} clients)", result["fits"]),
    ):
        if not runs:
            continue
        answer = quantiles([r["answer_s"] for r in runs])
        fit_s = statistics.median(r["fit_s"] for r in runs)
        print(f"| {name} | {len(runs)} | {answer[0]:.2f} | {answer[1]:.2f} | {fit_s:.2f} |")
    if not result["concurrency"]:
        return
    print(f"\n## classify ({result['concurrency']} clients, one text) without and with the fits running\n")
    print("| | requests/s | p50 (ms) | p99 (ms) | failed |")
    print("|---|---:|---:|---:|---:|")
    for name in ("alone", "with_fits"):
        r = result[name]
        print(f"| {name.replace('_', ' ')} | {r['rps']:.1f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['failed']} |")
