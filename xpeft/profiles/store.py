"""The profile store: the profile table (Lance, xpeft.profiles.table) plus content-addressed files, under one root
that is a local directory or an object-store URI.

Layout under the root:
    profiles.lance/                       the profile table: one row per profile (see record.to_row)
    heads/<head_id>.safetensors           shared heads (the mtl setting), verified against the fingerprint in
                                          their metadata on every load (xpeft.profiles.fingerprints)
    banks/<fingerprint>.safetensors       the banks the profiles were fitted on (verified on every load), and the
                                          banks grown from them (xpeft.profiles.lineage)
    state/<name>.json                     run state of the jobs writing here (`state/farm.json`: the farm's
                                          setting, learned bank and shared head, so a resumed run skips its
                                          warm start)

Every record carries a fingerprint too, checked whenever it is read: a record or head whose bytes do not match
is refused as damage (a DamagedPartError naming its part; a FingerprintError naming the head's file), never
read as other values.

Semantics: `write` upserts by profile_id (a refit replaces the served version; the previous one stays readable
in older table versions until compaction), `delete` removes profiles from lookups at once (their bytes after
`compact`), writers in many processes lose nothing, and a reader refreshes to see other writers' commits.

URIs: a directory path, or `s3://bucket/prefix` (any scheme both Lance and pyarrow.fs know: gs://, az://).
Object-store settings come from the URI's query string, `s3://bucket/prefix?endpoint=http://127.0.0.1:9000&
region=us-east-1` (an S3-compatible server), or else from the environment (AWS_ENDPOINT_URL, AWS_REGION);
credentials only from the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, or the node's role).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import uuid
from datetime import timedelta
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

import pyarrow as pa
import pyarrow.fs as pafs
import torch

from xpeft.core.bank import AdapterBank, load_bank, save_bank
from xpeft.profiles.fingerprints import FingerprintError, head_bytes, head_from_bytes, metadata, unsealed
from xpeft.profiles.record import Profile, from_row, summary, to_row
from xpeft.profiles.table import DamagedPartError, Location, ProfileTable

__all__ = ["SCHEMA", "DamagedPartError", "Location", "ProfileStore", "split_uri"]

log = logging.getLogger(__name__)

TABLE = "profiles.lance"
MAX_HEADER = 1 << 20  # a bank file's safetensors header (its tensors' offsets and metadata) is a few hundred bytes
URI_OPTIONS = ("endpoint", "region")

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


def split_uri(uri: str | os.PathLike) -> tuple[str, dict[str, str]]:
    """(the root without its query string, the object-store options of the query string and environment)."""
    uri = str(uri)
    if "://" not in uri:
        return str(Path(uri).expanduser().resolve()), {}
    parts = urlsplit(uri)
    opts = dict(parse_qsl(parts.query))
    unknown = set(opts) - set(URI_OPTIONS)
    if unknown:
        raise ValueError(f"unknown store option(s) {sorted(unknown)} in {uri}; known: {list(URI_OPTIONS)}")
    if parts.scheme == "s3":
        env = {"endpoint": os.environ.get("AWS_ENDPOINT_URL"), "region": os.environ.get("AWS_REGION")}
        opts = {**{k: v for k, v in env.items() if v}, **opts}
    return f"{parts.scheme}://{parts.netloc}{parts.path}".rstrip("/"), opts


def lance_options(opts: dict[str, str]) -> dict[str, str] | None:
    out = {}
    if opts.get("endpoint"):
        out["aws_endpoint"] = opts["endpoint"]
        if opts["endpoint"].startswith("http://"):
            out["allow_http"] = "true"
    if opts.get("region"):
        out["aws_region"] = opts["region"]
    return out or None


def filesystem(root: str, opts: dict[str, str]) -> tuple[pafs.FileSystem, str]:
    """The pyarrow file system and path of a store root (for its heads, banks and state files)."""
    if "://" not in root:
        return pafs.LocalFileSystem(), root
    if root.startswith("s3://") and opts:
        kwargs = {}
        if opts.get("endpoint"):
            endpoint = urlsplit(opts["endpoint"])
            kwargs.update(endpoint_override=endpoint.netloc, scheme=endpoint.scheme or "https")
        if opts.get("region"):
            kwargs["region"] = opts["region"]
        return pafs.S3FileSystem(**kwargs), root[len("s3://") :]
    return pafs.FileSystem.from_uri(root)


class ProfileStore:
    """Read, upsert and delete profiles under `uri` (a directory path or an object-store URI, see above)."""

    def __init__(self, uri: str | os.PathLike, **table_options):
        self.uri = str(uri)
        self.root, self.options = split_uri(uri)
        self.fs, self.path = filesystem(self.root, self.options)
        self.local = isinstance(self.fs, pafs.LocalFileSystem)
        refuse_old_layout(self.fs, self.path, self.uri)
        self.table = ProfileTable(f"{self.root}/{TABLE}", lance_options(self.options), **table_options)

    # --- profiles --------------------------------------------------------------------------------------

    def write(self, profiles: list[Profile]) -> dict:
        """Upsert profiles in one commit (a refit replaces the served version; the newest `created` wins)."""
        if not profiles:
            return {"num_inserted_rows": 0, "num_updated_rows": 0}
        return self.table.upsert(pa.Table.from_pylist([to_row(p) for p in profiles], schema=SCHEMA))

    def delete(self, profile_ids: list[str]) -> int:
        """Delete profiles: gone from lookups at once (other readers: on their next refresh), their bytes after
        `compact()`. Returns how many of them were stored."""
        return self.table.delete(profile_ids)

    def compact(self, retain_seconds: float = 0.0) -> dict:
        """Rewrite parts (deleted and replaced profiles' bytes leave them) and remove the files of versions
        older than `retain_seconds`; damaged parts are left in place and reported under "skipped"."""
        return self.table.compact(timedelta(seconds=retain_seconds))

    def refresh(self) -> bool:
        """See other writers' commits; True when the served version moved."""
        return self.table.refresh()

    def locate(self, profile_id: str) -> Location:
        """Where the served version of a profile is. KeyError (naming the store) when it is not stored;
        DamagedPartError when its part is unreadable."""
        loc = self.table.locate(profile_id)
        if loc is None:
            raise KeyError(f"profile {profile_id!r} is not in the store {self.uri}")
        return loc

    def _profile(self, row: dict, part: int | None = None) -> Profile:
        """A stored row as a Profile; a DamagedPartError naming its part when it does not match its fingerprint
        (the table then reports the part as damaged until the record reads back whole)."""
        try:
            return from_row(row)
        except FingerprintError as e:
            pid = row["profile_id"]
            part = self.table.locate(pid).part if part is None else part
            raise self.table.note_damage(pid, part, f"the record of {pid!r} is damaged: {e}") from None

    def read(self, profile_id: str, loc: Location) -> Profile:
        """The profile stored at `loc`. KeyError when that version is no longer served (locate it again)."""
        row = self.table.read(profile_id, loc)
        if row is None:
            raise KeyError(f"profile {profile_id!r} is no longer at {loc} in the store {self.uri}")
        return self._profile(row, loc.part)

    def get(self, profile_id: str) -> Profile:
        """The served version of a profile. KeyError (naming the store) when it is not there."""
        try:
            return self.read(profile_id, self.locate(profile_id))
        except KeyError:  # moved between the locate and the read (a refresh): once more
            return self.read(profile_id, self.locate(profile_id))

    def get_many(self, profile_ids: list[str]) -> dict[str, Profile | None | DamagedPartError]:
        """Profiles by id, each a Profile, None (not stored) or a DamagedPartError: one bad part fails no other."""
        out: dict[str, Profile | None | DamagedPartError] = {}
        for pid, r in self.table.get_many(profile_ids).items():
            try:
                out[pid] = self._profile(r) if isinstance(r, dict) else r
            except DamagedPartError as e:
                out[pid] = e
        return out

    def ids(self, offset: int = 0, limit: int | None = None) -> list[str]:
        """Stored profile ids, sorted, a page at a time (no profile is read)."""
        return self.table.ids(offset, limit)

    def __contains__(self, profile_id: str) -> bool:
        return profile_id in self.table

    def __len__(self) -> int:
        return self.table.count()

    def count_listed(self) -> int:
        """Stored profiles whose ids can be read: those `ids()` pages through (`len` adds damaged parts')."""
        return self.table.count(listed=True)

    def damaged(self) -> dict[int, dict]:
        """Unreadable parts of the profile table: {part: {files, error, profiles, ids_known}}."""
        return self.table.damaged()

    def recheck(self) -> bool:
        """Read the damaged parts again (a restored file is served again); True when one was repaired."""
        return self.table.recheck(verify=from_row)

    def profiles(self, newest_first: bool = True, errors: list | None = None):
        """(Location, Profile) of every served profile, part by part (bulk reads, e.g. to warm a server);
        damaged parts are appended to `errors` and skipped."""
        for batch in self.table.scan(errors=errors, newest_first=newest_first):
            addrs = batch.column("_rowaddr").to_pylist()
            for addr, row in zip(addrs, batch.drop_columns(["_rowaddr"]).to_pylist(), strict=True):
                loc = Location.of(addr)
                try:
                    yield loc, self._profile(row, loc.part)
                except DamagedPartError as e:
                    if errors is None:
                        raise
                    errors.append(e)

    def summaries(self, offset: int = 0, limit: int = 100) -> list[dict]:
        """Profile id, mode, metrics, size for a page of profiles (sorted by id), without tensors; a profile
        in a damaged part is {"profile_id", "error"} instead."""
        got = self.get_many(self.ids(offset, limit))
        return [
            summary(p) if isinstance(p, Profile) else {"profile_id": pid, "error": str(p or "not stored")}
            for pid, p in got.items()
        ]

    def summary(self, profile_id: str) -> dict:
        return summary(self.get(profile_id))

    def read_table(self, columns: list[str] | None = None) -> pa.Table:
        """Every served row (one per profile), e.g. for reports; damaged parts are skipped with a warning."""
        errors: list[DamagedPartError] = []
        batches = [b.drop_columns(["_rowaddr"]) for b in self.table.scan(columns=columns, errors=errors)]
        for e in errors:
            log.warning("read_table skipped %s", e)
        schema = SCHEMA if columns is None else pa.schema([SCHEMA.field(c) for c in columns])
        if not batches:
            return schema.empty_table()
        return pa.Table.from_batches(batches).cast(schema)

    def stats(self) -> dict:
        return self.table.stats()

    # --- files: heads, banks, run state ---------------------------------------------------------------

    def _write_file(self, rel: str, blob: bytes) -> None:
        """Publish a file whole: via a temp name and a rename on local disk; object stores publish on close."""
        final = f"{self.path}/{rel}"
        self.fs.create_dir(os.path.dirname(final), recursive=True)
        if not self.local:
            with self.fs.open_output_stream(final) as out:
                out.write(blob)
            return
        tmp = f"{os.path.dirname(final)}/.tmp-{uuid.uuid4().hex}"
        try:
            with open(tmp, "wb") as out:
                out.write(blob)
            os.replace(tmp, final)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    def save_head(self, head_id: str, state: dict[str, torch.Tensor]) -> None:
        """Store a shared head with its fingerprint (xpeft.profiles.fingerprints)."""
        self._write_file(f"heads/{head_id}.safetensors", head_bytes(state))

    def _head_bytes(self, head_id: str) -> bytes:
        try:
            with self.fs.open_input_stream(f"{self.path}/heads/{head_id}.safetensors") as f:
                return f.read()
        except FileNotFoundError:
            raise KeyError(f"shared head {head_id!r} is not in the store {self.uri}") from None

    def load_head(self, head_id: str) -> dict[str, torch.Tensor]:
        """A shared head, verified against its fingerprint: KeyError when the store lacks it; a FingerprintError
        (a ValueError) naming the file when it is damaged, or has no fingerprint (the fix is named)."""
        fix = f"xpeft profiles verify --store {self.uri} --fingerprint-heads"
        return head_from_bytes(self._head_bytes(head_id), f"{self.root}/heads/{head_id}.safetensors", fix)

    def head_ids(self) -> list[str]:
        sel = pafs.FileSelector(f"{self.path}/heads", allow_not_found=True)
        return sorted(Path(i.path).stem for i in self.fs.get_file_info(sel) if i.path.endswith(".safetensors"))

    def fingerprint_head(self, head_id: str) -> bool:
        """Give a head written before heads were fingerprinted its fingerprint, as it is; False when it has one
        (a head whose fingerprint does not match is damaged: it is never re-fingerprinted). FingerprintError
        naming the file when it cannot be parsed."""
        blob, name = self._head_bytes(head_id), f"{self.root}/heads/{head_id}.safetensors"
        try:
            if metadata(blob).get("fingerprint"):
                return False
            state, _ = unsealed(blob)
        except FingerprintError as e:
            raise FingerprintError(f"shared head {name} is damaged: {e}; restore the file") from None
        self.save_head(head_id, state)
        return True

    def save_bank(self, bank: AdapterBank) -> str:
        """Store a bank under its fingerprint (once: the name is its content)."""
        rel = f"banks/{bank.fingerprint}.safetensors"
        if self.fs.get_file_info(f"{self.path}/{rel}").type == pafs.FileType.NotFound:
            with tempfile.TemporaryDirectory(prefix="xpeft-bank-") as tmp:
                self._write_file(rel, save_bank(bank, f"{tmp}/bank.safetensors").read_bytes())
        return f"{self.root}/{rel}"

    def load_bank(self, fingerprint: str) -> AdapterBank:
        """A stored bank, verified against its fingerprint (a damaged file is refused, naming it)."""
        name = f"{self.root}/banks/{fingerprint}.safetensors"
        if self.local:
            return load_bank(name)
        with tempfile.TemporaryDirectory(prefix="xpeft-bank-") as tmp:
            try:
                pafs.copy_files(
                    f"{self.path}/banks/{fingerprint}.safetensors", f"{tmp}/b.safetensors", source_filesystem=self.fs
                )
            except FileNotFoundError:
                raise FileNotFoundError(f"no bank {fingerprint} in the store {self.uri} ({name})") from None
            try:
                bank = load_bank(f"{tmp}/b.safetensors")
            except ValueError as e:
                raise ValueError(str(e).replace(f"{tmp}/b.safetensors", name)) from None
        if bank.fingerprint != fingerprint:
            raise ValueError(
                f"bank {name} holds bank {bank.fingerprint[:12]}…, not {fingerprint[:12]}…; it was renamed"
            )
        return bank

    def bank_metadata(self, fingerprint: str) -> dict[str, str]:
        """A stored bank's metadata (N, lineage, source...) from its file's header alone, unverified (a load
        verifies): FileNotFoundError when it is not stored, FingerprintError when the header cannot be read."""
        try:
            with self.fs.open_input_file(f"{self.path}/banks/{fingerprint}.safetensors") as f:
                head = f.read(8)
                size = int.from_bytes(head, "little") if len(head) == 8 else 0
                blob = head + f.read(min(size, MAX_HEADER))
        except FileNotFoundError:
            raise FileNotFoundError(f"no bank {fingerprint} in the store {self.uri}") from None
        return metadata(blob)

    def bank_fingerprints(self) -> list[str]:
        sel = pafs.FileSelector(f"{self.path}/banks", allow_not_found=True)
        return sorted(Path(i.path).stem for i in self.fs.get_file_info(sel) if i.path.endswith(".safetensors"))

    def read_state(self, name: str) -> dict:
        """A job's run state (`state/<name>.json`), {} when there is none."""
        try:
            with self.fs.open_input_stream(f"{self.path}/state/{name}.json") as f:
                blob = f.read()
        except (FileNotFoundError, OSError):
            return {}
        try:
            return json.loads(blob)
        except ValueError:
            raise ValueError(
                f"the run state {self.root}/state/{name}.json is damaged (not JSON): restore it, or remove it to "
                "start the job's warm start again"
            ) from None

    def write_state(self, name: str, state: dict) -> None:
        """Replace a job's run state atomically."""
        self._write_file(f"state/{name}.json", json.dumps(state).encode())


def refuse_old_layout(fs: pafs.FileSystem, path: str, uri: str) -> None:
    """A store written before the profile table (profiles/part-*.parquet) is refused, naming the fix."""
    if fs.get_file_info(f"{path}/profiles").type != pafs.FileType.Directory:
        return
    if fs.get_file_info(f"{path}/{TABLE}").type == pafs.FileType.Directory:
        return
    raise ValueError(
        f"{uri} is a profile store in the old layout (profiles/part-*.parquet, one Parquet file per write); "
        f"convert it into a new store with `xpeft profiles migrate {uri} NEW`"
    )
