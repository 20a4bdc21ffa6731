"""The HTTP API in process (no Ray): the FastAPI app of `make_api` over a `LocalServer`, fuzzed with cases
generated from its own OpenAPI schema (schemathesis: data that fits it and data that does not, with and
without the bearer token): no response >= 500, every status and body as documented, and the next good
request still served. Then each bad input of tests/api_cases.py by name, the Content-Type refusals, and the
offline docs."""

from __future__ import annotations

import asyncio
import dataclasses
import re
import time
from collections import Counter

import pytest
from api_cases import BAD, CHECKS, CONTENT_TYPES, EXAMPLES, GOOD_BODY, JSON, LIMITS, TOKEN, fuzz, served_store
from conftest import API_CASES
from fastapi.testclient import TestClient

from xpeft.serve.api import make_api
from xpeft.serve.config import ServeConfig
from xpeft.serve.local import LocalServer

GOOD = {"profile_id": "soft", "texts": ["still here"]}


@pytest.fixture(scope="module")
def store(tmp_path_factory, backbone):
    return served_store(tmp_path_factory.mktemp("store"), backbone)


@pytest.fixture(scope="module")
def servers(store, backbone):
    """Two in-process servers over one engine: auth off, and auth on (the bearer token TOKEN)."""
    import torch

    cfg = ServeConfig(store=store.uri, backbone=backbone, torch_threads=torch.get_num_threads(), **LIMITS)
    open_server = LocalServer(cfg)
    secure = LocalServer(dataclasses.replace(cfg, api_token=TOKEN), open_server.engine)
    return {"open": open_server, "secure": secure}


@pytest.fixture(scope="module")
def app(servers):
    return make_api(servers["open"])


@pytest.fixture(scope="module")
def client(app):
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


@pytest.fixture(scope="module")
def counted(request):
    """Cases per operation, added to the session's count (printed at the end of the run by conftest.py)."""
    counts: Counter = Counter()
    yield counts
    request.config.stash.setdefault(API_CASES, Counter()).update(counts)


def still_served(client: TestClient, headers: dict | None = None) -> None:
    """The next good request after any case is answered."""
    r = client.post("/v1/classify", json=GOOD, headers=headers)
    assert r.status_code == 200 and r.json()["predictions"], r.text


def test_any_request_gets_a_documented_answer_and_never_a_5xx(app, client, store, counted):
    def call(case, i: int) -> None:
        case.validate_response(case.call(), checks=CHECKS)  # no 5xx; status, headers and body as documented
        if i % 20 == 0:
            still_served(client)

    counts = fuzz(app, store.ids(), call)
    counted.update({f"{k} (auth off)": v for k, v in counts.items()})
    assert counts.total() >= 500 and set(counts) == set(EXAMPLES), counts
    still_served(client)


def test_with_auth_on_any_request_is_answered_as_documented_with_the_token_and_refused_without(servers, store, counted):
    secure = make_api(servers["secure"])
    token = {"Authorization": f"Bearer {TOKEN}"}

    def call(case, i: int) -> None:
        case.headers = {k: v for k, v in (case.headers or {}).items() if k.lower() != "authorization"}
        case.validate_response(case.call(headers=token), checks=CHECKS)
        # Without a token, or with a wrong one, by turns.
        without = case.call(headers={"Authorization": "Bearer not-the-token"} if i % 2 else None)
        case.validate_response(without, checks=CHECKS)
        if case.operation.path.startswith("/v1/"):  # refused before anything else is looked at, the body too
            assert without.status_code == 401, without.text
        if i % 20 == 0:
            still_served(client, token)

    with TestClient(secure) as client:
        counts = fuzz(secure, store.ids(), call)
        counted.update({f"{k} (auth on)": v for k, v in counts.items()})
        still_served(client, token)
    assert counts.total() >= 500 and set(counts) == set(EXAMPLES), counts


# --- each bad input by name, in process (tests/test_serving.py sends the same table over HTTP) -----------


def send(client: TestClient, method: str, path: str, body, headers: dict | None = None):
    kwargs = {"content": body, "headers": {**JSON, **(headers or {})}} if isinstance(body, bytes) else {"json": body}
    return client.request(method.upper(), path, **kwargs)


