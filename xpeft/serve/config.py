"""How the profile server is deployed: `ServeConfig`, every field with its help, settable from `serve run ...
key=value`, env vars XPEFT_<KEY> or `ray_jobs/serve.py --key`."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass
class ServeConfig:
    """How the profile server is deployed. Every field can be set from `serve run ... key=value` or an env
    var XPEFT_<KEY> (see `app_builder`)."""

    store: str = field(metadata={"help": "the profile store: a directory or a URI (s3://…)"})
    backbone: str = field(default="minilm", metadata={"help": "'minilm' (bundled all-MiniLM-L6-v2) or a model dir"})
    bank_path: str | None = field(
        default=None, metadata={"help": "a bank file (safetensors) instead of the store's", "flag": "--bank"}
    )
    bank_fingerprint: str | None = field(
        default=None, metadata={"help": "which of the store's banks (a prefix will do); default: the only one"}
    )
    # --- scale ---
    num_replicas: int = field(
        default=1, metadata={"help": "replicas, each with its own backbone, bank and cache", "flag": "--replicas"}
    )
    num_cpus: float = field(
        default=1.0,
        metadata={
            "help": "CPUs reserved per replica (Serve's default is 1 too): on 2 cores, 1 leaves one for the proxy; a "
            "replica that cannot be placed never starts"
        },
    )
    num_gpus: float = field(
        default=0.0,
        metadata={"help": "GPUs per replica; > 0 runs the forward on cuda (untested: no GPU on the dev machine)"},
    )
    torch_threads: int | None = field(
        default=None,
        metadata={"help": "compute threads per replica, torch's and ONNX Runtime's (default: num_cpus)"},
    )
    forward: Literal["auto", "ort", "eager"] = field(
        default="auto",
        metadata={
            "help": "the encoder forward: 'ort' runs it in ONNX Runtime, one call a batch that does not hand the GIL "
            "back and forth with Serve's event loops (exported once per backbone into onnx_cache); 'eager' runs "
            "torch op by op; 'auto': ort on CPU, eager on CUDA (num_gpus > 0; untested: no GPU on the dev machine)"
        },
    )
    onnx_cache: str | None = field(
        default=None,
        metadata={
            "help": "directory of exported encoder graphs, one per backbone and adapter width b, each verified by a "
            "key over its config and weights (a replica that finds one starts without exporting); default env "
            "XPEFT_ONNX_CACHE, else ~/.cache/xpeft/onnx"
        },
    )
    switch_interval_s: float = field(
        default=0.001,
        metadata={
            "help": "the replica's sys.setswitchinterval: how long Python code may hold the GIL while the forward "
            "waits for it (Python's default is 0.005; 0.001 makes the ORT forward's one handoff a batch ~1 ms)"
        },
    )
    max_ongoing_requests: int = field(
        default=64,
        metadata={
            "help": "/v1 requests a replica works on at once (Serve's default of 5 would starve batching); more "
            "wait in its queue (max_queued_requests)"
        },
    )
    max_queued_requests: int = field(
        default=256,
        metadata={
            "help": "/v1 requests that may wait for one of max_ongoing_requests; beyond, a JSON 503 with Retry-After "
            "at once (/healthz never waits in this queue)"
        },
    )
    max_batch_size: int = field(
        default=32, metadata={"help": "rows (texts) per encoder forward, gathered across requests and profiles"}
    )
    batch_wait_timeout_s: float = field(
        default=0.0,
        metadata={
            "help": "how long an idle replica waits for more rows after the first before it starts a forward; 0: a "
            "lone request starts at once (rows that arrive during a forward form the next one anyway)"
        },
    )
    cache_size: int = field(
        default=256,
        metadata={"help": "combined profiles kept per replica (LRU); ~0.9 MB each for MiniLM at N=100, b=48"},
    )
    record_cache_mb: float = field(
        default=512.0,
        metadata={
            "help": "stored profile records (mask bits, LN, head: ~25 KB each for MiniLM with a 15-class linear "
            "head) kept in memory per replica (LRU), filled on every read and, with --preload, from the store in the "
            "background when the replica starts; a profile among them is combined without touching the store. "
            "0: read the store on every miss of the combined cache"
        },
    )
    preload: bool = field(
        default=True,
        metadata={
            "help": "fill the record cache in the background at start, newest parts of the store first, until "
            "record_cache_mb is full (the replica serves meanwhile)"
        },
    )
    staleness_s: float = field(
        default=1.0,
        metadata={
            "help": "how stale a replica's view of the store may be: it re-reads the store's latest version this "
            "often, so a new, refit or deleted profile is served as such within about this (plus one refresh, "
            "tens of ms)"
        },
    )
    # --- limits: each refusal names its limit ---
    max_texts: int = field(default=64, metadata={"help": "texts per request (413 above)"})
    max_text_chars: int = field(default=10_000, metadata={"help": "characters per text or text pair (413 above)"})
    max_body_bytes: int = field(default=2 * 2**20, metadata={"help": "request body bytes (413 above)"})
    body_timeout_s: float = field(
        default=10.0,
        metadata={"help": "seconds a request's whole body may take to arrive (408 after): a slow client is cut off"},
    )
    max_length: int = field(default=128, metadata={"help": "tokens per text after truncation (the fit loop's)"})
    max_page: int = field(default=500, metadata={"help": "profiles per GET /v1/profiles page (413 above)"})
    api_token: str | None = field(
        default_factory=lambda: os.environ.get("XPEFT_API_TOKEN") or None,
        repr=False,
        metadata={
            "help": "bearer token for /v1/* (401 without it); default env XPEFT_API_TOKEN; None: no auth",
            "no_flag": True,  # never on a command line, where `ps` shows it
        },
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
        )
        bad = [f"{k}={getattr(self, k)}" for k in positive if getattr(self, k) < 1]
        if min(self.num_cpus, self.num_gpus, self.batch_wait_timeout_s, self.record_cache_mb) < 0:
            bad.append("num_cpus, num_gpus, batch_wait_timeout_s and record_cache_mb must be >= 0")
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

    @classmethod
    def from_strings(cls, values: dict[str, str]) -> ServeConfig:
        """A config from string values (`serve run` arguments, env vars), converted by each field's type."""
        fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "api_token"}
        unknown = set(values) - set(fields)
        if unknown:
            raise ValueError(f"unknown serve settings {sorted(unknown)}; known: {sorted(fields)}")
        kwargs: dict[str, Any] = {}
        for name, raw in values.items():
            default = fields[name].default
            kind = type(default) if default not in (None, dataclasses.MISSING) else str
            if name == "torch_threads":
                kind = int
            if kind is bool:  # bool("false") is True
                if raw.lower() not in ("1", "0", "true", "false", "yes", "no"):
                    raise ValueError(f"serve setting {name}={raw!r} is not a valid bool (true or false)")
                kwargs[name] = raw.lower() in ("1", "true", "yes")
                continue
            try:
                kwargs[name] = kind(raw)
            except ValueError:
                raise ValueError(f"serve setting {name}={raw!r} is not a valid {kind.__name__}") from None
        return cls(**kwargs)
