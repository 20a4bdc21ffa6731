"""What a client gets when no replica answers: a JSON 503 with Retry-After, from the Serve proxy.

When a replica dies with requests in flight (killed, out of memory, its node lost), Ray Serve 2.60's HTTP
proxy catches the RayActorError, maps it to a 500 and, since it only writes a body for 408, 429 and 503
(`send_http_response_on_exception` in ray/serve/_private/http_util.py), returns from the ASGI call without
a response; uvicorn then sends its own plain-text "500 Internal Server Error". Nothing in the replica's app
can change that (the replica is gone), and Serve's `HTTPOptions.middlewares` was removed; the one hook left
is the proxy callback, an env var the proxy reads when it starts:

    RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=xpeft.serve.proxy:middlewares

`install()` sets it for an embedded Ray (before `ray.init`, so the proxy inherits it); on a cluster set it
where Ray starts (`ray start`, the head's environment). This module imports only Starlette: the proxy loads
no torch.
"""

from __future__ import annotations

import json
import logging
import os

from starlette.middleware import Middleware

log = logging.getLogger(__name__)

CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
CALLBACK = "xpeft.serve.proxy:middlewares"
# Serve queues requests while it starts a new replica, so a retry need not wait for the replica itself.
RETRY_AFTER_S = 1


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


def middlewares() -> list[Middleware]:
    """The proxy callback (CALLBACK): the middlewares Serve wraps its HTTP proxy in."""
    return [Middleware(UnansweredIs503)]


def install() -> None:
    """Have the Serve proxies that a Ray started after this call starts answer unanswered requests with a
    JSON 503 (an embedded Ray: call before ray.init). A callback already set is kept."""
    os.environ.setdefault(CALLBACK_ENV, CALLBACK)
