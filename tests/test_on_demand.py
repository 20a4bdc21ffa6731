"""Profiles fitted on demand (POST /v1/profiles/{id}/fit, GET /v1/jobs/{id}): in process over the FastAPI app of
a LocalServer (the job queue, its rules, a restart), then over real HTTP against Serve with the fit workers as
Ray actors (a killed worker, a full queue, auth, and the farm and the endpoint giving the same profile)."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from api_cases import save_test_recipe
from cases import BANK, CASES, store_cases
from conftest import eventually
from fastapi.testclient import TestClient

from xpeft.core.encoder import load_encoder
from xpeft.data.dataset import profile_datas
from xpeft.fit.on_demand import examples_data, load_recipe, recipe_fitter
from xpeft.profiles.jobs import RUNNING, JobTable, new_job
from xpeft.profiles.store import ProfileStore, lance_options
from xpeft.serve.api import make_api
from xpeft.serve.config import ServeConfig
from xpeft.serve.fits import FitJobs, LocalRunner
from xpeft.serve.local import LocalServer

WORDS = {"neg": "bad awful boring sad", "neu": "news old market school", "pos": "good great fun happy"}


def examples(n: int = 12, seed: int = 0) -> dict:
    """A user's labelled texts: each label's words, shuffled in."""
    g = torch.Generator().manual_seed(seed)
    names = list(WORDS)
    labels = [names[int(i)] for i in torch.randint(0, 3, (n,), generator=g)]
    texts = [f"{WORDS[lab]} w{int(torch.randint(0, 50, (1,), generator=g))}" for lab in labels]
    return {"texts": texts, "labels": labels}


def wait_for(client, job_id: str, timeout: float = 120.0, headers: dict | None = None) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = client.get(f"/v1/jobs/{job_id}", headers=headers).json()
        if job["status"] in ("succeeded", "failed"):
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} not done in {timeout} s: {job}")


@pytest.fixture(scope="module")
def store(tmp_path_factory, backbone):
    store = ProfileStore(tmp_path_factory.mktemp("store"))
    store_cases(store, load_encoder(backbone), CASES[:1])  # "hard", with labels neg / neu / pos
    save_test_recipe(store, backbone)
    return store


@pytest.fixture(scope="module")
def client(store, backbone):
    cfg = ServeConfig(store=store.uri, backbone=backbone, staleness_s=0.2, max_queued_fits=4)
    server = LocalServer(cfg)
    with TestClient(make_api(server), raise_server_exceptions=False) as c:
        yield c
    server.jobs.close()


# --- in process ------------------------------------------------------------------------------------------


def test_fit_route_answers_202_and_the_job_succeeds_and_classify_serves_the_new_version(client, store):
    before = client.post("/v1/classify", json={"profile_id": "hard", "texts": ["good fun"]}).json()
    r = client.post("/v1/profiles/hard/fit", json=examples())
    assert r.status_code == 202 and r.json()["status"] in ("queued", "running"), r.text
    job = wait_for(client, r.json()["job_id"])
    assert job["status"] == "succeeded", job
    assert job["metrics"]["n_train"] + job["metrics"]["n_test"] == 12 and len(job["fingerprint"]) == 64
    deadline = time.time() + 10  # the server's view of the store refreshes within staleness_s
    while client.get("/v1/profiles/hard").json()["metrics"].get("job_id") != job["job_id"]:
        assert time.time() < deadline, "the refit profile was never served"
        time.sleep(0.1)
    after = client.post("/v1/classify", json={"profile_id": "hard", "texts": ["good fun"]}).json()
    assert after["predictions"][0]["probabilities"] != before["predictions"][0]["probabilities"]
    store.refresh()
    assert store.get("hard").metrics["job_id"] == job["job_id"]


def test_on_demand_fit_of_a_new_profile_is_served_once_done(client):
    job = wait_for(client, client.post("/v1/profiles/newcomer/fit", json=examples(seed=1)).json()["job_id"])
    assert job["status"] == "succeeded" and job["profile_id"] == "newcomer"
    deadline = time.time() + 10
    while (r := client.post("/v1/classify", json={"profile_id": "newcomer", "texts": ["sad"]})).status_code != 200:
        assert r.status_code == 404 and time.time() < deadline, r.text
        time.sleep(0.1)
    assert r.json()["predictions"][0]["label_name"] in WORDS


def test_on_demand_fit_takes_the_requests_epochs_and_batch_size_and_the_profile_records_them(client):
    """A user's per-profile overrides reach the fit loop (the recipe's: 3 epochs of 8), and the profile says how it
    was fitted."""
    job = wait_for(client, client.post("/v1/profiles/quick/fit", json=examples(seed=2)).json()["job_id"])
    quick = {**examples(seed=2), "epochs": 2, "batch_size": 3}
    quick_job = wait_for(client, client.post("/v1/profiles/quick-2/fit", json=quick).json()["job_id"])
    n = job["metrics"]["n_train"]
    assert {k: job["metrics"][k] for k in ("epochs", "batch_size", "steps")} == {
        "epochs": 3, "batch_size": 8, "steps": 3 * -(-n // 8)}  # fmt: skip
    assert {k: quick_job["metrics"][k] for k in ("epochs", "batch_size", "steps")} == {
        "epochs": 2, "batch_size": 3, "steps": 2 * -(-n // 3)}  # fmt: skip


@pytest.mark.parametrize(
    "body,words",
    [
        ({"texts": ["a b", "c d", "e f"], "labels": ["neg", "happy", "pos"]}, "labels[1] ('happy'): not a class"),
        ({"texts": ["good", "bad"], "labels": ["pos", "neg"]}, "send at least 3 examples"),
        ({"texts": ["good", "bad", "fun"], "labels": ["pos", "neg"]}, "labels has 2 entries for 3 texts"),
        ({"texts": ["a", "b", "c"], "labels": ["pos"] * 3, "split": ["test"] * 3}, "0 training and 3 holdout"),
        ({**examples(), "epochs": 51}, "max_fit_epochs"),
        ({**examples(), "batch_size": 10**9}, "max_fit_examples"),
    ],
    ids=["unknown label", "too few", "labels not one per text", "no training rows", "too many epochs", "huge batch"],
)
def test_on_demand_examples_that_cannot_be_fitted_get_422_naming_the_rows_and_no_job(client, body, words):
    r = client.post("/v1/profiles/someone/fit", json=body)
    assert r.status_code == 422 and words in r.json()["detail"], r.text


def blocked_server(store, backbone, **cfg) -> tuple[LocalServer, threading.Event]:
    """A LocalServer whose fits wait for the event (a fit that takes as long as a test needs)."""
    release = threading.Event()

    class Waiting(LocalRunner):
        def fit(self, data, xcfg, tcfg):
            release.wait(60)
            return super().fit(data, xcfg, tcfg)

    config = ServeConfig(store=store.uri, backbone=backbone, **cfg)
    jobs = FitJobs(config, owner=f"blocked-{time.time()}", runner=Waiting)
    return LocalServer(config, jobs=jobs), release


def test_fit_route_with_a_full_queue_answers_429_with_retry_after(store, backbone):
    server, release = blocked_server(store, backbone, max_queued_fits=2, fit_workers=1)
    with TestClient(make_api(server)) as c:
        first = [c.post(f"/v1/profiles/q{i}/fit", json=examples(seed=i)) for i in range(2)]
        assert [r.status_code for r in first] == [202, 202]
        full = c.post("/v1/profiles/q9/fit", json=examples(seed=9))
        assert full.status_code == 429 and int(full.headers["Retry-After"]) >= 1, full.text
        assert "max_queued_fits=2" in full.json()["detail"]
        release.set()
        assert all(wait_for(c, r.json()["job_id"])["status"] == "succeeded" for r in first)
    server.jobs.close()


def test_a_repeated_post_answers_the_job_in_flight_and_other_examples_get_409_naming_it(store, backbone):
    server, release = blocked_server(store, backbone)
    with TestClient(make_api(server)) as c:
        job = c.post("/v1/profiles/dup/fit", json=examples(seed=3)).json()
        again = c.post("/v1/profiles/dup/fit", json=examples(seed=3))
        assert again.status_code == 202 and again.json()["job_id"] == job["job_id"]
        other = c.post("/v1/profiles/dup/fit", json=examples(seed=4))
        assert other.status_code == 409 and job["job_id"] in other.json()["detail"], other.text
        release.set()
        assert wait_for(c, job["job_id"])["status"] == "succeeded"
        assert c.post("/v1/profiles/dup/fit", json=examples(seed=4)).status_code == 202  # once it is done
    server.jobs.close()


def test_a_restarted_server_finishes_the_fit_job_it_was_running_and_writes_it_once(store, backbone):
    cfg = ServeConfig(store=store.uri, backbone=backbone)
    table = JobTable(store.root, lance_options(store.options))
    owner = f"restarted-{time.time()}"
    request = examples(seed=5)
    interrupted = table.put({**new_job("restart-me", owner, "d1", request), "status": RUNNING, "attempts": 1})
    queued = table.put(new_job("restart-too", owner, "d2", examples(seed=6)))
    jobs = FitJobs(cfg, owner)  # starts: takes up its jobs of the previous run
    deadline = time.time() + 120
    while any(jobs.job(j["job_id"])["status"] not in ("succeeded", "failed") for j in (interrupted, queued)):
        assert time.time() < deadline
        time.sleep(0.1)
    jobs.close()
    assert jobs.job(interrupted["job_id"])["status"] == "succeeded" and jobs.job(queued["job_id"])["attempts"] == 1
    store.refresh()
    version = store.table.version()
    # It stopped again after writing the profile but before recording the job done: found done, not refit.
    table.update(table.get(interrupted["job_id"]), status=RUNNING)
    again = FitJobs(cfg, owner)
    again.close()
    assert again.job(interrupted["job_id"])["status"] == "succeeded"
    store.refresh()
    assert store.table.version() == version and store.get("restart-me").metrics["job_id"] == interrupted["job_id"]


def test_a_fit_job_the_server_kept_restarting_on_fails_with_the_reason_after_fit_retries(store, backbone):
    cfg = ServeConfig(store=store.uri, backbone=backbone, fit_retries=1)
    table = JobTable(store.root, lance_options(store.options))
    owner = f"crashing-{time.time()}"
    job = table.put({**new_job("crashes", owner, "d", examples()), "status": RUNNING, "attempts": 2})
    jobs = FitJobs(cfg, owner)
    jobs.close()
    got = jobs.job(job["job_id"])
    assert got["status"] == "failed" and "stopped while fitting it 2 times" in got["error"]


def test_the_same_rows_give_the_same_profile_through_the_farm_path_and_on_demand(store, backbone):
    """The farm splits a data set with profile_datas and fits each profile with the recipe's ProfileFitter; the
    endpoint's examples go through examples_data to the same fitter: the same tensors come out."""
    import pyarrow as pa

    recipe = load_recipe(store)
    ex = examples(n=16, seed=7)
    table = pa.table({"text": ex["texts"], "label": ex["labels"], "profile_id": ["same"] * 16})
    dataset = profile_datas(table)
    assert dataset.labels.label_names == recipe.label_names  # all three classes occur: the same vocabulary
    fitter = recipe_fitter(recipe, store)
    farm = fitter.fit(dataset.profiles[0]).profile
    on_demand = fitter.fit(examples_data(recipe, "same", ex["texts"], ex["labels"])).profile
    assert farm.mask_bits == on_demand.mask_bits and farm.tensors.keys() == on_demand.tensors.keys()
    assert all(torch.equal(farm.tensors[k], on_demand.tensors[k]) for k in farm.tensors)
    assert BANK.fingerprint == on_demand.bank_fingerprint


