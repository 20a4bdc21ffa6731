"""The profile table's id index: profile_id -> row address, for one version of the table, held by a reader.

A row address is (fragment id << 32 | physical row offset). Lance never reuses a fragment id, and a delete only
marks rows in a deletion vector (physical offsets do not move), so an address names one stored version of a
profile for good: a refit writes the new version at a new address.

The index is built from the `profile_id` column alone, fragment by fragment (no blobs are read): a sorted numpy
array of fixed-width ids with their addresses (~40 bytes a profile in all, a Python dict would be ~150), plus a
small dict overlay of what changed since the arrays were last sorted. A lookup is one `searchsorted` (an unknown
id costs a few microseconds, with no I/O). `build_index(ds, old)` updates an older version's index by diffing
the two manifests' fragment lists: only new fragments and fragments with a new deletion file are read again.
A fragment whose id column cannot be read is recorded as damaged instead of failing the index.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

log = logging.getLogger(__name__)

KEY = "profile_id"
FOLD_AT = 20_000  # ids changed by one refresh above which the sorted arrays are rebuilt instead of the overlay


class DamagedPartError(Exception):
    """A profile is stored in a part of the profile table whose data cannot be read. `maybe`: the profile is in
    none of the readable parts, and this part's ids cannot be read, so it may hold it (damage, never absence)."""

    def __init__(
        self, profile_id: str | None, part: int, files: list[str], cause: BaseException | str, maybe: bool = False
    ):
        self.profile_id, self.part, self.files, self.maybe = profile_id, part, files, maybe
        self.cause = str(cause).splitlines()[0][:300] if str(cause) else type(cause).__name__
        where = f"part {part} of the profile table ({', '.join(files)})"
        if maybe:
            super().__init__(
                f"profile {profile_id!r} is in no readable part of the profile table, but {where} cannot be read "
                f"and its ids are not indexed, so it may hold it: {self.cause}; restore the file, or drop the part "
                "(`xpeft profiles verify --drop-damaged`) and fit its profiles again"
            )
            return
        who = f"profile {profile_id!r} is stored in" if profile_id is not None else "a profile is in"
        super().__init__(
            f"{who} {where}, which cannot be read: {self.cause}; restore the file, or delete the part's profiles "
            "(`xpeft profiles delete`) and fit them again"
        )

    def to_dict(self) -> dict:
        return {"profile_id": self.profile_id, "part": self.part, "files": self.files, "error": self.cause}


@dataclass(frozen=True)
class Location:
    """Where one stored version of a profile is: its part and physical row. Lance never reuses a part id, so a
    location names one version for good (a refit or a compaction writes the profile somewhere else)."""

    part: int
    row: int

    @property
    def address(self) -> int:
        return (self.part << 32) | self.row

    @classmethod
    def of(cls, address: int) -> Location:
        return cls(address >> 32, address & 0xFFFFFFFF)


def fixed_bytes(arr: pa.Array) -> np.ndarray:
    """A string array as a numpy fixed-width bytes array ('S<w>'), without a Python object per row."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    arr = arr.cast(pa.binary())
    n = len(arr)
    if n == 0:
        return np.zeros(0, "S1")
    offs = np.frombuffer(arr.buffers()[1], np.int32)[arr.offset : arr.offset + n + 1].astype(np.int64)
    data = np.frombuffer(arr.buffers()[2], np.uint8)
    lens = np.diff(offs)
    w = max(int(lens.max()), 1)
    out = np.zeros(n * w, np.uint8)
    row = np.repeat(np.arange(n, dtype=np.int64), lens)
    within = np.arange(int(offs[-1] - offs[0]), dtype=np.int64) - np.repeat(offs[:-1] - offs[0], lens)
    out[row * w + within] = data[offs[0] : offs[-1]]
    return out.view(f"S{w}")


def fragment_signature(frag) -> tuple:
    """What changes when a fragment's live rows can change: its data files and its deletion file."""
    m = frag.metadata
    d = m.deletion_file
    return (
        tuple(f.path for f in m.files),
        m.physical_rows,
        None if d is None else (d.id, d.read_version, d.num_deleted_rows),
    )


