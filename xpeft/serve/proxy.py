"""What the Serve proxy does before and after a replica: it reads each request's body whole, within a time limit,
before Serve picks a replica; it answers /healthz within a deadline, and "starting" before the app is deployed;
and a request no replica answered gets a JSON 503 with Retry-After.

A body is streamed from the proxy to the replica as the replica's app reads it (Serve 2.60's proxy puts each ASGI
`receive` message on a queue the replica pulls from, `proxy_asgi_receive` in ray/serve/_private/proxy.py), so a
client that sends its headers and half a body holds one of the replica's `max_ongoing_requests` slots for as long
as it likes: 66 such connections locked every client out. `BodyLimits` here reads the body in the proxy first
(xpeft.serve.limits; 408 when it has not all arrived within XPEFT_BODY_TIMEOUT_S, 413 over
XPEFT_MAX_BODY_BYTES), so a slow client holds a proxy connection (an idle coroutine) and never a replica slot.
Serve's `HTTPOptions.request_timeout_s` does not help: it times the replica's answer, after the body.

When a replica dies with requests in flight (killed, out of memory, its node lost), Ray Serve 2.60's HTTP
proxy catches the RayActorError, maps it to a 500 and, since it only writes a body for 408, 429 and 503
(`send_http_response_on_exception` in ray/serve/_private/http_util.py), returns from the ASGI call without
a response; uvicorn then sends its own plain-text "500 Internal Server Error". Nothing in the replica's app
can change that (the replica is gone), and Serve's `HTTPOptions.middlewares` was removed; the one hook left
is the proxy callback, an env var the proxy reads when it starts:

    RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=xpeft.serve.proxy:middlewares

`install(cfg)` sets it, and the body limits from the ServeConfig, for an embedded Ray (before `ray.init`, so the
proxy inherits them); on a cluster set them where Ray starts (`ray start`, the head's environment). It also gives
a starting proxy 60 s instead of Serve's 5 to answer its ready check (READY_TIMEOUT_ENV): on a busy 2-core
machine a new proxy process can take longer than 5 s to start, and Serve then kills it while `serve.start` waits
on it, which fails the start with "ActorDiedError: ... killed by `ray.kill`" (seen in the test suite beside a
long fit). This module imports only Starlette: the proxy loads no torch.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time

from starlette.middleware import Middleware

from xpeft.serve.limits import RETRY_AFTER_S, BodyLimits, route_path, send_json

log = logging.getLogger(__name__)

CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
CALLBACK = "xpeft.serve.proxy:middlewares"
READY_TIMEOUT_ENV, READY_TIMEOUT_S = "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "60"  # read by Serve's controller
# The proxy's limits, read from the environment when it starts (`install` sets them from a ServeConfig).
# The first two are ServeConfig's body_timeout_s and max_body_bytes as env vars (app_builder reads them too).
BODY_TIMEOUT_ENV, MAX_BODY_ENV = "XPEFT_BODY_TIMEOUT_S", "XPEFT_MAX_BODY_BYTES"
HEALTH_DEADLINE_ENV = "XPEFT_HEALTH_DEADLINE_S"
DEFAULTS = {BODY_TIMEOUT_ENV: "10", MAX_BODY_ENV: str(16 * 2**20), HEALTH_DEADLINE_ENV: "2"}


def setting(name: str) -> float:
    return float(os.environ.get(name) or DEFAULTS[name])


class UnansweredIs503:
    """ASGI middleware: an HTTP request the app returns from (or fails) without starting a response gets
    a JSON 503 with Retry-After instead of the server's plain-text 500."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracked(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception:
            if started:
                raise
            log.exception("no response from a replica for %s", scope.get("path"))
        if not started:
            await unavailable(send)


async def unavailable(send) -> None:
    detail = (
        "no replica answered this request (it died or is restarting; Serve starts another): retry it after "
        f"{RETRY_AFTER_S} s (Serve sends it to another replica, or holds it until the new one is up)"
    )
    body = json.dumps({"detail": detail}).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"retry-after", str(RETRY_AFTER_S).encode()),
    ]
    try:
        await send({"type": "http.response.start", "status": 503, "headers": headers})
        await send({"type": "http.response.body", "body": body})
    except Exception:  # the client went away too: nobody to tell
        log.debug("client gone before the 503 could be sent", exc_info=True)


# --- what starting replicas load (Ray's internal key-value store; Ray is imported only where it runs) ---

STARTING = ("xpeft", "starting/")  # the namespace and key prefix where starting replicas say what they load


def publish_start(key: str, app: str, since: float, what: str | None = None, failed: str | None = None) -> None:
    """What a starting replica loads now (xpeft.serve.proxy reads it for /healthz); best effort."""
    try:
        from ray.experimental import internal_kv

        value = {"app": app, "waiting_for": what, "since": since, "failed": failed}
        internal_kv._internal_kv_put(STARTING[1] + key, json.dumps(value), namespace=STARTING[0])
    except Exception:  # noqa: BLE001 - a health detail, never a reason not to start
        log.debug("could not publish the replica's start", exc_info=True)


