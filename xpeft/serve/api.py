"""The HTTP API of a replica, FastAPI only (no Ray): request and response schemas, the routes, the checks of a
request and offline docs, behind the limits of xpeft.serve.limits (bearer auth first, then the body's size, time
and depth, then the request queue that /healthz never waits in). `make_api(server)` builds it over anything with
`.cfg`, `.engine` (a ProfileEngine) and an async `.classify(request)`: the Serve deployment, or the in-process
`xpeft.serve.local.LocalServer`.

    POST /v1/classify           {"profile_id", "texts", optional "text_pairs"} → one prediction per text
    GET  /v1/profiles/{id}      config, metrics, record_bytes, whether this server can serve it
    GET  /v1/profiles?offset&limit
    POST /v1/profiles/{id}/fit  {"texts", "labels", optional "text_pairs", "split", "epochs", "batch_size",
                                "mask_type"} → 202 a job
    GET  /v1/jobs/{id}          the fit job: queued / running / succeeded (metrics, fingerprint) / failed (why)
    GET  /healthz               (no auth)
    GET  /docs, /redoc          the API's documentation, its assets served from here (no CDN: works offline)

Errors are JSON {"detail": ...} naming the problem and the fix (xpeft.serve.errors): 400 invalid profile id,
401 missing/wrong token, 404 unknown profile or job, 408 a body that did not arrive in time, 409 profile made for
another bank or encoder (both fingerprints in the message) or a fit that conflicts with the job in flight, 413 body
or text limits, 415 a body not sent as JSON, 422 malformed or too deeply nested JSON, missing or wrong-typed
fields, empty texts, text_pairs the profile does not take, examples that cannot be fitted; 429 too many fits
queued (with Retry-After); 503 the profile's part of the store or shared head is damaged (the detail names the
file; other profiles are served), the replica is starting or at capacity (with Retry-After), or no replica
answered; each route documents its own.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Any, Literal, Protocol

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi_offline import FastAPIOffline
from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from xpeft import __version__
from xpeft.core.multiprofile import CombinedProfile
from xpeft.profiles.record import MAX_PROFILE_ID, validate_profile_id
from xpeft.serve import errors
from xpeft.serve.config import ServeConfig
from xpeft.serve.engine import ProfileEngine, ServeError
from xpeft.serve.limits import MAX_JSON_DEPTH, BearerAuth, BodyLimits, RequestQueue, token_matches


class Server(Protocol):
    """What the API serves from: the config, the engine, and the (batched) classification."""

    cfg: ServeConfig
    engine: ProfileEngine

    async def classify(self, request: ClassifyRequest) -> dict[str, Any]: ...

    async def fit(self, profile_id: str, request: dict[str, Any]) -> tuple[dict[str, Any], bool]: ...

    async def job(self, job_id: str) -> dict[str, Any]: ...


def utf8(value: str) -> str:
    """Refuses what is not text: a lone surrogate (a JSON "\\ud800" escape without its pair) cannot be
    encoded, tokenized or echoed back."""
    bad = errors.SURROGATE.search(value)
    if bad:
        raise ValueError(
            f"has a lone surrogate \\u{ord(bad.group()):04x} at character {bad.start()}, which is not text: send "
            "valid UTF-8 (a JSON \\uXXXX escape of a character outside the BMP needs both halves of its pair)"
        )
    return value


def nonblank(value: str) -> str:
    if not value.strip():
        raise ValueError("is empty or only whitespace, which has nothing to classify: send text, or leave it out")
    return value


# The schema says "some non-space character" (pattern); the validators give the reason and the fix.
Text = Annotated[str, AfterValidator(utf8), AfterValidator(nonblank), Field(json_schema_extra={"pattern": r"\S"})]


class ClassifyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    profile_id: Annotated[str, AfterValidator(utf8)] = Field(
        min_length=1, max_length=MAX_PROFILE_ID, description="a stored profile's id"
    )
    texts: list[Text] = Field(min_length=1, description="texts to classify (at most ServeConfig.max_texts)")
    text_pairs: list[Text] | None = Field(
        None, description="second segments, one per text, for a profile fitted on pairs (its config's text_pair)"
    )


class Prediction(BaseModel):
    label: int | None = Field(None, description="the most probable class (classification profiles)")
    label_name: str | None = Field(None, description="its name, when the profile stores label names")
    probabilities: list[float] | None = Field(
        None, description="the class distribution: softmax over the profile's classes (classification profiles)"
    )
    value: float | None = Field(None, description="the predicted value (regression profiles)")


class ClassifyResponse(BaseModel):
    profile_id: str
    predictions: list[Prediction]


class ProfileInfo(BaseModel):
    profile_id: str
    mode: str
    mask_type: str | None
    config: dict[str, Any]
    head_id: str | None
    bank_fingerprint: str | None = Field(description="the bank the profile was fitted on")
    served_from_bank: str | None = Field(
        None, description="the bank it is served from: its own, or the newest grown from it (its masks zero-extended)"
    )
    metrics: dict[str, Any]
    label_names: list[str] | None
    record_bytes: int = Field(description="bytes stored for this profile: mask bits + every tensor")
    record_bytes_by_part: dict[str, int] = Field(description="record_bytes by part (mask_bits, ln, head...) and total")
    created: float
    servable: bool = Field(description="whether this server's backbone and bank can serve it")
    problem: str | None = Field(None, description="why not, when it cannot")


class FitRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    texts: list[Text] = Field(min_length=1, description="the profile's examples (at most ServeConfig.max_fit_examples)")
    labels: list[str | int | float] = Field(
        min_length=1,
        description="one per text: a class name of the store's profiles (their label_names), or a number for a "
        "regression store",
    )
    text_pairs: list[Text] | None = Field(None, description="second segments, one per text, for a pair task")
    split: list[Literal["train", "test"]] | None = Field(
        None, description="one per text; default: the farm's seeded 70/30 holdout"
    )
    epochs: int | None = Field(None, ge=1, description="the fit's epochs (default: the store's recipe)")
    batch_size: int | None = Field(
        None, ge=1, description="the fit's batch size (default: the store's recipe; at most max_fit_examples)"
    )
    mask_type: Literal["hard", "soft"] | None = Field(None, description="hard or soft masks (default: the recipe's)")


class FitJob(BaseModel):
    job_id: str
    profile_id: str
    status: Literal["queued", "running", "succeeded", "failed"]
    attempts: int = Field(description="times a worker started it")
    error: str | None = Field(None, description="why it failed")
    submitted: float = Field(description="when the job was accepted (Unix seconds)")
    updated: float = Field(description="its last change")
    metrics: dict[str, Any] | None = Field(None, description="the fitted profile's holdout metrics (succeeded)")
    fingerprint: str | None = Field(None, description="the fitted profile's record fingerprint (succeeded)")
    store_version: int | None = Field(
        None, description="the store version holding it: /v1/classify serves it from /healthz's store_version on"
    )
    seconds: float | None = Field(None, description="the fit's time")


class Unreadable(BaseModel):
    profile_id: str
    detail: str = Field(description="why it cannot be read: the damaged part of the store, its file")


class UnreadablePart(BaseModel):
    part: int = Field(description="the part of the store's profile table")
    files: list[str] = Field(description="its data files")
    profiles: int = Field(description="profiles stored in it, whose ids cannot be read")
    detail: str = Field(description="why it cannot be read")


class ProfilePage(BaseModel):
    total: int = Field(description="profiles the pages list (under profiles or unreadable), all pages together")
    offset: int
    limit: int
    profiles: list[ProfileInfo]
    unreadable: list[Unreadable] = Field([], description="profiles of the page in damaged parts of the store")
    unreadable_parts: list[UnreadablePart] = Field(
        [], description="damaged parts whose profiles' ids cannot be read, so no page lists them (not in total)"
    )


class Starting(BaseModel):
    status: str = Field(description='"starting" (with what it waits for), "failed", or "unavailable" (no answer)')
    detail: str = Field(description="what the replica is waiting for, why it failed, or that none answered in time")


class BankHealth(BaseModel):
    fingerprint: str
    N: int | None = Field(None, description="its members")
    parent: str | None = Field(None, description="the bank it was grown from (None: it was not grown)")
    source: str | None = None
    served_from_bank: str | None = Field(description="the bank its profiles are served from (None: refused)")
    in_memory: bool
    problem: str | None = Field(None, description="why its file is refused (damage), when it is")


class Health(BaseModel):
    status: str = Field(description='"ok", or "degraded" with the reasons in problems')
    problems: list[str] = Field(description="damaged parts of the store, a store that cannot be refreshed")
    backbone: str
    bank_fingerprint: str | None = Field(description="the bank the replica started with")
    banks: list[BankHealth] = Field([], description="every bank of the store, and which bank serves its profiles")
    bank_bytes_in_memory: int = Field(0, description="bytes of the banks in memory, bounded by bank_cache_mb")
    cached_profiles: int
    cache_size: int
    batches: int = Field(description="encoder forwards since the replica started")
    rows: int = Field(description="texts classified since the replica started")
    max_profiles_in_batch: int = Field(description="most distinct profiles seen in one forward")
    forward_seconds: float = Field(description="time spent in encoder forwards")
    forward: str = Field(description="the encoder forward: 'ort' (ONNX Runtime) or 'eager' (torch)")
    forward_by_rows: dict[str, list[float]] = Field(
        description="rows of a forward -> [forwards of that size, seconds they took]"
    )
    profiles_loaded: int = Field(description="profiles read from the store and combined (cache misses)")
    load_seconds: float = Field(description="time spent reading and combining them")
    store_reads: int = Field(description="profile records read from the store (misses of the record cache)")
    records_in_memory: int = Field(description="profile records in the record cache")
    preloading: bool = Field(description="whether the record cache is still being filled from the store")
    record_bytes_in_memory: int = Field(description="their record_bytes, bounded by record_cache_mb")
    store_profiles: int = Field(description="profiles in the store, as of the replica's view")
    store_version: int = Field(description="the store's table version the replica serves")
    store_parts: int = Field(description="parts (Lance fragments) of the store's profile table")
    store_age_s: float = Field(description="seconds since the replica last refreshed its view (bound: staleness_s)")
    index_bytes: int = Field(description="memory of the replica's profile-id index")
    rss_bytes: int = Field(description="the replica process's resident memory")


CLASSIFY_ERRORS = errors.documented(400, 401, 404, 408, 409, 413, 415, 422, 503)
PROFILE_ERRORS = errors.documented(400, 401, 404, 408, 413, 422, 503)
PAGE_ERRORS = errors.documented(401, 408, 413, 422, 503)
FIT_ERRORS = errors.documented(400, 401, 408, 409, 413, 415, 422, 429, 503)
JOB_ERRORS = errors.documented(401, 404, 408, 413, 422, 503)


def bearer_auth(token: str | None):
    """A FastAPI dependency refusing requests without `Authorization: Bearer <token>` (None: auth is off)."""
    if not token:
        return None
    scheme = HTTPBearer(auto_error=False, description="the server's XPEFT_API_TOKEN")

    def check(credentials: HTTPAuthorizationCredentials | None = Depends(scheme)) -> None:
        # BearerAuth has refused a request without the token before its body was read; this documents the
        # scheme in the OpenAPI schema, and checks again where the app is mounted without the middleware.
        if not token_matches(credentials.credentials.encode() if credentials else b"", token):
            raise HTTPException(401, BearerAuth.DETAIL, headers={"WWW-Authenticate": "Bearer"})

    return check


def make_api(server: Server) -> FastAPI:
    """The FastAPI app of one replica: routes over `server`, behind auth, the body's limits and the request queue
    (xpeft.serve.limits); errors as JSON; offline docs."""
    cfg = server.cfg
    api = FastAPIOffline(
        title="xpeft profile server",
        version=__version__,
        description="X-PEFT: every stored profile over one shared backbone and adapter bank.",
    )
    # Starlette runs the middleware added last first: auth, then the body, then the queue.
    api.add_middleware(RequestQueue, max_ongoing=cfg.max_ongoing_requests, max_queued=cfg.max_queued_requests)
    api.add_middleware(
        BodyLimits,
        max_bytes=cfg.max_body_bytes,
        timeout_s=cfg.body_timeout_s,
        size_limit="ServeConfig.max_body_bytes",
        time_limit="ServeConfig.body_timeout_s",
        max_depth=MAX_JSON_DEPTH,
    )
    if cfg.api_token:
        api.add_middleware(BearerAuth, token=cfg.api_token)
    auth = bearer_auth(cfg.api_token)
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(auth)] if auth else [])

    @v1.post("/classify", response_model=ClassifyResponse, response_model_exclude_none=True, responses=CLASSIFY_ERRORS)
    async def classify(request: ClassifyRequest) -> dict[str, Any]:
        return await server.classify(request)

    @v1.get("/profiles/{profile_id}", response_model=ProfileInfo, responses=PROFILE_ERRORS)
    async def profile(profile_id: str) -> dict[str, Any]:
        checked_id(profile_id)
        return await asyncio.to_thread(server.engine.profile_info, profile_id)

    @v1.get("/profiles", response_model=ProfilePage, responses=PAGE_ERRORS)
    async def profiles(offset: int = Query(0, ge=0), limit: int = Query(50, ge=1)) -> dict[str, Any]:
        if limit > cfg.max_page:
            raise ServeError(413, f"limit={limit} is over {cfg.max_page} profiles a page (ServeConfig.max_page)")
        return await asyncio.to_thread(server.engine.profile_page, offset, limit)

    @v1.post("/profiles/{profile_id}/fit", status_code=202, response_model=FitJob, responses=FIT_ERRORS)
    async def fit(profile_id: str, request: FitRequest) -> dict[str, Any]:
        """Fit the profile on these examples with the store's recipe: 202 with the job (a POST repeating the
        examples of the profile's job in flight answers that job; other examples 409)."""
        job, _ = await server.fit(checked_id(profile_id), request.model_dump(exclude_none=True))
        return job

    @v1.get("/jobs/{job_id}", response_model=FitJob, response_model_exclude_none=True, responses=JOB_ERRORS)
    async def job(job_id: str) -> dict[str, Any]:
        return await server.job(job_id)

    api.include_router(v1)
    health_thread = ThreadPoolExecutor(1, thread_name_prefix="xpeft-health")  # never behind the requests' work
    # A 503 comes from the Serve proxy (xpeft.serve.proxy): before a replica is ready, or when none answers in time.
    starting = {503: {"model": Starting, "description": "the replica is starting, or no replica answered in time"}}

    @api.get("/healthz", response_model=Health, responses=starting)
    async def healthz() -> dict[str, Any]:
        return await asyncio.get_running_loop().run_in_executor(health_thread, server.engine.health)

    errors.install(api)
    return api


