"""The HTTP API's errors, FastAPI only: every one is JSON {"detail": "<the problem>: <the fix>"} with a
documented status, whatever the input (a body that is not JSON, a header naming another type, a lone
surrogate that cannot be encoded back), so a client can always parse it and a user can always act on it.

422 adds `errors`, pydantic's list (loc, msg, type and the input, with anything UTF-8 cannot carry escaped),
for programs that want the field by field reasons.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException

from xpeft.serve.engine import ServeError
from xpeft.serve.limits import is_json

log = logging.getLogger(__name__)

SURROGATE = re.compile("[\ud800-\udfff]")
SCHEMA_HINT = "the request schema is at /openapi.json (readable at /docs)"
JSON_HINT = "send the body as JSON with the header 'Content-Type: application/json' (curl: --json '{...}')"
MAX_LISTED = 5  # field errors named in `detail`; all are in `errors`


class Detail(BaseModel):
    detail: str = Field(description="what is wrong, and what to do about it")


class FieldError(BaseModel):
    loc: list[str | int] = Field(description="where: 'body', 'query' or 'path', then the field (and index)")
    msg: str
    type: str
    input: Any = None


class Invalid(BaseModel):
    detail: str = Field(description="every problem found (the first few), and what to do about it")
    errors: list[FieldError] = Field(default_factory=list, description="each problem, field by field")


def documented(*codes: int) -> dict[int | str, dict[str, Any]]:
    """The `responses=` of a route that can answer with these error statuses."""
    return {code: {"model": Invalid if code == 422 else Detail, "description": MEANING[code]} for code in codes}


MEANING = {
    400: "invalid profile id, or a body that cannot be read as UTF-8",
    401: "missing or wrong bearer token (checked before anything else)",
    404: "unknown profile or fit job",
    408: "the request body did not arrive within the server's time limit",
    409: "profile made for another bank or backbone; a fit of a profile whose job in flight has other examples, or "
    "on a server that fits nothing (no recipe in the store, no fit workers)",
    413: "body, text count, text length, examples or page size over the server's limits",
    415: "a body not sent as JSON (its Content-Type header names another type)",
    422: "malformed JSON or JSON nested too deep, missing, unknown or wrong-typed fields, empty texts, text_pairs "
    "the profile does not take; examples that cannot be fitted (labels not among the classes, too few rows)",
    429: "too many fits queued or running: retry after the Retry-After seconds",
    503: "the profile's part of the store, its record or its shared head is damaged (the detail names the file); "
    "the replica is starting or at capacity; or no replica answered (it died or is restarting): retry after the "
    "Retry-After seconds where it is given",
}


def escaped(value: Any) -> Any:
    """`value` with the characters UTF-8 cannot encode (lone surrogates) written as \\uXXXX, recursively."""
    if isinstance(value, str):
        return SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", value)
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    if isinstance(value, dict):
        return {escaped(k): escaped(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [escaped(v) for v in value]
    return value


def where(loc: list) -> str:
    """'texts[2]' for ('body', 'texts', 2), 'query parameter limit' for ('query', 'limit')."""
    kind, path = (loc[0], loc[1:]) if loc and loc[0] in ("body", "query", "path", "header") else ("body", loc)
    name = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".")
    if kind == "body":
        return name or "the body"
    return f"{kind} parameter {name}"


def reason(error: dict) -> str:
    if error["type"] == "json_invalid":
        position = error["loc"][1] if len(error["loc"]) > 1 else "?"
        why = (error.get("ctx") or {}).get("error", "")
        return f"the body is not valid JSON ({why} at character {position}): send one JSON object"
    msg = str(error["msg"]).removeprefix("Value error, ")
    if error["type"] == "string_unicode":
        msg = "is not text (a lone surrogate, such as a JSON \\ud800 escape without its pair): send valid UTF-8"
    elif error["type"] == "missing":
        msg += ": add it"
    elif error["type"] == "extra_forbidden":
        msg += ": remove it (or check its spelling)"
    return f"{where(error['loc'])}: {msg}"


def invalid(request: Request, e: RequestValidationError) -> JSONResponse:
    """422 naming each invalid field; 415 when the body was not read as JSON because of its Content-Type."""
    if isinstance(e.body, bytes) and e.body and not is_json(request.headers.get("content-type")):
        sent = request.headers.get("content-type")
        header = f"with 'Content-Type: {escaped(sent)}'" if sent else "without a Content-Type header"
        detail = f"the body was sent {header}, so it was not read as JSON: {JSON_HINT}"
        return JSONResponse({"detail": detail}, status_code=415)
    errors = [
        {"loc": [escaped(p) for p in err.get("loc", ())], "msg": escaped(str(err.get("msg", ""))), "type": err["type"]}
        | ({"input": jsonable_encoder(escaped(err["input"]))} if "input" in err else {})
        for err in e.errors()
    ]
    reasons = [escaped(reason(err)) for err in e.errors()]
    more = f" (and {len(reasons) - MAX_LISTED} more, in 'errors')" if len(reasons) > MAX_LISTED else ""
    detail = f"invalid request: {'; '.join(reasons[:MAX_LISTED])}{more}. Fix these; {SCHEMA_HINT}"
    return JSONResponse({"detail": detail, "errors": errors}, status_code=422)


def http_error(request: Request, e: HTTPException) -> Response:
    """Starlette's own refusals (no such route, method not allowed, an unreadable body) with their fix."""
    headers = getattr(e, "headers", None)
    route = f"{request.method} {escaped(request.url.path)}"
    if e.status_code == 404 and e.detail == "Not Found":
        routes = "/v1/classify, /v1/profiles[/{id}[/fit]], /v1/jobs/{id}, /healthz"
        detail = f"no route {route}: the routes are {routes}; {SCHEMA_HINT}"
    elif e.status_code == 405:
        allowed = (headers or {}).get("Allow") or (headers or {}).get("allow") or "another method"
        detail = f"{route} is not served: {request.url.path!r} takes {allowed}; {SCHEMA_HINT}"
    elif e.status_code == 400 and e.detail == "There was an error parsing the body":
        detail = f"the body could not be read (is it UTF-8?): {JSON_HINT}, encoded as UTF-8"
    else:
        detail = escaped(str(e.detail))
    if e.status_code in (204, 304) or e.status_code < 200:
        return Response(status_code=e.status_code, headers=headers)
    return JSONResponse({"detail": escaped(detail)}, status_code=e.status_code, headers=headers)


def install(api: FastAPI) -> None:
    """Every error of `api` as JSON with its fix; anything unexpected a logged JSON 500 (a bug to report)."""

    @api.exception_handler(RequestValidationError)
    async def on_invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        return invalid(request, e)

    @api.exception_handler(HTTPException)
    async def on_http_error(request: Request, e: HTTPException) -> Response:
        return http_error(request, e)

    @api.exception_handler(ServeError)
    async def refused(_: Request, e: ServeError) -> JSONResponse:
        return JSONResponse({"detail": escaped(e.detail)}, status_code=e.status, headers=e.headers)

    @api.exception_handler(Exception)
    async def failed(_: Request, e: Exception) -> JSONResponse:
        log.exception("request failed")
        return JSONResponse({"detail": f"internal error ({type(e).__name__}); see the replica's log"}, status_code=500)
