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
leaves out the ids of a part whose id column is unreadable; `damaged()` reports the part). Damage is never
read as absence, and a repaired part is served again (xpeft.profiles.damage).
"""

from __future__ import annotations

import logging
import os
import threading
import warnings
from dataclasses import dataclass, field

import lance

from xpeft.profiles import writes
from xpeft.profiles.damage import FoundDamage, indexed_parts, where_damaged
from xpeft.profiles.index import KEY, DamagedPartError, IdIndex, Location, build_index, reread_damaged

log = logging.getLogger(__name__)

# Lance's caches, per table: bounded so a replica's memory is (defaults are sized for analytics).
METADATA_CACHE_BYTES = 64 * 2**20
INDEX_CACHE_BYTES = 32 * 2**20


@dataclass
class _Snapshot:
    ds: object  # a lance.LanceDataset pinned at one version
    index: IdIndex | None  # built lazily: a pure writer never pays for it
    frags: dict[int, object] = field(default_factory=dict)
    indexed: set[int] | None = None  # the parts the scalar index covers (read when first needed)


class ProfileTable(writes.TableWrites):
    """Profiles in one Lance table at `uri`."""

    def __init__(
        self,
        uri: str | os.PathLike,
        storage_options: dict[str, str] | None = None,
        *,
        target_rows_per_fragment: int = writes.TARGET_ROWS_PER_FRAGMENT,
        small_parts_max: int = writes.SMALL_PARTS_MAX,
    ):
        uri = str(uri)
        self.uri = uri if "://" in uri else os.path.abspath(os.path.expanduser(uri))
        self.storage_options = dict(storage_options or {}) or None
        self.target_rows = target_rows_per_fragment
        self.small_parts_max = small_parts_max
        self._lock = threading.RLock()
        self._snap: _Snapshot | None = None
        self.found = FoundDamage()  # parts whose rows failed a read since this reader opened
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

    def _indexed(self, snap: _Snapshot) -> set[int]:
        if snap.indexed is None:
            snap.indexed = indexed_parts(snap.ds)
        return snap.indexed

    def _locate(self, snap: _Snapshot, profile_id: str) -> Location | None:
        a = snap.index.lookup(profile_id)
        if a is not None:
            return Location.of(a)
        if not snap.index.damaged:
            return None
        where = where_damaged(snap.ds, profile_id, snap.index.damaged, self._indexed(snap))
        if where is None:
            return None
        part, maybe = where
        raise DamagedPartError(profile_id, part, self._files(snap, part), snap.index.damaged[part], maybe)

    def locate(self, profile_id: str) -> Location | None:
        """Where the served version of a profile is; None when it is not stored. DamagedPartError when it is
        (or may be) in a part whose ids could not be read."""
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
            except DamagedPartError as e:
                if attempt == 0 and self.refresh():  # old files cleaned up under a stale pin: take again
                    continue
                self.found.add(loc.part, profile_id, loc.address, e.cause)
                raise
        return None

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
                self.found.add(part, items[0][1], items[0][0].address, e.cause)
                out.update({p: DamagedPartError(p, part, e.files, e.cause) for _, p in items})
                continue
            out.update({p: rows.get(p) for _, p in items})
        return {i: out[i] for i in ids}

    def __contains__(self, profile_id: str) -> bool:
        try:
            return self.locate(profile_id) is not None
        except DamagedPartError as e:
            # Stored, though unreadable: a resumed farm run must not fit it again on top. Maybe stored: it is
            # fitted (its upsert lands beside the unreadable part, and the newest version wins if it comes back).
            return not e.maybe

    def count(self, listed: bool = False) -> int:
        """Profiles stored (those in damaged parts included); `listed`: those whose ids can be read, which `ids`
        pages through."""
        snap = self._ready()
        if snap is None:
            return 0
        return snap.index.listed if listed else snap.index.live

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

    def note_damage(self, profile_id: str, part: int, cause: str) -> DamagedPartError:
        """Record damage found by a reader above (a record that does not match its fingerprint): the part is
        reported as damaged until a re-read of the profile passes (`recheck`). Returns the error to raise."""
        snap = self._ready()
        a = None if snap is None else snap.index.lookup(profile_id)
        self.found.add(part, profile_id, a if a is not None and (a >> 32) == part else None, cause)
        return DamagedPartError(profile_id, part, [] if snap is None else self._files(snap, part), cause)

    def damaged(self) -> dict[int, dict]:
        """Damaged parts: those whose ids could not be read at the last open or refresh, and those whose rows
        failed a read since: {part: {files, error, profiles, ids_known, listed}} (ids_known: whether lookups of
        its profiles can tell they are damaged, not absent; listed: whether `ids` pages through its ids)."""
        snap = self._ready()
        if snap is None:
            return {}
        out = {}
        if snap.index.damaged:
            indexed = self._indexed(snap)
            for part, err in snap.index.damaged.items():
                rows = snap.index.damaged_rows.get(part)
                out[part] = {"error": err, "profiles": rows, "ids_known": part in indexed, "listed": False}
        for part, d in self.found.items():
            if part in snap.index.frag_ids:  # still in this version (a rewrite or a drop ends it)
                rows = len(snap.index.frag_ids[part])
                out.setdefault(part, {"error": d["error"], "profiles": rows, "ids_known": True, "listed": True})
        return {
            p: {"files": self._files(snap, p), **d, "error": d["error"].splitlines()[0][:300]}
            for p, d in sorted(out.items())
        }

    def recheck(self, verify=None) -> bool:
        """Read each damaged part again: one whose ids can be read now goes back into the index, one whose failed
        row reads now (and passes `verify(row)`) is no longer damaged. True when any part was repaired."""
        snap = self._ready()
        if snap is None:
            return False
        repaired = False
        if snap.index.damaged:
            frags = {fid: self._frag(snap, fid) for fid in snap.index.damaged if fid in snap.index.sigs}
            index = reread_damaged(snap.index, frags)
            if index is not None:
                with self._lock:
                    if self._snap is snap:
                        self._snap = _Snapshot(snap.ds, index, snap.frags)
                repaired = True
        for part, d in self.found.items():
            if part not in snap.index.frag_ids:
                self.found.discard(part)
                continue
            try:
                if d["address"] is not None:
                    row = snap.ds._take_rows([d["address"]]).to_pylist()[0]
                    if verify is not None:
                        verify(row)
            except Exception:  # noqa: BLE001 - still damaged
                continue
            self.found.discard(part)
            repaired = True
        return repaired

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
