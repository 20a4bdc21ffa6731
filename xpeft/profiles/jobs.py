"""The store's table of fit jobs (`jobs.lance`, beside `profiles.lance`): every profile fit the server accepted,
recorded before it answers 202, so none is lost when a server stops.

A job is one row: its id, the profile, its status (queued, running, succeeded, failed), the request (the
examples and overrides, as JSON: what a restarted server fits again), its attempts, the reason it failed, the
result (metrics, the record's fingerprint, the store version that serves it), and its `owner` (the server that
runs it: a restarted server takes up its own queued and running jobs, not another's). Each change is one Lance
upsert by job id, which Lance rebases over a concurrent writer's.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from typing import Any

import lance
import pyarrow as pa

from xpeft.profiles.writes import CONFLICT_RETRIES, RETRY_TIMEOUT, quote, retried

TABLE = "jobs.lance"
QUEUED, RUNNING, SUCCEEDED, FAILED = "queued", "running", "succeeded", "failed"
STATUSES = (QUEUED, RUNNING, SUCCEEDED, FAILED)
ACTIVE = (QUEUED, RUNNING)
JSON_FIELDS = ("request", "result")

SCHEMA = pa.schema(
    [
        ("job_id", pa.string()),
        ("profile_id", pa.string()),
        ("owner", pa.string()),
        ("status", pa.string()),
        ("digest", pa.string()),  # the request's sha256: a repeated POST is recognised as the same job
        ("request", pa.string()),
        ("attempts", pa.int64()),
        ("error", pa.string()),
        ("result", pa.string()),
        ("created", pa.float64()),
        ("updated", pa.float64()),
    ]
)


def new_job(profile_id: str, owner: str, digest: str, request: dict[str, Any]) -> dict[str, Any]:
    now = time.time()
    return {
        "job_id": uuid.uuid4().hex,
        "profile_id": profile_id,
        "owner": owner,
        "status": QUEUED,
        "digest": digest,
        "request": request,
        "attempts": 0,
        "error": None,
        "result": None,
        "created": now,
        "updated": now,
    }


def _row(job: dict[str, Any]) -> dict[str, Any]:
    return {**job, **{k: json.dumps(job[k]) if job[k] is not None else None for k in JSON_FIELDS}}


def _job(row: dict[str, Any]) -> dict[str, Any]:
    return {**row, **{k: json.loads(row[k]) if row[k] is not None else None for k in JSON_FIELDS}}


class JobTable:
    """The fit jobs of the store at `root` (a directory or object-store URI; `storage_options` as the store's)."""

    def __init__(self, root: str, storage_options: dict | None = None):
        self.uri = f"{root}/{TABLE}"
        self.options = storage_options
        self._ds = None
        self._lock = threading.Lock()  # one writer thread at a time here; Lance rebases over other processes'

    def _dataset(self):
        try:
            return lance.dataset(self.uri, storage_options=self.options)
        except (ValueError, OSError) as e:
            if "not found" in str(e).lower() or "does not exist" in str(e).lower():
                return None
            raise

    def put(self, job: dict[str, Any]) -> dict[str, Any]:
        """Insert or replace `job` (by job_id), stamped `updated` now; durable when this returns."""
        job = {**job, "updated": time.time()}
        rows = pa.Table.from_pylist([_row(job)], schema=SCHEMA)
        with self._lock:

            def attempt(_: int) -> None:
                ds = self._dataset()
                if ds is None:
                    try:
                        lance.write_dataset(rows, self.uri, mode="create", storage_options=self.options)
                        return
                    except (OSError, ValueError):  # another writer created it first: upsert into theirs
                        ds = self._dataset()
                (
                    ds.merge_insert("job_id")
                    .when_matched_update_all()
                    .when_not_matched_insert_all()
                    .conflict_retries(CONFLICT_RETRIES)
                    .retry_timeout(RETRY_TIMEOUT)
                    .execute(rows)
                )

            retried(f"recording job {job['job_id']}", attempt)
        return job

    def update(self, job: dict[str, Any], **changes: Any) -> dict[str, Any]:
        return self.put({**job, **changes})

    def _where(self, predicate: str) -> list[dict[str, Any]]:
        ds = self._dataset()
        if ds is None:
            return []
        return [_job(r) for r in ds.to_table(filter=predicate).to_pylist()]

    def get(self, job_id: str) -> dict[str, Any] | None:
        found = self._where(f"job_id = {quote(job_id)}")
        return found[0] if found else None

    def active(self, profile_id: str) -> list[dict[str, Any]]:
        """The profile's queued or running jobs, whoever runs them, oldest first."""
        statuses = ", ".join(quote(s) for s in ACTIVE)
        found = self._where(f"profile_id = {quote(profile_id)} AND status IN ({statuses})")
        return sorted(found, key=lambda j: j["created"])

    def owned(self, owner: str, statuses: tuple[str, ...] = ACTIVE) -> list[dict[str, Any]]:
        """`owner`'s jobs in these states, oldest first (what a restarted server takes up)."""
        listed = ", ".join(quote(s) for s in statuses)
        found = self._where(f"owner = {quote(owner)} AND status IN ({listed})")
        return sorted(found, key=lambda j: j["created"])
