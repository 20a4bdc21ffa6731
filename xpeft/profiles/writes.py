"""The profile table's commits: create, upsert, delete, drop damaged parts, compact. Each is one Lance commit
(or, for compaction, one per step), optimistic: a concurrent commit makes Lance rebase (`conflict_retries`), and
`retried` repeats the call on top with backoff, so writers in many processes lose nothing. A killed writer
leaves only files no manifest points at: nothing half-visible.

Three settings make that true with pylance 14.0.2, each found by measurement (BENCHMARKS.md, "Profile store"):
- `profile_id` is declared the table's unenforced primary key: without it, two writers inserting the same new
  id both commit it (lance-format/lance#4585);
- the upsert joins without the scalar index (`use_index(False)`): with it, the same race still duplicates
  (lance-format/lance#9238), and a condition on the indexed join fails outright;
- the table is created by a commit that cannot be rebased (`create`), never `write_dataset(mode="create")`,
  whose Overwrite is rebased over concurrent commits and replaces them.
"""

from __future__ import annotations

import logging
import random
import time
from datetime import timedelta

import lance
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

log = logging.getLogger(__name__)

KEY = "profile_id"
PK_META = {"lance-schema:unenforced-primary-key": "true"}
DATA_STORAGE_VERSION = "2.1"  # ~2x faster single-row takes of binary columns than 2.0 and 2.2 (measured)
TARGET_ROWS_PER_FRAGMENT = 65536  # the unit of compaction, and of damage: ~170 MB of 2.6 KB profiles
RETRIES = 30
CONFLICT_RETRIES = 10
RETRY_TIMEOUT = timedelta(seconds=60)
SMALL_PARTS_MAX = 64  # parts under 1/8 of the target size above which a writer merges them (see upsert)
AUTO_RETAIN = timedelta(hours=1)  # versions a writer's automatic merge keeps readable
MAX_INDEX_DELTAS = 16  # segments of the profile_id index (one per write) above which the deltas are merged


def with_primary_key(schema: pa.Schema) -> pa.Schema:
    """`schema` with profile_id declared the (unenforced) primary key, not nullable."""
    i = schema.get_field_index(KEY)
    f = schema.field(i)
    return schema.set(i, f.with_nullable(False).with_metadata({**(f.metadata or {}), **PK_META}))


def has_primary_key(schema: pa.Schema) -> bool:
    return (schema.field(KEY).metadata or {}).get(b"lance-schema:unenforced-primary-key") == b"true"


