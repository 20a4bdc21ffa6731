"""The Ray Serve deployment: every stored profile behind one HTTP endpoint, over one shared backbone and bank.

    serve run xpeft.serve.deployment:app_builder store=runs/news backbone=minilm
    XPEFT_STORE=runs/news serve run xpeft.serve.deployment:app
    python ray_jobs/serve.py --store runs/news --port 8000

Each replica is a `LocalServer` (xpeft.serve.local) with its two steps queued (`Coalescer`), gathering
concurrent requests of any profiles: one combines the profiles missing from the cache in one contraction over
the bank, the other runs the texts of every waiting request as rows of one mixed-profile forward. The HTTP app is
xpeft.serve.api's. Scale and limits are the fields of `ServeConfig`; on a 2-core machine keep `cpus_per_actor` at 1
(the default): each replica reserves its CPUs, and one that cannot be placed never starts.

A replica gets requests once its engine is built (the store's index, the bank, the backbone, the forward), as
Serve does it; meanwhile it publishes what it is loading (`xpeft.serve.proxy.publish_start`: Ray's internal
key-value store), and the Serve proxy answers /healthz with 503 "starting" and that. Serve's own limit on a replica's
requests is set above the app's queue (xpeft.serve.limits.RequestQueue), so /healthz always reaches the replica.

Fits on demand run beside the replicas, not in them: one `FitService` replica (no CPUs of its own) holds the
app's job queue (xpeft.serve.fits.FitJobs) and `fit_workers` Ray actors, the farm's (xpeft.ray.farm), each with
`fit_cpus_per_actor` CPUs reserved, over the store's bank put in the object store once. Ray restarts an actor
killed mid-fit and retries its fit (`fit_retries`); Serve restarts a FitService that dies, which takes up its
app's jobs from the store's job table.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import queue
import sys
import threading
import time
from typing import Any

import ray
from fastapi import FastAPI
from ray import serve

from xpeft.core.bank import bank_to_object
from xpeft.fit.on_demand import load_recipe
from xpeft.flags import from_strings, renamed_fields
from xpeft.profiles.store import ProfileStore
from xpeft.ray.pool import ProfileActor
from xpeft.serve.api import make_api
from xpeft.serve.config import ServeConfig
from xpeft.serve.engine import ProfileEngine, ServeError
from xpeft.serve.fits import FitJobs, WorkerDied, why_no_fits
from xpeft.serve.local import LocalServer
from xpeft.serve.proxy import clear_starts, publish_start

log = logging.getLogger(__name__)

HEALTH_SLOTS = 16  # Serve's limit on a replica's requests, above the app's own queue: room for /healthz and docs
# A stopping replica waits this long for requests routers still send it before it counts its ongoing ones (Serve's
# graceful_shutdown_wait_loop_s, 2 s by default). The FitService's only callers are its app's ProfileServers: at
# serve.shutdown Serve stops them first (it goes from the ingress down), so it has no late request to wait for,
# and a job in flight is in the store for the next one. A server stops 2 s sooner (serve.py: 6.6 s -> 4.7 s).
FITS_WAIT_LOOP_S = 0.1


@serve.deployment
@serve.ingress()
class ProfileServer(LocalServer):
    """One replica: a `ProfileEngine` behind two batch queues and the FastAPI app of `make_api`. Its
    `classify` is LocalServer's (the same checks, one call per step for a request's rows), its two steps go
    through the queues."""

    def __init__(self, cfg: ServeConfig, fits=None, no_fits: str | None = None):
        self.fits, self.no_fits = fits, no_fits  # the FitService's handle, or why there is none
        # The event loops' Python then yields the GIL to a forward waiting for it within ~1 ms, not 5.
        sys.setswitchinterval(cfg.switch_interval_s)
        ctx = serve.get_replica_context()
        key, since = f"{ctx.app_name}/{ctx.replica_tag}", time.time()
        try:
            engine = ProfileEngine(cfg, step=lambda what: publish_start(key, ctx.app_name, since, what))
        except Exception as e:
            publish_start(key, ctx.app_name, since, failed=f"{type(e).__name__}: {str(e).splitlines()[0][:300]}")
            raise
        super().__init__(cfg, engine, queued=True)  # LocalServer's classify, its two steps queued
        engine.start()  # it keeps up with the store and, with cfg.preload, preloads
        clear_starts(ctx.app_name)  # ready: what this app's replicas said while starting is past (a killed one's too)

    async def fit(self, profile_id: str, request: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        if self.fits is None:
            raise ServeError(409, self.no_fits or "this server fits no profiles")
        return answered(await self.fits.submit.remote(profile_id, request))

    async def job(self, job_id: str) -> dict[str, Any]:
        if self.fits is None:
            raise ServeError(404, f"no fit job {job_id!r}: {self.no_fits or 'this server fits no profiles'}")
        return answered(await self.fits.job.remote(job_id))

    def __serve_build_asgi_app__(self) -> FastAPI:
        # The app needs this replica's state (its engine, config and batch queues), so it is built per replica,
        # after __init__: `@serve.ingress()` without an app and this method, as serve.ingress documents it in
        # Ray 2.60 ("defer the app to replica init time"). A module-level FastAPI app (the class-based-view
        # form) could not carry each deployment's own limits, auth token and middleware.
        return make_api(self)


class FitActors:
    """The fit workers: the farm's actors (`ProfileActor`), each with its own CPUs, over the store's bank in the
    object store, started by the first fit; a fit goes to an idle one. Ray restarts an actor that dies; its fit is
    retried here, on the restarted actor, `fit_retries` times, then fails as `WorkerDied`. (Ray's own
    `max_task_retries` also spends a retry on each call that meets the actor while it restarts.)"""

    def __init__(self, cfg: ServeConfig, recipe, store):
        self.cfg, self.recipe, self.store = cfg, recipe, store
        self.retries = cfg.fit_retries
        self.bank_ref = None  # the bank in the object store, once the workers start
        self.idle: queue.Queue | None = None
        self.lock = threading.Lock()

    def workers(self) -> queue.Queue:
        """The idle workers, started by the first fit: a server never asked to fit pays for no process, backbone
        and bank beside its replicas (~6 CPU-seconds and a backbone's memory each, MiniLM on 2 cores)."""
        with self.lock:
            if self.idle is None:
                cfg, recipe, store = self.cfg, self.recipe, self.store
                # Held here: a restarted actor gets the bank from the object store again.
                self.bank_ref = ray.put(bank_to_object(store.load_bank(recipe.bank))) if recipe.bank else None
                head = store.load_head(recipe.head_id) if recipe.head_id else None
                opts = {"num_cpus": cfg.fit_cpus_per_actor, "max_restarts": -1}
                args = (recipe.backbone, max(1, int(cfg.fit_cpus_per_actor)), self.bank_ref, recipe.xpeft)
                args += (recipe.train, head, recipe.head_id, recipe.label_names)
                idle: queue.Queue = queue.Queue()
                for _ in range(cfg.fit_workers):
                    idle.put(ProfileActor.options(**opts).remote(*args))
                self.idle = idle
        return self.idle

    def fit(self, data, xcfg, tcfg) -> dict[str, Any]:
        idle = self.workers()
        actor = idle.get()
        try:
            for attempt in range(self.retries + 1):
                try:
                    return ray.get(actor.fit.remote(data, xcfg, tcfg))
                except ray.exceptions.RayActorError as e:
                    log.warning("fit worker died fitting %s (%d of %d)", data.profile_id, attempt + 1, self.retries + 1)
                    died = e
                    restarted(actor)
                except ray.exceptions.RayTaskError as e:
                    raise (e.cause if isinstance(e.cause, Exception) else e) from None
            raise WorkerDied(
                f"the fit worker died {self.retries + 1} times while fitting it ({type(died).__name__}; "
                f"ServeConfig.fit_retries={self.retries})"
            )
        finally:
            idle.put(actor)


def restarted(actor, timeout_s: float = 120.0) -> None:
    """Wait until Ray has restarted `actor` (it answers `ready`)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            ray.get(actor.ready.remote(), timeout=30)
            return
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            time.sleep(0.5)


@serve.deployment
class FitService:
    """The app's fit jobs (`FitJobs`) and workers (`FitActors`): one replica, asked by the ProfileServers."""

    def __init__(self, cfg: ServeConfig):
        owner = serve.get_replica_context().app_name  # a restarted FitService takes up its app's jobs
        self.jobs = FitJobs(cfg, owner, runner=lambda recipe, store: FitActors(cfg, recipe, store))

    async def submit(self, profile_id: str, request: dict[str, Any]) -> dict[str, Any]:
        return await refusal_or(self.jobs.submit, profile_id, request)

    async def job(self, job_id: str) -> dict[str, Any]:
        return await refusal_or(self.jobs.job, job_id)


async def refusal_or(fn, *args) -> dict[str, Any]:
    """{"answer": fn(*args)}, or its ServeError as {"status", "detail", "headers"} (it crosses the handle as data)."""
    try:
        return {"answer": await asyncio.to_thread(fn, *args)}
    except ServeError as e:
        return {"status": e.status, "detail": e.detail, "headers": e.headers}


def answered(reply: dict[str, Any]) -> Any:
    if "answer" not in reply:
        raise ServeError(reply["status"], reply["detail"], reply["headers"])
    return reply["answer"]


def build_app(cfg: ServeConfig) -> serve.Application:
    """The Serve application for `cfg`: `serve.run(build_app(cfg))`; with `fit_workers` and a store with a fit
    recipe, its FitService too (read now: a recipe written later is taken up when the app is deployed again)."""
    fits, no_fits = None, why_no_fits(cfg, load_recipe(ProfileStore(cfg.store)) if cfg.fit_workers else None)
    if not no_fits:
        opts = {"num_replicas": 1, "max_ongoing_requests": 1000, "ray_actor_options": {"num_cpus": 0},
                "graceful_shutdown_wait_loop_s": FITS_WAIT_LOOP_S}  # fmt: skip
        fits = FitService.options(**opts).bind(cfg)
    return ProfileServer.options(
        num_replicas=cfg.num_replicas,
        max_ongoing_requests=cfg.max_ongoing_requests + cfg.max_queued_requests + HEALTH_SLOTS,
        ray_actor_options={"num_cpus": cfg.cpus_per_actor, "num_gpus": cfg.gpus_per_actor},
    ).bind(cfg, fits, no_fits)


def app_builder(args: dict[str, str]) -> serve.Application:
    """`serve run xpeft.serve.deployment:app_builder store=runs/x cpus_per_actor=1 ...`: settings from the arguments,
    then from env vars XPEFT_<SETTING> (XPEFT_STORE, XPEFT_BACKBONE, ...); the token only from XPEFT_API_TOKEN. An
    old setting's name, as an argument or an env var, is refused naming the new one."""
    names = [f.name for f in dataclasses.fields(ServeConfig) if f.name != "api_token"]
    env = {n: f"XPEFT_{n.upper()}" for n in [*names, *renamed_fields(ServeConfig)] if not n.startswith("--")}
    values = {n: os.environ[var] for n, var in env.items() if os.environ.get(var)}
    values.update(args)
    if "store" not in values:
        raise ValueError("no profile store: pass store=... to `serve run` or set XPEFT_STORE")
    return build_app(from_strings(ServeConfig, values))


# `serve run xpeft.serve.deployment:app` (settings from XPEFT_* env vars); a builder, so importing builds nothing.
app = app_builder
