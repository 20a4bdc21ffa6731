"""The profile server over real HTTP on a local Ray: the same predictions as the in-process model, one forward
for a batch mixing profiles, a clear JSON 4xx for every bad input (and the next request still served), auth,
offline docs, and a short run of schemathesis cases generated from the served OpenAPI schema."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import re
import signal
import socket
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
import torch
from api_cases import (
    BAD,
    CHECKS,
    CONTENT_TYPES,
    GOOD_BODY,
    LIMITS,
    OTHER_BANK,
    TOKEN,
    fuzz,
    replica_pids,
    served_store,
)
from cases import BANK, BY_NAME, CASES, D, fitted_profile
from conftest import API_CASES

from xpeft.core.encoder import load_encoder, load_tokenizer
from xpeft.core.model import XPeftModel
from xpeft.data.tokens import Collator, tokenize
from xpeft.flags import from_strings
from xpeft.profiles.record import apply_profile
from xpeft.profiles.store import Location, ProfileStore
from xpeft.serve.cache import ProfileCache, RecordCache
from xpeft.serve.combine import combine_profiles
from xpeft.serve.config import ServeConfig
from xpeft.serve.deployment import app_builder
from xpeft.serve.engine import ProfileEngine
from xpeft.serve.local import Coalescer

TEXTS = ["the movie was great fun", "bad boring plot", "news about the election and the vote"]
SERVED = [c.name for c in CASES]  # every mode of the table, over real HTTP


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- without Ray: the pieces the replica is made of ---------------------------------------------------------


def test_combining_profiles_in_bulk_equals_one_at_a_time():
    ids = ["hard", "soft", "hard-B", "single", "head-only"]
    profiles = [fitted_profile(pid, seed=i)[1] for i, pid in enumerate(ids)]
    bulk = combine_profiles(profiles, BANK, D, {})
    for p, got in zip(profiles, bulk, strict=True):
        want = combine_profiles([p], BANK, D, {})[0]
        for name in ("A_hat", "B_hat", "ln_weight", "ln_bias"):
            a, b = getattr(got, name), getattr(want, name)
            assert (a is None and b is None) or torch.allclose(a, b, atol=1e-6), (p.profile_id, name)
        assert (got.scale, got.head_key, got.problem_type) == (want.scale, want.head_key, want.problem_type)
        x = torch.randn(3, 5, D)
        assert torch.equal(got.head(x, torch.ones(3, 5)), want.head(x, torch.ones(3, 5)))


def test_bulk_combination_reports_a_profile_of_another_bank_without_failing_the_others():
    _, good = fitted_profile("hard", "good", seed=1)
    _, alien = fitted_profile("hard", "alien", seed=2, bank=OTHER_BANK)
    got = combine_profiles([alien, good], BANK, D, {})
    assert isinstance(got[0], ValueError) and "was fitted on bank" in str(got[0])
    assert got[1].profile_id == "good"


def test_profile_cache_is_bounded_and_evicts_the_least_recently_used():
    cache = ProfileCache(2)
    items = {
        pid: combine_profiles([fitted_profile("hard", pid, seed=i)[1]], BANK, D, {})[0] for i, pid in enumerate("abc")
    }
    loc = {pid: Location(i, 0) for i, pid in enumerate("abc")}
    cache.put(loc["a"], items["a"])
    cache.put(loc["b"], items["b"])
    assert cache.get(loc["a"], "a") is items["a"]  # a is now the most recent
    cache.put(loc["c"], items["c"])
    assert len(cache) == 2 and cache.get(loc["b"], "b") is None and cache.get(loc["a"], "a") is items["a"]
    assert cache.get(Location(7, 0), "a") is None  # a refit profile (a new location) is never served from memory


def test_a_head_that_does_not_fit_its_config_is_refused_without_failing_the_others():
    _, good = fitted_profile("hard", "good", seed=1)
    _, bad = fitted_profile("hard", "bad", seed=2)
    bad = dataclasses.replace(bad, tensors={**bad.tensors, "head.classifier.weight": torch.zeros(7, D)})
    got = combine_profiles([bad, good], BANK, D, {})
    assert isinstance(got[0], ValueError) and "needs tensors" in str(got[0]) and "(7, 32)" in str(got[0])
    assert got[1].profile_id == "good"


def test_record_cache_is_bounded_by_bytes_and_keyed_by_where_the_record_was_read():
    records = [fitted_profile("hard", pid, seed=i)[1] for i, pid in enumerate("abc")]
    size = records[0].record_bytes
    locs = [Location(i, 0) for i in range(3)]
    cache = RecordCache(int(2.5 * size))
    assert cache.put(locs[0], records[0]) and cache.put(locs[1], records[1])
    assert not cache.put(locs[2], records[2], evict=False)  # a preload stops when full: it never churns
    assert cache.get(locs[0], "a") is records[0]  # a is now the most recent
    assert cache.put(locs[2], records[2])  # a request's read evicts the least recently used: b
    assert cache.get(locs[1], "b") is None and len(cache) == 2 and cache.nbytes <= 2.5 * size
    bigger_a = dataclasses.replace(records[0], tensors={**records[0].tensors, "extra": torch.zeros(10_000)})
    assert not cache.put(Location(8, 0), bigger_a, evict=False)  # refused: the kept a stays
    assert cache.get(locs[0], "a") is records[0] and cache.nbytes == 2 * size
    assert cache.get(Location(9, 0), "a") is None  # a rewritten profile is never served from memory


def engine_for(store: ProfileStore, backbone: str, **kwargs) -> ProfileEngine:
    cfg = ServeConfig(store=store.uri, backbone=backbone, torch_threads=torch.get_num_threads(), **kwargs)
    return ProfileEngine(cfg)


def test_a_preloaded_replica_combines_stored_profiles_without_reading_the_store(store, backbone):
    ids = ["hard", "soft", "single", "head-only", "mtl-a"]
    preloaded = engine_for(store, backbone)
    assert preloaded.preload_records() == len(store) and not preloaded.preloading
    got = preloaded.load_profiles(ids)
    assert preloaded.view.store_reads == 0
    reading = engine_for(store, backbone, record_cache_mb=0)
    want = reading.load_profiles(ids)
    assert reading.view.store_reads == len(ids) and len(reading.records) == 0
    for g, w in zip(got, want, strict=True):
        for name in ("A_hat", "B_hat", "ln_weight", "ln_bias"):
            a, b = getattr(g, name), getattr(w, name)
            assert (a is None and b is None) or torch.equal(a, b), (g.profile_id, name)


def test_a_preload_stops_at_its_budget_and_a_refit_profile_is_read_and_combined_again(tmp_path, backbone):
    store = ProfileStore(tmp_path)
    store.save_bank(BANK)
    encoder = load_encoder(backbone)
    profiles = [fitted_profile("hard", f"p{i}", seed=i, encoder=encoder)[1] for i in range(4)]
    store.write(profiles[:2])
    store.write(profiles[2:])
    budget = 2.5 * profiles[0].record_bytes / 2**20
    engine = engine_for(store, backbone, record_cache_mb=budget)
    assert engine.preload_records() == 2  # newest part first: p2, p3
    (old,) = engine.load_profiles(["p2"])
    engine.load_profiles(["p3"])
    assert engine.view.store_reads == 0
    _, v2 = fitted_profile("hard", "p2", seed=40, encoder=encoder)
    store.write([v2])
    assert engine.load_profiles(["p2"])[0] is old  # until the replica's view moves
    assert engine.view.refresh()  # what its refresher does every staleness_s
    (served,) = engine.load_profiles(["p2"])  # still in the combined cache, but for the old version: not used
    assert engine.view.store_reads == 1 and torch.equal(served.ln_weight, v2.tensors["ln_weight"])


def test_calls_waiting_while_work_runs_are_merged_into_one_call():
    calls = []

    def work(items):
        calls.append(list(items))
        time.sleep(0.05)
        if 0 in items:
            raise RuntimeError("boom")
        return [i * 10 for i in items]

    async def main():
        coalesce = Coalescer(work, max_items=100)
        first = asyncio.create_task(coalesce([1]))
        await asyncio.sleep(0.01)  # work([1]) is running: the next four calls wait and then go as one
        rest = await asyncio.gather(*(coalesce([i, i + 1]) for i in (2, 4, 6, 8)))
        with pytest.raises(RuntimeError, match="boom"):
            await coalesce([0])
        return await first, rest

    first, rest = asyncio.run(main())
    assert first == [10] and rest == [[20, 30], [40, 50], [60, 70], [80, 90]]
    assert calls == [[1], [2, 3, 4, 5, 6, 7, 8, 9], [0]]


def test_a_replica_submits_a_requests_rows_to_the_forward_in_one_call(store, backbone):
    """The replica's classify (LocalServer, queued as ProfileServer is): 5 texts are one call of the forward
    queue, so a request is never split into a lone first row and the rest."""
    from xpeft.serve.api import ClassifyRequest
    from xpeft.serve.local import LocalServer

    engine = engine_for(store, backbone)
    calls = []

    def forward(items):
        calls.append(len(items))
        return engine.forward(items)

    server = LocalServer(engine.cfg, engine, queued=True)
    server.forward.work = forward
    got = asyncio.run(server.classify(ClassifyRequest(profile_id="hard", texts=[*TEXTS, *TEXTS[:2]])))
    assert len(got["predictions"]) == 5 and calls == [5]


def test_settings_from_strings_are_typed_and_unknown_or_old_ones_refused_with_the_name_to_use(monkeypatch):
    values = {"store": "/tmp/s", "cpus_per_actor": "0.5", "max_batch_size": "16", "preload": "false"}
    cfg = from_strings(ServeConfig, {**values, "torch_threads": "2", "forward": "eager"})
    assert (cfg.cpus_per_actor, cfg.max_batch_size, cfg.preload, cfg.torch_threads) == (0.5, 16, False, 2)
    with pytest.raises(ValueError, match="unknown ServeConfig settings"):
        from_strings(ServeConfig, {"store": "/tmp/s", "max_batch": "16"})
    with pytest.raises(ValueError, match="max_batch_size='lots' is not a valid int"):
        from_strings(ServeConfig, {"store": "/tmp/s", "max_batch_size": "lots"})
    with pytest.raises(ValueError, match=r"forward='onnx' is not one of \['auto', 'ort', 'eager'\]"):
        from_strings(ServeConfig, {"store": "/tmp/s", "forward": "onnx"})
    with pytest.raises(ValueError, match="'batch_wait_timeout_s' was renamed 'batch_wait_s': use batch_wait_s="):
        from_strings(ServeConfig, {"store": "/tmp/s", "batch_wait_timeout_s": "0.01"})
    monkeypatch.setenv("XPEFT_NUM_CPUS", "1")  # an old name in a script's environment
    with pytest.raises(ValueError, match="'num_cpus' was renamed 'cpus_per_actor'"):
        app_builder({"store": "/tmp/s"})
    monkeypatch.delenv("XPEFT_NUM_CPUS")
    monkeypatch.delenv("XPEFT_STORE", raising=False)
    with pytest.raises(ValueError, match="XPEFT_STORE"):
        app_builder({})


# --- over HTTP on a local Ray ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def store(tmp_path_factory, backbone):
    return served_store(tmp_path_factory.mktemp("store"), backbone)


@pytest.fixture(scope="module")
def server(store, backbone):
    """One local Ray, two apps: '/' without auth and '/secure' with a bearer token; its proxy answers a
    request no replica answered with a JSON 503 (xpeft.serve.proxy, as `xpeft serve` sets it up)."""
    import ray
    from ray import serve

    from xpeft.serve.deployment import build_app
    from xpeft.serve.proxy import BODY_TIMEOUT_ENV, proxy_env

    with pytest.MonkeyPatch.context() as env:
        # before ray.init: the proxy inherits them; it holds a half-sent body 30 s (the slow-client test)
        for name, value in {**proxy_env(), BODY_TIMEOUT_ENV: "30"}.items():
            env.setenv(name, value)
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)  # never a shared one
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    # No fit workers (a fit is answered 409, naming the setting): tests/test_on_demand.py fits over HTTP.
    common = dict(store=store.uri, backbone=backbone, cpus_per_actor=0.5, cache_size=4, batch_wait_s=0.1, **LIMITS)
    common["fit_workers"] = 0
    serve.run(build_app(ServeConfig(**common, api_token=None)), name="xpeft", route_prefix="/")
    serve.run(build_app(ServeConfig(**common, api_token=TOKEN)), name="xpeft-auth", route_prefix="/secure")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()


def expected(store: ProfileStore, backbone: str, profile_id: str, texts: list[str], pairs=None) -> torch.Tensor:
    """Logits of the in-process XPeftModel with the stored profile applied, one text at a time."""
    profile = store.get(profile_id)
    model = XPeftModel(load_encoder(backbone), profile.config, BANK if profile.config.mode == "x_peft" else None)
    shared = store.load_head(profile.head_id) if profile.head_id else None
    apply_profile(model, profile, shared)
    model.eval()
    tokenizer = load_tokenizer(backbone)
    pairs = pairs or [None] * len(texts)
    rows = tokenize([{"text": t, "text_pair": q} for t, q in zip(texts, pairs, strict=True)], tokenizer, 128)
    collate = Collator(tokenizer.pad_token_id)
    with torch.no_grad():
        return torch.cat([model(**collate([r]))["logits"] for r in rows])


def classify(url: str, profile_id: str, texts: list[str], **extra) -> dict:
    r = requests.post(f"{url}/v1/classify", json={"profile_id": profile_id, "texts": texts, **extra}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def assert_matches(preds: list[dict], logits: torch.Tensor, problem_type: str = "classification") -> None:
    assert len(preds) == len(logits)
    for pred, z in zip(preds, logits, strict=True):
        if problem_type == "regression":
            assert abs(pred["value"] - float(z[0])) < 1e-5 and "probabilities" not in pred
        else:
            probs = torch.softmax(z, -1)
            assert torch.allclose(torch.tensor(pred["probabilities"]), probs, atol=1e-5)
            assert pred["label"] == int(probs.argmax())


@pytest.mark.ray
@pytest.mark.parametrize("profile_id", SERVED)
def test_predictions_equal_the_in_process_model(server, store, backbone, profile_id):
    body = classify(server, profile_id, TEXTS)
    assert body["profile_id"] == profile_id
    assert_matches(
        body["predictions"],
        expected(store, backbone, profile_id, TEXTS),
        BY_NAME[profile_id].xpeft().problem_type,
    )


@pytest.mark.ray
def test_label_names_and_text_pairs_are_served(server, store, backbone):
    pairs = ["good", "the story", "sports"]
    body = classify(server, "hard", TEXTS, text_pairs=pairs)
    assert_matches(body["predictions"], expected(store, backbone, "hard", TEXTS, pairs))
    assert all(p["label_name"] == ["neg", "neu", "pos"][p["label"]] for p in body["predictions"])
    unpaired = classify(server, "hard", TEXTS)["predictions"]
    assert unpaired[0]["probabilities"] != body["predictions"][0]["probabilities"]


@pytest.mark.ray
def test_a_mixed_batch_of_8_profiles_equals_8_single_profile_calls(server):
    ids = ["hard", "soft", "hard-B", "single", "head-only", "pooler", "mtl-a", "mtl-b"]
    texts = {pid: [TEXTS[i % 3], TEXTS[(i + 1) % 3]] for i, pid in enumerate(ids)}
    singles = {pid: classify(server, pid, texts[pid]) for pid in ids}  # one at a time
    before = requests.get(f"{server}/healthz", timeout=10).json()
    with ThreadPoolExecutor(len(ids)) as pool:
        mixed = dict(zip(ids, pool.map(lambda pid: classify(server, pid, texts[pid]), ids), strict=True))
    after = requests.get(f"{server}/healthz", timeout=10).json()
    for pid in ids:
        for a, b in zip(mixed[pid]["predictions"], singles[pid]["predictions"], strict=True):
            assert torch.allclose(torch.tensor(a["probabilities"]), torch.tensor(b["probabilities"]), atol=1e-5)
    assert after["rows"] - before["rows"] == 16
    assert after["batches"] - before["batches"] < len(ids), "concurrent requests were not batched together"
    assert after["max_profiles_in_batch"] >= 2


@pytest.mark.ray
@pytest.mark.parametrize("name,method,path,body,status,words", BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_a_clear_4xx_and_the_server_serves_the_next_request(
    server, name, method, path, body, status, words
):
    kwargs = (
        {"data": body, "headers": {"Content-Type": "application/json"}} if isinstance(body, bytes) else {"json": body}
    )
    r = requests.request(method, server + path, timeout=60, **kwargs)
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    assert words in r.json()["detail"], r.json()
    assert classify(server, "soft", ["still here"])["predictions"]


@pytest.mark.ray
@pytest.mark.parametrize("content_type,words", CONTENT_TYPES, ids=["text/plain", "no Content-Type"])
def test_valid_json_not_sent_as_json_gets_415_naming_the_header_and_the_fix(server, content_type, words):
    headers = {"Content-Type": content_type} if content_type else {}
    r = requests.post(f"{server}/v1/classify", data=GOOD_BODY, headers=headers, timeout=30)
    assert r.request.headers.get("Content-Type") == content_type
    assert r.status_code == 415 and words in r.json()["detail"] and "application/json" in r.json()["detail"]


@pytest.mark.ray
def test_a_chunked_body_over_the_limit_is_refused_without_a_content_length(server):
    def chunks():  # 9,000 characters of text, streamed: a generator body has no Content-Length
        yield b'{"profile_id": "hard", "texts": ["'
        for _ in range(9):
            yield b"x" * 1000
        yield b'"]}'

    r = requests.post(f"{server}/v1/classify", data=chunks(), headers={"Content-Type": "application/json"}, timeout=30)
    assert r.request.headers.get("Transfer-Encoding") == "chunked" and "Content-Length" not in r.request.headers
    assert r.status_code == 413 and "max_body_bytes" in r.json()["detail"]
    assert classify(server, "soft", ["still here"])["predictions"]


def poll(url: str, profile_id: str, until, limit_s: float) -> tuple[requests.Response, float]:
    """POST /v1/classify until `until(response)`; the response and the seconds it took."""
    start = time.perf_counter()
    while True:
        r = requests.post(f"{url}/v1/classify", json={"profile_id": profile_id, "texts": TEXTS}, timeout=60)
        if until(r):
            return r, time.perf_counter() - start
        assert time.perf_counter() - start < limit_s, f"not within {limit_s} s: {r.status_code} {r.text[:200]}"
        time.sleep(0.05)


BOUND_S = ServeConfig(store="-").staleness_s + 3.0  # the refresh interval, plus slack for a shared machine


@pytest.mark.ray
def test_a_profile_written_after_the_server_started_is_served(server, store, backbone):
    _, late = fitted_profile("hard", "late-comer", seed=77, encoder=load_encoder(backbone))
    store.write([late])
    r, _ = poll(server, "late-comer", lambda r: r.status_code == 200, BOUND_S)
    assert_matches(r.json()["predictions"], expected(store, backbone, "late-comer", TEXTS))


@pytest.mark.ray
def test_a_refit_is_served_with_its_new_scores_and_a_delete_is_a_404_within_the_staleness_bound(
    server, store, backbone
):
    encoder = load_encoder(backbone)
    store.write([fitted_profile("hard", "refit-me", seed=5, encoder=encoder)[1]])
    r, _ = poll(server, "refit-me", lambda r: r.status_code == 200, BOUND_S)
    old = r.json()["predictions"][0]["probabilities"]
    store.write([fitted_profile("hard", "refit-me", seed=6, encoder=encoder)[1]])
    new = torch.softmax(expected(store, backbone, "refit-me", TEXTS)[0], -1)
    assert not torch.allclose(torch.tensor(old), new, atol=1e-3)
    r, _ = poll(
        server,
        "refit-me",
        lambda r: torch.allclose(torch.tensor(r.json()["predictions"][0]["probabilities"]), new, atol=1e-5),
        BOUND_S,
    )
    info = requests.get(f"{server}/v1/profiles/refit-me", timeout=10).json()
    assert info["metrics"] == store.get("refit-me").metrics  # the profile's page shows the version served
    store.delete(["refit-me"])
    r, _ = poll(server, "refit-me", lambda r: r.status_code == 404, BOUND_S)
    assert "not in the store" in r.json()["detail"]
    health = requests.get(f"{server}/healthz", timeout=10).json()
    assert health["status"] == "ok" and not health["problems"] and health["store_age_s"] < BOUND_S
    assert health["store_profiles"] == len(store) and health["rss_bytes"] > 0 and health["index_bytes"] > 0


@pytest.mark.ray
def test_profile_info_has_config_metrics_and_size_in_bytes(server, store):
    info = requests.get(f"{server}/v1/profiles/hard", timeout=10).json()
    stored = store.get("hard")
    assert info["config"] == stored.config.to_dict() and info["metrics"] == stored.metrics
    assert info["record_bytes"] == stored.record_bytes and info["servable"] is True
    alien = requests.get(f"{server}/v1/profiles/other-bank", timeout=10).json()
    assert alien["servable"] is False and OTHER_BANK.fingerprint in alien["problem"]


@pytest.mark.ray
def test_profiles_are_listed_in_pages(server, store):
    ids = store.ids()
    first = requests.get(f"{server}/v1/profiles?offset=0&limit=4", timeout=10).json()
    second = requests.get(f"{server}/v1/profiles?offset=4&limit=4", timeout=10).json()
    assert first["total"] == len(ids)
    assert [p["profile_id"] for p in first["profiles"] + second["profiles"]] == ids[:8]


@pytest.mark.ray
def test_the_api_publishes_its_openapi_schema(server):
    schema = requests.get(f"{server}/openapi.json", timeout=10).json()
    assert {"/v1/classify", "/v1/profiles", "/v1/profiles/{profile_id}", "/healthz"} <= set(schema["paths"])
    assert "ClassifyRequest" in schema["components"]["schemas"]


@pytest.mark.ray
def test_with_auth_on_a_request_without_the_token_is_refused(server):
    url = f"{server}/secure/v1/classify"
    body = {"profile_id": "hard", "texts": ["x"]}
    assert requests.post(url, json=body, timeout=30).status_code == 401
    wrong = requests.post(url, json=body, headers={"Authorization": "Bearer nope"}, timeout=30)
    assert wrong.status_code == 401 and "bearer token" in wrong.json()["detail"]
    right = requests.post(url, json=body, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
    assert right.status_code == 200 and right.json()["predictions"]
    assert requests.get(f"{server}/secure/v1/profiles/hard", timeout=10).status_code == 401
    assert requests.get(f"{server}/secure/healthz", timeout=10).status_code == 200  # probes need no token


@pytest.mark.ray
def test_with_auth_on_the_fit_routes_are_refused_without_the_token_and_answered_with_it(server):
    """The fit routes over HTTP behind the token: 401 without it or with another; with it, this app (no fit
    workers) answers 409 naming the setting. (Fits themselves: tests/test_on_demand.py.)"""
    url, token = f"{server}/secure", {"Authorization": f"Bearer {TOKEN}"}
    body = {"texts": ["a good one", "a bad one", "good again", "bad again"], "labels": ["1", "0", "1", "0"]}
    fit = f"{url}/v1/profiles/newcomer/fit"
    assert requests.post(fit, json=body, timeout=30).status_code == 401
    assert requests.get(f"{url}/v1/jobs/0123456789abcdef0123456789abcdef", timeout=30).status_code == 401
    assert requests.post(fit, json=body, headers={"Authorization": "Bearer nope"}, timeout=30).status_code == 401
    right = requests.post(fit, json=body, headers=token, timeout=30)
    assert right.status_code == 409 and "fit_workers=0" in right.json()["detail"], right.text


@pytest.mark.ray
def test_over_http_generated_requests_get_documented_answers_and_never_a_5xx(server, store, counted_http):
    """A short schemathesis run against the Serve app (the long one is in process: tests/test_api.py)."""
    token = {"Authorization": f"Bearer {TOKEN}"}

    def call(case, i: int) -> None:
        case.validate_response(case.call(), checks=CHECKS)
        if i % 10 == 0:
            assert classify(server, "soft", ["still here"])["predictions"]

    def call_secure(case, i: int) -> None:
        case.headers = {k: v for k, v in (case.headers or {}).items() if k.lower() != "authorization"}
        case.validate_response(case.call(headers=token), checks=CHECKS)
        without = case.call()
        case.validate_response(without, checks=CHECKS)
        assert without.status_code != 200 or not case.operation.path.startswith("/v1/"), without.text

    few = {"POST /v1/classify": 60, "GET /v1/profiles": 15, "GET /v1/profiles/{profile_id}": 15, "GET /healthz": 2}
    few |= {"POST /v1/profiles/{profile_id}/fit": 10, "GET /v1/jobs/{job_id}": 3}
    counts = fuzz(f"{server}/openapi.json", store.ids(), call, few)
    counted_http.update({f"{k} (over HTTP)": v for k, v in counts.items()})
    fewer = {k: max(1, v // 3) for k, v in few.items()}
    secure = fuzz(f"{server}/secure/openapi.json", store.ids(), call_secure, fewer)
    counted_http.update({f"{k} (over HTTP, auth on)": v for k, v in secure.items()})
    assert counts.total() >= 50 and set(secure) == set(counts)
    assert classify(server, "soft", ["still here"])["predictions"]


@pytest.fixture(scope="module")
def counted_http(request):
    counts: Counter = Counter()
    yield counts
    request.config.stash.setdefault(API_CASES, Counter()).update(counts)


@pytest.mark.ray
@pytest.mark.parametrize("prefix", ["", "/secure"])
@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_over_http_the_docs_need_no_cdn_and_their_assets_are_served(server, prefix, page):
    r = requests.get(f"{server}{prefix}{page}", timeout=30)
    assert r.status_code == 200 and "text/html" in r.headers["content-type"]
    assert not re.search(r"https?://|//cdn", r.text), "the docs page loads something from another host"
    urls = re.findall(r"""(?:src|href|spec-url)=["']([^"']+)["']|url: '([^']+)'""", r.text)
    assert len(urls) >= 3, r.text
    for url in (a or b for a, b in urls):
        assert url.startswith(f"{prefix}/"), url  # under the app's route prefix
        assert requests.get(server + url, timeout=30).status_code == 200, url


