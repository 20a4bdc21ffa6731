"""Today's profile store before the profile table (xpeft/profiles/store.py at commit d738d05), kept here only so
benchmarks/store_scale.py can measure the old layout side by side with the new one in one run. Not part of the
library: a store of this layout is converted with `xpeft profiles migrate OLD NEW`.

Layout: profiles/part-<time>-<uuid>.parquet, one file per write, one row per profile; the index (profile_id →
file, row) is built by reading every file's profile_id column, and an unknown id re-lists the directory.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from xpeft.profiles.record import Profile, from_row, to_row
from xpeft.profiles.store import SCHEMA


@dataclass(frozen=True)
class Location:
    """Where the newest stored row of a profile is. Files are never rewritten, so a location names one
    version of a profile for good."""

    file: str
    row: int
    created: float


class OldProfileStore:
    """Read and append profiles under `uri` (a directory path or a pyarrow.fs URI), as before the table."""

    def __init__(self, uri: str | os.PathLike):
        uri = str(uri)
        if "://" in uri:
            self.fs, self.root = pafs.FileSystem.from_uri(uri)
        else:
            self.fs, self.root = pafs.LocalFileSystem(), str(Path(uri).expanduser().resolve())
        self.uri = uri
        self.local = isinstance(self.fs, pafs.LocalFileSystem)
        self.fs.create_dir(f"{self.root}/profiles", recursive=True)
        self._index: dict[str, Location] = {}
        self._seen: set[str] = set()
        self._lock = threading.RLock()  # the index: one store may be shared by threads (a server, a writer)

    # --- writing ---------------------------------------------------------------------------------------

    def write(self, profiles: list[Profile]) -> str | None:
        """Append profiles as one new Parquet file; returns its path (None for an empty list)."""
        if not profiles:
            return None
        table = pa.Table.from_pylist([to_row(p) for p in profiles], schema=SCHEMA)
        name = f"part-{time.time_ns()}-{uuid.uuid4().hex[:12]}.parquet"
        final = f"{self.root}/profiles/{name}"
        # Small row groups: a lookup decodes one group, not the whole file.
        self._atomic_write(final, lambda out: pq.write_table(table, out, compression="zstd", row_group_size=16))
        self._add_to_index(final, table.column("profile_id").to_pylist(), table.column("created").to_pylist())
        return final

    def _atomic_write(self, final: str, writer) -> None:
        if not self.local:  # object stores publish an object whole on close: no torn reads
            with self.fs.open_output_stream(final) as out:
                writer(out)
            return
        tmp = f"{os.path.dirname(final)}/.tmp-{uuid.uuid4().hex}"
        try:
            with self.fs.open_output_stream(tmp) as out:
                writer(out)
            os.replace(tmp, final)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    # --- reading ---------------------------------------------------------------------------------------

    def files(self) -> list[str]:
        sel = pafs.FileSelector(f"{self.root}/profiles", allow_not_found=True)
        infos = self.fs.get_file_info(sel)
        return sorted(i.path for i in infos if i.is_file and Path(i.path).name.startswith("part-"))

    def refresh(self) -> int:
        """Index files written since the last refresh (by any writer); returns how many were new."""
        with self._lock:
            new = [f for f in self.files() if f not in self._seen]
            for path in new:
                t = pq.read_table(path, columns=["profile_id", "created"], filesystem=self.fs)
                self._add_to_index(path, t.column("profile_id").to_pylist(), t.column("created").to_pylist())
            return len(new)

    def _add_to_index(self, path: str, ids: list[str], created: list[float]) -> None:
        with self._lock:
            self._seen.add(path)
            for row, (pid, ts) in enumerate(zip(ids, created, strict=True)):
                old = self._index.get(pid)
                if old is None or ts >= old.created:
                    self._index[pid] = Location(path, row, ts)

    def ids(self) -> list[str]:
        with self._lock:
            self.refresh()
            return sorted(self._index)

    def __contains__(self, profile_id: str) -> bool:
        with self._lock:
            if profile_id not in self._index:
                self.refresh()
            return profile_id in self._index

    def __len__(self) -> int:
        with self._lock:
            self.refresh()
            return len(self._index)

    def locate(self, profile_id: str) -> Location:
        """Where the newest row of a profile is. KeyError (naming the store) when it is not there."""
        with self._lock:
            if profile_id not in self:
                raise KeyError(f"profile {profile_id!r} is not in the store {self.uri}")
            return self._index[profile_id]

    def locations(self) -> dict[str, Location]:
        """Every stored profile's newest location (a snapshot: safe to use while others write)."""
        with self._lock:
            self.refresh()
            return dict(self._index)

    def get(self, profile_id: str) -> Profile:
        """The newest stored row of a profile. KeyError (naming the store) when it is not there."""
        return self.read(self.locate(profile_id))

    def read(self, loc: Location) -> Profile:
        """The profile stored at `loc`, decoding only the row group that holds it."""
        # pre_buffer and threads pay off for big reads, not for one row group of a few profiles (~0.3 ms less).
        pf = pq.ParquetFile(loc.file, filesystem=self.fs, pre_buffer=False)
        offset = 0
        for rg in range(pf.num_row_groups):
            n = pf.metadata.row_group(rg).num_rows
            if loc.row < offset + n:
                return from_row(pf.read_row_group(rg, use_threads=False).slice(loc.row - offset, 1).to_pylist()[0])
            offset += n
        raise KeyError(f"row {loc.row} is past the end of {loc.file}; call refresh()")