# --- over real HTTP, against Serve: the fit workers are Ray actors ------------------------------------------


@pytest.fixture(scope="module")
def served(tmp_path_factory, backbone):
    """A farm run into a fresh store (which records its recipe), then a Serve app over it with one fit worker
    and a queue of one fit (the fit route with auth on: tests/test_serving.py's '/secure' app)."""
    ray = pytest.importorskip("ray")
    from ray import serve
    from test_farm import farm_config, profile_table
    from test_serving import free_port

    from xpeft.ray.farm import run_farm
    from xpeft.serve.deployment import build_app

    table = profile_table(n_profiles=3)
    path = tmp_path_factory.mktemp("farm-store")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    run_farm(farm_config(path, backbone, num_actors=1), profile_datas(table).profiles)
    store = ProfileStore(path)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    common = dict(store=store.uri, backbone=backbone, cpus_per_actor=0.5, staleness_s=0.5)
    fits = dict(fit_cpus_per_actor=0.5, max_queued_fits=1, fit_retries=1, max_fit_epochs=5000)
    serve.run(build_app(ServeConfig(**common, **fits)), name="fits", route_prefix="/")
    yield f"http://127.0.0.1:{port}", store, table
    serve.shutdown()
    ray.shutdown()


def rows_of(table, profile_id: str) -> dict:
    """A farm profile's rows, in the data set's order, as a fit request (labels by their class names: this farm
    run was given none, so the class ids as text)."""
    rows = [r for r in table.to_pylist() if r["profile_id"] == profile_id]
    return {"texts": [r["text"] for r in rows], "labels": [str(r["label"]) for r in rows]}


