"""The Ray Serve deployment: every stored profile behind one HTTP endpoint, over one shared backbone and bank.

    serve run xpeft.serve.deployment:app_builder store=runs/news backbone=minilm
    XPEFT_STORE=runs/news serve run xpeft.serve.deployment:app
    python ray_jobs/serve.py --store runs/news --port 8000

Each replica holds one `ProfileEngine` (xpeft.serve.engine) behind two queues (`Coalescer`) that gather
concurrent requests of any profiles: one combines the profiles missing from the cache in one contraction over
the bank, the other runs each text of each request as a row of one mixed-profile forward. The HTTP app is
xpeft.serve.api's. Scale and limits are the fields of `ServeConfig`; on a 2-core machine keep `num_cpus` at 1
(the default): each replica reserves its CPUs, and one that cannot be placed never starts.

A replica gets requests once its engine is built (the store's index, the bank, the backbone, the forward), as
Serve does it; meanwhile it publishes what it is loading (`xpeft.serve.proxy.publish_start`: Ray's internal
key-value store), and the Serve proxy answers /healthz with 503 "starting" and that. Serve's own limit on a replica's
requests is set above the app's queue (xpeft.serve.limits.RequestQueue), so /healthz always reaches the replica.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import sys
import time
from typing import Any

import torch
from fastapi import FastAPI
from ray import serve

from xpeft.core.multiprofile import CombinedProfile
from xpeft.serve.api import make_api
from xpeft.serve.config import ServeConfig
from xpeft.serve.engine import ProfileEngine, ServeError
from xpeft.serve.local import LocalServer
from xpeft.serve.proxy import clear_starts, publish_start

log = logging.getLogger(__name__)

HEALTH_SLOTS = 16  # Serve's limit on a replica's requests, above the app's own queue: room for /healthz and docs


class Coalescer:
    """Runs `work(items)` in a worker thread, one call at a time, over everything waiting when the previous
    call ends (at most `max_items`): under load the batch is as large as the backlog, which is what amortises
    a forward (and a bank contraction) over many rows, and a lone call starts at once.

    This replaced `@serve.batch`, which holds even a lone request for `batch_wait_timeout_s` and closes a
    batch after it while the previous one still runs (so under load it queued many small batches that had to
    be merged here anyway). With `wait_s` > 0 a call that finds the queue idle waits that long for company.
    Work started for a caller that goes away still finishes for the others waiting on it."""

    def __init__(self, work, max_items: int, wait_s: float = 0.0):
        self.work = work
        self.max_items = max_items
        self.wait_s = wait_s
        self._pending: list[tuple[Any, asyncio.Future]] = []
        self._lock = asyncio.Lock()

    async def __call__(self, items: list) -> list:
        loop = asyncio.get_running_loop()
        mine = [loop.create_future() for _ in items]
        self._pending.extend(zip(items, mine, strict=True))
        idle = not self._lock.locked()
        async with self._lock:
            if idle and self.wait_s > 0 and len(self._pending) < self.max_items:
                await asyncio.sleep(self.wait_s)
            while self._pending and not all(f.done() for f in mine):
                take = self._pending[: self.max_items]
                del self._pending[: len(take)]
                await asyncio.shield(asyncio.ensure_future(self._run(take)))
        return list(await asyncio.gather(*mine))

    async def _run(self, take: list[tuple[Any, asyncio.Future]]) -> None:
        try:
            results = await asyncio.to_thread(self.work, [item for item, _ in take])
        except Exception as e:
            for _, f in take:
                if not f.done():
                    f.set_exception(e)
            return
        for (_, f), result in zip(take, results, strict=True):
            if not f.done():
                f.set_result(result)


@serve.deployment
@serve.ingress()
class ProfileServer(LocalServer):
    """One replica: a `ProfileEngine` behind two batch queues and the FastAPI app of `make_api`. Its
    `classify` is LocalServer's (the same checks), its two steps go through the queues."""

    def __init__(self, cfg: ServeConfig):
        # The event loops' Python then yields the GIL to a forward waiting for it within ~1 ms, not 5.
        sys.setswitchinterval(cfg.switch_interval_s)
        ctx = serve.get_replica_context()
        key, since = f"{ctx.app_name}/{ctx.replica_tag}", time.time()
        try:
            engine = ProfileEngine(cfg, step=lambda what: publish_start(key, ctx.app_name, since, what))
        except Exception as e:
            publish_start(key, ctx.app_name, since, failed=f"{type(e).__name__}: {str(e).splitlines()[0][:300]}")
            raise
        super().__init__(cfg, engine)
        engine.start()  # it keeps up with the store and, with cfg.preload, preloads
        self._combine_work = Coalescer(engine.load_profiles, cfg.max_batch_size, cfg.batch_wait_timeout_s)
        self._forward_work = Coalescer(engine.forward, cfg.max_batch_size, cfg.batch_wait_timeout_s)
        clear_starts(ctx.app_name)  # ready: what this app's replicas said while starting is past (a killed one's too)

    def __serve_build_asgi_app__(self) -> FastAPI:
        # The app needs this replica's state (its engine, config and batch queues), so it is built per replica,
        # after __init__: `@serve.ingress()` without an app and this method, as serve.ingress documents it in
        # Ray 2.60 ("defer the app to replica init time"). A module-level FastAPI app (the class-based-view
        # form) could not carry each deployment's own limits, auth token and middleware.
        return make_api(self)

    async def combined(self, profile_id: str) -> CombinedProfile:
        """From the cache, else through the batch queue that combines every profile requests are waiting for."""
        c = self.engine.cached(profile_id) or await self._combine(profile_id)  # the served version only
        if isinstance(c, ServeError):
            raise c
        return c

    async def logits(self, c: CombinedProfile, rows: list[dict]) -> list[torch.Tensor]:
        """Each row through the batch queue of the mixed-profile forward."""
        return list(await asyncio.gather(*(self._forward((c, row)) for row in rows)))

    async def _combine(self, profile_id: str) -> CombinedProfile | ServeError:
        """A profile missing from the cache, with the others waiting now: one bank contraction."""
        (combined,) = await self._combine_work([profile_id])
        return combined

    async def _forward(self, item: tuple[CombinedProfile, dict]) -> torch.Tensor:
        """A row, with the rows of every request of every profile waiting now: one encoder forward."""
        (logits,) = await self._forward_work([item])
        return logits