@pytest.mark.ray
@pytest.mark.slow
def test_a_replica_killed_mid_request_gets_a_json_503_with_retry_after_and_the_next_request_is_served(
    server, store, backbone
):
    """kill -9 of the replica while a request waits in it (a 3 s batch wait holds it there)."""
    from ray import serve

    from xpeft.serve.deployment import build_app

    cfg = ServeConfig(store=store.uri, backbone=backbone, cpus_per_actor=0.25, batch_wait_s=3.0, max_batch_size=64)
    cfg = dataclasses.replace(cfg, fit_workers=0)
    serve.run(build_app(cfg), name="xpeft-kill", route_prefix="/kill")
    url = f"{server}/kill/v1/classify"
    try:
        assert requests.post(url, json={"profile_id": "soft", "texts": ["warm"]}, timeout=60).status_code == 200
        (pid,) = replica_pids("xpeft-kill")
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(requests.post, url, json={"profile_id": "soft", "texts": ["x"]}, timeout=60)
            time.sleep(1.0)
            os.kill(pid, signal.SIGKILL)
            r = pending.result()
        assert r.status_code == 503, (r.status_code, r.text)
        assert r.headers["content-type"] == "application/json" and int(r.headers["retry-after"]) >= 1
        assert "retry it after" in r.json()["detail"]
        killed, deadline = time.monotonic(), time.monotonic() + 120
        while True:  # a client that does as Retry-After says
            again = requests.post(url, json={"profile_id": "soft", "texts": ["x"]}, timeout=120)
            if again.status_code != 503 or time.monotonic() > deadline:
                break
            time.sleep(int(again.headers["retry-after"]))
        assert again.status_code == 200, again.text
        print(f"served again {time.monotonic() - killed:.1f} s after the kill")
    finally:
        serve.delete("xpeft-kill")