def quote(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def is_damage(e: BaseException) -> bool:
    """An error reading stored data (a truncated or missing data file), as Lance reports it."""
    s = str(e)
    return any(w in s for w in ("LanceError(IO)", "Not found", "failed to fill whole buffer")) or "corrupt" in s.lower()


def retryable(e: BaseException) -> bool:
    """A commit conflict or a throttled / transient store error; never damaged data (a retry cannot help).
    Status codes only: a bare "503" can appear inside a random S3 request id."""
    s = str(e).lower()
    words = ("too many requests", "timed out", "slowdown", "status code: 503", "status code: 429", "conflict")
    return any(w in s for w in (*words, "retryable", "precondition failed"))


def retried(what: str, fn, retries: int = RETRIES):
    """`fn(attempt)` until it does not raise a retryable error; backoff with jitter between attempts."""
    for attempt in range(1, retries + 1):
        try:
            return fn(attempt)
        except (OSError, RuntimeError, ValueError) as e:
            if not retryable(e) or attempt == retries:
                raise
            log.info("%s: attempt %d conflicted (%s); retrying", what, attempt, str(e).splitlines()[0][:200])
            time.sleep(min(2.0, 0.02 * 2 ** min(attempt, 7)) * random.random())
    raise AssertionError("unreachable")


def newest_per_id(rows: pa.Table) -> pa.Table:
    """One row per profile_id: the one with the largest `created` (the last one on ties)."""
    ids = rows.column(KEY)
    if ids.null_count:
        raise ValueError(f"{KEY} must not be null")
    if pc.count_distinct(ids).as_py() == rows.num_rows:
        return rows
    t = rows.append_column("__i", pa.array(np.arange(rows.num_rows)))
    t = t.sort_by([(KEY, "ascending"), ("created", "ascending"), ("__i", "ascending")])
    k = t.column(KEY).to_numpy(zero_copy_only=False)
    last = np.ones(len(k), bool)
    last[:-1] = k[:-1] != k[1:]
    return t.filter(pa.array(last)).drop_columns(["__i"])


def create(uri: str, rows: pa.Table, storage_options: dict | None) -> bool:
    """Create the table with `rows` as its first fragment; False when another writer created it first.

    The Overwrite is committed with max_retries=0, so it lands as version 1 or fails: a rebased Overwrite would
    silently replace what other writers committed meanwhile (measured: 20 of 150 profiles lost in 1 of 6 races)."""
    from lance import LanceOperation
    from lance.fragment import LanceFragment

    schema = with_primary_key(rows.schema)
    frag = LanceFragment.create(
        uri, rows.cast(schema), data_storage_version=DATA_STORAGE_VERSION, storage_options=storage_options
    )
    try:
        ds = lance.LanceDataset.commit(
            uri, LanceOperation.Overwrite(schema, [frag]), max_retries=0, storage_options=storage_options
        )
    except (OSError, ValueError) as e:
        log.info("%s was created by another writer first (%s)", uri, str(e).splitlines()[0][:120])
        return False  # our fragment's file stays unreferenced; compaction's cleanup removes it
    if ds.version != 1:  # cannot happen with max_retries=0; never paper over an overwrite
        raise RuntimeError(f"creating {uri} committed version {ds.version}, not 1: check its history")
    try:
        ds.create_scalar_index(KEY, "BTREE")  # lets a damaged part's ids be found without reading it
    except Exception as e:  # noqa: BLE001 - an optimisation; compaction builds it again
        log.info("creating the %s index on %s: %s", KEY, uri, e)
    return True


def merge(ds, rows: pa.Table, newest_wins: bool = True) -> dict:
    """Insert or replace `rows` by profile_id in one commit on top of `ds`; a stored row with a larger `created`
    is kept (a late retry of an old fit never undoes a refit)."""
    cond = "source.created >= target.created" if newest_wins else None
    try:
        r = (
            ds.merge_insert(KEY)
            .when_matched_update_all(cond)
            .when_not_matched_insert_all()
            .use_index(False)
            .conflict_retries(CONFLICT_RETRIES)
            .retry_timeout(RETRY_TIMEOUT)
            .execute(rows)
        )
        return dict(r)
    except OSError as e:
        if not is_damage(e):
            raise
        why = str(e).splitlines()[0][:200]
    # A part cannot be read, so the full join cannot run. Degraded: the index join reads only the parts of
    # matched rows; it is safe unless two writers insert the same *new* id at the same moment.
    log.warning("upsert into %s: the full join failed on damaged data (%s); using the index join", ds.uri, why)
    r = (
        ds.merge_insert(KEY)
        .when_matched_update_all()
        .when_not_matched_insert_all()
        .use_index(True)
        .conflict_retries(CONFLICT_RETRIES)
        .retry_timeout(RETRY_TIMEOUT)
        .execute(rows)
    )
    return {**dict(r), "degraded": why}


def delete(ds, ids: list[str]) -> int:
    """Mark the rows of `ids` deleted (deletion vectors only: no data file is read or rewritten)."""
    pred = f"{KEY} IN ({', '.join(quote(i) for i in ids)})"
    r = ds.delete(pred, conflict_retries=CONFLICT_RETRIES, retry_timeout=RETRY_TIMEOUT)
    return int((r or {}).get("num_deleted_rows", 0))


def drop_fragments(uri: str, ds, fragment_ids: list[int], storage_options: dict | None) -> int:
    """Drop whole fragments (damaged parts) in one commit; returns the rows dropped."""
    from lance import LanceOperation

    frags = {f.fragment_id: f for f in ds.get_fragments()}
    gone = [f for f in fragment_ids if f in frags]
    if not gone:
        return 0
    rows = sum(frags[f].metadata.physical_rows - frags[f].metadata.num_deletions for f in gone)
    op = LanceOperation.Delete([], gone, f"drop damaged parts {gone}")
    lance.LanceDataset.commit(uri, op, read_version=ds.version, storage_options=storage_options)
    log.warning("dropped parts %s of %s (%d profiles): they can be fitted again", gone, uri, rows)
    return rows


def unreadable_parts(ds, parts: list[int]) -> list[int]:
    """Which of `parts` cannot be read whole (every column, as compaction reads them)."""
    bad = []
    for fid in parts:
        try:
            for _ in ds.get_fragment(fid).to_batches(batch_size=4096):
                pass
        except Exception:  # noqa: BLE001 - any read failure is damage
            bad.append(fid)
    return bad


def rewrite(ds, target_rows: int, erase: bool) -> dict:
    """Compaction's rewrite, task by task: the parts of a task that fails on damaged data are read one by one,
    and the plan is made again without the damaged ones, so they never hold their neighbours back; a task that
    still fails is skipped and reported, the others are committed. `erase` rewrites every part with a deleted
    row, so deleted profiles' bytes leave the newest version (the right-to-erasure path); otherwise only small
    parts are merged."""
    from lance.optimize import Compaction

    opts = {"target_rows_per_fragment": target_rows, "num_threads": 2, "materialize_deletions": erase}
    if erase:
        opts["materialize_deletions_threshold"] = 1e-9
    damaged: list[int] = []
    for _ in range(2):
        plan = Compaction.plan(ds, {**opts, "excluded_fragment_ids": damaged} if damaged else opts)
        done, skipped, found = [], [], []
        for task in plan.tasks:
            try:
                done.append(task.execute(ds))
            except Exception as e:  # noqa: BLE001 - a damaged part in this task
                parts = [f.id for f in task.fragments]
                found += unreadable_parts(ds, parts) if not damaged else []
                skipped.append({"parts": parts, "error": str(e).splitlines()[0][:200]})
        if not found:
            break
        damaged = sorted(set(found))
    metrics = Compaction.commit(ds, done) if done else None
    return {
        "parts_removed": metrics.fragments_removed if metrics else 0,
        "parts_added": metrics.fragments_added if metrics else 0,
        "skipped": [*skipped, *({"parts": [p], "error": "cannot be read: left as it is"} for p in damaged)],
    }


def update_index(ds, merge: str = "auto") -> None:
    """Keep the scalar index on profile_id covering every part, as writes land: the parts no segment covers
    yet get a new segment of their own (the cost of their rows only), and the delta segments are merged into one
    when they pile up (`merge`: "deltas" now, "all" every segment, the base too). Through it a damaged part's
    ids stay known, so its profiles are refused as damaged, never answered as absent (xpeft.profiles.damage).
    Compaction bundles only parts of one segment: it runs after a merge."""
    try:
        found = [d for d in ds.describe_indices() if list(d.field_names) == [KEY]]
        if not found:
            ds.create_scalar_index(KEY, "BTREE")
            return
        segments = len(found[0].segments)
        if merge == "all" and segments > 1:
            ds.optimize.optimize_indices(num_indices_to_merge=segments)
        elif segments > (2 if merge == "deltas" else MAX_INDEX_DELTAS):
            ds.optimize.optimize_indices(num_indices_to_merge=segments - 1)  # the deltas: the base is left alone
        else:
            ds.optimize.optimize_indices(num_indices_to_merge=0)
    except Exception as e:  # noqa: BLE001 - lookups do not need it; the next write indexes what this one did not
        log.warning("updating the %s index of %s failed: %s", KEY, ds.uri, str(e).splitlines()[0][:200])


def bulk_append(uri: str, batches, schema: pa.Schema, storage_options: dict | None, target_rows: int) -> None:
    """Plain appends of big fragments (a migration, a benchmark): for unique ids not stored yet, by one writer.
    Creates the table when it does not exist (not safe against concurrent writers: see `create`)."""
    try:
        existing = lance.dataset(uri, storage_options=storage_options)
        mode, schema = "append", existing.schema
    except ValueError:
        mode, schema = "create", with_primary_key(schema)
    reader = pa.RecordBatchReader.from_batches(schema, (b.select(schema.names).cast(schema) for b in batches))
    lance.write_dataset(
        reader,
        uri,
        mode=mode,
        storage_options=storage_options,
        data_storage_version=DATA_STORAGE_VERSION,
        max_rows_per_file=target_rows,
    )
    update_index(lance.dataset(uri, storage_options=storage_options), merge="all")


class TableWrites:
    """The writing verbs of xpeft.profiles.table.ProfileTable, over the functions above (one commit each)."""

    def upsert(self, rows: pa.Table) -> dict:
        """Insert or replace rows by profile_id in one commit; the newest `created` wins. Safe with writers in
        other processes. When small parts pile up, merges them (a compaction that erases nothing)."""
        if KEY not in rows.schema.names:
            raise ValueError(f"rows need a {KEY!r} column")
        if rows.num_rows == 0:
            return {"num_inserted_rows": 0, "num_updated_rows": 0, "attempts": 0}
        rows = newest_per_id(rows)

        def attempt(n: int) -> dict:
            if not self.exists():
                if create(self.uri, rows, self.storage_options):
                    return {"num_inserted_rows": rows.num_rows, "num_updated_rows": 0, "attempts": n}
                self._open()  # another writer created it first: merge into theirs
            ds = self._latest()
            return {**merge(ds, rows.select(ds.schema.names).cast(ds.schema)), "attempts": n}

        result = retried(f"upsert into {self.uri}", attempt)
        update_index(self._dataset())  # the new part indexed now, not at the next merge
        self.refresh()
        self._merge_small_parts()
        return result

    def _merge_small_parts(self) -> None:
        ds = self._snap.ds
        small = sum(1 for f in ds.get_fragments() if f.metadata.physical_rows < self.target_rows // 8)
        if small <= self.small_parts_max:
            return
        try:
            # Into parts of target/8 rows: bigger parts are left alone (a refit touching one would preempt the
            # rewrite); `compact` makes full-size parts.
            update_index(self._dataset(), merge="deltas")
            merged = rewrite(self._dataset(), self.target_rows // 8, erase=False)
            update_index(self._dataset())
            self._dataset().cleanup_old_versions(older_than=AUTO_RETAIN, error_if_tagged_old_versions=False)
            log.info("merged %d small parts of %s: %s", small, self.uri, merged)
        except Exception as e:  # noqa: BLE001 - another writer merging at the same time; the next write retries
            log.info("merging small parts of %s did not commit: %s", self.uri, str(e).splitlines()[0][:200])
        self.refresh()

    def delete(self, ids: list[str]) -> int:
        """Delete profiles by id: gone from this reader at once and from others on their next refresh; their
        bytes stay in old versions until `compact()`. Returns how many were stored."""
        ids = list(dict.fromkeys(ids))
        if not ids or not self.exists():
            return 0
        n = 0
        for s in range(0, len(ids), 500):
            chunk = ids[s : s + 500]
            n += retried(f"delete from {self.uri}", lambda _, c=chunk: delete(self._latest(), c))
        self.refresh()
        return n

    def drop_parts(self, parts: list[int]) -> int:
        """Drop whole parts (damaged ones) in one commit: their profiles read as not stored afterwards, so a
        resumed farm run fits them again. Returns the number of profiles dropped."""
        self.refresh()
        if self._snap is None or not parts:
            return 0
        rows = drop_fragments(self.uri, self._latest(), parts, self.storage_options)
        self.refresh()
        return rows

    def compact(self, retain: timedelta = timedelta(0)) -> dict:
        """Rewrite small parts and parts with deleted rows into full ones, update the id index and remove the
        files of versions older than `retain`: deleted and replaced profiles' bytes are gone afterwards. Parts
        that cannot be read are left as they are and reported under "skipped"."""
        self.refresh()
        if self._snap is None:
            return {"parts_removed": 0, "parts_added": 0, "skipped": [], "bytes_removed": 0}
        update_index(self._latest(), merge="all")
        result = rewrite(self._dataset(), self.target_rows, erase=True)
        update_index(self._dataset(), merge="all")
        stats = self._dataset().cleanup_old_versions(older_than=retain, error_if_tagged_old_versions=False)
        self.refresh()
        return {**result, "bytes_removed": stats.bytes_removed, "old_versions_removed": stats.old_versions}

    def bulk_load(self, batches, schema: pa.Schema) -> None:
        """Append unique, not yet stored profiles in big parts (a migration, a benchmark); one writer only."""
        bulk_append(self.uri, batches, schema, self.storage_options, self.target_rows)
        with self._lock:
            self._snap = None
            self._open()