@dataclass
class IdIndex:
    """profile_id -> row address for one table version (see the module's docstring)."""

    frag_ids: dict[int, pa.Array] = field(default_factory=dict)  # live ids of each readable fragment
    frag_offs: dict[int, np.ndarray] = field(default_factory=dict)  # their physical row offsets (uint32)
    sigs: dict[int, tuple] = field(default_factory=dict)  # every fragment's signature
    damaged: dict[int, str] = field(default_factory=dict)  # fragment id -> why its id column is unreadable
    damaged_rows: dict[int, int] = field(default_factory=dict)
    keys: np.ndarray = field(default_factory=lambda: np.zeros(0, "S1"))  # sorted
    addrs: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    overlay: dict[str, int] = field(default_factory=dict)  # changes since the last fold; -1 = gone

    def copy(self) -> IdIndex:
        """A copy to update (the arrays are shared: they are never modified in place)."""
        return replace(
            self,
            frag_ids=dict(self.frag_ids),
            frag_offs=dict(self.frag_offs),
            sigs=dict(self.sigs),
            damaged=dict(self.damaged),
            damaged_rows=dict(self.damaged_rows),
            overlay=dict(self.overlay),
        )

    def lookup(self, profile_id: str) -> int | None:
        """The row address of a profile, None when it is not stored (in a readable fragment)."""
        v = self.overlay.get(profile_id)
        if v is not None:
            return None if v < 0 else v
        k = profile_id.encode()
        if not len(self.keys) or len(k) > self.keys.dtype.itemsize:
            return None
        i = int(np.searchsorted(self.keys, k))
        if i < len(self.keys) and self.keys[i] == k:
            return int(self.addrs[i])
        return None

    def fold(self) -> None:
        """Rebuild the sorted arrays from the per-fragment id arrays (no I/O); empties the overlay."""
        parts = [fixed_bytes(self.frag_ids[f]) for f in sorted(self.frag_ids)]
        if not parts:
            self.keys, self.addrs, self.overlay = np.zeros(0, "S1"), np.zeros(0, np.int64), {}
            return
        w = max(p.dtype.itemsize for p in parts)
        keys = np.concatenate([p.astype(f"S{w}") for p in parts])
        addrs = np.concatenate(
            [(np.int64(f) << 32) | self.frag_offs[f].astype(np.int64) for f in sorted(self.frag_ids)]
        )
        # If an id is live twice (only after raw appends; an upsert never does that) the newest fragment wins.
        order = np.lexsort((-(addrs >> 32), keys))
        keys, addrs = keys[order], addrs[order]
        first = np.ones(len(keys), bool)
        first[1:] = keys[1:] != keys[:-1]
        self.keys, self.addrs, self.overlay = keys[first], addrs[first], {}

    def sorted_ids(self) -> np.ndarray:
        """Every id, sorted (folds a copy when the overlay is not empty: this index is never changed)."""
        if not self.overlay:
            return self.keys
        folded = self.copy()
        folded.fold()
        return folded.keys

    @property
    def listed(self) -> int:
        """Profiles whose ids were read (those in damaged fragments are not)."""
        return sum(len(a) for a in self.frag_ids.values())

    @property
    def live(self) -> int:
        """Profiles stored, those in damaged fragments included."""
        return self.listed + sum(self.damaged_rows.values())

    def nbytes(self) -> int:
        per_fragment = sum(a.nbytes for a in self.frag_ids.values()) + sum(a.nbytes for a in self.frag_offs.values())
        return int(self.keys.nbytes + self.addrs.nbytes + per_fragment + 120 * len(self.overlay))


def read_fragment_ids(frag) -> tuple[pa.Array, np.ndarray]:
    """The live ids of a fragment and their physical offsets (the id column only)."""
    t = frag.to_table(columns=[KEY], with_row_address=True)
    offs = (t.column("_rowaddr").to_numpy() & 0xFFFFFFFF).astype(np.uint32)
    return t.column(KEY).combine_chunks(), offs


