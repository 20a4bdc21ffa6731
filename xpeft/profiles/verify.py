"""`xpeft profiles verify`: every file the profiles of a store depend on, checked against its fingerprint.

Each bank and each shared head is read and verified; the parts of the profile table whose ids cannot be read
are listed (with `records`, every record is read and verified too: a full read of the table). The repairs it
offers are explicit: `fingerprint_heads` gives a head written before heads were fingerprinted its fingerprint
(as it is: a head whose fingerprint does not match is damaged and never re-fingerprinted), `drop_damaged`
drops the parts that cannot be read (their profiles read as not stored, so a farm run fits them again).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from xpeft.profiles.fingerprints import FingerprintError, metadata
from xpeft.profiles.record import from_row
from xpeft.profiles.store import ProfileStore


@dataclass
class Verification:
    banks: dict[str, str] = field(default_factory=dict)  # fingerprint -> "ok", or why not
    heads: dict[str, str] = field(default_factory=dict)  # head_id -> "ok", or why not
    parts: dict[int, dict] = field(default_factory=dict)  # damaged parts of the profile table
    records: dict[str, object] = field(default_factory=dict)  # with records=True: read, unfingerprinted, damaged
    fingerprinted: list[str] = field(default_factory=list)  # heads given their fingerprint now
    dropped: int = 0  # profiles of the damaged parts dropped now

    @property
    def problems(self) -> list[str]:
        out = [why for why in [*self.banks.values(), *self.heads.values()] if why != "ok"]
        out += [
            f"part {p} ({', '.join(d['files'])}), {d['profiles']} profiles: {d['error']}" for p, d in self.parts.items()
        ]
        return out + list(self.records.get("damaged", []))

    def to_dict(self) -> dict:
        return {**self.__dict__, "parts": {str(p): d for p, d in self.parts.items()}, "problems": self.problems}


def verify(
    store: ProfileStore, fingerprint_heads: bool = False, drop_damaged: bool = False, records: bool = False
) -> Verification:
    out = Verification()
    for fp in store.bank_fingerprints():
        try:
            store.load_bank(fp)
            out.banks[fp] = "ok"
        except (ValueError, FileNotFoundError) as e:
            out.banks[fp] = str(e)
    for head_id in store.head_ids():
        try:
            if fingerprint_heads and store.fingerprint_head(head_id):
                out.fingerprinted.append(head_id)
            store.load_head(head_id)
            out.heads[head_id] = "ok"
        except FingerprintError as e:
            out.heads[head_id] = str(e)
    if drop_damaged and store.damaged():
        out.dropped = store.table.drop_parts(sorted(store.damaged()))
    out.parts = store.damaged()
    if records:
        out.records = read_every_record(store)
    return out


def read_every_record(store: ProfileStore) -> dict[str, object]:
    """Every record read and verified: how many, how many have no fingerprint (written before records were
    fingerprinted: read as they are), and the damaged ones."""
    errors: list = []
    n, unfingerprinted, damaged = 0, 0, []
    for batch in store.table.scan(errors=errors):
        for row in batch.drop_columns(["_rowaddr"]).to_pylist():
            n += 1
            try:
                unfingerprinted += not row["tensors"] or not metadata(row["tensors"]).get("fingerprint")
                from_row(row)
            except FingerprintError as e:
                damaged.append(f"the record of {row['profile_id']!r} is damaged: {e}")
    return {"read": n, "unfingerprinted": unfingerprinted, "damaged": damaged + [str(e) for e in errors]}
