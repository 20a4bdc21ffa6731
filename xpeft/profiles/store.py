"""The profile store: a Parquet data set on a local directory or any `pyarrow.fs` URI (s3://…, gs://…).

Layout under the root:
    profiles/part-<time>-<uuid>.parquet   one file per write, one row per profile (see record.to_row)
    heads/<head_id>.safetensors           shared heads (the mtl setting)
    banks/<fingerprint>.safetensors       the banks the profiles were fitted on (verified on every load)
    state/<name>.json                     run state of the jobs writing here (`state/farm.json`: the farm's
                                          setting, learned bank and shared head, so a resumed run skips its
                                          warm start)

Writes never touch an existing file: each batch goes to a new, uniquely named file (written under a temp
name and renamed into place where the file system can rename), so concurrent writers never clobber each
other and a reader never sees a torn file. Lookups use an index (profile_id → file, row) built from the
`profile_id` column alone and refreshed incrementally from new files; when a profile was written twice,
the newest row wins.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from xpeft.core.bank import AdapterBank, load_bank, save_bank
from xpeft.profiles.record import Profile, from_row, summary, to_row

log = logging.getLogger(__name__)

SCHEMA = pa.schema(
    [
        ("profile_id", pa.string()),
        ("mode", pa.string()),
        ("mask_type", pa.string()),
        ("config", pa.string()),
        ("mask_bits", pa.binary()),
        ("tensors", pa.binary()),
        ("head_id", pa.string()),
        ("bank_fingerprint", pa.string()),
        ("metrics", pa.string()),
        ("label_names", pa.string()),
        ("record_bytes", pa.int64()),
        ("created", pa.float64()),
    ]
)


@dataclass(frozen=True)
class Location:
    """Where the newest stored row of a profile is. Files are never rewritten, so a location names one
    version of a profile for good."""

    file: str
    row: int
    created: float


class ProfileStore:
    """Read and append profiles under `uri` (a directory path or a pyarrow.fs URI)."""

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

    def save_head(self, head_id: str, state: dict[str, torch.Tensor]) -> None:
        self.fs.create_dir(f"{self.root}/heads", recursive=True)
        blob = st_save({k: v.contiguous() for k, v in state.items()})
        self._atomic_write(f"{self.root}/heads/{head_id}.safetensors", lambda out: out.write(blob))

    def load_head(self, head_id: str) -> dict[str, torch.Tensor]:
        path = f"{self.root}/heads/{head_id}.safetensors"
        try:
            with self.fs.open_input_stream(path) as f:
                return st_load(f.read())
        except FileNotFoundError:
            raise KeyError(f"shared head {head_id!r} is not in the store {self.uri}") from None

    def save_bank(self, bank: AdapterBank) -> str:
        path = f"{self.root}/banks/{bank.fingerprint}.safetensors"
        if self.local:
            if not os.path.exists(path):
                save_bank(bank, path)
        else:
            tmp = Path(f"/tmp/xpeft-bank-{uuid.uuid4().hex}.safetensors")
            save_bank(bank, tmp)
            pafs.copy_files(str(tmp), path, destination_filesystem=self.fs)
            tmp.unlink()
        return path

    def load_bank(self, fingerprint: str) -> AdapterBank:
        path = f"{self.root}/banks/{fingerprint}.safetensors"
        if self.local:
            return load_bank(path)
        tmp = Path(f"/tmp/xpeft-bank-{fingerprint}.safetensors")
        if not tmp.exists():
            pafs.copy_files(path, str(tmp), source_filesystem=self.fs)
        return load_bank(tmp)

    def read_state(self, name: str) -> dict:
        """A job's run state (`state/<name>.json`), {} when there is none."""
        try:
            with self.fs.open_input_stream(f"{self.root}/state/{name}.json") as f:
                return json.loads(f.read())
        except (FileNotFoundError, OSError):
            return {}

    def write_state(self, name: str, state: dict) -> None:
        """Replace a job's run state atomically."""
        self.fs.create_dir(f"{self.root}/state", recursive=True)
        blob = json.dumps(state).encode()
        self._atomic_write(f"{self.root}/state/{name}.json", lambda out: out.write(blob))

    def bank_fingerprints(self) -> list[str]:
        sel = pafs.FileSelector(f"{self.root}/banks", allow_not_found=True)
        return sorted(Path(i.path).stem for i in self.fs.get_file_info(sel) if i.path.endswith(".safetensors"))

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

    def read_file(self, path: str) -> list[Profile]:
        """Every profile row of one stored file, in row order (bulk reads, e.g. to warm a server)."""
        return [from_row(row) for row in pq.read_table(path, filesystem=self.fs).to_pylist()]

    def summaries(self, offset: int = 0, limit: int = 100) -> list[dict]:
        """Profile id, mode, metrics, size for a page of profiles (sorted by id), without tensors."""
        page = self.ids()[offset : offset + limit]
        return [self.summary(pid) for pid in page]

    def summary(self, profile_id: str) -> dict:
        return summary(self.get(profile_id))

    def read_table(self, columns: list[str] | None = None) -> pa.Table:
        """Every stored row (all versions), e.g. for reports and plots."""
        files = self.files()
        if not files:
            return SCHEMA.empty_table() if columns is None else SCHEMA.empty_table().select(columns)
        return pa.concat_tables([pq.read_table(f, columns=columns, filesystem=self.fs) for f in files])
