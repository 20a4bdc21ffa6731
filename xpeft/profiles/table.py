"""The profile table: one row per profile in a Lance table (a directory, or s3://… with storage options).

Writes are Lance commits (xpeft.profiles.writes): `upsert` inserts or replaces rows by profile_id in one commit
(the old row gets a deletion vector, the new ones a new fragment; the previous version stays readable in older
table versions until compaction cleans them up), `delete` writes deletion vectors only, `compact` rewrites
parts and removes old versions' files. Lance calls a part a fragment: the unit of a write, of compaction and of
damage.

A reader pins one table version (a snapshot) with its id index (xpeft.profiles.index): a lookup is an index
search plus one row-address take, which reads only that profile's part. `refresh()` moves to the latest version
(one listing when nothing changed). Threads may share a ProfileTable: reads use an immutable snapshot.

Damage is contained per part: a part whose data file cannot be read fails only the profiles in it, with a
`DamagedPartError` naming the profile, the part and its file(s); everything else keeps working (the listing
leaves out the ids of a part whose id column is unreadable; `damaged()` reports the part).
"""

from __future__ import annotations

import logging
import os
import threading
import warnings
from dataclasses import dataclass, field
from datetime import timedelta

import lance
import pyarrow as pa

from xpeft.profiles import writes
from xpeft.profiles.index import KEY, DamagedPartError, IdIndex, Location, build_index

log = logging.getLogger(__name__)

SMALL_PARTS_MAX = 64  # parts under 1/8 of the target size above which a writer merges them (see upsert)
AUTO_RETAIN = timedelta(hours=1)  # versions a writer's automatic merge keeps readable
# Lance's caches, per table: bounded so a replica's memory is (defaults are sized for analytics).
METADATA_CACHE_BYTES = 64 * 2**20
INDEX_CACHE_BYTES = 32 * 2**20


@dataclass
class _Snapshot:
    ds: object  # a lance.LanceDataset pinned at one version
    index: IdIndex | None  # built lazily: a pure writer never pays for it
    frags: dict[int, object] = field(default_factory=dict)