class Http:
    """requests with the TestClient's calls, so wait_for serves both."""

    def __init__(self, url: str):
        self.url = url

    def get(self, path: str, headers: dict | None = None):
        return requests().get(self.url + path, headers=headers, timeout=30)

    def post(self, path: str, json: dict, headers: dict | None = None):
        return requests().post(self.url + path, json=json, headers=headers, timeout=30)


def requests():
    return pytest.importorskip("requests")


@pytest.mark.ray
def test_on_demand_over_http_the_endpoint_refits_the_farm_profile_it_was_given_the_rows_of_identically(served):
    """The batch job and the endpoint agree: the same rows, seed, bank and recipe give the same profile; and
    classify serves the new version once the job is done."""
    url, store, table = served
    http = Http(url)
    farm = store.get("author-00")
    start = time.perf_counter()
    r = http.post("/v1/profiles/author-00/fit", rows_of(table, "author-00"))
    assert r.status_code == 202, r.text
    job = wait_for(http, r.json()["job_id"])
    assert job["status"] == "succeeded", job
    while http.get("/v1/profiles/author-00").json()["metrics"].get("job_id") != job["job_id"]:
        assert time.perf_counter() - start < 60, "the refit profile was never served"
        time.sleep(0.05)
    answer = http.post("/v1/classify", {"profile_id": "author-00", "texts": ["vote election politics"]})
    assert answer.status_code == 200 and answer.json()["predictions"][0]["label"] in range(4)
    store.refresh()
    refit = store.get("author-00")
    assert refit.created > farm.created and refit.mask_bits == farm.mask_bits
    assert all(torch.equal(refit.tensors[k], farm.tensors[k]) for k in farm.tensors)


