"""The profile table's damage: which parts cannot be read, what they hold, and when they are repaired.

Damage is found two ways. A part whose id column cannot be read when a reader opens or refreshes is recorded
by the id index (xpeft.profiles.index). A part whose rows fail when a profile is read from it (a file damaged
while a server runs, or a record that does not match its fingerprint) is recorded here (`FoundDamage`).
Either way its profiles are refused as damaged (a 503 from a server), never answered as absent:
- a profile of a damaged part whose ids are known (read before, or found in the table's scalar index on
  profile_id, which `writes.update_index` keeps covering every part as writes land) is refused naming the part;
- an id found in no readable part, while some damaged part's ids are not known at all, may be in that part:
  it is refused too (`DamagedPartError.maybe`), not a 404.
A reader reads its damaged parts again on every refresh (ProfileTable.recheck): a restored file clears them.
"""

from __future__ import annotations

import logging
import threading
import warnings

from xpeft.profiles import writes
from xpeft.profiles.index import KEY

log = logging.getLogger(__name__)


class FoundDamage:
    """Parts whose rows failed a read: part -> {"profile_id", "address" (a row that failed), "error"}."""

    def __init__(self):
        self._parts: dict[int, dict] = {}
        self._lock = threading.Lock()

    def add(self, part: int, profile_id: str | None, address: int | None, error: str) -> None:
        with self._lock:
            if part not in self._parts or self._parts[part]["address"] is None:
                self._parts[part] = {"profile_id": profile_id, "address": address, "error": error}

    def discard(self, part: int) -> None:
        with self._lock:
            self._parts.pop(part, None)

    def items(self) -> list[tuple[int, dict]]:
        with self._lock:
            return list(self._parts.items())

    def __bool__(self) -> bool:
        return bool(self._parts)


def indexed_parts(ds) -> set[int]:
    """The parts the table's scalar index on profile_id covers (any of its segments)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return {f for i in ds.list_indices() if i.get("fields") == [KEY] for f in i.get("fragment_ids") or ()}


def part_in_index(ds, profile_id: str, parts: set[int]) -> int | None:
    """Which of `parts` holds `profile_id`, from the scalar index alone (`fast_search`: no data file is read);
    None when none does. Raises when the index cannot be searched."""
    if not parts:
        return None
    t = ds.to_table(filter=f"{KEY} = {writes.quote(profile_id)}", columns=[], with_row_address=True, fast_search=True)
    found = [a >> 32 for a in t.column("_rowaddr").to_pylist() if (a >> 32) in parts]
    return found[0] if found else None


def where_damaged(ds, profile_id: str, damaged: dict[int, str], indexed: set[int]) -> tuple[int, bool] | None:
    """For an id in no readable part: (the damaged part holding it, False), (a damaged part that may hold it,
    True) when some damaged part's ids are not known, or None: it is not stored."""
    try:
        part = part_in_index(ds, profile_id, set(damaged) & indexed)
    except Exception as e:  # noqa: BLE001 - an index that cannot be searched tells nothing: every part may hold it
        log.warning("index search of %r in %s failed: %s", profile_id, ds.uri, str(e).splitlines()[0][:200])
        indexed = set()
        part = None
    if part is not None:
        return part, False
    unknown = sorted(set(damaged) - indexed)
    return (unknown[0], True) if unknown else None
