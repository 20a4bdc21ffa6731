"""The profile server in one process, without Ray: what a replica does for a classify request (the API's checks,
the profile from the cache or the store, the tokens, one forward) over a `ProfileEngine`. For scoring from
Python, notebooks and tests, and the HTTP API without Serve:

    server = LocalServer(ServeConfig(store="runs/demo"))
    asyncio.run(server.classify(ClassifyRequest(profile_id="p1", texts=["..."])))
    make_api(server)                          # the same FastAPI app a Serve replica has (uvicorn can run it)

Its fits on demand (`fit`, `job`) run in its own threads (xpeft.serve.fits.FitJobs); a Serve replica asks the
deployment's fit service instead.

The Serve deployment (xpeft.serve.deployment.ProfileServer) is this class with `queued=True`: its two steps,
reading and combining profiles and the forward, go through batch queues (`Coalescer`) that gather concurrent
requests. One path, the same checks.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

from xpeft.core.multiprofile import CombinedProfile
from xpeft.serve.api import ClassifyRequest, check_inputs, checked_request
from xpeft.serve.config import ServeConfig
from xpeft.serve.engine import ProfileEngine, ServeError, predictions
from xpeft.serve.fits import FitJobs

Step = Callable[[list], Awaitable[list]]  # a list of work items in, one result (or ServeError) per item out


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


class LocalServer:
    """`classify(request)` over one engine. Its two steps take lists (profiles to read and combine, rows to
    forward), a request's rows in one call; they run in worker threads, or `queued` through a `Coalescer` each
    (what a Serve replica does)."""

    def __init__(
        self, cfg: ServeConfig, engine: ProfileEngine | None = None, queued: bool = False, jobs: FitJobs | None = None
    ):
        self.cfg = cfg
        # A replica (queued) asks the deployment's fit service; in process, the fits run here (or in `jobs`).
        self.jobs = jobs if jobs is not None or queued else FitJobs(cfg)
        if engine is None:  # its own engine keeps up with the store (cfg.staleness_s) as a replica's does
            engine = ProfileEngine(cfg)
            engine.start()
        self.engine = engine
        self.load_profiles: Step
        self.forward: Step
        if queued:  # a replica's: the profiles missing from the cache of every waiting request meet the bank in
            # one contraction, the rows of every waiting request of every profile go through one forward
            self.load_profiles = Coalescer(engine.load_profiles, cfg.max_batch_size, cfg.batch_wait_s)
            self.forward = Coalescer(engine.forward, cfg.max_batch_size, cfg.batch_wait_s)
        else:
            self.load_profiles = partial(asyncio.to_thread, engine.load_profiles)
            self.forward = partial(asyncio.to_thread, engine.forward)

    async def classify(self, request: ClassifyRequest) -> dict[str, Any]:
        """The predictions for `request`, or a ServeError naming what is wrong with it (the HTTP status)."""
        profile_id = checked_request(self.cfg, request)
        texts, pairs = request.texts, request.text_pairs
        # The profile is read and combined while the texts are tokenized.
        combined, rows = await asyncio.gather(
            self.combined(profile_id), asyncio.to_thread(self.engine.tokenize, texts, pairs)
        )
        check_inputs(combined, request, rows, self.engine.tokenizer.num_special_tokens_to_add(pair=pairs is not None))
        logits = await self.forward([(combined, row) for row in rows])
        return {"profile_id": profile_id, "predictions": predictions(combined, logits)}

    async def fit(self, profile_id: str, request: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        """(the fit job, whether it is new) for `request`'s examples; a ServeError naming what is wrong."""
        return await asyncio.to_thread(self.jobs.submit, profile_id, request)

    async def job(self, job_id: str) -> dict[str, Any]:
        return await asyncio.to_thread(self.jobs.job, job_id)

    async def combined(self, profile_id: str) -> CombinedProfile:
        """The profile ready to serve: from the cache, else read from the store and combined with the bank."""
        c = self.engine.cached(profile_id)  # only for the version the store serves now
        if c is None:
            (c,) = await self.load_profiles([profile_id])
        if isinstance(c, ServeError):
            raise c
        return c