# --- the checks of a classify request (the deployment and LocalServer make the same) ---------------------


def checked_id(profile_id: str) -> str:
    try:
        return validate_profile_id(profile_id)
    except ValueError as e:
        raise ServeError(400, str(e)) from None


def checked_request(cfg: ServeConfig, request: ClassifyRequest) -> str:
    """The request's profile id once its texts are within the server's limits (413) and its pairs one per
    text (422); a ServeError otherwise."""
    texts, pairs = request.texts, request.text_pairs
    if len(texts) > cfg.max_texts:
        raise ServeError(
            413,
            f"{len(texts)} texts in one request; the limit is {cfg.max_texts} (ServeConfig.max_texts): "
            "split the request",
        )
    if pairs is not None and len(pairs) != len(texts):
        raise ServeError(422, f"text_pairs has {len(pairs)} entries for {len(texts)} texts; give one per text")
    longest = max(len(t) for t in texts + (pairs or []))
    if longest > cfg.max_text_chars:
        raise ServeError(
            413, f"a text of {longest} characters; the limit is {cfg.max_text_chars} (ServeConfig.max_text_chars)"
        )
    return checked_id(request.profile_id)


def check_inputs(c: CombinedProfile, request: ClassifyRequest, rows: list[dict], n_special: int) -> None:
    """422 unless the request gives the profile what it was fitted on (pairs or single texts) and every
    text has a token the backbone reads (`n_special`: the tokens a row has for an empty text)."""
    paired = request.text_pairs is not None
    if c.text_pair is False and paired:
        raise ServeError(
            422,
            f"profile {c.profile_id!r} was fitted on single texts, not pairs: leave text_pairs out (or join each "
            "pair into its text)",
        )
    if c.text_pair and not paired:
        raise ServeError(422, f"profile {c.profile_id!r} was fitted on text pairs: send text_pairs, one per text")
    empty = [f"texts[{i}]" for i, row in enumerate(rows) if len(row["input_ids"]) <= n_special]
    if empty:
        raise ServeError(
            422,
            f"{', '.join(empty[:10])}: no token the backbone reads (only control, zero-width or space characters), "
            "which leaves nothing to classify: send text, or leave it out",
        )
