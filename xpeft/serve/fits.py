"""Profiles fitted on demand, without Ray or FastAPI: the queue of fit jobs behind `POST /v1/profiles/{id}/fit`.

    jobs = FitJobs(ServeConfig(store="runs/demo"))          # in process (LocalServer's): fits in its threads
    job, new = jobs.submit("p1", {"texts": [...], "labels": [...]})
    jobs.job(job["job_id"])                                  # queued → running → succeeded (or failed, why)

A job is checked against the store's recipe (xpeft.fit.on_demand) and recorded in the store's job table
(xpeft.profiles.jobs) before `submit` returns; `fit_workers` threads take queued jobs in order and hand each to
the runner (the Serve deployment's: Ray actors with CPUs of their own, xpeft.serve.deployment; LocalServer's: a
fitter in this process). A fitted profile is upserted into the store with its job id in its metrics, then the
job is marked succeeded: replicas serve it within their staleness.

The rules: a POST for a profile with a job queued or running answers with that job when its examples and
overrides are the same (a retried POST), and 409 naming it when they differ (a job in flight is never replaced:
POST again once it is done). More than `max_queued_fits` jobs queued or running: 429 with Retry-After. A worker
that dies mid-fit has the fit retried up to `fit_retries` times (by the runner), then the job fails. A server
that stops loses no job: when it starts again it queues its queued jobs again, and a running one is found
succeeded (its profile is in the store with its job id: never written twice) or queued again (at most
`fit_retries` times).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from xpeft.fit.on_demand import FitRecipe, examples_data, load_recipe, recipe_fitter, with_overrides
from xpeft.fit.profile import BadProfileData
from xpeft.profiles.fingerprints import metadata
from xpeft.profiles.jobs import FAILED, QUEUED, RUNNING, SUCCEEDED, JobTable, new_job
from xpeft.profiles.record import to_row
from xpeft.profiles.store import ProfileStore, lance_options
from xpeft.serve.config import ServeConfig
from xpeft.serve.view import ServeError

log = logging.getLogger(__name__)

JOB_ID_CHARS = set("0123456789abcdef")
SHOWN_FIELDS = ("job_id", "profile_id", "status", "attempts", "error", "updated")


class WorkerDied(RuntimeError):
    """A fit worker died mid-fit more often than `fit_retries` allows (the runner's word for it)."""


class LocalRunner:
    """Fits in the caller's thread with the recipe's fitter, loaded once (LocalServer's runner)."""

    def __init__(self, recipe: FitRecipe, store: ProfileStore):
        self.recipe, self.store = recipe, store
        self._fitter = None
        self._lock = threading.Lock()

    def fit(self, data, xcfg, tcfg) -> dict[str, Any]:
        with self._lock:
            if self._fitter is None:
                self._fitter = recipe_fitter(self.recipe, self.store)
        out = self._fitter.with_configs(xcfg, tcfg).fit(data)
        return {"profile": out.profile, "seconds": out.seconds}


Runner = Callable[[FitRecipe, ProfileStore], Any]  # (recipe, store) -> an object with fit(data, xcfg, tcfg)


def why_no_fits(cfg: ServeConfig, recipe: FitRecipe | None) -> str | None:
    """Why a server over `cfg.store` fits nothing (POST .../fit answers 409 with it); None when it fits."""
    if not cfg.fit_workers:
        return "this server runs no fit workers (ServeConfig.fit_workers=0): deploy it with fit_workers >= 1"
    if recipe is None:
        return (
            f"the store {cfg.store} has no fit recipe (state/recipe.json, which `xpeft fit-profiles` writes): fill "
            "it once with the farm, whose recipe (bank, masks, fit, labels) every fit on demand repeats; then "
            "restart the server"
        )
    return None


def shown(job: dict[str, Any]) -> dict[str, Any]:
    """What GET /v1/jobs/{id} answers: the job without its request, its result's fields at the top."""
    return {**{k: job[k] for k in SHOWN_FIELDS}, "submitted": job["created"], **(job["result"] or {})}


class FitJobs:
    """The fit jobs of one server (`owner`) over `cfg.store`: submit, look up, and the worker threads."""

    def __init__(self, cfg: ServeConfig, owner: str = "local", runner: Runner = LocalRunner):
        self.cfg, self.owner = cfg, owner
        self.store = ProfileStore(cfg.store)
        self.recipe = load_recipe(self.store)
        self.table = JobTable(self.store.root, lance_options(self.store.options))
        self.queue: deque[str] = deque()
        self.running: set[str] = set()
        self.seconds: deque[float] = deque(maxlen=20)  # recent fits, for Retry-After
        self.cv = threading.Condition()
        self.closed = False
        workers = cfg.fit_workers if self.recipe is not None else 0
        self.runner = runner(self.recipe, self.store) if workers else None
        self._recover()
        self.threads = [threading.Thread(target=self._work, daemon=True, name=f"xpeft-fit-{i}") for i in range(workers)]
        for t in self.threads:
            t.start()

    # --- requests -------------------------------------------------------------------------------------

    def submit(self, profile_id: str, request: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        """(the job, whether it is new) for a fit of `profile_id` on `request` (texts, labels, optional
        text_pairs, split, epochs, batch_size, mask_type); a ServeError (409, 413, 422, 429) naming what to do
        otherwise."""
        self._check(profile_id, request)
        digest = hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()
        with self.cv:  # one submit at a time: the duplicate rule and the queue's bound hold
            for job in self.table.active(profile_id):
                if job["digest"] == digest:
                    return shown(job), False
                raise ServeError(
                    409,
                    f"profile {profile_id!r} has fit job {job['job_id']} {job['status']} with other examples; a job "
                    f"in flight is not replaced: GET /v1/jobs/{job['job_id']} until it is done, then POST again",
                )
            waiting = len(self.queue) + len(self.running)
            if waiting >= self.cfg.max_queued_fits:
                raise ServeError(
                    429,
                    f"{waiting} fits are queued or running, the most this server takes "
                    f"(ServeConfig.max_queued_fits={self.cfg.max_queued_fits}): retry after the Retry-After seconds",
                    headers={"Retry-After": str(self.retry_after())},
                )
            job = self.table.put(new_job(profile_id, self.owner, digest, request))  # durable before the 202
            self.queue.append(job["job_id"])
            self.cv.notify()
        return shown(job), True

    def job(self, job_id: str) -> dict[str, Any]:
        """The job as GET /v1/jobs/{id} shows it; ServeError 404 when there is none."""
        found = self.table.get(job_id) if len(job_id) == 32 and set(job_id) <= JOB_ID_CHARS else None
        if found is None:
            raise ServeError(404, f"no fit job {job_id!r} in the store; POST /v1/profiles/{{id}}/fit answers a job id")
        return shown(found)

    def retry_after(self) -> int:
        """Seconds until a slot is likely free: the recent fits' mean time over the queue and the workers."""
        mean = sum(self.seconds) / len(self.seconds) if self.seconds else 5.0
        return max(1, math.ceil(mean * (len(self.queue) + 1) / max(1, len(self.threads))))

    def _check(self, profile_id: str, request: dict[str, Any]) -> None:
        cfg = self.cfg
        why = why_no_fits(cfg, self.recipe)
        if why:
            raise ServeError(409, why)
        texts = request["texts"] + (request.get("text_pairs") or [])
        if len(request["texts"]) > cfg.max_fit_examples:
            raise ServeError(
                413,
                f"{len(request['texts'])} examples in one fit; the limit is {cfg.max_fit_examples} "
                "(ServeConfig.max_fit_examples): fit on a sample, or with the farm (xpeft fit-profiles)",
            )
        longest = max(len(t) for t in texts)
        if longest > cfg.max_text_chars:
            raise ServeError(
                413, f"a text of {longest} characters; the limit is {cfg.max_text_chars} (ServeConfig.max_text_chars)"
            )
        if request.get("epochs", 0) > cfg.max_fit_epochs:
            raise ServeError(
                422, f"epochs={request['epochs']} is over {cfg.max_fit_epochs} (ServeConfig.max_fit_epochs): send fewer"
            )
        if request.get("batch_size", 0) > cfg.max_fit_examples:
            raise ServeError(
                422,
                f"batch_size={request['batch_size']} is over {cfg.max_fit_examples} (ServeConfig.max_fit_examples, the "
                "most examples a fit has): send at most that",
            )
        try:
            self._data(profile_id, request)
        except BadProfileData as e:
            raise ServeError(422, f"the examples cannot be fitted: {e}") from None

    def _data(self, profile_id: str, request: dict[str, Any]):
        r = request
        data = examples_data(self.recipe, profile_id, r["texts"], r["labels"], r.get("text_pairs"), r.get("split"))
        return data, *with_overrides(self.recipe, r.get("epochs"), r.get("mask_type"), r.get("batch_size"))

    # --- the workers ----------------------------------------------------------------------------------

    def _recover(self) -> None:
        """Take up this owner's jobs of a previous run: queued ones again; a running one succeeded when its
        profile is stored with its job id, else queued again (or failed after fit_retries restarts)."""
        for job in self.table.owned(self.owner):
            if self.runner is None:
                self.table.update(job, status=FAILED, error="the server restarted without fit workers or recipe")
                continue
            if job["status"] == RUNNING:
                stored = self.store.get_many([job["profile_id"]]).get(job["profile_id"])
                if getattr(stored, "metrics", {}).get("job_id") == job["job_id"]:
                    self.table.update(job, status=SUCCEEDED, result=self._result(stored))
                    continue
                if job["attempts"] > self.cfg.fit_retries:
                    why = f"the server stopped while fitting it {job['attempts']} times (fit_retries)"
                    self.table.update(job, status=FAILED, error=why)
                    continue
                job = self.table.update(job, status=QUEUED)
            self.queue.append(job["job_id"])

    def _work(self) -> None:
        while True:
            with self.cv:
                while not self.queue and not self.closed:
                    self.cv.wait()
                if self.closed:
                    return
                job_id = self.queue.popleft()
                self.running.add(job_id)
            try:
                self._run(job_id)
            except Exception as e:  # noqa: BLE001 - a bug here, not in the fit: logged, and reported on the job
                log.exception("fit job %s", job_id)
                self._fail(job_id, f"internal error ({type(e).__name__}: {e}); see the server's log")
            finally:
                with self.cv:
                    self.running.discard(job_id)

    def _run(self, job_id: str) -> None:
        job = self.table.get(job_id)
        job = self.table.update(job, status=RUNNING, attempts=job["attempts"] + 1)
        try:
            data, xcfg, tcfg = self._data(job["profile_id"], job["request"])
            out = self.runner.fit(data, xcfg, tcfg)
            profile = out["profile"]
            profile = replace(profile, metrics={**profile.metrics, "job_id": job_id})
            self.store.write([profile])
        except (WorkerDied, BadProfileData) as e:
            self.table.update(job, status=FAILED, error=str(e))
            return
        except Exception as e:  # noqa: BLE001 - the fit's own error, reported on the job
            log.exception("fit job %s failed", job_id)
            self.table.update(job, status=FAILED, error=f"{type(e).__name__}: {e}")
            return
        self.seconds.append(out["seconds"])
        self.table.update(job, status=SUCCEEDED, result={**self._result(profile), "seconds": out["seconds"]})

    def _fail(self, job_id: str, why: str) -> None:
        try:
            self.table.update(self.table.get(job_id), status=FAILED, error=why)
        except Exception:  # noqa: BLE001 - the store itself fails: the job stays running until the next start
            log.exception("recording fit job %s failed", job_id)

    def _result(self, profile) -> dict[str, Any]:
        return {
            "metrics": profile.metrics,
            "fingerprint": metadata(to_row(profile)["tensors"])["fingerprint"],
            "store_version": self.store.table.version(),
        }

    def close(self) -> None:
        """Stop the worker threads once their current fits end (queued jobs stay recorded)."""
        with self.cv:
            self.closed = True
            self.cv.notify_all()
