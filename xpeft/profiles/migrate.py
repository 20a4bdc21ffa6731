"""`xpeft profiles migrate OLD NEW`: a store in the layout before the profile table (profiles/part-*.parquet,
one Parquet file per write, heads/, banks/, state/ or farm_state.json) converted into a new store.

Nothing is written before everything was checked: a part file that cannot be read, a bank whose content does
not match its fingerprint, or a shared head that cannot be read, stops the migration naming the file
(`skip_unreadable=True` migrates the rest and reports what was left out). When a profile was written twice,
its newest row (by `created`) is kept, as the old store served it. Shared heads and records are written with
the fingerprints the old layout did not give them (xpeft.profiles.fingerprints). The old store is left
untouched.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from xpeft.core.bank import load_bank
from xpeft.profiles.fingerprints import FingerprintError, unsealed
from xpeft.profiles.record import from_row, to_row
from xpeft.profiles.store import SCHEMA, TABLE, ProfileStore, filesystem, split_uri

log = logging.getLogger(__name__)


@dataclass
class Migration:
    """What a migration found and did."""

    files: int = 0
    rows: int = 0
    profiles: int = 0
    unreadable: dict[str, str] = field(default_factory=dict)  # part file -> why
    copied: list[str] = field(default_factory=list)  # heads, banks and state files

    def to_dict(self) -> dict:
        return {**self.__dict__, "replaced_versions_dropped": self.rows - self.profiles}


def _kind(fs: pafs.FileSystem, path: str) -> str:
    """'table' (the new layout), 'parquet' (the old one), 'empty' (nothing there) or 'other'."""
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        return "empty"
    if fs.get_file_info(f"{path}/{TABLE}").type == pafs.FileType.Directory:
        return "table"
    if fs.get_file_info(f"{path}/profiles").type == pafs.FileType.Directory:
        return "parquet"
    entries = fs.get_file_info(pafs.FileSelector(path)) if info.type == pafs.FileType.Directory else [info]
    return "empty" if not entries else "other"


def _part_files(fs: pafs.FileSystem, path: str) -> list[str]:
    sel = pafs.FileSelector(f"{path}/profiles", allow_not_found=True)
    return sorted(i.path for i in fs.get_file_info(sel) if i.is_file and os.path.basename(i.path).startswith("part-"))


def _newest_rows(fs: pafs.FileSystem, files: list[str], report: Migration) -> dict[str, tuple[float, int, int]]:
    """profile_id -> (created, file index, row) of its newest row; unreadable files go into the report."""
    newest: dict[str, tuple[float, int, int]] = {}
    for i, path in enumerate(files):
        try:
            t = pq.read_table(path, columns=["profile_id", "created"], filesystem=fs)
        except Exception as e:  # noqa: BLE001 - any unreadable file is reported by name
            report.unreadable[path] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            continue
        report.rows += t.num_rows
        for row, (pid, created) in enumerate(zip(t["profile_id"].to_pylist(), t["created"].to_pylist(), strict=True)):
            if pid not in newest or created >= newest[pid][0]:
                newest[pid] = (created, i, row)
    return newest


def _winning_batches(fs, files: list[str], newest: dict[str, tuple[float, int, int]]):
    by_file: dict[int, list[int]] = {}
    for _, i, row in newest.values():
        by_file.setdefault(i, []).append(row)
    for i in sorted(by_file):
        t = pq.read_table(files[i], filesystem=fs).select(SCHEMA.names).cast(SCHEMA)
        for batch in t.take(pa.array(sorted(by_file[i]))).to_batches(max_chunksize=4096):
            rows = [to_row(from_row(r)) for r in batch.to_pylist()]  # each record with its fingerprint
            yield pa.RecordBatch.from_pylist(rows, schema=SCHEMA)


def _check_banks(fs, path: str, uri: str) -> None:
    sel = pafs.FileSelector(f"{path}/banks", allow_not_found=True)
    for info in fs.get_file_info(sel):
        if not info.path.endswith(".safetensors"):
            continue
        with tempfile.TemporaryDirectory(prefix="xpeft-migrate-") as tmp:
            pafs.copy_files(info.path, f"{tmp}/bank.safetensors", source_filesystem=fs)
            try:
                load_bank(f"{tmp}/bank.safetensors")
            except ValueError as e:
                name = f"{uri.rstrip('/')}/banks/{os.path.basename(info.path)}"
                raise ValueError(f"not migrating {uri}: {str(e).replace(f'{tmp}/bank.safetensors', name)}") from None


def _check_heads(fs, path: str, uri: str) -> None:
    for info in fs.get_file_info(pafs.FileSelector(f"{path}/heads", allow_not_found=True)):
        if info.is_file and info.path.endswith(".safetensors"):
            with fs.open_input_stream(info.path) as f:
                try:
                    unsealed(f.read())
                except FingerprintError as e:
                    name = f"{uri.rstrip('/')}/heads/{os.path.basename(info.path)}"
                    raise ValueError(f"not migrating {uri}: shared head {name} is damaged: {e}; restore it") from None


def _copy_files(src_fs, src: str, new: ProfileStore, report: Migration) -> None:
    """heads/, banks/, state/ (and the oldest layout's farm_state.json as state/farm.json), byte for byte."""
    for sub in ("heads", "banks", "state"):
        for info in src_fs.get_file_info(pafs.FileSelector(f"{src}/{sub}", allow_not_found=True)):
            if info.is_file and not os.path.basename(info.path).startswith(".tmp-"):
                with src_fs.open_input_stream(info.path) as f:
                    new._write_file(f"{sub}/{os.path.basename(info.path)}", f.read())
                report.copied.append(f"{sub}/{os.path.basename(info.path)}")
                if sub == "heads" and info.path.endswith(".safetensors"):
                    new.fingerprint_head(os.path.basename(info.path).removesuffix(".safetensors"))
    legacy = f"{src}/farm_state.json"
    if src_fs.get_file_info(legacy).is_file and "state/farm.json" not in report.copied:
        with src_fs.open_input_stream(legacy) as f:
            new._write_file("state/farm.json", f.read())
        report.copied.append("state/farm.json (from farm_state.json)")


def migrate(old: str, new: str, skip_unreadable: bool = False) -> Migration:
    """Convert the old-layout store `old` into a new store at `new` (which must not exist or be empty)."""
    old_root, old_opts = split_uri(old)
    old_fs, old_path = filesystem(old_root, old_opts)
    kind = _kind(old_fs, old_path)
    if kind != "parquet":
        what = {
            "table": "already a store in the current layout (profiles.lance): nothing to migrate",
            "empty": "empty or missing",
            "other": "not a profile store (no profiles/ folder of part-*.parquet files)",
        }[kind]
        raise ValueError(f"{old} is {what}")
    new_root, new_opts = split_uri(new)
    new_fs, new_path = filesystem(new_root, new_opts)
    if _kind(new_fs, new_path) != "empty":
        raise ValueError(f"{new} is not empty; migrate into a new directory or prefix")
    report = Migration()
    files = _part_files(old_fs, old_path)
    report.files = len(files)
    newest = _newest_rows(old_fs, files, report)
    if report.unreadable and not skip_unreadable:
        names = "; ".join(f"{p} ({why})" for p, why in report.unreadable.items())
        raise ValueError(
            f"not migrating {old}: {len(report.unreadable)} part file(s) cannot be read: {names}. Restore them, "
            "or pass --skip-unreadable to migrate the rest (their profiles can be fitted again)"
        )
    _check_banks(old_fs, old_path, old)
    _check_heads(old_fs, old_path, old)
    new_fs.create_dir(new_path, recursive=True)
    store = ProfileStore(new)
    _copy_files(old_fs, old_path, store, report)
    if newest:
        store.table.bulk_load(_winning_batches(old_fs, files, newest), SCHEMA)
    report.profiles = len(store)
    if report.profiles != len(newest):
        raise RuntimeError(f"migrated {report.profiles} profiles into {new} but {old} holds {len(newest)}; check both")
    log.info("migrated %s into %s: %s", old, new, report.to_dict())
    return report