def published_starts() -> list[dict]:
    """What starting replicas said they load (each {"app", "waiting_for", "since", "failed"})."""
    from ray.experimental import internal_kv

    ns, prefix = STARTING
    found = []
    for key in internal_kv._internal_kv_list(prefix, namespace=ns):
        value = internal_kv._internal_kv_get(key, namespace=ns)
        if value:
            found.append(json.loads(value))
    return found


def clear_starts(app: str) -> None:
    """A replica of `app` is ready: what its replicas said while starting is past (a killed one's too)."""
    try:
        from ray.experimental import internal_kv

        internal_kv._internal_kv_del(f"{STARTING[1]}{app}/", del_by_prefix=True, namespace=STARTING[0])
    except Exception:  # noqa: BLE001
        log.debug("could not clear the replicas' start", exc_info=True)


class HealthWithin:
    """GET .../healthz answered within `deadline_s`: a JSON 503 with Retry-After when no replica answers by then
    (it is starting, restarting or overloaded), and 503 "starting" instead of the proxy's plain 404 when no
    application serves the path yet (the server is starting)."""

    def __init__(self, app, deadline_s: float):
        self.app, self.deadline_s = app, deadline_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") != "GET" or not route_path(scope).endswith("/healthz"):
            return await self.app(scope, receive, send)
        started, no_route, abandoned = asyncio.Event(), [], []

        async def watched(message):
            if abandoned:  # answered here already (Serve's proxy answers its own cancellation with nothing, too)
                return
            if message["type"] == "http.response.start":
                started.set()
                ctype = dict(message.get("headers") or []).get(b"content-type", b"")
                if message["status"] == 404 and not ctype.startswith(b"application/json"):
                    no_route.append(message)  # the proxy's own "Path not found": held back
                    return
            if not no_route:
                await send(message)

        task = asyncio.ensure_future(self.app(scope, receive, watched))
        waiter = asyncio.ensure_future(started.wait())
        await asyncio.wait({task, waiter}, timeout=self.deadline_s, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        if not started.is_set() and not task.done():
            abandoned.append(True)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            return await send_json(send, 503, await self.unanswered(), RETRY_AFTER)
        await task
        if no_route:
            detail = (
                f"no application serves {scope.get('path')} yet: the server is starting (if it stays so, check the "
                "route prefix: GET /-/routes lists the deployed ones)"
            )
            await send_json(send, 503, {"status": "starting", "detail": detail}, RETRY_AFTER)

    async def unanswered(self) -> dict:
        """What /healthz says when no replica answered in time: what starting replicas wait for, if any do."""
        try:
            starts = await asyncio.get_running_loop().run_in_executor(None, published_starts)
        except Exception:  # noqa: BLE001 - Ray's key-value store unreachable: say what is known
            starts = []
        now = time.time()
        said = [
            f"app {s['app']!r}: a replica failed to start ({s['failed']}); Serve starts another"
            if s.get("failed")
            else f"app {s['app']!r}: waiting for {s['waiting_for']} ({now - s['since']:.0f} s so far)"
            for s in sorted(starts, key=lambda s: s["since"])
        ]
        if said:
            return {"status": "starting", "detail": "; ".join(said)}
        detail = (
            f"no replica answered within {self.deadline_s:g} s ({HEALTH_DEADLINE_ENV}): it is starting, restarting or "
            f"overloaded; retry after {RETRY_AFTER_S} s"
        )
        return {"status": "unavailable", "detail": detail}


RETRY_AFTER = [(b"retry-after", str(RETRY_AFTER_S).encode())]


def middlewares() -> list[Middleware]:
    """The proxy callback (CALLBACK): the middlewares Serve wraps its HTTP proxy in (the last one outermost)."""
    body = {
        "max_bytes": int(setting(MAX_BODY_ENV)),
        "timeout_s": setting(BODY_TIMEOUT_ENV),
        "size_limit": f"{MAX_BODY_ENV} of the Serve proxy",
        "time_limit": f"{BODY_TIMEOUT_ENV} of the Serve proxy",
    }
    return [
        Middleware(UnansweredIs503),
        Middleware(HealthWithin, deadline_s=setting(HEALTH_DEADLINE_ENV)),
        Middleware(BodyLimits, **body),
    ]


def proxy_env(cfg=None) -> dict[str, str]:
    """The environment a Serve proxy reads when it starts: these middlewares (CALLBACK), 60 s to be ready, and the
    body limits of `cfg` (a ServeConfig) when given."""
    env = {CALLBACK_ENV: CALLBACK, READY_TIMEOUT_ENV: READY_TIMEOUT_S}
    if cfg is not None:
        env |= {BODY_TIMEOUT_ENV: str(cfg.body_timeout_s), MAX_BODY_ENV: str(cfg.max_body_bytes)}
    return env


def install(cfg=None) -> None:
    """Have the Serve proxies that a Ray started after this call starts use these middlewares (an embedded Ray:
    call before ray.init), with the body limits of `cfg` (a ServeConfig). A setting already made is kept."""
    for name, value in proxy_env(cfg).items():
        os.environ.setdefault(name, value)