@pytest.mark.ray
def test_a_fit_worker_killed_mid_fit_the_job_completes_with_one_version_written_and_a_full_queue_gets_429(served):
    import os
    import signal

    from test_farm import _actor_pids

    url, store, table = served
    http = Http(url)
    store.refresh()
    before = store.table.version()
    r = http.post("/v1/profiles/author-01/fit", {**rows_of(table, "author-01"), "epochs": 200})
    assert r.status_code == 202, r.text
    job_id = r.json()["job_id"]
    full = http.post("/v1/profiles/author-02/fit", rows_of(table, "author-02"))  # max_queued_fits=1
    assert full.status_code == 429 and int(full.headers["Retry-After"]) >= 1, full.text
    deadline = time.time() + 60
    while http.get(f"/v1/jobs/{job_id}").json()["status"] != "running" or not _actor_pids():
        assert time.time() < deadline, "the job never started on a fit worker"
        time.sleep(0.1)
    time.sleep(1.0)  # into the fit
    [worker] = _actor_pids()
    os.kill(worker, signal.SIGKILL)
    # Mid-fit, or this test shows nothing: a fit that ended before the kill leaves the job done, the worker idle.
    assert http.get(f"/v1/jobs/{job_id}").json()["status"] == "running", "the fit ended before the kill: more epochs"
    job = wait_for(http, job_id, timeout=300)
    assert job["status"] == "succeeded", job
    # the restarted process is named after the actor once it is up
    eventually(lambda: [p for p in _actor_pids() if p != worker], "Ray restarting the fit worker", poll_s=0.2)
    # Exactly one version of the profile was written (a retried fit writes only when it ends).
    import lance

    ds = lance.dataset(f"{store.root}/profiles.lance")
    versions = [v["version"] for v in ds.versions() if v["version"] > before]
    created = {
        t
        for v in versions
        for t in ds.checkout_version(v)
        .to_table(filter="profile_id = 'author-01'", columns=["created"])["created"]
        .to_pylist()
    }
    assert len(created) == 1 and store.get("author-01") is not None