@pytest.mark.parametrize("name,method,path,body,status,words", BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_a_json_error_naming_the_problem_and_the_fix(client, name, method, path, body, status, words):
    r = send(client, method, path, body)
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    assert words in r.json()["detail"], r.json()
    still_served(client)


def test_a_lone_surrogate_is_echoed_back_escaped_in_the_field_errors(client):
    r = send(client, "post", "/v1/classify", rb'{"profile_id": "a\ud800", "texts": ["x"], "oops": "\udc00"}')
    assert r.status_code == 422
    errors = {e["loc"][-1]: e for e in r.json()["errors"]}
    assert errors["profile_id"]["input"] == "a\\ud800" and errors["oops"]["input"] == "\\udc00"
    r.content.decode("utf-8")  # the whole answer is valid UTF-8


@pytest.mark.parametrize("content_type,words", CONTENT_TYPES, ids=["text/plain", "no Content-Type"])
def test_valid_json_not_sent_as_json_gets_415_naming_the_header_and_the_fix(client, content_type, words):
    headers = {"Content-Type": content_type} if content_type else {}
    r = client.post("/v1/classify", content=GOOD_BODY, headers=headers)
    assert r.request.headers.get("content-type") == content_type
    assert r.status_code == 415, r.text
    assert words in r.json()["detail"] and "'Content-Type: application/json'" in r.json()["detail"]
    assert client.post("/v1/classify", content=GOOD_BODY, headers=JSON).status_code == 200


def test_a_profile_fitted_on_pairs_is_served_pairs_and_one_of_single_texts_single_texts(client):
    paired = client.post("/v1/classify", json={"profile_id": "paired", "texts": ["good fun"], "text_pairs": ["film"]})
    unpaired = client.post("/v1/classify", json={"profile_id": "unpaired", "texts": ["good fun"]})
    assert paired.status_code == 200 and unpaired.status_code == 200, (paired.text, unpaired.text)
    # A profile stored before text_pair was recorded (None) takes both.
    for extra in ({}, {"text_pairs": ["film"]}):
        r = client.post("/v1/classify", json={"profile_id": "hard", "texts": ["good fun"], **extra})
        assert r.status_code == 200, r.text


def test_every_error_status_the_api_answers_is_in_its_openapi_schema(app):
    schema = app.openapi()
    documented = {code for op in schema["paths"]["/v1/classify"].values() for code in op["responses"]}
    assert {"400", "401", "404", "408", "409", "413", "415", "422", "503"} <= documented
    invalid = schema["components"]["schemas"]["Invalid"]
    assert set(invalid["properties"]) == {"detail", "errors"} and invalid["required"] == ["detail"]


# --- the docs, offline -----------------------------------------------------------------------------------

ASSET = re.compile(r"""(?:src|href|spec-url)=["']([^"']+)["']|url: '([^']+)'""")


def assets(html: str) -> list[str]:
    return [a or b for a, b in ASSET.findall(html)]


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_the_docs_need_no_cdn_every_asset_they_reference_is_served_here(client, page):
    r = client.get(page)
    assert r.status_code == 200 and "text/html" in r.headers["content-type"]
    urls = assets(r.text)
    assert len(urls) >= 3, r.text  # the page's script, stylesheet or spec, and its icon
    assert not re.search(r"https?://|//cdn", r.text), "the docs page loads something from another host"
    for url in urls:
        assert url.startswith("/"), url
        got = client.get(url)
        assert got.status_code == 200 and got.content, url


# --- the Serve proxy's middleware: a request no replica answered --------------------------------------------


def proxied(app) -> TestClient:
    from xpeft.serve.proxy import UnansweredIs503

    return TestClient(UnansweredIs503(app), raise_server_exceptions=False)


async def replica_died(scope, receive, send):  # what Serve's proxy does on RayActorError: returns, no response
    return None


async def replica_failed(scope, receive, send):
    raise RuntimeError("the actor died unexpectedly")


async def replica_answered(scope, receive, send):
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"ok"})


@pytest.mark.parametrize("app", [replica_died, replica_failed], ids=["returned without a response", "raised"])
def test_a_request_no_replica_answered_gets_a_json_503_with_retry_after(app):
    r = proxied(app).post("/v1/classify", json=GOOD)
    assert r.status_code == 503 and r.headers["content-type"] == "application/json"
    assert int(r.headers["retry-after"]) >= 1 and "retry it after" in r.json()["detail"]


def test_an_answer_passes_the_proxy_middleware_untouched():
    r = proxied(replica_answered).get("/healthz")
    assert (r.status_code, r.text, "retry-after" in r.headers) == (200, "ok", False)


# --- the order of refusals, slow and greedy clients (xpeft.serve.limits) ---------------------------------------


