"""How the profile server is deployed: `ServeConfig`, every field with its help (`xpeft.config.option`), settable
from `ray_jobs/serve.py --key`, `serve run ... key=value` or env vars XPEFT_<KEY> (`xpeft.flags.from_strings`)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

from xpeft.config import BackboneBankFields, option


@dataclass
class ServeConfig(BackboneBankFields):
    """How the profile server is deployed: its backbone and bank (`bank_path`, else the store's), scale, the
    forward, caches, staleness and request limits."""

    store: str = option(help="the profile store: a directory or a URI (s3://…)")
    bank_fingerprint: str | None = option(
        None,
        "the bank a replica loads at start (a prefix will do); default: the newest of the store's. Every bank of "
        "the store is served: a profile from the newest bank grown from its own, others loaded on first use",
    )
    bank_cache_mb: float = option(
        1024.0,
        "banks kept in memory per replica (LRU by bytes; the one used last always stays): a profile of a bank not "
        "in memory loads it (verified, ~0.3 s for MiniLM at N=100) on first use",
    )
    # --- scale ---
    num_replicas: int = option(1, "replicas, each with its own backbone, bank and cache", renamed_from=("--replicas",))
    cpus_per_actor: float = option(
        1.0,
        "CPUs each replica (a Ray actor) reserves (Serve's default is 1 too): on 2 cores, 1 leaves one for the "
        "proxy; a replica that cannot be placed never starts",
        renamed_from=("num_cpus",),
    )
    gpus_per_actor: float = option(
        0.0,
        "GPUs each replica reserves; > 0 runs the forward on cuda (untested: no GPU on the dev machine)",
        renamed_from=("num_gpus",),
    )
    torch_threads: int | None = option(
        None, "compute threads per replica, torch's and ONNX Runtime's (default: cpus_per_actor)"
    )
    forward: Literal["auto", "ort", "eager"] = option(
        "auto",
        "the encoder forward: 'ort' runs it in ONNX Runtime, one call a batch that does not hand the GIL back and "
        "forth with Serve's event loops (exported once per backbone into onnx_cache); 'eager' runs torch op by op; "
        "'auto': ort on CPU, eager on CUDA (gpus_per_actor > 0; untested: no GPU on the dev machine)",
    )
    onnx_cache: str | None = option(
        None,
        "directory of exported encoder graphs, one per backbone and adapter width b, each verified by a key over "
        "its config and weights (a replica that finds one starts without exporting); default env "
        "XPEFT_ONNX_CACHE, else ~/.cache/xpeft/onnx",
    )
    switch_interval_s: float = option(
        0.001,
        "the replica's sys.setswitchinterval: how long Python code may hold the GIL while the forward waits for it "
        "(Python's default is 0.005; 0.001 makes the ORT forward's one handoff a batch ~1 ms)",
    )
    max_ongoing_requests: int = option(
        64,
        "/v1 requests a replica works on at once (Serve's default of 5 would starve batching); more wait in its "
        "queue (max_queued_requests)",
    )
    max_queued_requests: int = option(
        256,
        "/v1 requests that may wait for one of max_ongoing_requests; beyond, a JSON 503 with Retry-After at once "
        "(/healthz never waits in this queue)",
    )
    max_batch_size: int = option(32, "rows (texts) per encoder forward, gathered across requests and profiles")
    batch_wait_s: float = option(
        0.0,
        "how long an idle replica waits for more rows after the first before it starts a forward; 0: a lone "
        "request starts at once (rows that arrive during a forward form the next one anyway)",
        renamed_from=("batch_wait_timeout_s",),
    )
    cache_size: int = option(256, "combined profiles kept per replica (LRU); ~0.9 MB each for MiniLM at N=100, b=48")
    record_cache_mb: float = option(
        512.0,
        "stored profile records (mask bits, LN, head: ~25 KB each for MiniLM with a 15-class linear head) kept in "
        "memory per replica (LRU), filled on every read and, with --preload, from the store in the background when "
        "the replica starts; a profile among them is combined without touching the store. 0: read the store on "
        "every miss of the combined cache",
    )
    preload: bool = option(
        True,
        "fill the record cache in the background at start, newest parts of the store first, until record_cache_mb "
        "is full (the replica serves meanwhile)",
    )
    staleness_s: float = option(
        1.0,
        "how stale a replica's view of the store may be: it re-reads the store's latest version this often, so a "
        "new, refit or deleted profile is served as such within about this (plus one refresh, tens of ms)",
    )
    # --- limits: each refusal names its limit ---
    max_texts: int = option(64, "texts per request (413 above)")
    max_text_chars: int = option(10_000, "characters per text or text pair (413 above)")
    max_body_bytes: int = option(2 * 2**20, "request body bytes (413 above)")
    body_timeout_s: float = option(
        10.0, "seconds a request's whole body may take to arrive (408 after): a slow client is cut off"
    )
    max_length: int = option(128, "tokens per text after truncation (the fit loop's)")
    max_page: int = option(500, "profiles per GET /v1/profiles page (413 above)")
    # --- fits on demand (POST /v1/profiles/{id}/fit; xpeft.serve.fits) ---
    fit_workers: int = option(
        1,
        "fit workers beside the replicas (Ray actors with CPUs of their own, so fits never take a replica's); each "
        "fits one profile at a time with the store's recipe; started by the first fit. 0: the server fits nothing "
        "(POST .../fit answers 409)",
    )
    fit_cpus_per_actor: float = option(1.0, "CPUs each fit worker reserves (and its torch threads, at least 1)")
    max_queued_fits: int = option(8, "fit jobs queued or running at once; beyond, 429 with Retry-After")
    fit_retries: int = option(2, "times a fit whose worker died (or whose server stopped) is retried, then failed")
    max_fit_examples: int = option(2000, "examples per fit request (413 above): a bigger profile is the farm's job")
    max_fit_epochs: int = option(50, "the most epochs a fit request may ask for (422 above)")
    api_token: str | None = option(
        factory=lambda: os.environ.get("XPEFT_API_TOKEN") or None,
        secret=True,
        help="bearer token for /v1/* (401 without it); default env XPEFT_API_TOKEN; None: no auth",
        no_flag=True,  # never on a command line, where `ps` shows it
    )

    def __post_init__(self) -> None:
        if not self.store:
            raise ValueError("ServeConfig needs a profile store: pass store=... (or set XPEFT_STORE)")
        positive = (
            "num_replicas",
            "max_ongoing_requests",
            "max_queued_requests",
            "max_batch_size",
            "cache_size",
            "max_texts",
            "max_text_chars",
            "max_body_bytes",
            "max_length",
            "max_page",
            "max_queued_fits",
            "max_fit_examples",
            "max_fit_epochs",
        )
        bad = [f"{k}={getattr(self, k)}" for k in positive if getattr(self, k) < 1]
        at_least_0 = ("cpus_per_actor", "gpus_per_actor", "batch_wait_s", "record_cache_mb", "bank_cache_mb")
        if min(getattr(self, k) for k in at_least_0) < 0:
            bad.append(f"{', '.join(at_least_0)} must be >= 0")
        if min(self.fit_workers, self.fit_retries, self.fit_cpus_per_actor) < 0:
            bad.append("fit_workers, fit_retries and fit_cpus_per_actor must be >= 0")
        if self.forward not in ("auto", "ort", "eager"):
            bad.append(f"forward={self.forward!r} must be 'auto', 'ort' or 'eager'")
        if not 0 < self.switch_interval_s <= 1:
            bad.append(f"switch_interval_s={self.switch_interval_s} must be in (0, 1] seconds")
        if not self.staleness_s > 0:
            bad.append(f"staleness_s={self.staleness_s} must be > 0")
        if not self.body_timeout_s > 0:
            bad.append(f"body_timeout_s={self.body_timeout_s} must be > 0")
        if bad:
            raise ValueError(f"invalid ServeConfig: {', '.join(bad)} (counts and limits must be >= 1)")
