"""The Ray Serve deployment: every stored profile behind one HTTP endpoint, over one shared backbone and bank.

    serve run xpeft.serve.deployment:app_builder store=runs/news backbone=minilm
    XPEFT_STORE=runs/news serve run xpeft.serve.deployment:app
    python ray_jobs/serve.py --store runs/news --port 8000

Each replica is a `LocalServer` (xpeft.serve.local) with its two steps queued (`Coalescer`), gathering
concurrent requests of any profiles: one combines the profiles missing from the cache in one contraction over
the bank, the other runs the texts of every waiting request as rows of one mixed-profile forward. The HTTP app is
xpeft.serve.api's. Scale and limits are the fields of `ServeConfig`; on a 2-core machine keep `cpus_per_actor` at 1
(the default): each replica reserves its CPUs, and one that cannot be placed never starts.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys

from fastapi import FastAPI
from ray import serve

from xpeft.flags import from_strings, renamed_fields
from xpeft.serve.api import make_api
from xpeft.serve.config import ServeConfig
from xpeft.serve.local import LocalServer

log = logging.getLogger(__name__)


@serve.deployment
@serve.ingress()
class ProfileServer(LocalServer):
    """One replica: a `ProfileEngine` behind two batch queues and the FastAPI app of `make_api`. Its
    `classify` is LocalServer's (the same checks, one call per step for a request's rows), its two steps go
    through the queues."""

    def __init__(self, cfg: ServeConfig):
        # The event loops' Python then yields the GIL to a forward waiting for it within ~1 ms, not 5.
        sys.setswitchinterval(cfg.switch_interval_s)
        # Its engine started (it keeps up with the store and, with cfg.preload, preloads), its two steps queued.
        super().__init__(cfg, queued=True)

    def __serve_build_asgi_app__(self) -> FastAPI:
        # The app needs this replica's state (its engine, config and batch queues), so it is built per replica,
        # after __init__: `@serve.ingress()` without an app and this method, as serve.ingress documents it in
        # Ray 2.60 ("defer the app to replica init time"). A module-level FastAPI app (the class-based-view
        # form) could not carry each deployment's own limits, auth token and middleware.
        return make_api(self)


def build_app(cfg: ServeConfig) -> serve.Application:
    """The Serve application for `cfg`: `serve.run(build_app(cfg))`."""
    return ProfileServer.options(
        num_replicas=cfg.num_replicas,
        max_ongoing_requests=cfg.max_ongoing_requests,
        ray_actor_options={"num_cpus": cfg.cpus_per_actor, "num_gpus": cfg.gpus_per_actor},
    ).bind(cfg)


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