class ProfileTable:
    """Profiles in one Lance table at `uri`."""

    def __init__(
        self,
        uri: str | os.PathLike,
        storage_options: dict[str, str] | None = None,
        *,
        target_rows_per_fragment: int = writes.TARGET_ROWS_PER_FRAGMENT,
        small_parts_max: int = SMALL_PARTS_MAX,
    ):
        uri = str(uri)
        self.uri = uri if "://" in uri else os.path.abspath(os.path.expanduser(uri))
        self.storage_options = dict(storage_options or {}) or None
        self.target_rows = target_rows_per_fragment
        self.small_parts_max = small_parts_max
        self._lock = threading.RLock()
        self._snap: _Snapshot | None = None
        self._open()

    # --- versions -------------------------------------------------------------------------------------

    def _dataset(self, **kwargs):
        return lance.dataset(
            self.uri,
            storage_options=self.storage_options,
            metadata_cache_size_bytes=METADATA_CACHE_BYTES,
            index_cache_size_bytes=INDEX_CACHE_BYTES,
            **kwargs,
        )

    def _open(self) -> None:
        try:
            ds = self._dataset()
        except ValueError as e:
            if "not found" not in str(e).lower():
                raise
            return
        if KEY in ds.schema.names and not writes.has_primary_key(ds.schema):
            log.warning(
                "%s: %s is not the table's primary key: concurrent upserts may store an id twice", self.uri, KEY
            )
        self._snap = _Snapshot(ds, None)

    def _ready(self) -> _Snapshot | None:
        """The current snapshot with its index built. Lock-free once built: a lookup never waits for a refresh
        (which builds the next snapshot under the lock, then swaps it in)."""
        snap = self._snap
        if snap is not None and snap.index is not None:
            return snap
        with self._lock:
            if self._snap is None:
                self._open()
            if self._snap is not None and self._snap.index is None:
                self._snap = _Snapshot(self._snap.ds, build_index(self._snap.ds))
            return self._snap

    def exists(self) -> bool:
        if self._snap is None:
            self._open()
        return self._snap is not None

    def version(self) -> int:
        """The table version this reader serves (0 before the table exists)."""
        return 0 if self._snap is None else self._snap.ds.version

    def refresh(self) -> bool:
        """Move to the latest version (other writers' commits); True when it moved. One listing when nothing
        changed; otherwise reads the id column of new and changed parts only."""
        with self._lock:
            if self._snap is None:
                self._open()
                return self._snap is not None
            latest = self._snap.ds.latest_version
            if latest == self._snap.ds.version:
                return False
            ds = self._snap.ds.checkout_version(latest)
            self._snap = _Snapshot(ds, None if self._snap.index is None else build_index(ds, self._snap.index))
            return True

    def _latest(self):
        return self._snap.ds.checkout_version(self._snap.ds.latest_version)

    # --- writing --------------------------------------------------------------------------------------

    def upsert(self, rows: pa.Table) -> dict:
        """Insert or replace rows by profile_id in one commit; the newest `created` wins. Safe with writers in
        other processes. When small parts pile up, merges them (a compaction that erases nothing)."""
        if KEY not in rows.schema.names:
            raise ValueError(f"rows need a {KEY!r} column")
        if rows.num_rows == 0:
            return {"num_inserted_rows": 0, "num_updated_rows": 0, "attempts": 0}
        rows = writes.newest_per_id(rows)

        def attempt(n: int) -> dict:
            if not self.exists():
                if writes.create(self.uri, rows, self.storage_options):
                    return {"num_inserted_rows": rows.num_rows, "num_updated_rows": 0, "attempts": n}
                self._open()  # another writer created it first: merge into theirs
            ds = self._latest()
            return {**writes.merge(ds, rows.select(ds.schema.names).cast(ds.schema)), "attempts": n}

        result = writes.retried(f"upsert into {self.uri}", attempt)
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
            merged = writes.rewrite(ds, self.target_rows // 8, erase=False)
            writes.update_index(self._dataset())  # so a damaged part's ids stay known (see _damaged_part_of)
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
            n += writes.retried(f"delete from {self.uri}", lambda _, c=chunk: writes.delete(self._latest(), c))
        self.refresh()
        return n

    def drop_parts(self, parts: list[int]) -> int:
        """Drop whole parts (damaged ones) in one commit: their profiles read as not stored afterwards, so a
        resumed farm run fits them again. Returns the number of profiles dropped."""
        self.refresh()
        if self._snap is None or not parts:
            return 0
        rows = writes.drop_fragments(self.uri, self._latest(), parts, self.storage_options)
        self.refresh()
        return rows

    def compact(self, retain: timedelta = timedelta(0)) -> dict:
        """Rewrite small parts and parts with deleted rows into full ones, update the id index and remove the
        files of versions older than `retain`: deleted and replaced profiles' bytes are gone afterwards. Parts
        that cannot be read are left as they are and reported under "skipped"."""
        self.refresh()
        if self._snap is None:
            return {"parts_removed": 0, "parts_added": 0, "skipped": [], "bytes_removed": 0}
        result = writes.rewrite(self._latest(), self.target_rows, erase=True)
        writes.update_index(self._dataset())
        stats = self._dataset().cleanup_old_versions(older_than=retain, error_if_tagged_old_versions=False)
        self.refresh()
        return {**result, "bytes_removed": stats.bytes_removed, "old_versions_removed": stats.old_versions}

    def bulk_load(self, batches, schema: pa.Schema) -> None:
        """Append unique, not yet stored profiles in big parts (a migration, a benchmark); one writer only."""
        writes.bulk_append(self.uri, batches, schema, self.storage_options, self.target_rows)
        with self._lock:
            self._snap = None
            self._open()

    # --- reading --------------------------------------------------------------------------------------

    def _frag(self, snap: _Snapshot, fid: int):
        f = snap.frags.get(fid)
        if f is None:
            f = snap.frags[fid] = snap.ds.get_fragment(fid)
        return f

    def _files(self, snap: _Snapshot, fid: int) -> list[str]:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                return [f"{self.uri.rstrip('/')}/data/{d.path}" for d in self._frag(snap, fid).data_files()]
        except Exception:  # noqa: BLE001 - naming the file is best effort
            return [f"{self.uri} (part {fid})"]

    def _damaged_part_of(self, snap: _Snapshot, profile_id: str) -> int | None:
        """For an id the index lacks while some part's ids are unreadable: whether it lives in one of those
        parts, from the table's scalar index alone (`fast_search`: no data file is read). A damaged part newer
        than the scalar index cannot be searched: its ids read as not stored, and `damaged()` says so."""
        if not snap.index.damaged:
            return None
        try:
            t = snap.ds.to_table(
                filter=f"{KEY} = {writes.quote(profile_id)}", columns=[], with_row_address=True, fast_search=True
            )
        except Exception as e:  # noqa: BLE001
            log.warning("index search of %r in %s failed: %s", profile_id, self.uri, str(e)[:200])
            return None
        parts = [a >> 32 for a in t.column("_rowaddr").to_pylist() if (a >> 32) in snap.index.damaged]
        return parts[0] if parts else None

    def _locate(self, snap: _Snapshot, profile_id: str) -> Location | None:
        a = snap.index.lookup(profile_id)
        if a is not None:
            return Location.of(a)
        part = self._damaged_part_of(snap, profile_id)
        if part is not None:
            raise DamagedPartError(profile_id, part, self._files(snap, part), snap.index.damaged[part])
        return None

    def locate(self, profile_id: str) -> Location | None:
        """Where the served version of a profile is; None when it is not stored. DamagedPartError when it is
        in a part whose ids could not be read."""
        snap = self._ready()
        return None if snap is None else self._locate(snap, profile_id)

    def _take(self, snap: _Snapshot, part: int, locs: list[Location], columns, pids: list[str]) -> dict[str, dict]:
        cols = None if columns is None else list(dict.fromkeys([KEY, *columns]))
        try:
            t = snap.ds._take_rows([loc.address for loc in locs], columns=cols)
        except Exception as e:  # noqa: BLE001 - any read failure is this part's damage
            who = pids[0] if len(pids) == 1 else None
            raise DamagedPartError(who, part, self._files(snap, part), e) from e
        return {r[KEY]: r for r in t.to_pylist()}

    def read(self, profile_id: str, loc: Location, columns: list[str] | None = None) -> dict | None:
        """The row of `profile_id` at `loc` (from `locate`); None when that version is no longer served."""
        for attempt in (0, 1):
            snap = self._ready()
            if snap is None or snap.index.lookup(profile_id) != loc.address:
                return None
            try:
                return self._take(snap, loc.part, [loc], columns, [profile_id]).get(profile_id)
            except DamagedPartError:
                if attempt == 0 and self.refresh():  # old files cleaned up under a stale pin: take again
                    continue
                raise
        return None

    def get(self, profile_id: str, columns: list[str] | None = None) -> dict | None:
        """The stored row of a profile; None when it is not stored; DamagedPartError when it is unreadable."""
        loc = self.locate(profile_id)
        if loc is None:
            return None
        row = self.read(profile_id, loc, columns)
        if row is None:  # moved between locate and read (a refresh): once more
            loc = self.locate(profile_id)
            row = None if loc is None else self.read(profile_id, loc, columns)
        return row

    def get_many(self, ids: list[str], columns: list[str] | None = None) -> dict[str, dict | None | Exception]:
        """Rows by id, one take per part: each maps to its row, None (not stored) or a DamagedPartError. One bad
        part never fails the others."""
        snap = self._ready()
        if snap is None:
            return {i: None for i in ids}
        out: dict[str, dict | None | Exception] = {}
        by_part: dict[int, list[tuple[Location, str]]] = {}
        for pid in dict.fromkeys(ids):
            try:
                loc = self._locate(snap, pid)
            except DamagedPartError as e:
                out[pid] = e
                continue
            if loc is None:
                out[pid] = None
            else:
                by_part.setdefault(loc.part, []).append((loc, pid))
        for part, items in by_part.items():
            items.sort(key=lambda item: item[0].row)
            try:
                rows = self._take(snap, part, [loc for loc, _ in items], columns, [p for _, p in items])
            except DamagedPartError as e:
                out.update({p: DamagedPartError(p, part, e.files, e.cause) for _, p in items})
                continue
            out.update({p: rows.get(p) for _, p in items})
        return {i: out[i] for i in ids}

    def __contains__(self, profile_id: str) -> bool:
        try:
            return self.locate(profile_id) is not None
        except DamagedPartError:
            return True  # stored, though unreadable: a resumed farm run must not fit it again on top

    def count(self) -> int:
        """Profiles stored (those in damaged parts included)."""
        snap = self._ready()
        return 0 if snap is None else snap.index.live

    def ids(self, offset: int = 0, limit: int | None = None) -> list[str]:
        """Stored ids, sorted, a page at a time; from the index only (no data file is read)."""
        snap = self._ready()
        if snap is None:
            return []
        if snap.index.overlay:  # fold once into a new snapshot, so later pages do not fold again
            with self._lock:
                if self._snap is snap:
                    index = snap.index.copy()
                    index.fold()
                    self._snap = snap = _Snapshot(snap.ds, index, snap.frags)
        keys = snap.index.sorted_ids()
        end = len(keys) if limit is None else offset + limit
        return [k.decode() for k in keys[offset:end]]

    def _indexed_parts(self, snap: _Snapshot) -> set[int]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return {f for i in snap.ds.list_indices() if i.get("fields") == [KEY] for f in i.get("fragment_ids") or ()}

    def damaged(self) -> dict[int, dict]:
        """Parts whose ids could not be read at the last open or refresh: {part: {files, error, profiles,
        ids_known}} (ids_known: whether lookups of its profiles can tell they are damaged, not absent)."""
        snap = self._ready()
        if snap is None or not snap.index.damaged:
            return {}
        indexed = self._indexed_parts(snap)
        return {
            part: {
                "files": self._files(snap, part),
                "error": err.splitlines()[0][:300],
                "profiles": snap.index.damaged_rows.get(part),
                "ids_known": part in indexed,
            }
            for part, err in snap.index.damaged.items()
        }

    def scan(self, columns: list[str] | None = None, errors: list | None = None, newest_first: bool = False):
        """Every served row, part by part, as record batches with their `_rowaddr`. A damaged part is skipped
        and appended to `errors` (a DamagedPartError) instead of failing the scan; without `errors` it raises."""
        snap = self._ready()
        if snap is None:
            return
        for fid in sorted(snap.index.sigs, reverse=newest_first):
            try:
                yield from self._frag(snap, fid).to_batches(columns=columns, with_row_address=True, batch_size=1024)
            except Exception as e:  # noqa: BLE001
                err = DamagedPartError(None, fid, self._files(snap, fid), e)
                if errors is None:
                    raise err from e
                errors.append(err)

    def stats(self) -> dict:
        snap = self._ready()
        if snap is None:
            return {"version": 0, "parts": 0, "profiles": 0, "damaged_parts": [], "index_bytes": 0}
        return {
            "version": snap.ds.version,
            "parts": len(snap.index.sigs),
            "profiles": snap.index.live,
            "damaged_parts": sorted(snap.index.damaged),
            "index_bytes": snap.index.nbytes(),
        }