def build_app(cfg: ServeConfig) -> serve.Application:
    """The Serve application for `cfg`: `serve.run(build_app(cfg))`."""
    return ProfileServer.options(
        num_replicas=cfg.num_replicas,
        max_ongoing_requests=cfg.max_ongoing_requests + cfg.max_queued_requests + HEALTH_SLOTS,
        ray_actor_options={"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus},
    ).bind(cfg)


def app_builder(args: dict[str, str]) -> serve.Application:
    """`serve run xpeft.serve.deployment:app_builder store=runs/x num_cpus=1 ...`: settings from the arguments, then
    from env vars XPEFT_<SETTING> (XPEFT_STORE, XPEFT_BACKBONE, ...); the token only from XPEFT_API_TOKEN."""
    names = [f.name for f in dataclasses.fields(ServeConfig) if f.name != "api_token"]
    values = {n: os.environ[f"XPEFT_{n.upper()}"] for n in names if os.environ.get(f"XPEFT_{n.upper()}")}
    values.update(args)
    if "store" not in values:
        raise ValueError("no profile store: pass store=... to `serve run` or set XPEFT_STORE")
    return build_app(ServeConfig.from_strings(values))


# `serve run xpeft.serve.deployment:app` (settings from XPEFT_* env vars); a builder, so importing builds nothing.
app = app_builder
