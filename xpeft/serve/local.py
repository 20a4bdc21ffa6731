"""The profile server in one process, without Ray: what a replica does for a classify request (the API's checks,
the profile from the cache or the store, the tokens, one forward) over a `ProfileEngine`, with no batch
queues. For scoring from Python, notebooks and tests, and the HTTP API without Serve:

    server = LocalServer(ServeConfig(store="runs/demo"))
    asyncio.run(server.classify(ClassifyRequest(profile_id="p1", texts=["..."])))
    make_api(server)                          # the same FastAPI app a Serve replica has (uvicorn can run it)

The Serve deployment (xpeft.serve.deployment.ProfileServer) is this class with its two steps, reading a profile
and the forward, going through batch queues instead, so both make the same checks.
"""

from __future__ import annotations

import asyncio
from typing import Any

import torch

from xpeft.core.multiprofile import CombinedProfile
from xpeft.serve.api import ClassifyRequest, check_inputs, checked_request
from xpeft.serve.config import ServeConfig
from xpeft.serve.engine import ProfileEngine, ServeError, predictions


class LocalServer:
    """`classify(request)` over one engine, its blocking work in worker threads."""

    def __init__(self, cfg: ServeConfig, engine: ProfileEngine | None = None):
        self.cfg = cfg
        if engine is None:  # its own engine keeps up with the store (cfg.staleness_s) as a replica's does
            engine = ProfileEngine(cfg)
            engine.start()
        self.engine = engine

    async def classify(self, request: ClassifyRequest) -> dict[str, Any]:
        """The predictions for `request`, or a ServeError naming what is wrong with it (the HTTP status)."""
        profile_id = checked_request(self.cfg, request)
        texts, pairs = request.texts, request.text_pairs
        # The profile is read and combined while the texts are tokenized.
        combined, rows = await asyncio.gather(
            self.combined(profile_id), asyncio.to_thread(self.engine.tokenize, texts, pairs)
        )
        check_inputs(combined, request, rows, self.engine.tokenizer.num_special_tokens_to_add(pair=pairs is not None))
        logits = await self.logits(combined, rows)
        return {"profile_id": profile_id, "predictions": predictions(combined, logits)}

    async def combined(self, profile_id: str) -> CombinedProfile:
        """The profile ready to serve: from the cache, else read from the store and combined with the bank."""
        c = self.engine.cached(profile_id)  # only for the version the store serves now
        if c is None:
            (c,) = await asyncio.to_thread(self.engine.load_profiles, [profile_id])
        if isinstance(c, ServeError):
            raise c
        return c

    async def logits(self, c: CombinedProfile, rows: list[dict]) -> list[torch.Tensor]:
        """The logits of the request's rows: one forward."""
        return await asyncio.to_thread(self.engine.forward, [(c, row) for row in rows])
