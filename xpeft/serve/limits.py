"""What a request meets before a route sees it, as pure ASGI middlewares (no FastAPI, no Ray, no torch: the Serve
proxy loads this module too), in the order it meets them:

- `BodyLimits` in the Serve proxy (xpeft.serve.proxy): the whole body is read there, within a time limit,
  before Serve picks a replica, so a client that sends half a body and waits holds a proxy connection (cheap)
  and never one of a replica's request slots;
- `BearerAuth`: a /v1 request without the server's token is refused (401) before its body is even read;
- `BodyLimits` in the replica's app: 413 over `max_body_bytes`, 408 when the body does not arrive within
  `body_timeout_s`, 422 when its JSON nests deeper than MAX_JSON_DEPTH (json.loads would recurse until it fails);
- `RequestQueue`: at most `max_ongoing_requests` /v1 requests run at once and `max_queued_requests` more
  wait; beyond that a JSON 503 with Retry-After at once. /healthz and the docs never wait in it.

Every refusal is JSON {"detail": "<the problem>: <the fix>"}.
"""

from __future__ import annotations

import asyncio
import email.message
import hmac
import json
import re

MAX_JSON_DEPTH = 32  # a request's JSON nests 2 levels deep (an object of lists)
RETRY_AFTER_S = 1
STRINGS = re.compile(rb'"(?:[^"\\]|\\.)*"', re.S)
BRACKETS = re.compile(rb"[\[\]{}]")


async def send_json(send, status: int, body: dict, headers: list[tuple[bytes, bytes]] = ()) -> None:
    data = json.dumps(body).encode()
    start = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()), *headers]
    await send({"type": "http.response.start", "status": status, "headers": start})
    await send({"type": "http.response.body", "body": data})


def route_path(scope) -> str:
    """The request's path below the app's route prefix (Serve mounts an app at its `route_prefix`)."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


def is_json(content_type: str | None) -> bool:
    if not content_type:
        return False
    message = email.message.Message()
    message["content-type"] = content_type
    subtype = message.get_content_subtype()
    return message.get_content_maintype() == "application" and (subtype == "json" or subtype.endswith("+json"))


def too_deep(body: bytes, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether the JSON `body` nests more than `limit` arrays or objects deep (strings are not counted)."""
    if body.count(b"[") + body.count(b"{") <= limit:
        return False
    depth = 0
    for m in BRACKETS.finditer(STRINGS.sub(b'""', body)):
        depth += 1 if m.group() in (b"[", b"{") else -1
        if depth > limit:
            return True
    return False


class Refused(Exception):
    def __init__(self, status: int, detail: str, close: bool = False):
        super().__init__(detail)
        self.status, self.detail, self.close = status, detail, close

    async def send(self, send) -> None:
        await send_json(send, self.status, {"detail": self.detail}, [(b"connection", b"close")] if self.close else [])


async def read_body(receive, max_bytes: int, timeout_s: float, size_limit: str, time_limit: str) -> bytes | None:
    """The whole body, or None when the client went away; Refused 413 over `max_bytes`, 408 when it has not all
    arrived within `timeout_s` (the names of the two limits go into the messages)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    chunks, size = [], 0
    while True:
        try:
            message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
        except TimeoutError:
            raise Refused(
                408,
                f"the request body did not arrive within {timeout_s:g} s ({time_limit}): send the whole body at once",
                close=True,
            ) from None
        if message["type"] != "http.request":
            return None
        chunks.append(message.get("body", b""))
        size += len(chunks[-1])
        if size > max_bytes:
            raise Refused(413, f"request body over {max_bytes} bytes ({size_limit})", close=True)
        if not message.get("more_body", False):
            return b"".join(chunks)


def replaying(body: bytes, receive):
    """A `receive` that gives the body read already, then whatever comes next (a disconnect)."""
    replayed = False

    async def replay():
        nonlocal replayed
        if replayed:
            return await receive()
        replayed = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


class BodyLimits:
    """Reads the whole body under its limits before the app runs (see the module's docstring); `max_depth`
    (None: not checked) refuses JSON nested deeper with 422."""

    def __init__(self, app, max_bytes: int, timeout_s: float, size_limit: str, time_limit: str, max_depth=None):
        self.app, self.max_bytes, self.timeout_s = app, max_bytes, timeout_s
        self.size_limit, self.time_limit, self.max_depth = size_limit, time_limit, max_depth

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        try:
            if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
                raise Refused(413, f"request body over {self.max_bytes} bytes ({self.size_limit})", close=True)
            body = await read_body(receive, self.max_bytes, self.timeout_s, self.size_limit, self.time_limit)
            if body is None:
                return  # the client went away
            content_type = headers.get(b"content-type", b"").decode("latin-1")
            if self.max_depth is not None and is_json(content_type) and too_deep(body, self.max_depth):
                raise Refused(
                    422,
                    f"the body's JSON nests more than {self.max_depth} arrays or objects deep, which no request "
                    "needs (one object of lists): send one flat JSON object; the request schema is at /openapi.json",
                )
        except Refused as e:
            return await e.send(send)
        await self.app(scope, replaying(body, receive), send)


def token_matches(given: bytes, token: str) -> bool:
    return hmac.compare_digest(given, token.encode())


class BearerAuth:
    """401 for a /v1 request without `Authorization: Bearer <token>`, before anything else is looked at."""

    DETAIL = "missing or wrong bearer token: send 'Authorization: Bearer <XPEFT_API_TOKEN>'"

    def __init__(self, app, token: str, prefix: str = "/v1/"):
        self.app, self.token, self.prefix = app, token, prefix

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and route_path(scope).startswith(self.prefix):
            scheme, _, given = dict(scope.get("headers") or []).get(b"authorization", b"").partition(b" ")
            if scheme.lower() != b"bearer" or not token_matches(given.strip(), self.token):
                return await send_json(send, 401, {"detail": self.DETAIL}, [(b"www-authenticate", b"Bearer")])
        await self.app(scope, receive, send)


class RequestQueue:
    """At most `max_ongoing` /v1 requests at once, `max_queued` more waiting; a JSON 503 with Retry-After beyond."""

    def __init__(self, app, max_ongoing: int, max_queued: int, prefix: str = "/v1/"):
        self.app, self.max_ongoing, self.max_queued, self.prefix = app, max_ongoing, max_queued, prefix
        self.slots = asyncio.Semaphore(max_ongoing)
        self.waiting = 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not route_path(scope).startswith(self.prefix):
            return await self.app(scope, receive, send)
        if self.slots.locked() and self.waiting >= self.max_queued:
            detail = (
                f"the server is at capacity: {self.max_ongoing} requests in progress and {self.max_queued} waiting "
                f"(ServeConfig.max_ongoing_requests, max_queued_requests): retry after {RETRY_AFTER_S} s"
            )
            return await send_json(send, 503, {"detail": detail}, [(b"retry-after", str(RETRY_AFTER_S).encode())])
        self.waiting += 1
        try:
            await self.slots.acquire()
        finally:
            self.waiting -= 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.slots.release()