@dataclass
class _Diff:
    """What one refresh changed: ids no longer live in a fragment, fragments read anew."""

    gone: list[tuple[int, pa.Array]] = field(default_factory=list)
    fresh: list[int] = field(default_factory=list)


def _drop(idx: IdIndex, fid: int, diff: _Diff) -> None:
    ids = idx.frag_ids.pop(fid, None)
    idx.frag_offs.pop(fid, None)
    idx.damaged.pop(fid, None)
    idx.damaged_rows.pop(fid, None)
    if ids is not None:
        diff.gone.append((fid, ids))


def _reread(idx: IdIndex, fid: int, frag, uri: str, diff: _Diff) -> None:
    """Read a new or changed fragment's ids into `idx`; a fragment that cannot be read is marked damaged."""
    try:
        ids, offs = read_fragment_ids(frag)
    except Exception as e:  # noqa: BLE001 - any read failure isolates that fragment, never the index
        _drop(idx, fid, diff)
        idx.damaged[fid] = f"{type(e).__name__}: {e}"
        idx.damaged_rows[fid] = frag.metadata.physical_rows - frag.metadata.num_deletions
        if uri:
            log.warning("part %s of the profile table %s is unreadable: %s", fid, uri, str(e).splitlines()[0][:200])
        return
    idx.damaged.pop(fid, None)
    idx.damaged_rows.pop(fid, None)
    before = idx.frag_ids.get(fid)
    if before is not None:  # same data files, a new deletion file: only deletions happened
        diff.gone.append((fid, before.filter(pc.invert(pc.is_in(before, value_set=ids)))))
    else:
        diff.fresh.append(fid)
    idx.frag_ids[fid], idx.frag_offs[fid] = ids, offs


def _apply_to_overlay(idx: IdIndex, diff: _Diff) -> None:
    for fid, ids in diff.gone:
        for pid in ids.to_pylist():
            a = idx.lookup(pid)
            if a is not None and (a >> 32) == fid:
                idx.overlay[pid] = -1
    for fid in diff.fresh:
        base = np.int64(fid) << 32
        for pid, off in zip(idx.frag_ids[fid].to_pylist(), idx.frag_offs[fid].tolist(), strict=True):
            idx.overlay[pid] = int(base | off)


def build_index(ds, old: IdIndex | None = None) -> IdIndex:
    """The index of the Lance dataset `ds` (one version), updated from `old` (an earlier version's) if given."""
    frags = {f.fragment_id: f for f in ds.get_fragments()}
    sigs = {fid: fragment_signature(f) for fid, f in frags.items()}
    prev = {} if old is None else old.sigs
    idx = IdIndex() if old is None else old.copy()
    added = [fid for fid in sorted(sigs) if fid not in prev]
    changed = [fid for fid in sigs if fid in prev and prev[fid] != sigs[fid]]
    removed = [fid for fid in prev if fid not in sigs]
    touched = sum(len(idx.frag_ids.get(f, ())) for f in removed) + sum(frags[f].metadata.physical_rows for f in added)
    diff = _Diff()
    for fid in removed:
        _drop(idx, fid, diff)
    for fid in changed + added:
        _reread(idx, fid, frags[fid], ds.uri, diff)
    if old is None or touched > FOLD_AT:
        idx.fold()
    else:
        _apply_to_overlay(idx, diff)
        if len(idx.overlay) > max(FOLD_AT, len(idx.keys) // 8):
            idx.fold()
    idx.sigs = sigs
    return idx


def reread_damaged(old: IdIndex, frags: dict[int, object]) -> IdIndex | None:
    """`old` with the ids of each damaged fragment that can be read again (a restored file) read in; None when
    none can."""
    idx, diff = old.copy(), _Diff()
    for fid in [f for f in old.damaged if f in frags]:
        _reread(idx, fid, frags[fid], "", diff)
    if len(idx.damaged) == len(old.damaged):
        return None
    _apply_to_overlay(idx, diff)
    return idx