def test_without_the_token_a_bad_body_is_refused_401_before_422(servers):
    with TestClient(make_api(servers["secure"])) as secure:
        bad = b'{"profile_id": "hard", "texts": ['
        assert send(secure, "post", "/v1/classify", bad).status_code == 401
        assert send(secure, "post", "/v1/classify", bad, {"Authorization": f"Bearer {TOKEN}"}).status_code == 422


def asgi_client(app, timeout: float = 30):
    import httpx2 as httpx  # the client TestClient uses

    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test", timeout=timeout)


def test_a_slow_client_sending_half_a_body_gets_408_naming_the_limit_and_the_next_request_is_served(servers):
    server = LocalServer(dataclasses.replace(servers["open"].cfg, body_timeout_s=0.5), servers["open"].engine)

    async def half_a_body():
        yield b'{"profile_id": "soft", "te'
        await asyncio.sleep(5)  # ... and waits
        yield b'xts": ["x"]}'

    async def main():
        async with asgi_client(make_api(server)) as client:
            start = time.perf_counter()
            r = await client.post("/v1/classify", content=half_a_body(), headers=JSON)
            waited = time.perf_counter() - start
            return r, waited, await client.post("/v1/classify", json=GOOD)

    r, waited, next_one = asyncio.run(main())
    assert r.status_code == 408 and "ServeConfig.body_timeout_s" in r.json()["detail"] and waited < 4, (r.text, waited)
    assert next_one.status_code == 200


class HeldServer(LocalServer):
    """A server whose classify waits for `release`: requests pile up in its queue."""

    release: asyncio.Event

    async def classify(self, request):
        await self.release.wait()
        return await super().classify(request)


def test_a_full_queue_is_a_json_503_with_retry_after_and_healthz_is_answered_outside_it(servers):
    cfg = dataclasses.replace(servers["open"].cfg, max_ongoing_requests=1, max_queued_requests=1)
    server = HeldServer(cfg, servers["open"].engine)

    async def main():
        server.release = asyncio.Event()
        async with asgi_client(make_api(server)) as client:
            held = [asyncio.create_task(client.post("/v1/classify", json=GOOD)) for _ in range(2)]
            await asyncio.sleep(0.3)  # one in progress, one waiting: the queue is full
            refused = await client.post("/v1/classify", json=GOOD)
            health = await asyncio.wait_for(client.get("/healthz"), 10)  # not behind the held requests
            server.release.set()
            return refused, health, await asyncio.gather(*held)

    refused, health, held = asyncio.run(main())
    assert refused.status_code == 503 and int(refused.headers["retry-after"]) >= 1, refused.text
    assert "max_queued_requests" in refused.json()["detail"]
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert [r.status_code for r in held] == [200, 200]


# --- the Serve proxy's middlewares: the body before a replica, /healthz within a deadline -----------------------


def test_a_slow_client_is_answered_408_by_the_proxy_before_any_replica_is_asked():
    from xpeft.serve.limits import BodyLimits

    asked = []

    async def replica(scope, receive, send):
        asked.append(scope["path"])
        await replica_answered(scope, receive, send)

    app = BodyLimits(
        replica, max_bytes=1000, timeout_s=0.5, size_limit="XPEFT_MAX_BODY_BYTES", time_limit="XPEFT_BODY_TIMEOUT_S"
    )

    async def half_a_body():
        yield b'{"profile_id": "so'
        await asyncio.sleep(5)
        yield b'ft"}'

    async def main():
        async with asgi_client(app) as client:
            return await client.post("/v1/classify", content=half_a_body(), headers=JSON), await client.get("/healthz")

    slow, health = asyncio.run(main())
    assert slow.status_code == 408 and "XPEFT_BODY_TIMEOUT_S" in slow.json()["detail"]
    assert asked == ["/healthz"]  # the slow request never reached a replica


async def proxy_not_found(scope, receive, send):  # Serve's proxy before the app is deployed
    await send({"type": "http.response.start", "status": 404, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"Path '/healthz' not found."})


async def no_answer(scope, receive, send):  # a replica that is starting: the request waits in Serve's router
    await asyncio.sleep(60)


@pytest.mark.parametrize(
    "app,status", [(proxy_not_found, "starting"), (no_answer, "unavailable")], ids=["not deployed", "no answer"]
)
def test_healthz_is_answered_503_within_its_deadline_while_no_replica_can_answer(app, status):
    from xpeft.serve.proxy import HealthWithin

    start = time.perf_counter()
    r = TestClient(HealthWithin(app, deadline_s=0.5)).get("/healthz")
    assert r.status_code == 503 and r.json()["status"] == status and int(r.headers["retry-after"]) >= 1, r.text
    assert time.perf_counter() - start < 5