def half_sent(port: int, path: str) -> socket.socket:
    """A connection that sends its headers and 10 of its 100 body bytes, then waits."""
    conn = socket.create_connection(("127.0.0.1", port), timeout=60)
    head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
    conn.sendall(head.encode() + b'{"profile_')
    return conn


@pytest.mark.ray
@pytest.mark.slow
def test_slow_clients_holding_half_sent_bodies_block_neither_a_normal_client_nor_healthz(server, store, backbone):
    """40 connections that send half a body and wait, twice what Serve lets the replica take at once here (20):
    the proxy reads bodies before it picks a replica, so they hold proxy connections, not replica slots."""
    from ray import serve

    from xpeft.serve.deployment import build_app

    cfg = ServeConfig(
        store=store.uri,
        backbone=backbone,
        cpus_per_actor=0.25,
        max_ongoing_requests=2,
        max_queued_requests=2,
        fit_workers=0,
    )
    serve.run(build_app(cfg), name="xpeft-slow", route_prefix="/slow")
    url, port = f"{server}/slow", int(server.rsplit(":", 1)[1])
    slow = [half_sent(port, "/slow/v1/classify") for _ in range(40)]
    try:
        time.sleep(1.0)  # they are all waiting in the proxy now
        start = time.perf_counter()
        for i in range(5):
            r = requests.post(
                f"{url}/v1/classify", json={"profile_id": "soft", "texts": [f"still here {i}"]}, timeout=60
            )
            assert r.status_code == 200, r.text
        served = time.perf_counter() - start
        start = time.perf_counter()
        health = requests.get(f"{url}/healthz", timeout=30)
        answered = time.perf_counter() - start
        # generous bounds for a shared machine; the slow clients hold on for 30 s (the proxy's body timeout)
        assert served < 20 and health.status_code == 200 and answered < 5, (served, answered, health.text)
    finally:
        for conn in slow:
            conn.close()
        serve.delete("xpeft-slow")


@pytest.mark.ray
@pytest.mark.slow
def test_while_a_replica_starts_healthz_answers_503_starting_with_what_it_waits_for(server, store, backbone):
    import threading

    from ray import serve

    from xpeft.serve.deployment import build_app

    cfg = ServeConfig(store=store.uri, backbone=backbone, cpus_per_actor=0.25, fit_workers=0)
    deploying = threading.Thread(
        target=serve.run, args=(build_app(cfg),), kwargs={"name": "xpeft-late", "route_prefix": "/late"}
    )
    deploying.start()
    seen, deadline = [], time.monotonic() + 180
    try:
        while time.monotonic() < deadline:
            r = requests.get(f"{server}/late/healthz", timeout=30)
            seen.append((r.status_code, r.json().get("status"), r.json().get("detail", "")))
            if r.status_code == 200:
                break
            time.sleep(0.3)
    finally:
        deploying.join(120)
        serve.delete("xpeft-late")
    # Until its route exists, the app at "/" answers (404); then the proxy, until the replica is ready.
    starting = [detail for code, status, detail in seen if code == 503 and status == "starting"]
    assert seen[-1][:2] == (200, "ok") and any("waiting for" in d for d in starting), [s[:2] for s in seen] + seen[-1:]
